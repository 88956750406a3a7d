"""Fused linear projections + generalized JSD distillation for large vocabularies.

The student's and the teacher's ``[N, V]`` logits are never stored: the loss
runs on the streaming engine of :mod:`jaxent._streaming` (the one
:func:`jaxent.linear_softmax_cross_entropy` uses), over (token chunk x
vocabulary block) tiles of both models' logits. The forward makes two passes:
the first keeps per-token online max / sum-exp statistics of the student (at
``T``, and at 1 for the hard-label term) and of the teacher (at ``T``); the
second, with those normalizers known, sums the divergence per token. At the KL
ends (``beta`` 0 or 1) the first pass also keeps a running KL sum rescaled with
the online max, and there is no second pass. The backward recomputes each pair
of tiles, forms the student's logits gradient and feeds it to the two gradient
matmuls. :func:`_materialized` is the same loss on materialized logits in plain
JAX (the reference twin).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from ._args import (
    as_float,
    check_fraction,
    check_index,
    check_nonnegative,
    check_positive,
    check_reduction,
    describe,
)
from ._define import Rule, loss
from ._distill import _JSDOpts, _log_ratios, _softmax_jsd_plain
from ._divergence import _softmax_kl_plain
from ._numerics import compute_dtype, mul0, tempered
from ._softmax import plain_normalizer, plain_sum
from ._streaming import (
    bias_arg,
    block_size_arg,
    blocked,
    blocks,
    chunk_rows,
    col_offset,
    combine_max_sumexp,
    common_float,
    forward_grads,
    log_normalizer,
    logits_tile,
    online_max_sumexp,
    optional_positive,
    per_platform_chunk,
    per_platform_tile,
    run_head,
    scale_grads,
    slice_rows,
    softcap,
    tile_grads,
    token_weights_arg,
    tokens_arg,
    update_rows,
    varying,
)


class _Opts(NamedTuple):
    """Static options of the fused rule (hashable: a ``nondiff_argnums`` entry)."""

    beta: float
    temperature: float
    hard: float  # hard_weight
    soft: float  # soft_weight
    softcap: float | None
    block_size: tuple[int | None, int] | None

    @property
    def shared(self) -> bool:
        """Whether the hard term's softmax (T = 1) is the soft term's."""
        return self.soft != 0 and self.temperature == 1.0


@loss(
    "hidden",
    "weight",
    "teacher_hidden",
    "teacher_weight",
    "class_ids",
    where="rows",
)
def linear_softmax_distillation(
    impl,
    hidden: ArrayLike,
    weight: ArrayLike,
    teacher_hidden: ArrayLike,
    teacher_weight: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    ignore_index: int | None = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    softcap: float | None = None,
    reduction: str = "none",
    block_size: int | tuple[int, int] | None = None,
    axis_name: Hashable | None = None,
    low_memory: bool = False,
) -> jax.Array:
    r"""Distillation of a teacher's head into a student's without materializing
    either model's logits.

    With student logits :math:`x_i = h_i W + b` and teacher logits :math:`t_i =
    h'_i W' + b'` over a shared vocabulary of :math:`V` classes (each capped to
    :math:`c \tanh(\cdot / c)` with ``softcap`` :math:`c`), temperature
    :math:`T`, :math:`q_i = \mathrm{softmax}(x_i / T)` (the student),
    :math:`p_i = \mathrm{softmax}(t_i / T)` (the teacher) and the mixture
    :math:`M_i = \beta p_i + (1 - \beta) q_i`, each token's loss is

    .. math::
        \ell_i = s \left[\beta\, \mathrm{KL}(p_i \,\|\, M_i)
        + (1 - \beta)\, \mathrm{KL}(q_i \,\|\, M_i)\right]
        + w \left(\log\textstyle\sum_k e^{x_{ik}} - x_{iy_i}\right)

    with ``soft_weight`` :math:`s` on the generalized Jensen-Shannon divergence
    of :func:`softmax_generalized_jsd` (the forward KL ``KL(p || q)`` at ``beta
    = 0``, the reverse KL ``KL(q || p)`` at ``beta = 1``, as there) and
    ``hard_weight`` :math:`w` on the cross-entropy of the student at ``T = 1``
    with the ``labels``. Same values and gradients as those losses on the
    materialized logits, to floating-point rounding.

    It runs on the streaming engine of :func:`linear_softmax_cross_entropy`
    (its XLA path; there are no Pallas kernels for this loss), with its two
    paths. With ``reduction="sum"`` or ``"mean"``, when differentiated, token
    chunks of full rows: per chunk one teacher and one student matmul give
    both models' normalizers, the divergence (any ``beta``) and the student's
    logits gradient at once, which feeds the two gradient matmuls (one teacher
    and three student matmuls, as materialized logits; a float32 ``d weight``
    accumulator). With ``"none"`` or ``low_memory=True``: tiles of tokens by
    classes of both models' logits, two forward passes (per-token online max
    / log-sum-exp of both models, then the divergence sums; one pass at
    ``beta`` 0 or 1, where a running KL sum is rescaled like the sum-exp),
    residuals made of the inputs and a few float32 statistics per token, and a
    backward that recomputes each pair of tiles, forms ``G = d loss / d x``
    (for ``0 < beta < 1``, ``s ((1 - beta) / T) q (log q - log M - KL(q ||
    M)) + w (softmax(x) - onehot(y))``, times ``1 - tanh^2`` with a softcap)
    and feeds it to the gradient matmuls, accumulating in float32. No ``[N,
    V]`` array exists in the forward, the backward or the residuals.

    The teacher is frozen: ``teacher_hidden``, ``teacher_weight`` and
    ``teacher_bias`` get zero cotangents, as under ``jax.lax.stop_gradient``
    (second derivatives through them are zero too).

    Args:
      hidden: the student's hidden states, floating ``[..., D]`` (``N`` = the
        product of the leading dims).
      weight: the student's head, floating ``[D, V]`` (``[D, V / shards]``
        with ``axis_name``); a tied ``[V, D]`` embedding is passed as
        ``embedding.T``.
      teacher_hidden: the teacher's hidden states, floating ``[..., D']``
        with ``hidden``'s leading shape; ``D'`` may differ from ``D``.
      teacher_weight: the teacher's head, floating ``[D', V]`` (sharded like
        ``weight``).
      labels: optional integer array ``[...]`` (``hidden``'s leading shape) of
        class indices in ``[0, V)``, global ids when vocab-parallel. Required
        when ``hard_weight != 0``.
      beta: ``beta``, a static Python float in ``[0, 1]``: the teacher's weight
        in the mixture.
      temperature: ``T``, a static Python float > 0 dividing both models'
        logits (after the softcap) in the divergence; the hard term is at
        ``T = 1``.
      hard_weight: ``w >= 0``, the weight of the cross-entropy with ``labels``.
      soft_weight: ``s >= 0``, the weight of the divergence.
      bias: optional floating ``[V]`` added to the student's logits (sharded
        like ``weight``'s columns); ``-inf`` entries are masked classes.
      teacher_bias: optional floating ``[V]`` added to the teacher's logits.
      ignore_index: label value whose tokens are not counted (loss and
        gradient 0, excluded from the mean's denominator); ``-100`` as in
        PyTorch, ``None`` to count every token; ignored without ``labels``.
      where: optional boolean token mask of ``hidden``'s leading shape;
        ``False`` excludes that token like ``ignore_index``.
      token_weights: optional floating array of the tokens' shape, any sign
        (sample weights, per-token advantages): each counted token's loss
        times its weight; ``"mean"`` still divides by the number of counted
        tokens. It receives no gradient.
      softcap: optional ``c > 0``: both models' logits become ``c * tanh(logits
        / c)`` (after the bias) before the temperature, as in Gemma 2; a
        ``-inf`` logit stays ``-inf``.
      reduction: ``"none"`` (per token), ``"sum"`` or ``"mean"`` (over counted
        tokens; 0 when none is counted).
      block_size: vocabulary block width ``block_v``, or a pair ``(block_n,
        block_v)``; ``None`` picks the tiles of
        :func:`linear_softmax_cross_entropy`'s XLA path (about ``2**20``
        logits on CPU, ``2**24`` on GPU/TPU, chosen at lowering).
      axis_name: mesh axis over which ``weight``, ``teacher_weight`` and the
        biases are sharded by columns, inside ``shard_map`` (vocab-parallel):
        the exact global loss from ``O(N)`` collectives per pass; the backward
        needs only a ``psum`` of ``d hidden``.
      low_memory: with ``"sum"``/``"mean"``, trade time for memory: the
        recompute path (no weight-sized float32 accumulator, 1.56x to 2.11x
        the materialized matmul FLOPs).

    Returns:
      per-token losses of ``hidden``'s leading shape for ``reduction="none"``,
      else a scalar, in the dtype of ``hidden``, ``weight`` and ``bias``
      promoted, float32 for half-precision inputs (computed and reduced in
      float32; the gradients keep the inputs' dtypes).

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> h = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
      >>> th = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # teacher D' = 3
      >>> tw = jnp.eye(3)
      >>> jaxent.linear_softmax_distillation(h, w, th, tw).round(4)
      Array([0.0807, 0.026 ], dtype=float32)
      >>> jaxent.linear_softmax_distillation(
      ...     h, w, th, tw, jnp.array([0, 2]), beta=0.0, temperature=2.0,
      ...     hard_weight=0.5, reduction="mean",
      ... ).round(4)
      Array(0.26, dtype=float32)

    Note:
      The divergence is at temperature ``T`` with no hidden factor: Hinton et
      al.'s recipe multiplies it by ``T**2`` (``soft_weight=T**2``), which
      keeps the soft gradient's scale as ``T`` varies.

      Logits follow :func:`softmax_generalized_jsd`'s conventions: a class
      ``-inf`` in one model only has probability 0 there, and for ``0 < beta
      < 1`` the divergence stays finite; at ``beta = 0`` a ``-inf`` student
      logit under positive teacher mass gives ``+inf`` (at ``beta = 1`` the
      other way round); ``+inf``/NaN logits give NaN for that token (with a
      softcap, ``+inf`` becomes ``c``). With ``hard_weight != 0`` an
      out-of-range label (not ``ignore_index``) gives NaN for that token's loss
      and gradients.

      Being a ``jax.custom_vjp``, it cannot be used with ``jax.jvp``/
      ``jax.jacfwd``; its backward is plain JAX, so it can be differentiated
      again in reverse mode and forward-over-reverse. For forward mode, use
      ``jaxent.reference.linear_softmax_distillation``, which materializes both
      logit arrays.
    """
    fn = "linear_softmax_distillation"
    h = as_float(fn, "hidden", hidden)
    w = as_float(fn, "weight", weight)
    th = as_float(fn, "teacher_hidden", teacher_hidden)
    tw = as_float(fn, "teacher_weight", teacher_weight)
    beta = check_fraction(fn, "beta", beta)
    temperature = check_positive(fn, "temperature", temperature)
    hard = check_nonnegative(fn, "hard_weight", hard_weight)
    soft = check_nonnegative(fn, "soft_weight", soft_weight)
    cap = optional_positive(fn, "softcap", softcap)
    reduction = check_reduction(fn, reduction)
    blocks_given = block_size_arg(fn, block_size)
    ignore_index = check_index(fn, "ignore_index", ignore_index)
    _check_shapes(fn, h, w, th, tw)
    batch = h.shape[:-1]
    if not isinstance(low_memory, bool | np.bool_):
        raise TypeError(f"{fn}: `low_memory` must be a bool; got {low_memory!r}.")
    y, counted = tokens_arg(fn, labels, hard, ignore_index, where, batch)
    dtype = common_float(h.dtype, w.dtype)
    tdtype = common_float(th.dtype, tw.dtype)
    b = bias_arg(fn, "bias", bias, w.shape[1])
    tb = bias_arg(fn, "teacher_bias", teacher_bias, w.shape[1])
    if b is not None:
        dtype = common_float(dtype, b.dtype)
        b = b.astype(dtype)
    if tb is not None:
        tdtype = common_float(tdtype, tb.dtype)
        tb = tb.astype(tdtype)
    tweights = token_weights_arg(fn, token_weights, batch)

    n, (d, v_local), dt = int(np.prod(batch)), w.shape, tw.shape[0]
    num_classes = v_local * (1 if axis_name is None else lax.axis_size(axis_name))
    y = y.reshape(n)
    # Labels outside [0, V) are flagged before narrowing to int32 (a wrapped
    # int64 cannot land on a real class); they only matter for the hard term.
    in_range = (y >= 0) & (y < num_classes)
    y32 = jnp.where(in_range, y, -1).astype(jnp.int32)
    if hard == 0:
        in_range = jnp.ones_like(in_range)
    opts = _Opts(beta, temperature, hard, soft, cap, blocks_given)
    # The teacher is frozen: no derivative of any order flows into it.
    teacher = lax.stop_gradient(
        (th.astype(tdtype).reshape(n, dt), tw.astype(tdtype), tb)
    )
    arrays = (
        h.astype(dtype).reshape(n, d),
        w.astype(dtype),
        b,
        *teacher,
        y32,
        counted.reshape(n),
        in_range,
    )
    out, _ = run_head(
        impl,
        (_DISTILL_SUM, _DISTILL),
        arrays,
        _LAYOUT,
        opts,
        axis_name=axis_name,
        reduction=reduction,
        recompute=low_memory,
        counted=counted,
        token_weights=tweights,
        acc=compute_dtype(dtype),
    )
    return out


# Layouts of the rule's arrays for :func:`jaxent._streaming.partitioned`.
_LAYOUT = (
    *("hidden", "weight", "bias") * 2,
    *("tokens",) * 3,
)


def _check_shapes(fn: str, h, w, th, tw) -> None:
    for name, x, hname, hx in (
        ("weight", w, "hidden", h),
        ("teacher_weight", tw, "teacher_hidden", th),
    ):
        if x.ndim != 2:
            raise ValueError(
                f"{fn}: `{name}` must be [D, V] (a tied [V, D] embedding is "
                f"passed as `embedding.T`); got {describe(x)}."
            )
        if hx.ndim < 1 or hx.shape[-1] != x.shape[0]:
            raise ValueError(
                f"{fn}: `{name}` must be [D, V] with D = {hname}.shape[-1]; got "
                f"`{name}` {describe(x)} and `{hname}` {describe(hx)}."
            )
    if tw.shape[1] != w.shape[1]:
        raise ValueError(
            f"{fn}: `teacher_weight` must have weight's vocabulary size "
            f"{w.shape[1]} (columns); got {describe(tw)}."
        )
    if th.shape[:-1] != h.shape[:-1]:
        raise ValueError(
            f"{fn}: `teacher_hidden` must have hidden's leading shape "
            f"{h.shape[:-1]}; got {describe(th)}."
        )


# -- the fused rule ----------------------------------------------------------------


class _Stats(NamedTuple):
    """Per-token statistics (float32, or float64 for float64 inputs), None
    when the options do not need them. Normalizers are ``(shift, log s)``
    pairs (see :func:`jaxent._streaming.log_normalizer`)."""

    ms: jax.Array | None  # student at T
    ls: jax.Array | None
    mt: jax.Array | None  # teacher at T
    lt: jax.Array | None
    m1: jax.Array | None  # student at T = 1 (when not the same as at T)
    l1: jax.Array | None
    mass: jax.Array | None  # beta = 0: 1 where the teacher has an admissible class
    kl: jax.Array | None  # KL(q || M) for 0 < beta < 1, else the divergence


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _fused(h, w, b, th, tw, tb, y, counted, in_range, axis_name, opts):
    return _fused_fwd(h, w, b, th, tw, tb, y, counted, in_range, axis_name, opts)[0]


def _acc(h, th) -> jnp.dtype:
    """The dtype both models' logits and the statistics are computed in."""
    return compute_dtype(common_float(h.dtype, th.dtype))


def _fused_fwd(h, w, b, th, tw, tb, y, counted, in_range, axis_name, opts: _Opts):
    y_local = y - col_offset(axis_name, w.shape[1])
    # Pass 1: each model's online max / sum-exp, the target logit and, for
    # the KL ends, the KL's running sum.
    raw = per_platform_tile(
        functools.partial(_normalizers, opts=opts), h, w, b, th, tw, tb, y_local
    )
    # Pass 2 (0 < beta < 1): the divergence sums, the normalizers known.
    sums = functools.partial(_divergence_sums, opts=opts)
    loss, stats = _finish(
        raw,
        counted,
        in_range,
        _acc(h, th),
        axis_name,
        opts,
        lambda stats: per_platform_tile(sums, h, w, b, th, tw, tb, stats),
    )
    return loss, (h, w, b, th, tw, tb, y, counted, in_range, stats)


def _finish(raw, counted, in_range, acc, axis_name, opts: _Opts, divergence_sums):
    """Per-token losses and :class:`_Stats` from pass 1's per-token statistics
    of this shard's columns (:func:`_pass1`); ``divergence_sums(stats)`` gives
    this shard's ``(KL(q || M), KL(p || M))`` sums for ``0 < beta < 1``."""
    ms, ss, mt, st, m1, s1, ty, ka = raw
    stats = _Stats(*[None] * 8)
    loss = jnp.zeros(counted.shape, acc)
    if opts.soft:
        if ka is not None:
            ka = _combine_kl_sum(mt if opts.beta == 0.0 else ms, ka, axis_name)
        ms, ss = combine_max_sumexp(ms, ss, axis_name)
        mt, st = combine_max_sumexp(mt, st, axis_name)
        mass = (st > 0).astype(acc) if opts.beta == 0.0 else None
        ms, ls = log_normalizer(ms, ss)
        mt, lt = log_normalizer(mt, st)
        stats = stats._replace(ms=ms, ls=ls, mt=mt, lt=lt, mass=mass)
        if ka is not None:
            # KL(f || e) = sum_k f_k (lf_k - le_k) = ka / s_f - (m_f - m_e) -
            # (ls_f - ls_e), f the teacher at beta = 0, the student at 1; 0
            # where f has no admissible class.
            teacher, student = (mt, lt, st), (ms, ls, ss)
            f, e = (teacher, student) if opts.beta == 0.0 else (student, teacher)
            some = f[2] > 0
            kl = (ka / jnp.where(some, f[2], 1.0) - (f[0] - e[0])) - (f[1] - e[1])
            kl = jnp.where(some, kl, 0.0)
            loss = opts.soft * kl
        else:
            klq, klp = divergence_sums(stats)
            if axis_name is not None:
                klq, klp = lax.psum((klq, klp), axis_name)
            kl = klq
            loss = opts.soft * (opts.beta * klp + (1 - opts.beta) * klq)
        stats = stats._replace(kl=kl)
    if opts.hard:
        if opts.shared:
            m1, l1 = stats.ms, stats.ls
        else:
            m1, l1 = log_normalizer(*combine_max_sumexp(m1, s1, axis_name))
            stats = stats._replace(m1=m1, l1=l1)
        if axis_name is not None:
            ty = lax.psum(ty, axis_name)
        loss = loss + opts.hard * ((m1 - ty) + l1)
    loss = jnp.where(counted, jnp.where(in_range, loss, jnp.nan), 0.0)
    return loss, stats


def _combine_kl_sum(m, ka, axis_name):
    """The KL's running sum of each shard (relative to the shard's max ``m``
    of the side it weighs) summed across ``axis_name`` at the global max."""
    if axis_name is None:
        return ka
    m_all = lax.pmax(m, axis_name)
    scale = jnp.exp(m - jnp.where(m_all == -jnp.inf, 0.0, m_all))
    return lax.psum(jnp.where(scale == 0, 0.0, ka * scale), axis_name)


def _fused_bwd(axis_name, opts: _Opts, res, g):
    h, w, b, th, tw, tb, y, counted, in_range, stats = res
    acc = _acc(h, th)
    g = jnp.where(counted, jnp.where(in_range, g.astype(acc), jnp.nan), 0.0)
    if opts.soft or opts.hard:
        y_local = y - col_offset(axis_name, w.shape[1])
        dh, dw, db = per_platform_tile(
            functools.partial(_grads, opts=opts), h, w, b, th, tw, tb, y_local, g, stats
        )
        if axis_name is not None:
            # Each shard holds the part of d hidden from its own columns.
            dh = lax.psum(dh, axis_name)
    else:
        dh, dw = jnp.zeros_like(h), jnp.zeros_like(w)
        db = None if b is None else jnp.zeros_like(b)
    db = None if b is None else db.astype(b.dtype)
    frozen = (None,) * 6  # the teacher's arrays, labels and masks
    return (dh.astype(h.dtype), dw.astype(w.dtype), db, *frozen)


_fused.defvjp(_fused_fwd, _fused_bwd)


def _tiles(h, w, b, th, tw, tb, r0, rn, c0, cw, acc, opts: _Opts):
    """One tile of the student's logits (after the softcap) with its input
    slices and tanh, and the same tile of the teacher's (None without the
    divergence)."""
    hb, wb, x = logits_tile(h, w, b, r0, rn, c0, cw, acc)
    tanh = t = None
    if opts.softcap is not None:
        x, tanh = softcap(x, opts.softcap)
    if opts.soft:
        _, _, t = logits_tile(th, tw, tb, r0, rn, c0, cw, acc)
        if opts.softcap is not None:
            t = softcap(t, opts.softcap)[0]
    return hb, wb, x, tanh, t


def _log_probs(x, t, rows, opts: _Opts):
    """Student and teacher log-probabilities at ``T`` of a tile, from the
    per-token normalizers ``rows = (ms, ls, mt, lt)`` (``[rn, 1]`` each)."""
    ms, ls, mt, lt = rows
    lq = (tempered(x, opts.temperature) - ms) - ls
    lp = (tempered(t, opts.temperature) - mt) - lt
    return lq, lp


def _normalizers(h, w, b, th, tw, tb, y, *, opts: _Opts, tile: int):
    """Pass 1: per-token running ``(max, sum-exp)`` of the student at ``T``, of
    the teacher at ``T`` and of the student at 1 (each None when not needed),
    the target logit (None without the hard term) and, at ``beta`` 0 or 1,
    the KL divergence's running sum (see :func:`_online_kl_sum`; else None),
    over this shard's columns (``y`` in local ids)."""
    n, v = h.shape[0], w.shape[1]
    acc = _acc(h, th)
    block_n, block_v = blocks(opts.block_size, n, v, tile)

    def vocab_block(c0, cw, carry):
        def token_chunk(r0, rn, carry):
            _, _, x, _, t = _tiles(h, w, b, th, tw, tb, r0, rn, c0, cw, acc, opts)
            (yb,) = slice_rows((y,), r0, rn)
            raw = _pass1(x, t, yb, c0, slice_rows(carry, r0, rn), opts)
            return update_rows(carry, raw, r0)

        return blocked(n, block_n, token_chunk, carry)

    return blocked(
        v, block_v, vocab_block, varying(_pass1_init(n, acc, opts), h, w, th, tw)
    )


def _pass1_init(n: int, acc, opts: _Opts):
    """Pass 1's statistics before any column (None where not needed)."""
    ninf, zeros = jnp.full((n,), -jnp.inf, acc), jnp.zeros((n,), acc)
    soft = bool(opts.soft)
    apart = bool(opts.hard) and not opts.shared
    ends = soft and opts.beta in (0.0, 1.0)
    return (
        *((ninf, zeros) * 2 if soft else (None,) * 4),
        *((ninf, zeros) if apart else (None, None)),
        zeros if opts.hard else None,
        zeros if ends else None,
    )


def _pass1(x, t, y, c0, raw, opts: _Opts):
    """Pass 1's statistics ``raw`` of some rows updated with a tile of both
    models' logits (columns from ``c0`` on; ``y`` the rows' local labels)."""
    ms, ss, mt, st, m1, s1, ty, ka = raw
    if ms is not None:
        xs, ts = tempered(x, opts.temperature), tempered(t, opts.temperature)
        if ka is not None:
            # KL(p || q) at beta = 0 weighs by the teacher, KL(q || p) at
            # beta = 1 by the student.
            if opts.beta == 0.0:
                ka = _online_kl_sum(mt, ka, ts, xs)
            else:
                ka = _online_kl_sum(ms, ka, xs, ts)
        ms, ss, _ = online_max_sumexp(ms, ss, xs)
        mt, st, _ = online_max_sumexp(mt, st, ts)
    if m1 is not None:
        m1, s1, _ = online_max_sumexp(m1, s1, x)
    if ty is not None:
        cols = c0 + lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
        ty = ty + jnp.sum(jnp.where(cols == y[:, None], x, 0.0), 1)
    return ms, ss, mt, st, m1, s1, ty, ka


def _online_kl_sum(m, ka, f, e):
    """One tile's step of ``ka = sum_k exp(f_k - m) (f_k - e_k)``, with ``m``
    the running max of ``f`` before this tile (its update is
    :func:`online_max_sumexp`'s): rescaled to the new max, and with ``0``
    wherever ``exp(f_k - m)`` is 0 (``0 log 0 = 0``, whatever ``e_k``). At the
    end, ``ka / sum_k exp(f_k - m)`` is ``sum_k f_k (log f_k - log e_k)`` up to
    the two normalizers (:func:`_fused_fwd`)."""
    m_new = jnp.maximum(m, jnp.max(f, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    scale = jnp.exp(m - shift)
    ef = jnp.exp(f - shift[:, None])
    terms = jnp.where(ef == 0, 0.0, ef * (f - e))
    return jnp.where(scale == 0, 0.0, ka * scale) + jnp.sum(terms, 1)


def _divergence_terms(lq, lp, zero, opts: _Opts):
    """Elementwise terms whose row sums are ``(KL(q || M), KL(p || M))`` (``0 <
    beta < 1``), with ``0 log 0 = 0`` (as :func:`softmax_generalized_jsd`)."""
    v, u = _log_ratios(lq, lp, opts.beta, zero)
    return jnp.exp(lq) * v, jnp.exp(lp) * u


def _divergence_sums(h, w, b, th, tw, tb, stats: _Stats, *, opts: _Opts, tile: int):
    """Pass 2 (``0 < beta < 1``): per-token sums of :func:`_divergence_terms`
    over this shard's columns."""
    n, v = h.shape[0], w.shape[1]
    acc = _acc(h, th)
    block_n, block_v = blocks(opts.block_size, n, v, tile)
    rows = (stats.ms, stats.ls, stats.mt, stats.lt)

    def vocab_block(c0, cw, carry):
        def token_chunk(r0, rn, carry):
            _, _, x, _, t = _tiles(h, w, b, th, tw, tb, r0, rn, c0, cw, acc, opts)
            rb = tuple(a[:, None] for a in slice_rows(rows, r0, rn))
            lq, lp = _log_probs(x, t, rb, opts)
            terms = _divergence_terms(lq, lp, rb[0] * 0, opts)
            sums = slice_rows(carry, r0, rn)
            sums = tuple(s + jnp.sum(e, 1) for s, e in zip(sums, terms, strict=True))
            return update_rows(carry, sums, r0)

        return blocked(n, block_n, token_chunk, carry)

    init = (jnp.zeros((n,), acc),) * 2
    return blocked(v, block_v, vocab_block, varying(init, h, w, th, tw))


def _grads(h, w, b, th, tw, tb, y, g, stats: _Stats, *, opts: _Opts, tile: int):
    """``(d hidden in the compute dtype, d weight, d bias)`` from recomputed
    tiles; ``g`` is the per-token cotangent (0 where not counted)."""
    (n, d), v = h.shape, w.shape[1]
    acc = _acc(h, th)
    hacc = compute_dtype(h.dtype)
    block_n, block_v = blocks(opts.block_size, n, v, tile)
    rows = (y, g, *stats)

    def vocab_block(c0, cw, carry):
        dh, dw, db = carry

        def token_chunk(r0, rn, inner):
            hb, wb, x, tanh, t = _tiles(h, w, b, th, tw, tb, r0, rn, c0, cw, acc, opts)
            yb, gb, *st = (
                None if a is None else a[:, None] for a in slice_rows(rows, r0, rn)
            )
            gx = _student_grad(x, tanh, t, yb, c0, gb, _Stats(*st), opts)
            # The matmuls run in the input dtype (bf16 stays bf16) with
            # accumulation in float32 (float64 for float64 inputs).
            return tile_grads(gx.astype(h.dtype), hb, wb, r0, inner, hacc)

        init = (
            dh,
            *varying(
                (jnp.zeros((d, cw), hacc), None if b is None else jnp.zeros(cw, hacc)),
                h,
                w,
                th,
                tw,
            ),
        )
        dh, dwb, dbb = blocked(n, block_n, token_chunk, init)
        dw = lax.dynamic_update_slice_in_dim(dw, dwb.astype(w.dtype), c0, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, dbb.astype(b.dtype), c0, 0)
        return dh, dw, db

    init = (
        jnp.zeros((n, d), hacc),
        jnp.zeros_like(w),
        None if b is None else jnp.zeros_like(b),
    )
    return blocked(v, block_v, vocab_block, varying(init, h, w, th, tw))


def _student_grad(x, tanh, t, y, c0, g, stats: _Stats, opts: _Opts):
    """``g_i d loss_i / d x_ik`` of a tile of the student's (capped) logits
    ``x`` (columns from ``c0`` on; ``tanh`` its softcap's tanh or None), ``t``
    the teacher's tile; ``y``, ``g`` and ``stats`` are ``[rows, 1]``."""
    beta = opts.beta
    mixed = 0.0 < beta < 1.0
    gx = jnp.zeros((), x.dtype)
    q = None
    if opts.soft:
        ms, ls, mt, lt = stats.ms, stats.ls, stats.mt, stats.lt
        lq, lp = _log_probs(x, t, (ms, ls, mt, lt), opts)
        q = jnp.exp(lq)
        if mixed:
            # (1 - beta) / T q (log q - log M - KL(q || M)).
            gs = q * (_log_ratios(lq, lp, beta, ms * 0)[0] - stats.kl)
        elif beta == 0.0:
            gs = q * stats.mass - jnp.exp(lp)  # (q sum(p) - p) / T
        else:
            gs = (mul0(q, lq) - mul0(q, lp)) - q * stats.kl
        gx = (
            gx
            + (g * (opts.soft / opts.temperature * ((1 - beta) if mixed else 1.0))) * gs
        )
    if opts.hard:
        p1 = q if opts.shared else jnp.exp((x - stats.m1) - stats.l1)
        cols = c0 + lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
        gx = gx + (g * opts.hard) * (p1 - (cols == y).astype(x.dtype))
    if tanh is not None:
        gx = gx * (1 - tanh * tanh)
    return gx


# -- gradient in the forward pass: token chunks of full rows ----------------------


def _sum_grads(
    h, w, b, th, tw, tb, y, counted, in_range, coef, *, axis_name, opts, need, budget
):
    """``(losses, dh, dw, db)`` of ``sum_i coef_i loss_i`` in one pass over
    token chunks with full rows of this shard's columns (``y`` in local ids):
    each chunk's student and teacher logits give its statistics, losses and
    student logits gradient at once (see
    :func:`jaxent._streaming.forward_grads`; None where not in ``need``)."""
    n, v = h.shape[0], w.shape[1]
    acc = _acc(h, th)
    g = jnp.where(counted, jnp.where(in_range, coef.astype(acc), jnp.nan), 0.0)

    def chunk(x, hb, r0, rn, rows):
        thb, yb, cb, ib, gb = rows
        tanh = t = None
        if opts.softcap is not None:
            x, tanh = softcap(x, opts.softcap)
        if opts.soft:
            t = logits_tile(thb, tw, tb, 0, rn, 0, v, acc)[2]
            if opts.softcap is not None:
                t = softcap(t, opts.softcap)[0]
        raw = _pass1(x, t, yb, 0, _pass1_init(rn, acc, opts), opts)

        def divergence_sums(stats):
            rb = tuple(a[:, None] for a in (stats.ms, stats.ls, stats.mt, stats.lt))
            lq, lp = _log_probs(x, t, rb, opts)
            return tuple(
                jnp.sum(e, 1) for e in _divergence_terms(lq, lp, rb[0] * 0, opts)
            )

        loss, stats = _finish(raw, cb, ib, acc, axis_name, opts, divergence_sums)
        st = _Stats(*(None if a is None else a[:, None] for a in stats))
        return _student_grad(x, tanh, t, yb[:, None], 0, gb[:, None], st, opts), (loss,)

    (loss,), dh, dw, db = forward_grads(
        h,
        w,
        b,
        (th, y, counted, in_range, g),
        (jnp.zeros((n,), acc),),
        chunk,
        block_n=chunk_rows(opts.block_size, n, v, budget),
        need=need,
        dh_dtype=h.dtype if axis_name is None else compute_dtype(h.dtype),
    )
    return loss, dh, dw, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11))
def _fused_sum(h, w, b, th, tw, tb, y, counted, in_range, coef, axis_name, opts):
    """``sum_i coef_i loss_i`` of :func:`_fused`'s per-token losses.
    Undifferentiated, the streaming forward passes; differentiated, the
    gradients are formed in one forward pass over token chunks and the
    backward only scales them by the cotangent."""
    arrays = (h, w, b, th, tw, tb, y, counted, in_range)
    loss = _fused_fwd(*arrays, axis_name, opts)[0]
    return jnp.sum(coef.astype(loss.dtype) * loss)


def _fused_sum_fwd(h, w, b, th, tw, tb, y, counted, in_range, coef, axis_name, opts):
    # symbolic_zeros: each array comes with whether it is differentiated.
    need = (h.perturbed, w.perturbed, b is not None and b.perturbed)
    arrays = (h, w, b, th, tw, tb, y, counted, in_range, coef)
    h, w, b, th, tw, tb, y, counted, in_range, coef = (
        None if a is None else a.value for a in arrays
    )
    sums = functools.partial(_sum_grads, axis_name=axis_name, opts=opts, need=need)
    y_local = y - col_offset(axis_name, w.shape[1])
    loss, dh, dw, db = per_platform_chunk(
        sums, h, w, b, th, tw, tb, y_local, counted, in_range, coef
    )
    if dh is not None and axis_name is not None:
        # Each shard holds the part of d hidden from its own columns.
        dh = lax.psum(dh, axis_name)
    grads = tuple(
        None if d is None else d.astype(a.dtype)
        for d, a in zip((dh, dw, db), (h, w, b), strict=True)
    )
    return jnp.sum(coef.astype(loss.dtype) * loss), grads


def _fused_sum_bwd(axis_name, opts: _Opts, grads, g):
    return (*scale_grads(grads, g), *(None,) * 7)


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd, symbolic_zeros=True)


# -- the plain twin: materialized logits, plain autodiff --------------------------


def _plain_logits(h, w, b, acc, cap):
    x = jnp.matmul(h, w, preferred_element_type=acc)
    if b is not None:
        x = x + b.astype(acc)
    return x if cap is None else softcap(x, cap)[0]


def _materialized(h, w, b, th, tw, tb, y, counted, in_range, axis_name, opts: _Opts):
    """The loss of :func:`_fused` on materialized ``[N, V]`` logits of both
    models, through the plain formulas of :func:`softmax_generalized_jsd`'s and
    :func:`softmax_kl_divergence`'s twins (no ``custom_vjp``; forward mode
    works)."""
    acc = _acc(h, th)
    x = _plain_logits(h, w, b, acc, opts.softcap)
    loss = jnp.zeros(y.shape, acc)
    if opts.soft:
        t = _plain_logits(th, tw, tb, acc, opts.softcap)
        temp, axes = opts.temperature, (1,)
        if opts.beta == 0.0:
            jsd = _softmax_kl_plain(x, t, None, axes, axis_name, temp)
        elif opts.beta == 1.0:
            jsd = _softmax_kl_plain(t, x, None, axes, axis_name, temp)
        else:
            jsd_opts = _JSDOpts(axes, axis_name, opts.beta, temp)
            jsd = _softmax_jsd_plain(x, t, None, jsd_opts)
        loss = loss + opts.soft * jsd
    if opts.hard:
        v = w.shape[1]
        m, ls = plain_normalizer(x, (1,), None, axis_name)
        cols = col_offset(axis_name, v) + jnp.arange(v, dtype=jnp.int32)
        hit = cols[None, :] == y[:, None]
        xy = plain_sum(jnp.where(hit, x, 0.0), (1,), axis_name)
        loss = loss + opts.hard * jnp.squeeze((m - xy) + ls, 1)
    return jnp.where(counted, jnp.where(in_range, loss, jnp.nan), 0.0)


def _materialized_sum(h, w, b, th, tw, tb, y, counted, in_range, coef, axis_name, opts):
    """:func:`_fused_sum` on materialized logits in plain JAX."""
    arrays = (h, w, b, th, tw, tb, y, counted, in_range)
    loss = _materialized(*arrays, axis_name, opts)
    return jnp.sum(coef.astype(loss.dtype) * loss)


_DISTILL = Rule(_fused, _materialized, diff=(0, 1, 2), exclude=9)
_DISTILL_SUM = Rule(
    # Under jit: eager shard_map does not take custom_vjp's symbolic_zeros.
    jax.jit(_fused_sum, static_argnums=(10, 11)),
    _materialized_sum,
    diff=(0, 1, 2),
    exclude=10,
)

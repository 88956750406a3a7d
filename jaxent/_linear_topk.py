"""Fused linear projection + distillation from a stored top-k teacher.

The student's ``[N, V]`` logits are never stored, and there is no teacher
matmul at all: the teacher is its per-token top-k ids and log-probabilities
(offline distillation). Both paths stream over token chunks with full rows of
the vocabulary (:func:`jaxent._streaming.forward_grads`), whose per-row top-k
divergence is :mod:`jaxent._topk`'s: scalar reductions form the gradient in the
forward pass (three matmuls); ``"none"`` recomputes each chunk in the
backward (four).
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
    as_int,
    check_index,
    check_nonnegative,
    check_positive,
    check_reduction,
    describe,
)
from ._define import Rule, loss
from ._numerics import compute_dtype, tempered
from ._softmax import normalizer, plain_normalizer, plain_sum, probs
from ._streaming import (
    bias_arg,
    block_size_arg,
    check_head,
    chunk_rows,
    common_float,
    forward_grads,
    optional_positive,
    per_platform_chunk,
    run_head,
    scale_grads,
    softcap,
    token_weights_arg,
    tokens_arg,
)
from ._topk import (
    TAILS,
    _student,
    _topk_kl_plain,
    add_at,
    divergence,
    dlogits_scales,
    is_listed,
    masked_at,
    teacher,
)
from ._topk import (
    _Opts as _TopkOpts,
)


class _Opts(NamedTuple):
    """Static options of the fused rule (hashable: a ``nondiff_argnums`` entry)."""

    temperature: float
    tail: str
    hard: float  # hard_weight
    soft: float  # soft_weight
    softcap: float | None
    block_size: tuple[int | None, int] | None


@loss(
    "hidden",
    "weight",
    "teacher_ids",
    "teacher_log_probs",
    "class_ids",
    where="rows",
)
def linear_topk_distillation(
    impl,
    hidden: ArrayLike,
    weight: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_log_probs: ArrayLike,
    labels: ArrayLike | None = None,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    bias: ArrayLike | None = None,
    ignore_index: int | None = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    softcap: float | None = None,
    reduction: str = "none",
    block_size: int | tuple[int, int] | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Distillation of a stored top-k teacher into a student's head without
    materializing the student's logits.

    With student logits :math:`x_i = c \tanh((h_i W + b) / c)` (or :math:`h_i W
    + b` without ``softcap`` :math:`c`), :math:`p_i = \mathrm{softmax}(x_i /
    T)` and the teacher's top-k classes :math:`K_i` (``teacher_ids``) with
    probabilities :math:`q_{ij} = e^{\ell_{ij}}` (``teacher_log_probs``, from
    the teacher's full softmax, used as given), each token's loss is

    .. math::
        \ell_i = s\, \mathrm{KL}_k(q_i \,\|\, p_i)
        + w \left(\log\textstyle\sum_c e^{x_{ic}} - x_{iy_i}\right)

    with ``soft_weight`` :math:`s` on :func:`softmax_topk_kl_divergence`'s
    divergence (``tail="bucket"``: the exact KL of the k + 1 buckets, the
    listed classes and the rest, the rest's student log-mass a log-sum-exp of
    the logits outside :math:`K_i`; ``tail="renormalize"``: the KL from ``q``
    renormalized over its k classes) and ``hard_weight`` :math:`w` on the
    cross-entropy of the student at ``T = 1`` with ``labels``. Same values and
    gradients as those losses on the materialized logits, to rounding.

    No teacher matmul runs at all. The student's logits are streamed over
    token chunks of full vocabulary rows: with ``reduction="sum"`` or
    ``"mean"``, each chunk's loss and logits gradient are formed in the
    forward pass and feed the gradient matmuls right away (three student
    matmuls, as with materialized logits; the backward scales the stored
    gradients); ``reduction="none"`` (a per-token cotangent) recomputes each
    chunk in the backward (four). Temp memory: a few float32 chunks of about
    ``2**22`` logits on CPU (``2**26`` on GPU/TPU) plus, for the scalar
    reductions, a float32 ``d weight`` accumulator; no ``[N, V]`` array.

    The teacher is frozen: ``teacher_log_probs`` gets zero cotangents.

    Args:
      hidden: the student's hidden states, floating ``[..., D]`` (``N`` = the
        product of the leading dims).
      weight: the student's head, floating ``[D, V]`` (``[D, V / shards]``
        with ``axis_name``); a tied ``[V, D]`` embedding is passed as
        ``embedding.T``.
      teacher_ids: integer ``[..., k]`` (``hidden``'s leading shape), the
        teacher's top-k classes per token, distinct within a token; global ids
        when vocab-parallel. An id outside ``[0, V)`` gives NaN for that token.
      teacher_log_probs: floating ``[..., k]``, the teacher's log-probabilities
        of those classes (``-inf`` for none: padding of a short row).
      labels: optional integer ``[...]`` class indices for the hard term
        (required when ``hard_weight != 0``; then an out-of-range label that
        is not ``ignore_index`` gives NaN for that token).
      temperature: ``T > 0`` dividing the student's logits (after the softcap)
        in the divergence; the teacher's values are used as given.
      tail: ``"bucket"`` or ``"renormalize"`` (see above and
        :func:`softmax_topk_kl_divergence`).
      hard_weight: ``w >= 0``, the weight of the cross-entropy with ``labels``.
      soft_weight: ``s >= 0``, the weight of the top-k divergence.
      bias: optional floating ``[V]`` added to the student's logits (sharded
        like ``weight``'s columns).
      ignore_index: label value whose tokens are not counted (loss and
        gradient 0, excluded from the mean's denominator); ignored without
        ``labels``.
      where: optional boolean token mask of ``hidden``'s leading shape;
        ``False`` excludes that token like ``ignore_index``.
      token_weights: optional floating array of the tokens' shape, any sign:
        each counted token's loss times its weight; a ``"mean"`` still divides
        by the number of counted tokens. It receives no gradient.
      softcap: optional ``c > 0``: the logits become ``c * tanh(logits / c)``
        (after the bias) before the temperature.
      reduction: ``"none"`` (per token), ``"sum"`` or ``"mean"`` (over counted
        tokens; 0 when none is counted).
      block_size: an int (ignored: rows are full), or ``(block_n, block_v)``
        whose ``block_n`` fixes the token chunk's rows.
      axis_name: mesh axis over which ``weight`` and ``bias`` are sharded by
        columns, inside ``shard_map`` (vocab-parallel): per-token statistics
        and ``d hidden`` are all-reduced.

    Returns:
      per-token losses of ``hidden``'s leading shape for ``reduction="none"``,
      else a scalar, in the dtype of ``hidden``, ``weight`` and ``bias``
      promoted, float32 for half-precision inputs.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> h = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
      >>> ids = jnp.array([[0], [2]])
      >>> lq = jnp.log(jnp.array([[0.7], [0.5]]))
      >>> jaxent.linear_topk_distillation(h, w, ids, lq).round(4)
      Array([0.0207, 0.0117], dtype=float32)
      >>> jaxent.linear_topk_distillation(
      ...     h, w, ids, lq, jnp.array([0, 2]), hard_weight=0.5, temperature=2.0,
      ...     reduction="mean",
      ... ).round(4)
      Array(0.2164, dtype=float32)

    Note:
      ``-inf`` bias entries are masked classes; a listed class whose student
      logit is ``-inf`` under positive teacher mass gives ``+inf``, as does a
      teacher tail over an empty student rest; ``+inf``/NaN logits give NaN
      for that token. Repeated ids count that class once in the rest and
      once per occurrence in the sum (see :func:`softmax_topk_kl_divergence`).
      Being a ``jax.custom_vjp``, it cannot be used with ``jax.jvp``/
      ``jax.jacfwd``; for forward mode use
      ``jaxent.reference.linear_topk_distillation``, which materializes the
      logits.
    """
    fn = "linear_topk_distillation"
    h = as_float(fn, "hidden", hidden)
    w = as_float(fn, "weight", weight)
    ids = as_int(fn, "teacher_ids", teacher_ids)
    lq = as_float(fn, "teacher_log_probs", teacher_log_probs)
    temperature = check_positive(fn, "temperature", temperature)
    if tail not in TAILS:
        raise ValueError(f"{fn}: `tail` must be one of {TAILS}; got {tail!r}.")
    hard = check_nonnegative(fn, "hard_weight", hard_weight)
    soft = check_nonnegative(fn, "soft_weight", soft_weight)
    cap = optional_positive(fn, "softcap", softcap)
    reduction = check_reduction(fn, reduction)
    blocks = block_size_arg(fn, block_size)
    ignore_index = check_index(fn, "ignore_index", ignore_index)
    _check_shapes(fn, h, w, ids, lq)
    batch = h.shape[:-1]
    y, counted = tokens_arg(fn, labels, hard, ignore_index, where, batch)
    dtype = common_float(h.dtype, w.dtype)
    b = bias_arg(fn, "bias", bias, w.shape[1])
    if b is not None:
        dtype = common_float(dtype, b.dtype)
        b = b.astype(dtype)
    tweights = token_weights_arg(fn, token_weights, batch)

    n, (d, v_local), k = int(np.prod(batch)), w.shape, ids.shape[-1]
    num_classes = v_local * (1 if axis_name is None else lax.axis_size(axis_name))
    y, ids = y.reshape(n), ids.reshape(n, k)
    # An id or label outside [0, V) makes its token NaN; flagged before
    # narrowing to int32, so that a wrapped int64 cannot land on a class.
    ok = jnp.all((ids >= 0) & (ids < num_classes), axis=-1)
    if hard:
        ok = ok & (y >= 0) & (y < num_classes)
    y32 = jnp.where((y >= 0) & (y < num_classes), y, -1).astype(jnp.int32)
    ids32 = jnp.where((ids >= 0) & (ids < num_classes), ids, 0).astype(jnp.int32)
    acc = compute_dtype(dtype)
    # The teacher is frozen: no derivative of any order flows into it.
    lq = lax.stop_gradient(lq.reshape(n, k).astype(acc))
    opts = _Opts(temperature, tail, hard, soft, cap, blocks)
    arrays = (
        h.astype(dtype).reshape(n, d),
        w.astype(dtype),
        b,
        ids32,
        lq,
        y32,
        counted.reshape(n),
        ok,
    )
    out, _ = run_head(
        impl,
        (_TOPK_SUM, _TOPK),
        arrays,
        _LAYOUT,
        opts,
        axis_name=axis_name,
        reduction=reduction,
        recompute=False,
        counted=counted,
        token_weights=tweights,
        acc=acc,
    )
    return out


# Layouts of the rule's arrays for :func:`jaxent._streaming.partitioned`.
_LAYOUT = ("hidden", "weight", "bias", *("tokens",) * 5)


def _check_shapes(fn: str, h, w, ids, lq) -> None:
    check_head(fn, h, w)
    if ids.ndim != h.ndim or ids.shape[:-1] != h.shape[:-1]:
        raise ValueError(
            f"{fn}: `teacher_ids` must be [..., k] with hidden's leading shape "
            f"{h.shape[:-1]}; got {describe(ids)}."
        )
    if lq.shape != ids.shape:
        raise ValueError(
            f"{fn}: `teacher_log_probs` must have teacher_ids' shape {ids.shape}; "
            f"got {describe(lq)}."
        )


# -- one chunk of full rows ------------------------------------------------------


def _chunk(x, ids, lq, y, counted, ok, g, axis_name, opts: _Opts):
    """Per-token losses (NaN where not ``ok``, 0 where not ``counted``) and
    ``g_i d loss_i / d x`` of a chunk of full rows of (this shard's) logits."""
    acc = x.dtype
    tanh = None
    if opts.softcap is not None:
        x, tanh = softcap(x, opts.softcap)
    off = 0 if axis_name is None else lax.axis_index(axis_name) * x.shape[1]
    # Tokens not counted hold harmless teacher rows (no mass on class 0).
    keep = counted[:, None]
    ids = jnp.where(keep, ids, 0)
    lq = jnp.where(keep, lq, -jnp.inf)
    g = jnp.where(counted, jnp.where(ok, g.astype(acc), jnp.nan), 0.0)[:, None]
    loss = jnp.zeros(x.shape[:1], acc)
    gx = jnp.zeros((), acc)
    if opts.soft:
        z = tempered(x, opts.temperature)
        m, ls, a, mr, sr, b = _student(z, ids, axis_name)
        t = teacher(lq, opts.tail)
        loss = loss + opts.soft * divergence(t, a, b)[:, 0]
        big_m, q_r = dlogits_scales(t)
        # p_c / p_r outside the ids, from the rest's own normalizer.
        listed = is_listed(z.shape, ids, off)
        rest = jnp.exp((masked_at(z, listed) - mr) - jnp.log(jnp.maximum(sr, 1.0)))
        cs = tempered(g * opts.soft, opts.temperature)
        gx = add_at(cs * (probs(z, m, ls) * big_m - q_r * rest), ids, -cs * t.w, off)
    if opts.hard:
        m1, l1 = normalizer(x, (1,), axis_name)
        cols = off + lax.broadcasted_iota(jnp.int32, (1, x.shape[1]), 1)
        hit = cols == y[:, None]
        xy = jnp.sum(jnp.where(hit, x, 0.0), axis=1, keepdims=True)
        if axis_name is not None:
            xy = lax.psum(xy, axis_name)
        loss = loss + opts.hard * ((m1 + l1) - xy)[:, 0]
        gx = gx + (g * opts.hard) * (probs(x, m1, l1) - hit.astype(acc))
    if tanh is not None:
        gx = gx * (1 - tanh * tanh)
    loss = jnp.where(counted, jnp.where(ok, loss, jnp.nan), 0.0)
    return loss, gx


def _stream(h, w, b, ids, lq, y, counted, ok, g, *, axis_name, opts, need, budget):
    """``(losses, dh, dw, db)`` of ``sum_i g_i loss_i`` in one pass over token
    chunks (gradients None where not in ``need``)."""
    n, v = h.shape[0], w.shape[1]

    def chunk(x, hb, r0, rn, rows):
        loss, gx = _chunk(x, *rows, axis_name, opts)
        return gx, (loss,)

    (loss,), dh, dw, db = forward_grads(
        h,
        w,
        b,
        (ids, lq, y, counted, ok, g),
        (jnp.zeros((n,), compute_dtype(h.dtype)),),
        chunk,
        block_n=chunk_rows(opts.block_size, n, v, budget),
        need=need,
        dh_dtype=h.dtype if axis_name is None else compute_dtype(h.dtype),
    )
    if dh is not None and axis_name is not None:
        # Each shard holds the part of d hidden from its own columns.
        dh = lax.psum(dh, axis_name)
    return loss, dh, dw, db


def _run(h, w, b, ids, lq, y, counted, ok, g, axis_name, opts, need):
    stream = functools.partial(_stream, axis_name=axis_name, opts=opts, need=need)
    return per_platform_chunk(stream, h, w, b, ids, lq, y, counted, ok, g)


# -- scalar reductions: the gradient in the forward pass -------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(9, 10))
def _fused_sum(h, w, b, ids, lq, y, counted, ok, coef, axis_name, opts):
    """``sum_i coef_i loss_i``; undifferentiated, one forward pass (one matmul)."""
    none = (False, False, False)
    loss = _run(h, w, b, ids, lq, y, counted, ok, coef, axis_name, opts, none)[0]
    return jnp.sum(coef.astype(loss.dtype) * loss)


def _fused_sum_fwd(h, w, b, ids, lq, y, counted, ok, coef, axis_name, opts):
    # symbolic_zeros: each array comes with whether it is differentiated.
    need = (h.perturbed, w.perturbed, b is not None and b.perturbed)
    arrays = (h, w, b, ids, lq, y, counted, ok, coef)
    h, w, b, ids, lq, y, counted, ok, coef = (
        None if a is None else a.value for a in arrays
    )
    loss, *grads = _run(h, w, b, ids, lq, y, counted, ok, coef, axis_name, opts, need)
    grads = tuple(
        None if d is None else d.astype(a.dtype)
        for d, a in zip(grads, (h, w, b), strict=True)
    )
    return jnp.sum(coef.astype(loss.dtype) * loss), grads


def _fused_sum_bwd(axis_name, opts: _Opts, grads, g):
    return (*scale_grads(grads, g), *(None,) * 6)


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd, symbolic_zeros=True)


# -- per-token losses: the chunks recomputed in the backward ---------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def _fused(h, w, b, ids, lq, y, counted, ok, axis_name, opts):
    return _fused_fwd(h, w, b, ids, lq, y, counted, ok, axis_name, opts)[0]


def _fused_fwd(h, w, b, ids, lq, y, counted, ok, axis_name, opts):
    ones = jnp.ones(y.shape, compute_dtype(h.dtype))
    none = (False, False, False)
    loss = _run(h, w, b, ids, lq, y, counted, ok, ones, axis_name, opts, none)[0]
    return loss, (h, w, b, ids, lq, y, counted, ok)


def _fused_bwd(axis_name, opts: _Opts, res, g):
    h, w, b, ids, lq, y, counted, ok = res
    need = (True, True, b is not None)
    _, dh, dw, db = _run(h, w, b, ids, lq, y, counted, ok, g, axis_name, opts, need)
    db = None if b is None else db.astype(b.dtype)
    return (dh.astype(h.dtype), dw.astype(w.dtype), db, *(None,) * 5)


_fused.defvjp(_fused_fwd, _fused_bwd)


# -- the plain twin: materialized logits, plain autodiff -------------------------


def _materialized(h, w, b, ids, lq, y, counted, ok, axis_name, opts: _Opts):
    """The per-token losses of :func:`_fused` on materialized ``[N, V]``
    logits, through :func:`softmax_topk_kl_divergence`'s plain formula."""
    acc = compute_dtype(h.dtype)
    x = jnp.matmul(h, w, preferred_element_type=acc)
    if b is not None:
        x = x + b.astype(acc)
    if opts.softcap is not None:
        x = softcap(x, opts.softcap)[0]
    keep = counted[:, None]
    ids = jnp.where(keep, ids, 0)
    lq = jnp.where(keep, lq, -jnp.inf)
    loss = jnp.zeros(y.shape, acc)
    if opts.soft:
        topk = _TopkOpts(opts.temperature, opts.tail)
        kl = _topk_kl_plain(x, lq, ids, None, axis_name, topk)
        loss = loss + opts.soft * kl.reshape(y.shape)
    if opts.hard:
        v = w.shape[1]
        off = 0 if axis_name is None else lax.axis_index(axis_name) * v
        m, ls = plain_normalizer(x, (1,), None, axis_name)
        hit = (off + jnp.arange(v, dtype=jnp.int32))[None, :] == y[:, None]
        xy = plain_sum(jnp.where(hit, x, 0.0), (1,), axis_name)
        loss = loss + opts.hard * jnp.squeeze((m - xy) + ls, 1)
    return jnp.where(counted, jnp.where(ok, loss, jnp.nan), 0.0)


def _materialized_sum(h, w, b, ids, lq, y, counted, ok, coef, axis_name, opts):
    loss = _materialized(h, w, b, ids, lq, y, counted, ok, axis_name, opts)
    return jnp.sum(coef.astype(loss.dtype) * loss)


_TOPK = Rule(_fused, _materialized, diff=(0, 1, 2), exclude=8)
_TOPK_SUM = Rule(
    # Under jit: eager shard_map does not take custom_vjp's symbolic_zeros.
    jax.jit(_fused_sum, static_argnums=(9, 10)),
    _materialized_sum,
    diff=(0, 1, 2),
    exclude=9,
)

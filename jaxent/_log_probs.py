"""Per-token log-probabilities (and entropy) of a linear head, for RL objectives.

PPO, GRPO and REINFORCE-style objectives need ``log p(token)`` of every sampled
token, often the entropy of each token's distribution too, and are non-linear
in both (clipped ratios, a KL to a reference policy, an entropy bonus). The
``[N, V]`` logits ``hidden @ weight + bias`` are never stored: the forward runs
on the streaming engine of :mod:`jaxent._streaming` in one pass over (token
chunk x vocabulary block) tiles, keeping per token an online max / sum-exp, the
target logit and, for the entropy, a running ``sum exp(z - m) (z - m)``
rescaled with the max. The backward recomputes each tile and forms the logits
gradient from both outputs' cotangents. :func:`_materialized` is the same
function on materialized logits in plain JAX (the reference twin).
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

from ._args import as_bool, as_float, as_int, check_positive, describe
from ._define import Rule, loss
from ._numerics import compute_dtype, mul0, tempered
from ._sharding import is_sharded
from ._softmax import plain_normalizer, plain_sum
from ._streaming import (
    bias_arg,
    block_size_arg,
    blocked,
    blocks,
    check_head,
    col_offset,
    combine_max_sumexp,
    common_float,
    log_normalizer,
    logits_tile,
    online_max_sumexp,
    optional_positive,
    partitioned,
    per_platform_tile,
    slice_rows,
    softcap,
    tile_grads,
    update_rows,
    varying,
)

# Log-probabilities below this floor have probability 0 in every float dtype
# (exp underflows near -745 in float64): flooring them turns the 0 * -inf of a
# masked class in ``p log p`` into 0 without a select.
_FLOOR = -1e4


class _Opts(NamedTuple):
    """Static options of the fused rule (hashable: a ``nondiff_argnums`` entry)."""

    temperature: float
    softcap: float | None
    entropy: bool
    block_size: tuple[int | None, int] | None


@loss("hidden", "weight", "class_ids", where="rows")
def linear_log_probs(
    impl,
    hidden: ArrayLike,
    weight: ArrayLike,
    tokens: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    where: ArrayLike | None = None,
    block_size: int | tuple[int, int] | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-probability of each token (and the entropy of its distribution)
    under ``softmax((hidden @ weight + bias) / temperature)``, without
    materializing the logits.

    With logits :math:`x_i = c \tanh((h_i W + b) / c)` (or :math:`h_i W + b`
    without ``softcap`` :math:`c`), temperature :math:`T` and :math:`p_i =
    \mathrm{softmax}(x_i / T)` over :math:`V` classes:

    .. math::
        \log p_{i y_i} = \frac{x_{iy_i}}{T} - \log\sum_k e^{x_{ik} / T},
        \qquad H_i = -\sum_k p_{ik} \log p_{ik}

    for each token :math:`y_i` (the sampled action of an RL objective). Both
    outputs are differentiable w.r.t. ``hidden``, ``weight`` and ``bias`` with
    any per-token cotangents, so they can enter a clipped PPO/GRPO ratio
    ``exp(lp - lp_old)``, a KL to a reference policy or an entropy bonus. Same
    values and gradients as ``jax.nn.log_softmax`` of the materialized logits
    (and the entropy computed from it), to floating-point rounding.

    The forward streams over tiles of tokens by classes of the logits (those of
    :func:`linear_softmax_cross_entropy`'s XLA path) in one pass, keeping per
    token an online max / sum-exp, the token's logit and, with
    ``return_entropy``, a running ``sum_k exp(z_k - m) (z_k - m)`` rescaled as
    the max ``m`` grows (``z = x / T``); it saves its inputs and two or three
    float32 numbers per token. The backward recomputes each tile and forms
    ``d x_ik = (g_i (onehot_ik - p_ik) - e_i p_ik (log p_ik + H_i)) / T``
    (``g``, ``e``: the cotangents of the log-probabilities and the entropy;
    times ``1 - tanh^2`` with a softcap), then feeds it to the two gradient
    matmuls in the input dtype with float32 accumulation. No ``[N, V]`` array
    exists in the forward, the backward or the residuals.

    Args:
      hidden: floating array ``[..., D]`` (``N`` = product of the leading dims).
      weight: floating array ``[D, V]`` (``[D, V / shards]`` with
        ``axis_name``); a tied ``[V, D]`` embedding is passed as
        ``embedding.T``.
      tokens: integer array ``[...]`` (``hidden``'s leading shape) of class
        indices in ``[0, V)``; global ids when vocab-parallel. There is no
        ``ignore_index``: exclude tokens (prompt, padding) with ``where``.
      bias: optional floating array ``[V]`` (sharded like ``weight``'s
        columns); ``-inf`` entries are masked classes.
      temperature: ``T``, a static Python float > 0 dividing the logits (after
        the softcap), as in sampling.
      softcap: optional ``c > 0``: logits become ``c * tanh(logits / c)``
        (after the bias, before the temperature), as in Gemma 2; a ``-inf``
        logit stays ``-inf``.
      return_entropy: also return each token's entropy ``H_i`` (a static
        bool); it costs no extra matmul.
      where: optional boolean token mask of ``tokens``' shape; ``False`` gives
        log-probability and entropy 0 and zero gradient for that token, whatever
        its hidden state holds (NaN padding included).
      block_size: vocabulary block width ``block_v``, or a pair ``(block_n,
        block_v)``; ``None`` picks the tiles of
        :func:`linear_softmax_cross_entropy`'s XLA path (about ``2**20``
        logits on CPU, ``2**24`` on GPU/TPU, chosen at lowering).
      axis_name: mesh axis over which ``weight`` (and ``bias``) are sharded by
        columns, inside ``shard_map`` (vocab-parallel): the exact global
        values from ``O(N)`` collectives; the backward needs only a ``psum``
        of ``d hidden``.

    Returns:
      the log-probabilities ``[...]`` (``tokens``' shape), in float32 for half
      precision inputs (a ratio ``exp(lp - lp_old)`` is not quantized to
      bfloat16) and float64 for float64 ones; with ``return_entropy``, the
      pair ``(log_probs, entropy)``, both so.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> h = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
      >>> jaxent.linear_log_probs(h, w, jnp.array([0, 2])).round(4)
      Array([-0.2395, -0.5514], dtype=float32)
      >>> lp, ent = jaxent.linear_log_probs(
      ...     h, w, jnp.array([0, 2]), temperature=2.0, return_entropy=True,
      ...     where=jnp.array([True, False]),
      ... )
      >>> print(lp.round(3), ent.round(3), ent.dtype)
      [-0.551  0.   ] [0.975 0.   ] float32

    Note:
      Logits follow the library's conventions: ``-inf`` bias entries are
      masked classes (probability 0, zero gradient, no NaN in the entropy); a
      token on a masked class has log-probability ``-inf``; ``+inf``/NaN
      logits give NaN for their token (with a softcap, ``+inf`` becomes
      ``c``). An out-of-range token (not excluded by ``where``) gives a NaN
      log-probability and NaN gradients through it (hence NaN in ``d
      weight``), as the cross-entropy head does for labels; its entropy, which
      does not depend on the token, stays finite.

      Being a ``jax.custom_vjp``, it cannot be used with ``jax.jvp``/
      ``jax.jacfwd``; its backward is plain JAX, so it can be differentiated
      again in reverse mode and forward-over-reverse. For forward mode, use
      ``jaxent.reference.linear_log_probs``, which materializes the logits.
    """
    fn = "linear_log_probs"
    h = as_float(fn, "hidden", hidden)
    w = as_float(fn, "weight", weight)
    y = as_int(fn, "tokens", tokens)
    temperature = check_positive(fn, "temperature", temperature)
    cap = optional_positive(fn, "softcap", softcap)
    if not isinstance(return_entropy, bool | np.bool_):
        raise TypeError(
            f"{fn}: `return_entropy` must be a bool; got {return_entropy!r}."
        )
    blocks_given = block_size_arg(fn, block_size)
    _check_shapes(fn, h, w, y)
    dtype = common_float(h.dtype, w.dtype)
    b = bias_arg(fn, "bias", bias, w.shape[1])
    if b is not None:
        dtype = common_float(dtype, b.dtype)
        b = b.astype(dtype)
    counted = jnp.ones(y.shape, bool)
    if where is not None:
        where = as_bool(fn, "where", where)
        if where.shape != y.shape:
            raise ValueError(
                f"{fn}: `where` must be a token mask of tokens' shape {y.shape}; "
                f"got {describe(where)}."
            )
        counted = where
        # Excluded tokens' hidden states (padding may hold anything, NaN
        # included) are replaced by zeros: nothing of them reaches a value or
        # the d weight sum, and their own gradient is 0.
        h = jnp.where(where[..., None], h, jnp.zeros((), h.dtype))

    batch, n, (d, v_local) = y.shape, int(np.prod(y.shape)), w.shape
    num_classes = v_local * (1 if axis_name is None else lax.axis_size(axis_name))
    y = y.reshape(n)
    # Tokens outside [0, V) are flagged before narrowing to int32, so that a
    # wrapped int64 value cannot land on a real class.
    in_range = (y >= 0) & (y < num_classes)
    y32 = jnp.where(in_range, y, -1).astype(jnp.int32)
    opts = _Opts(temperature, cap, bool(return_entropy), blocks_given)
    arrays = (
        h.astype(dtype).reshape(n, d),
        w.astype(dtype),
        b,
        y32,
        counted.reshape(n),
        in_range,
    )
    core = impl(_LOG_PROBS)
    if axis_name is None and any(is_sharded(a) for a in arrays if a is not None):
        out = partitioned(lambda *args: core(*args, opts), arrays, _LAYOUT)
    else:
        out = core(*arrays, axis_name, opts)
    out = tuple(a.reshape(batch) for a in out)
    return out if opts.entropy else out[0]


# Layouts of the rule's arrays (h, w, b, tokens, counted, in_range) for
# :func:`jaxent._streaming.partitioned`.
_LAYOUT = ("hidden", "weight", "bias", "tokens", "tokens", "tokens")


def _check_shapes(fn: str, h, w, y) -> None:
    check_head(fn, h, w)
    if y.shape != h.shape[:-1]:
        raise ValueError(
            f"{fn}: `tokens` must have hidden's leading shape {h.shape[:-1]}; "
            f"got {describe(y)}."
        )


# -- the fused rule ----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused(h, w, b, y, counted, in_range, axis_name, opts):
    return _fused_fwd(h, w, b, y, counted, in_range, axis_name, opts)[0]


def _fused_fwd(h, w, b, y, counted, in_range, axis_name, opts: _Opts):
    y_local = y - col_offset(axis_name, w.shape[1])
    m, s, ty, a = per_platform_tile(
        functools.partial(_statistics, opts=opts), h, w, b, y_local
    )
    if axis_name is not None:
        if a is not None:
            a = _combine_entropy_sum(m, s, a, axis_name)
        ty = lax.psum(ty, axis_name)
    m, s = combine_max_sumexp(m, s, axis_name)
    shift, ls = log_normalizer(m, s)
    lp = (ty - shift) - ls
    lp = jnp.where(counted, jnp.where(in_range, lp, jnp.nan), 0.0)
    ent = None
    if a is not None:
        # H = -sum_k p_k (z_k - m - log s) = log s - a / s, 0 for a row with
        # no admissible class.
        ent = jnp.where(s == 0, 0.0, ls - a / jnp.where(s == 0, 1.0, s))
        ent = jnp.where(counted, ent, 0.0)
    outs = (lp,) if ent is None else (lp, ent)
    return outs, (h, w, b, y, counted, in_range, shift, ls, ent)


def _combine_entropy_sum(m, s, a, axis_name):
    """Each shard's ``a = sum_k exp(z_k - m) (z_k - m)`` (``m``, ``s``: the
    shard's max and sum-exp) summed across ``axis_name`` at the global max."""
    m_all = lax.pmax(m, axis_name)
    shift = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    return lax.psum(_rescaled(a, s, m, shift), axis_name)


def _rescaled(a, s, m, shift):
    """``sum_k exp(z_k - shift) (z_k - shift)`` from the same sum ``a`` and
    sum-exp ``s`` relative to ``m <= shift``: ``exp(m - shift) (a + (m -
    shift) s)``; 0 when ``exp(m - shift)`` is (an empty row, or one whose
    terms all underflow)."""
    scale = jnp.exp(m - shift)
    return jnp.where(scale == 0, 0.0, scale * (a + (m - shift) * s))


def _fused_bwd(axis_name, opts: _Opts, res, cts):
    h, w, b, y, counted, in_range, shift, ls, ent = res
    acc = compute_dtype(h.dtype)
    g = cts[0].astype(acc)
    # The per-token factors of d x_ik / T (see _grads); an out-of-range token
    # has a NaN derivative, whatever its cotangent.
    g = jnp.where(counted, jnp.where(in_range, g, jnp.nan), 0.0)
    e = None
    if ent is not None:
        e = jnp.where(counted, cts[1].astype(acc), 0.0)
    y_local = y - col_offset(axis_name, w.shape[1])
    dh, dw, db = per_platform_tile(
        functools.partial(_grads, opts=opts), h, w, b, y_local, g, e, shift, ls, ent
    )
    if axis_name is not None:
        # Each shard holds the part of d hidden from its own columns.
        dh = lax.psum(dh, axis_name)
    db = None if b is None else db.astype(b.dtype)
    return dh.astype(h.dtype), dw.astype(w.dtype), db, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


def _tile(h, w, b, r0, rn, c0, cw, acc, opts: _Opts):
    """One tile of ``z = softcap(x) / T`` with its input slices and the tanh
    of the softcap (None without one)."""
    hb, wb, x = logits_tile(h, w, b, r0, rn, c0, cw, acc)
    th = None
    if opts.softcap is not None:
        x, th = softcap(x, opts.softcap)
    return hb, wb, tempered(x, opts.temperature), th


def _statistics(h, w, b, y, *, opts: _Opts, tile: int):
    """Per-token running ``(max, sum-exp, token logit, entropy sum or None)``
    of ``z`` over this shard's columns (``y`` in local ids), the entropy sum
    being ``sum_k exp(z_k - max) (z_k - max)``."""
    n, v = h.shape[0], w.shape[1]
    acc = compute_dtype(h.dtype)
    block_n, block_v = blocks(opts.block_size, n, v, tile)

    def vocab_block(c0, cw, carry):
        def token_chunk(r0, rn, carry):
            _, _, z, _ = _tile(h, w, b, r0, rn, c0, cw, acc, opts)
            (yb,) = slice_rows((y,), r0, rn)
            m, s, ty, a = slice_rows(carry, r0, rn)
            if a is None:
                m, s, _ = online_max_sumexp(m, s, z)
            else:
                # online_max_sumexp's step, its exp shared with the entropy sum.
                m_new = jnp.maximum(m, jnp.max(z, axis=1))
                shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
                zs = z - shift[:, None]
                ez = jnp.exp(zs)
                a = _rescaled(a, s, m, shift) + jnp.sum(ez * jnp.maximum(zs, _FLOOR), 1)
                s = s * jnp.exp(m - shift) + jnp.sum(ez, 1)
                m = m_new
            cols = c0 + lax.broadcasted_iota(jnp.int32, (1, cw), 1)
            ty = ty + jnp.sum(jnp.where(cols == yb[:, None], z, 0.0), 1)
            return update_rows(carry, (m, s, ty, a), r0)

        return blocked(n, block_n, token_chunk, carry)

    zeros = jnp.zeros((n,), acc)
    init = (
        jnp.full((n,), -jnp.inf, acc),
        zeros,
        zeros,
        zeros if opts.entropy else None,
    )
    return blocked(v, block_v, vocab_block, varying(init, h, w))


def _grads(h, w, b, y, g, e, shift, ls, ent, *, opts: _Opts, tile: int):
    """``(d hidden in the compute dtype, d weight, d bias)`` from recomputed
    tiles; ``g`` and ``e`` are the per-token cotangents of the
    log-probabilities and of the entropy (0 where not counted; ``e`` None
    without the entropy)."""
    (n, d), v = h.shape, w.shape[1]
    acc = compute_dtype(h.dtype)
    block_n, block_v = blocks(opts.block_size, n, v, tile)
    inv_t = 1.0 / opts.temperature
    # d x_ik = onehot_ik G_i - p_ik (G_i + E_i (log p_ik + H_i)), with G = g / T
    # and E = e / T.
    rows = (y, g * inv_t, shift, ls) + (() if e is None else (e * inv_t, ent))

    def vocab_block(c0, cw, carry):
        dh, dw, db = carry

        def token_chunk(r0, rn, inner):
            hb, wb, z, th = _tile(h, w, b, r0, rn, c0, cw, acc, opts)
            yb, gb, mb, lb, *rest = (a[:, None] for a in slice_rows(rows, r0, rn))
            lp = (z - mb) - lb
            p = jnp.exp(lp)
            coef = gb
            if rest:
                eb, hb_ent = rest
                coef = coef + eb * (jnp.maximum(lp, _FLOOR) + hb_ent)
            cols = c0 + lax.broadcasted_iota(jnp.int32, (1, cw), 1)
            gx = jnp.where(cols == yb, gb, 0.0) - p * coef
            if th is not None:
                gx = gx * (1 - th * th)
            # The matmuls run in the input dtype (bf16 stays bf16) with
            # accumulation in float32 (float64 for float64 inputs).
            return tile_grads(gx.astype(h.dtype), hb, wb, r0, inner, acc)

        init = (
            dh,
            *varying(
                (jnp.zeros((d, cw), acc), None if b is None else jnp.zeros(cw, acc)),
                h,
                w,
            ),
        )
        dh, dwb, dbb = blocked(n, block_n, token_chunk, init)
        dw = lax.dynamic_update_slice_in_dim(dw, dwb.astype(w.dtype), c0, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, dbb.astype(b.dtype), c0, 0)
        return dh, dw, db

    init = (
        jnp.zeros((n, d), acc),
        jnp.zeros_like(w),
        None if b is None else jnp.zeros_like(b),
    )
    return blocked(v, block_v, vocab_block, varying(init, h, w))


# -- the plain twin: materialized logits, plain autodiff --------------------------


def _materialized(h, w, b, y, counted, in_range, axis_name, opts: _Opts):
    """The outputs of :func:`_fused` from materialized ``[N, V]`` logits in
    plain JAX (no ``custom_vjp``; forward mode works)."""
    acc = compute_dtype(h.dtype)
    v = w.shape[1]
    x = jnp.matmul(h, w, preferred_element_type=acc)
    if b is not None:
        x = x + b.astype(acc)
    if opts.softcap is not None:
        x = softcap(x, opts.softcap)[0]
    z = tempered(x, opts.temperature)
    m, ls = plain_normalizer(z, (1,), None, axis_name)
    logp = (z - m) - ls
    cols = col_offset(axis_name, v) + jnp.arange(v, dtype=jnp.int32)
    hit = cols[None, :] == y[:, None]
    lp = jnp.squeeze(plain_sum(jnp.where(hit, logp, 0.0), (1,), axis_name), 1)
    # A NaN factor (not a NaN constant) also makes the gradient through an
    # out-of-range token NaN, as in the custom rule.
    lp = lp * jnp.where(counted & ~in_range, jnp.nan, 1.0).astype(acc)
    outs = (jnp.where(counted, lp, 0.0),)
    if opts.entropy:
        ent = -jnp.squeeze(plain_sum(mul0(jnp.exp(logp), logp), (1,), axis_name), 1)
        outs = (*outs, jnp.where(counted, ent, 0.0))
    return outs


_LOG_PROBS = Rule(_fused, _materialized, diff=(0, 1, 2), exclude=6)

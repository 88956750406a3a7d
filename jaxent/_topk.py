"""Distillation from a teacher's top-k log-probabilities (offline teachers).

The per-row pieces are functions of a ``[rows, V]`` block of logits (a whole
vocabulary, a shard of it, or a tile of a fused head: ``offset`` is the global
id of its first class), the ``[rows, k]`` teacher arrays and the row's
normalizers, so that a fused head can use them block by block.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._args import (
    as_bool,
    as_float,
    as_int,
    check_positive,
    check_reduction,
    describe,
)
from ._backend import fusion_barrier
from ._define import Rule, loss
from ._numerics import compute_dtype, tempered, upcast
from ._reduction import count_rows, reduce_loss
from ._softmax import class_sum, normalizer, plain_sum, probs

TAILS = ("bucket", "renormalize")


@loss("logits", "teacher_ids", "teacher_log_probs", where="rows")
def softmax_topk_kl_divergence(
    impl,
    logits: ArrayLike,
    teacher_ids: ArrayLike,
    teacher_log_probs: ArrayLike,
    *,
    temperature: float = 1.0,
    tail: str = "bucket",
    where: ArrayLike | None = None,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""KL divergence of a student from a teacher known by its top-k classes.

    With the student ``p = softmax(logits / T)``, the teacher's classes
    ``K = teacher_ids`` and probabilities ``q_j = exp(teacher_log_probs_j)``
    (used as given, not tempered), ``tail="bucket"`` is the exact KL divergence
    between the two distributions coarsened to ``k + 1`` buckets, the ``k``
    classes and the rest ``r``:

    .. math:: \mathrm{KL} = \sum_{j \in K} q_j (\log q_j - \log p_j)
        + q_r (\log q_r - \log p_r),
        \quad q_r = \max(0, 1 - \textstyle\sum_j q_j),
        \ p_r = 1 - \textstyle\sum_j p_j

    non-negative, and 0 exactly when the buckets agree. ``log p_r`` is the
    log-sum-exp of the logits outside ``K`` (minus the row's), never
    ``log(1 - sum p_j)``, so it stays exact when the top k hold all but 1e-30
    of the student's mass; ``log q_r = log1p(-sum q_j)``, in log space. With
    ``k = V`` (the teacher's whole row) it is :func:`softmax_kl_divergence`.

    ``tail="renormalize"`` drops the rest and renormalizes the teacher over
    ``K`` (what offline distillation toolkits commonly do):
    ``sum_j q~_j (log q~_j - log p_j)`` with ``q~ = q / sum(q)``.

    Args:
      logits: student logits ``[..., V]`` (classes on the last axis).
      teacher_ids: the teacher's classes, integers ``[..., k]`` in ``[0, V)``,
        distinct within a row (see the Note for repeats).
      teacher_log_probs: the teacher's log-probabilities of those classes
        (from its full softmax), ``[..., k]``.
      temperature: ``T``, a static Python float > 0 dividing the logits.
      tail: ``"bucket"`` or ``"renormalize"``, as above.
      where: example mask of the batch shape ``logits.shape[:-1]``; an
        excluded example gives 0, zero gradients, and does not count in a mean.
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over counted examples).
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``
        (the logits' last axis sharded, ``teacher_ids`` global ids).

    Returns:
      the batch-shaped divergences ``logits.shape[:-1]`` (``"none"``) or a
      scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> x = jnp.zeros((1, 4))  # p = 1/4 each
      >>> ids, lq = jnp.array([[0]]), jnp.log(jnp.array([[0.5]]))
      >>> kl = jaxent.softmax_topk_kl_divergence(x, ids, lq)
      >>> print(f"{kl[0]:.4f}")  # 0.5 log(0.5 / 0.25) + 0.5 log(0.5 / 0.75)
      0.1438
      >>> kl = jaxent.softmax_topk_kl_divergence(x, ids, lq, tail="renormalize")
      >>> print(f"{kl[0]:.4f}")  # log(1 / 0.25)
      1.3863

    Note:
      Gradients, with ``g`` the incoming cotangent, ``w`` the teacher's
      weights (``q``, or ``q~`` renormalized) and ``M = sum(w) + q_r``: w.r.t.
      ``logits`` ``(g / T) (p_c M - w_c - q_r p_c / p_r)``, where ``w_c`` is 0
      outside ``K`` and the last term is 0 inside it; w.r.t.
      ``teacher_log_probs`` ``g q_j ((log q_j - log p_j) - (log q_r -
      log p_r))`` (bucket; ``g q_j (log q_j - log p_j + 1)`` where ``q_r = 0``)
      and ``g q~_j (log q~_j - log p_j - KL)`` (renormalize). The rest's mass
      ``q_r`` is taken as 0 where ``1 - sum(q) <= k eps`` (``eps`` of the
      compute dtype): a teacher row normalized up to rounding has no tail.

      A teacher log-probability of ``-inf`` adds nothing (``0 log 0 = 0``);
      a class of positive teacher mass at a ``-inf`` student logit gives
      ``+inf``, as does a teacher tail over an empty student rest (``k = V``
      or the rest all ``-inf``). ``+inf``/NaN logits or NaN teacher values
      give NaN for their row. An id outside ``[0, V)`` gives NaN for its
      example (value and gradient rows), unless ``where`` excludes it. A
      repeated id is one class: it is left out of the rest once, and each
      occurrence adds its own term, so repeats with log-probability ``-inf``
      (padding of rows with fewer than k classes) change nothing, while
      repeats with positive mass count that class's ``p`` more than once (the
      result is then no divergence, and may be negative). Half precision is
      computed in float32.

      Being a ``jax.custom_vjp``, the loss itself cannot go through
      ``jax.jvp``/``jax.jacfwd``; use
      :func:`jaxent.reference.softmax_topk_kl_divergence` for forward mode.
      Hessians and ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain
      JAX).
    """
    fn = "softmax_topk_kl_divergence"
    x = as_float(fn, "logits", logits)
    if x.ndim < 1:
        raise ValueError(
            f"{fn}: `logits` must have a class axis (at least 1 dimension); got "
            f"{describe(x)}."
        )
    ids = as_int(fn, "teacher_ids", teacher_ids)
    lq = as_float(fn, "teacher_log_probs", teacher_log_probs)
    batch = x.shape[:-1]
    if ids.ndim != x.ndim or ids.shape[:-1] != batch:
        raise ValueError(
            f"{fn}: `teacher_ids` must have shape {(*batch, 'k')} (the logits' "
            f"batch shape and k ids); got {describe(ids)}."
        )
    if lq.shape != ids.shape:
        raise ValueError(
            f"{fn}: `teacher_log_probs` must have the shape of `teacher_ids` "
            f"{ids.shape}; got {describe(lq)}."
        )
    temperature = check_positive(fn, "temperature", temperature)
    if tail not in TAILS:
        raise ValueError(f"{fn}: `tail` must be one of {TAILS}; got {tail!r}.")
    check_reduction(fn, reduction)
    keep = None
    if where is not None:
        keep = as_bool(fn, "where", where)
        if keep.shape != batch:
            raise ValueError(
                f"{fn}: `where` must be an example mask of the logits' batch shape "
                f"{batch}; got {describe(keep)}."
            )
    opts = _Opts(temperature, tail)
    keep_k = None if keep is None else keep[..., None]
    kl = impl(_TOPK_KL)(x, lq, ids, keep_k, axis_name, opts)
    return reduce_loss(kl, reduction, count_rows(keep, batch)).astype(x.dtype)


class _Opts(NamedTuple):
    """Static options of the top-k KL rule."""

    temperature: float
    tail: str


# -- per-row pieces, shared with fused heads --------------------------------------


def local_ids(ids: jax.Array, offset, n_local: int):
    """``ids`` as indices into a block of ``n_local`` classes starting at global
    id ``offset``, and whether the block holds them; ids it does not hold point
    one past its end (a scatter drops them, a gather must be masked)."""
    local = ids - jnp.asarray(offset, ids.dtype)
    held = (local >= 0) & (local < n_local)
    return jnp.where(held, local, n_local), held


def _scatter_dims(nb: int):
    return lax.ScatterDimensionNumbers(
        update_window_dims=(),
        inserted_window_dims=(nb,),
        scatter_dims_to_operand_dims=(nb,),
        operand_batching_dims=tuple(range(nb)),
        scatter_indices_batching_dims=tuple(range(nb)),
    )


def gather_at(z: jax.Array, ids: jax.Array, offset=0) -> jax.Array:
    """``z[..., ids]`` ``[..., k]`` for the ids this block holds, 0 for the
    others (summed over blocks or shards, each id is found once)."""
    local, held = local_ids(ids, offset, z.shape[-1])
    index = jnp.minimum(local, z.shape[-1] - 1)
    v = jnp.take_along_axis(z, index, axis=-1, mode="promise_in_bounds")
    return jnp.where(held, v, 0)


def is_listed(shape, ids: jax.Array, offset=0) -> jax.Array:
    """``[..., n]`` uint8 mask (1: listed) of the classes of a block of
    ``shape`` that ``ids`` lists: a scatter of ``N k`` entries into ``N V``
    bytes, not a comparison of every class with every id (``N V k``)."""
    local, _ = local_ids(ids, offset, shape[-1])
    return lax.scatter(
        jnp.zeros(shape, jnp.uint8),
        local[..., None],
        jnp.ones(local.shape, jnp.uint8),
        _scatter_dims(len(shape) - 1),
        mode=lax.GatherScatterMode.FILL_OR_DROP,
    )


def masked_at(z: jax.Array, listed: jax.Array, zero=0.0) -> jax.Array:
    """``z`` with the ``listed`` classes (:func:`is_listed`) at -inf: the
    logits of the rest bucket.

    A minimum with a cap of -inf (listed) or +inf, not a select: XLA:CPU fuses
    the row reductions over it into passes over the logits, where a select (or
    a boolean mask, or a scatter of -inf into the logits) makes it write an
    ``N V`` float copy first. The constants are offsets of ``zero``, a per-row
    0 of the caller's pass, for the same reason (XLA:CPU writes a scalar
    broadcast to ``N V`` to memory when two passes share it)."""
    # No derivative through the cap: its tangent would be 0 * inf.
    cap = lax.stop_gradient(((zero + 0.5) - listed.astype(z.dtype)) * (zero + jnp.inf))
    return jnp.minimum(z, cap)


def add_at(dz: jax.Array, ids: jax.Array, v: jax.Array, offset=0) -> jax.Array:
    """``dz[..., ids] += v`` for the ids this block holds (repeats add up)."""
    local, _ = local_ids(ids, offset, dz.shape[-1])
    return lax.scatter_add(
        dz,
        local[..., None],
        v.astype(dz.dtype),
        _scatter_dims(dz.ndim - 1),
        mode=lax.GatherScatterMode.FILL_OR_DROP,
    )


class Teacher(NamedTuple):
    """Per-row teacher quantities, with ``w`` the weight of each listed class
    in the divergence (``q``, or ``q / sum(q)`` renormalized):
    ``KL = sum_j w_j (lw_j - a_j) + q_r (lq_r - b)`` for the student's
    log-probabilities ``a`` at the ids and ``b`` of the rest."""

    w: jax.Array  # [..., k]
    lw: jax.Array  # [..., k] log w, 0 where w = 0 (never multiplied then)
    q_r: jax.Array  # [..., 1] the rest's mass, 0 without a tail
    lq_r: jax.Array  # [..., 1] its log, 0 where q_r = 0
    has_rest: jax.Array  # [..., 1] q_r > 0


def teacher(lq: jax.Array, tail: str) -> Teacher:
    """:class:`Teacher` of log-probabilities ``lq`` ``[..., k]`` (compute dtype).

    ``log sum(q)`` is a log-sum-exp, and ``q_r = -expm1(log sum q)``, taken as
    0 where it is at most ``k eps`` (a teacher row normalized up to rounding),
    with ``log q_r = log1mexp(log sum q)``, exact near both ends.
    """
    zero = jnp.zeros((), lq.dtype)
    m = jnp.max(lq, axis=-1, keepdims=True, initial=-jnp.inf)
    m = jnp.where(jnp.isfinite(m), m, zero)  # -inf row: sum 0; NaN/inf: below
    s = jnp.sum(jnp.exp(lq - m), axis=-1, keepdims=True)
    safe_s = jnp.where(s > 0, s, 1)
    log_mass = jnp.where(s > 0, m + jnp.log(safe_s), -jnp.inf)
    # NaN/+inf log-probabilities make their row NaN.
    bad = jnp.any(jnp.isnan(lq) | (lq == jnp.inf), axis=-1, keepdims=True)
    log_mass = jnp.where(bad, jnp.nan, log_mass)
    w0 = lq == -jnp.inf
    if tail == "renormalize":
        empty = s == 0
        lw = jnp.where(w0 | empty, zero, lq - jnp.where(empty, zero, log_mass))
        w = jnp.where(w0, zero, jnp.exp(lw))
        return Teacher(w, lw, zero * s, zero * s, s < 0)
    tol = lq.shape[-1] * jnp.finfo(lq.dtype).eps
    q_r = -jnp.expm1(jnp.minimum(log_mass, 0))
    has = (q_r > tol) | bad
    # log(1 - e^v): log(-expm1(v)) near v = 0, log1p(-exp(v)) below -log 2.
    v = jnp.where(has, log_mass, -1.0)
    lq_r = jnp.where(
        v > -0.6931471805599453, jnp.log(-jnp.expm1(v)), jnp.log1p(-jnp.exp(v))
    )
    return Teacher(
        jnp.where(w0, zero, jnp.exp(lq)),
        jnp.where(w0, zero, lq),
        jnp.where(has, q_r, zero),
        jnp.where(has, lq_r, zero),
        has,
    )


def _times(w, v):
    """``w * v`` with ``0 * v = 0`` for any ``v`` (inf: a log of 0)."""
    return jnp.where(w == 0, 0, w * v)


def divergence(t: Teacher, a: jax.Array, b: jax.Array) -> jax.Array:
    """The row's divergence ``[..., 1]`` from the student's log-probabilities
    ``a`` ``[..., k]`` at the ids and ``b`` ``[..., 1]`` of the rest."""
    head = jnp.sum(_times(t.w, t.lw - a), axis=-1, keepdims=True)
    return head + _times(t.q_r, t.lq_r - b)


def dlogits_scales(t: Teacher) -> tuple[jax.Array, jax.Array]:
    """``(M, q_r)``: d KL / d z = ``p M - q_r exp(z_rest - lse_rest) - w``
    at the ids (``z = logits / T``; ``z_rest`` -inf at the ids)."""
    return jnp.sum(t.w, axis=-1, keepdims=True) + t.q_r, t.q_r


def dteacher(t: Teacher, a, b, kl, tail: str) -> jax.Array:
    """d KL / d teacher_log_probs ``[..., k]``."""
    if tail == "renormalize":
        return _times(t.w, t.lw - a - kl)
    rest = jnp.where(t.has_rest, t.lq_r - b, -1.0)
    return _times(t.w, (t.lw - a) - rest)


# -- the rule --------------------------------------------------------------------


def _prepare(x, lq, keep, opts: _Opts):
    """Tempered logits and teacher log-probabilities in the compute dtype;
    excluded rows get harmless values (logits 0, no teacher mass), so that
    whatever they hold reaches neither a value nor a gradient."""
    z = tempered(upcast(x), opts.temperature)
    lf = lq.astype(z.dtype)
    if keep is not None:
        z = jnp.where(keep, z, 0.0)
        lf = jnp.where(keep, lf, -jnp.inf)
    return z, lf


def _offset(z, axis_name):
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name) * z.shape[-1]


def _rowscale(x, ids, keep, axis_name):
    """Per row (keepdims): 0 where ``keep`` excludes it, NaN for an id outside
    [0, V), else 1."""
    v = x.shape[-1] * (1 if axis_name is None else lax.axis_size(axis_name))
    valid = jnp.all((ids >= 0) & (ids < v), axis=-1, keepdims=True)
    dtype = compute_dtype(x.dtype)
    scale = jnp.where(valid, jnp.ones((), dtype), jnp.nan)
    return scale if keep is None else jnp.where(keep, scale, 0.0)


def rest_max_sumexp(z, listed, m, axis_name=None):
    """:func:`jaxent._softmax.max_sumexp` of the rest bucket's logits (keepdims;
    ``(0, 0)`` for an empty rest), given the row's max ``m`` (finite). Each
    reduction recomputes them in its own pass: the barrier keeps XLA:CPU from
    writing one ``N V`` copy for both."""
    axes = (z.ndim - 1,)
    zero = m * 0
    masked = masked_at(z, listed, zero)
    mr = jnp.max(masked, axis=axes, keepdims=True, initial=-jnp.inf)
    if axis_name is not None:
        mr = lax.pmax(mr, axis_name)
    mr = jnp.where(mr == -jnp.inf, 0.0, mr)
    listed, zero = fusion_barrier((listed, zero))
    sr = jnp.exp(masked_at(z, listed, zero) - mr)
    return mr, class_sum(sr, axes, axis_name)


def _student(z, ids, axis_name):
    """``(m, ls, a, mr, sr, b)``: the row normalizer, the log-probabilities at
    the ids, and the rest's max, sum-exp and log-probability."""
    axes = (z.ndim - 1,)
    m, ls = normalizer(z, axes, axis_name)
    off = _offset(z, axis_name)
    zk = gather_at(z, ids, off)
    if axis_name is not None:
        zk = lax.psum(zk, axis_name)
    a = (zk - m) - ls
    mr, sr = rest_max_sumexp(z, is_listed(z.shape, ids, off), m, axis_name)
    # -inf for an empty rest (sr = 0), through a log whose input is never 0.
    b = jnp.where(
        sr > 0, (mr - m) + (jnp.log(jnp.where(sr > 0, sr, 1.0)) - ls), -jnp.inf
    )
    return m, ls, a, mr, sr, b


# For one row, with z = logits / T, a_j = log p_j at the ids, b = log p_r of the
# rest and the teacher's weights w (see Teacher):
#   KL = sum_j w_j (lw_j - a_j) + q_r (lq_r - b),
#   d KL / d z_c = p_c (sum w + q_r) - w_c - q_r p_c / p_r [c not an id],
# as d a_j / d z_c = [c = id_j] - p_c and d b / d z_c = [c in rest] p_c / p_r
# - p_c. The teacher's cotangent is per token: under a vocab-parallel
# axis_name it is computed from the all-reduced a, b and KL, and the rule
# leaves that axis out of the alignment of its inputs (Rule.exclude).
@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _topk_kl(x, lq, ids, keep, axis_name, opts):
    return _topk_kl_fwd(x, lq, ids, keep, axis_name, opts)[0]


def _topk_kl_fwd(x, lq, ids, keep, axis_name, opts: _Opts):
    z, lf = _prepare(x, lq, keep, opts)
    m, ls, a, mr, sr, b = _student(z, ids, axis_name)
    t = teacher(lf, opts.tail)
    kl = divergence(t, a, b)
    scale = _rowscale(x, ids, keep, axis_name)
    res = (x, lq, ids, keep, m, ls, a, mr, sr, b, kl, scale)
    return jnp.where(scale != 0, kl * scale, 0.0)[..., 0], res


def _topk_kl_bwd(axis_name, opts: _Opts, res, g):
    x, lq, ids, keep, m, ls, a, mr, sr, b, kl, scale = res
    z, lf = _prepare(x, lq, keep, opts)
    t = teacher(lf, opts.tail)
    coef = g[..., None] * scale
    big_m, q_r = dlogits_scales(t)
    off = _offset(z, axis_name)
    p = probs(z, m, ls)
    # p_c / p_r outside the ids, from the rest's own normalizer (exact when the
    # rest holds 1e-30 of the mass); 0 for an empty rest.
    listed = is_listed(z.shape, ids, off)
    rest = jnp.exp((masked_at(z, listed) - mr) - jnp.log(jnp.maximum(sr, 1.0)))
    # Scaled before the scatter, which then updates the output in place.
    coef_x = tempered(coef, opts.temperature)
    dx = add_at(coef_x * (p * big_m - q_r * rest), ids, -coef_x * t.w, off)
    dl = coef * dteacher(t, a, b, kl, opts.tail)
    return dx.astype(x.dtype), dl.astype(lq.dtype), None, None


_topk_kl.defvjp(_topk_kl_fwd, _topk_kl_bwd)


def _topk_kl_plain(x, lq, ids, keep, name, opts: _Opts):
    """The same divergence in plain JAX: the ids found by comparing every class
    with every id, and the formulas written out with double selects."""
    z, lf = _prepare(x, lq, keep, opts)
    axes = (z.ndim - 1,)
    cls = jnp.arange(z.shape[-1], dtype=ids.dtype)
    cls = cls + jnp.asarray(_offset(z, name), ids.dtype)
    hit = ids[..., :, None] == cls  # [..., k, V]
    zk = plain_sum(jnp.where(hit, z[..., None, :], 0.0), (z.ndim,), name)[..., 0]

    def lse(v):
        mx = lax.stop_gradient(jnp.max(v, axis=-1, keepdims=True, initial=-jnp.inf))
        if name is not None:
            mx = lax.pmax(mx, name)
        mx = jnp.where(mx == -jnp.inf, 0.0, mx)
        s = plain_sum(jnp.exp(v - mx), axes, name)
        # 0 for no class, through a log that never sees 0 (its derivative).
        return mx + jnp.log(jnp.where(s == 0, 1.0, s)), s == 0

    lse_all, _ = lse(z)
    a = zk - lse_all
    lse_rest, no_rest = lse(jnp.where(jnp.any(hit, axis=-2), -jnp.inf, z))
    b = jnp.where(no_rest, -jnp.inf, lse_rest - lse_all)
    q = jnp.exp(lf)
    none = q == 0
    mass = jnp.sum(q, axis=-1, keepdims=True)
    if opts.tail == "renormalize":
        safe = jnp.where(mass == 0, 1.0, mass)
        w = q / safe
        lw = jnp.where(none, 0.0, lf) - jnp.log(safe)
        kl = jnp.sum(jnp.where(none, 0.0, w * (lw - jnp.where(none, 0.0, a))), -1)
    else:
        tol = lf.shape[-1] * jnp.finfo(lf.dtype).eps
        has = 1 - mass > tol
        safe = jnp.where(has, mass, 0.0)
        q_r = 1 - safe
        tail_term = jnp.where(has, q_r * (jnp.log1p(-safe) - jnp.where(has, b, 0)), 0)
        head = jnp.where(none, 0.0, q * (jnp.where(none, 0.0, lf - a)))
        kl = jnp.sum(head, axis=-1) + tail_term[..., 0]
    scale = _rowscale(x, ids, keep, name)[..., 0]
    return jnp.where(scale != 0, kl * scale, 0.0)


_TOPK_KL = Rule(_topk_kl, _topk_kl_plain, diff=(0, 1), exclude=4)

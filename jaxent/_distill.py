"""Distillation divergences between a student's and a teacher's logits."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._args import (
    Axis,
    as_float,
    canonical_axes,
    check_axis_name,
    check_fraction,
    check_positive,
    check_reduction,
    check_same_shape,
    loss_mask,
)
from ._backend import fusion_barrier
from ._define import Rule, loss
from ._divergence import _SOFTMAX_KL
from ._numerics import tempered, upcast
from ._reduction import reduce_loss
from ._softmax import (
    class_sum,
    kept_count,
    normalizer,
    plain_log_softmax,
    plain_sum,
    shifted,
)


@loss("logits", "logits")
def softmax_generalized_jsd(
    impl,
    logits: ArrayLike,
    target_logits: ArrayLike,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Generalized Jensen-Shannon divergence of a student from a teacher.

    With ``q = softmax(logits / T)`` (the student), ``p = softmax(target_logits
    / T)`` (the teacher) and the mixture ``M = beta p + (1 - beta) q``:

    .. math:: \mathrm{JSD}_\beta = \beta\, \mathrm{KL}(p \,\|\, M)
        + (1 - \beta)\, \mathrm{KL}(q \,\|\, M)

    as in TRL's ``generalized_jsd_loss`` and Liger's ``LigerJSD``.
    ``beta = 0`` is exactly the forward KL ``KL(p || q)`` (what
    :func:`softmax_kl_divergence` computes) and ``beta = 1`` exactly the reverse
    KL ``KL(q || p)``: the formula tends to 0 at both ends, so, as in both
    libraries, the ends are these KL divergences instead. ``beta = 0.5`` is the
    Jensen-Shannon divergence.

    Args:
      logits: student logits ``[..., C, ...]``.
      target_logits: teacher logits, the same shape.
      beta: ``beta``, a static Python float in ``[0, 1]``: the teacher's weight
        in the mixture.
      temperature: ``T``, a static Python float > 0 dividing both logits.
      axis: class axis (or axes).
      where: class mask of the logits' shape, or example mask of the batch shape
        (an excluded example gives 0 and does not count in a mean).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over counted examples).
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``.

    Returns:
      the batch-shaped divergences (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> s = jnp.array([[0.0, 0.0]])
      >>> t = jnp.array([[0.0, -jnp.inf]])
      >>> jsd = jaxent.softmax_generalized_jsd(s, t)  # 1.5 log 2 - 0.75 log 3
      >>> print(f"{jsd[0]:.4f}")
      0.2158
      >>> jaxent.softmax_generalized_jsd(s, t, beta=0.0)  # KL(p || q) = log 2
      Array([0.6931472], dtype=float32)

    Note:
      Gradients (``0 < beta < 1``), with ``g`` the incoming cotangent: w.r.t.
      ``logits`` ``g ((1 - beta) / T) q (log q - log M - KL(q || M))``, w.r.t.
      ``target_logits`` ``g (beta / T) p (log p - log M - KL(p || M))``; at the
      ends, those of the KL divergence (w.r.t. the student ``(q - p) / T`` at
      ``beta = 0``, ``(p - q) / T`` w.r.t. the teacher at ``beta = 1``).

      The loss is the divergence at temperature ``T`` with no hidden factor:
      Hinton et al.'s distillation recipe multiplies it by ``T**2``
      (``T**2 * softmax_generalized_jsd(s, t, temperature=T)``), which keeps the
      gradient's scale as ``T`` varies.

      A class that is ``-inf`` in both inputs (or masked) is excluded; one that
      is ``-inf`` in one input only has probability 0 on that side, and for
      ``0 < beta < 1`` the divergence stays finite (``M > 0`` wherever ``p`` or
      ``q`` is); at ``beta = 0`` a ``-inf`` student logit under positive teacher
      mass gives ``+inf`` (and at ``beta = 1`` the other way round). ``+inf``/NaN
      logits give NaN. ``log M = logaddexp(log beta + log p, log(1 - beta) +
      log q)`` enters with its leading term cancelled (the log-ratios are exactly
      0 where ``p = q``); half precision is computed in float32.

      Being a ``jax.custom_vjp``, the loss itself cannot go through
      ``jax.jvp``/``jax.jacfwd``; use
      :func:`jaxent.reference.softmax_generalized_jsd` for forward mode. Hessians
      and forward-over-reverse Hessian-vector products (``jax.jvp(jax.grad(f),
      ...)``) do work: the rule's backward is plain JAX and never calls the
      primal.
    """
    fn = "softmax_generalized_jsd"
    x, t = as_float(fn, "logits", logits), as_float(fn, "target_logits", target_logits)
    check_same_shape(fn, "target_logits", t, "logits", x)
    axes = canonical_axes(fn, axis, x.ndim)
    beta = check_fraction(fn, "beta", beta)
    temperature = check_positive(fn, "temperature", temperature)
    check_reduction(fn, reduction)
    check_axis_name(fn, axis_name, axes)
    mask = loss_mask(fn, where, x.shape, axes)
    if beta == 0.0:  # KL(p || q): the KL divergence of the student from the teacher
        jsd = impl(_SOFTMAX_KL)(x, t, mask, axes, axis_name, temperature)
    elif beta == 1.0:  # KL(q || p): the same with the roles swapped
        jsd = impl(_SOFTMAX_KL)(t, x, mask, axes, axis_name, temperature)
    else:
        opts = _JSDOpts(axes, axis_name, beta, temperature)
        jsd = impl(_SOFTMAX_JSD)(x, t, mask, opts)
    count = kept_count(mask, axes, jsd.shape, axis_name)
    return reduce_loss(jsd, reduction, count).astype(x.dtype)


class _JSDOpts(NamedTuple):
    """Static options of the generalized JSD rule (``0 < beta < 1``)."""

    axes: tuple[int, ...]
    axis_name: Hashable | None
    beta: float
    temperature: float


def _log_ratios(lq, lp, beta, zero):
    """``(lq - lM, lp - lM)`` elementwise from the two log-probabilities, with
    ``lM = logaddexp(log(beta) + lp, log(1 - beta) + lq)`` cancelled exactly.

    Log-probabilities are floored at a quarter of the lowest float, so that a
    class that is -inf on one side or both (its probability 0 there) gives a
    large finite ratio, never ``inf - inf``; its products with the zero
    probability are 0. ``zero`` is a per-row 0 (keepdims) of the caller's pass
    (see :func:`_ratios_of_delta`).
    """
    lo = zero + jnp.finfo(lq.dtype).min / 4
    return _ratios_of_delta(jnp.maximum(lp, lo) - jnp.maximum(lq, lo), zero, beta)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def _ratios_of_delta(delta, zero, beta):
    """``(lq - lM, lp - lM)`` as functions of ``delta = lp - lq``.

    ``lq - lM = -log1p(beta expm1(delta))`` and ``lp - lM = lq - lM + delta``;
    for ``delta > 0`` the same with the roles swapped, so that ``expm1`` sees
    ``-|delta|`` and never overflows. Both are exactly 0 at ``p = q`` and
    accurate to a rounding of ``|delta|`` near it, where the divergence is
    ``O(delta**2)``. The branch is taken with ``sign``, not a select, so that
    XLA:CPU fuses the row sums over it into one pass; its derivative (the two
    pieces' kinks at ``delta = 0`` cancel) is given below.

    The constants are offsets of ``zero``, a per-row 0 of the caller's pass:
    XLA:CPU writes a scalar constant broadcast to N x C to memory when two row
    sums share it, as the student's and the teacher's would.
    """
    one = zero + 1
    side = (one + jnp.sign(delta)) * (zero + 0.5)  # 1 where p > q, 0 where p < q
    weight = (zero + beta) + (zero + (1 - 2 * beta)) * side  # the other side's
    r = -jnp.log1p(weight * jnp.expm1(-jnp.abs(delta)))
    return r - delta * side, r + delta * (one - side)


@_ratios_of_delta.defjvp
def _ratios_of_delta_jvp(beta, primals, tangents):
    # d(lp - lM)/d delta = (1 - beta) q / M = (1 - beta) exp(lq - lM); ``zero``
    # is a constant (its tangent, 0, is not used).
    v, u = _ratios_of_delta(*primals, beta)
    du = (1 - beta) * jnp.exp(v) * tangents[0]
    return (v, u), (du - tangents[0], du)


def _side(x, t, mask, stats, opts: _JSDOpts, student: bool, *extra):
    """``(q, lq - lM)`` (``student``) or ``(p, lp - lM)`` elementwise, from the
    logits and the row normalizers ``stats = (mx, lsx, mt, lst)``.

    Each use recomputes them in a pass of its own: the barrier, over operands
    in an order (and with ``extra`` per-row values) that no other pass uses,
    keeps XLA:CPU from sharing one N x C intermediate between the passes and
    writing it to memory. Returns the barrier's copy of ``extra`` too.
    """
    mx, lsx, mt, lst = stats
    if student:
        x, t, mx, lsx, mt, lst, *extra = fusion_barrier(
            (x, t, mx, lsx, mt, lst, *extra)
        )
    else:
        t, x, mt, lst, mx, lsx, *extra = fusion_barrier(
            (t, x, mt, lst, mx, lsx, *extra)
        )
    lq = shifted(tempered(upcast(x, mask), opts.temperature), mx) - lsx
    lp = shifted(tempered(upcast(t, mask), opts.temperature), mt) - lst
    zero = (mx if student else mt) * 0  # finite: m = 0 on an empty row
    v, u = _log_ratios(lq, lp, opts.beta, zero)
    return (jnp.exp(lq), v, *extra) if student else (jnp.exp(lp), u, *extra)


# For one row, with q = softmax(x / T), p = softmax(t / T), M = beta p +
# (1 - beta) q and lq, lp, lM their logs:
#   JSD = beta KLp + (1 - beta) KLq,  KLp = sum p (lp - lM),  KLq = sum q (lq - lM),
# and, as dJSD/dq = (1 - beta) (lq - lM) and dJSD/dp = beta (lp - lM), through
# the softmaxes
#   d logits = g (1 - beta) / T * q (lq - lM - KLq),
#   d target_logits = g beta / T * p (lp - lM - KLp).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _softmax_jsd(x, t, mask, opts):
    return _softmax_jsd_fwd(x, t, mask, opts)[0]


def _softmax_jsd_fwd(x, t, mask, opts: _JSDOpts):
    axes, name = opts.axes, opts.axis_name
    mx, lsx = normalizer(tempered(upcast(x, mask), opts.temperature), axes, name)
    mt, lst = normalizer(tempered(upcast(t, mask), opts.temperature), axes, name)
    stats = (mx, lsx, mt, lst)
    q, v = _side(x, t, mask, stats, opts, True)
    klq = class_sum(q * v, axes, name)
    p, u = _side(x, t, mask, stats, opts, False)
    klp = class_sum(p * u, axes, name)
    jsd = opts.beta * klp + (1 - opts.beta) * klq
    res = _JSDRes(x, t, mask, mx, lsx, mt, lst, klq, klp)
    return jnp.squeeze(jsd, axes), res


def _softmax_jsd_bwd(opts: _JSDOpts, res: _JSDRes, g):
    x, t, mask = res.x, res.t, res.mask
    stats = (res.mx, res.lsx, res.mt, res.lst)
    g = tempered(jnp.expand_dims(g, opts.axes), opts.temperature)
    q, v, klq = _side(x, t, mask, stats, opts, True, res.klq)
    dx = ((1 - opts.beta) * g) * (q * (v - klq))
    p, u, klp = _side(x, t, mask, stats, opts, False, res.klp)
    dt = (opts.beta * g) * (p * (u - klp))
    return dx.astype(x.dtype), dt.astype(t.dtype), None


_softmax_jsd.defvjp(_softmax_jsd_fwd, _softmax_jsd_bwd)


class _JSDRes(NamedTuple):
    """Residuals: the inputs and per-row (keepdims) statistics, no N x C array."""

    x: jax.Array
    t: jax.Array
    mask: jax.Array | None
    mx: jax.Array  # student row max (of x / T)
    lsx: jax.Array  # log sum exp(x / T - mx)
    mt: jax.Array  # teacher row max (of t / T)
    lst: jax.Array  # log sum exp(t / T - mt)
    klq: jax.Array  # KL(q || M)
    klp: jax.Array  # KL(p || M)


def _softmax_jsd_plain(x, t, mask, opts: _JSDOpts):
    axes, name, beta = opts.axes, opts.axis_name, opts.beta
    xf = tempered(upcast(x, mask), opts.temperature)
    tf = tempered(upcast(t, mask), opts.temperature)
    logq = plain_log_softmax(xf, mask, axes, name)
    logp = plain_log_softmax(tf, mask, axes, name)
    # -inf log-probabilities floored: logaddexp's derivative w.r.t. a -inf
    # argument is exp(0 - lM), not 0, at a finite lM.
    lo = jnp.finfo(logq.dtype).min / 4
    logm = jnp.logaddexp(
        math.log(beta) + jnp.maximum(logp, lo),
        math.log1p(-beta) + jnp.maximum(logq, lo),
    )
    q, p = jnp.exp(logq), jnp.exp(logp)
    # A zero probability adds 0 (its log-ratio may be -inf) and passes no
    # derivative through the log-ratio.
    terms = beta * p * jnp.where(p == 0, 0.0, logp - logm)
    terms = terms + (1 - beta) * q * jnp.where(q == 0, 0.0, logq - logm)
    return jnp.squeeze(plain_sum(terms, axes, name), axes)


_SOFTMAX_JSD = Rule(_softmax_jsd, _softmax_jsd_plain, diff=(0, 1))

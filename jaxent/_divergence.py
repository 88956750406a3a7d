"""Information measures: entropy, cross-entropy and KL divergence."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._args import (
    Axis,
    as_float,
    canonical_axes,
    check_axis_name,
    check_base,
    check_positive,
    check_reduction,
    check_same_shape,
    class_mask,
    loss_mask,
)
from ._backend import fusion_barrier
from ._define import Rule, alias, loss
from ._numerics import dweight, mul0, mul0_nonpos, safe_log, tempered, upcast
from ._reduction import reduce_loss
from ._softmax import (
    class_sum,
    kept_count,
    max_sumexp,
    normalizer,
    plain_log_softmax,
    plain_sum,
    probs,
    shifted,
)

# Below exp's underflow in every float dtype (float64: ~-746): a log-probability
# floored here is exact wherever its probability is nonzero.
_FLOOR = -1e4


def _masked(mask, *grads):
    """Gradients set to exactly 0 at excluded entries, whatever they hold."""
    if mask is None:
        return grads
    return tuple(jnp.where(mask, d, 0.0) for d in grads)


def _in_base(h: jax.Array, base: float | None) -> jax.Array:
    return h if base is None else h / math.log(base)


def _prepare_pair(fn, names, a, b, axis):
    a = as_float(fn, names[0], a)
    b = as_float(fn, names[1], b)
    check_same_shape(fn, names[1], b, names[0], a)
    return a, b, canonical_axes(fn, axis, a.ndim)


@loss("probs")
def entropy(
    impl, probs: ArrayLike, *, axis: Axis = -1, base: float | None = None
) -> jax.Array:
    r"""Shannon entropy of probability vectors.

    .. math:: H(p) = -\sum_c p_c \log p_c, \qquad 0 \log 0 = 0

    Args:
      probs: probabilities ``[..., C, ...]`` (not renormalized).
      axis: class axis (or axes).
      base: logarithm base (``None``: nats, ``2``: bits).

    Returns:
      the batch-shaped entropies, in the input dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> jaxent.entropy(jnp.array([0.5, 0.5, 0.0]), base=2)
      Array(1., dtype=float32)

    Note:
      Gradient ``-(log p + 1)``; at ``p = 0`` it is taken as 0 (the entry carries no
      mass), so ``entropy(softmax(x))`` stays finite when the softmax underflows.
      Negative probabilities give NaN. A ``jax.custom_vjp``: ``jax.jvp``/``jax.jacfwd``
      of it fail, use :mod:`jaxent.reference` for forward mode; ``jax.hessian`` and
      ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain JAX).
    """
    fn = "entropy"
    p = as_float(fn, "probs", probs)
    axes = canonical_axes(fn, axis, p.ndim)
    base = check_base(fn, base)
    return _in_base(impl(_ENTROPY)(p, axes), base).astype(p.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _entropy(p, axes):
    return _entropy_fwd(p, axes)[0]


def _entropy_fwd(p, axes):
    pf = upcast(p)
    return -jnp.sum(mul0(pf, safe_log(pf)), axis=axes), p


def _entropy_bwd(axes, p, g):
    pf = upcast(p)
    dp = -jnp.expand_dims(g, axes) * jnp.where(pf == 0, 0.0, safe_log(pf) + 1)
    return (dp.astype(p.dtype),)


_entropy.defvjp(_entropy_fwd, _entropy_bwd)


def _entropy_plain(p, axes):
    pf = upcast(p)
    zero = pf == 0
    return -jnp.sum(pf * jnp.log(jnp.where(zero, 1.0, pf)), axis=axes)


_ENTROPY = Rule(_entropy, _entropy_plain, diff=(0,))


@loss("probs", "probs")
def cross_entropy(
    impl, p: ArrayLike, q: ArrayLike, *, axis: Axis = -1, base: float | None = None
) -> jax.Array:
    r"""Cross-entropy between probability vectors.

    .. math:: H(p, q) = -\sum_c p_c \log q_c

    Inputs are used as given: unnormalized vectors are not renormalized.

    Args:
      p: target probabilities ``[..., C, ...]``.
      q: predicted probabilities, the shape of ``p``.
      axis: class axis (or axes).
      base: logarithm base (``None``: nats, ``2``: bits).

    Returns:
      the batch-shaped cross-entropies, in ``p``'s dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> jaxent.cross_entropy(jnp.array([1.0, 0.0]), jnp.array([0.5, 0.0]), base=2)
      Array(1., dtype=float32)

    Note:
      Gradients ``-log q`` (w.r.t. ``p``) and ``-p / q`` (w.r.t. ``q``). A zero ``p``
      entry contributes 0 to the value and to both gradients even where ``q`` is 0; ``p
      > 0`` on ``q = 0`` gives ``+inf``. A ``jax.custom_vjp``:
      ``jax.jvp``/``jax.jacfwd`` of it fail, use :mod:`jaxent.reference` for forward
      mode; ``jax.hessian`` and ``jax.jvp(jax.grad(f))`` work (the rule's backward is
      plain JAX).
    """
    fn = "cross_entropy"
    p, q, axes = _prepare_pair(fn, ("p", "q"), p, q, axis)
    base = check_base(fn, base)
    return _in_base(impl(_CROSS_ENTROPY)(p, q, axes), base).astype(p.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _cross_entropy(p, q, axes):
    return _cross_entropy_fwd(p, q, axes)[0]


def _cross_entropy_fwd(p, q, axes):
    h = -jnp.sum(mul0(upcast(p), safe_log(upcast(q))), axis=axes)
    return h, (p, q)


def _cross_entropy_bwd(axes, res, g):
    p, q = res
    pf, qf = upcast(p), upcast(q)
    g = jnp.expand_dims(g, axes)
    dp = -g * dweight(pf, safe_log(qf))
    dq = -g * jnp.where(pf == 0, 0.0, pf / jnp.where(pf == 0, 1.0, qf))
    return dp.astype(p.dtype), dq.astype(q.dtype)


_cross_entropy.defvjp(_cross_entropy_fwd, _cross_entropy_bwd)


def _cross_entropy_plain(p, q, axes):
    pf, qf = upcast(p), upcast(q)
    # A zero p at a zero q adds 0 and passes no derivative to either.
    none = (pf == 0) & (qf == 0)
    log_q = jnp.where(none, 0.0, jnp.log(jnp.where(none, 1.0, qf)))
    return -jnp.sum(pf * log_q, axis=axes)


_CROSS_ENTROPY = Rule(_cross_entropy, _cross_entropy_plain, diff=(0, 1))


@loss("log_probs", "probs", where="classes")
def kl_divergence(
    impl,
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""Kullback-Leibler divergence ``KL(targets || predictions)`` (optax's order).

    .. math:: \mathrm{KL} = \sum_c t_c (\log t_c - \log \hat p_c)

    Args:
      log_predictions: log-probabilities ``[..., C, ...]``.
      targets: probabilities, the same shape.
      axis: class axis (or axes).
      where: boolean mask broadcastable to the inputs; excluded entries add 0.

    Returns:
      the batch-shaped divergences, in ``log_predictions``' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> jaxent.kl_divergence(jnp.log(jnp.array([0.5, 0.5])), jnp.array([1.0, 0.0]))
      Array(0.6931472, dtype=float32)

    Note:
      Gradients ``-t`` (w.r.t. ``log_predictions``) and ``log t + 1 - log p`` (w.r.t.
      ``targets``). Where a target is 0 the entry adds 0 and its target gradient is 0
      (optax's is NaN there), also under a ``-inf`` prediction. A ``jax.custom_vjp``:
      ``jax.jvp``/``jax.jacfwd`` of it fail, use :mod:`jaxent.reference` for forward
      mode; ``jax.hessian`` and ``jax.jvp(jax.grad(f))`` work (the rule's backward is
      plain JAX).
    """
    fn = "kl_divergence"
    lp, t, axes = _prepare_pair(
        fn, ("log_predictions", "targets"), log_predictions, targets, axis
    )
    mask = class_mask(fn, where, lp.shape)
    return impl(_KL)(lp, t, mask, axes).astype(lp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kl_divergence(lp, t, mask, axes):
    return _kl_divergence_fwd(lp, t, mask, axes)[0]


def _kl_divergence_fwd(lp, t, mask, axes):
    tf = upcast(t)
    kl = jnp.sum(mul0(tf, safe_log(tf)) - mul0(tf, upcast(lp)), axis=axes, where=mask)
    return kl, (lp, t, mask)


def _kl_divergence_bwd(axes, res, g):
    lp, t, mask = res
    tf = upcast(t)
    g = jnp.expand_dims(g, axes)
    dlp = -g * tf
    # At t == 0 the t*log(t) term's partial is taken as 0; -t*log(p)'s is kept.
    dt = g * (jnp.where(tf == 0, 0.0, safe_log(tf) + 1) - dweight(tf, upcast(lp)))
    dlp, dt = _masked(mask, dlp, dt)
    return dlp.astype(lp.dtype), dt.astype(t.dtype), None


_kl_divergence.defvjp(_kl_divergence_fwd, _kl_divergence_bwd)


def _kl_divergence_plain(lp, t, mask, axes):
    lpf, tf = upcast(lp), upcast(t)
    if mask is not None:
        lpf, tf = jnp.where(mask, lpf, 0.0), jnp.where(mask, tf, 0.0)
    zero = tf == 0
    t_log_t = tf * jnp.log(jnp.where(zero, 1.0, tf))
    t_log_p = tf * jnp.where(zero & jnp.isinf(lpf), 0.0, lpf)
    return jnp.sum(t_log_t - t_log_p, axis=axes)


_KL = Rule(_kl_divergence, _kl_divergence_plain, diff=(0, 1))


@loss("log_probs", "log_probs", where="classes")
def kl_divergence_with_log_targets(
    impl,
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    r"""KL divergence with targets in log space (optax's order).

    .. math:: \mathrm{KL} = \sum_c e^{\ell_c} (\ell_c - \log \hat p_c)

    Args:
      log_predictions: log-probabilities ``[..., C, ...]``.
      log_targets: target log-probabilities, the same shape.
      axis: class axis (or axes).
      where: boolean mask broadcastable to the inputs; excluded entries add 0.

    Returns:
      the batch-shaped divergences, in ``log_predictions``' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> lp = jnp.log(jnp.array([0.5, 0.5]))
      >>> jaxent.kl_divergence_with_log_targets(lp, jnp.array([0.0, -jnp.inf]))
      Array(0.6931472, dtype=float32)

    Note:
      Gradients ``-exp(l)`` and ``exp(l) (l - log p + 1)``; a ``-inf`` log-target adds 0
      and gets zero gradients. A ``jax.custom_vjp``: ``jax.jvp``/``jax.jacfwd`` of it
      fail, use :mod:`jaxent.reference` for forward mode; ``jax.hessian`` and
      ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain JAX).
    """
    fn = "kl_divergence_with_log_targets"
    lp, lt, axes = _prepare_pair(
        fn, ("log_predictions", "log_targets"), log_predictions, log_targets, axis
    )
    mask = class_mask(fn, where, lp.shape)
    return impl(_KL_LOG_TARGETS)(lp, lt, mask, axes).astype(lp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _kl_log_targets(lp, lt, mask, axes):
    return _kl_log_targets_fwd(lp, lt, mask, axes)[0]


def _kl_log_targets_fwd(lp, lt, mask, axes):
    ltf = upcast(lt)
    t = jnp.exp(ltf)
    kl = jnp.sum(mul0(t, ltf) - mul0(t, upcast(lp)), axis=axes, where=mask)
    return kl, (lp, lt, mask)


def _kl_log_targets_bwd(axes, res, g):
    lp, lt, mask = res
    ltf = upcast(lt)
    t = jnp.exp(ltf)
    g = jnp.expand_dims(g, axes)
    dlp = -g * t
    dlt = g * (mul0(t, ltf + 1) - mul0(t, upcast(lp)))
    dlp, dlt = _masked(mask, dlp, dlt)
    return dlp.astype(lp.dtype), dlt.astype(lt.dtype), None


_kl_log_targets.defvjp(_kl_log_targets_fwd, _kl_log_targets_bwd)


def _kl_log_targets_plain(lp, lt, mask, axes):
    lpf, ltf = upcast(lp), upcast(lt)
    if mask is not None:
        lpf, ltf = jnp.where(mask, lpf, 0.0), jnp.where(mask, ltf, -jnp.inf)
    t = jnp.exp(ltf)
    zero = t == 0
    terms = t * jnp.where(zero & jnp.isinf(ltf), 0.0, ltf)
    terms = terms - t * jnp.where(zero & jnp.isinf(lpf), 0.0, lpf)
    return jnp.sum(terms, axis=axes)


_KL_LOG_TARGETS = Rule(_kl_log_targets, _kl_log_targets_plain, diff=(0, 1))


@loss("log_probs", "probs", where="classes")
def generalized_kl_divergence(
    impl,
    log_predictions: ArrayLike,
    targets: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    reduction: str = "none",
) -> jax.Array:
    r"""Generalized KL divergence of unnormalized measures (optax's order).

    .. math:: D = \sum_c \big(t_c (\log t_c - \log \hat p_c) + \hat p_c - t_c\big)

    the Bregman divergence of ``x log x - x``: :func:`kl_divergence` plus
    ``sum(exp(log_predictions) - targets)``, equal to it for normalized inputs.
    Same values as ``optax.generalized_kl_divergence``.

    Args:
      log_predictions: log of the predicted measure ``[..., C, ...]``.
      targets: the target measure (nonnegative), the same shape.
      axis: class axis (or axes).
      where: boolean mask broadcastable to the inputs; excluded entries add 0
        (an example with none included gives 0 and does not count in a mean).
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"``.

    Returns:
      the batch-shaped divergences (``"none"``) or a scalar, in
      ``log_predictions``' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> lp = jnp.log(jnp.array([[1.0, 2.0], [0.5, 0.5]]))
      >>> targets = jnp.array([[2.0, 0.0], [0.5, 0.5]])
      >>> with jnp.printoptions(precision=4):
      ...     print(jaxent.generalized_kl_divergence(lp, targets))
      [2.3863 0.    ]

    Note:
      Gradients ``exp(log_predictions) - t`` and ``log t - log_predictions``
      (w.r.t. ``targets``; at ``t = 0`` its ``log t + 1`` part is taken as 0, as
      in :func:`kl_divergence`, so it is ``-log_predictions - 1`` there). A zero
      target adds ``exp(log_predictions)`` even under a ``-inf`` prediction
      (optax: NaN); a positive target on a ``-inf`` prediction gives ``+inf``;
      a ``+inf`` prediction gives NaN. A ``jax.custom_vjp``: ``jax.jvp`` of it
      fails, use :mod:`jaxent.reference` for forward mode; Hessians and
      ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain JAX).
    """
    fn = "generalized_kl_divergence"
    lp, t, axes = _prepare_pair(
        fn, ("log_predictions", "targets"), log_predictions, targets, axis
    )
    check_reduction(fn, reduction)
    mask = class_mask(fn, where, lp.shape)
    out = impl(_GENERALIZED_KL)(lp, t, mask, axes)
    count = None
    if reduction == "mean" and mask is not None:
        count = kept_count(jnp.broadcast_to(mask, lp.shape), axes, out.shape)
    return reduce_loss(out, reduction, count).astype(lp.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _generalized_kl(lp, t, mask, axes):
    return _generalized_kl_fwd(lp, t, mask, axes)[0]


def _generalized_kl_fwd(lp, t, mask, axes):
    lpf, tf = upcast(lp), upcast(t)
    terms = mul0(tf, safe_log(tf)) - mul0(tf, lpf) + (jnp.exp(lpf) - tf)
    return jnp.sum(terms, axis=axes, where=mask), (lp, t, mask)


def _generalized_kl_bwd(axes, res, g):
    lp, t, mask = res
    lpf, tf = upcast(lp), upcast(t)
    g = jnp.expand_dims(g, axes)
    dlp = g * (jnp.exp(lpf) - tf)
    # The KL gradient (see _kl_divergence_bwd) and the -1 of ``- t``.
    dt = jnp.where(tf == 0, 0.0, safe_log(tf) + 1) - dweight(tf, lpf) - 1
    dlp, dt = _masked(mask, dlp, g * dt)
    return dlp.astype(lp.dtype), dt.astype(t.dtype), None


_generalized_kl.defvjp(_generalized_kl_fwd, _generalized_kl_bwd)


def _generalized_kl_plain(lp, t, mask, axes):
    lpf, tf = upcast(lp), upcast(t)
    if mask is not None:
        # exp(-inf) = 0: an excluded entry adds nothing.
        lpf, tf = jnp.where(mask, lpf, -jnp.inf), jnp.where(mask, tf, 0.0)
    zero = tf == 0
    t_log_t = tf * jnp.log(jnp.where(zero, 1.0, tf))
    t_log_p = tf * jnp.where(zero & jnp.isinf(lpf), 0.0, lpf)
    return jnp.sum(t_log_t - t_log_p + jnp.exp(lpf) - tf, axis=axes)


_GENERALIZED_KL = Rule(_generalized_kl, _generalized_kl_plain, diff=(0, 1))

convex_kl_divergence = alias(
    "convex_kl_divergence",
    generalized_kl_divergence,
    "optax keeps this name as a deprecated alias of "
    "``optax.losses.generalized_kl_divergence``; calling it warns a "
    "``DeprecationWarning``, as optax's does.",
    deprecation=(
        "convex_kl_divergence is deprecated (as in optax): use "
        "generalized_kl_divergence, which it calls."
    ),
)


@loss("logits")
def softmax_entropy(
    impl,
    logits: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    base: float | None = None,
    axis_name: Hashable | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    r"""Entropy of ``softmax(logits / temperature)``, computed stably from the
    logits.

    .. math:: H = -\sum_c p_c \log p_c = \mathrm{lse}(x) - \sum_c p_c x_c,
        \quad p = \mathrm{softmax}(x), \ x = \mathrm{logits} / T

    Args:
      logits: floating array ``[..., C, ...]``.
      axis: class axis (or axes).
      where: class mask of the logits' shape, or example mask of the batch shape
        (an excluded example has entropy 0).
      base: logarithm base (``None``: nats, ``2``: bits).
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``.
      temperature: ``T``, a static Python float > 0 dividing the logits.

    Returns:
      the batch-shaped entropies, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> jaxent.softmax_entropy(jnp.array([0.0, 0.0, -jnp.inf]), base=2)
      Array(1., dtype=float32)

    Note:
      Gradient ``-p * (log p + H) / T``, zero at ``-inf``/masked entries. Finite for any
      finite or ``-inf`` logits (a row of all ``-inf`` has entropy 0); ``+inf``/NaN
      logits give NaN. A ``jax.custom_vjp``: ``jax.jvp``/``jax.jacfwd`` of it fail, use
      :mod:`jaxent.reference` for forward mode; ``jax.hessian`` and
      ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain JAX).
    """
    fn = "softmax_entropy"
    x = as_float(fn, "logits", logits)
    axes = canonical_axes(fn, axis, x.ndim)
    check_axis_name(fn, axis_name, axes)
    mask = loss_mask(fn, where, x.shape, axes)
    temperature = check_positive(fn, "temperature", temperature)
    h = impl(_SOFTMAX_ENTROPY)(x, mask, axes, axis_name, temperature)
    return _in_base(h, check_base(fn, base)).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _softmax_entropy(x, mask, axes, axis_name, temperature):
    return _softmax_entropy_fwd(x, mask, axes, axis_name, temperature)[0]


def _softmax_entropy_fwd(x, mask, axes, axis_name, temperature):
    xf = tempered(upcast(x, mask), temperature)
    m, ls = normalizer(xf, axes, axis_name)
    xs = shifted(xf, m)
    # xs <= 0 (-inf where excluded) and p = exp(xs - ls) > 0 only where xs is
    # above exp's underflow (~-746), so flooring xs at -1e4 only turns 0 * -inf
    # into 0: mul0 without a select, which lets the sum fuse into one pass. A
    # floor at the lowest float would overflow second-order cotangents (inf *
    # p = NaN where p is 0).
    px = jnp.exp(xs - ls) * jnp.maximum(xs, _FLOOR)
    h = ls - class_sum(px, axes, axis_name)
    return jnp.squeeze(h, axes), (x, mask, m, ls, h)


def _softmax_entropy_bwd(axes, axis_name, temperature, res, g):
    # The barrier keeps XLA:CPU from sharing the forward's N x C softmax with
    # this pass, which would write it to memory.
    x, m, ls, h = fusion_barrier((res[0], *res[2:]))
    mask = res[1]
    xf = tempered(upcast(x, mask), temperature)
    p = probs(xf, m, ls)
    g = tempered(jnp.expand_dims(g, axes), temperature)
    dx = -g * mul0(p, (xf - m) - ls + h)
    return dx.astype(x.dtype), None


_softmax_entropy.defvjp(_softmax_entropy_fwd, _softmax_entropy_bwd)


def _softmax_entropy_plain(x, mask, axes, axis_name, temperature):
    xf = tempered(upcast(x, mask), temperature)
    logp = plain_log_softmax(xf, mask, axes, axis_name)
    p = jnp.exp(logp)
    p_logp = p * jnp.where((p == 0) & jnp.isinf(logp), 0.0, logp)
    return -jnp.squeeze(plain_sum(p_logp, axes, axis_name), axes)


_SOFTMAX_ENTROPY = Rule(_softmax_entropy, _softmax_entropy_plain, diff=(0,))


@loss("logits", "logits")
def softmax_kl_divergence(
    impl,
    logits: ArrayLike,
    target_logits: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    reduction: str = "none",
    axis_name: Hashable | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    r"""``KL(softmax(target_logits / T) || softmax(logits / T))``, for
    distillation.

    .. math:: \mathrm{KL} = \sum_c q_c (\log q_c - \log p_c),
        \quad p = \mathrm{softmax}(x / T),\ q = \mathrm{softmax}(t / T)

    The divergence at temperature ``T``, with no hidden factor: Hinton et al.'s
    distillation loss multiplies it by ``T**2`` (``T**2 * softmax_kl_divergence(
    x, t, temperature=T)``), which keeps the gradient's scale as ``T`` varies.

    Args:
      logits: student logits ``[..., C, ...]``.
      target_logits: teacher logits, the same shape.
      axis: class axis (or axes).
      where: class mask of the logits' shape, or example mask of the batch shape
        (an excluded example gives 0 and does not count in a mean).
      reduction: ``"none"``, ``"sum"`` or ``"mean"`` (over counted examples).
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``.
      temperature: ``T``, a static Python float > 0 dividing both logits.

    Returns:
      the batch-shaped divergences (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> x = jnp.array([[0.0, 0.0]])
      >>> jaxent.softmax_kl_divergence(x, x)
      Array([0.], dtype=float32)

    Note:
      Gradient w.r.t. ``logits`` is exactly ``(p - q) / T``; w.r.t. ``target_logits`` it
      is ``q * (log q - log p - KL) / T``. A ``-inf`` target logit adds 0; a ``-inf``
      student logit under positive target mass gives ``+inf``. A ``jax.custom_vjp``:
      ``jax.jvp``/``jax.jacfwd`` of it fail, use :mod:`jaxent.reference` for forward
      mode; ``jax.hessian`` and ``jax.jvp(jax.grad(f))`` work (the rule's backward is
      plain JAX).
    """
    fn = "softmax_kl_divergence"
    x, t, axes = _prepare_pair(
        fn, ("logits", "target_logits"), logits, target_logits, axis
    )
    check_reduction(fn, reduction)
    check_axis_name(fn, axis_name, axes)
    mask = loss_mask(fn, where, x.shape, axes)
    temperature = check_positive(fn, "temperature", temperature)
    kl = impl(_SOFTMAX_KL)(x, t, mask, axes, axis_name, temperature)
    count = kept_count(mask, axes, kl.shape, axis_name)
    return reduce_loss(kl, reduction, count).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _softmax_kl(x, t, mask, axes, axis_name, temperature):
    return _softmax_kl_fwd(x, t, mask, axes, axis_name, temperature)[0]


def _kl_terms(xf, tf, mx, lsx, mt, lst, q):
    """``q log q - q log p`` elementwise from max-shifted logits; each product is
    taken apart so that ``q = 0`` on ``-inf`` logits gives 0, not ``inf - inf``."""
    return mul0(q, (tf - mt) - lst) - mul0(q, (xf - mx) - lsx)


def _softmax_kl_fwd(x, t, mask, axes, axis_name, temperature):
    xf = tempered(upcast(x, mask), temperature)
    tf = tempered(upcast(t, mask), temperature)
    mx, lsx = normalizer(xf, axes, axis_name)
    mt, st = max_sumexp(tf, axes, axis_name)
    lst = jnp.log(jnp.maximum(st, 1.0))
    lq = shifted(tf, mt) - lst
    lp = shifted(xf, mx) - lsx
    q = jnp.exp(lq)
    # Select-free, so that the sum fuses into one pass: q > 0 only where lq is
    # above _FLOOR, so the floor only turns 0 * -inf into 0.
    terms = q * jnp.maximum(lq, _FLOOR) - mul0_nonpos(q, lp)
    kl = class_sum(terms, axes, axis_name)
    # sum(q): 1 on a row with an admissible class (st >= 1), 0 on an empty one.
    mass = jnp.minimum(st, 1.0)
    # An identity (mass >= 0 unless NaN, and then kl is NaN too), but XLA
    # cannot fuse the row sum through it into both users of kl (the loss and
    # the backward), which would write the N x C terms to memory.
    kl = jnp.where(mass >= 0, kl, jnp.nan)
    return jnp.squeeze(kl, axes), (x, t, mask, mx, lsx, mt, lst, kl, mass)


def _softmax_kl_bwd(axes, axis_name, temperature, res, g):
    x, t, mask, mx, lsx, mt, lst, kl, mass = res
    g = tempered(jnp.expand_dims(g, axes), temperature)
    # Each gradient recomputes softmax(t) in its own pass: the two barriers
    # (distinct operand orders) keep XLA:CPU from sharing one N x C copy of it.
    xa, ta, mxa, lsxa, mta, lsta = fusion_barrier((x, t, mx, lsx, mt, lst))
    p = probs(tempered(upcast(xa, mask), temperature), mxa, lsxa)
    q = probs(tempered(upcast(ta, mask), temperature), mta, lsta)
    dx = g * (p * mass - q)
    tb, xb, mtb, lstb, mxb, lsxb = fusion_barrier((t, x, mt, lst, mx, lsx))
    xf = tempered(upcast(xb, mask), temperature)
    tf = tempered(upcast(tb, mask), temperature)
    q = probs(tf, mtb, lstb)
    dt = g * (_kl_terms(xf, tf, mxb, lsxb, mtb, lstb, q) - q * kl)
    return dx.astype(x.dtype), dt.astype(t.dtype), None


_softmax_kl.defvjp(_softmax_kl_fwd, _softmax_kl_bwd)


def _softmax_kl_plain(x, t, mask, axes, axis_name, temperature):
    xf = tempered(upcast(x, mask), temperature)
    tf = tempered(upcast(t, mask), temperature)
    logp = plain_log_softmax(xf, mask, axes, axis_name)
    logq = plain_log_softmax(tf, mask, axes, axis_name)
    q = jnp.exp(logq)
    none = q == 0
    terms = q * jnp.where(none & jnp.isinf(logq), 0.0, logq)
    terms = terms - q * jnp.where(none & jnp.isinf(logp), 0.0, logp)
    return jnp.squeeze(plain_sum(terms, axes, axis_name), axes)


_SOFTMAX_KL = Rule(_softmax_kl, _softmax_kl_plain, diff=(0, 1))

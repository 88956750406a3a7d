"""Plain-JAX versions of every jaxent loss, with no custom differentiation rules.

Same names, signatures and values as the top-level functions. They are the oracle
the tests check the hand-written gradients against, and the path for forward-mode
users: ``jax.jvp``, ``jax.jacfwd`` and ``jax.hessian`` cannot go through a
``jax.custom_vjp``, but they go through these.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jaxent import reference
  >>> x = jnp.array([0.0, 1.0])
  >>> tangent = jax.jvp(reference.softmax_entropy, (x,), (jnp.array([1.0, 0.0]),))[1]
  >>> print(f"{tangent:.4f}")
  0.1966
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._checks import (
    Axis,
    as_float,
    as_int,
    canonical_axes,
    check_base,
    check_fraction,
    check_nonnegative,
    check_reduction,
    check_same_shape,
    class_mask,
    describe,
    loss_mask,
    mul0,
    reduce_loss,
    safe_log,
    upcast,
)

__all__ = [
    "cross_entropy",
    "entropy",
    "kl_divergence",
    "kl_divergence_with_log_targets",
    "linear_softmax_cross_entropy",
    "log_softmax",
    "sigmoid_binary_cross_entropy",
    "softmax",
    "softmax_cross_entropy",
    "softmax_cross_entropy_with_integer_labels",
    "softmax_entropy",
    "softmax_kl_divergence",
]


def _csum(v, axes, axis_name, where=None):
    s = jnp.sum(v, axis=axes, keepdims=True, where=where)
    return s if axis_name is None else lax.psum(s, axis_name)


def _normalize(x, axes, mask, axis_name):
    """Row max (gradient stopped) and ``log sum exp(x - max)``; a row with no
    admissible class gives ``(0, 0)``."""
    m = jnp.max(x, axis=axes, keepdims=True, where=mask, initial=-jnp.inf)
    if axis_name is not None:
        m = lax.pmax(m, axis_name)
    m = lax.stop_gradient(jnp.where(m == -jnp.inf, 0.0, m))
    s = _csum(jnp.exp(x - m), axes, axis_name, where=mask)
    return m, jnp.log(jnp.where(s == 0, 1.0, s))


def _log_softmax(x, axes, mask, axis_name):
    m, ls = _normalize(x, axes, mask, axis_name)
    out = (x - m) - ls
    return out if mask is None else jnp.where(mask, out, -jnp.inf)


def _kept(mask, axes, axis_name):
    if mask is None:
        return None
    return _csum(mask.astype(jnp.int32), axes, axis_name) > 0


def log_softmax(
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.log_softmax`."""
    x = as_float("log_softmax", "logits", logits)
    axes = canonical_axes("log_softmax", axis, x.ndim)
    mask = class_mask("log_softmax", where, x.shape)
    return _log_softmax(upcast(x), axes, mask, axis_name).astype(x.dtype)


def softmax(
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.softmax`."""
    return jnp.exp(log_softmax(logits, axis, where, axis_name=axis_name))


def _cross_entropy_rows(x, y, axes, mask, z_loss, axis_name):
    """``sum(Y) * logsumexp(x) - <Y, x>`` per row (keepdims), plus the z-loss;
    written on max-shifted logits, which is exact for large offsets."""
    m, ls = _normalize(x, axes, mask, axis_name)
    loss = _csum(y, axes, axis_name) * ls - _csum(mul0(y, x - m), axes, axis_name)
    return loss + z_loss * (m + ls) ** 2


def softmax_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.softmax_cross_entropy`."""
    fn = "softmax_cross_entropy"
    x = as_float(fn, "logits", logits)
    y = as_float(fn, "labels", labels)
    check_same_shape(fn, "labels", y, "logits", x)
    axes = canonical_axes(fn, axis, x.ndim)
    eps = check_fraction(fn, "label_smoothing", label_smoothing)
    check_reduction(fn, reduction)
    mask = loss_mask(fn, where, x.shape, axes)
    xf = upcast(x)
    y = y.astype(xf.dtype)
    admissible = jnp.ones_like(xf) if mask is None else jnp.broadcast_to(mask, xf.shape)
    admissible = admissible.astype(xf.dtype)
    count = _csum(admissible, axes, axis_name)
    y = (1 - eps) * y * admissible + eps * admissible / jnp.maximum(count, 1)
    loss = _cross_entropy_rows(xf, y, axes, mask, z_loss, axis_name)
    keep = _kept(mask, axes, axis_name)
    if keep is not None:
        loss = jnp.where(keep, loss, 0.0)
    loss = jnp.squeeze(loss, axes)
    n = (
        None
        if keep is None
        else jnp.sum(jnp.broadcast_to(jnp.squeeze(keep, axes), loss.shape))
    )
    return reduce_loss(loss, reduction, n).astype(x.dtype)


def softmax_cross_entropy_with_integer_labels(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.softmax_cross_entropy_with_integer_labels`: builds
    the explicit (smoothed, weighted) one-hot target."""
    fn = "softmax_cross_entropy_with_integer_labels"
    x = as_float(fn, "logits", logits)
    labels = as_int(fn, "labels", labels)
    axes = canonical_axes(fn, axis, x.ndim)
    eps = check_fraction(fn, "label_smoothing", label_smoothing)
    z_loss = check_nonnegative(fn, "z_loss", z_loss)
    check_reduction(fn, reduction)
    batch_shape = tuple(d for i, d in enumerate(x.shape) if i not in axes)
    if labels.shape != batch_shape:
        raise ValueError(
            f"{fn}: `labels` must have the logits' shape without the class axis "
            f"{batch_shape}; got {describe(labels)}."
        )
    mask = loss_mask(fn, where, x.shape, axes)
    xf = upcast(x)
    kshape = tuple(d if i in axes else 1 for i, d in enumerate(x.shape))
    n_local = math.prod(kshape)
    ids = jnp.arange(n_local, dtype=labels.dtype).reshape(kshape)
    n_classes = n_local
    if axis_name is not None:
        ids = ids + lax.axis_index(axis_name).astype(labels.dtype) * n_local
        n_classes = n_local * lax.axis_size(axis_name)
    w = jnp.ones(kshape, xf.dtype)
    if weights is not None:
        w = as_float(fn, "weights", weights).astype(xf.dtype).reshape(kshape)
    yk = jnp.expand_dims(labels, axes)
    onehot = (ids == yk).astype(xf.dtype)
    w_y = _csum(onehot * w, axes, axis_name)
    admissible = jnp.ones_like(xf) if mask is None else jnp.broadcast_to(mask, xf.shape)
    admissible = admissible.astype(xf.dtype)
    count = _csum(admissible, axes, axis_name)
    y = (1 - eps) * w_y * onehot + eps * w * admissible / jnp.maximum(count, 1)
    loss = _cross_entropy_rows(xf, y, axes, mask, z_loss, axis_name)
    valid = (yk >= 0) & (yk < n_classes)
    loss = loss * jnp.where(valid, 1.0, jnp.nan)
    keep = jnp.ones(yk.shape, bool) if mask is None else _kept(mask, axes, axis_name)
    if ignore_index is not None:
        keep = keep & (yk != ignore_index)
    loss = jnp.squeeze(jnp.where(keep, loss, 0.0), axes)
    keep = jnp.broadcast_to(jnp.squeeze(keep, axes), batch_shape)
    denom = jnp.sum(jnp.where(keep, jnp.squeeze(w_y, axes), 0.0))
    return reduce_loss(loss, reduction, denom).astype(x.dtype)


def sigmoid_binary_cross_entropy(
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    """Plain-JAX :func:`jaxent.sigmoid_binary_cross_entropy`."""
    fn = "sigmoid_binary_cross_entropy"
    x = as_float(fn, "logits", logits)
    check_same_shape(fn, "labels", labels, "logits", x)
    check_reduction(fn, reduction)
    xf = upcast(x)
    y = jnp.asarray(labels).astype(xf.dtype)
    pos = y if pos_weight is None else as_float(fn, "pos_weight", pos_weight) * y
    loss = mul0(pos.astype(xf.dtype), jax.nn.softplus(-xf)) + mul0(
        1 - y, jax.nn.softplus(xf)
    )
    return reduce_loss(loss, reduction).astype(x.dtype)


def _in_base(h, base):
    return h if base is None else h / math.log(base)


def entropy(
    probs: ArrayLike, *, axis: Axis = -1, base: float | None = None
) -> jax.Array:
    """Plain-JAX :func:`jaxent.entropy`."""
    p = as_float("entropy", "probs", probs)
    axes = canonical_axes("entropy", axis, p.ndim)
    pf = upcast(p)
    h = -jnp.sum(mul0(pf, safe_log(pf)), axis=axes)
    return _in_base(h, check_base("entropy", base)).astype(p.dtype)


def cross_entropy(
    p: ArrayLike, q: ArrayLike, *, axis: Axis = -1, base: float | None = None
) -> jax.Array:
    """Plain-JAX :func:`jaxent.cross_entropy`."""
    p = as_float("cross_entropy", "p", p)
    q = as_float("cross_entropy", "q", q)
    check_same_shape("cross_entropy", "q", q, "p", p)
    axes = canonical_axes("cross_entropy", axis, p.ndim)
    h = -jnp.sum(mul0(upcast(p), safe_log(upcast(q))), axis=axes)
    return _in_base(h, check_base("cross_entropy", base)).astype(p.dtype)


def kl_divergence(
    log_predictions: ArrayLike,
    targets: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.kl_divergence`."""
    fn = "kl_divergence"
    lp = as_float(fn, "log_predictions", log_predictions)
    t = as_float(fn, "targets", targets)
    check_same_shape(fn, "targets", t, "log_predictions", lp)
    axes = canonical_axes(fn, axis, lp.ndim)
    mask = class_mask(fn, where, lp.shape)
    tf = upcast(t)
    terms = mul0(tf, safe_log(tf)) - mul0(tf, upcast(lp))
    return jnp.sum(terms, axis=axes, where=mask).astype(lp.dtype)


def kl_divergence_with_log_targets(
    log_predictions: ArrayLike,
    log_targets: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.kl_divergence_with_log_targets`."""
    fn = "kl_divergence_with_log_targets"
    lp = as_float(fn, "log_predictions", log_predictions)
    lt = as_float(fn, "log_targets", log_targets)
    check_same_shape(fn, "log_targets", lt, "log_predictions", lp)
    axes = canonical_axes(fn, axis, lp.ndim)
    mask = class_mask(fn, where, lp.shape)
    ltf = upcast(lt)
    t = jnp.exp(ltf)
    terms = mul0(t, ltf) - mul0(t, upcast(lp))
    return jnp.sum(terms, axis=axes, where=mask).astype(lp.dtype)


def softmax_entropy(
    logits: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    base: float | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.softmax_entropy`."""
    fn = "softmax_entropy"
    x = as_float(fn, "logits", logits)
    axes = canonical_axes(fn, axis, x.ndim)
    mask = loss_mask(fn, where, x.shape, axes)
    logp = _log_softmax(upcast(x), axes, mask, axis_name)
    h = -_csum(mul0(jnp.exp(logp), logp), axes, axis_name)
    return _in_base(jnp.squeeze(h, axes), check_base(fn, base)).astype(x.dtype)


def softmax_kl_divergence(
    logits: ArrayLike,
    target_logits: ArrayLike,
    *,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.softmax_kl_divergence`."""
    fn = "softmax_kl_divergence"
    x = as_float(fn, "logits", logits)
    t = as_float(fn, "target_logits", target_logits)
    check_same_shape(fn, "target_logits", t, "logits", x)
    axes = canonical_axes(fn, axis, x.ndim)
    check_reduction(fn, reduction)
    mask = loss_mask(fn, where, x.shape, axes)
    logp = _log_softmax(upcast(x), axes, mask, axis_name)
    logq = _log_softmax(upcast(t), axes, mask, axis_name)
    q = jnp.exp(logq)
    kl = jnp.squeeze(_csum(mul0(q, logq) - mul0(q, logp), axes, axis_name), axes)
    keep = _kept(mask, axes, axis_name)
    n = (
        None
        if keep is None
        else jnp.sum(jnp.broadcast_to(jnp.squeeze(keep, axes), kl.shape))
    )
    return reduce_loss(kl, reduction, n).astype(x.dtype)


def linear_softmax_cross_entropy(
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = None,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    block_size: int | tuple[int, int] | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """Plain-JAX :func:`jaxent.linear_softmax_cross_entropy`: materializes the
    ``[..., V]`` logits (``block_size`` is accepted and ignored)."""
    del block_size
    fn = "linear_softmax_cross_entropy"
    h = as_float(fn, "hidden", hidden)
    w = as_float(fn, "weight", weight)
    dtype = jnp.promote_types(h.dtype, w.dtype)
    x = jnp.matmul(
        h.astype(dtype),
        w.astype(dtype),
        preferred_element_type=jnp.float32 if dtype.itemsize < 4 else dtype,
    )
    if bias is not None:
        x = x + as_float(fn, "bias", bias).astype(x.dtype)
    return softmax_cross_entropy_with_integer_labels(
        x,
        labels,
        where=where,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        axis_name=axis_name,
    ).astype(dtype)

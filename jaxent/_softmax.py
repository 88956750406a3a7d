"""Softmax normalizers: the shared log-sum-exp and ``log_softmax`` / ``softmax``."""

from __future__ import annotations

import functools
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from ._args import Axis, as_float, canonical_axes, class_mask
from ._backend import fusion_barrier
from ._define import Rule, loss
from ._numerics import upcast


def class_sum(
    v: jax.Array, axes: tuple[int, ...], axis_name: Hashable | None
) -> jax.Array:
    """Sum over the class axes (keepdims), across shards when vocab-parallel."""
    s = jnp.sum(v, axis=axes, keepdims=True)
    return s if axis_name is None else lax.psum(s, axis_name)


def max_sumexp(
    x: jax.Array, axes: tuple[int, ...], axis_name: Hashable | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-row max ``m`` and ``s = sum(exp(x - m))`` (keepdims).

    ``x`` comes from :func:`upcast` with the caller's mask, so excluded entries
    are already -inf and the reductions need no mask (nor a select, which would
    keep XLA:CPU from fusing them). A row with no admissible class (all -inf)
    gets ``m = s = 0``; ``s >= 1`` on every other row (the max term gives 1).
    An empty class axis is such a row too (``initial``), as in ``jax.nn``.
    """
    m = jnp.max(x, axis=axes, keepdims=True, initial=-jnp.inf)
    if axis_name is not None:
        m = lax.pmax(m, axis_name)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    s = class_sum(jnp.exp(x - m), axes, axis_name)
    return m, s


def normalizer(
    x: jax.Array, axes: tuple[int, ...], axis_name: Hashable | None = None
) -> tuple[jax.Array, jax.Array]:
    """Per-row ``(m, ls)`` with ``logsumexp(x) = m + ls`` (keepdims), for ``x``
    as in :func:`max_sumexp`.

    Keeping the max ``m`` apart lets callers work with ``x - m``, which is exact
    for large offsets (logits near 1e7 in float32 still give exactly log C).
    A row with no admissible class (all -inf or masked out) gets ``m = ls = 0``.
    """
    m, s = max_sumexp(x, axes, axis_name)
    # Flooring at 1 only maps an empty row's s = 0 to log 1 = 0 (s is never in
    # (0, 1)). Unlike a select, it fuses into the N x C passes that use ``ls``,
    # and its derivative at s = 0 is 0, not the 0 * inf (NaN) of a bare log(0)
    # when this rule is differentiated again.
    return m, jnp.log(jnp.maximum(s, 1.0))


def shifted(x: jax.Array, m: jax.Array) -> jax.Array:
    """``x - m`` as an expression of its own. XLA:CPU would otherwise compute
    one N x C difference for all its consumers and write it to memory; apart,
    each consumer recomputes it inside its own fused pass over ``x``."""
    return x - fusion_barrier(m)


def has_class(
    mask: jax.Array, axes: tuple[int, ...], axis_name: Hashable | None = None
) -> jax.Array:
    """Rows (keepdims) with at least one admissible class under ``mask``."""
    return class_sum(mask.astype(jnp.int32), axes, axis_name) > 0


def kept_count(mask, axes, batch_shape, axis_name=None) -> jax.Array | None:
    """Number of rows a mean divides by (None: all of them)."""
    if mask is None:
        return None
    rows = jnp.squeeze(has_class(mask, axes, axis_name), axes)
    return jnp.sum(jnp.broadcast_to(rows, batch_shape))


def probs(x: jax.Array, m: jax.Array, ls: jax.Array) -> jax.Array:
    """``softmax(x)`` from the row normalizer (0 at the -inf of masked classes)."""
    # Without the barrier XLA:CPU merges this ``x - m`` with the forward's, and
    # the shared N x C difference is then written to memory instead of fused.
    m = fusion_barrier(m)
    return jnp.exp((x - m) - ls)


# The plain formulas of the reference twins: written directly in jnp, with
# none of the fusion-shaped helpers above.
def plain_normalizer(x, axes, mask, axis_name):
    """Row max (gradient stopped) and ``log sum exp(x - max)`` of ``x`` (in its
    compute dtype) over the entries ``mask`` admits; ``(0, 0)`` on a row with
    no admissible class."""
    # Stopped before the pmax, which has no differentiation rule.
    m = lax.stop_gradient(
        jnp.max(x, axis=axes, keepdims=True, where=mask, initial=-jnp.inf)
    )
    if axis_name is not None:
        m = lax.pmax(m, axis_name)
    m = jnp.where(m == -jnp.inf, 0.0, m)
    s = plain_sum(jnp.exp(x - m), axes, axis_name, where=mask)
    return m, jnp.log(jnp.where(s == 0, 1.0, s))


def plain_sum(v, axes, axis_name, where=None):
    """Class sum (keepdims) over the admitted entries, across shards."""
    s = jnp.sum(v, axis=axes, keepdims=True, where=where)
    return s if axis_name is None else lax.psum(s, axis_name)


def plain_log_softmax(x, mask, axes, axis_name):
    """``x - logsumexp(x)``, -inf where ``mask`` excludes."""
    m, ls = plain_normalizer(x, axes, mask, axis_name)
    out = (x - m) - ls
    return out if mask is None else jnp.where(mask, out, -jnp.inf)


@loss("logits", where="classes")
def log_softmax(
    impl,
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Log-softmax with an analytic gradient.

    .. math:: \mathrm{log\_softmax}(x)_c = x_c - \log \sum_k e^{x_k}

    Same values as :func:`jax.nn.log_softmax`.

    Args:
      logits: floating array ``[..., C, ...]``.
      axis: class axis (or axes).
      where: boolean mask broadcastable to ``logits``; masked entries are -inf.
      axis_name: mesh axis over which the class axis is sharded, when called
        inside ``shard_map`` (vocab-parallel); ``None`` otherwise.

    Returns:
      array of ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> jaxent.log_softmax(jnp.array([0.0, 0.0])).round(4)
      Array([-0.6931, -0.6931], dtype=float32)

    Note:
      Gradient ``g - softmax(x) * sum(g)``; zero at masked entries. A row with no
      admissible class (all -inf or fully masked) gives -inf everywhere; ``+inf`` or NaN
      logits give NaN for their row. A ``jax.custom_vjp``: ``jax.jvp``/``jax.jacfwd`` of
      it fail, use :mod:`jaxent.reference` for forward mode; ``jax.hessian`` and
      ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain JAX).
    """
    fn = "log_softmax"
    x = as_float(fn, "logits", logits)
    axes = canonical_axes(fn, axis, x.ndim)
    mask = class_mask(fn, where, x.shape)
    return impl(_LOG_SOFTMAX)(x, mask, axes, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _log_softmax(x, mask, axes, axis_name):
    return _log_softmax_fwd(x, mask, axes, axis_name)[0]


def _log_softmax_fwd(x, mask, axes, axis_name):
    xf = upcast(x, mask)
    m, ls = normalizer(xf, axes, axis_name)
    out = shifted(xf, m) - ls
    if mask is not None:
        out = jnp.where(mask, out, -jnp.inf)
    return out.astype(x.dtype), (x, mask, m, ls)


def _log_softmax_bwd(axes, axis_name, res, g):
    # Recomputed from the logits: without the barrier XLA:CPU reads the forward's
    # output instead and keeps that N x C array alive until here.
    x, m, ls = fusion_barrier((res[0], *res[2:]))
    mask = res[1]
    g = upcast(g)
    if mask is not None:
        g = jnp.where(mask, g, 0.0)
    p = probs(upcast(x, mask), m, ls)
    dx = g - p * class_sum(g, axes, axis_name)
    return dx.astype(x.dtype), None


_log_softmax.defvjp(_log_softmax_fwd, _log_softmax_bwd)


def _log_softmax_plain(x, mask, axes, axis_name):
    return plain_log_softmax(upcast(x, mask), mask, axes, axis_name).astype(x.dtype)


_LOG_SOFTMAX = Rule(_log_softmax, _log_softmax_plain, diff=(0,))


@loss("logits", where="classes")
def softmax(
    impl,
    logits: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax with an analytic gradient.

    .. math:: \mathrm{softmax}(x)_c = e^{x_c} / \sum_k e^{x_k}

    Same values as :func:`jax.nn.softmax`.

    Args:
      logits: floating array ``[..., C, ...]``.
      axis: class axis (or axes).
      where: boolean mask broadcastable to ``logits``; masked entries are 0.
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``.

    Returns:
      array of ``logits``' shape and dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> jaxent.softmax(jnp.array([0.0, 0.0]))
      Array([0.5, 0.5], dtype=float32)

    Note:
      Gradient ``p * (g - sum(g * p))``. A row with no admissible class gives 0;
      ``+inf`` or NaN logits give NaN for their row. A ``jax.custom_vjp``:
      ``jax.jvp``/``jax.jacfwd`` of it fail, use :mod:`jaxent.reference` for forward
      mode; ``jax.hessian`` and ``jax.jvp(jax.grad(f))`` work (the rule's backward is
      plain JAX).
    """
    fn = "softmax"
    x = as_float(fn, "logits", logits)
    axes = canonical_axes(fn, axis, x.ndim)
    mask = class_mask(fn, where, x.shape)
    return impl(_SOFTMAX)(x, mask, axes, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _softmax(x, mask, axes, axis_name):
    return _softmax_fwd(x, mask, axes, axis_name)[0]


def _softmax_fwd(x, mask, axes, axis_name):
    xf = upcast(x, mask)
    m, ls = normalizer(xf, axes, axis_name)
    return probs(xf, m, ls).astype(x.dtype), (x, mask, m, ls)


def _softmax_bwd(axes, axis_name, res, g):
    x, mask, m, ls = res
    p = probs(upcast(x, mask), m, ls)
    g = upcast(g)
    dx = p * (g - class_sum(g * p, axes, axis_name))
    return dx.astype(x.dtype), None


_softmax.defvjp(_softmax_fwd, _softmax_bwd)


def _softmax_plain(x, mask, axes, axis_name):
    logp = plain_log_softmax(upcast(x, mask), mask, axes, axis_name)
    return jnp.exp(logp).astype(x.dtype)


_SOFTMAX = Rule(_softmax, _softmax_plain, diff=(0,))

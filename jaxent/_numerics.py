"""Numerical building blocks: compute dtypes and the ``0 * log 0 = 0`` products."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def compute_dtype(dtype) -> jnp.dtype:
    """Half precision is computed in float32 so the loss is not quantized."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def upcast(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``x`` in its compute dtype; entries excluded by ``mask`` become -inf, so
    that whatever they hold (NaN, inf) cannot reach a value or a gradient."""
    x = x.astype(compute_dtype(x.dtype))
    return x if mask is None else jnp.where(mask, x, -jnp.inf)


def tempered(v: jax.Array, temperature: float) -> jax.Array:
    """``v / temperature``, or ``v`` itself at temperature 1 (the default then
    adds no operation to the program). Divides logits on entry to a rule and
    the cotangent of their gradient: ``d f(x / T) / dx = f'(x / T) / T``."""
    return v if temperature == 1.0 else v / temperature


def dweight(w: jax.Array, v: jax.Array) -> jax.Array:
    """Partial ``v`` of ``w * v`` w.r.t. ``w``, taken as 0 where ``w == 0`` and
    ``v`` is infinite (a log(0) at an entry that carries no weight)."""
    return jnp.where((w == 0) & jnp.isinf(v), jnp.zeros_like(v), v)


def mul0(w: jax.Array, v: jax.Array) -> jax.Array:
    """``w * v`` with ``0 * inf = 0``: a zero weight contributes nothing. Written
    so that autodiff of it follows the same convention as :func:`dweight`."""
    return w * dweight(w, v)


def mul0_nonneg(w: jax.Array, v: jax.Array) -> jax.Array:
    """:func:`mul0` for ``v >= 0`` (finite, +inf or NaN) without a select, so
    that XLA:CPU fuses a reduction over it into one pass: ``v`` is capped at the
    largest float where ``w == 0`` (``0 * cap = 0``) and left as it is elsewhere
    (the cap ``max * (1 + |w| max)`` overflows to inf for every normal ``w``).
    The cap carries no derivative: its tangent would be ``inf * dw``."""
    hi = jnp.finfo(v.dtype).max
    return w * jnp.minimum(v, lax.stop_gradient(hi * (1 + jnp.abs(w) * hi)))


def mul0_nonpos(w: jax.Array, v: jax.Array) -> jax.Array:
    """:func:`mul0` for ``v <= 0`` (shifted logits, log-probabilities: finite,
    -inf or NaN), the mirror image of :func:`mul0_nonneg`."""
    info = jnp.finfo(v.dtype)
    cap = info.min * (1 + jnp.abs(w) * info.max)
    return w * jnp.maximum(v, lax.stop_gradient(cap))


def safe_log(v: jax.Array) -> jax.Array:
    """``log(v)`` whose derivative at ``v == 0`` is 0 rather than NaN (the value
    there is only used behind :func:`mul0`)."""
    zero = v == 0
    return jnp.where(zero, -jnp.inf, jnp.log(jnp.where(zero, 1.0, v)))


def sum_to_shape(v: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sums a broadcast gradient back to an argument's ``shape``."""
    lead = v.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and v.shape[lead + i] != 1
    )
    return jnp.sum(v, axis=axes).reshape(shape)

"""Trace-time argument checks: every error names the argument, what was received
and what was expected."""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Axis = int | Sequence[int] | None
REDUCTIONS = ("none", "sum", "mean")


def describe(x) -> str:
    """Shape and dtype of ``x`` for error messages."""
    return f"{jnp.result_type(x)} array of shape {tuple(np.shape(x))}"


def as_float(fn: str, name: str, x) -> jax.Array:
    """``x`` as a floating-point array; a TypeError names the argument otherwise."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{fn}: `{name}` must be a floating-point array; got {describe(x)}."
        )
    return jnp.asarray(x)


def as_int(fn: str, name: str, x) -> jax.Array:
    """``x`` as an integer array; a TypeError names the argument otherwise."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.integer):
        raise TypeError(
            f"{fn}: `{name}` must be an integer array of class indices; got "
            f"{describe(x)}. For probabilities use softmax_cross_entropy."
        )
    x = jnp.asarray(x)
    # Narrow ids (uint8, int16) would wrap when compared with class counts.
    return x.astype(jnp.int32) if x.dtype.itemsize < 4 else x


def as_bool(fn: str, name: str, x) -> jax.Array:
    """``x`` as a boolean mask."""
    x = jnp.asarray(x)
    if x.dtype != jnp.bool_:
        raise TypeError(f"{fn}: `{name}` must be a boolean mask; got {describe(x)}.")
    return x


def as_probs(fn: str, name: str, x) -> jax.Array:
    """Floating-point probabilities (soft labels)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"{fn}: `{name}` must be floating-point probabilities; got "
            f"{describe(x)}. For class indices use "
            "softmax_cross_entropy_with_integer_labels."
        )
    return jnp.asarray(x)


def canonical_axes(
    fn: str, axis: Axis, ndim: int, *, ordered: bool = False
) -> tuple[int, ...]:
    """Class axes as a tuple of non-negative ints (``None``: all axes), sorted
    unless ``ordered`` (then in the order given: optax flattens integer-label
    classes over a tuple of axes in that order)."""
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, int | np.integer):
        axes = (axis,)
    elif isinstance(axis, Sequence) and not isinstance(axis, str):
        axes = tuple(axis)
    else:
        raise TypeError(
            f"{fn}: `axis` must be an int or a tuple of ints; got {axis!r}."
        )
    out = []
    for a in axes:
        try:
            a = operator.index(a)
        except TypeError:
            raise TypeError(
                f"{fn}: `axis` must be an int or a tuple of ints; got {axis!r}."
            ) from None
        if not -ndim <= a < ndim:
            raise ValueError(
                f"{fn}: `axis`={axis!r} is out of range for an array of rank {ndim}; "
                f"expected an int in [{-ndim}, {ndim - 1}]."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out) or not out:
        raise ValueError(f"{fn}: `axis`={axis!r} must name distinct axes.")
    return tuple(out) if ordered else tuple(sorted(out))


def check_index(fn: str, name: str, value) -> int | None:
    """A static Python int (``ignore_index``), or None."""
    if value is None:
        return None
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(
            f"{fn}: `{name}` must be a static int or None; got {value!r}."
        ) from None


def check_reduction(fn: str, reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{fn}: `reduction` must be one of {REDUCTIONS}; got {reduction!r}."
        )
    return reduction


def static_number(fn: str, name: str, value) -> float:
    """A static Python float (it selects the compiled program)."""
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"{fn}: `{name}` must be a static Python float (it selects the "
            f"compiled program); got {value!r}."
        ) from None


def check_fraction(fn: str, name: str, value) -> float:
    """A static Python number in [0, 1] (``label_smoothing``)."""
    value = static_number(fn, name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: `{name}` must be in [0, 1]; got {value!r}.")
    return value


def check_nonnegative(fn: str, name: str, value) -> float:
    """A static Python number >= 0 (``z_loss``)."""
    value = static_number(fn, name, value)
    if not value >= 0.0:
        raise ValueError(f"{fn}: `{name}` must be >= 0; got {value!r}.")
    return value


def check_positive(fn: str, name: str, value) -> float:
    """A static finite Python number > 0 (``temperature``)."""
    value = static_number(fn, name, value)
    if not 0.0 < value < np.inf:
        raise ValueError(f"{fn}: `{name}` must be finite and > 0; got {value!r}.")
    return value


def check_same_shape(fn: str, name: str, x, ref_name: str, ref) -> None:
    if np.shape(x) != np.shape(ref):
        raise ValueError(
            f"{fn}: `{name}` must have the shape of `{ref_name}` "
            f"{tuple(np.shape(ref))}; got {describe(x)}."
        )


def check_broadcasts(fn: str, name: str, x, shape: tuple[int, ...]) -> None:
    """``x`` broadcasts to ``shape`` (and does not enlarge it)."""
    try:
        ok = np.broadcast_shapes(np.shape(x), shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: `{name}` must broadcast to the logits' shape {shape}; got "
            f"{describe(x)}."
        )


def check_base(fn: str, base) -> float | None:
    if base is None:
        return None
    value = static_number(fn, "base", base)
    if not (value > 0.0 and value != 1.0):
        raise ValueError(f"{fn}: `base` must be > 0 and != 1; got {base!r}.")
    return value


def check_axis_name(fn: str, axis_name, axes: tuple[int, ...]) -> None:
    if axis_name is not None and len(axes) != 1:
        raise ValueError(
            f"{fn}: vocab-parallel `axis_name` needs a single class `axis`; got "
            f"axes {axes}."
        )


def class_mask(fn: str, where, shape: tuple[int, ...]) -> jax.Array | None:
    """``where`` broadcastable to the logits, as in ``jax.nn.softmax``."""
    if where is None:
        return None
    where = as_bool(fn, "where", where)
    try:
        ok = np.broadcast_shapes(where.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: `where` of shape {where.shape} does not broadcast to the "
            f"logits' shape {shape}."
        )
    return where


def batch_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def loss_mask(
    fn: str, where, logits_shape: tuple[int, ...], axes: tuple[int, ...]
) -> jax.Array | None:
    """optax's ``where`` as a class mask broadcastable to the logits.

    It is either of the logits' rank (classes to include) or of the batch shape
    (examples to include); an excluded example is a row with no admissible class.
    """
    if where is None:
        return None
    where = as_bool(fn, "where", where)
    if where.ndim == len(logits_shape):
        return class_mask(fn, where, logits_shape)
    rows = batch_shape(logits_shape, axes)
    if where.shape == rows:
        return jnp.expand_dims(where, sorted(axes))
    raise ValueError(
        f"{fn}: `where` must have the logits' shape {logits_shape} (a class mask) "
        f"or the batch shape {rows} (an example mask); got {describe(where)}."
    )


def static_finite(fn: str, name: str, value, low: float = -math.inf) -> float:
    """A static finite Python number ``>= low`` (``epsilon``, ``gamma``)."""
    value = static_number(fn, name, value)
    if not (math.isfinite(value) and value >= low):
        bound = "" if low == -math.inf else f" and >= {low:g}"
        raise ValueError(f"{fn}: `{name}` must be finite{bound}; got {value!r}.")
    return value


def coefficient(fn: str, name: str, value, shape, dtype, check):
    """A loss coefficient (``epsilon``, ``alpha``, ``gamma``) as optax takes it:
    ``(static, None)`` for a concrete Python or NumPy scalar (a static Python
    float that selects the compiled program, checked by ``check``), else
    ``(None, array)`` for an array-like broadcastable to ``shape`` (traced
    values included, which are not checked; concrete arrays are), floating.
    """
    if not isinstance(value, jax.core.Tracer) and np.ndim(value) == 0:
        return check(fn, name, value), None
    if not isinstance(value, jax.core.Tracer):
        # Concrete: checked at its extremes (NaN propagates to both).
        a = np.asarray(value)
        if a.size and jnp.issubdtype(a.dtype, jnp.number):
            check(fn, name, a.min().item())
            check(fn, name, a.max().item())
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.floating):
        value = value.astype(dtype)
    try:
        ok = jnp.broadcast_shapes(value.shape, shape) == tuple(shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"{fn}: `{name}` must be a scalar or broadcast to {tuple(shape)}; "
            f"got {describe(value)}."
        )
    return None, value


def broadcast_labels(fn: str, labels, x: jax.Array) -> jax.Array:
    """Labels broadcast to the logits' shape, as optax allows (their gradient
    is summed back by the broadcast's transpose)."""
    check_broadcasts(fn, "labels", labels, x.shape)
    return jnp.broadcast_to(labels, x.shape)

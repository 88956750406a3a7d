"""Trace-time argument checks and small numerical helpers shared by every loss."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

Axis = int | Sequence[int] | None
_REDUCTIONS = ("none", "sum", "mean")


def describe(x) -> str:
    """Shape and dtype of ``x`` for error messages."""
    shape = np.shape(x)
    return f"{jnp.result_type(x)} array of shape {tuple(shape)}"


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


def canonical_axes(fn: str, axis: Axis, ndim: int) -> tuple[int, ...]:
    """Class axes as a sorted tuple of non-negative ints (``None``: all axes)."""
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
    return tuple(sorted(out))


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


def check_reduction(fn: str, reduction: str) -> str:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"{fn}: `reduction` must be one of {_REDUCTIONS}; got {reduction!r}."
        )
    return reduction


def check_fraction(fn: str, name: str, value) -> float:
    """A static Python number in [0, 1] (``label_smoothing``)."""
    value = _static_number(fn, name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: `{name}` must be in [0, 1]; got {value!r}.")
    return value


def check_nonnegative(fn: str, name: str, value) -> float:
    """A static Python number >= 0 (``z_loss``)."""
    value = _static_number(fn, name, value)
    if not value >= 0.0:
        raise ValueError(f"{fn}: `{name}` must be >= 0; got {value!r}.")
    return value


def _static_number(fn: str, name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise TypeError(
            f"{fn}: `{name}` must be a static Python float (it selects the "
            f"compiled program); got {value!r}."
        ) from None


def check_same_shape(fn: str, name: str, x, ref_name: str, ref) -> None:
    if np.shape(x) != np.shape(ref):
        raise ValueError(
            f"{fn}: `{name}` must have the shape of `{ref_name}` "
            f"{tuple(np.shape(ref))}; got {describe(x)}."
        )


def check_base(fn: str, base) -> float | None:
    if base is None:
        return None
    value = _static_number(fn, "base", base)
    if not (value > 0.0 and value != 1.0):
        raise ValueError(f"{fn}: `base` must be > 0 and != 1; got {base!r}.")
    return value


def compute_dtype(dtype) -> jnp.dtype:
    """Half precision is computed in float32 so the loss is not quantized."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.float32) if dtype.itemsize < 4 else dtype


def on_cpu() -> bool:
    """Whether the program being traced is for XLA:CPU (JAX's default backend).

    A few formulations are chosen per backend, from measurements with
    ``benchmarks/run.py``: XLA:CPU fuses a row reduction only over a select-free
    expression with a single consumer, while GPU fusion recomputes shared
    elementwise work by itself and fuses comparisons for free.
    """
    return jax.default_backend() == "cpu"


def fusion_barrier(v):
    """``lax.optimization_barrier`` on XLA:CPU, the identity elsewhere.

    On CPU it keeps an N x C expression used by two passes (``x - m`` of the
    forward and of the backward) from being computed once and written to
    memory. On GPU it only blocks fusion: softmax KL divergence forward and
    backward at 8192 x 128256 bfloat16 on an H100 took 8.6 ms with it and
    7.3 ms without.
    """
    return lax.optimization_barrier(v) if on_cpu() else v


def upcast(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """``x`` in its compute dtype; entries excluded by ``mask`` become -inf, so
    that whatever they hold (NaN, inf) cannot reach a value or a gradient."""
    x = x.astype(compute_dtype(x.dtype))
    return x if mask is None else jnp.where(mask, x, -jnp.inf)


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
    (the cap ``max * (1 + |w| max)`` overflows to inf for every normal ``w``)."""
    hi = jnp.finfo(v.dtype).max
    return w * jnp.minimum(v, hi * (1 + jnp.abs(w) * hi))


def mul0_nonpos(w: jax.Array, v: jax.Array) -> jax.Array:
    """:func:`mul0` for ``v <= 0`` (shifted logits, log-probabilities: finite,
    -inf or NaN), the mirror image of :func:`mul0_nonneg`."""
    info = jnp.finfo(v.dtype)
    return w * jnp.maximum(v, info.min * (1 + jnp.abs(w) * info.max))


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


def reduce_loss(
    loss: jax.Array, reduction: str, count: jax.Array | None = None
) -> jax.Array:
    """Applies ``reduction`` to per-example losses; ``mean`` divides by ``count``
    (default: the number of examples) and is 0 when ``count`` is 0."""
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    if count is None:
        count = jnp.asarray(loss.size, loss.dtype)
    count = count.astype(loss.dtype)
    nonzero = count != 0
    return jnp.where(nonzero, total / jnp.where(nonzero, count, 1), 0)


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
    batch_shape = tuple(d for i, d in enumerate(logits_shape) if i not in axes)
    if where.shape == batch_shape:
        return jnp.expand_dims(where, axes)
    raise ValueError(
        f"{fn}: `where` must have the logits' shape {logits_shape} (a class mask) "
        f"or the batch shape {batch_shape} (an example mask); got {describe(where)}."
    )


def vma(x) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def align_vma(arrays: tuple, others: tuple = ()) -> tuple:
    """``arrays`` (``None`` kept) made to vary over all the mesh axes over which
    any of ``arrays`` and ``others`` varies.

    Inside ``shard_map`` a ``custom_vjp`` must return cotangents of its inputs'
    own types. Aligning its differentiable inputs first makes JAX transpose this
    cast into a sum of the cotangent of an input that is replicated over an
    axis (class ``weights`` over a data-parallel axis, say). Non-differentiable
    inputs (labels, masks) go in ``others``: casting them would make the loss
    look varying where it is not. A no-op outside ``shard_map``.
    """
    every = (*arrays, *others)
    axes = frozenset().union(*(vma(a) for a in every if a is not None))

    def cast(a):
        missing = tuple(sorted(axes - vma(a), key=str))
        return lax.pcast(a, missing, to="varying") if missing else a

    return tuple(None if a is None else cast(a) for a in arrays)


def spec(x) -> tuple:
    """Mesh axes of each dimension of ``x`` under explicit sharding; all None
    when unsharded, under automatic partitioning or inside ``shard_map``."""
    s = tuple(jax.typeof(x).sharding.spec)
    return s + (None,) * (np.ndim(x) - len(s))


def is_sharded(x) -> bool:
    return any(a is not None for a in spec(x))


def replicated(*arrays) -> NamedSharding | None:
    """Full replication on the explicit mesh of the first sharded array (None
    if none is)."""
    for a in arrays:
        if is_sharded(a):
            return NamedSharding(jax.typeof(a).sharding.mesh, PartitionSpec())
    return None


def reshard(x: jax.Array, target: tuple, *refs: jax.Array) -> jax.Array:
    """``x`` laid out as ``target`` (mesh axes per dimension) on the explicit
    mesh of ``x`` or of the first sharded ``refs``; unchanged when it already
    is."""
    if spec(x) == tuple(target):
        return x
    mesh = replicated(x, *refs).mesh
    return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*target)))


def like(v: jax.Array, ref: jax.Array) -> jax.Array:
    """``v`` laid out as ``ref`` (a cotangent must have its primal's sharding)."""
    return reshard(v, spec(ref), ref)

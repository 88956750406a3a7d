"""Sharding helpers: mesh-axis types inside ``shard_map`` and explicit layouts."""

from __future__ import annotations

import jax
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec


def vma(x) -> frozenset:
    """Mesh axes over which ``x`` varies inside ``shard_map`` (empty outside)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def vary(x, axes: frozenset):
    """``x`` marked as varying over ``axes`` (a no-op outside ``shard_map``)."""
    missing = tuple(sorted(axes - vma(x), key=str))
    return lax.pcast(x, missing, to="varying") if missing else x


def align_vma(arrays: tuple, others: tuple = (), exclude: frozenset = frozenset()):
    """``arrays`` (``None`` kept) made to vary over every mesh axis over which
    any of ``arrays`` and ``others`` varies, but those in ``exclude``.

    Inside ``shard_map`` a ``custom_vjp`` must return cotangents of its inputs'
    own types. Aligning its differentiable inputs first makes JAX transpose this
    cast into a sum of the cotangent of an input that is replicated over an
    axis (class ``weights`` over a data-parallel axis, say). Non-differentiable
    inputs (labels, masks) go in ``others``: casting them would make the loss
    look varying where it is not. An axis in ``exclude`` is one whose sum the
    rule's backward takes itself (``d hidden`` over a vocab-parallel axis). A
    no-op outside ``shard_map``.
    """
    every = [a for a in (*arrays, *others) if a is not None]
    axes = frozenset().union(*(vma(a) for a in every)) - exclude
    return tuple(None if a is None else vary(a, axes) for a in arrays)


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

"""Reductions of per-example losses: ``"none"``, ``"sum"`` and the counted mean."""

from __future__ import annotations

import jax
import jax.numpy as jnp


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


def count_rows(keep: jax.Array | None, batch_shape: tuple[int, ...]):
    """Number of counted examples under a batch-shaped ``keep`` (None: all)."""
    if keep is None:
        return None
    return jnp.sum(jnp.broadcast_to(keep, batch_shape))

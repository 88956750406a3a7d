"""Plain-JAX twins of every jaxent loss, with no custom differentiation rules.

Each twin is made from the same definition as the top-level function (see
``jaxent/_define.py``): same name, signature, argument checks, errors and
values; only the gradient differs in origin, JAX's autodiff of the plain
formula instead of the hand-written rule. They are the oracle the tests check
the hand-written gradients against, and the path for forward-mode users:
``jax.jvp`` and ``jax.jacfwd`` of a loss cannot go through a
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

from . import (  # noqa: F401 (register)
    _cross_entropy,
    _distill,
    _divergence,
    _linear,
    _linear_distill,
    _softmax,
)
from ._define import REGISTRY

globals().update({name: d.reference for name, d in REGISTRY.items()})

if "linear_softmax_cross_entropy" not in REGISTRY:
    from collections.abc import Hashable

    import jax
    import jax.numpy as jnp
    from jax.typing import ArrayLike

    from ._args import as_float

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
        return (
            REGISTRY["softmax_cross_entropy_with_integer_labels"]
            .reference(
                x,
                labels,
                where=where,
                ignore_index=ignore_index,
                label_smoothing=label_smoothing,
                z_loss=z_loss,
                reduction=reduction,
                axis_name=axis_name,
            )
            .astype(dtype)
        )


__all__ = sorted({*REGISTRY, "linear_softmax_cross_entropy"})

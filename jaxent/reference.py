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
    _linear_topk,
    _log_probs,
    _sigmoid,
    _softmax,
    _topk,
)
from ._define import REGISTRY

globals().update({name: d.reference for name, d in REGISTRY.items()})

__all__ = sorted(REGISTRY)

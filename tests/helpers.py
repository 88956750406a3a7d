"""Shared test utilities: one tolerance table and random inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Per-dtype tolerances (rtol, atol) for values and for gradients, no looser than
# what JAX and PyTorch use for these ops.
TOLERANCES = {
    "value": {
        "float64": (1e-12, 1e-12),
        "float32": (1.3e-6, 1e-5),
        "float16": (1e-3, 1e-3),
        "bfloat16": (1.6e-2, 1.6e-2),
    },
    "grad": {
        "float64": (1e-10, 1e-12),
        "float32": (2e-3, 2e-5),
        "float16": (1e-2, 1e-3),
        "bfloat16": (1e-1, 1e-2),
    },
}

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def tolerance(dtype, kind: str = "value") -> dict[str, float]:
    rtol, atol = TOLERANCES[kind][jnp.dtype(dtype).name]
    return {"rtol": rtol, "atol": atol}


def assert_close(actual, expected, dtype=None, kind: str = "value", scale=1.0):
    """Compares in float64 with the tolerance of ``dtype`` (default: actual's)."""
    dtype = jnp.dtype(dtype if dtype is not None else jnp.asarray(actual).dtype)
    tol = tolerance(dtype, kind)
    np.testing.assert_allclose(
        np.asarray(jnp.asarray(actual, jnp.float64)),
        np.asarray(jnp.asarray(expected, jnp.float64)),
        rtol=tol["rtol"] * scale,
        atol=tol["atol"] * scale,
    )


def logits(key_or_seed, shape, dtype="float64", scale=2.0) -> jax.Array:
    rng = np.random.default_rng(key_or_seed)
    return jnp.asarray(rng.normal(size=shape) * scale, dtype=dtype)


def probabilities(seed, shape, axis=-1, dtype="float64", low=0.05) -> jax.Array:
    rng = np.random.default_rng(seed)
    p = rng.uniform(low, 1.0, size=shape)
    return jnp.asarray(p / p.sum(axis=axis, keepdims=True), dtype=dtype)


def int_labels(seed, shape, num_classes) -> jax.Array:
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, num_classes, size=shape), dtype=jnp.int32)

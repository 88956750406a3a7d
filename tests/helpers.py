"""Shared test utilities: one tolerance table and random inputs."""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os

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
        "float64": (1e-12, 1e-12),
        "float32": (2e-3, 2e-5),
        "float16": (1e-2, 1e-3),
        "bfloat16": (1e-1, 1e-2),
    },
}

FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")


def _accelerator_plugin() -> bool:
    """Whether JAX may find a GPU or TPU (checked without starting a backend)."""
    if os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu":
        return False
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    return any(n.lower().startswith(("jax-cuda", "jax-rocm", "libtpu")) for n in names)


def _fast_xla_flags() -> tuple[str, ...]:
    """XLA:CPU flags that about halve compile times: no LLVM optimization (the
    optimized HLO is unchanged) and XLA:CPU's legacy fusion pipeline and
    emitters (its default before the fusion emitters; the HLO is fused
    differently, computing the same thing). For a CPU-only JAX only: the
    optimization level would apply to a GPU's code too. JAX 0.11's XLA has only
    the new emitters and aborts on an unknown flag."""
    if _accelerator_plugin():
        return ()
    flags = (
        "--xla_backend_optimization_level=0",
        "--xla_llvm_disable_expensive_passes=true",
    )
    if jax.__version_info__ < (0, 11):
        flags += ("--xla_cpu_use_fusion_emitters=false",)
    return flags


FAST_XLA_FLAGS = _fast_xla_flags()


def pairwise(**factors) -> list[dict]:
    """A deterministic all-pairs design: option combinations (dicts) in which
    every value of every factor meets every value of every other factor at
    least once. Options interact in pairs (smoothing with a mask, a mask with a
    reduction...); the full product of five options is 6 to 8 times longer and
    compiles a program per row. Greedy: each row is the first of the product
    that covers the most pairs still uncovered."""
    names = list(factors)
    rows = [
        dict(zip(names, v, strict=True)) for v in itertools.product(*factors.values())
    ]

    def pairs(row):
        return {
            ((a, repr(row[a])), (b, repr(row[b])))
            for a, b in itertools.combinations(names, 2)
        }

    left = set().union(*(pairs(r) for r in rows))
    chosen = []
    while left:
        best = max(rows, key=lambda r: len(pairs(r) & left))
        chosen.append(best)
        left -= pairs(best)
    return chosen


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


# -- error measurement and the robustness recorder ---------------------------------
#
# The property and adversarial suites measure every comparison in units of the
# tolerance above and, when JAXENT_ROBUSTNESS_LOG names a file, append one JSON
# line per check to it; benchmarks/robustness_report.py runs the suites with it set
# and prints the figures.

RECORD_ENV = "JAXENT_ROBUSTNESS_LOG"


def error_units(actual, expected, dtype, kind: str = "value"):
    """Compares ``actual`` with a float64 ``expected`` entry by entry.

    Returns ``(units, unexpected, mismatched)``: per-entry errors in units of the
    tolerance of ``dtype`` (``|a - e| / (atol + rtol |e|)``, 0 where ``expected``
    is not finite), a mask of entries where ``expected`` is finite but
    ``actual`` is not, and a mask of non-finite ``expected`` entries that
    ``actual`` does not reproduce exactly (NaN for NaN, the same infinity).
    An ``expected`` value beyond the range of ``dtype`` is expected to overflow
    to the infinity it rounds to.
    """
    dtype = jnp.dtype(dtype)
    a = np.asarray(actual).astype(np.float64)
    e = np.asarray(expected, np.float64)
    a, e = np.broadcast_arrays(a, e)
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = np.asarray(e.astype(dtype), np.float64)
    e = np.where(np.isfinite(e) & np.isinf(rounded), rounded, e)
    finite = np.isfinite(e)
    rtol, atol = TOLERANCES[kind][dtype.name]
    with np.errstate(invalid="ignore", over="ignore"):
        units = np.where(finite, np.abs(a - e) / (atol + rtol * np.abs(e)), 0.0)
    unexpected = finite & ~np.isfinite(a)
    mismatched = ~finite & ~((np.isnan(e) & np.isnan(a)) | (e == a))
    return np.where(unexpected, 0.0, units), unexpected, mismatched


def record(event: str, **fields) -> None:
    """Appends one JSON line to the robustness log (no-op unless it is set)."""
    path = os.environ.get(RECORD_ENV)
    if not path:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"event": event, "test": test, **fields}, default=float))
        f.write("\n")

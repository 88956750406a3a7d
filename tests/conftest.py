"""Test configuration: float64 available, strict dtype promotion, hypothesis
profiles (``--hypothesis-profile=thorough`` for long local runs), a compilation
cache shared by the test processes, and the order tests are handed out in."""

import os
from pathlib import Path

import jax
from hypothesis import HealthCheck, settings

from tests.helpers import FAST_XLA_FLAGS

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
# The tolerance table assumes IEEE float32 products; GPUs otherwise multiply
# float32 in TF32 (~1e-4 relative error), in XLA's dots and the Pallas kernels
# alike. CPUs compute the same either way.
jax.config.update("jax_default_matmul_precision", "highest")

# Compiling is ~80% of the suite's time, most of it XLA:CPU's code generation
# for thousands of small programs. FAST_XLA_FLAGS halve it (full suite 9 min
# 45 s -> about 6 min on 2 cores); XLA reads them when the backend starts, after
# this module. JAXENT_TEST_FAST_COMPILE=0 compiles with XLA's defaults, as the
# 8-device subprocess of tests/test_sharded.py does (it inherits this
# process's XLA_FLAGS, hence the flags are removed, not only not added), and
# as the doctests, the examples and the benchmarks' value checks do.
_flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f not in FAST_XLA_FLAGS]
if os.environ.get("JAXENT_TEST_FAST_COMPILE", "1") != "0":
    _flags = [*FAST_XLA_FLAGS, *_flags]
os.environ["XLA_FLAGS"] = " ".join(_flags)

# The pytest-xdist workers and the 8-device subprocess compile many of the same
# programs: a persistent cache lets each program compile once per machine. An
# empty value turns it off.
_CACHE = os.environ.get(
    "JAXENT_TEST_CACHE", str(Path(__file__).resolve().parent.parent / ".jax_cache")
)
if _CACHE:
    jax.config.update("jax_compilation_cache_dir", _CACHE)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

_common = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("ci", max_examples=60, **_common)
settings.register_profile(
    "thorough", max_examples=2000, **{**_common, "derandomize": False}
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    """Deselects tests that need more devices than this process has, and puts
    the long subprocess tests first so that a parallel run does not end
    waiting on them."""
    count = jax.device_count()
    kept, dropped = [], []
    for item in items:
        mark = item.get_closest_marker("devices")
        (dropped if mark is not None and count < mark.args[0] else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
    kept.sort(key=lambda item: item.get_closest_marker("first") is None)
    items[:] = kept

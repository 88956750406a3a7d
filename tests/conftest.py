"""Test configuration: float64 available, strict dtype promotion, hypothesis
profiles (``--hypothesis-profile=thorough`` for long local runs)."""

import os

import jax
from hypothesis import HealthCheck, settings

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")

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

"""optax's own tests of its classification losses, run unchanged against jaxent.

Every function whose name ``optax.losses`` has is swapped into optax's module,
and the test classes that exercise those functions run as optax wrote them and
runs them (JAX's default float32 and dtype promotion): "swap the import and
nothing else changes". The one allowed difference is
forward mode of the loss itself (``jax.jvp``, ``check_grads(modes=["fwd"])``),
which a ``custom_vjp`` cannot do by design (``jaxent.reference`` can); each
such optax test is listed in ``FORWARD_MODE`` and must fail with JAX's
custom_vjp error, not another.
"""

from __future__ import annotations

import inspect
import re
import unittest
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent

pytestmark = pytest.mark.slow

classification = pytest.importorskip("optax.losses._classification")
optax_tests = pytest.importorskip(
    "optax.losses._classification_test",
    reason="this optax wheel does not ship its tests",
)

CLASSES = (
    "SoftmaxCrossEntropyTest",
    "SafeSoftmaxCrossEntropyTest",
    "SoftmaxCrossEntropyWithIntegerLabelsTest",
    "SigmoidCrossEntropyTest",
    "PolyLossTest",
    "GeneralizedKLDivergenceTest",
    "KLDivergenceTest",
    "KLDivergenceWithLogTargetsTest",
    "SigmoidFocalLossTest",
)
# optax tests that take jax.jvp of the loss itself (check_grads in both modes).
FORWARD_MODE = {
    "SafeSoftmaxCrossEntropyTest.test_gradient",
    "SoftmaxCrossEntropyTest.test_gradient",
    "SoftmaxCrossEntropyWithIntegerLabelsTest.test_gradient",
}
SWAPPED = [
    name
    for name in jaxent.__all__
    if name != "reference" and callable(getattr(classification, name, None))
]


def _name(test: unittest.TestCase) -> str:
    """``Class.method`` of an optax test (its id names the parameters, whole
    arrays included, after a space)."""
    return ".".join(test.id().split(" ")[0].split(".")[-2:])


def _tests():
    """One param per optax test, with the id ``Class.method``: absltest names a
    parametrized method's cases ``method0``, ``method1``, ..."""
    loader = unittest.defaultTestLoader
    for cls in CLASSES:
        for test in loader.loadTestsFromTestCase(getattr(optax_tests, cls)):
            yield pytest.param(test, id=_name(test))


@pytest.fixture
def jaxent_in_optax(monkeypatch):
    for name in SWAPPED:
        monkeypatch.setattr(classification, name, getattr(jaxent, name))


def test_every_optax_name_is_swapped():
    assert len(SWAPPED) >= 10, SWAPPED
    for cls in CLASSES:
        assert hasattr(optax_tests, cls), cls


def test_every_optax_test_class_of_a_swapped_name_runs():
    """The rest of optax's classification test file (hinge, sparsemax,
    perceptron, CTC) names none of the swapped functions."""
    for name, cls in vars(optax_tests).items():
        if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
            continue
        source = inspect.getsource(cls)
        calls = [f for f in SWAPPED if re.search(rf"\b{f}\b", source)]
        assert name in CLASSES or not calls, (name, calls)


@pytest.mark.parametrize("test", list(_tests()))
def test_optax_test_passes_with_jaxent(test, jaxent_in_optax):
    result = unittest.TestResult()
    # optax's tests draw from NumPy's global generator unseeded; a seed per
    # test makes a failure reproducible (an all-False random mask once gave an
    # empty class axis: test_empty_class_axis_matches_optax covers it always).
    np.random.seed(zlib.crc32(_name(test).encode()))
    # optax's tests run under JAX's defaults, not the float64 and strict
    # promotion of jaxent's suite (tests/conftest.py): they mix float32 and
    # float64 NumPy arrays in their own arithmetic, and their arrays are
    # float32 (in float64, test_extreme_logits_finite_gradients passed while
    # its float32 Hessian was NaN).
    with (
        warnings.catch_warnings(),
        jax.numpy_dtype_promotion("standard"),
        jax.enable_x64(False),
    ):
        warnings.simplefilter("default")
        test.run(result)
    problems = result.errors + result.failures
    name = _name(test)
    if name in FORWARD_MODE:
        assert problems, f"{name} was expected to need forward mode"
        assert all("forward-mode autodiff" in text for _, text in problems)
        return
    assert not problems, "\n".join(text for _, text in problems)


EMPTY_CASES = [
    (name, shape)
    for name in SWAPPED
    if name != "softmax_cross_entropy_with_integer_labels"
    for shape in ((0,), (3, 0))
]


@pytest.mark.parametrize(("name", "shape"), EMPTY_CASES)
def test_empty_class_axis_matches_optax(name, shape):
    """Zero classes (e.g. ``logits[mask]`` with an all-False mask): optax gives
    an empty sum, 0 per row (or an empty array elementwise); so does jaxent,
    with a finite, empty gradient."""
    a, b = jnp.zeros(shape), jnp.zeros(shape)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ours = getattr(jaxent, name)(a, b)
        theirs = getattr(classification, name)(a, b)
        grad = jax.grad(lambda x: jnp.sum(getattr(jaxent, name)(x, b)))(a)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.shape == theirs.shape
    assert grad.shape == shape

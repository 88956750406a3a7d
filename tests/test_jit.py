"""Every public loss and its twin run under ``jax.jit`` (jaxent/_define.py): a
repeated eager call reuses the compiled program, a user's ``jax.jit`` sees one
nested call, and what jit can't take as it is (lists, Python scalars, options
of another type that compare equal) behaves as it did un-jitted."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent import reference
from jaxent._define import REGISTRY
from tests.helpers import assert_close
from tests.test_registry import _draw

pytestmark = pytest.mark.filterwarnings("ignore:convex_kl_divergence is deprecated")


def _args(name, seed):
    """The registry tests' inputs of every kind, as jax arrays."""
    rng = np.random.default_rng(seed)
    return [jnp.asarray(_draw(kind, rng, name)[0]) for kind in REGISTRY[name].inputs]


FUNCTIONS = [
    pytest.param(name, fn, id=f"{prefix}{name}")
    for name in sorted(REGISTRY)
    for prefix, fn in (("", REGISTRY[name].public), ("ref-", REGISTRY[name].reference))
]


@pytest.mark.parametrize(("name", "fn"), FUNCTIONS)
def test_repeated_eager_call_does_not_retrace(name, fn):
    # Other tests in this process may have traced the same function with
    # other options: count what these calls add, not the cache's size.
    options = {"reduction": "sum"} if "reduction" in REGISTRY[name].parameters else {}
    for kwargs in ({}, options):
        before = _traces(fn)
        fn(*_args(name, 0), **kwargs)
        size = _traces(fn)
        assert size - before <= 1
        fn(*_args(name, 1), **kwargs)
        assert _traces(fn) == size


def _traces(fn):
    return sum(jitted._cache_size() for jitted in fn._jitted)


@pytest.mark.parametrize(("name", "fn"), FUNCTIONS)
def test_one_nested_call_under_jit(name, fn):
    jaxpr = jax.make_jaxpr(fn)(*_args(name, 0))
    assert len(jaxpr.eqns) == 1, jaxpr
    (eqn,) = jaxpr.eqns
    assert "jaxpr" in eqn.params, jaxpr
    assert eqn.params["name"] == REGISTRY[name].public._jitted[0].__name__


def test_array_likes_as_un_jitted():
    """NumPy arrays are traced; Python scalars are static (lists of numbers
    reach the front as they are, where as today ``as_float`` rejects them)."""
    x = jnp.asarray([[0.5, -1.0, 2.0], [0.0, 1.0, 3.0]])
    f = jaxent.softmax_cross_entropy_with_integer_labels
    expected = f(x, jnp.asarray([2, 2]))
    assert_close(f(np.asarray(x), np.asarray([2, 2])), expected)
    # Python scalar labels of one example.
    assert_close(f(x[0], 2), expected[0])
    assert_close(
        reference.softmax_cross_entropy_with_integer_labels(x[0], 2), expected[0]
    )


def test_static_options_of_another_type_are_not_confused():
    """``axis=1.0`` compares equal to ``axis=1`` but is an error: it must not
    reuse the program traced for ``axis=1``."""
    x = jnp.zeros((2, 3))
    jaxent.softmax_entropy(x, axis=1)
    with pytest.raises(TypeError, match="`axis` must be an int"):
        jaxent.softmax_entropy(x, axis=1.0)
    with pytest.raises(TypeError, match="`axis` must be an int"):
        jaxent.softmax_entropy(x, axis={1})  # unhashable: the un-jitted call
    assert_close(jaxent.softmax_entropy(x, axis=[1]), jaxent.softmax_entropy(x))


def test_concrete_array_coefficient_is_checked():
    """An array ``gamma`` is checked when concrete, as un-jitted."""
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="`gamma` must be finite and >= 0"):
        jaxent.sigmoid_focal_loss(x, x, gamma=jnp.asarray([-1.0, 1.0, 1.0]))

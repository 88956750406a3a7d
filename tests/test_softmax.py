"""log_softmax / softmax: values against jax.nn, gradients against the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxent
from jaxent import reference
from tests.helpers import assert_close, logits

FUNCS = [
    (jaxent.log_softmax, reference.log_softmax, jax.nn.log_softmax),
    (jaxent.softmax, reference.softmax, jax.nn.softmax),
]
IDS = ["log_softmax", "softmax"]


def _weighted(f, w):
    # A generic cotangent: every output entry gets its own weight.
    return lambda x, **kw: jnp.sum(
        jnp.where(jnp.isfinite(f(x, **kw)), f(x, **kw), 0) * w
    )


def _mask(shape, axis):
    """A random class mask that keeps class 0 of every row."""
    where = np.random.default_rng(1).uniform(size=shape) > 0.3
    first = (np.arange(shape[axis]) == 0).reshape(
        [-1 if i == axis % len(shape) else 1 for i in range(len(shape))]
    )
    return jnp.asarray(where | first)


@pytest.mark.slow
@pytest.mark.parametrize(("f", "ref", "jnn"), FUNCS, ids=IDS)
@pytest.mark.parametrize(
    ("shape", "axis"), [((5, 7), -1), ((3, 4, 2, 2), 1), ((6,), 0)]
)
@pytest.mark.parametrize("masked", [False, True])
def test_values_match_jax_nn(f, ref, jnn, shape, axis, masked):
    x = logits(0, shape)
    where = _mask(shape, axis) if masked else None
    assert_close(f(x, axis, where), jnn(x, axis=axis, where=where))
    assert_close(ref(x, axis, where), jnn(x, axis=axis, where=where))


# On a middle class axis: the other layouts, with every option, are in
# tests/test_registry.py (against the NumPy oracle) and tests/test_properties.py.
@pytest.mark.slow
@pytest.mark.parametrize(("f", "ref", "jnn"), FUNCS, ids=IDS)
@pytest.mark.parametrize("masked", [False, True])
def test_grads_match_reference(f, ref, jnn, masked):
    shape, axis = (3, 4, 2, 2), 1
    x = logits(0, shape)
    where = _mask(shape, axis) if masked else None
    w = logits(2, shape)
    g = jax.grad(_weighted(f, w))(x, axis=axis, where=where)
    g_ref = jax.grad(_weighted(ref, w))(x, axis=axis, where=where)
    assert_close(g, g_ref, kind="grad")
    if masked:
        assert np.all(np.asarray(g)[~np.asarray(where)] == 0)
    check_grads(
        lambda x: _weighted(f, w)(x, axis=axis, where=where),
        (x,),
        order=2,
        modes=["rev"],
    )


@pytest.mark.parametrize(("f", "ref", "jnn"), FUNCS, ids=IDS)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes(f, ref, jnn, dtype):
    x = logits(0, (4, 33), dtype=dtype)
    out = f(x)
    assert out.dtype == jnp.dtype(dtype)
    assert_close(out, jnn(x.astype(jnp.float64)), dtype=dtype)
    g = jax.grad(lambda x: jnp.sum(f(x)[:, 0].astype(jnp.float32)))(x)
    assert g.dtype == jnp.dtype(dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("f", "ref", "jnn"), FUNCS, ids=IDS)
def test_transforms(f, ref, jnn):
    x = logits(3, (3, 4, 5))
    expected = jnn(x)
    assert_close(jax.jit(f)(x), expected)
    assert_close(jax.jit(jax.vmap(f))(x), expected)
    assert_close(jax.jit(jax.checkpoint(f))(x), expected)
    ys = jax.jit(lambda x: jax.lax.scan(lambda c, xi: (c, f(xi)), 0.0, x)[1])(x)
    assert_close(ys, expected)
    w = logits(4, x.shape)
    loss = lambda x: jnp.sum(jnp.sin(f(x)) * w)  # noqa: E731
    loss_ref = lambda x: jnp.sum(jnp.sin(ref(x)) * w)  # noqa: E731
    assert_close(
        jax.jit(jax.grad(loss))(x), jax.jit(jax.grad(loss_ref))(x), kind="grad"
    )

    @jax.jit
    def hess_vecs(x):
        return [
            jax.grad(lambda x, fn=fn: jnp.vdot(jax.grad(fn)(x), w))(x)
            for fn in (loss, loss_ref)
        ]

    hess_vec, hess_vec_ref = hess_vecs(x)
    assert_close(hess_vec, hess_vec_ref, kind="grad")
    # The rule is a custom_vjp: it is in the traced program and has no JVP.
    assert "custom_vjp_call" in str(jax.make_jaxpr(loss)(x))


def test_masked_vocabulary_and_extremes():
    x = jnp.array([[0.0, -jnp.inf, 1.0], [-jnp.inf, -jnp.inf, -jnp.inf]])
    out = jaxent.log_softmax(x)
    assert_close(out[0], jax.nn.log_softmax(x[0]))
    # Policy: a row with no admissible class is -inf (softmax 0), not NaN.
    assert np.all(np.isneginf(np.asarray(out[1])))
    assert np.all(np.asarray(jaxent.softmax(x)[1]) == 0)
    g = jax.grad(lambda x: jnp.sum(jaxent.softmax(x) * jnp.arange(3.0)))(x)
    assert np.all(np.isfinite(np.asarray(g))) and g[0, 1] == 0
    big = jnp.array([1e30, 0.0, -1e30], jnp.float32)
    assert_close(jaxent.softmax(big), jnp.array([1.0, 0.0, 0.0]))
    half = jnp.array([3e4, 3e4 - 1.0], jnp.float16)
    assert np.all(np.isfinite(np.asarray(jaxent.log_softmax(half))))
    nan_row = jaxent.log_softmax(jnp.array([jnp.inf, 0.0]))
    assert np.all(np.isnan(np.asarray(nan_row)))


def test_forward_mode_goes_through_reference():
    x = logits(5, (2, 4))
    v = logits(6, (2, 4))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(jaxent.log_softmax, (x,), (v,))
    _, tangent = jax.jvp(reference.log_softmax, (x,), (v,))
    _, tangent_jnn = jax.jvp(jax.nn.log_softmax, (x,), (v,))
    assert_close(tangent, tangent_jnn)


@pytest.mark.parametrize("f", [jaxent.log_softmax, jaxent.softmax], ids=IDS)
def test_bad_input(f):
    with pytest.raises(TypeError, match=r"`logits`.*int32"):
        f(jnp.arange(3, dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"`axis`=2.*rank 2"):
        f(jnp.ones((2, 3)), axis=2)
    with pytest.raises(ValueError, match=r"`where` of shape \(4,\)"):
        f(jnp.ones((2, 3)), where=jnp.ones(4, bool))

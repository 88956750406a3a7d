"""Sigmoid (binary) losses: parity with optax and PyTorch, the analytic
gradient, dtypes, argument errors, and the focal loss's second derivatives at
extreme logits against a closed form in float64."""

import itertools

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


# -- the focal loss's second derivative in logits --------------------------------
#
# optax's test_extreme_logits_finite_gradients takes jax.hessian of the focal
# loss at logits +-50..100 with soft labels and gamma = 0.5. The custom rule's
# backward is plain JAX, so its own derivative must be finite there too: no
# 0 * inf or inf - inf from ratios by 1 - p_t that underflow when squared.

FOCAL_GAMMAS = (0.1, 0.5, 1.0, 1.5, 2.0, 3.0)
FOCAL_LABELS = (0.0, 0.3, 0.5, 1.0)
EXTREME = (50.0, 80.0, 100.0, 400.0)
FOCAL_LOGITS = tuple(s * v for v in (*EXTREME, 0.5, 3.0, 8.0) for s in (-1, 1))


def _focal_grid():
    x, y = np.meshgrid(FOCAL_LOGITS, FOCAL_LABELS)
    return x.ravel(), y.ravel()


def _focal_d2(x, y, gamma, alpha):
    """d^2/dx^2 of ``alpha_t u**gamma ce`` in NumPy float64, with u = 1 - p_t:

    ``alpha_t u**gamma (gamma (gamma - 1) (u'/u)**2 ce + gamma (u''/u) ce
    + 2 gamma (u'/u) ce' + ce'')``, where ``u' = (1 - 2y) s sb``, ``u'' = u'
    (sb - s)``, ``ce' = (1 - y) s - y sb`` (``s - y`` loses ``sb`` where ``s``
    rounds to 1) and ``ce'' = s sb``, with ``s = sigmoid(x)`` and ``sb =
    sigmoid(-x)`` exact in float64 for |x| <= 700. Returns the value and the
    size of its terms, the scale of its rounding error."""
    sp_pos, sp_neg = np.logaddexp(0, x), np.logaddexp(0, -x)
    s, sb = np.exp(-sp_neg), np.exp(-sp_pos)
    u = y * sb + (1 - y) * s
    ce = y * sp_neg + (1 - y) * sp_pos
    du = (1 - 2 * y) * s * sb / u
    terms = np.stack(
        [
            gamma * (gamma - 1) * du**2 * ce,
            gamma * du * (sb - s) * ce,
            2 * gamma * du * ((1 - y) * s - y * sb),
            s * sb,
        ]
    )
    at = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
    scale = at * u**gamma
    return scale * terms.sum(0), scale * np.abs(terms).sum(0)


def _second_derivatives(f, x, y):
    """Forward-over-reverse and reverse-over-reverse d^2 f / dx^2 of an
    elementwise loss, one logit at a time."""

    def scalar(xi, yi):
        return f(xi[None], yi[None])[0]

    fwd = jax.vmap(jax.jacfwd(jax.grad(scalar)))(x, y)
    rev = jax.vmap(jax.jacrev(jax.grad(scalar)))(x, y)
    return fwd, rev


# (alpha, how gamma and alpha are passed): Python numbers (compiled in) or
# arrays (the rule's array arguments).
FOCAL_COEFS = {
    "static": (None, float),
    "array": (0.25, lambda v: jnp.full((1,), v)),
}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_focal_second_derivative_at_extreme_logits(dtype):
    x64, y64 = _focal_grid()
    x, y = jnp.asarray(x64, dtype), jnp.asarray(y64, dtype)

    @jax.jit
    def all_gammas(x, y):
        out = {}
        for gamma in FOCAL_GAMMAS:
            for kind, (alpha, as_coef) in FOCAL_COEFS.items():
                coefs = {"gamma": as_coef(gamma)}
                if alpha is not None:
                    coefs["alpha"] = as_coef(alpha)
                for f, key in ((FOCAL, "rule"), (reference.sigmoid_focal_loss, "ref")):
                    out[gamma, key, kind] = _second_derivatives(
                        lambda a, b, f=f, c=coefs: f(a, b, **c), x, y
                    )
        return out

    out = all_gammas(x, y)
    eps = float(jnp.finfo(dtype).eps)
    moderate = np.abs(x64) <= 3
    for gamma, (kind, (alpha, _)) in itertools.product(
        FOCAL_GAMMAS, FOCAL_COEFS.items()
    ):
        want, size = _focal_d2(x64, y64, gamma, alpha)
        # The float32 rule is computed in float32: its subnormals flush to 0.
        atol = 0.0 if dtype == "float64" else 1e-36
        for mode, got in zip(("fwd", "rev"), out[gamma, "rule", kind], strict=True):
            got = np.asarray(got, np.float64)
            where = f"gamma={gamma} {kind} {mode}"
            assert np.all(np.isfinite(got)), where
            err = np.abs(got - want)
            bound = 64 * eps * size + atol
            bad = err > bound
            assert not bad.any(), (where, x64[bad], y64[bad], got[bad], want[bad])
        # jax.grad of the plain twin goes through jax.nn.sigmoid, whose
        # derivative s (1 - s) loses sb where s rounds to 1 (relative error
        # eps / sb): a faithful oracle at moderate logits in float64 only.
        if dtype == "float64":
            for got in out[gamma, "ref", kind]:
                got = np.asarray(got)
                assert np.all(np.isfinite(got[moderate])), gamma
                err = np.abs(got - want)[moderate]
                assert np.all(err <= 1e-12 * size[moderate]), gamma

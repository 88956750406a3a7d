"""Entropy, cross-entropy and KL divergence: values against SciPy and optax,
gradients against the plain-JAX reference, zero-probability behaviour."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special
import scipy.stats
from jax.test_util import check_grads

import jaxent
from jaxent import reference
from tests.helpers import assert_close, logits, probabilities


def _scalar(f, **kw):
    def g(*args):
        out = f(*args, **kw)
        return jnp.sum(jnp.sin(out) + out)

    return g


def _p(seed, shape, axis):
    # Well away from 0: check_grads' finite differences of order 2 see 1/p**2.
    return probabilities(seed, shape, axis, low=0.5)


# name -> builder of float64 inputs from (shape, axis)
CASES = {
    "entropy": lambda s, a: (_p(0, s, a),),
    "cross_entropy": lambda s, a: (_p(0, s, a), _p(1, s, a)),
    "kl_divergence": lambda s, a: (
        jnp.log(_p(1, s, a)),
        _p(0, s, a),
    ),
    "kl_divergence_with_log_targets": lambda s, a: (
        jnp.log(_p(1, s, a)),
        jnp.log(_p(0, s, a)),
    ),
    "softmax_entropy": lambda s, a: (logits(0, s),),
    "softmax_kl_divergence": lambda s, a: (logits(0, s), logits(1, s)),
}


# On a middle class axis: the last-axis and 1-D layouts, every option and
# reduction are in tests/test_registry.py (against the NumPy oracle) and random
# layouts in tests/test_properties.py.
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_grads_match_reference(name):
    shape, axis = (3, 4, 2), 1
    args = CASES[name](shape, axis)
    f, ref = getattr(jaxent, name), getattr(reference, name)
    argnums = tuple(range(len(args)))
    value, grads = jax.value_and_grad(_scalar(f, axis=axis), argnums)(*args)
    value_ref, grads_ref = jax.value_and_grad(_scalar(ref, axis=axis), argnums)(*args)
    assert_close(value, value_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, kind="grad")
    check_grads(_scalar(f, axis=axis), args, order=2, modes=["rev"])
    assert "custom_vjp_call" in str(jax.make_jaxpr(_scalar(f, axis=axis))(*args))


@pytest.mark.parametrize("base", [None, 2.0])
def test_values_match_scipy(base):
    p = probabilities(0, (4, 5))
    q = probabilities(1, (4, 5))
    p_np, q_np = np.asarray(p), np.asarray(q)
    assert_close(
        jaxent.entropy(p, base=base), scipy.stats.entropy(p_np, base=base, axis=-1)
    )
    scale = 1.0 if base is None else np.log(base)
    expected_ce = -np.sum(p_np * np.log(q_np), -1) / scale
    assert_close(jaxent.cross_entropy(p, q, base=base), expected_ce)
    kl = scipy.special.rel_entr(p_np, q_np).sum(-1)
    assert_close(jaxent.kl_divergence(jnp.log(q), p), kl)
    assert_close(jaxent.kl_divergence_with_log_targets(jnp.log(q), jnp.log(p)), kl)
    x, t = logits(2, (4, 5)), logits(3, (4, 5))
    px, pt = (
        scipy.special.softmax(np.asarray(x), -1),
        scipy.special.softmax(np.asarray(t), -1),
    )
    assert_close(
        jaxent.softmax_entropy(x, base=base),
        scipy.stats.entropy(px, base=base, axis=-1),
    )
    assert_close(
        jaxent.softmax_kl_divergence(x, t), scipy.special.rel_entr(pt, px).sum(-1)
    )


@pytest.mark.parametrize("where", [False, True])
def test_kl_matches_optax(where):
    lp = jnp.log(probabilities(1, (4, 5)))
    t = probabilities(0, (4, 5))
    mask = (
        jnp.asarray(np.random.default_rng(3).uniform(size=(4, 5)) > 0.3)
        if where
        else None
    )
    assert_close(
        jaxent.kl_divergence(lp, t, where=mask),
        optax.losses.kl_divergence(lp, t, where=mask),
    )
    assert_close(
        jaxent.kl_divergence_with_log_targets(lp, jnp.log(t), where=mask),
        optax.losses.kl_divergence_with_log_targets(lp, jnp.log(t), where=mask),
    )
    x, tl = logits(2, (4, 5)), logits(3, (4, 5))
    composed = optax.losses.kl_divergence_with_log_targets(
        jax.nn.log_softmax(x, where=mask),
        jax.nn.log_softmax(tl, where=mask),
        where=mask,
    )
    assert_close(jaxent.softmax_kl_divergence(x, tl, where=mask), composed)


def test_zero_probabilities_give_finite_values_and_gradients():
    p = jnp.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    q = jnp.array([[0.25, 0.75, 0.0], [0.5, 0.5, 0.0]])
    for f, args in [
        (jaxent.entropy, (p,)),
        (jaxent.cross_entropy, (p, q)),
        (jaxent.kl_divergence, (jnp.log(q), p)),
        (jaxent.kl_divergence_with_log_targets, (jnp.log(q), jnp.log(p))),
    ]:
        value, grads = jax.value_and_grad(
            lambda *a, f=f: jnp.sum(f(*a)), tuple(range(len(args)))
        )(*args)
        assert np.isfinite(value), f.__name__
        assert all(np.all(np.isfinite(np.asarray(g))) for g in grads), f.__name__
    # The zero-p entries contribute 0 to the value and gradients of cross_entropy,
    # also where q = 0; finite partials at zero-weight entries are kept.
    gp, gq = jax.grad(lambda p, q: jnp.sum(jaxent.cross_entropy(p, q)), (0, 1))(p, q)
    assert gq[0, 2] == 0 and gp[0, 2] == 0 and gq[1, 1] == 0
    assert_close(gp[1, 1], -np.log(0.5))
    # optax's target gradient is NaN where a target is 0; jaxent's is finite.
    g_optax = jax.grad(
        lambda t: jnp.sum(optax.losses.kl_divergence(jnp.log(q[:, :2]), t))
    )(p[:, :2])
    assert np.isnan(np.asarray(g_optax)).any()
    # entropy(softmax(x)) stays finite when the softmax underflows to exactly 0.
    x = jnp.array([0.0, -800.0, 5.0])
    g = jax.grad(lambda x: jaxent.entropy(jax.nn.softmax(x)))(x)
    assert np.all(np.isfinite(np.asarray(g)))


def test_softmax_kl_gradient_is_difference_of_softmaxes():
    x, t = logits(0, (6, 7)), logits(1, (6, 7))
    g = jax.grad(lambda x: jnp.sum(jaxent.softmax_kl_divergence(x, t)))(x)
    assert_close(g, jax.nn.softmax(x) - jax.nn.softmax(t), kind="grad")
    g_mean = jax.grad(lambda x: jaxent.softmax_kl_divergence(x, t, reduction="mean"))(x)
    assert_close(g_mean, (jax.nn.softmax(x) - jax.nn.softmax(t)) / 6, kind="grad")


def test_softmax_measures_with_masked_vocabulary():
    x = logits(0, (3, 6)).at[:, 4:].set(-jnp.inf)
    t = logits(1, (3, 6)).at[:, 4:].set(-jnp.inf)
    h, gh = jax.value_and_grad(lambda x: jnp.sum(jaxent.softmax_entropy(x)))(x)
    assert_close(h, jnp.sum(jaxent.softmax_entropy(x[:, :4])))
    assert np.all(np.asarray(gh)[:, 4:] == 0)
    kl, (gx, gt) = jax.value_and_grad(
        lambda x, t: jnp.sum(jaxent.softmax_kl_divergence(x, t)), (0, 1)
    )(x, t)
    assert_close(kl, jnp.sum(jaxent.softmax_kl_divergence(x[:, :4], t[:, :4])))
    assert np.all(np.asarray(gx)[:, 4:] == 0) and np.all(np.asarray(gt)[:, 4:] == 0)
    # Example mask: excluded rows give 0 and do not count in the mean.
    keep = jnp.array([True, False, True])
    mean = jaxent.softmax_kl_divergence(x, t, where=keep, reduction="mean")
    assert_close(
        mean, jnp.sum(jnp.where(keep, jaxent.softmax_kl_divergence(x, t), 0)) / 2
    )
    assert jaxent.softmax_entropy(x, where=keep)[1] == 0
    # Equal logits offset by 1e7 in float32: exactly log C.
    same = jnp.full((2, 8), 1e7, jnp.float32)
    assert_close(
        jaxent.softmax_entropy(same), jnp.full(2, np.log(8.0)), dtype="float32"
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_dtypes(name, dtype):
    args64 = CASES[name]((4, 9), -1)
    args = tuple(a.astype(dtype) for a in args64)
    f = getattr(jaxent, name)
    out = f(*args)
    assert out.dtype == jnp.dtype(dtype)
    assert_close(out, f(*(a.astype(jnp.float64) for a in args)), dtype=dtype, scale=2.0)
    grads = jax.grad(
        lambda *a: jnp.sum(f(*a).astype(jnp.float32)), tuple(range(len(args)))
    )(*args)
    assert all(g.dtype == jnp.dtype(dtype) for g in grads)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_transforms(name):
    args = CASES[name]((3, 4, 5), -1)
    f = getattr(jaxent, name)
    # Eager once; the transforms compiled (eager, each would compile every
    # primitive again for its shapes).
    expected = f(*args)
    jitted = jax.jit(f)
    assert_close(jitted(*args), expected)
    assert_close(jax.jit(jax.vmap(f))(*args), expected)
    loop = jnp.stack([jitted(*(a[i] for a in args)) for i in range(3)])
    assert_close(loop, expected)
    scan = jax.jit(lambda *a: jax.lax.scan(lambda c, a: (c, f(*a)), 0.0, a)[1])
    assert_close(scan(*args), expected)
    g = jax.jit(jax.grad(_scalar(f)))(*args)
    assert_close(jax.jit(jax.grad(jax.checkpoint(_scalar(f))))(*args), g, kind="grad")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(_scalar(f), args, args)
    jax.jvp(_scalar(getattr(reference, name)), args, args)


BAD = [
    (jaxent.entropy, (jnp.ones(3, jnp.int32),), {}, TypeError, r"`probs`.*int32"),
    (jaxent.entropy, (jnp.ones(3),), {"base": 1.0}, ValueError, r"`base`.*1.0"),
    (jaxent.cross_entropy, (jnp.ones(3), jnp.ones(4)), {}, ValueError, r"`q`.*\(4,\)"),
    (
        jaxent.kl_divergence,
        (jnp.ones(3), jnp.ones(3, jnp.int32)),
        {},
        TypeError,
        r"`targets`.*int32",
    ),
    (
        jaxent.kl_divergence_with_log_targets,
        (jnp.ones(3), jnp.ones(3)),
        {"axis": 1},
        ValueError,
        r"`axis`=1",
    ),
    (
        jaxent.softmax_entropy,
        (jnp.ones((2, 3)),),
        {"where": jnp.ones(3, bool)},
        ValueError,
        r"`where`.*\(3,\)",
    ),
    (
        jaxent.softmax_kl_divergence,
        (jnp.ones(3), jnp.ones(3)),
        {"reduction": "mean "},
        ValueError,
        r"`reduction`.*'mean '",
    ),
]


@pytest.mark.parametrize(("f", "args", "kw", "error", "match"), BAD)
def test_bad_input(f, args, kw, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: f(*a, **kw)).lower(*args)


def test_cross_entropy_boundary_gradient_agrees_with_reference():
    """At ``p > 0, q = 0`` the gradient w.r.t. ``q`` is ``-p / q = -inf`` in both;
    at ``p = 0`` every partial is 0 (``0 log 0 = 0``), finite ``log q`` kept."""
    p = jnp.array([0.5, 0.5, 0.0, 0.0])
    q = jnp.array([1.0, 0.0, 0.0, 0.5])
    grads = [
        jax.grad(lambda p, q, f=f: f(p, q), (0, 1))(p, q)
        for f in (jaxent.cross_entropy, reference.cross_entropy)
    ]
    for dp, dq in grads:
        np.testing.assert_array_equal(dq, [-0.5, -np.inf, 0.0, 0.0])
        np.testing.assert_array_equal(dp, [0.0, np.inf, 0.0, -np.log(0.5)])

"""The rest of optax's entropy family: ``safe_softmax_cross_entropy``,
``poly_loss_cross_entropy``, ``sigmoid_focal_loss`` and
``generalized_kl_divergence`` (with its alias ``convex_kl_divergence``).

Values against optax (float64) and the NumPy oracle, gradients of the custom
rules against the oracle's closed forms, gradients w.r.t. the coefficients,
jit/vmap, low precision, every reduction, bad inputs and optax-style positional
calls.

XLA compilation dominates the cost of these small problems, so each test
evaluates all of its configurations in one jitted program.
"""

from __future__ import annotations

import inspect
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import jaxent
from jaxent import reference
from jaxent._define import REGISTRY
from tests.helpers import assert_close
from tests.oracle import ORACLES

# Deep tests of one family; tests/test_registry.py covers it in the quick subset.
pytestmark = pytest.mark.slow

INF = np.inf
POLY = "poly_loss_cross_entropy"
SAFE = "safe_softmax_cross_entropy"
FOCAL = "sigmoid_focal_loss"
GKL = "generalized_kl_divergence"
FAMILY = (SAFE, POLY, FOCAL, GKL)
NAMES = (*FAMILY, "convex_kl_divergence")


def _optax(name):
    """optax's function (without the deprecation warning of the alias)."""
    fn = getattr(optax.losses, name)

    def call(*args, **kwargs):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return fn(*args, **kwargs)

    return call


def _rng(seed=0):
    return np.random.default_rng(seed)


def _probs(rng, shape, axis=-1, low=0.05):
    p = rng.uniform(low, 1.0, shape)
    return p / p.sum(axis=axis, keepdims=True)


def _inputs(name, shape, axis=-1, seed=0):
    """float64 NumPy positional inputs of ``name``, away from the points where
    a loss is not differentiable."""
    rng = _rng(seed)
    if name in (SAFE, POLY):
        return rng.normal(size=shape) * 2, _probs(rng, shape, axis)
    if name == FOCAL:
        return rng.normal(size=shape) * 3, rng.uniform(0.05, 0.95, shape)
    # generalized KL: unnormalized measures
    return np.log(rng.uniform(0.2, 2.0, shape)), rng.uniform(0.2, 2.0, shape)


def _check(label, actual, expected, **kw):
    try:
        assert_close(actual, expected, **kw)
    except AssertionError as e:
        raise AssertionError(f"{label}: {e}") from None


def _check_all(pairs, **kw):
    for label, (actual, expected) in pairs.items():
        _check(label, actual, expected, **kw)


# -- values against optax (float64) ---------------------------------------------

AXIS_CASES = [
    ((6,), -1),
    ((4, 7), -1),
    ((4, 7), 0),
    ((3, 4, 5), 1),
    ((3, 4, 5), (0, 2)),
]


def test_poly_matches_optax():
    """Every axis layout and several epsilons; optax's ``where`` (of the logits'
    rank, broadcastable: softmax and both sums over the included classes), with
    -inf or NaN logits where excluded; jaxent's example mask."""
    rng = _rng(1)
    cases = {}
    for i, (shape, axis) in enumerate(AXIS_CASES):
        x, y = _inputs(POLY, shape, axis)
        eps = (2.0, -1.0, 0.3)[i % 3]
        kw = {"epsilon": eps, "axis": axis}
        cases[f"{shape} axis={axis} epsilon={eps}"] = (x, y, kw)
        if len(shape) == 1:
            continue
        # A full mask, or one broadcast along the first axis.
        mask = rng.uniform(size=shape if i % 2 else (1, *shape[1:])) < 0.7
        kw = {"where": mask, "epsilon": 0.5, "axis": axis}
        label = f"{shape} axis={axis} where of shape {mask.shape}"
        cases[label] = (x, y, kw)
        cases[label + " -inf"] = (np.where(mask, x, -INF), y, kw)

    def run():
        out = {}
        for label, (x, y, kw) in cases.items():
            theirs = _optax(POLY)(x, y, **kw)
            out[label] = (jaxent.poly_loss_cross_entropy(x, y, **kw), theirs)
            if "-inf" in label:
                nan = jnp.where(kw["where"], x, jnp.nan)
                out[label + " (NaN)"] = (
                    jaxent.poly_loss_cross_entropy(nan, y, **kw),
                    theirs,
                )
        # jaxent's example mask of the batch shape.
        x, y = _inputs(POLY, (5, 4))
        keep = np.array([True, False, True, True, False])
        out["example mask"] = (
            jaxent.poly_loss_cross_entropy(x, y, where=keep, epsilon=0.7),
            jnp.where(keep, _optax(POLY)(x, y, epsilon=0.7), 0.0),
        )
        # A -inf logit under a zero label adds 0 (optax: NaN).
        xi, yi = x.copy(), y.copy()
        xi[:, 0], yi[:, 0] = -INF, 0.0
        out["-inf under a zero label"] = (
            jaxent.poly_loss_cross_entropy(xi, yi),
            _optax(POLY)(xi[:, 1:], yi[:, 1:]),
        )
        grads = jax.grad(
            lambda a, b: jnp.sum(jaxent.poly_loss_cross_entropy(a, b)), (0, 1)
        )(xi, yi)
        return out, _optax(POLY)(xi, yi), grads

    out, optax_nan, grads = jax.jit(run)()
    for _, theirs in out.values():
        assert np.isfinite(theirs).all()
    _check_all(out)
    assert np.isnan(optax_nan).all()
    assert all(np.isfinite(g).all() for g in grads)


def test_safe_softmax_cross_entropy_matches_optax():
    """Values and gradients of optax's safe variant, -inf logits under zero
    labels included; labels broadcast to the logits."""
    rng = _rng(2)
    cases = {}
    for shape in ((6,), (4, 7), (2, 3, 5)):
        x, y = _inputs(SAFE, shape)
        hole = rng.uniform(size=shape) < 0.3
        hole[..., 0] = False
        yi = np.where(hole, 0.0, y)
        cases[f"{shape}"] = (x, y)
        cases[f"{shape} -inf"] = (
            np.where(hole, -INF, x),
            yi / yi.sum(-1, keepdims=True),
        )
    x, y = _inputs(SAFE, (4, 7))
    cases["broadcast labels"] = (x, y[0])

    def grads(fn, x, y):
        return jax.grad(lambda a, b: jnp.sum(fn(a, b)), (0, 1))(x, y)

    def run():
        vals, grad_pairs = {}, {}
        for label, (x, y) in cases.items():
            theirs = optax.losses.safe_softmax_cross_entropy(x, y)
            vals[label] = (jaxent.safe_softmax_cross_entropy(x, y), theirs)
            vals[label + " softmax_cross_entropy"] = (
                jaxent.softmax_cross_entropy(x, jnp.broadcast_to(y, x.shape)),
                theirs,
            )
            grad_pairs[label] = (
                grads(jaxent.safe_softmax_cross_entropy, x, y),
                grads(optax.losses.safe_softmax_cross_entropy, x, y),
            )
        return vals, grad_pairs

    vals, grad_pairs = jax.jit(run)()
    _check_all(vals)
    for label, (ours, theirs) in grad_pairs.items():
        for g, t in zip(ours, theirs, strict=True):
            # optax's label gradient is +inf at a zero label on a -inf logit;
            # jaxent's is 0 there (0 log 0 = 0). Equal everywhere else.
            finite = np.isfinite(t)
            assert finite.mean() > 0.6
            _check(label, np.where(finite, g, 0), np.where(finite, t, 0), kind="grad")


FOCAL_LOGITS = np.array(
    [-600.0, -40.0, -7.0, -1.5, -0.2, 0.0, 0.3, 2.0, 9.0, 45.0, 600.0]
)


def test_focal_matches_optax():
    """Every gamma regime (0, below 1, 1, above 2) and alpha, binary and
    continuous labels, logits of every magnitude (optax is finite for finite
    logits); labels broadcast to the logits; integer labels cast."""
    x = np.repeat(FOCAL_LOGITS[None], 4, axis=0)
    y = np.stack(
        [np.zeros_like(FOCAL_LOGITS), np.ones_like(FOCAL_LOGITS)]
        + [_rng(s).uniform(size=FOCAL_LOGITS.shape) for s in (0, 1)]
    )

    def run():
        out = {}
        for gamma in (0.0, 0.25, 1.0, 2.0, 3.5):
            for alpha in (None, 0.25, 0.9):
                kw = {"gamma": gamma, "alpha": alpha}
                out[f"{kw}"] = (
                    jaxent.sigmoid_focal_loss(x, y, **kw),
                    _optax(FOCAL)(x, y, **kw),
                )
        out["broadcast labels"] = (
            jaxent.sigmoid_focal_loss(x, y[1]),
            _optax(FOCAL)(x, y[1]),
        )
        out["integer labels"] = (
            jaxent.sigmoid_focal_loss(x[:2], y[:2].astype(np.int32)),
            _optax(FOCAL)(x[:2], y[:2]),
        )
        return out

    out = jax.jit(run)()
    for _, theirs in out.values():
        assert np.isfinite(theirs).all()
    _check_all(out)


def test_generalized_kl_matches_optax():
    """Every axis layout, zero targets, masks (with -inf or NaN predictions where
    excluded), the alias; a zero target under a -inf prediction adds 0 (optax:
    NaN) and keeps the gradients finite."""
    rng = _rng(3)
    cases = {}
    for shape, axis in AXIS_CASES:
        lp, t = _inputs(GKL, shape)
        t = np.where(rng.uniform(size=shape) < 0.2, 0.0, t)
        mask = rng.uniform(size=shape) < 0.7
        cases[f"{shape} axis={axis}"] = (lp, t, axis, mask)

    def grads(lp, t, axis):
        return jax.grad(
            lambda a, b: jnp.sum(jaxent.generalized_kl_divergence(a, b, axis)), (0, 1)
        )(lp, t)

    def run():
        out, finite = {}, []
        for label, (lp, t, axis, mask) in cases.items():
            for name in (GKL, "convex_kl_divergence"):
                ours = getattr(jaxent, name)
                out[f"{label} {name}"] = (ours(lp, t, axis), _optax(name)(lp, t, axis))
                out[f"{label} {name} where"] = (
                    ours(lp, t, axis, mask),
                    _optax(name)(lp, t, axis, mask),
                )
            theirs = _optax(GKL)(np.where(mask, lp, -INF), t, axis, mask)
            for fill in (-INF, np.nan):
                masked = np.where(mask, lp, fill)
                out[f"{label} {fill} where excluded"] = (
                    jaxent.generalized_kl_divergence(masked, t, axis, mask),
                    theirs,
                )
            lpi = np.where(t == 0, -INF, lp)
            gap = np.sum(np.where(t == 0, np.exp(lp), 0.0), axis=axis)
            out[f"{label} -inf under zero targets"] = (
                jaxent.generalized_kl_divergence(lpi, t, axis),
                _optax(GKL)(lp, t, axis) - gap,
            )
            finite.append(grads(lpi, t, axis))
        return out, finite

    out, finite = jax.jit(run)()
    for _, theirs in out.values():
        assert np.isfinite(theirs).all()
    _check_all(out)
    assert all(np.isfinite(g).all() for pair in finite for g in pair)


# -- the NumPy oracle: values and closed-form gradients --------------------------

K, ROWS, CLASSES = 2, 4, 5
NONE, SUM, MEAN = ({"reduction": r} for r in ("none", "sum", "mean"))
ORACLE_CASES = {  # (options, where): every reduction for each function
    SAFE: [
        (NONE, None),
        ({"label_smoothing": 0.1, "z_loss": 0.01, **MEAN}, "rows"),
        (SUM, "class"),
    ],
    POLY: [
        (NONE, None),
        ({"epsilon": -1.0, **MEAN}, "class"),
        ({"epsilon": 0.5, **SUM}, "rows"),
    ],
    FOCAL: [
        (NONE, None),
        ({"gamma": 0.5, "alpha": 0.25, **MEAN}, None),
        ({"gamma": 0.0, "alpha": 0.75, **SUM}, None),
        ({"gamma": 1.0, **NONE}, None),
    ],
    GKL: [(NONE, None), (MEAN, "class"), (SUM, "class")],
    "convex_kl_divergence": [(MEAN, "class")],
}


def _oracle_rows(name, where, seed):
    """The oracle's rows layout ``[K, R, C]`` (one class for the elementwise
    focal loss) and jaxent's per-case ``where``."""
    rng = _rng(seed)
    shape = (K, ROWS, 1 if name == FOCAL else CLASSES)
    first, second = _inputs(name, shape, seed=seed)
    names = list(inspect.signature(getattr(jaxent, name)).parameters)[:2]
    rows = {names[0]: first, names[1]: second}
    native_where = None
    if where == "class":
        mask = rng.uniform(size=shape) < 0.7
        mask[..., 0] = True
        mask[:, 1] = False  # a row with no admissible class
        rows["where"] = native_where = mask
    elif where == "rows":
        keep = rng.uniform(size=shape[:2]) < 0.6
        keep[:, 0] = True
        rows["where"] = np.broadcast_to(keep[..., None], shape)
        native_where = keep
    return rows, names, native_where


@pytest.mark.parametrize("name", NAMES)
def test_values_and_gradients_match_oracle(name):
    """``jaxent.X`` and ``jaxent.reference.X`` (value and VJP) against the
    closed forms of ``tests/oracle.py``."""
    problems = []
    for i, (o, where) in enumerate(ORACLE_CASES[name]):
        rows, names, mask = _oracle_rows(name, where, seed=i)
        kw = dict(o) if mask is None else dict(o, where=mask[0])
        out = jax.eval_shape(
            lambda a, b, kw=kw: getattr(jaxent, name)(a, b, **kw),
            rows[names[0]][0],
            rows[names[1]][0],
        )
        g = _rng(10 + i).normal(size=(K, *out.shape))
        problems.append((rows, names, mask, o, g))

    def run():
        results = []
        for rows, names, mask, o, g in problems:
            per_fn = []
            for fn in (getattr(jaxent, name), getattr(reference, name)):

                def one(a, b, w, g, fn=fn, o=o):
                    kw = dict(o) if w is None else dict(o, where=w)
                    out, vjp = jax.vjp(lambda a, b: fn(a, b, **kw), a, b)
                    return out, vjp(g)

                per_fn.append(
                    jax.vmap(one)(rows[names[0]], rows[names[1]], mask, jnp.asarray(g))
                )
            results.append(per_fn)
        return results

    results = jax.jit(run)()
    for (rows, names, _, o, g), per_fn in zip(problems, results, strict=True):
        with np.errstate(all="ignore"):
            value, want = ORACLES[name](np, rows, o, g)
        for which, (out, grads) in zip(("jaxent", "reference"), per_fn, strict=True):
            label = f"{which}.{name} {o}"
            _check(label, out, np.reshape(value, out.shape))
            for n, d in zip(names, grads, strict=True):
                _check(f"{label} d/d{n}", d, np.reshape(want[n], d.shape), kind="grad")


# Finite differences to second order and jax.grad of the reference, with these
# functions' options mixed, are in tests/test_properties.py (the gradient
# check); forward mode of the reference and HVPs of every option are in
# tests/test_registry.py. The gradients w.r.t. the coefficients are below.


def test_jit_and_vmap():
    """vmap over a stack of problems equals a loop of the jitted function."""
    batch = {
        name: [
            tuple(jnp.asarray(a) for a in _inputs(name, (3, 4), seed=s))
            for s in range(3)
        ]
        for name in FAMILY
    }

    def g(name):
        f = getattr(jaxent, name)
        return jax.value_and_grad(
            lambda a, b: jnp.sum(f(a, b, reduction="mean")), (0, 1)
        )

    def single(problems):
        return {name: g(name)(*args) for name, args in problems.items()}

    stacked = {
        name: tuple(jnp.stack(v) for v in zip(*cases, strict=True))
        for name, cases in batch.items()
    }
    vmapped = jax.jit(jax.vmap(single))(stacked)
    jitted = jax.jit(single)
    for k in range(3):
        looped = jitted({name: cases[k] for name, cases in batch.items()})
        for name in FAMILY:
            (v, grads), (vv, vgrads) = looped[name], vmapped[name]
            _check(f"{name} vmap", vv[k], v)
            for a, b in zip(vgrads, grads, strict=True):
                _check(f"{name} vmap grad", a[k], b, kind="grad")


def test_axis_name_inside_shard_map():
    """``axis_name`` (vocab-parallel) runs the psum/pmax paths, here on a mesh of
    the devices at hand; the reference twin is differentiable there too."""
    from jax.sharding import AxisType
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("v",), axis_types=(AxisType.Auto,))
    x, y = (jnp.asarray(a) for a in _inputs(POLY, (3, 6)))
    mask = jnp.asarray(_rng(8).uniform(size=(3, 6)) < 0.7)

    def run(x, y, mask):
        out = {}
        for mod in (jaxent, reference):
            for name in (POLY, SAFE):
                fn = getattr(mod, name)

                def per_shard(a, b, w, fn=fn):
                    return jnp.sum(fn(a, b, where=w, axis_name="v"))

                sharded = jax.shard_map(
                    per_shard, mesh=mesh, in_specs=(P(None, "v"),) * 3, out_specs=P()
                )
                out[mod.__name__, name] = (
                    jax.value_and_grad(sharded, (0, 1))(x, y, mask),
                    jax.value_and_grad(
                        lambda a, b, fn=fn: jnp.sum(fn(a, b, where=mask)), (0, 1)
                    )(x, y),
                )
        return out

    for label, ((v, g), (v1, g1)) in jax.jit(run)(x, y, mask).items():
        _check(f"{label}", v, v1)
        for a, b in zip(g, g1, strict=True):
            _check(f"{label} grad", a, b, kind="grad")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision(dtype):
    """Results and gradients in the input dtype; half precision is the float32
    computation on the same values rounded once (equal to within one unit in
    the last place); float32 is within its tolerance of float64."""
    wide = "float64" if dtype == "float32" else "float32"
    problems = {
        name: tuple(jnp.asarray(a, dtype) for a in _inputs(name, (3, 6)))
        for name in FAMILY
    }

    def run():
        out = {}
        for name, args in problems.items():
            for reduction in ("none", "mean"):
                fn = getattr(jaxent, name)
                for tag, a in (
                    ("narrow", args),
                    ("wide", [v.astype(wide) for v in args]),
                ):
                    value, vjp = jax.vjp(
                        lambda x, y, r=reduction, fn=fn: fn(x, y, reduction=r), *a
                    )
                    out[name, reduction, tag] = (value, vjp(jnp.ones_like(value)))
        return out

    out = jax.jit(run)()
    eps = float(jnp.finfo(dtype).eps)
    for (name, reduction, tag), (value, grads) in out.items():
        if tag == "wide":
            continue
        wide_value, wide_grads = out[name, reduction, "wide"]
        assert value.dtype == jnp.dtype(dtype)
        assert all(g.dtype == jnp.dtype(dtype) for g in grads)
        for a, b in ((value, wide_value), *zip(grads, wide_grads, strict=True)):
            label = f"{name} {reduction} {dtype}"
            if dtype == "float32":
                _check(label, a, b, dtype="float32", kind="grad")
            else:
                np.testing.assert_allclose(
                    np.asarray(a, np.float32),
                    np.asarray(b.astype(dtype), np.float32),
                    rtol=eps,
                    atol=0,
                    err_msg=label,
                )


def test_reductions():
    """``sum`` and ``mean`` of the per-example values; with ``where`` the mean
    counts the included examples, and a mean over none is 0 with zero
    gradient."""
    args = {name: _inputs(name, (4, 5)) for name in NAMES}
    mask = np.zeros((4, 5), bool)
    mask[[0, 2]] = True

    def run():
        out = {}
        for name, (a, b) in args.items():
            f = getattr(jaxent, name)
            out[name] = [f(a, b), f(a, b, reduction="sum"), f(a, b, reduction="mean")]
            if "where" in inspect.signature(f).parameters:
                none = mask & False
                out[name] += [
                    f(a, b, where=mask),
                    f(a, b, where=mask, reduction="mean"),
                    f(a, b, where=none, reduction="mean"),
                    jax.grad(
                        lambda x, f=f, b=b, w=none: f(x, b, where=w, reduction="mean")
                    )(a),
                ]
        return out

    for name, vals in jax.jit(run)().items():
        none = vals[0]
        assert none.shape == ((4, 5) if name == FOCAL else (4,))
        _check(f"{name} sum", vals[1], np.sum(none))
        _check(f"{name} mean", vals[2], np.mean(none))
        if len(vals) > 3:
            np.testing.assert_array_equal(np.asarray(vals[3])[[1, 3]], 0.0)
            _check(f"{name} masked mean", vals[4], (none[0] + none[2]) / 2)
            assert vals[5] == 0
            np.testing.assert_array_equal(vals[6], 0.0)


# -- bad inputs: the same error from jaxent.X and jaxent.reference.X --------------

TRACED = "traced"  # passed as a traced scalar


def _bad_cases():
    x, y = _inputs(POLY, (3, 4))
    xi, yi = x.astype(np.int32), y.astype(np.int32)
    common = [
        ((xi, y), {}, TypeError, None),
        ((x, y[:2]), {}, ValueError, 1),
        ((x, y), {"reduction": "avg"}, ValueError, "reduction"),
    ]
    cases = {
        SAFE: [
            ((x, yi), {}, TypeError, 1),
            ((x, y), {"where": np.ones((3, 4), np.int32)}, TypeError, "where"),
            ((x, y), {"label_smoothing": 2.0}, ValueError, "label_smoothing"),
        ],
        POLY: [
            ((x, yi), {}, TypeError, 1),
            ((x, y[:, :3]), {}, ValueError, 1),
            ((x, y), {"axis": 2}, ValueError, "axis"),
            ((x, y), {"axis": 1.5}, TypeError, "axis"),
            ((x, y), {"where": np.ones((2,), bool)}, ValueError, "where"),
            ((x, y), {"epsilon": np.inf}, ValueError, "epsilon"),
            ((x, y), {"epsilon": np.array([1.0, np.nan, 0.0])}, ValueError, "epsilon"),
            ((x, y), {"epsilon": np.ones(4)}, ValueError, "epsilon"),
        ],
        FOCAL: [
            ((x[0], y), {}, ValueError, 1),
            ((x, y), {"alpha": 1.5}, ValueError, "alpha"),
            ((x, y), {"alpha": np.array([0.5, 0.2, -0.1, 1.0])}, ValueError, "alpha"),
            ((x, y), {"alpha": np.full((2, 4), 0.5)}, ValueError, "alpha"),
            ((x, y), {"gamma": -1.0}, ValueError, "gamma"),
            ((x, y), {"gamma": np.nan}, ValueError, "gamma"),
            ((x, y), {"gamma": np.array([[2.0], [-1.0], [0.0]])}, ValueError, "gamma"),
        ],
        GKL: [
            ((x, yi), {}, TypeError, 1),
            ((x, y), {"axis": -3}, ValueError, "axis"),
            ((x, y), {"where": np.ones((5,), bool)}, ValueError, "where"),
        ],
    }
    cases["convex_kl_divergence"] = cases[GKL]
    for name, items in cases.items():
        params = list(inspect.signature(getattr(jaxent, name)).parameters)
        for i, (args, kw, error, what) in enumerate(common + items):
            arg = params[what or 0] if not isinstance(what, str) else what
            yield pytest.param(name, args, kw, error, arg, id=f"{name}-{i}")


@pytest.mark.parametrize(("name", "args", "kw", "error", "arg"), list(_bad_cases()))
def test_bad_inputs_raise_the_same_error_at_trace_time(name, args, kw, error, arg):
    traced = [k for k, v in kw.items() if isinstance(v, str) and v == TRACED]
    static = {k: v for k, v in kw.items() if k not in traced}
    messages = []
    for fn in (getattr(jaxent, name), getattr(reference, name)):

        def call(a, b, *t, fn=fn):
            return fn(a, b, **static, **dict(zip(traced, t, strict=True)))

        with pytest.raises(error) as info:
            jax.jit(call).trace(*args, *(0.5 for _ in traced))
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith(f"{name}: `{arg}`"), messages[0]


# -- optax's signatures and positional calls --------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_signature_in_optax_shape(name):
    """optax's parameters in its order, of its kinds and with its defaults;
    jaxent's own options keyword-only after them; the twin's is the same."""
    ours = inspect.signature(getattr(jaxent, name)).parameters
    theirs = inspect.signature(inspect.unwrap(getattr(optax.losses, name))).parameters
    assert list(ours)[: len(theirs)] == list(theirs)
    for p in theirs.values():
        assert ours[p.name].kind == p.kind, p.name
        assert ours[p.name].default == p.default, p.name
    for q in list(ours.values())[len(theirs) :]:
        assert q.kind == q.KEYWORD_ONLY, q.name
    twin = inspect.signature(getattr(reference, name))
    assert twin == inspect.signature(getattr(jaxent, name))


def test_optax_positional_calls():
    lp, t = _inputs(GKL, (3, 4, 5))
    mask = _rng(6).uniform(size=(3, 4, 5)) < 0.8
    x, y = _inputs(POLY, (3, 5))
    xs, ys = _inputs(FOCAL, (3, 5))

    def run():
        out = {}
        for name in (GKL, "convex_kl_divergence"):
            f, g = getattr(jaxent, name), _optax(name)
            out[f"{name}(lp, t, 1)"] = (f(lp, t, 1), g(lp, t, 1))
            out[f"{name}(lp, t, (0, 2), where)"] = (
                f(lp, t, (0, 2), mask),
                g(lp, t, (0, 2), mask),
            )
        out["poly(x, y)"] = (jaxent.poly_loss_cross_entropy(x, y), _optax(POLY)(x, y))
        out["safe(x, y)"] = (
            jaxent.safe_softmax_cross_entropy(x, y),
            _optax(SAFE)(x, y),
        )
        out["focal(x, y)"] = (jaxent.sigmoid_focal_loss(xs, ys), _optax(FOCAL)(xs, ys))
        return out

    _check_all(jax.jit(run)())
    # Keyword-only in optax, keyword-only here.
    for fn, extra in (
        (jaxent.poly_loss_cross_entropy, 2.0),
        (jaxent.sigmoid_focal_loss, 0.25),
        (jaxent.safe_softmax_cross_entropy, -1),
    ):
        with pytest.raises(TypeError):
            fn(x, y, extra)


# -- documented edge behaviour -----------------------------------------------------


def test_focal_infinite_logits():
    """x = -inf with y = 0 (or +inf with y = 1) is 0 with zero gradients (optax:
    NaN); an infinite logit against a label gives +inf."""
    x = jnp.array([-INF, INF, -INF, INF, 0.0])
    y = jnp.array([0.0, 1.0, 0.5, 0.0, 1.0])

    def run():
        out = []
        for gamma in (0.0, 0.5, 2.0):
            for f in (jaxent.sigmoid_focal_loss, reference.sigmoid_focal_loss):
                out.append(f(x, y, gamma=gamma, alpha=0.25))
            v, vjp = jax.vjp(
                lambda a, b, g=gamma: jaxent.sigmoid_focal_loss(a, b, gamma=g), x, y
            )
            out.append(vjp(jnp.ones_like(v)))
        return out

    out = jax.jit(run)()
    for i in range(3):
        for v in out[3 * i : 3 * i + 2]:
            np.testing.assert_array_equal(v[:4], [0.0, 0.0, INF, INF])
        dx, dy = out[3 * i + 2]
        np.testing.assert_array_equal(dx[:2], 0.0)
        np.testing.assert_array_equal(dy[:2], 0.0)
        assert np.isfinite(dx).all()


def test_focal_label_gradient_at_binary_labels():
    """At labels exactly 0 or 1 the label gradient is the one-sided derivative
    (autodiff of optax's ``logsumexp(..., b=[1 - y, y])`` loses a term there)."""
    x = jnp.array([0.7, -1.3, 0.7, 2.0])
    y = jnp.array([0.0, 0.0, 1.0, 1.0])
    inward = 1 - 2 * y
    h = 1e-5

    def run():
        out = []
        for gamma in (0.5, 2.0):

            def f(b, mod, g=gamma):
                return mod.sigmoid_focal_loss(x, b, gamma=g)

            # Second-order one-sided differences, into [0, 1].
            steps = [f(y + k * h * inward, jaxent) for k in range(3)]
            one_sided = (4 * steps[1] - 3 * steps[0] - steps[2]) / (2 * h) * inward
            grad = jax.grad(lambda b: jnp.sum(f(b, jaxent)))(y)
            grad_ref = jax.grad(lambda b: jnp.sum(f(b, reference)))(y)
            theirs = jax.grad(lambda b, g=gamma: jnp.sum(_optax(FOCAL)(x, b, gamma=g)))(
                y
            )
            out.append((grad, grad_ref, one_sided, theirs))
        return out

    for grad, grad_ref, one_sided, theirs in jax.jit(run)():
        _check("reference", grad, grad_ref, kind="grad")
        _check("one-sided difference", grad, one_sided, kind="grad", scale=1e3)
        assert not np.allclose(theirs, grad)


def test_generalized_kl_is_kl_plus_mass_gap():
    lp, t = _inputs(GKL, (4, 6))
    q, p = _probs(_rng(4), (4, 6)), _probs(_rng(5), (4, 6))

    def run():
        gap = jnp.sum(jnp.exp(lp) - t, axis=-1)
        return {
            "unnormalized": (
                jaxent.generalized_kl_divergence(lp, t),
                jaxent.kl_divergence(lp, t) + gap,
            ),
            "normalized": (
                jaxent.generalized_kl_divergence(np.log(q), p),
                jaxent.kl_divergence(np.log(q), p),
            ),
            "alias": (
                jaxent.convex_kl_divergence(lp, t),
                jaxent.generalized_kl_divergence(lp, t),
            ),
        }

    _check_all(jax.jit(run)())


def test_convex_kl_divergence_is_a_registered_alias():
    d, base = REGISTRY["convex_kl_divergence"], REGISTRY[GKL]
    assert d.public is jaxent.convex_kl_divergence
    assert d.reference is reference.convex_kl_divergence
    assert (d.inputs, d.where) == (base.inputs, base.where)
    assert d.parameters == base.parameters
    assert f":func:`jaxent.{GKL}`" in jaxent.convex_kl_divergence.__doc__
    assert "convex_kl_divergence" in jaxent.__all__
    assert "convex_kl_divergence" in reference.__all__


# -- array-like epsilon, alpha and gamma (optax takes them traced) ----------------


def _coefficient_cases():
    """``(name, shape, fixed keywords, {coefficient: value})`` with scalars and
    arrays broadcastable to the per-example (poly) or elementwise (focal) shape;
    binary labels too for focal (where ``w BCE`` has zeros and ``log u`` is
    large)."""
    rng = _rng(7)
    return [
        (POLY, (3, 5), {}, {"epsilon": np.float64(1.5)}),
        (POLY, (3, 5), {}, {"epsilon": rng.normal(size=(3,))}),
        (POLY, (3, 4, 2), {"axis": 1}, {"epsilon": rng.normal(size=(3, 1))}),
        (FOCAL, (3, 4), {}, {"alpha": np.float64(0.3), "gamma": np.float64(1.5)}),
        (
            FOCAL,
            (3, 4),
            {},
            {"alpha": rng.uniform(size=(4,)), "gamma": np.float64(0.0)},
        ),
        (FOCAL, (3, 4), {}, {"gamma": rng.uniform(0.0, 3.0, (3, 1))}),
        (
            FOCAL,
            (3, 4),
            {"binary": True},
            {"alpha": np.float64(0.7), "gamma": 0.5 + rng.uniform(size=(3, 4))},
        ),
    ]


def _coefficient_inputs(name, shape, kw):
    x, y = _inputs(name, shape, kw.get("axis", -1))
    if kw.get("binary"):
        y = np.round(y)
    return x, y, {k: v for k, v in kw.items() if k != "binary"}


@pytest.mark.parametrize("case", range(7))
def test_traced_coefficients_match_optax(case):
    """epsilon/alpha/gamma passed through ``jax.jit`` (traced): optax's values,
    from the public function and the twin alike."""
    name, shape, kw, coefs = _coefficient_cases()[case]
    x, y, kw = _coefficient_inputs(name, shape, kw)

    def run(c):
        return {
            f"{mod.__name__}": (
                getattr(mod, name)(x, y, **kw, **c),
                _optax(name)(x, y, **kw, **c),
            )
            for mod in (jaxent, reference)
        }

    _check_all(jax.jit(run)({k: jnp.asarray(v) for k, v in coefs.items()}))


@pytest.mark.parametrize("case", range(7))
def test_coefficient_gradients_match_reference_and_finite_differences(case):
    """Gradients w.r.t. epsilon/alpha/gamma (float64, summed to their shapes)
    equal ``jax.grad`` of the reference and finite differences."""
    name, shape, kw, coefs = _coefficient_cases()[case]
    x, y, kw = _coefficient_inputs(name, shape, kw)
    keys = tuple(coefs)

    def scalar(mod):
        def f(*c):
            out = getattr(mod, name)(x, y, **kw, **dict(zip(keys, c, strict=True)))
            return jnp.sum(jnp.sin(out) + out)

        return f

    args = tuple(jnp.asarray(v, jnp.float64) for v in coefs.values())
    f, f_ref = scalar(jaxent), scalar(reference)
    argnums = tuple(range(len(args)))

    def run(*c):
        return [jax.grad(fn, argnums)(*c) for fn in (f, f_ref)]

    grads, grads_ref = jax.jit(run)(*args)
    for k, a, b, v in zip(keys, grads, grads_ref, args, strict=True):
        assert a.shape == v.shape and a.dtype == jnp.float64, k
        _check(f"d/d{k}", a, b, kind="grad")
    check_grads(jax.jit(f), args, order=1, modes=["rev"])


def test_focal_gamma_gradient_at_saturated_logits():
    """``d/d gamma`` is 0 where ``w BCE`` is 0 (an infinite logit on its own
    label, ``u = 0``) and finite where ``u`` underflows, for traced gamma."""
    x = jnp.array([-jnp.inf, jnp.inf, -200.0, 200.0, 1.0])
    y = jnp.array([0.0, 1.0, 0.0, 1.0, 1.0])

    def f(gamma, alpha):
        return jnp.sum(jaxent.sigmoid_focal_loss(x, y, gamma=gamma, alpha=alpha))

    for gamma in (0.0, 0.5, 2.0):
        v, (dg, da) = jax.value_and_grad(f, (0, 1))(
            jnp.float64(gamma), jnp.float64(0.25)
        )
        assert np.isfinite(v) and np.isfinite(dg) and np.isfinite(da), gamma
        fixed = jaxent.sigmoid_focal_loss(x, y, gamma=gamma, alpha=0.25)
        _check(f"value gamma={gamma}", v, jnp.sum(fixed))


def _vjp_operands(f, *args) -> int:
    """How many arrays the loss's custom_vjp takes (inside its jitted call)."""

    def find(jaxpr):
        for e in jaxpr.eqns:
            if "custom_vjp" in str(e.primitive):
                yield e
            elif "jaxpr" in e.params:
                yield from find(getattr(e.params["jaxpr"], "jaxpr", e.params["jaxpr"]))

    eqns = list(find(jax.make_jaxpr(f)(*args).jaxpr))
    assert len(eqns) == 1, eqns
    return len(eqns[0].invars)


def test_static_coefficients_are_compiled_in():
    """A Python number stays out of the rule's operands (a constant of the
    compiled program, gamma = 0 and alpha = None skipping their terms); an
    array is one operand more each."""
    x, y = _inputs(FOCAL, (3, 4))
    g = jnp.float64(0.5)
    focal = jaxent.sigmoid_focal_loss
    assert _vjp_operands(lambda a: focal(a, y, gamma=0.0), x) == 2
    assert _vjp_operands(lambda a: focal(a, y, gamma=0.0, alpha=0.25), x) == 2
    assert _vjp_operands(lambda a, g: focal(a, y, gamma=g), x, g) == 3
    assert _vjp_operands(lambda a, g: focal(a, y, gamma=g, alpha=g), x, g) == 4
    xp, yp = _inputs(POLY, (3, 5))
    poly = jaxent.poly_loss_cross_entropy
    assert _vjp_operands(lambda a: poly(a, yp, epsilon=2.0), xp) == 2
    assert _vjp_operands(lambda a, e: poly(a, yp, epsilon=e), xp, g) == 3


def test_convex_kl_divergence_warns_as_optax():
    lp, t = _inputs(GKL, (3, 4))
    for mod in (jaxent, reference):
        with pytest.warns(DeprecationWarning, match="use generalized_kl_divergence"):
            out = mod.convex_kl_divergence(lp, t)
        _check(mod.__name__, out, mod.generalized_kl_divergence(lp, t))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jaxent.generalized_kl_divergence(lp, t)

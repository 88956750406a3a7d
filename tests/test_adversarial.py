"""Adversarial corpus: inputs chosen to break a loss. Every case asserts finite
values and gradients where the mathematics gives a finite number, and otherwise
the documented non-finite result (NaN for NaN/+inf logits and out-of-range labels,
+inf for a target on an excluded class), exactly.

Expected finite values are closed forms or SciPy in float64, compared with the
tolerance table of ``tests/helpers.py``; every check is recorded for
``benchmarks/robustness_report.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

import jaxent
from tests.helpers import error_units, record

pytestmark = pytest.mark.slow

INF, NAN = np.inf, np.nan
INT_CE = jaxent.softmax_cross_entropy_with_integer_labels
SOFT_CE = jaxent.softmax_cross_entropy
LINEAR_CE = jaxent.linear_softmax_cross_entropy


def vjp_all(f, *args):
    """Value of ``f`` and its gradients w.r.t. every argument (cotangent 1)."""
    out, vjp = jax.vjp(f, *args)
    return out, vjp(jnp.ones_like(out))


def f64(a):
    return np.asarray(a).astype(np.float64)


def evaluate(cases, grads=True):
    """``{name: (value, gradients)}`` of ``{name: (f, args)}`` (cotangent 1; no
    gradients unless ``grads``), all computed in one compiled program: one
    compilation per test rather than one per primitive, which is what dominates
    this suite's time."""
    fns = {name: f for name, (f, _) in cases.items()}

    def run(f, *a):
        return vjp_all(f, *a) if grads else (f(*a), ())

    program = jax.jit(lambda args: {k: run(fns[k], *a) for k, a in args.items()})
    out = program({name: tuple(args) for name, (_, args) in cases.items()})
    return jax.tree.map(np.asarray, out)


def check(case, function, actual, expected, kind="value", dtype=None):
    """``actual`` equals the documented ``expected``: non-finite entries exactly,
    finite ones within the tolerance of ``dtype`` (default: ``actual``'s)."""
    dtype = jnp.dtype(dtype or np.asarray(actual).dtype)
    expected = np.broadcast_to(np.asarray(expected, np.float64), np.shape(actual))
    units, unexpected, mismatched = error_units(actual, expected, dtype, kind)
    record(
        "adversarial",
        case=case,
        function=function,
        dtype=dtype.name,
        kind=kind,
        max_units=float(units.max(initial=0.0)),
        unexpected_nonfinite=int(unexpected.sum()),
        mismatched_nonfinite=int(mismatched.sum()),
    )
    where = f"{case}: {function} {kind} ({dtype.name})"
    assert not unexpected.any(), f"{where}: non-finite where finite expected\n{actual}"
    assert not mismatched.any(), f"{where}: wrong non-finite value\n{actual}"
    assert units.max(initial=0.0) <= 1, f"{where}: {units.max():.3g} x tolerance"


def check_finite(case, function, *arrays):
    """Every entry finite (for values without a closed form here)."""
    for a in arrays:
        bad = ~np.isfinite(f64(a))
        record(
            "adversarial",
            case=case,
            function=function,
            dtype=np.asarray(a).dtype.name,
            kind="finite",
            max_units=0.0,
            unexpected_nonfinite=int(bad.sum()),
            mismatched_nonfinite=0,
        )
        assert not bad.any(), f"{case}: {function}: non-finite entries\n{a}"


def log_softmax64(x, axis=-1):
    """SciPy's log-softmax in float64; a row of all -inf gives -inf everywhere
    (jaxent's convention: its normalizer is taken as 0)."""
    x = f64(x)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = scipy.special.log_softmax(x, axis=axis)
    return np.where(np.all(x == -INF, axis=axis, keepdims=True), -INF, out)


def soft_ce64(x, y):
    """``sum(y) lse - <y, x>`` per row, with 0 * inf = 0."""
    logp = log_softmax64(x)
    with np.errstate(invalid="ignore"):
        return -np.sum(np.where(f64(y) == 0, 0.0, f64(y) * logp), axis=-1)


def kl64(logq, logp):
    """KL(q || p) per row from float64 log-probabilities, with 0 log 0 = 0."""
    q = np.exp(logq)
    with np.errstate(invalid="ignore"):
        return np.sum(np.where(q == 0, 0.0, q * (logq - logp)), axis=-1)


def entropy64(logp):
    p = np.exp(logp)
    with np.errstate(invalid="ignore"):
        return -np.sum(np.where(p == 0, 0.0, p * logp), axis=-1)


# -- masked vocabularies: -inf logits under zero labels -----------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_masked_vocabulary_slices(dtype):
    """Classes 5..7 are -inf for every row (a padded vocabulary) and row 3 keeps
    a single class: values and gradients are finite, gradients exactly 0 on the
    masked slice, and the one-class row has loss 0."""
    case = "-inf vocabulary slice"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 8)) * 2
    x[:, 5:] = -INF
    x[3, 1:] = -INF
    x = jnp.asarray(x, dtype)
    labels = jnp.array([0, 2, 4, 0])
    y = rng.uniform(size=(4, 8)) * (np.arange(8) < 5)
    y[3] = np.eye(8)[0]
    y = jnp.asarray(y / y.sum(-1, keepdims=True), dtype)
    t = jnp.where(jnp.isinf(x), -jnp.inf, jnp.asarray(rng.normal(size=(4, 8)), dtype))
    w = jnp.asarray(rng.uniform(0.5, 2.0, 8), dtype)
    masked = np.isinf(f64(x))
    logp, logq = log_softmax64(x), log_softmax64(t)

    cases = {
        "softmax_cross_entropy": (lambda x, y: SOFT_CE(x, y), (x, y), soft_ce64(x, y)),
        "softmax_cross_entropy_with_integer_labels": (
            lambda x, w: INT_CE(x, labels, weights=w, z_loss=1e-3),
            (x, w),
            None,
        ),
        "softmax_entropy": (jaxent.softmax_entropy, (x,), entropy64(logp)),
        "softmax_kl_divergence": (
            jaxent.softmax_kl_divergence,
            (x, t),
            kl64(logq, logp),
        ),
        "softmax": (jaxent.softmax, (x,), np.exp(logp)),
        "log_softmax": (jaxent.log_softmax, (x,), logp),
    }
    cases["single-class row"] = (
        lambda x, w: INT_CE(x, labels, weights=w),
        (x, w),
        None,
    )
    cases["softmax_cross_entropy_with_integer_labels (smoothing over -inf)"] = (
        lambda x: INT_CE(x, labels, label_smoothing=0.1),
        (x,),
        None,
    )
    cases["softmax_cross_entropy_with_integer_labels (smoothing under where)"] = (
        lambda x: INT_CE(x, labels, where=~masked, label_smoothing=0.1),
        (jnp.where(masked, 0, x),),
        None,
    )
    results = evaluate({name: (f, args) for name, (f, args, _) in cases.items()})
    # The single-class row: loss exactly 0 and no gradient.
    value, (gx, _) = results.pop("single-class row")
    assert f64(value)[3] == 0 and np.all(f64(gx)[3] == 0)
    # Label smoothing puts mass on every class, so on the -inf ones: the
    # documented +inf (as in PyTorch). A `where` mask is the finite way.
    check(
        case,
        "softmax_cross_entropy_with_integer_labels (smoothing over -inf)",
        results.pop("softmax_cross_entropy_with_integer_labels (smoothing over -inf)")[
            0
        ],
        INF,
    )
    value, grads = results.pop(
        "softmax_cross_entropy_with_integer_labels (smoothing under where)"
    )
    check_finite(
        case,
        "softmax_cross_entropy_with_integer_labels (smoothing under where)",
        value,
        *grads,
    )
    for name, (value, grads) in results.items():
        expected = cases[name][2]
        if expected is not None:
            check(case, name, value, expected)
        else:
            check_finite(case, name, value)
        for g in grads:
            check_finite(case, name, g)
        # d log_softmax(x)_c / dx_c = 1 at a -inf logit too (as for
        # jax.nn.log_softmax); a loss on top passes a zero cotangent there.
        at_masked = 1.0 if name == "log_softmax" else 0.0
        check(
            case,
            name,
            np.where(masked, f64(grads[0]), at_masked),
            at_masked,
            "grad",
            dtype,
        )


# -- +inf and NaN logits ---------------------------------------------------------

# name -> f(x, t, y, lab): logits x, teacher logits t, soft labels y, labels lab.
ROW_FUNCTIONS = {
    "log_softmax": lambda x, *, t, y, lab: jaxent.log_softmax(x),
    "softmax": lambda x, *, t, y, lab: jaxent.softmax(x),
    "softmax_cross_entropy": lambda x, *, t, y, lab: SOFT_CE(x, y, label_smoothing=0.1),
    "softmax_cross_entropy_with_integer_labels": lambda x, *, t, y, lab: INT_CE(
        x, lab, z_loss=1e-3
    ),
    "softmax_entropy": lambda x, *, t, y, lab: jaxent.softmax_entropy(x),
    "softmax_kl_divergence (student)": lambda x, *, t, y, lab: (
        jaxent.softmax_kl_divergence(x, t)
    ),
    "softmax_kl_divergence (teacher)": lambda x, *, t, y, lab: (
        jaxent.softmax_kl_divergence(t, x)
    ),
}


@functools.cache
def _row_results():
    """Every ROW_FUNCTIONS entry on clean logits and on logits whose row 0 holds
    a +inf and row 1 a NaN."""
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(3, 5))
    dirty = clean.copy()
    dirty[0, 2], dirty[1, 3] = INF, NAN
    t, y = rng.normal(size=(3, 5)), rng.dirichlet(np.ones(5), size=3)
    labels = jnp.array([1, 1, 1])
    cases = {}
    for name, f in ROW_FUNCTIONS.items():
        g = functools.partial(f, t=t, y=y, lab=labels)
        cases[name, "clean"] = (g, (jnp.asarray(clean),))
        cases[name, "dirty"] = (g, (jnp.asarray(dirty),))
    return evaluate(cases)


@pytest.mark.parametrize("name", sorted(ROW_FUNCTIONS))
def test_inf_and_nan_logits_give_nan_for_their_row_only(name):
    """Row 0 holds a +inf logit, row 1 a NaN: their values and gradient rows are
    NaN (documented); row 2 is unaffected, value and gradient."""
    case = "+inf/NaN logits"
    value, (gx,) = _row_results()[name, "dirty"]
    clean_value, (clean_gx,) = _row_results()[name, "clean"]
    check(case, name, value[:2], np.full(value[:2].shape, NAN))
    check(case, name, gx[:2], np.full(gx[:2].shape, NAN), "grad")
    check(case, name, value[2], f64(clean_value[2]))
    check(case, name, gx[2], f64(clean_gx[2]), "grad")


def test_inf_and_nan_logits_in_binary_cross_entropy():
    """Elementwise: NaN gives NaN; +inf/-inf give the limits (0 when the label
    agrees, +inf otherwise) with finite gradients."""
    case = "+inf/NaN logits"
    x = jnp.array([NAN, INF, INF, -INF, -INF, 0.5])
    y = jnp.array([1.0, 1.0, 0.25, 0.0, 1.0, 0.5])
    value, (gx, gy) = evaluate({"bce": (jaxent.sigmoid_binary_cross_entropy, (x, y))})[
        "bce"
    ]
    check(
        case,
        "sigmoid_binary_cross_entropy",
        value,
        [
            NAN,
            0.0,
            INF,
            0.0,
            INF,
            np.logaddexp(0, -0.5) * 0.5 + np.logaddexp(0, 0.5) * 0.5,
        ],
    )
    check(
        case,
        "sigmoid_binary_cross_entropy",
        gx[1:],
        [0.0, 0.75, 0.0, -1.0, scipy.special.expit(0.5) - 0.5],
        "grad",
    )
    # d/dy = softplus(-x) - softplus(x) = -x; an infinite partial of a term with
    # zero weight (1 - y = 0 at +inf, y = 0 at -inf) is taken as 0.
    check(
        case,
        "sigmoid_binary_cross_entropy",
        gy,
        [NAN, 0.0, -INF, 0.0, INF, -0.5],
        "grad",
    )


# -- huge logits, equal logits, large offsets ------------------------------------

HUGE = [
    ("float64", 1e4),
    ("float64", 1e30),
    ("float64", 1e38),
    ("float64", 1e300),
    ("float32", 1e4),
    ("float32", 1e30),
    ("float32", 1e38),
    ("bfloat16", 1e4),
    ("bfloat16", 1e30),
    ("bfloat16", 1e38),
    ("float16", 1e4),
    ("float16", 3e4),
    ("float16", 6e4),
]


def _huge_logits(big):
    return np.array([[big, 0.0, -big], [big, big, 0.0], [-big, -big, -big]])


def _magnitudes(dtype):
    return [big for d, big in HUGE if d == dtype]


@functools.cache
def _huge_results(dtype):
    """All functions on ``_huge_logits`` of every magnitude of ``dtype``, stacked
    by rows (every function is row-wise): one small program per dtype."""
    n = len(_magnitudes(dtype))
    labels = jnp.tile(jnp.array([0, 1, 2]), n)
    onehot = jnp.eye(3, dtype=dtype)[labels]
    fns = {
        "softmax_cross_entropy_with_integer_labels": lambda x: INT_CE(x, labels),
        "softmax_cross_entropy": lambda x: SOFT_CE(x, onehot),
        "softmax_entropy": jaxent.softmax_entropy,
        "log_softmax": jaxent.log_softmax,
        "softmax": jaxent.softmax,
        "softmax_kl_divergence": lambda x: jaxent.softmax_kl_divergence(x, x),
        "sigmoid_binary_cross_entropy": lambda x: jaxent.sigmoid_binary_cross_entropy(
            x, jnp.ones_like(x)
        ),
    }
    x = np.concatenate([_huge_logits(big) for big in _magnitudes(dtype)])
    return evaluate({name: (f, (jnp.asarray(x, dtype),)) for name, f in fns.items()})


@pytest.mark.parametrize(("dtype", "big"), HUGE)
def test_huge_logits_do_not_overflow(dtype, big):
    """Logits of magnitude up to the dtype's range: max-shifted, so the values
    are the exact limits and the gradients are finite and exact."""
    case = f"|logits| = {big:g}"
    results = _huge_results(dtype)
    b = float(np.asarray(big).astype(dtype))  # the representable magnitude
    x = _huge_logits(b)
    logp = np.array(
        [
            [0.0, -b, -2 * b],
            [-math.log(2)] * 2 + [-b - math.log(2)],
            [-math.log(3)] * 3,
        ]
    )
    p, onehot = np.exp(logp), np.eye(3)
    exact = np.array([0.0, math.log(2), math.log(3)])
    for name, expected, grad in [
        ("softmax_cross_entropy_with_integer_labels", exact, p - onehot),
        ("softmax_cross_entropy", exact, p - onehot),
        ("softmax_entropy", exact, None),
        ("log_softmax", logp, 1 - 3 * p),
        ("softmax", p, np.zeros((3, 3))),
        ("softmax_kl_divergence", np.zeros(3), np.zeros((3, 3))),
        (
            "sigmoid_binary_cross_entropy",
            np.maximum(-x, 0.0) + np.where(x == 0, math.log(2), 0.0),
            None,
        ),
    ]:
        rows = slice(
            3 * _magnitudes(dtype).index(big), 3 * _magnitudes(dtype).index(big) + 3
        )
        value, (g,) = results[name]
        value, g = value[rows], g[rows]
        check(case, name, value, expected)
        check_finite(case, name, g)
        if grad is not None:
            check(case, name, g, grad, "grad")


OFFSETS = [
    ("float64", 0.0),
    ("float64", 1e7),
    ("float64", 1e8),
    ("float32", 0.0),
    ("float32", 1e7),
    ("float32", 1e8),
    ("bfloat16", 1e7),
    ("bfloat16", 1e8),
    ("float16", 1e4),
    ("float16", 6e4),
]


def _pair_labels(x):
    """Labels 0 and C - 1 for every pair of rows."""
    return jnp.tile(jnp.array([0, x.shape[1] - 1]), x.shape[0] // 2)


EQUAL_LOGITS = {
    "softmax_cross_entropy_with_integer_labels": lambda x: INT_CE(x, _pair_labels(x)),
    "softmax_cross_entropy": lambda x: SOFT_CE(
        x, jax.nn.one_hot(_pair_labels(x), x.shape[1], dtype=x.dtype)
    ),
    "softmax_entropy": jaxent.softmax_entropy,
    "log_softmax (negated)": lambda x: -jaxent.log_softmax(x),
    "softmax_kl_divergence": lambda x: jaxent.softmax_kl_divergence(x, x),
}


EQUAL_GRAD = "softmax_cross_entropy_with_integer_labels"


def _offsets(dtype):
    return [0.0] + [o for d, o in OFFSETS if d == dtype and o != 0.0]


@functools.cache
def _equal_results(dtype):
    """EQUAL_LOGITS on pairs of rows of equal logits, one pair per offset of
    ``dtype`` (and 0), stacked: one evaluation per function and class count."""
    cases = {}
    for c in (7, 1000):
        x = np.concatenate([np.full((2, c), o) for o in _offsets(dtype)])
        for name, f in EQUAL_LOGITS.items():
            cases[name, c] = (f, (jnp.asarray(x, dtype),))
    grad_cases = {k: v for k, v in cases.items() if k[0] == EQUAL_GRAD}
    return evaluate(cases, grads=False) | evaluate(grad_cases)


@pytest.mark.parametrize("classes", [7, 1000])
@pytest.mark.parametrize(("dtype", "offset"), OFFSETS)
def test_equal_logits_at_large_offsets_give_exactly_log_c(dtype, offset, classes):
    """All-equal logits, also offset by 1e7/1e8 (float32 spacing there is 1 and
    8): the loss is exactly what it is at offset 0, log C to within one unit in
    the last place (the dtype's own log)."""
    case = f"equal logits + {offset:g}"
    results = _equal_results(dtype)
    ulp = float(np.spacing(np.asarray(math.log(classes)).astype(dtype)))
    i = _offsets(dtype).index(offset)
    for name in EQUAL_LOGITS:
        value, grads = results[name, classes]
        value, at_zero = value[2 * i : 2 * i + 2], value[:2]
        grads = [g[2 * i : 2 * i + 2] for g in grads]
        if name == "softmax_kl_divergence":
            check(case, name, value, 0.0)
            continue
        err = float(np.max(np.abs(f64(value) - math.log(classes))))
        record(
            "adversarial",
            case=case,
            function=name,
            dtype=dtype,
            kind="exact",
            max_units=err / ulp,
            unexpected_nonfinite=int((~np.isfinite(f64(value))).sum()),
            mismatched_nonfinite=0,
        )
        # The offset changes no bit, and log C is right to the last place.
        assert np.array_equal(value, at_zero), f"{case}: {name} {value} != {at_zero}"
        assert err <= ulp, f"{case}: {name} {value} vs log C = {math.log(classes)}"
        if name == EQUAL_GRAD:
            onehot = np.eye(classes)[[0, classes - 1]]
            check(case, name, grads[0], 1 / classes - onehot, "grad")


def test_bfloat16_logits_times_1000():
    """bf16 logits of magnitude ~1000 (spacing 4 to 8): values and gradients
    within bf16 tolerance of float64 on the same inputs."""
    case = "bf16 logits x 1000"
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(8, 32)) * 1000, jnp.bfloat16)
    t = jnp.asarray(rng.normal(size=(8, 32)) * 1000, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, 32, 8))
    logp, logq = log_softmax64(x), log_softmax64(t)
    onehot = np.eye(32)[labels]
    results = evaluate(
        {
            "int": (lambda x: INT_CE(x, labels), (x,)),
            "entropy": (jaxent.softmax_entropy, (x,)),
            "kl": (jaxent.softmax_kl_divergence, (x, t)),
        }
    )
    value, (g,) = results["int"]
    check(
        case,
        "softmax_cross_entropy_with_integer_labels",
        value,
        -logp[np.arange(8), labels],
    )
    check(
        case,
        "softmax_cross_entropy_with_integer_labels",
        g,
        np.exp(logp) - onehot,
        "grad",
    )
    value, (g,) = results["entropy"]
    check(case, "softmax_entropy", value, entropy64(logp))
    check_finite(case, "softmax_entropy", g)
    value, (gx, gt) = results["kl"]
    q = np.exp(logq)
    check(
        case,
        "softmax_kl_divergence",
        value,
        kl64(logq, logp),
    )
    check(case, "softmax_kl_divergence", gx, np.exp(logp) - q, "grad")
    check_finite(case, "softmax_kl_divergence", gt)


def test_bfloat16_with_128k_classes_is_not_quantized():
    """bf16 logits over 131,072 classes: the loss is the float64 value rounded
    once to bf16 (within one bf16 ulp), where a bf16 computation is many ulps
    off; the mean is reduced in float32 before its single rounding."""
    case = "bf16, 128k classes"
    rng = np.random.default_rng(3)
    c = 2**17
    x = jnp.asarray(rng.normal(size=(4, c)) * 3, jnp.bfloat16)
    labels = jnp.asarray(rng.integers(0, c, 4))
    exact = -log_softmax64(x)[np.arange(4), labels]
    results = evaluate(
        {
            "none": (lambda x: INT_CE(x, labels), (x,)),
            "mean": (lambda x: INT_CE(x, labels, reduction="mean"), (x,)),
        }
    )
    value, (g,) = results["none"]
    ulp = 2.0 ** (np.floor(np.log2(np.abs(exact))) - 7)
    err = np.abs(f64(value) - exact)
    record(
        "adversarial",
        case=case,
        function="softmax_cross_entropy_with_integer_labels",
        dtype="bfloat16",
        kind="value",
        max_units=float((err / ulp).max()),
        unexpected_nonfinite=int((~np.isfinite(f64(value))).sum()),
        mismatched_nonfinite=0,
    )
    assert np.all(err <= ulp), (err / ulp, f64(value), exact)
    # The test can tell: the same sum accumulated in bf16 (NumPy adds bf16
    # sequentially) is many ulps off.
    xb = np.asarray(x)
    m = xb.max(-1, keepdims=True)
    naive = np.log(np.sum(np.exp(xb - m), axis=-1, dtype=xb.dtype)) + m[:, 0]
    naive = naive - xb[np.arange(4), np.asarray(labels)]
    assert np.max(np.abs(f64(naive) - exact) / ulp) > 8
    mean = results["mean"][0]
    assert abs(float(mean) - exact.mean()) <= 2.0 ** (
        np.floor(np.log2(exact.mean())) - 7
    )
    check_finite(case, "softmax_cross_entropy_with_integer_labels", g)
    sums = np.sum(f64(g), axis=-1)
    assert np.all(np.abs(sums) <= 1e-2), sums


# -- labels and targets at the edges ---------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_label_on_a_minus_inf_logit_is_inf(dtype):
    """A (one-hot or soft) target with mass on a -inf logit: the documented +inf,
    with finite gradients (softmax(x) sum(y) - y)."""
    case = "label on a -inf logit"
    x = jnp.asarray([[0.0, 1.0, -INF], [0.5, -INF, -INF]], dtype)
    labels = jnp.array([2, 1])
    onehot = jnp.eye(3, dtype=dtype)[labels]
    results = evaluate(
        {
            "softmax_cross_entropy_with_integer_labels": (
                lambda x: INT_CE(x, labels),
                (x,),
            ),
            "softmax_cross_entropy": (lambda x: SOFT_CE(x, onehot), (x,)),
            "softmax_kl_divergence": (
                lambda x: jaxent.softmax_kl_divergence(x, jnp.zeros_like(x)),
                (x,),
            ),
        }
    )
    for name, (value, (g,)) in results.items():
        check(case, name, value, [INF, INF])
        check_finite(case, name, g)


def test_label_on_a_class_excluded_by_where_is_inf():
    """An integer label on a class that a `where` mask excludes is a target on an
    excluded class: +inf, as for a -inf logit. Soft labels keep optax's meaning:
    label mass on excluded classes is dropped with them."""
    case = "label on a where-masked class"
    x = jnp.array([[0.0, 1.0, 2.0], [0.5, 0.2, 0.1]])
    mask = jnp.array([[True, True, False], [True, True, True]])
    labels = jnp.array([2, 1])
    onehot = jnp.eye(3)[labels]
    check(
        case,
        "softmax_cross_entropy_with_integer_labels",
        INT_CE(x, labels, where=mask),
        [INF, soft_ce64(x[1:], onehot[1:])[0]],
    )
    check(
        case,
        "softmax_cross_entropy",
        SOFT_CE(x, onehot, where=mask),
        f64(optax.softmax_cross_entropy(x, onehot, where=mask)),
    )


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_soft_labels_with_exact_zeros(dtype):
    """Zeros in the labels, some on -inf logits: finite values; the label
    gradient -(1 - eps) log_softmax(x) is kept where finite and 0 on -inf logits."""
    case = "soft labels with exact zeros"
    x = jnp.asarray([[1.0, -INF, 0.5, 2.0], [0.0, 0.0, -INF, -INF]], dtype)
    y = jnp.asarray([[0.5, 0.0, 0.0, 0.5], [0.0, 1.0, 0.0, 0.0]], dtype)
    value, (gx, gy) = evaluate({"ce": (SOFT_CE, (x, y))})["ce"]
    logp = log_softmax64(x)
    check(case, "softmax_cross_entropy", value, soft_ce64(x, y))
    check(case, "softmax_cross_entropy", gx, np.exp(logp) - f64(y), "grad")
    check(
        case, "softmax_cross_entropy", gy, np.where(np.isinf(logp), 0.0, -logp), "grad"
    )


def test_unnormalized_and_negative_soft_labels_follow_the_formula():
    """Labels are used as given (documented): loss sum(y) lse - <y, x>, gradients
    softmax(x) sum(y) - y and lse - x, for unnormalized, negative and all-zero
    labels alike."""
    case = "unnormalized/negative soft labels"
    x = jnp.array([[0.3, -1.2, 2.0], [0.3, -1.2, 2.0], [0.3, -1.2, 2.0]])
    y = jnp.array([[2.0, 0.0, 0.0], [1.5, -0.5, 0.0], [0.0, 0.0, 0.0]])
    value, (gx, gy) = evaluate({"ce": (SOFT_CE, (x, y))})["ce"]
    lse = scipy.special.logsumexp(f64(x), axis=-1, keepdims=True)
    check(case, "softmax_cross_entropy", value, np.sum(f64(y) * (lse - f64(x)), -1))
    check(
        case,
        "softmax_cross_entropy",
        gx,
        np.exp(f64(x) - lse) * f64(y).sum(-1, keepdims=True) - f64(y),
        "grad",
    )
    check(case, "softmax_cross_entropy", gy, lse - f64(x), "grad")
    # Probability-space measures: a negative probability inside a log is NaN.
    q = jnp.array([0.5, 0.5])
    bad = jnp.array([1.5, -0.5])
    results = evaluate(
        {
            "entropy": (jaxent.entropy, (bad,)),
            "cross_entropy (negative q)": (jaxent.cross_entropy, (q, bad)),
            "cross_entropy (negative p)": (jaxent.cross_entropy, (bad, q)),
            "kl_divergence": (jaxent.kl_divergence, (jnp.log(q), bad)),
        }
    )
    for name, expected in [
        ("entropy", NAN),
        ("cross_entropy (negative q)", NAN),
        ("cross_entropy (negative p)", math.log(2)),
        ("kl_divergence", NAN),
    ]:
        check(case, name, results[name][0], expected)


def test_zero_probabilities_as_target_and_as_prediction():
    """0 log 0 = 0: zero entries add nothing and get zero gradients; a positive
    target on a zero prediction is +inf (documented)."""
    case = "zero probabilities"
    p = jnp.array([[0.0, 0.25, 0.75], [0.0, 0.5, 0.5]])
    q = jnp.array([[0.0, 0.5, 0.5], [0.25, 0.0, 0.75]])
    h = lambda v: -np.sum(np.where(v == 0, 0, v * np.log(np.where(v == 0, 1, v))), -1)  # noqa: E731
    x = jnp.array([[-INF, 1.0, 2.0], [0.0, -INF, 1.0]])
    t = jnp.array([[-INF, 0.0, 0.0], [0.0, 1.0, 1.0]])
    results = evaluate(
        {
            "entropy": (jaxent.entropy, (p,)),
            "cross_entropy": (jaxent.cross_entropy, (p, q)),
            "kl_divergence": (jaxent.kl_divergence, (jnp.log(q), p)),
            "kl_divergence_with_log_targets": (
                jaxent.kl_divergence_with_log_targets,
                (jnp.log(q), jnp.log(p)),
            ),
            "softmax_kl_divergence": (jaxent.softmax_kl_divergence, (x, t)),
        }
    )
    value, (gp,) = results["entropy"]
    check(case, "entropy", value, h(f64(p)))
    check(
        case,
        "entropy",
        gp,
        np.where(f64(p) == 0, 0, -np.log(np.where(f64(p) == 0, 1, f64(p))) - 1),
        "grad",
    )
    value, (gp, gq) = results["cross_entropy"]
    check(case, "cross_entropy", value, [math.log(2), INF])
    check(
        case,
        "cross_entropy",
        gp,
        [[0.0, math.log(2), math.log(2)], [math.log(4), INF, -math.log(0.75)]],
        "grad",
    )
    check(
        case, "cross_entropy", gq, [[0.0, -0.5, -1.5], [0.0, -INF, -0.5 / 0.75]], "grad"
    )
    value, (glp, gt) = results["kl_divergence"]
    check(
        case, "kl_divergence", value, [0.25 * math.log(0.5) + 0.75 * math.log(1.5), INF]
    )
    check(case, "kl_divergence", glp, -f64(p), "grad")
    check(
        case,
        "kl_divergence",
        gt[0],
        [0.0, math.log(0.5) + 1, math.log(1.5) + 1],
        "grad",
    )
    value, (glp, glt) = results["kl_divergence_with_log_targets"]
    check(
        case,
        "kl_divergence_with_log_targets",
        value,
        [0.25 * math.log(0.5) + 0.75 * math.log(1.5), INF],
    )
    check(
        case,
        "kl_divergence_with_log_targets",
        glt[0],
        [0.0, 0.25 * (math.log(0.5) + 1), 0.75 * (math.log(1.5) + 1)],
        "grad",
    )
    value, (gx, gt) = results["softmax_kl_divergence"]
    check(case, "softmax_kl_divergence", value[1], INF)
    check_finite(case, "softmax_kl_divergence", value[0], gx[0], gt[0])
    check(case, "softmax_kl_divergence", gx[0, 0], 0.0, "grad")
    check(case, "softmax_kl_divergence", gt[0, 0], 0.0, "grad")


# -- nothing counted, out-of-range labels, empty batches, one class ----------------

NOTHING = {
    "softmax_cross_entropy_with_integer_labels (all ignored)": lambda x, w: INT_CE(
        x, jnp.array([-100, -100, -100]), ignore_index=-100, weights=w, reduction="mean"
    ),
    "softmax_cross_entropy_with_integer_labels (example mask all False)": lambda x, w: (
        INT_CE(
            x,
            jnp.array([0, 1, 2]),
            where=jnp.zeros(3, bool),
            weights=w,
            label_smoothing=0.1,
            reduction="mean",
        )
    ),
    "softmax_cross_entropy_with_integer_labels (class mask all False)": lambda x, w: (
        INT_CE(
            x,
            jnp.array([0, 1, 2]),
            where=jnp.zeros((3, 4), bool),
            reduction="mean",
        )
        + 0 * jnp.sum(w)
    ),
    "softmax_cross_entropy_with_integer_labels (no label weight)": lambda x, w: INT_CE(
        x,
        jnp.array([0, 1, 0]),
        weights=w * jnp.array([0.0, 0.0, 1.0, 1.0]),
        reduction="mean",
    ),
    "softmax_cross_entropy (example mask all False)": lambda x, w: SOFT_CE(
        x, jax.nn.softmax(x * w), where=jnp.zeros(3, bool), reduction="mean"
    ),
    "softmax_kl_divergence (example mask all False)": lambda x, w: (
        jaxent.softmax_kl_divergence(
            x, x * w, where=jnp.zeros(3, bool), reduction="mean"
        )
    ),
    "linear_softmax_cross_entropy (all ignored)": lambda x, w: LINEAR_CE(
        x,
        jnp.outer(w, w),
        jnp.array([-100, -100, -100]),
        bias=w,
        ignore_index=-100,
        reduction="mean",
    ),
    "linear_softmax_cross_entropy (example mask all False)": lambda x, w: LINEAR_CE(
        x,
        jnp.outer(w, w),
        jnp.array([0, 1, 2]),
        where=jnp.zeros(3, bool),
        label_smoothing=0.1,
        reduction="mean",
    ),
}


@functools.cache
def _nothing_results():
    x = jnp.asarray(np.random.default_rng(4).normal(size=(3, 4)))
    w = jnp.array([0.5, 1.0, 2.0, 1.5])
    return evaluate({name: (f, (x, w)) for name, f in NOTHING.items()})


@pytest.mark.parametrize("name", sorted(NOTHING))
def test_mean_over_nothing_is_zero_with_zero_gradient(name):
    """A mean over zero counted examples is 0 with zero gradients (never NaN)."""
    case = "mean over nothing"
    value, grads = _nothing_results()[name]
    check(case, name, value, 0.0)
    for g in grads:
        check(case, name, g, 0.0, "grad")
        assert np.all(f64(g) == 0)


@pytest.mark.parametrize("options", [{}, {"weights": True}, {"label_smoothing": 0.2}])
def test_out_of_range_and_negative_labels_are_nan_for_their_example(options):
    """Labels -1 and C (not ignore_index) give NaN for their example, value and
    gradient row; the other examples are exact, and an ignored one is 0."""
    case = "out-of-range labels"
    x = jnp.asarray(np.random.default_rng(5).normal(size=(4, 5)))
    labels = jnp.array([-1, 5, 2, -100])
    kw = dict(options, ignore_index=-100)
    if kw.pop("weights", False):
        kw["weights"] = jnp.array([1.0, 2.0, 0.5, 1.0, 1.5])
    name = "softmax_cross_entropy_with_integer_labels"
    results = evaluate(
        {
            "all": (lambda x: INT_CE(x, labels, **kw), (x,)),
            "good": (lambda x: INT_CE(x, labels[2:3], **kw), (x[2:3],)),
            "mean": (lambda x: INT_CE(x, labels, reduction="mean", **kw), (x,)),
        }
    )
    value, (g,) = results["all"]
    good, (g_good,) = results["good"]
    check(case, name, value, [NAN, NAN, good[0], 0.0])
    check(case, name, g[:2], NAN, "grad")
    check(case, name, g[2:3], f64(g_good), "grad")
    check(case, name, g[3], 0.0, "grad")
    check(case, name, results["mean"][0], NAN)


EMPTY = {
    "log_softmax": lambda x: jaxent.log_softmax(x),
    "softmax": lambda x: jaxent.softmax(x),
    "softmax_entropy": lambda x: jaxent.softmax_entropy(x),
    "entropy": lambda x: jaxent.entropy(jax.nn.softmax(x)),
    "cross_entropy": lambda x: jaxent.cross_entropy(
        jax.nn.softmax(x), jax.nn.softmax(x)
    ),
    "kl_divergence": lambda x: jaxent.kl_divergence(x, jax.nn.softmax(x)),
    "kl_divergence_with_log_targets": lambda x: jaxent.kl_divergence_with_log_targets(
        x, x
    ),
}
for _r in ("none", "sum", "mean"):
    EMPTY[f"softmax_cross_entropy[{_r}]"] = lambda x, r=_r: SOFT_CE(
        x, jax.nn.softmax(x), reduction=r, label_smoothing=0.1
    )
    EMPTY[f"softmax_cross_entropy_with_integer_labels[{_r}]"] = lambda x, r=_r: INT_CE(
        x,
        jnp.zeros(x.shape[:-1], jnp.int32),
        reduction=r,
        weights=jnp.ones(x.shape[-1]),
    )
    EMPTY[f"sigmoid_binary_cross_entropy[{_r}]"] = lambda x, r=_r: (
        jaxent.sigmoid_binary_cross_entropy(x, jax.nn.sigmoid(x), reduction=r)
    )
    EMPTY[f"softmax_kl_divergence[{_r}]"] = lambda x, r=_r: (
        jaxent.softmax_kl_divergence(x, x, reduction=r)
    )
    EMPTY[f"linear_softmax_cross_entropy[{_r}]"] = lambda x, r=_r: LINEAR_CE(
        x, jnp.ones((5, 3)), jnp.zeros(0, jnp.int32), reduction=r, label_smoothing=0.1
    )


@functools.cache
def _empty_results():
    return evaluate({name: (f, (jnp.zeros((0, 5)),)) for name, f in EMPTY.items()})


@pytest.mark.parametrize("name", sorted(EMPTY))
def test_empty_batch(name):
    """A size-0 batch: empty outputs, or 0 for "sum" and "mean"; empty gradients."""
    case = "empty batch"
    value, (g,) = _empty_results()[name]
    if value.ndim == 0:
        check(case, name, value, 0.0)
    else:
        assert value.shape[0] == 0
    assert g.shape == (0, 5)


def test_single_class():
    """C = 1: the only class has probability 1, so every loss is 0 (the z-loss
    z x**2 aside) with exact gradients."""
    case = "one class"
    x = jnp.array([[0.7], [-3.0], [250.0]])
    labels = jnp.array([0, 0, 0])
    table = [
        (
            "softmax_cross_entropy_with_integer_labels",
            lambda x: INT_CE(x, labels, label_smoothing=0.3),
            0.0,
            0.0,
        ),
        (
            "softmax_cross_entropy_with_integer_labels (z-loss)",
            lambda x: INT_CE(x, labels, z_loss=0.1),
            0.1 * f64(x[:, 0]) ** 2,
            0.2 * f64(x),
        ),
        ("softmax_cross_entropy", lambda x: SOFT_CE(x, 2 * jnp.ones_like(x)), 0.0, 0.0),
        ("log_softmax", jaxent.log_softmax, 0.0, 0.0),
        ("softmax", jaxent.softmax, 1.0, 0.0),
        ("softmax_entropy", jaxent.softmax_entropy, 0.0, 0.0),
        (
            "softmax_kl_divergence",
            lambda x: jaxent.softmax_kl_divergence(x, -x),
            0.0,
            0.0,
        ),
        ("entropy", lambda x: jaxent.entropy(x / x), 0.0, 0.0),
        ("cross_entropy", lambda x: jaxent.cross_entropy(x / x, x / x), 0.0, 0.0),
    ]
    results = evaluate({name: (f, (x,)) for name, f, _, _ in table})
    for name, _, expected, grad in table:
        value, (g,) = results[name]
        check(case, name, value, expected)
        check(case, name, g, grad, "grad")


def test_row_of_all_minus_inf_logits():
    """CONTEXT.md's policy for a row with no admissible class: softmax 0,
    log_softmax -inf, normalizer 0, so a target with mass there is +inf and a
    target without mass 0; gradients stay finite."""
    case = "all -inf row"
    x = jnp.array([[-INF, -INF, -INF], [0.0, 1.0, -INF]])
    t = jnp.array([[0.0, 1.0, 2.0], [0.5, 0.0, -INF]])
    onehot = jnp.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    zero_row = onehot.at[0].set(0.0)
    logp = log_softmax64(x)
    logq = log_softmax64(t)
    table = [
        ("log_softmax", jaxent.log_softmax, logp),
        ("softmax", jaxent.softmax, np.exp(logp)),
        (
            "softmax_cross_entropy_with_integer_labels",
            lambda x: INT_CE(x, jnp.array([0, 0]), z_loss=0.1),
            [INF, -logp[1, 0] + 0.1 * scipy.special.logsumexp([0.0, 1.0]) ** 2],
        ),
        (
            "softmax_cross_entropy (mass)",
            lambda x: SOFT_CE(x, onehot),
            [INF, -logp[1, 0]],
        ),
        (
            "softmax_cross_entropy (no mass)",
            lambda x: SOFT_CE(x, zero_row),
            [0.0, -logp[1, 0]],
        ),
        ("softmax_entropy", jaxent.softmax_entropy, [0.0, entropy64(logp[1])]),
        (
            "softmax_kl_divergence (student)",
            lambda x: jaxent.softmax_kl_divergence(x, t),
            [INF, kl64(logq[1], logp[1])],
        ),
        (
            "softmax_kl_divergence (teacher)",
            lambda x: jaxent.softmax_kl_divergence(t, x),
            [0.0, kl64(logp[1], logq[1])],
        ),
    ]
    results = evaluate({name: (f, (x,)) for name, f, _ in table})
    for name, _, expected in table:
        value, (g,) = results[name]
        check(case, name, value, expected)
        check_finite(case, name, g)


# -- what a `where` mask hides ----------------------------------------------------

# name -> (f(x, other, mask), other): ``x`` holds the entries under test and
# ``other`` is the function's second float input (unused by one-input functions).
LABELS = [[0.5, 0.0, 0.5, 0.0], [0.25, 0.75, 0.0, 0.0]]
WHERE_FUNCTIONS = {
    "log_softmax": (lambda x, o, m: jaxent.log_softmax(x, where=m), 0.0),
    "softmax": (lambda x, o, m: jaxent.softmax(x, where=m), 0.0),
    "softmax_cross_entropy": (
        lambda x, o, m: SOFT_CE(x, o, where=m, label_smoothing=0.1, z_loss=1e-3),
        LABELS,
    ),
    "softmax_cross_entropy_with_integer_labels": (
        lambda x, o, m: INT_CE(x, jnp.array([2, 0]), where=m, label_smoothing=0.1),
        0.0,
    ),
    "softmax_entropy": (lambda x, o, m: jaxent.softmax_entropy(x, where=m), 0.0),
    "softmax_kl_divergence (student)": (
        lambda x, o, m: jaxent.softmax_kl_divergence(x, o, where=m),
        [[0.3, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]],
    ),
    "softmax_kl_divergence (teacher)": (
        lambda x, o, m: jaxent.softmax_kl_divergence(o, x, where=m),
        [[0.3, 0.2, 0.1, 0.0], [0.0, 0.1, 0.2, 0.3]],
    ),
    "kl_divergence (prediction)": (
        lambda x, o, m: jaxent.kl_divergence(x, o, where=m),
        0.25,
    ),
    "kl_divergence (target)": (
        lambda x, o, m: jaxent.kl_divergence(o, x, where=m),
        -1.0,
    ),
    "kl_divergence_with_log_targets (prediction)": (
        lambda x, o, m: jaxent.kl_divergence_with_log_targets(x, o, where=m),
        -1.0,
    ),
    "kl_divergence_with_log_targets (target)": (
        lambda x, o, m: jaxent.kl_divergence_with_log_targets(o, x, where=m),
        -1.0,
    ),
}
# Non-finite or huge entries under the mask leak into a value or a gradient:
# bug 1 in notes/bugs_issue3.md.


MASKED_X = np.array([[0.1, 0.2, 0.3, 0.4], [0.3, 0.1, 0.4, 0.2]])
MASK = np.array([[True, False, True, False], [True, True, True, False]])
FILLS = {"float64": ("nan", "inf", "-inf"), "float32": ("1e4",), "bfloat16": ("1e4",)}


@functools.cache
def _masked_results(name):
    """``name`` with harmless entries and with each fill under the mask, for
    every dtype, in one program."""
    f, other = WHERE_FUNCTIONS[name]
    cases = {}
    for dtype, fills in FILLS.items():
        o = jnp.asarray(
            np.broadcast_to(np.asarray(other, np.float64), MASK.shape), dtype
        )
        g = functools.partial(lambda x, o, f: f(x, o, jnp.asarray(MASK)), f=f)
        for fill in ("clean", *fills):
            x = MASKED_X if fill == "clean" else np.where(MASK, MASKED_X, float(fill))
            cases[dtype, fill] = (g, (jnp.asarray(x, dtype), o))
    return evaluate(cases)


def _check_masked(case, name, fill, dtype):
    """Values and both gradients with ``fill`` at the excluded entries equal those
    with harmless entries there, and the gradients are exactly 0 there."""
    value, grads = _masked_results(name)[dtype, fill]
    clean_value, clean_grads = _masked_results(name)[dtype, "clean"]
    check(case, name, value, f64(clean_value))
    for g, clean_g in zip(grads, clean_grads, strict=True):
        check(case, name, g, np.where(MASK, f64(clean_g), 0.0), "grad")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", sorted(WHERE_FUNCTIONS))
def test_huge_masked_out_logits_get_exactly_zero_gradient(name, dtype, request):
    """1e4 at the entries a `where` mask excludes: exactly zero gradient there and
    the same value and gradients elsewhere as with harmless entries."""
    _check_masked("1e4 under a where mask", name, "1e4", dtype)


@pytest.mark.parametrize("fill", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", sorted(WHERE_FUNCTIONS))
def test_non_finite_entries_excluded_by_where_do_not_leak(name, fill, request):
    """An excluded entry is excluded whatever it holds (masked padding often
    holds garbage): NaN or +/-inf there changes no value and gets zero gradient."""
    _check_masked(f"{fill} under a where mask", name, fill, "float64")


# -- NaN inputs propagate ------------------------------------------------------------

NAN_INPUTS = {
    "softmax_cross_entropy (labels)": lambda v: SOFT_CE(jnp.zeros((2, 3)), v),
    "softmax_cross_entropy_with_integer_labels (weights)": lambda v: INT_CE(
        jnp.zeros((2, 3)), jnp.array([0, 1]), weights=v[0]
    ),
    "sigmoid_binary_cross_entropy (labels)": lambda v: jnp.sum(
        jaxent.sigmoid_binary_cross_entropy(jnp.ones((2, 3)), v), axis=-1
    ),
    "entropy": lambda v: jaxent.entropy(v),
    "cross_entropy (p)": lambda v: jaxent.cross_entropy(v, jnp.full((2, 3), 1 / 3)),
    "cross_entropy (q)": lambda v: jaxent.cross_entropy(jnp.full((2, 3), 1 / 3), v),
    "kl_divergence (targets)": lambda v: jaxent.kl_divergence(
        jnp.log(jnp.full((2, 3), 1 / 3)), v
    ),
    "kl_divergence (log_predictions)": lambda v: jaxent.kl_divergence(
        jnp.log(v), jnp.full((2, 3), 1 / 3)
    ),
    "kl_divergence_with_log_targets": lambda v: jaxent.kl_divergence_with_log_targets(
        jnp.log(jnp.full((2, 3), 1 / 3)), jnp.log(v)
    ),
}


@functools.cache
def _nan_results():
    v = np.full((2, 3), 1 / 3)
    dirty = v.copy()
    dirty[0, 0] = NAN
    cases = {}
    for name, f in NAN_INPUTS.items():
        cases[name, "clean"] = (f, (jnp.asarray(v),))
        cases[name, "dirty"] = (f, (jnp.asarray(dirty),))
    return evaluate(cases)


@pytest.mark.parametrize("name", sorted(NAN_INPUTS))
def test_nan_inputs_propagate(name):
    """A NaN in any input makes its example NaN and leaves the others exact."""
    case = "NaN inputs"
    value = _nan_results()[name, "dirty"][0]
    clean = _nan_results()[name, "clean"][0]
    check(case, name, value, [NAN, f64(clean)[1]])


# -- trace-time errors: one parametrized test per bad-input kind -------------------

X = jnp.ones((2, 3))
LABELS_INT = jnp.array([0, 1])
AXIS_FUNCTIONS = {
    "log_softmax": lambda **kw: jaxent.log_softmax(X, **kw),
    "softmax": lambda **kw: jaxent.softmax(X, **kw),
    "softmax_cross_entropy": lambda **kw: SOFT_CE(X, X, **kw),
    "softmax_cross_entropy_with_integer_labels": lambda **kw: INT_CE(
        X, LABELS_INT, **kw
    ),
    "entropy": lambda **kw: jaxent.entropy(X, **kw),
    "cross_entropy": lambda **kw: jaxent.cross_entropy(X, X, **kw),
    "kl_divergence": lambda **kw: jaxent.kl_divergence(X, X, **kw),
    "kl_divergence_with_log_targets": lambda **kw: (
        jaxent.kl_divergence_with_log_targets(X, X, **kw)
    ),
    "softmax_entropy": lambda **kw: jaxent.softmax_entropy(X, **kw),
    "softmax_kl_divergence": lambda **kw: jaxent.softmax_kl_divergence(X, X, **kw),
}
WHERE_CAPABLE = [n for n in AXIS_FUNCTIONS if n not in ("entropy", "cross_entropy")]
REDUCING = {
    "softmax_cross_entropy": lambda **kw: SOFT_CE(X, X, **kw),
    "softmax_cross_entropy_with_integer_labels": lambda **kw: INT_CE(
        X, LABELS_INT, **kw
    ),
    "sigmoid_binary_cross_entropy": lambda **kw: jaxent.sigmoid_binary_cross_entropy(
        X, X, **kw
    ),
    "softmax_kl_divergence": lambda **kw: jaxent.softmax_kl_divergence(X, X, **kw),
    "linear_softmax_cross_entropy": lambda **kw: LINEAR_CE(
        X, jnp.ones((3, 4)), LABELS_INT, **kw
    ),
}
INT3 = jnp.ones((2, 3), jnp.int32)
# (function, call, argument, the received value as the message must show it)
FIRST_NOT_FLOAT = [
    ("log_softmax", lambda: jaxent.log_softmax(INT3), "logits"),
    ("softmax", lambda: jaxent.softmax(INT3), "logits"),
    ("softmax_cross_entropy", lambda: SOFT_CE(INT3, X), "logits"),
    (
        "softmax_cross_entropy_with_integer_labels",
        lambda: INT_CE(INT3, LABELS_INT),
        "logits",
    ),
    (
        "sigmoid_binary_cross_entropy",
        lambda: jaxent.sigmoid_binary_cross_entropy(INT3, X),
        "logits",
    ),
    ("entropy", lambda: jaxent.entropy(INT3), "probs"),
    ("cross_entropy", lambda: jaxent.cross_entropy(INT3, X), "p"),
    ("kl_divergence", lambda: jaxent.kl_divergence(INT3, X), "log_predictions"),
    (
        "kl_divergence_with_log_targets",
        lambda: jaxent.kl_divergence_with_log_targets(INT3, X),
        "log_predictions",
    ),
    ("softmax_entropy", lambda: jaxent.softmax_entropy(INT3), "logits"),
    ("softmax_kl_divergence", lambda: jaxent.softmax_kl_divergence(INT3, X), "logits"),
]
SECOND_NOT_FLOAT = [
    ("softmax_cross_entropy", lambda: SOFT_CE(X, INT3), "labels"),
    ("cross_entropy", lambda: jaxent.cross_entropy(X, INT3), "q"),
    ("kl_divergence", lambda: jaxent.kl_divergence(X, INT3), "targets"),
    (
        "kl_divergence_with_log_targets",
        lambda: jaxent.kl_divergence_with_log_targets(X, INT3),
        "log_targets",
    ),
    (
        "softmax_kl_divergence",
        lambda: jaxent.softmax_kl_divergence(X, INT3),
        "target_logits",
    ),
]
X24 = jnp.ones((2, 4))
SECOND_WRONG_SHAPE = [
    ("softmax_cross_entropy", lambda: SOFT_CE(X, X24), "labels"),
    (
        "sigmoid_binary_cross_entropy",
        lambda: jaxent.sigmoid_binary_cross_entropy(X, X24),
        "labels",
    ),
    ("cross_entropy", lambda: jaxent.cross_entropy(X, X24), "q"),
    ("kl_divergence", lambda: jaxent.kl_divergence(X, X24), "targets"),
    (
        "kl_divergence_with_log_targets",
        lambda: jaxent.kl_divergence_with_log_targets(X, X24),
        "log_targets",
    ),
    (
        "softmax_kl_divergence",
        lambda: jaxent.softmax_kl_divergence(X, X24),
        "target_logits",
    ),
]


def _traced_option(name):
    """Calls the integer-label loss with option ``name`` traced under jit."""
    return lambda: jax.jit(lambda v: INT_CE(X, LABELS_INT, **{name: v}))(0.1)


def _bad_inputs():
    """``(kind, function, call, error, argument, received)`` for every kind of bad
    input and every function that takes the argument."""
    rows = []
    for fn, call, arg in FIRST_NOT_FLOAT:
        rows.append(("input not floating point", fn, call, TypeError, arg, "int32"))
    for fn, call, arg in SECOND_NOT_FLOAT:
        rows.append(
            ("second input not floating point", fn, call, TypeError, arg, "int32")
        )
    for fn, call, arg in SECOND_WRONG_SHAPE:
        rows.append(
            ("second input of another shape", fn, call, ValueError, arg, "(2, 4)")
        )
    name = "softmax_cross_entropy_with_integer_labels"
    rows += [
        (
            "integer labels not integers",
            name,
            lambda: INT_CE(X, jnp.ones(2)),
            TypeError,
            "labels",
            "float",
        ),
        (
            "integer labels not integers",
            name,
            lambda: INT_CE(X, jnp.array([True, False])),
            TypeError,
            "labels",
            "bool",
        ),
        (
            "integer labels of the wrong shape",
            name,
            lambda: INT_CE(X, jnp.zeros(3, int)),
            ValueError,
            "labels",
            "(3,)",
        ),
        (
            "weights of the wrong shape",
            name,
            lambda: INT_CE(X, LABELS_INT, weights=jnp.ones(4)),
            ValueError,
            "weights",
            "(4,)",
        ),
        (
            "weights not floating point",
            name,
            lambda: INT_CE(X, LABELS_INT, weights=jnp.ones(3, jnp.int32)),
            TypeError,
            "weights",
            "int32",
        ),
        (
            "ignore_index not an integer",
            name,
            lambda: INT_CE(X, LABELS_INT, ignore_index="a"),
            TypeError,
            "ignore_index",
            "'a'",
        ),
        (
            "ignore_index not an integer",
            name,
            lambda: INT_CE(X, LABELS_INT, ignore_index=1.5),
            TypeError,
            "ignore_index",
            "1.5",
        ),
        (
            "ignore_index traced",
            name,
            lambda: jax.jit(lambda i: INT_CE(X, LABELS_INT, ignore_index=i))(1),
            TypeError,
            "ignore_index",
            "Tracer",
        ),
        (
            "pos_weight not broadcastable",
            "sigmoid_binary_cross_entropy",
            lambda: jaxent.sigmoid_binary_cross_entropy(X, X, pos_weight=jnp.ones(2)),
            ValueError,
            "pos_weight",
            "(2,)",
        ),
        (
            "pos_weight not floating point",
            "sigmoid_binary_cross_entropy",
            lambda: jaxent.sigmoid_binary_cross_entropy(
                X, X, pos_weight=jnp.ones(3, int)
            ),
            TypeError,
            "pos_weight",
            "int",
        ),
    ]
    lin = "linear_softmax_cross_entropy"
    h, w = jnp.ones((2, 3)), jnp.ones((3, 4))
    rows += [
        (
            "input not floating point",
            lin,
            lambda: LINEAR_CE(INT3, w, LABELS_INT),
            TypeError,
            "hidden",
            "int32",
        ),
        (
            "second input not floating point",
            lin,
            lambda: LINEAR_CE(h, w.astype(jnp.int32), LABELS_INT),
            TypeError,
            "weight",
            "int32",
        ),
        (
            "integer labels not integers",
            lin,
            lambda: LINEAR_CE(h, w, jnp.ones(2)),
            TypeError,
            "labels",
            "float",
        ),
        (
            "integer labels of the wrong shape",
            lin,
            lambda: LINEAR_CE(h, w, jnp.zeros(3, int)),
            ValueError,
            "labels",
            "(3,)",
        ),
        (
            "second input of another shape",
            lin,
            lambda: LINEAR_CE(h, jnp.ones((4, 4)), LABELS_INT),
            ValueError,
            "hidden",
            "(2, 3)",
        ),
        (
            "bias of the wrong shape",
            lin,
            lambda: LINEAR_CE(h, w, LABELS_INT, bias=jnp.ones(3)),
            ValueError,
            "bias",
            "(3,)",
        ),
        (
            "block_size not positive",
            lin,
            lambda: LINEAR_CE(h, w, LABELS_INT, block_size=0),
            ValueError,
            "block_size",
            "0",
        ),
        (
            "block_size not positive",
            lin,
            lambda: LINEAR_CE(h, w, LABELS_INT, block_size=2.5),
            ValueError,
            "block_size",
            "2.5",
        ),
        (
            "where not boolean",
            lin,
            lambda: LINEAR_CE(h, w, LABELS_INT, where=jnp.ones(2)),
            TypeError,
            "where",
            "float",
        ),
        (
            "where of a shape that does not broadcast",
            lin,
            lambda: LINEAR_CE(h, w, LABELS_INT, where=jnp.ones(3, bool)),
            ValueError,
            "where",
            "(3,)",
        ),
        (
            "ignore_index not an integer",
            lin,
            lambda: LINEAR_CE(h, w, LABELS_INT, ignore_index="a"),
            TypeError,
            "ignore_index",
            "'a'",
        ),
        (
            "ignore_index not an integer",
            lin,
            lambda: LINEAR_CE(h, w, LABELS_INT, ignore_index=1.5),
            TypeError,
            "ignore_index",
            "1.5",
        ),
    ]
    for fn in (
        "softmax_cross_entropy",
        "softmax_cross_entropy_with_integer_labels",
        lin,
    ):
        call = REDUCING[fn]
        for v in (1.5, -0.1, float("nan")):
            rows.append(
                (
                    "label_smoothing outside [0, 1]",
                    fn,
                    lambda c=call, v=v: c(label_smoothing=v),
                    ValueError,
                    "label_smoothing",
                    repr(v),
                )
            )
        rows.append(
            (
                "z_loss negative",
                fn,
                lambda c=call: c(z_loss=-1.0),
                ValueError,
                "z_loss",
                "-1.0",
            )
        )
        rows.append(
            (
                "label_smoothing not a number",
                fn,
                lambda c=call: c(label_smoothing=None),
                TypeError,
                "label_smoothing",
                "None",
            )
        )
    rows.append(
        (
            "label_smoothing traced",
            name,
            _traced_option("label_smoothing"),
            TypeError,
            "label_smoothing",
            "Tracer",
        )
    )
    rows.append(
        ("z_loss traced", name, _traced_option("z_loss"), TypeError, "z_loss", "Tracer")
    )
    for fn, call in REDUCING.items():
        rows.append(
            (
                "reduction unknown",
                fn,
                lambda c=call: c(reduction="avg"),
                ValueError,
                "reduction",
                "'avg'",
            )
        )
    for fn, call in AXIS_FUNCTIONS.items():
        rows.append(
            ("axis out of range", fn, lambda c=call: c(axis=2), ValueError, "axis", "2")
        )
        rows.append(
            (
                "axis out of range",
                fn,
                lambda c=call: c(axis=-3),
                ValueError,
                "axis",
                "-3",
            )
        )
        rows.append(
            (
                "axis not an integer",
                fn,
                lambda c=call: c(axis="a"),
                TypeError,
                "axis",
                "'a'",
            )
        )
        rows.append(
            (
                "axis not an integer",
                fn,
                lambda c=call: c(axis=1.5),
                TypeError,
                "axis",
                "1.5",
            )
        )
        rows.append(
            (
                "axis repeated",
                fn,
                lambda c=call: c(axis=(1, -1)),
                ValueError,
                "axis",
                "(1, -1)",
            )
        )
    for fn in WHERE_CAPABLE:
        call = AXIS_FUNCTIONS[fn]
        rows.append(
            (
                "where not boolean",
                fn,
                lambda c=call: c(where=jnp.ones((2, 3))),
                TypeError,
                "where",
                "float",
            )
        )
        rows.append(
            (
                "where of a shape that does not broadcast",
                fn,
                lambda c=call: c(where=jnp.ones(4, bool)),
                ValueError,
                "where",
                "(4,)",
            )
        )
    for fn in ("entropy", "cross_entropy", "softmax_entropy"):
        call = AXIS_FUNCTIONS[fn]
        for v in (1.0, 0.0, -2.0):
            rows.append(
                (
                    "base not a valid logarithm base",
                    fn,
                    lambda c=call, v=v: c(base=v),
                    ValueError,
                    "base",
                    repr(v),
                )
            )
    return rows


BAD_INPUTS = _bad_inputs()
# Messages that do not name the argument: bugs 3 and 4 in notes/bugs_issue3.md.
BAD_MESSAGES: dict = {}


@pytest.mark.parametrize(
    ("kind", "function", "call", "error", "argument", "received"),
    BAD_INPUTS,
    ids=[f"{k}-{f}-{r}" for k, f, _, _, _, r in BAD_INPUTS],
)
def test_bad_input_raises_at_trace_time(
    kind, function, call, error, argument, received, request
):
    """Raised while tracing (``jax.eval_shape`` runs nothing), of the right type,
    naming the argument and showing the value received."""
    bug = BAD_MESSAGES.get((kind, received))
    if bug:
        request.applymarker(
            pytest.mark.xfail(strict=True, reason=f"bug {bug} in notes/bugs_issue3.md")
        )
    with pytest.raises(Exception) as info:
        jax.eval_shape(call)
    record(
        "bad_input",
        kind=kind,
        function=function,
        error=info.type.__name__,
        ok=isinstance(info.value, error),
    )
    assert isinstance(info.value, error), info.value
    message = str(info.value)
    assert f"`{argument}`" in message, message
    assert received in message, message

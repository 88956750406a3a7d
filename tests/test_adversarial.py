"""Adversarial corpus: inputs chosen to break a loss. Every case asserts finite
values and gradients where the mathematics gives a finite number, and otherwise
the documented non-finite result (NaN for NaN/+inf logits and out-of-range labels,
+inf for a target on an excluded class), exactly.

Expected finite values are closed forms or SciPy in float64, compared with the
tolerance table of ``tests/helpers.py``; every check is recorded for
``benchmarks/robustness_report.py``. Generic properties (NaN rows, means over
nothing, empty batches, one class, masked entries, NaN inputs, bad inputs) run
on every loss of ``jaxent._define.REGISTRY`` that has the input kind or option
they need, with calls built from its input kinds and signature.
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
from jaxent._define import REGISTRY
from tests.helpers import error_units, record

pytestmark = [
    pytest.mark.slow,
    # Deprecated aliases (optax's) are registered losses too.
    pytest.mark.filterwarnings(r"ignore:\w+ is deprecated \(as in optax\)"),
]

INF, NAN = np.inf, np.nan
INT_CE = jaxent.softmax_cross_entropy_with_integer_labels
SOFT_CE = jaxent.softmax_cross_entropy


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


# -- every registered loss, its inputs built from its input kinds -------------------
#
# The generic properties below (NaN rows, means over nothing, empty batches, one
# class, masked entries, NaN inputs, bad inputs) run on every loss registered in
# jaxent._define.REGISTRY that has the input kind or the option a scenario needs:
# each case's call is built from the loss's input kinds and signature, so adding
# a loss adds its cases without a table of function names. Scenarios whose
# expected values are closed forms per function (huge and equal logits, -inf
# rows, ...) keep their own tests and tables.

HIDDEN = 3  # D, the hidden size of the fused heads' inputs
IGNORE = -100
TOPK = 2  # a top-k teacher's k (at most the number of classes)
INTEGER_KINDS = ("class_ids", "teacher_ids")
# Kinds whose arrays have the logits' shape [N, C]; "binary" (sigmoid labels)
# marks an elementwise loss, with no class axis.
LOGITS_SHAPED = ("logits", "probs", "log_probs", "binary")
# Array-valued options, built from the logits' shape by _options.
ARRAY_OPTIONS = ("weights", "pos_weight", "bias", "teacher_bias", "token_weights")
# Known library bugs: (test, case label) -> what is wrong. Each such case is
# marked xfail(strict=True) until the library is fixed.
KNOWN_BUGS: dict[tuple[str, str], str] = {}


def _names():
    return sorted(REGISTRY)


def _kinds(name):
    return REGISTRY[name].inputs


def _positional(name):
    """Parameter names of ``name``'s positional array arguments."""
    return list(REGISTRY[name].parameters)[: len(_kinds(name))]


def _takes(name, option):
    return option in REGISTRY[name].parameters


def _elementwise(name):
    return "binary" in _kinds(name)


def _float_positions(name):
    return [i for i, k in enumerate(_kinds(name)) if k not in INTEGER_KINDS]


def _label(name, i, positions):
    """A case's function label: the name, with the argument under test when the
    scenario tests more than one of its positions (two logits: student and
    teacher)."""
    if len(positions) == 1:
        return name
    if all(_kinds(name)[j] == "logits" for j in positions):
        return f"{name} ({('student', 'teacher')[positions.index(i)]})"
    return f"{name} ({_positional(name)[i]})"


def _param(test, label, *values):
    """A ``pytest.param`` of ``values``, xfail(strict) when KNOWN_BUGS lists it."""
    reason = KNOWN_BUGS.get((test, label))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(*values, marks=marks, id=label)


def _clean(kind, shape, rng):
    """A clean NumPy input of ``kind`` for logits of ``shape`` ``[..., C]``."""
    batch, c = shape[:-1], shape[-1]
    if kind == "logits":
        return rng.normal(size=shape)
    if kind in ("probs", "log_probs"):
        p = rng.uniform(0.05, 1.0, size=shape)
        p = p / p.sum(-1, keepdims=True)
        return np.log(p) if kind == "log_probs" else p
    if kind == "binary":
        return rng.uniform(0.0, 1.0, size=shape)
    if kind == "class_ids":
        return np.arange(math.prod(batch), dtype=np.int32).reshape(batch) % c
    if kind in ("hidden", "teacher_hidden"):
        return rng.normal(size=(*batch, HIDDEN))
    if kind in ("weight", "teacher_weight"):
        return rng.normal(size=(HIDDEN, c))
    # A top-k teacher: k distinct ids per row, 0.8 of the mass on them.
    k = min(TOPK, c)
    if kind == "teacher_ids":
        rows = np.arange(math.prod(batch), dtype=np.int32).reshape(*batch, 1)
        return (rows + np.arange(k, dtype=np.int32)) % c
    if kind == "teacher_log_probs":
        q = rng.uniform(0.05, 1.0, size=(*batch, k))
        return np.log(0.8 * q / q.sum(-1, keepdims=True))
    raise AssertionError(f"no adversarial input for kind {kind!r}: add it to _clean")


def _inputs(name, shape, *, seed=0, dtype="float64"):
    """``name``'s clean positional inputs, by kind, for logits of ``shape``;
    float ones in ``dtype``."""
    rng = np.random.default_rng(seed)
    return [
        jnp.asarray(_clean(kind, shape, rng), None if kind in INTEGER_KINDS else dtype)
        for kind in _kinds(name)
    ]


def _options(name, shape, wanted, *, seed=0, dtype="float64"):
    """The options of ``wanted`` that ``name`` takes; array options (value True)
    built for logits of ``shape``."""
    rng = np.random.default_rng(seed + 1)
    out = {}
    for option, value in wanted.items():
        if not _takes(name, option):
            continue
        if option == "weights":
            value = rng.uniform(0.5, 2.0, shape[-1])
        elif option in ("bias", "teacher_bias"):
            value = rng.normal(size=shape[-1]) * 0.5
        elif option == "pos_weight":
            value = rng.uniform(0.5, 2.0, shape)
        out[option] = jnp.asarray(value, dtype) if option in ARRAY_OPTIONS else value
    return out


def _fn(name, arrays, options, free=None, derive=None):
    """``(f, args)`` for :func:`evaluate`: ``name`` as a function of the inputs at
    ``free`` (positions, or names of array options; default: every float input
    and array option), the rest fixed to ``arrays`` and ``options``; ``derive``
    maps a position to a function applied to its argument first."""
    if free is None:
        free = [*_float_positions(name), *(o for o in ARRAY_OPTIONS if o in options)]
    derive = derive or {}
    public = REGISTRY[name].public

    def f(*values):
        a, kw = list(arrays), dict(options)
        for k, v in zip(free, values, strict=True):
            if isinstance(k, int):
                a[k] = derive.get(k, lambda v: v)(v)
            else:
                kw[k] = v
        return public(*a, **kw)

    return f, tuple(arrays[k] if isinstance(k, int) else options[k] for k in free)


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

# Options turned on where a loss takes them, so that their code sees the row too.
ROW_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3}


def _row_cases():
    """``{label: (name, position)}``: every logits-kind position of every loss
    with a class axis (the other inputs clean)."""
    cases = {}
    for name in _names():
        positions = [i for i, k in enumerate(_kinds(name)) if k == "logits"]
        if _elementwise(name):
            continue  # no rows: see test_inf_and_nan_logits_in_binary_cross_entropy
        for i in positions:
            cases[_label(name, i, positions)] = (name, i)
    return cases


ROW_CASES = _row_cases()


@functools.cache
def _row_results():
    """Every ROW_CASES entry on clean logits and on logits whose row 0 holds a
    +inf and row 1 a NaN, with gradients w.r.t. every float input."""
    rng = np.random.default_rng(1)
    clean = rng.normal(size=(3, 5))
    dirty = clean.copy()
    dirty[0, 2], dirty[1, 3] = INF, NAN
    cases = {}
    for label, (name, i) in ROW_CASES.items():
        options = _options(name, clean.shape, ROW_OPTIONS)
        for state, x in (("clean", clean), ("dirty", dirty)):
            arrays = _inputs(name, clean.shape, seed=2)
            arrays[i] = jnp.asarray(x)
            cases[label, state] = _fn(name, arrays, options)
    return evaluate(cases)


@pytest.mark.parametrize(
    "label", [_param("rows", label, label) for label in sorted(ROW_CASES)]
)
def test_inf_and_nan_logits_give_nan_for_their_row_only(label):
    """Row 0 holds a +inf logit, row 1 a NaN: their values and gradient rows (of
    every input) are NaN (documented); row 2 is unaffected, value and gradients."""
    case = "+inf/NaN logits"
    value, grads = _row_results()[label, "dirty"]
    clean_value, clean_grads = _row_results()[label, "clean"]
    check(case, label, value[:2], np.full(value[:2].shape, NAN))
    check(case, label, value[2], f64(clean_value[2]))
    for g, clean_g in zip(grads, clean_grads, strict=True):
        check(case, label, g[:2], np.full(g[:2].shape, NAN), "grad")
        check(case, label, g[2], f64(clean_g[2]), "grad")


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
    results = evaluate(
        {
            "int": (lambda x: INT_CE(x, labels, where=mask), (x,)),
            "soft": (lambda x: SOFT_CE(x, onehot, where=mask), (x,)),
            "optax": (
                lambda x: optax.softmax_cross_entropy(x, onehot, where=mask),
                (x,),
            ),
        },
        grads=False,
    )
    check(
        case,
        "softmax_cross_entropy_with_integer_labels",
        results["int"][0],
        [INF, soft_ce64(x[1:], onehot[1:])[0]],
    )
    check(case, "softmax_cross_entropy", results["soft"][0], f64(results["optax"][0]))


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

# Options turned on where a loss takes them (array options as free arguments).
NOTHING_OPTIONS = {
    "weights": True,
    "bias": True,
    "teacher_bias": True,
    "label_smoothing": 0.1,
    "z_loss": 1e-3,
    "hard_weight": 0.5,
}


def _nothing_ways(name):
    """The ways ``name`` can count nothing in a mean."""
    if not _takes(name, "reduction"):
        return []
    d, ways = REGISTRY[name], []
    if "class_ids" in d.inputs and _takes(name, "ignore_index"):
        ways.append("all ignored")
    if _takes(name, "where") and d.where in ("both", "rows"):
        ways.append("example mask all False")
    if _takes(name, "where") and d.where in ("both", "classes"):
        ways.append("class mask all False")
    if "class_ids" in d.inputs and _takes(name, "weights"):
        ways.append("no label weight")
    return ways


NOTHING = {
    f"{name} ({way})": (name, way) for name in _names() for way in _nothing_ways(name)
}


@functools.cache
def _nothing_results():
    shape = (3, 4)
    cases = {}
    for label, (name, way) in NOTHING.items():
        arrays = _inputs(name, shape, seed=4)
        options = dict(_options(name, shape, NOTHING_OPTIONS), reduction="mean")
        ids = _kinds(name).index("class_ids") if "class_ids" in _kinds(name) else None
        if way == "all ignored":
            arrays[ids] = jnp.full_like(arrays[ids], IGNORE)
            options["ignore_index"] = IGNORE
        elif way == "example mask all False":
            options["where"] = jnp.zeros(shape[:-1], bool)
        elif way == "class mask all False":
            options["where"] = jnp.zeros(shape, bool)
        else:  # no label weight: every label's class has weight 0
            labelled = np.isin(np.arange(shape[-1]), np.asarray(arrays[ids]))
            options["weights"] = jnp.where(labelled, 0.0, options["weights"])
        cases[label] = _fn(name, arrays, options)
    return evaluate(cases)


@pytest.mark.parametrize(
    "label", [_param("nothing", label, label) for label in sorted(NOTHING)]
)
def test_mean_over_nothing_is_zero_with_zero_gradient(label):
    """A mean over zero counted examples is 0 with zero gradients (never NaN),
    w.r.t. every float input and array option."""
    case = "mean over nothing"
    value, grads = _nothing_results()[label]
    check(case, label, value, 0.0)
    for g in grads:
        check(case, label, g, 0.0, "grad")
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


EMPTY_OPTIONS = {"weights": True, "bias": True, "label_smoothing": 0.1}


def _empty_cases():
    """``{label: (name, reduction)}``: every loss, at every reduction it takes."""
    cases = {}
    for name in _names():
        if _takes(name, "reduction"):
            for r in ("none", "sum", "mean"):
                cases[f"{name}[{r}]"] = (name, r)
        else:
            cases[name] = (name, None)
    return cases


EMPTY = _empty_cases()


@functools.cache
def _empty_results():
    shape = (0, 5)
    cases = {}
    for label, (name, reduction) in EMPTY.items():
        options = _options(name, shape, EMPTY_OPTIONS)
        if reduction is not None:
            options["reduction"] = reduction
        cases[label] = _fn(name, _inputs(name, shape), options)
    return evaluate(cases), {label: args for label, (_, args) in cases.items()}


@pytest.mark.parametrize(
    "label", [_param("empty", label, label) for label in sorted(EMPTY)]
)
def test_empty_batch(label):
    """A size-0 batch: empty outputs, or 0 for "sum" and "mean"; gradients of the
    inputs' shapes, zero for the array options (nothing uses them)."""
    case = "empty batch"
    results, args = _empty_results()
    value, grads = results[label]
    if value.ndim == 0:
        check(case, label, value, 0.0)
    else:
        assert value.shape[0] == 0
    for g, a in zip(grads, args[label], strict=True):
        assert g.shape == a.shape, (g.shape, a.shape)
        if a.size:
            check(case, label, g, 0.0, "grad")


def _one_class_cases():
    """``{label: (name, z_loss)}``: every loss with a class axis, and again with
    its z-loss where it has one."""
    cases = {}
    for name in _names():
        if _elementwise(name):
            continue  # elementwise: one class is nothing special
        cases[name] = (name, 0.0)
        if _takes(name, "z_loss"):
            cases[f"{name} (z-loss)"] = (name, 0.1)
    return cases


ONE_CLASS = _one_class_cases()
ONE_CLASS_OPTIONS = {
    "label_smoothing": 0.3,
    "weights": True,
    "bias": True,
    "teacher_bias": True,
    "hard_weight": 0.5,
}


def _one_class_call(name, z):
    """``(f, args)``: ``name`` on one class, every probability input derived from
    the logits ``x`` (1, or 0 as a log) so that it is a function of ``x``."""
    x = jnp.array([[0.7], [-3.0], [250.0]])
    arrays = _inputs(name, x.shape, seed=6)
    derive = {}
    logits = 0
    for i, kind in enumerate(_kinds(name)):
        if kind == "logits":
            arrays[i] = x if logits == 0 else -x
            logits += 1
        elif kind == "probs":
            arrays[i], derive[i] = x, jax.nn.softmax
        elif kind in ("log_probs", "teacher_log_probs"):
            arrays[i], derive[i] = x, jax.nn.log_softmax
        elif kind == "class_ids":
            arrays[i] = jnp.zeros(x.shape[:-1], jnp.int32)
    options = _options(name, x.shape, ONE_CLASS_OPTIONS if z == 0 else {"z_loss": z})
    return _fn(name, arrays, options, derive=derive)


def _one_class_expected(name, z, args):
    """The expected value and gradients: 0 (softmax 1), and with a z-loss the
    z l**2 of the logits ``l`` (``hidden @ weight`` for a fused head)."""
    value = 1.0 if name == "softmax" else 0.0
    grads = [np.zeros(np.shape(a)) for a in args]
    if z:
        kinds = _kinds(name)
        if "hidden" in kinds:
            h, w = (f64(args[kinds.index(k)]) for k in ("hidden", "weight"))
            logit = h @ w
            gl = 2 * z * logit
            grads[kinds.index("hidden")] = gl @ w.T
            grads[kinds.index("weight")] = h.T @ gl
        else:
            logit = f64(args[kinds.index("logits")])
            grads[kinds.index("logits")] = 2 * z * logit
        value = z * logit[:, 0] ** 2
    return value, grads


@functools.cache
def _one_class_results():
    cases = {label: _one_class_call(*spec) for label, spec in ONE_CLASS.items()}
    return evaluate(cases), {label: args for label, (_, args) in cases.items()}


@pytest.mark.parametrize(
    "label", [_param("one class", label, label) for label in sorted(ONE_CLASS)]
)
def test_single_class(label):
    """C = 1: the only class has probability 1, so every loss is 0 (the z-loss
    z l**2 aside) with exact gradients, w.r.t. every float input."""
    case = "one class"
    results, args = _one_class_results()
    name, z = ONE_CLASS[label]
    value, grads = results[label]
    expected, expected_grads = _one_class_expected(name, z, args[label])
    check(case, label, value, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        check(case, label, g, e, "grad")


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

# A class mask and one admitted class per row.
MASK = np.array([[True, False, True, False], [True, True, True, False]])
MASK_LABELS = np.array([2, 0])
FILLS = {"float64": ("nan", "inf", "-inf"), "float32": ("1e4",), "bfloat16": ("1e4",)}
WHERE_OPTIONS = {"label_smoothing": 0.1, "z_loss": 1e-3}


def _where_cases():
    """``{label: (name, position)}``: every input of the logits' shape of every
    loss that takes a class mask."""
    cases = {}
    for name in _names():
        if not _takes(name, "where") or REGISTRY[name].where == "rows":
            continue
        positions = [i for i, k in enumerate(_kinds(name)) if k in LOGITS_SHAPED]
        for i in positions:
            cases[_label(name, i, positions)] = (name, i)
    return cases


WHERE_FUNCTIONS = _where_cases()


@functools.cache
def _masked_results(name):
    """``name`` on clean inputs and with each fill under the mask in each input
    under test, stacked by rows (every loss here is row-wise): one case per
    dtype, in one program; ``{(position, dtype, fill): (value, gradients)}``."""
    positions = sorted(i for n, i in WHERE_FUNCTIONS.values() if n == name)
    rows = MASK.shape[0]
    cases, blocks = {}, {}
    for dtype, fills in FILLS.items():
        clean = _inputs(name, MASK.shape, seed=7, dtype=dtype)
        if "class_ids" in _kinds(name):
            clean[_kinds(name).index("class_ids")] = jnp.asarray(MASK_LABELS)
        variants = [(None, "clean", clean)]
        for i in positions:
            for fill in fills:
                dirty = list(clean)
                dirty[i] = jnp.where(MASK, clean[i], jnp.asarray(float(fill), dtype))
                variants.append((i, fill, dirty))
        blocks[dtype] = [(i, fill) for i, fill, _ in variants]
        arrays = [
            jnp.concatenate(a) for a in zip(*(v for _, _, v in variants), strict=True)
        ]
        shape = (len(variants) * rows, MASK.shape[1])
        options = _options(name, shape, WHERE_OPTIONS, dtype=dtype)
        options["where"] = jnp.tile(MASK, (len(variants), 1))
        cases[dtype] = _fn(name, arrays, options)
    out = {}
    for dtype, (value, grads) in evaluate(cases).items():
        for j, (i, fill) in enumerate(blocks[dtype]):
            block = slice(j * rows, (j + 1) * rows)
            out[i, dtype, fill] = (value[block], [g[block] for g in grads])
    return out


def _check_masked(case, label, fill, dtype):
    """Values and every gradient with ``fill`` at the excluded entries equal those
    with harmless entries there, and the gradients are exactly 0 there."""
    name, i = WHERE_FUNCTIONS[label]
    value, grads = _masked_results(name)[i, dtype, fill]
    clean_value, clean_grads = _masked_results(name)[None, dtype, "clean"]
    check(case, label, value, f64(clean_value))
    for g, clean_g in zip(grads, clean_grads, strict=True):
        check(case, label, g, np.where(MASK, f64(clean_g), 0.0), "grad")


def _where_params(test):
    return [_param(test, label, label) for label in sorted(WHERE_FUNCTIONS)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("label", _where_params("1e4 under a where mask"))
def test_huge_masked_out_logits_get_exactly_zero_gradient(label, dtype):
    """1e4 at the entries a `where` mask excludes: exactly zero gradient there and
    the same value and gradients elsewhere as with harmless entries."""
    _check_masked("1e4 under a where mask", label, "1e4", dtype)


@pytest.mark.parametrize("fill", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("label", _where_params("non-finite under a where mask"))
def test_non_finite_entries_excluded_by_where_do_not_leak(label, fill):
    """An excluded entry is excluded whatever it holds (masked padding often
    holds garbage): NaN or +/-inf there changes no value and gets zero gradient."""
    _check_masked(f"{fill} under a where mask", label, fill, "float64")


# -- NaN inputs propagate ------------------------------------------------------------


def _nan_cases():
    """``{label: (name, argument)}``: every float input with a batch axis (a
    position, or an array option that weights examples apart), but the logits
    of losses with rows (test_inf_and_nan_logits_give_nan_for_their_row_only)."""
    cases = {}
    for name in _names():
        kinds = _kinds(name)
        for i, kind in enumerate(kinds):
            if kind in (*INTEGER_KINDS, "weight", "teacher_weight"):
                continue  # not a float input, or shared by every example
            if kind == "logits" and not _elementwise(name):
                continue
            cases[f"{name} ({_positional(name)[i]})"] = (name, i)
        # Class weights apply to the examples labelled with that class only.
        for option in ("weights", "pos_weight"):
            if _takes(name, option) and (option != "weights" or "class_ids" in kinds):
                cases[f"{name} ({option})"] = (name, option)
    return cases


NAN_INPUTS = _nan_cases()


@functools.cache
def _nan_results():
    shape = (2, 3)
    cases = {}
    for label, (name, arg) in NAN_INPUTS.items():
        arrays = _inputs(name, shape, seed=8)
        wanted = {arg: True} if isinstance(arg, str) else {}
        options = _options(name, shape, wanted)
        for state in ("clean", "dirty"):
            a, kw = list(arrays), dict(options)
            if state == "dirty":
                if isinstance(arg, int):
                    a[arg] = a[arg].at[(0,) * a[arg].ndim].set(NAN)
                else:  # class 0 is example 0's label, and only its
                    kw[arg] = kw[arg].at[(0,) * kw[arg].ndim].set(NAN)
            cases[label, state] = _fn(name, a, kw, free=[])
    return evaluate(cases, grads=False)


def _per_example(value):
    """Values of an elementwise loss summed over the class axis."""
    return value if value.ndim < 2 else np.sum(f64(value), axis=-1)


@pytest.mark.parametrize(
    "label", [_param("NaN inputs", label, label) for label in sorted(NAN_INPUTS)]
)
def test_nan_inputs_propagate(label):
    """A NaN in any input makes its example NaN and leaves the others exact."""
    case = "NaN inputs"
    value = _per_example(_nan_results()[label, "dirty"][0])
    clean = _per_example(_nan_results()[label, "clean"][0])
    check_finite(case, label, clean)
    check(case, label, value, [NAN, f64(clean)[1]])


# -- trace-time errors: one parametrized test per bad-input kind -------------------

BAD_SHAPE = (2, 3)  # the logits' shape of every bad-input call
# Options that are static Python numbers: a bad value per kind of check, and a
# traced value (they select the compiled program).
BAD_NUMBERS = {
    "label_smoothing": [
        ("label_smoothing outside [0, 1]", v) for v in (1.5, -0.1, NAN)
    ],
    "z_loss": [("z_loss negative", -1.0)],
    "base": [("base not a valid logarithm base", v) for v in (1.0, 0.0, -2.0)],
    "temperature": [
        ("temperature not positive", 0.0),
        ("temperature not positive", -1.0),
        ("temperature not finite", INF),
    ],
    "beta": [("beta outside [0, 1]", v) for v in (1.5, -0.1, NAN)],
    "alpha": [("alpha outside [0, 1]", v) for v in (1.5, -0.1)],
    "epsilon": [("epsilon not finite", v) for v in (INF, NAN)],
    "gamma": [("gamma negative", -1.0), ("gamma not finite", INF)],
    "hard_weight": [("hard_weight negative", -1.0)],
    "soft_weight": [("soft_weight negative", -1.0)],
    "softcap": [("softcap not positive", v) for v in (0.0, -1.0)],
    "filter_eps": [("filter_eps not positive", v) for v in (0.0, -1.0)],
}
# Other options: (kind, value, error, what the message must show).
BAD_OPTIONS = {
    "reduction": [("reduction unknown", "avg", ValueError, "'avg'")],
    "ignore_index": [
        ("ignore_index not an integer", "a", TypeError, "'a'"),
        ("ignore_index not an integer", 1.5, TypeError, "1.5"),
    ],
    "axis": [
        ("axis out of range", 2, ValueError, "2"),
        ("axis out of range", -3, ValueError, "-3"),
        ("axis not an integer", "a", TypeError, "'a'"),
        ("axis not an integer", 1.5, TypeError, "1.5"),
        ("axis repeated", (1, -1), ValueError, "(1, -1)"),
    ],
    "block_size": [
        ("block_size not positive", 0, ValueError, "0"),
        ("block_size not positive", 2.5, ValueError, "2.5"),
    ],
    "implementation": [("implementation unknown", "cuda", ValueError, "'cuda'")],
    "return_aux": [("return_aux not a bool", 1, TypeError, "1")],
    "low_memory": [("low_memory not a bool", "no", TypeError, "'no'")],
    "return_entropy": [("return_entropy not a bool", "yes", TypeError, "'yes'")],
    "tail": [("tail unknown", "exact", ValueError, "'exact'")],
}
# Options whose bad values only show inside shard_map (tests/test_sharded.py).
NO_BAD_INPUT = ("axis_name",)
# Options that must be static numbers: the signature's float annotations.
STATIC_NUMBER = ("float", "float | None")


def _wrong_shape(kind, a):
    """An input of ``kind`` whose shape the loss must reject, given a good ``a``."""
    if kind in LOGITS_SHAPED:
        return jnp.ones((*a.shape[:-1], a.shape[-1] + 1), a.dtype)
    if kind in ("weight", "teacher_weight"):
        return jnp.ones((a.shape[0] + 1, a.shape[1]), a.dtype)
    if kind == "teacher_hidden":
        return jnp.ones((a.shape[0] + 1, *a.shape[1:]), a.dtype)
    if kind == "teacher_log_probs":  # not the ids' k
        return jnp.ones((*a.shape[:-1], a.shape[-1] + 1), a.dtype)
    raise AssertionError(f"no wrong shape for kind {kind!r}: add it to _wrong_shape")


def _caller(name, arrays, options):
    public = REGISTRY[name].public
    return lambda: public(*arrays, **options)


def _bad_inputs_of(name):
    """``(kind, function, call, error, argument, received)`` for every bad input
    that ``name``'s input kinds and signature admit."""
    rows = []
    kinds, params = _kinds(name), REGISTRY[name].parameters
    arrays = _inputs(name, BAD_SHAPE)

    def bad(kind, error, argument, received, *, at=None, value=None, **opts):
        a = list(arrays)
        if at is not None:
            a[at] = value
        rows.append((kind, name, _caller(name, a, opts), error, argument, received))

    # Positional inputs: dtype and shape.
    for i, (param, k) in enumerate(zip(_positional(name), kinds, strict=True)):
        a = arrays[i]
        if k in INTEGER_KINDS:
            for v, shown in ((jnp.ones(a.shape), "float"), (a > 0, "bool")):
                bad(
                    "integer labels not integers",
                    TypeError,
                    param,
                    shown,
                    at=i,
                    value=v,
                )
            wrong = jnp.zeros((a.shape[0] + 1,), a.dtype)
            bad(
                "integer labels of the wrong shape",
                ValueError,
                param,
                str(wrong.shape),
                at=i,
                value=wrong,
            )
            continue
        order = ("input", "second input", "later input")[min(i, 2)]
        if k != "binary":  # sigmoid labels may be integers or booleans (cast)
            bad(
                f"{order} not floating point",
                TypeError,
                param,
                "int32",
                at=i,
                value=a.astype(jnp.int32),
            )
        if i > 0:
            wrong = _wrong_shape(k, a)
            bad(
                f"{order} of another shape",
                ValueError,
                param,
                str(wrong.shape),
                at=i,
                value=wrong,
            )
    c = BAD_SHAPE[-1]
    batch = arrays[0].shape[:-1]
    # Array options.
    if "weights" in params:
        bad(
            "weights of the wrong shape",
            ValueError,
            "weights",
            f"({c + 1},)",
            weights=jnp.ones(c + 1),
        )
        bad(
            "weights not floating point",
            TypeError,
            "weights",
            "int32",
            weights=jnp.ones(c, jnp.int32),
        )
    if "pos_weight" in params:
        bad(
            "pos_weight not broadcastable",
            ValueError,
            "pos_weight",
            f"({c + 1},)",
            pos_weight=jnp.ones(c + 1),
        )
        bad(
            "pos_weight not floating point",
            TypeError,
            "pos_weight",
            "int32",
            pos_weight=jnp.ones(c, jnp.int32),
        )
    if "token_weights" in params:
        bad(
            "token_weights of the wrong shape",
            ValueError,
            "token_weights",
            f"({batch[0] + 1},)",
            token_weights=jnp.ones((batch[0] + 1,)),
        )
        bad(
            "token_weights not floating point",
            TypeError,
            "token_weights",
            "int32",
            token_weights=jnp.ones(batch, jnp.int32),
        )
    for option in ("bias", "teacher_bias"):
        if option in params:
            bad(
                "bias of the wrong shape",
                ValueError,
                option,
                f"({c + 1},)",
                **{option: jnp.ones(c + 1)},
            )
            bad(
                "bias not floating point",
                TypeError,
                option,
                "int32",
                **{option: jnp.ones(c, jnp.int32)},
            )
    if "where" in params:
        rows_only = REGISTRY[name].where == "rows"
        mask_shape = batch if rows_only else BAD_SHAPE
        bad(
            "where not boolean", TypeError, "where", "float", where=jnp.ones(mask_shape)
        )
        wrong = (batch[0] + 1,) if rows_only else (c + 1,)
        bad(
            "where of a shape that does not broadcast",
            ValueError,
            "where",
            str(wrong),
            where=jnp.ones(wrong, bool),
        )
    # Static options.
    for option, cases in BAD_OPTIONS.items():
        if option in params:
            for kind, v, error, shown in cases:
                bad(kind, error, option, shown, **{option: v})
    for option, cases in BAD_NUMBERS.items():
        if option in params:
            for kind, v in cases:
                bad(kind, ValueError, option, repr(v), **{option: v})
    for option, p in params.items():
        if p.annotation in STATIC_NUMBER:
            if p.annotation == "float":
                bad(
                    f"{option} not a number",
                    TypeError,
                    option,
                    "None",
                    **{option: None},
                )
            rows.append(
                (
                    f"{option} traced",
                    name,
                    _traced(name, arrays, option),
                    TypeError,
                    option,
                    "Tracer",
                )
            )
    if "ignore_index" in params:
        rows.append(
            (
                "ignore_index traced",
                name,
                _traced(name, arrays, "ignore_index", 1),
                TypeError,
                "ignore_index",
                "Tracer",
            )
        )
    return rows


def _bad_input_options(name):
    """The options of ``name`` that _bad_inputs_of gives a bad value."""
    params = REGISTRY[name].parameters
    covered = {*ARRAY_OPTIONS, "where", *BAD_OPTIONS, *BAD_NUMBERS, *NO_BAD_INPUT}
    static = {k for k, p in params.items() if p.annotation in STATIC_NUMBER}
    return covered | static


def test_every_option_has_a_bad_input():
    for name in _names():
        options = set(REGISTRY[name].parameters) - set(_positional(name))
        missing = options - _bad_input_options(name)
        assert not missing, f"{name}: no bad value for {missing}; add one above"


def _traced(name, arrays, option, value=0.5):
    """Calls ``name`` with ``option`` traced under jit."""
    public = REGISTRY[name].public
    return lambda: jax.jit(lambda v: public(*arrays, **{option: v}))(value)


def _bad_inputs():
    return [row for name in _names() for row in _bad_inputs_of(name)]


BAD_INPUTS = _bad_inputs()


@pytest.mark.parametrize(
    ("kind", "function", "call", "error", "argument", "received"),
    [
        _param("bad input", f"{k}-{f}-{a}-{r}", k, f, c, e, a, r)
        for k, f, c, e, a, r in BAD_INPUTS
    ],
)
def test_bad_input_raises_at_trace_time(
    kind, function, call, error, argument, received
):
    """Raised while tracing (``jax.eval_shape`` runs nothing), of the right type,
    naming the argument and showing the value received."""
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


def _fused_heads():
    return [n for n in _names() if "token_weights" in REGISTRY[n].parameters]


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    ("name", "low_memory"),
    [
        (name, low)
        for name in _fused_heads()
        for low in (False, True)
        if not low or "low_memory" in REGISTRY[name].parameters
    ],
)
def test_token_weights_of_excluded_tokens_do_not_leak(name, low_memory, reduction):
    """NaN, inf and huge weights on tokens excluded by ``where`` or
    ``ignore_index`` reach neither the loss nor a gradient; a weight of 0 on a
    counted token removes it from the sum (not from the mean's count); a
    negative weight (an advantage) flips its gradient."""
    arrays = _inputs(name, (6, 9), seed=3)
    ids = _positional(name)[_kinds(name).index("class_ids")]
    labels = arrays[_kinds(name).index("class_ids")].at[1].set(-100)
    arrays[_kinds(name).index("class_ids")] = labels
    keep = jnp.array([True, True, False, True, True, True])
    tw = jnp.array([1.0, jnp.nan, jnp.inf, 0.0, -2.0, 1e30])
    kw = dict(where=keep, reduction=reduction)
    if low_memory:
        kw["low_memory"] = True
    if "hard_weight" in REGISTRY[name].parameters:
        kw["hard_weight"] = 0.5
    free = _float_positions(name)[:2]

    def loss(weights):
        def f(*values):
            a = list(arrays)
            for i, v in zip(free, values, strict=True):
                a[i] = v
            out = REGISTRY[name].public(*a, token_weights=weights, **kw)
            return jnp.sum(out)

        return jax.value_and_grad(f, tuple(range(len(free))))(
            *(arrays[i] for i in free)
        )

    assert ids in ("labels",)
    # The huge weight sits on a counted token: finite loss, large gradients.
    tw = tw.at[5].set(3.0)
    value, grads = loss(tw)
    assert bool(jnp.isfinite(value)) and all(
        bool(jnp.all(jnp.isfinite(g))) for g in grads
    )
    # Same as the weights with the excluded tokens' entries set to 0.
    clean = jnp.where(keep & (labels != -100), tw, 0.0)
    want, want_grads = loss(clean)
    np.testing.assert_allclose(value, want, rtol=1e-12)
    for g, e in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-12, atol=1e-300)
    # An advantage of -2 is the token's gradient times -2.
    one = jnp.zeros(6).at[4].set(1.0)
    _, g_one = loss(one)
    _, g_neg = loss(-2.0 * one)
    for a, b in zip(g_neg, g_one, strict=True):
        np.testing.assert_allclose(a, -2.0 * b, rtol=1e-12, atol=1e-300)

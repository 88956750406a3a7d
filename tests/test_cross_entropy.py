"""Softmax cross-entropy on logits: parity with optax and PyTorch, gradients against the
plain-JAX reference, transforms, masks, dtypes and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxent
from jaxent import reference
from tests.helpers import assert_close, int_labels, logits, pairwise, probabilities

INT_CE = jaxent.softmax_cross_entropy_with_integer_labels
SOFT_CE = jaxent.softmax_cross_entropy
BCE = jaxent.sigmoid_binary_cross_entropy


def _loss_and_grads(f, argnums, *args, **kw):
    """A generic scalar of the loss (so every output entry gets its own cotangent)
    and its gradient w.r.t. ``argnums``."""

    def scalar(*a):
        out = f(*a, **kw)
        return jnp.sum(jnp.sin(out) + out)

    return jax.value_and_grad(scalar, argnums)(*args)


# -- parity with optax -------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 5), -1), ((4, 3, 5), 1), ((2, 3, 4), (1, 2)), ((7,), 0)]
)
@pytest.mark.parametrize("where", ["none", "class", "batch"])
def test_soft_labels_match_optax(shape, axis, where):
    x = logits(0, shape)
    y = probabilities(1, shape, axis=axis)
    mask = None
    if where == "class":
        mask = jnp.asarray(np.random.default_rng(2).uniform(size=shape) > 0.3)
    elif where == "batch" and len(shape) > 1:
        axes = (axis,) if isinstance(axis, int) else axis
        batch = [
            d for i, d in enumerate(shape) if i not in [a % len(shape) for a in axes]
        ]
        mask = jnp.asarray(np.random.default_rng(2).uniform(size=batch) > 0.3)
    assert_close(
        SOFT_CE(x, y, axis=axis, where=mask),
        optax.softmax_cross_entropy(x, y, axis=axis, where=mask),
    )


@pytest.mark.parametrize(
    ("shape", "axis"), [((6, 5), -1), ((4, 5, 3), 1), ((2, 3, 4), (1, 2))]
)
@pytest.mark.parametrize("where", ["none", "class", "batch"])
def test_integer_labels_match_optax(shape, axis, where):
    x = logits(0, shape)
    axes = (axis,) if isinstance(axis, int) else axis
    axes = [a % len(shape) for a in axes]
    batch = [d for i, d in enumerate(shape) if i not in axes]
    labels = int_labels(1, batch, int(np.prod([shape[a] for a in axes])))
    mask = None
    if where == "class":
        mask = jnp.asarray(np.random.default_rng(2).uniform(size=shape) > 0.3)
    elif where == "batch":
        mask = jnp.asarray(np.random.default_rng(2).uniform(size=batch) > 0.3)
    ours = np.asarray(INT_CE(x, labels, axis=axis, where=mask))
    theirs = optax.softmax_cross_entropy_with_integer_labels(
        x, labels, axis=axis, where=mask
    )
    # A label on a class the mask excludes is +inf here (optax reads the
    # excluded logit anyway); every other example agrees.
    counted = np.isfinite(ours)
    assert np.all(ours[~counted] == np.inf)
    assert counted.mean() > 0.5
    assert_close(ours[counted], np.asarray(theirs)[counted])


# -- gradients against jax.grad of the plain reference (float64) --------------
#
# Every pair of option values (reduction included) in at least one case. Finite
# differences of these option mixes are in tests/test_properties.py.
INT_OPTIONS = pairwise(
    weights=[False, True],
    ignore_index=[None, 2],
    label_smoothing=[0.0, 0.15],
    z_loss=[0.0, 1e-2],
    where=["none", "batch", "class"],
    reduction=["none", "sum", "mean"],
)


def _ids(opts: dict) -> str:
    return "-".join(f"{v}" for v in opts.values())


def _int_case(opts, shape=(6, 5)):
    opts = dict(opts)
    c = shape[1]
    kw = {
        "ignore_index": opts["ignore_index"],
        "label_smoothing": opts["label_smoothing"],
    }
    kw["z_loss"] = opts["z_loss"]
    if opts["where"] == "batch":
        kw["where"] = jnp.array([True, False, True, True, True, True])
    elif opts["where"] == "class":
        mask = np.random.default_rng(3).uniform(size=shape) > 0.3
        mask[:, 0] = True
        kw["where"] = jnp.asarray(mask)
    labels = jnp.array([0, 1, 2, 3, 4, 0], jnp.int32)
    weights = jnp.linspace(0.5, 2.0, c) if opts["weights"] else None
    return logits(0, shape), labels, weights, kw


@pytest.mark.slow
@pytest.mark.parametrize("opts", INT_OPTIONS, ids=_ids)
def test_integer_labels_grads(opts):
    reduction = opts["reduction"]
    x, labels, weights, kw = _int_case(opts)
    args, argnums = (x, labels), (0,)
    if weights is not None:
        kw["weights"] = weights

    def call(f):
        def g(x, w=None):
            extra = {} if w is None else {"weights": w}
            return f(x, labels, reduction=reduction, **{**kw, **extra})

        return g

    args = (x,) if weights is None else (x, weights)
    argnums = tuple(range(len(args)))
    value, grads = _loss_and_grads(call(INT_CE), argnums, *args)
    value_ref, grads_ref = _loss_and_grads(
        call(reference.softmax_cross_entropy_with_integer_labels), argnums, *args
    )
    assert_close(value, value_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, kind="grad")


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts",
    pairwise(
        label_smoothing=[0.0, 0.2],
        z_loss=[0.0, 1e-2],
        where=["none", "batch", "class"],
        reduction=["none", "sum", "mean"],
    ),
    ids=_ids,
)
def test_soft_labels_grads(opts):
    label_smoothing, z_loss = opts["label_smoothing"], opts["z_loss"]
    where, reduction = opts["where"], opts["reduction"]
    x = logits(0, (4, 6))
    y = probabilities(1, (4, 6)) * jnp.array([1.0, 0.5, 1.0, 2.0])[:, None]
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction)
    if where == "batch":
        kw["where"] = jnp.array([True, False, True, True])
    elif where == "class":
        kw["where"] = jnp.asarray(np.random.default_rng(3).uniform(size=(4, 6)) > 0.3)
    value, grads = _loss_and_grads(SOFT_CE, (0, 1), x, y, **kw)
    value_ref, grads_ref = _loss_and_grads(
        reference.softmax_cross_entropy, (0, 1), x, y, **kw
    )
    assert_close(value, value_ref)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, kind="grad")


def test_analytic_softmax_minus_y():
    x = logits(0, (8, 5))
    labels = int_labels(1, (8,), 5)
    g = jax.grad(lambda x: INT_CE(x, labels, reduction="mean"))(x)
    assert_close(g, (jax.nn.softmax(x) - jax.nn.one_hot(labels, 5)) / 8, kind="grad")
    y = probabilities(2, (8, 5)) * 2.0
    g = jax.grad(lambda x: SOFT_CE(x, y, reduction="sum"))(x)
    assert_close(g, jax.nn.softmax(x) * y.sum(-1, keepdims=True) - y, kind="grad")
    g_y = jax.grad(lambda y: SOFT_CE(x, y, reduction="sum"))(y)
    assert_close(g_y, -jax.nn.log_softmax(x), kind="grad")


# -- PyTorch semantics ---------------------------------------------------------


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")


def _t(torch, a):
    return torch.from_numpy(np.array(a))


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts",
    pairwise(
        weights=[False, True],
        ignore_index=[None, 1],
        label_smoothing=[0.0, 0.1, 1.0],
        reduction=["none", "sum", "mean"],
        shape=["NC", "NCHW"],
    ),
    ids=_ids,
)
def test_integer_labels_match_torch(torch, opts):
    weights, ignore_index = opts["weights"], opts["ignore_index"]
    label_smoothing, reduction = opts["label_smoothing"], opts["reduction"]
    shape = {"NC": (7, 5), "NCHW": (3, 5, 2, 2)}[opts["shape"]]
    x = logits(0, shape)
    batch = (shape[0], *shape[2:])
    labels = np.array(int_labels(1, batch, shape[1]))
    labels.flat[0] = 1  # make sure ignore_index=1 ignores something
    w = jnp.linspace(0.5, 2.0, shape[1]) if weights else None
    kw = dict(
        axis=1, weights=w, ignore_index=ignore_index, label_smoothing=label_smoothing
    )
    ours, g = jax.value_and_grad(
        lambda x: jnp.sum(INT_CE(x, jnp.asarray(labels), reduction=reduction, **kw))
    )(x)
    xt = _t(torch, x).requires_grad_()
    theirs = torch.nn.functional.cross_entropy(
        xt,
        _t(torch, labels).long(),
        weight=None if w is None else _t(torch, w),
        ignore_index=-100 if ignore_index is None else ignore_index,
        label_smoothing=label_smoothing,
        reduction=reduction,
    )
    theirs.sum().backward()
    assert_close(ours, theirs.detach().numpy().sum())
    assert_close(g, xt.grad.numpy(), kind="grad")
    values = INT_CE(x, jnp.asarray(labels), reduction=reduction, **kw)
    assert_close(values, theirs.detach().numpy())


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_soft_labels_match_torch(torch, label_smoothing, reduction):
    x = logits(0, (4, 6, 3))
    y = probabilities(1, (4, 6, 3), axis=1)
    ours = SOFT_CE(x, y, axis=1, label_smoothing=label_smoothing, reduction=reduction)
    theirs = torch.nn.functional.cross_entropy(
        _t(torch, x), _t(torch, y), label_smoothing=label_smoothing, reduction=reduction
    )
    assert_close(ours, theirs.numpy())


# -- transforms ----------------------------------------------------------------


@pytest.mark.slow
def test_transforms_integer_labels():
    x = logits(0, (3, 4, 5))
    labels = int_labels(1, (3, 4), 5)
    f = lambda x, y: INT_CE(x, y, label_smoothing=0.1, z_loss=1e-3)  # noqa: E731
    # Eager once; the rest is compiled (an eager call of each transform would
    # compile every primitive again for its shapes, at no gain in coverage).
    expected = jax.jit(
        lambda x, y: reference.softmax_cross_entropy_with_integer_labels(
            x, y, label_smoothing=0.1, z_loss=1e-3
        )
    )(x, labels)
    jitted = jax.jit(f)
    assert_close(f(x, labels), expected)
    assert_close(jitted(x, labels), expected)
    assert_close(jax.jit(jax.vmap(f))(x, labels), expected)
    per_example = jnp.stack(
        [jitted(x[i, j], labels[i, j]) for i in range(3) for j in range(4)]
    )
    assert_close(per_example.reshape(3, 4), expected)
    assert_close(jax.jit(jax.checkpoint(f))(x, labels), expected)
    scanned = jax.jit(lambda x, y: jax.lax.scan(lambda c, xy: (c, f(*xy)), 0.0, (x, y)))
    assert_close(scanned(x, labels)[1], expected)

    mean = lambda x: INT_CE(x, labels, reduction="mean", label_smoothing=0.1)  # noqa: E731
    mean_ref = lambda x: reference.softmax_cross_entropy_with_integer_labels(  # noqa: E731
        x, labels, reduction="mean", label_smoothing=0.1
    )
    w = logits(2, x.shape)

    @jax.jit
    def derivatives(x):
        return {
            "value_and_grad": jax.value_and_grad(mean)(x),
            "value_and_grad_ref": jax.value_and_grad(mean_ref)(x),
            "checkpointed": jax.grad(jax.checkpoint(mean))(x),
            "hvp": jax.grad(lambda x: jnp.vdot(jax.grad(mean)(x), w))(x),
            "hvp_ref": jax.grad(lambda x: jnp.vdot(jax.grad(mean_ref)(x), w))(x),
            "per_example": jax.vmap(jax.grad(lambda x, y: INT_CE(x, y)))(
                x.reshape(12, 5), labels.reshape(12)
            ),
            "sum": jax.grad(lambda x: INT_CE(x, labels, reduction="sum"))(x),
            "tangent_ref": jax.jvp(mean_ref, (x,), (w,))[1],
        }

    d = derivatives(x)
    (v, g), (v_ref, g_ref) = d["value_and_grad"], d["value_and_grad_ref"]
    assert_close(v, v_ref)
    assert_close(g, g_ref, kind="grad")
    assert_close(d["checkpointed"], g_ref, kind="grad")
    assert_close(d["hvp"], d["hvp_ref"], kind="grad")
    assert_close(d["per_example"].reshape(x.shape), d["sum"], kind="grad")
    assert_close(d["tangent_ref"], jnp.vdot(g_ref, w))
    assert "custom_vjp_call" in str(jax.make_jaxpr(mean)(x))
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(mean, (x,), (w,))


@pytest.mark.slow
def test_segmentation_axis():
    x = logits(0, (2, 5, 3, 4))
    labels = int_labels(1, (2, 3, 4), 5)
    moved = jnp.moveaxis(x, 1, -1)

    @jax.jit
    def both(x, moved):
        mean = lambda x, axis: INT_CE(x, labels, axis=axis, reduction="mean")  # noqa: E731
        return (
            (INT_CE(x, labels, axis=1), INT_CE(moved, labels)),
            (jax.grad(mean)(x, 1), jax.grad(mean)(moved, -1)),
        )

    (value, value_moved), (g, g_moved) = both(x, moved)
    assert_close(value, value_moved)
    assert_close(g, jnp.moveaxis(g_moved, -1, 1), kind="grad")


# -- masked vocabularies, extremes, dtypes --------------------------------------


def test_masked_vocabulary_gives_finite_values_and_zero_grads():
    x = logits(0, (4, 6)).at[:, 3:].set(-jnp.inf)
    labels = jnp.array([0, 1, 2, 0])
    y = jax.nn.one_hot(labels, 6, dtype=x.dtype)
    for f, target in [(INT_CE, labels), (SOFT_CE, y)]:
        loss, (gx,) = _loss_and_grads(f, (0,), x, target)
        assert np.isfinite(loss)
        assert np.all(np.asarray(gx)[:, 3:] == 0) and np.all(np.isfinite(gx))
    g_y = jax.grad(lambda y: SOFT_CE(x, y, reduction="sum"))(y)
    assert np.all(np.asarray(g_y)[:, 3:] == 0) and np.all(np.isfinite(g_y))
    kl = lambda x: jaxent.softmax_kl_divergence(x, x + 1.0, reduction="sum")  # noqa: E731
    assert np.isfinite(kl(x)) and np.all(np.asarray(jax.grad(kl)(x))[:, 3:] == 0)
    # A label on a masked class: the documented +inf.
    assert INT_CE(x, jnp.array([4, 1, 2, 0]))[0] == jnp.inf


@pytest.mark.parametrize(
    ("dtype", "big"), [("float32", 1e30), ("float16", 3e4), ("bfloat16", 1e30)]
)
def test_huge_logits_do_not_overflow(dtype, big):
    x = jnp.array([[big, 0.0, -big], [big, big, 0.0]], dtype)
    labels = jnp.array([0, 1])
    out = INT_CE(x, labels)
    assert_close(out, jnp.array([0.0, np.log(2.0)]), dtype=dtype)
    g = jax.grad(lambda x: INT_CE(x, labels, reduction="sum"))(x)
    assert np.all(np.isfinite(np.asarray(g, np.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16", "bfloat16"])
def test_dtypes_in_and_out(dtype):
    x = logits(0, (16, 10), dtype=dtype)
    labels = int_labels(1, (16,), 10)
    y = jax.nn.one_hot(labels, 10, dtype=dtype)
    exact = reference.softmax_cross_entropy_with_integer_labels(
        x.astype(jnp.float64), labels
    )
    for out in [INT_CE(x, labels), SOFT_CE(x, y)]:
        assert out.dtype == jnp.dtype(dtype)
    assert_close(INT_CE(x, labels), exact, dtype=dtype)
    g = jax.grad(lambda x: INT_CE(x, labels, reduction="mean"))(x)
    assert g.dtype == jnp.dtype(dtype)


@pytest.mark.slow
def test_low_precision_loss_is_reduced_in_float32():
    # 4096 bf16 rows: a bf16 accumulation would be off by far more than one
    # final bf16 rounding of the float32 mean.
    x = logits(0, (4096, 32), dtype="bfloat16")
    labels = int_labels(1, (4096,), 32)
    mean = INT_CE(x, labels, reduction="mean")
    exact = jnp.mean(
        reference.softmax_cross_entropy_with_integer_labels(
            x.astype(jnp.float64), labels
        )
    )
    assert abs(float(mean) - float(exact)) <= float(exact) * 2**-8


@pytest.mark.slow
def test_mean_over_nothing_is_zero_with_zero_grad():
    x = logits(0, (3, 4))
    labels = jnp.array([2, 2, 2])
    f = lambda x: INT_CE(x, labels, ignore_index=2, reduction="mean")  # noqa: E731
    assert f(x) == 0
    assert np.all(np.asarray(jax.grad(f)(x)) == 0)
    y = probabilities(1, (3, 4))
    nothing = jnp.zeros(3, bool)
    g = lambda x: SOFT_CE(x, y, where=nothing, reduction="mean")  # noqa: E731
    assert g(x) == 0 and np.all(np.asarray(jax.grad(g)(x)) == 0)


def test_out_of_range_labels_are_nan():
    x = logits(0, (3, 4))
    out = INT_CE(x, jnp.array([4, -1, 0]))
    assert np.isnan(out[0]) and np.isnan(out[1]) and np.isfinite(out[2])
    g = jax.grad(lambda x: INT_CE(x, jnp.array([4, 1, 0]), reduction="sum"))(x)
    assert np.all(np.isnan(np.asarray(g)[0])) and np.all(np.isfinite(np.asarray(g)[1:]))
    # An ignored example is never NaN, whatever its label.
    assert np.isfinite(
        INT_CE(x, jnp.array([-100, 1, 0]), ignore_index=-100, reduction="mean")
    )


def test_residuals_are_logits_and_per_row_terms():
    n, c = 8, 16
    x = logits(0, (n, c))
    cases = [
        lambda x: INT_CE(
            x,
            int_labels(1, (n,), c),
            reduction="mean",
            label_smoothing=0.1,
            z_loss=1e-3,
        ),
        lambda x: SOFT_CE(x, probabilities(2, (n, c)), reduction="mean"),
        lambda x: jaxent.softmax_kl_divergence(x, x * 0.5, reduction="mean"),
        lambda x: jnp.sum(jaxent.softmax_entropy(x)),
        lambda x: jnp.sum(jaxent.log_softmax(x)),
    ]
    for f in cases:
        _, vjp = jax.vjp(f, x)
        big = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if leaf.size >= n * c]
        # The logits themselves (plus soft labels / a second logits input).
        assert len(big) <= 2, [leaf.shape for leaf in big]


@pytest.mark.parametrize(
    "loss",
    [
        lambda x, y: INT_CE(x, jnp.argmax(y, -1), label_smoothing=0.1),
        lambda x, y: SOFT_CE(x, y),
        lambda x, y: BCE(x, y),
        lambda x, y: jaxent.softmax_kl_divergence(x, y),
        lambda x, y: jaxent.softmax_entropy(x),
        lambda x, y: jaxent.log_softmax(x),
        lambda x, y: jaxent.softmax(x),
    ],
    ids=[
        "int",
        "soft",
        "bce",
        "softmax_kl",
        "softmax_entropy",
        "log_softmax",
        "softmax",
    ],
)
def test_low_precision_residuals_are_the_inputs(loss):
    """bf16 inputs are saved as they are, not as float32 copies."""
    n, c = 8, 16
    x = logits(0, (n, c)).astype(jnp.bfloat16)
    y = probabilities(1, (n, c)).astype(jnp.bfloat16)
    _, vjp = jax.vjp(loss, x, y)
    big = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if leaf.size >= n * c]
    assert big and all(leaf.dtype == jnp.bfloat16 for leaf in big), [
        (leaf.shape, leaf.dtype) for leaf in big
    ]


def test_label_smoothing_builds_no_one_hot():
    n, c = 8, 16
    x = logits(0, (n, c))
    labels = int_labels(1, (n,), c)
    jaxpr = jax.make_jaxpr(
        jax.value_and_grad(
            lambda x: INT_CE(x, labels, label_smoothing=0.1, reduction="mean")
        )
    )(x)
    for eqn in jaxpr.jaxpr.eqns:
        operands = [v.aval for v in eqn.invars if hasattr(v.aval, "shape")]
        # No N x C one-hot: neither a bool-to-float conversion of that size ...
        if eqn.primitive.name == "convert_element_type":
            assert not (operands[0].dtype == jnp.bool_ and operands[0].shape == (n, c))
        # ... nor a scatter of more than one update per row.
        if "scatter" in eqn.primitive.name:
            assert operands[-1].size == n, eqn


# -- argument errors -------------------------------------------------------------

BAD_INPUTS = [
    (
        SOFT_CE,
        (jnp.ones((2, 3)), jnp.ones((2, 4))),
        {},
        ValueError,
        r"`labels`.*\(2, 3\).*\(2, 4\)",
    ),
    (
        SOFT_CE,
        (jnp.ones((2, 3)), jnp.ones((2, 3), jnp.int32)),
        {},
        TypeError,
        r"`labels`.*int32",
    ),
    (
        SOFT_CE,
        (jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3))),
        {},
        TypeError,
        r"`logits`.*int32",
    ),
    (INT_CE, (jnp.ones((2, 3)), jnp.ones(2)), {}, TypeError, r"`labels`.*float"),
    (
        INT_CE,
        (jnp.ones((2, 3)), jnp.ones(3, jnp.int32)),
        {},
        ValueError,
        r"`labels`.*\(2,\).*\(3,\)",
    ),
    (
        INT_CE,
        (jnp.ones((2, 3)), jnp.ones(2, jnp.int32)),
        {"reduction": "avg"},
        ValueError,
        r"`reduction`.*'avg'",
    ),
    (
        INT_CE,
        (jnp.ones((2, 3)), jnp.ones(2, jnp.int32)),
        {"label_smoothing": 1.5},
        ValueError,
        r"`label_smoothing`.*1.5",
    ),
    (
        INT_CE,
        (jnp.ones((2, 3)), jnp.ones(2, jnp.int32)),
        {"axis": 3},
        ValueError,
        r"`axis`=3",
    ),
    (
        INT_CE,
        (jnp.ones((2, 3)), jnp.ones(2, jnp.int32)),
        {"weights": jnp.ones(4)},
        ValueError,
        r"`weights`.*\(3,\).*\(4,\)",
    ),
    (
        INT_CE,
        (jnp.ones((2, 3)), jnp.ones(2, jnp.int32)),
        {"z_loss": -1.0},
        ValueError,
        r"`z_loss`.*-1.0",
    ),
    (
        INT_CE,
        (jnp.ones((2, 3)), jnp.ones(2, jnp.int32)),
        {"where": jnp.ones(3, bool)},
        ValueError,
        r"`where`.*\(3,\)",
    ),
]


@pytest.mark.parametrize(("f", "args", "kw", "error", "match"), BAD_INPUTS)
def test_bad_input_raises_at_trace_time(f, args, kw, error, match):
    with pytest.raises(error, match=match):
        jax.jit(lambda *a: f(*a, **kw)).lower(*args)


@pytest.mark.parametrize("dtype", ["uint8", "int16", "int32", "int64"])
def test_label_dtypes(dtype):
    # 300 classes: uint8 ids must not wrap when compared with the class count.
    x = logits(0, (2, 300))
    labels = jnp.array([255, 3], dtype)
    expected = optax.softmax_cross_entropy_with_integer_labels(
        x, labels.astype(jnp.int32)
    )
    assert_close(INT_CE(x, labels), expected)
    assert_close(
        reference.softmax_cross_entropy_with_integer_labels(x, labels), expected
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts", INT_OPTIONS[::5], ids=lambda o: "-".join(f"{v}" for v in o.values())
)
def test_accelerator_formulation_matches(opts, monkeypatch):
    """Off CPU the target logit is found by comparison (no gather/scatter) and no
    fusion barriers are placed: chosen when lowering, and same values and
    gradients (the accelerator branches run here by forcing them)."""
    x, labels, weights, kw = _int_case(opts)
    kw = dict(kw, weights=weights, reduction=opts["reduction"])

    def loss(x):
        return INT_CE(x, labels, **kw)

    def lowered(platform):
        grad = jax.jit(jax.grad(lambda x: loss(x).sum()))
        return grad.trace(x).lower(lowering_platforms=(platform,)).as_text()

    value, grads = _loss_and_grads(loss, 0, x)
    assert "scatter" in lowered("cpu") and "optimization_barrier" in lowered("cpu")
    cuda = lowered("cuda")
    assert "scatter" not in cuda and "optimization_barrier" not in cuda
    monkeypatch.setattr(
        jaxent._backend.lax,
        "platform_dependent",
        lambda *args, cpu, default: default(*args),
    )
    value_gpu, grads_gpu = _loss_and_grads(loss, 0, x)
    assert_close(value_gpu, value)
    assert_close(grads_gpu, grads, kind="grad")

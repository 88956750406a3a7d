"""Fused linear + cross-entropy: equality with materialized logits (values and
gradients for every option), second-order gradients, edge cases, dtypes and the
absence of an N x V buffer in the compiled program."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxent
from jaxent import reference
from jaxent._checks import compute_dtype
from jaxent._linear import linear_softmax_cross_entropy as fused
from tests.helpers import assert_close, int_labels, logits

# Eager calls would dispatch the blocked loops op by op: compile them instead.
jfused = jax.jit(
    fused,
    static_argnames=(
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "reduction",
        "block_size",
        "axis_name",
    ),
)


def naive(hidden, weight, labels, *, bias=None, **kw):
    """Materialized logits through the plain-JAX reference loss."""
    x = jnp.matmul(hidden, weight, preferred_element_type=compute_dtype(hidden.dtype))
    if bias is not None:
        x = x + bias.astype(x.dtype)
    return reference.softmax_cross_entropy_with_integer_labels(x, labels, **kw)


def _value_and_grads(f, h, w, b, y, **kw):
    """A generic scalar of the loss (every example gets its own cotangent) and its
    gradients w.r.t. hidden, weight and bias."""

    def scalar(h, w, b):
        out = f(h, w, y, bias=b, **kw).astype(jnp.float64)
        return jnp.sum(jnp.sin(out) + out)

    return jax.jit(jax.value_and_grad(scalar, (0, 1, 2)))(h, w, b)


def _problem(seed, batch, d, v, dtype="float64"):
    h = logits(seed, (*batch, d), dtype, scale=1.0)
    w = logits(seed + 1, (d, v), dtype, scale=1.0)
    b = logits(seed + 2, (v,), dtype, scale=1.0)
    return h, w, b, int_labels(seed + 3, batch, v)


OPTIONS = [
    {},
    {"ignore_index": 3},
    {"where": True},
    {"z_loss": 0.02},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0},
    {"ignore_index": 3, "where": True, "label_smoothing": 0.2, "z_loss": 0.01},
]


@pytest.mark.parametrize(
    ("opts", "reduction", "block_size"),
    [(o, r, (10, 8)) for o in OPTIONS for r in ("none", "mean")]
    + [(OPTIONS[-1], "sum", b) for b in (None, 4, (3, 5), (4, 23), (10, 30))],
    ids=str,
)
def test_matches_materialized_logits(opts, reduction, block_size):
    # 10 tokens, 24 classes: (10, 8) tiles loop evenly; blocks of 4 or 5 classes
    # and chunks of 3 or 4 tokens leave ragged last blocks.
    h, w, b, y = _problem(0, (2, 5), 3, 24)
    y = y.at[0, 1].set(3)
    kw = dict(opts, reduction=reduction)
    if kw.get("where") is True:
        kw["where"] = jnp.asarray(np.random.default_rng(9).uniform(size=y.shape) > 0.3)
    want, want_grads = _value_and_grads(naive, h, w, b, y, **kw)
    got, got_grads = _value_and_grads(fused, h, w, b, y, block_size=block_size, **kw)
    assert_close(got, want)
    for g, e in zip(got_grads, want_grads, strict=True):
        assert_close(g, e, kind="grad")


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_without_bias(reduction):
    h, w, _, y = _problem(1, (7,), 4, 9)
    kw = dict(reduction=reduction)
    want, want_grads = _value_and_grads(naive, h, w, None, y, **kw)
    got, got_grads = _value_and_grads(fused, h, w, None, y, block_size=(3, 4), **kw)
    assert_close(got, want)
    for g, e in zip(got_grads[:2], want_grads[:2], strict=True):
        assert_close(g, e, kind="grad")
    assert got_grads[2] is None


def test_second_order_gradients():
    h, w, b, y = _problem(2, (5,), 3, 7)
    y = y.at[1].set(-1)

    def f(h, w, b):
        return fused(
            h,
            w,
            y,
            bias=b,
            ignore_index=-1,
            label_smoothing=0.1,
            z_loss=0.05,
            reduction="mean",
            block_size=(5, 4),
        )

    # One full vocab block and a ragged one.
    check_grads(jax.jit(f), (h, w, b), order=2, modes=["rev"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision(dtype):
    h, w, b, y = _problem(3, (16,), 8, 40, dtype)
    up = [a.astype(jnp.float32) for a in (h, w, b)]
    kw = dict(label_smoothing=0.1, z_loss=0.01, reduction="mean")
    got, grads = _value_and_grads(fused, h, w, b, y, block_size=(8, 16), **kw)
    want, want_grads = _value_and_grads(naive, *up[:2], up[2], y, **kw)
    out = jfused(h, w, y, bias=b, **kw)
    assert out.dtype == dtype
    assert [g.dtype for g in grads] == [jnp.dtype(dtype)] * 3
    assert_close(got, want, dtype=dtype)
    for g, e in zip(grads, want_grads, strict=True):
        assert_close(g, e, dtype=dtype, kind="grad")


def test_mixed_input_dtypes_keep_their_gradient_dtypes():
    h, w, b, y = _problem(4, (6,), 4, 10, "float32")
    w16 = w.astype(jnp.bfloat16)
    out = jfused(h, w16, y, bias=b)
    assert out.dtype == jnp.float32
    grads = jax.jit(
        jax.grad(lambda h, w, b: jnp.sum(jfused(h, w, y, bias=b)), (0, 1, 2))
    )(h, w16, b)
    assert [g.dtype for g in grads] == [jnp.float32, jnp.bfloat16, jnp.float32]


def test_masked_classes_via_minus_inf_bias():
    h, w, b, y = _problem(5, (6,), 3, 11)
    masked = jnp.array([0, 4, 10], y.dtype)
    b = b.at[masked].set(-jnp.inf)
    y = jnp.where(jnp.isin(y, masked), 1, y)
    want, want_grads = _value_and_grads(naive, h, w, b, y, reduction="mean")
    got, got_grads = _value_and_grads(fused, h, w, b, y, reduction="mean", block_size=4)
    assert_close(got, want)
    for g, e in zip(got_grads, want_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert_close(g, e, kind="grad")
    # A target at a masked class costs +inf, like any target at a -inf logit.
    assert jfused(h, w, y.at[0].set(4), bias=b)[0] == jnp.inf


def test_huge_logits_do_not_overflow():
    h, w, b, y = _problem(6, (5,), 3, 8, "float32")
    out = jfused(h * 1e18, w, y, bias=b * 1e18, block_size=3)
    want = naive(h * 1e18, w, y, bias=b * 1e18)
    assert bool(jnp.all(jnp.isfinite(out)))
    assert_close(out, want, scale=1e18)


def test_out_of_range_label_is_nan_for_its_example():
    h, w, b, y = _problem(7, (4,), 3, 6)
    y = y.at[2].set(6)
    out = jfused(h, w, y, bias=b, block_size=4)
    assert bool(jnp.isnan(out[2]))
    assert bool(jnp.all(jnp.isfinite(out.at[2].set(0))))
    dh = jax.jit(jax.grad(lambda h: jnp.sum(jfused(h, w, y, bias=b))))(h)
    assert bool(jnp.all(jnp.isnan(dh[2])))
    assert bool(jnp.all(jnp.isfinite(jnp.delete(dh, 2, axis=0))))


def test_narrow_and_wide_label_dtypes():
    # Byte labels against V=256 and a negative ignore_index must not wrap
    # around; an int64 label 2**32 + 1 is out of range, not class 1.
    h, w, b, y = _problem(11, (6,), 3, 256)
    y = y.at[0].set(255)
    want = jfused(h, w, y, bias=b)
    assert_close(jfused(h, w, y.astype(jnp.uint8), bias=b), want)
    y8 = (y % 128).at[0].set(-1)
    ignored = jfused(h, w, y8.astype(jnp.int8), bias=b, ignore_index=-1)
    assert_close(ignored, jfused(h, w, y8, bias=b, ignore_index=-1))
    wide = jfused(h, w, y.astype(jnp.int64).at[1].set(2**32 + 1), bias=b)
    assert bool(jnp.isnan(wide[1]))


def test_mean_over_nothing_is_zero_with_zero_grad():
    h, w, b, y = _problem(8, (4,), 3, 6)
    y = jnp.full_like(y, -100)

    def f(h, w, b):
        return jfused(h, w, y, bias=b, ignore_index=-100, reduction="mean")

    assert f(h, w, b) == 0
    for g in jax.jit(jax.grad(f, (0, 1, 2)))(h, w, b):
        assert not bool(jnp.any(g))


def test_jit_and_vmap():
    h, w, b, y = _problem(9, (3, 5), 4, 12)
    batched = jfused(h, w, y, bias=b, block_size=5)
    mapped = jax.vmap(lambda h, y: jfused(h, w, y, bias=b, block_size=5))(h, y)
    jitted = jax.jit(lambda h: jfused(h, w, y, bias=b, block_size=5))(h)
    assert_close(mapped, batched)
    assert_close(jitted, batched)


def test_no_vocab_sized_buffer_in_compiled_program():
    # Lowering only (nothing allocated): the materialized path needs N x V
    # logits and their gradient, the fused one a few tiles.
    n, d, v = 1024, 64, 16384
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def temp_bytes(f):
        def loss(h, w, y):
            return f(h, w, y, ignore_index=-1, reduction="mean")

        step = jax.jit(jax.value_and_grad(loss, (0, 1)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    logits_bytes = n * v * 4
    assert temp_bytes(naive) >= logits_bytes
    assert temp_bytes(fused) < logits_bytes / 4


def _bad(name):
    h, w, b, y = _problem(10, (4,), 3, 6)
    return {
        "weight rank": ((h, w[0], y), {}, ValueError, "weight"),
        "hidden width": ((h[:, :2], w, y), {}, ValueError, "hidden"),
        "labels shape": ((h, w, y[:3]), {}, ValueError, "labels"),
        "float labels": ((h, w, y.astype(float)), {}, TypeError, "labels"),
        "int hidden": ((y[:, None], w[:1], y), {}, TypeError, "hidden"),
        "bias shape": ((h, w, y), {"bias": b[:5]}, ValueError, "bias"),
        "where shape": ((h, w, y), {"where": jnp.ones(3, bool)}, ValueError, "where"),
        "where dtype": ((h, w, y), {"where": jnp.ones(4)}, TypeError, "where"),
        "block_size": ((h, w, y), {"block_size": 0}, ValueError, "block_size"),
        "block pair": ((h, w, y), {"block_size": (1, 2, 3)}, ValueError, "block"),
        "reduction": ((h, w, y), {"reduction": "avg"}, ValueError, "reduction"),
        "smoothing": ((h, w, y), {"label_smoothing": 2.0}, ValueError, "smoothing"),
        "z_loss": ((h, w, y), {"z_loss": -1.0}, ValueError, "z_loss"),
    }[name]


@pytest.mark.parametrize(
    "name",
    [
        "weight rank",
        "hidden width",
        "labels shape",
        "float labels",
        "int hidden",
        "bias shape",
        "where shape",
        "where dtype",
        "block_size",
        "block pair",
        "reduction",
        "smoothing",
        "z_loss",
    ],
)
def test_bad_input_raises_at_trace_time(name):
    args, kw, error, match = _bad(name)
    with pytest.raises(error, match=match):
        fused(*args, **kw)


def test_reference_version_supports_forward_mode():
    h = jax.random.normal(jax.random.key(0), (6, 8), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (8, 20), jnp.float64)
    labels = jnp.arange(6)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, ignore_index=2, reduction="mean")
    fused_call = lambda h: jaxent.linear_softmax_cross_entropy(h, w, labels, **kw)  # noqa: E731
    plain = lambda h: reference.linear_softmax_cross_entropy(h, w, labels, **kw)  # noqa: E731
    assert_close(fused_call(h), plain(h))
    tangent = jax.jvp(plain, (h,), (jnp.ones_like(h),))[1]
    assert_close(tangent, jnp.sum(jax.grad(fused_call)(h)), kind="grad")

"""Fused linear + cross-entropy: equality with materialized logits (values and
gradients for every option), second-order gradients, edge cases, dtypes, the
absence of an N x V buffer in the compiled program, and the platform choices
made at lowering.

By default this runs ``implementation=None`` (the XLA loops on CPU). With
``JAXENT_TEST_LINEAR_IMPLEMENTATION=pallas`` (benchmarks/gpu_check.py on a GPU)
the same tests run the Pallas kernels: inputs are float32 instead of float64
(the kernels take no float64; the materialized side is computed in float64),
and the XLA tilings some tests pick are left to the kernels' defaults.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxent
from jaxent import _pallas_linear, reference
from jaxent._linear import LinearCrossEntropyAux
from jaxent._linear import linear_softmax_cross_entropy as _public
from jaxent._numerics import compute_dtype
from tests import helpers
from tests.helpers import int_labels, logits

# Deep tests of one family; tests/test_registry.py covers it in the quick subset.
pytestmark = pytest.mark.slow

IMPLEMENTATION = os.environ.get("JAXENT_TEST_LINEAR_IMPLEMENTATION") or None
PALLAS = IMPLEMENTATION == "pallas"
DTYPE = "float32" if PALLAS else "float64"
# Finite differences of a float32 loss are noisy: check_grads' float32 defaults
# fail on the XLA path as well at these inputs.
GRAD_CHECK = dict(atol=5e-2, rtol=5e-2) if PALLAS else {}


def assert_close(actual, expected, dtype=None, **kw):
    """tests.helpers.assert_close; with the kernels under test, at float32's
    tolerance unless told (the scalars compared are float64 sums)."""
    if dtype is None and PALLAS:
        dtype = "float32"
    helpers.assert_close(actual, expected, dtype=dtype, **kw)


def fused(hidden, weight, labels, *, block_size=None, **kw):
    """The loss under test (``block_size`` is an XLA tiling: dropped for the
    kernels, whose tiles are powers of two)."""
    kw.setdefault("implementation", IMPLEMENTATION)
    if PALLAS:
        block_size = None
    return _public(hidden, weight, labels, block_size=block_size, **kw)


# Eager calls would dispatch the blocked loops op by op: compile them instead.
jfused = jax.jit(
    fused,
    static_argnames=(
        "ignore_index",
        "label_smoothing",
        "z_loss",
        "softcap",
        "filter_eps",
        "reduction",
        "block_size",
        "axis_name",
        "implementation",
        "return_aux",
    ),
)


def _capped(x, softcap):
    if softcap is None:
        return x
    return jnp.where(x == -jnp.inf, -jnp.inf, softcap * jnp.tanh(x / softcap))


def naive(hidden, weight, labels, *, bias=None, softcap=None, **kw):
    """Materialized logits (after ``softcap``) through the plain-JAX reference
    loss; in float64 when the kernels are under test."""
    if PALLAS:
        hidden, weight = hidden.astype(jnp.float64), weight.astype(jnp.float64)
        bias = None if bias is None else bias.astype(jnp.float64)
    x = jnp.matmul(hidden, weight, preferred_element_type=compute_dtype(hidden.dtype))
    if bias is not None:
        x = x + bias.astype(x.dtype)
    x = _capped(x, softcap)
    return reference.softmax_cross_entropy_with_integer_labels(x, labels, **kw)


def _value_and_grads(f, h, w, b, y, **kw):
    """A generic scalar of the loss (every example gets its own cotangent) and its
    gradients w.r.t. hidden, weight and bias."""

    def scalar(h, w, b):
        out = f(h, w, y, bias=b, **kw).astype(jnp.float64)
        return jnp.sum(jnp.sin(out) + out)

    return jax.jit(jax.value_and_grad(scalar, (0, 1, 2)))(h, w, b)


def _problem(seed, batch, d, v, dtype=DTYPE):
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


# Each option once, the reductions in turn (every option with every reduction
# is in tests/test_registry.py); then the tilings with all options at once.
@pytest.mark.parametrize(
    ("opts", "reduction", "block_size"),
    [(o, ("none", "mean")[i % 2], (10, 8)) for i, o in enumerate(OPTIONS)]
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
    check_grads(jax.jit(f), (h, w, b), order=2, modes=["rev"], **GRAD_CHECK)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_low_precision(dtype):
    h, w, b, y = _problem(3, (16,), 8, 40, dtype)
    up = [a.astype(jnp.float32) for a in (h, w, b)]
    kw = dict(label_smoothing=0.1, z_loss=0.01, reduction="mean")
    got, grads = _value_and_grads(fused, h, w, b, y, block_size=(8, 16), **kw)
    want, want_grads = _value_and_grads(naive, *up[:2], up[2], y, **kw)
    out = jfused(h, w, y, bias=b, **kw)
    # Half-precision inputs give a float32 loss (computed and reduced in it).
    assert out.dtype == jnp.float32
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


@pytest.mark.skipif(
    PALLAS and jax.default_backend() != "gpu",
    reason="interpreted kernels copy whole arrays at each load",
)
def test_no_vocab_sized_buffer_in_compiled_program(monkeypatch):
    # Lowering only (nothing allocated): the materialized path needs N x V
    # logits and their gradient, the fused one a few tiles (or, with the Pallas
    # "tiles" backward, a chunk of G: here 1/8 of N x V). Large enough that a
    # GPU's fixed matmul workspace (32 MiB on an H200) is not what is measured.
    n, d, v = 4096, 64, 65536
    monkeypatch.setattr(_pallas_linear, "G_CHUNK_BYTES", n * v * 4 // 8)
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
        "softcap": ((h, w, y), {"softcap": -1.0}, ValueError, "softcap"),
        "filter_eps": ((h, w, y), {"filter_eps": 0.0}, ValueError, "filter_eps"),
        "implementation": (
            (h, w, y),
            {"implementation": "cuda"},
            ValueError,
            "implementation",
        ),
        "return_aux": ((h, w, y), {"return_aux": "yes"}, TypeError, "return_aux"),
        # A tied [V, D] embedding passed as is: the message says what to pass.
        "tied embedding": ((h, w.T, y), {}, ValueError, r"embedding\.T"),
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
        "softcap",
        "filter_eps",
        "implementation",
        "return_aux",
        "tied embedding",
    ],
)
def test_bad_input_raises_at_trace_time(name):
    args, kw, error, match = _bad(name)
    kw.setdefault("implementation", IMPLEMENTATION)
    with pytest.raises(error, match=match):
        _public(*args, **kw)


def test_reference_version_supports_forward_mode():
    h = jax.random.normal(jax.random.key(0), (6, 8), jnp.float64)
    w = jax.random.normal(jax.random.key(1), (8, 20), jnp.float64)
    labels = jnp.arange(6)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, ignore_index=2, reduction="mean")
    fused_call = lambda h: jaxent.linear_softmax_cross_entropy(h, w, labels, **kw)  # noqa: E731
    plain = lambda h: reference.linear_softmax_cross_entropy(h, w, labels, **kw)  # noqa: E731
    assert_close(fused_call(h), plain(h))
    # Jitted: each is one program, not a compilation per primitive.
    tangent = jax.jit(jax.jvp, static_argnums=0)(plain, (h,), (jnp.ones_like(h),))[1]
    assert_close(tangent, jnp.sum(jax.jit(jax.grad(fused_call))(h)), kind="grad")


SOFTCAP_OPTIONS = [
    {"softcap": 2.0},
    {"softcap": 0.5, "label_smoothing": 0.1, "z_loss": 0.01, "ignore_index": 3},
]


@pytest.mark.parametrize("opts", SOFTCAP_OPTIONS, ids=str)
@pytest.mark.parametrize("block_size", [None, (4, 5)], ids=str)
def test_softcap_matches_materialized_logits(opts, block_size):
    h, w, b, y = _problem(12, (2, 5), 3, 24)
    if "label_smoothing" not in opts:
        # Masked classes stay masked (smoothing would put mass on them: inf).
        b = b.at[jnp.array([2, 9], jnp.int32)].set(-jnp.inf)
        y = jnp.where((y == 2) | (y == 9), 3, y)
    kw = dict(opts, reduction="mean")
    want, want_grads = _value_and_grads(naive, h, w, b, y, **kw)
    got, got_grads = _value_and_grads(fused, h, w, b, y, block_size=block_size, **kw)
    assert_close(got, want)
    for g, e in zip(got_grads, want_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert_close(g, e, kind="grad")


def test_softcap_second_order_gradients():
    h, w, b, y = _problem(13, (4,), 3, 9)

    def f(h, w, b):
        return fused(h, w, y, bias=b, softcap=1.5, z_loss=0.05, block_size=(4, 4))

    check_grads(jax.jit(f), (h, w, b), order=2, modes=["rev"], **GRAD_CHECK)


@pytest.mark.parametrize("softcap", [None, 3.0], ids=str)
def test_aux_lse_and_argmax(softcap):
    # Two equal, dominant columns in different vocab blocks: ties go to the
    # lower id; lse is the final logits' (after bias and softcap), for every
    # token, ignored or not, and carries no gradient.
    h, w, b, y = _problem(14, (3, 4), 5, 30)
    e0 = jnp.zeros(5, w.dtype).at[0].set(10.0)
    w = w.at[:, 7].set(e0).at[:, 21].set(e0)
    b = b.at[7].set(0.0).at[21].set(0.0)
    h = h.at[1].set(jnp.ones((4, 5), h.dtype).at[:, 1:].set(0.0))
    kw = dict(softcap=softcap, ignore_index=int(y[0, 0]), block_size=(5, 8))
    loss, aux = jfused(h, w, y, bias=b, return_aux=True, **kw)
    assert isinstance(aux, LinearCrossEntropyAux)
    x = _capped(jnp.einsum("...d,dv->...v", h, w) + b, softcap)
    assert_close(aux.lse, jax.nn.logsumexp(x, axis=-1))
    np.testing.assert_array_equal(aux.argmax, jnp.argmax(x, axis=-1))
    assert aux.argmax.dtype == jnp.int32 and bool(jnp.all(aux.argmax[1] == 7))
    assert_close(loss, jfused(h, w, y, bias=b, **kw))

    def total(h):
        _, aux = fused(h, w, y, bias=b, return_aux=True, **kw)
        return jnp.sum(aux.lse) + jnp.sum(aux.argmax.astype(h.dtype))

    assert not bool(jnp.any(jax.jit(jax.grad(total))(h)))


def test_filter_eps_matches_twin_and_bounds_error():
    # Peaked logits (hidden states along their label's column): most entries of
    # d loss / d x are below eps and are dropped; the loss stays exact.
    n, d, v, eps = 12, 6, 40, 1e-3
    _, w, b, y = _problem(15, (n,), d, v)
    h = 5.0 * w.T[y] / jnp.linalg.norm(w.T[y], axis=1, keepdims=True)
    kw = dict(reduction="sum", block_size=(4, 8), z_loss=1e-3)
    exact, exact_grads = _value_and_grads(fused, h, w, b, y, **kw)
    got, grads = _value_and_grads(fused, h, w, b, y, filter_eps=eps, **kw)
    twin, twin_grads = _value_and_grads(
        reference.linear_softmax_cross_entropy, h, w, b, y, filter_eps=eps, **kw
    )
    assert_close(got, exact)
    assert_close(twin, exact)
    for g, e in zip(grads, twin_grads, strict=True):
        assert_close(g, e, kind="grad")
    # _value_and_grads's cotangent of example i is 1 + cos(loss_i), at most 2.
    dh, dw, db = (jnp.abs(g - e) for g, e in zip(grads, exact_grads, strict=True))
    tol = 1e-5 if PALLAS else 1e-12
    assert bool(jnp.all(dh <= 2 * eps * jnp.sum(jnp.abs(w), axis=1) + tol))
    assert bool(jnp.all(dw <= 2 * eps * jnp.sum(jnp.abs(h), axis=0)[:, None] + tol))
    assert bool(jnp.all(db <= 2 * eps * n + tol))
    assert float(jnp.max(dw)) > 0  # something was dropped


def test_reference_twin_forward_mode_with_new_options():
    h, w, b, y = _problem(16, (5,), 4, 10, "float64")
    y = y.at[1].set(-100)
    kw = dict(softcap=2.0, label_smoothing=0.1, ignore_index=-100, reduction="mean")

    def plain(h):
        return reference.linear_softmax_cross_entropy(h, w, y, bias=b, **kw)

    tangent = jax.jit(jax.jvp, static_argnums=0)(plain, (h,), (jnp.ones_like(h),))[1]
    grad = jax.jit(
        jax.grad(lambda h: jaxent.linear_softmax_cross_entropy(h, w, y, bias=b, **kw))
    )
    assert_close(tangent, jnp.sum(grad(h)), kind="grad")
    # Ignored rows get finite zero gradients from the twin (no 0 * nan).
    dh = jax.jit(jax.grad(plain))(h)
    assert bool(jnp.all(jnp.isfinite(dh))) and not bool(jnp.any(dh[1]))


@pytest.mark.parametrize("platform", ["cpu", "cuda"])
def test_xla_tile_is_chosen_at_lowering(platform):
    # One trace, lowered for each platform: tiles of 2^20 logits on CPU
    # (512 x 2048 here), 2^24 elsewhere (all 8192 tokens x 2048 classes).
    n, d, v = 8192, 8, 4096
    args = (
        jax.ShapeDtypeStruct((n, d), jnp.float32),
        jax.ShapeDtypeStruct((d, v), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def loss(h, w, y):
        return _public(h, w, y, reduction="sum", implementation="xla", low_memory=True)

    text = (
        jax.jit(jax.grad(loss, (0, 1)))
        .trace(*args)
        .lower(lowering_platforms=(platform,))
        .as_text()
    )
    rows = set(re.findall(r"dot_general.*-> tensor<(\d+)x2048xf32>", text))
    rows -= {str(d)}  # d weight's [D, block_v] products
    assert rows == ({"512"} if platform == "cpu" else {"8192"})


@pytest.mark.parametrize("low_memory", [False, True])
def test_checkpointed_head_matches(low_memory):
    # jax.checkpoint reruns the forward in the backward (the gradient-in-forward
    # path included): same value and gradients as without it.
    h, w, b, y = _problem(21, (12,), 5, 37)
    tw = logits(25, (12,), DTYPE, scale=1.0)

    def loss(h, w, b):
        return _public(
            h, w, y, bias=b, token_weights=tw, reduction="mean", low_memory=low_memory
        )

    got = jax.jit(jax.value_and_grad(jax.checkpoint(loss), (0, 1, 2)))(h, w, b)
    want = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))(h, w, b)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, e, kind="grad")


def test_gradient_in_forward_path_exports_for_accelerators():
    # Exported from this CPU host for TPU and CUDA as well: the chunk budget is
    # chosen per platform when lowering; the CPU branch runs the same numbers.
    h, w, b, y = _problem(31, (40,), 6, 300)
    tw = logits(35, (40,), DTYPE, scale=1.0)

    def step(h, w, b):
        def loss(h, w, b):
            return _public(h, w, y, bias=b, token_weights=tw, reduction="mean")

        return jax.value_and_grad(loss, (0, 1, 2))(h, w, b)

    exported = jax.export.export(jax.jit(step), platforms=("cpu", "cuda", "tpu"))(
        h, w, b
    )
    assert exported.platforms == ("cpu", "cuda", "tpu")
    got, want = exported.call(h, w, b), jax.jit(step)(h, w, b)
    for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert_close(a, e, kind="grad")


@pytest.mark.parametrize("low_memory", [False, True])
def test_bfloat16_inputs_beat_materialized_bfloat16_logits(low_memory):
    # Against float64 on the same (rounded) inputs: the loss is float32 and
    # near exact, where bfloat16 logits are off by their rounding; the
    # gradients (bfloat16, as the inputs) are no worse than the materialized
    # path's.
    h = logits(41, (256, 32), "float32", scale=1.0).astype(jnp.bfloat16)
    w = (logits(42, (32, 1024), "float32", scale=1.0) / 6).astype(jnp.bfloat16)
    y = int_labels(43, (256,), 1024)

    def materialized(h, w):
        return reference.softmax_cross_entropy_with_integer_labels(
            h @ w, y, reduction="mean"
        )

    def fused_mean(h, w):
        return _public(h, w, y, reduction="mean", low_memory=low_memory)

    wide = (h.astype(jnp.float64), w.astype(jnp.float64))
    exact, exact_grads = jax.value_and_grad(materialized, (0, 1))(*wide)

    def errors(f):
        value, grads = jax.jit(jax.value_and_grad(f, (0, 1)))(h, w)
        rel = [
            float(jnp.max(jnp.abs(g.astype(jnp.float64) - e)) / jnp.max(jnp.abs(e)))
            for g, e in zip(grads, exact_grads, strict=True)
        ]
        return value, abs(float(value) - float(exact)), rel

    value, loss_err, grad_err = errors(fused_mean)
    base_value, base_loss_err, base_grad_err = errors(materialized)
    assert value.dtype == jnp.float32 and base_value.dtype == jnp.bfloat16
    assert loss_err < 1e-5 < base_loss_err
    for got, base in zip(grad_err, base_grad_err, strict=True):
        assert got <= 1.05 * base, (grad_err, base_grad_err)

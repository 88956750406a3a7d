"""Fused linear + distillation (``linear_softmax_distillation``): values and
gradients against the plain-JAX twin, against ``softmax_generalized_jsd`` and
the integer-label cross-entropy on materialized logits, and against the
float64 NumPy oracle, for every option (a teacher of another hidden size,
``ignore_index``, ``softcap``, both biases, ``where``, every reduction, beta
in {0, 0.5, 1}, T in {1, 2}, ragged tiles); finite differences; the frozen
teacher; bad inputs; bfloat16; and compiled memory independent of V.

Each option set compiles the fused program once (a value and a VJP), so the
cases are few and each turns on many options at once.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxent
from jaxent import reference
from tests.helpers import assert_close
from tests.oracle import ref_linear_softmax_distillation

# Deep tests of one family; tests/test_registry.py covers it in the quick subset.
pytestmark = pytest.mark.slow

FUSED = jaxent.linear_softmax_distillation
IGNORE = -100
# 2 x 5 tokens, student D = 3, teacher D' = 5, V = 24.
BATCH, D, DT, V = (2, 5), 3, 5, 24
ARRAYS = ("hidden", "weight", "teacher_hidden", "teacher_weight")
# Classes some cases mask (-inf bias): no label falls on them.
MASKABLE = (2, 9, 17)


def _problem(seed, dtype="float64"):
    rng = np.random.default_rng(seed)

    def normal(*shape, scale=1.0):
        return jnp.asarray(rng.normal(size=shape) * scale, dtype)

    arrays = {
        "hidden": normal(*BATCH, D),
        "weight": normal(D, V),
        "bias": normal(V),
        "teacher_hidden": normal(*BATCH, DT),
        "teacher_weight": normal(DT, V, scale=1.5),
        "teacher_bias": normal(V),
    }
    labels = jnp.asarray(rng.integers(0, V, size=BATCH), jnp.int32)
    labels = jnp.where(jnp.isin(labels, jnp.array(MASKABLE, jnp.int32)), 3, labels)
    labels = labels.at[0, 1].set(IGNORE).at[1, 4].set(IGNORE)
    where = jnp.asarray(rng.uniform(size=BATCH) > 0.25).at[0, 0].set(False)
    return arrays, labels, where


# (beta, temperature, options): every case has a teacher of another hidden
# size; together they cover every option, every reduction, labels=None, beta
# in {0, 0.5, 1}, T in {1, 2} and masked (-inf) classes (student's, teacher's):
# on either side for 0 < beta < 1; at the KL ends, a class masked on the
# predicted side (the student at beta = 0, the teacher at 1) is masked on the
# other too, so that the divergence stays finite. A ragged tiling (block_size
# dividing neither N = 10 nor V = 24) compiles three times the code of an even
# one, so one case has it and the others have even or single tiles.
CASES = [
    (0.5, 1.0, dict(labels=None, reduction="none")),
    (
        0.5,
        2.0,
        dict(
            bias=True,
            teacher_bias=True,
            ignore_index=IGNORE,
            where=True,
            softcap=2.0,
            hard_weight=0.7,
            soft_weight=1.3,
            reduction="mean",
            block_size=(4, 7),
            masked=((2, 9), (9, 17)),
        ),
    ),
    (
        0.0,
        2.0,
        dict(
            bias=True,
            teacher_bias=True,
            ignore_index=IGNORE,
            hard_weight=0.5,
            reduction="sum",
            block_size=(5, 8),
            masked=((2, 9), (2, 9, 17)),
        ),
    ),
    (
        1.0,
        1.0,
        dict(
            bias=True,
            teacher_bias=True,
            where=True,
            ignore_index=IGNORE,
            hard_weight=1.0,
            soft_weight=0.5,
            softcap=1.5,
            reduction="none",
            block_size=12,
            masked=((2, 9, 17), (9, 17)),
        ),
    ),
]


def _kwargs(arrays, where, beta, temperature, opts):
    kw = dict(opts, beta=beta, temperature=temperature)
    if "masked" in kw:
        # Masked classes (-inf biases) of the student and of the teacher.
        for name, classes in zip(
            ("bias", "teacher_bias"), kw.pop("masked"), strict=True
        ):
            arrays[name] = arrays[name].at[jnp.array(classes)].set(-jnp.inf)
    for name in ("bias", "teacher_bias"):
        kw[name] = arrays[name] if kw.get(name) else None
    kw["where"] = where if kw.get("where") else None
    return kw


def _vjp(fn, arrays, labels, kw, g):
    """Value and VJP of ``fn(h, w, th, tw, labels, **kw)`` w.r.t. the four
    arrays and the biases that are given."""
    names = [*ARRAYS, *(b for b in ("bias", "teacher_bias") if kw[b] is not None)]

    def f(*vals):
        a = dict(zip(names, vals, strict=True))
        opts = dict(kw, **{b: a[b] for b in ("bias", "teacher_bias") if b in a})
        h, w, th, tw = (a[n] for n in ARRAYS)
        return fn(h, w, th, tw, labels, **opts)

    out, vjp = jax.vjp(f, *(arrays[n] for n in names))
    return out, dict(zip(names, vjp(g.astype(out.dtype)), strict=True))


def _materialized(h, w, th, tw, labels, **kw):
    """The same loss from the library's own losses on materialized logits:
    ``softmax_generalized_jsd`` plus the integer-label cross-entropy."""
    x, t = h @ w, jax.lax.stop_gradient(th @ tw)
    if kw["bias"] is not None:
        x = x + kw["bias"]
    if kw["teacher_bias"] is not None:
        t = t + jax.lax.stop_gradient(kw["teacher_bias"])
    cap = kw.get("softcap")
    if cap is not None:
        x = jnp.where(x == -jnp.inf, -jnp.inf, cap * jnp.tanh(x / cap))
        t = jnp.where(t == -jnp.inf, -jnp.inf, cap * jnp.tanh(t / cap))
    counted = jnp.ones(x.shape[:-1], bool)
    if kw.get("ignore_index") is not None:
        counted = labels != kw["ignore_index"]
    if kw["where"] is not None:
        counted = counted & kw["where"]
    beta, temperature = kw["beta"], kw["temperature"]
    jsd = jaxent.softmax_generalized_jsd(x, t, beta=beta, temperature=temperature)
    loss = kw.get("soft_weight", 1.0) * jsd
    if kw.get("hard_weight"):
        ce = jaxent.softmax_cross_entropy_with_integer_labels(
            x, jnp.where(counted, labels, 0)
        )
        loss = loss + kw["hard_weight"] * ce
    loss = jnp.where(counted, loss, 0.0)
    reduction = kw.get("reduction", "none")
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    return jnp.sum(loss) / jnp.maximum(jnp.sum(counted), 1).astype(loss.dtype)


def _oracle(arrays, labels, kw, g):
    """The NumPy oracle in its rows layout ``[1, R, ...]``."""
    rows = {
        "hidden": arrays["hidden"].reshape(1, -1, D),
        "weight": arrays["weight"][None],
        "teacher_hidden": arrays["teacher_hidden"].reshape(1, -1, DT),
        "teacher_weight": arrays["teacher_weight"][None],
        "labels": jnp.zeros(BATCH, int) if labels is None else labels,
    }
    rows = {k: np.asarray(v) for k, v in rows.items()}
    rows["labels"] = rows["labels"].reshape(1, -1)
    for name in ("bias", "teacher_bias"):
        if kw[name] is not None:
            rows[name] = np.asarray(kw[name])[None]
    if kw["where"] is not None:
        keep = np.asarray(kw["where"]).reshape(1, -1, 1)
        rows["where"] = np.broadcast_to(keep, (1, keep.shape[1], V))
    o = {k: v for k, v in kw.items() if not hasattr(v, "shape") and k != "block_size"}
    o.setdefault("reduction", "none")
    g_rows = np.asarray(g).reshape(1, -1) if np.ndim(g) else np.asarray([g])
    with np.errstate(invalid="ignore"):  # 0 * inf at masked classes, selected out
        value, grads = ref_linear_softmax_distillation(np, rows, o, g_rows)
    return np.asarray(value)[0], {k: np.asarray(v)[0] for k, v in grads.items()}


@pytest.mark.parametrize(
    ("beta", "temperature", "opts"),
    CASES,
    ids=[f"beta{b}-T{t}-{o.get('reduction', 'none')}" for b, t, o in CASES],
)
def test_matches_reference_materialized_and_oracle(beta, temperature, opts):
    arrays, labels, where = _problem(0)
    if "labels" in opts:
        labels = opts.pop("labels")
    kw = _kwargs(arrays, where, beta, temperature, opts)
    shape = BATCH if kw.get("reduction", "none") == "none" else ()
    g = jnp.asarray(np.random.default_rng(1).normal(size=shape))
    twin = reference.linear_softmax_distillation
    fns = (FUSED, twin, _materialized)

    @jax.jit
    def all_three(arrays):
        return [_vjp(fn, arrays, labels, kw, g) for fn in fns]

    (got, grads), *others = all_three(arrays)
    assert bool(jnp.all(jnp.isfinite(got)))
    value, oracle_grads = _oracle(arrays, labels, kw, g)
    assert got.shape == shape and got.dtype == jnp.float64
    assert_close(got, value.reshape(shape))
    for name, grad in grads.items():
        assert_close(grad, oracle_grads[name].reshape(grad.shape), kind="grad")
        if name.startswith("teacher"):
            # The teacher is frozen: exactly zero.
            assert not bool(jnp.any(grad))
    for want, want_grads in others:
        assert_close(got, want)
        for name, grad in grads.items():
            assert_close(grad, want_grads[name], kind="grad")
    # Excluded tokens give 0.
    if shape and kw["where"] is not None:
        assert not bool(jnp.any(got[~where]))


def test_finite_differences():
    arrays, labels, where = _problem(3)
    th, tw = arrays["teacher_hidden"], arrays["teacher_weight"]

    def f(h, w, b):
        return FUSED(
            h,
            w,
            th,
            tw,
            labels,
            bias=b,
            teacher_bias=arrays["teacher_bias"],
            ignore_index=IGNORE,
            where=where,
            beta=0.4,
            temperature=2.0,
            hard_weight=0.5,
            softcap=2.5,
            reduction="mean",
        )

    args = (arrays["hidden"], arrays["weight"], arrays["bias"])
    check_grads(jax.jit(f), args, order=1, modes=["rev"])


def test_frozen_teacher_second_order_and_twin_forward_mode():
    # Forward-over-reverse along the teacher: d^2 loss / d teacher d student
    # is zero (as under stop_gradient) from the fused rule and the twin alike;
    # the twin's forward mode along the student gives the fused gradient's
    # directional derivative.
    arrays, labels, _ = _problem(4)
    h, w = arrays["hidden"], arrays["weight"]
    th, tw = arrays["teacher_hidden"], arrays["teacher_weight"]
    kw = dict(hard_weight=0.5, ignore_index=IGNORE, temperature=2.0, beta=0.3)
    twin = reference.linear_softmax_distillation

    def loss(fn):
        return lambda h, th: jnp.sum(fn(h, w, th, tw, labels, **kw) ** 2)

    def along_teacher(fn):
        grad = jax.grad(loss(fn), (0, 1))
        return jax.jvp(grad, (h, th), (jnp.zeros_like(h), jnp.ones_like(th)))

    @jax.jit
    def run():
        along_h = jax.jvp(loss(twin), (h, th), (jnp.ones_like(h), jnp.zeros_like(th)))
        return along_teacher(FUSED), along_teacher(twin), along_h[1]

    (grads, second), (_, twin_second), along_h = run()
    for a in (*second, *twin_second):
        assert not bool(jnp.any(a))
    assert not bool(jnp.any(grads[1]))
    assert_close(along_h, jnp.sum(grads[0]), kind="grad")


def test_bfloat16_inputs_are_computed_in_float32():
    arrays, labels, where = _problem(5, "bfloat16")
    kw = dict(
        where=where,
        ignore_index=IGNORE,
        hard_weight=0.5,
        temperature=2.0,
        reduction="mean",
    )
    up = {k: v.astype(jnp.float32) for k, v in arrays.items()}
    # A float32 student with a bfloat16 teacher.
    mixed = dict(arrays, hidden=up["hidden"], weight=up["weight"], bias=up["bias"])

    def run(fn, a):
        def f(h, w, b):
            th, tw, tb = a["teacher_hidden"], a["teacher_weight"], a["teacher_bias"]
            return fn(h, w, th, tw, labels, bias=b, teacher_bias=tb, **kw)

        return jax.value_and_grad(f, (0, 1, 2))(a["hidden"], a["weight"], a["bias"])

    twin = reference.linear_softmax_distillation
    (got, grads), (want, want_grads), (out, out_grads) = jax.jit(
        lambda: (run(FUSED, arrays), run(twin, up), run(FUSED, mixed))
    )()
    # Half-precision inputs give a float32 loss (computed and reduced in it).
    assert got.dtype == jnp.float32
    assert [g.dtype for g in grads] == [jnp.dtype(jnp.bfloat16)] * 3
    assert_close(got, want, dtype="bfloat16")
    for a, b in zip(grads, want_grads, strict=True):
        assert_close(a, b, dtype="bfloat16", kind="grad")
    assert out.dtype == jnp.float32
    assert [g.dtype for g in out_grads] == [jnp.dtype(jnp.float32)] * 3
    assert_close(out, want, dtype="bfloat16")


@pytest.mark.parametrize("low_memory", [True, False])
def test_no_vocab_sized_buffer_in_compiled_program(low_memory):
    # Lowering only. The materialized path needs 2 N x V logits and more. The
    # recompute path (low_memory) holds a few tiles whatever V; the default
    # path one float32 weight-sized d weight accumulator and a few token
    # chunks of full rows, whatever N.
    d, dt = 64, 96

    def temp_bytes(fn, n, v):
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n, dt), jnp.float32),
            jax.ShapeDtypeStruct((dt, v), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )

        def loss(h, w, th, tw, y):
            kw = dict(hard_weight=0.5, reduction="mean")
            if fn is FUSED:
                kw["low_memory"] = low_memory
            return fn(h, w, th, tw, y, **kw)

        step = jax.jit(jax.value_and_grad(loss, (0, 1)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    n, v = 1024, 65536
    logits_bytes = n * v * 4
    large = temp_bytes(FUSED, n, v)
    if low_memory:
        assert large <= temp_bytes(FUSED, n, 8192) * 1.05 + 2**20
        assert large < logits_bytes / 8
    else:
        # 4x the tokens add only per-token (O(N D)) arrays.
        per_token = 3 * n * (d + dt) * 4
        assert temp_bytes(FUSED, 4 * n, v) <= large + 4 * per_token
        assert large < logits_bytes / 2
    assert temp_bytes(reference.linear_softmax_distillation, n, 8192) > 2 * n * 8192 * 4


def _bad(name):
    arrays, labels, _ = _problem(7)
    h, w = arrays["hidden"], arrays["weight"]
    th, tw = arrays["teacher_hidden"], arrays["teacher_weight"]
    ok = (h, w, th, tw, labels)
    return {
        "labels missing": ((h, w, th, tw), {"hard_weight": 0.5}, ValueError, "labels"),
        "weight rank": ((h, w[0], th, tw), {}, ValueError, "weight"),
        "hidden width": ((h[..., :2], w, th, tw), {}, ValueError, "hidden"),
        "teacher width": ((h, w, th[..., :2], tw), {}, ValueError, "teacher_weight"),
        "teacher vocabulary": ((h, w, th, tw[:, :5]), {}, ValueError, "teacher_weight"),
        "teacher tokens": ((h, w, th[:1], tw), {}, ValueError, "teacher_hidden"),
        "labels shape": ((h, w, th, tw, labels[0]), {}, ValueError, "labels"),
        "float labels": (
            (h, w, th, tw, labels.astype(float)),
            {},
            TypeError,
            "labels",
        ),
        "int teacher": ((h, w, labels[..., None], tw), {}, TypeError, "teacher_hidden"),
        "bias shape": (ok, {"bias": w[0, :5]}, ValueError, "bias"),
        "teacher_bias shape": (
            ok,
            {"teacher_bias": w[0, :5]},
            ValueError,
            "teacher_bias",
        ),
        "where shape": (ok, {"where": jnp.ones(3, bool)}, ValueError, "where"),
        "where dtype": (ok, {"where": jnp.ones(BATCH)}, TypeError, "where"),
        "beta": (ok, {"beta": 1.5}, ValueError, "beta"),
        "temperature": (ok, {"temperature": 0.0}, ValueError, "temperature"),
        "hard_weight": (ok, {"hard_weight": -1.0}, ValueError, "hard_weight"),
        "soft_weight": (ok, {"soft_weight": float("nan")}, ValueError, "soft_weight"),
        "softcap": (ok, {"softcap": -1.0}, ValueError, "softcap"),
        "reduction": (ok, {"reduction": "avg"}, ValueError, "reduction"),
        "block_size": (ok, {"block_size": (1, 2, 3)}, ValueError, "block_size"),
    }[name]


BAD = [
    "labels missing",
    "weight rank",
    "hidden width",
    "teacher width",
    "teacher vocabulary",
    "teacher tokens",
    "labels shape",
    "float labels",
    "int teacher",
    "bias shape",
    "teacher_bias shape",
    "where shape",
    "where dtype",
    "beta",
    "temperature",
    "hard_weight",
    "soft_weight",
    "softcap",
    "reduction",
    "block_size",
]


@pytest.mark.parametrize("name", BAD)
def test_bad_input_same_error_from_both(name):
    args, kw, error, match = _bad(name)
    errors = []
    for fn in (FUSED, reference.linear_softmax_distillation):
        with pytest.raises(error, match=match) as info:
            jax.jit(lambda *a, fn=fn: fn(*a, **kw)).trace(*args)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert re.match(r"linear_softmax_distillation: `", errors[0]), errors[0]

"""The Pallas kernels of linear_softmax_cross_entropy (``implementation="pallas"``).

On CPU they run in Pallas interpret mode, on CUDA compiled by Triton (the same
file is the device check of benchmarks/gpu_check.py). Values, aux outputs and
gradients must equal the XLA path and the float64 materialized reference
within the tolerance table of tests/helpers.py, for every option, in float32
and bfloat16, with shapes that do not tile; plus vocab-parallel (vmap with an
axis name, shard_map), transforms, the CUDA lowering (it must contain the
Triton kernels, also on a CPU-only machine) and the argument errors.

Interpret mode compiles slowly on CPU, so each case packs several options and
the programs are compiled with LLVM's cheap settings; the file stays under a
minute on two cores.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxent import _linear, _pallas_linear, reference
from jaxent._linear import linear_softmax_cross_entropy as lce
from jaxent._numerics import compute_dtype
from tests.helpers import assert_close, int_labels, logits

# Deep tests of one family; tests/test_registry.py covers it in the quick subset.
pytestmark = pytest.mark.slow

TRITON_CALL = "__gpu$xla.gpu.triton"
# The kernels are compiled on CUDA and interpreted elsewhere.
INTERPRETED = jax.default_backend() != "gpu"


# Kernels in the gradient of a one-chunk problem: the forward, then G
# ("tiles") or d hidden and d weight ("fused").
_KERNELS = {"tiles": 2, "fused": 3}[_pallas_linear.BACKWARD]


def _problem(seed, n, d, v, dtype):
    h = logits(seed, (n, d), dtype, scale=1.0)
    w = logits(seed + 1, (d, v), "float64", scale=1.0 / np.sqrt(d)).astype(dtype)
    b = logits(seed + 2, (v,), dtype, scale=1.0)
    y = int_labels(seed + 3, (n,), v)
    cot = logits(seed + 4, (n,), "float64", scale=1.0)
    return h, w, b, y, cot


def _run(impl, h, w, b, y, cot, **kw):
    """Per-example losses, aux and the gradients of ``sum(cot * loss)``; the
    reference is the materialized plain twin in float64."""
    if impl == "reference":
        h, w = h.astype(jnp.float64), w.astype(jnp.float64)
        b = None if b is None else b.astype(jnp.float64)
        kw = {k: a for k, a in kw.items() if k != "block_size"}
        fn, impl = _plain, "xla"
    else:
        fn = lce

    def scalar(h, w, b):
        loss, aux = fn(h, w, y, bias=b, return_aux=True, implementation=impl, **kw)
        return jnp.sum(loss.astype(jnp.float64) * cot), (loss, aux)

    grad = jax.value_and_grad(scalar, (0, 1, 2), has_aux=True)
    (_, (loss, aux)), grads = jax.jit(grad)(h, w, b)
    return loss, aux, grads


def _plain(hidden, weight, labels, **kw):
    """The plain twin: materialized logits, plain autodiff, same checks."""
    return reference.linear_softmax_cross_entropy(hidden, weight, labels, **kw)


def _compare(h, w, b, y, cot, dtype, **kw):
    got = _run("pallas", h, w, b, y, cot, **kw)
    xla = _run("xla", h, w, b, y, cot, **kw)
    want = _run("reference", h, w, b, y, cot, **kw)
    for other in (want, xla):
        assert_close(got[0], other[0], dtype=dtype)
        assert_close(got[1].lse, other[1].lse, dtype=dtype)
        np.testing.assert_array_equal(got[1].argmax, want[1].argmax)
        for g, e in zip(got[2], other[2], strict=True):
            if e is None:
                assert g is None
            else:
                assert g.dtype == jnp.dtype(dtype)
                assert_close(g, e, dtype=dtype, kind="grad")
    # Half-precision inputs give a float32 loss.
    assert got[0].dtype == compute_dtype(dtype)
    assert got[1].lse.dtype == jnp.float32 and got[1].argmax.dtype == jnp.int32
    return got, want


@pytest.mark.parametrize(
    ("dtype", "kw"),
    [
        # Every per-example option, mean over the counted ones, 4 x 5 tiles of
        # which the last row and column are ragged, D in two chunks.
        (
            "float32",
            dict(ignore_index=3, where=True, label_smoothing=0.2, z_loss=0.01),
        ),
        # Softcap with smoothing (the kernel sums the capped logits), no bias.
        ("bfloat16", dict(softcap=2.0, label_smoothing=0.1, bias=None)),
        # Gradient filtering with softcap, z-loss and masked (-inf) classes.
        ("float32", dict(filter_eps=2e-3, softcap=3.0, z_loss=1e-3, masked=True)),
        # The "tiles" backward (G by vocabulary chunks, XLA's matmuls).
        (
            "bfloat16",
            dict(backward="tiles", ignore_index=3, label_smoothing=0.1, z_loss=0.01),
        ),
    ],
    ids=["options-f32", "softcap-bf16", "filter-f32", "tiles-bf16"],
)
def test_matches_xla_and_reference(dtype, kw, monkeypatch):
    kw = dict(kw)
    h, w, b, y, cot = _problem(0, 53, 20, 70, dtype)
    y = y.at[0].set(3)
    if kw.pop("masked", False):
        masked = jnp.array([5, 17, 69], jnp.int32)
        b = b.at[masked].set(-jnp.inf)
        y = jnp.where(jnp.isin(y, masked), 4, y)
    if "bias" in kw:
        b = kw.pop("bias")
    if kw.get("where") is True:
        kw["where"] = jnp.asarray(np.random.default_rng(9).uniform(size=y.shape) > 0.3)
    if dtype != "float32":
        # A narrow d weight is accumulated in float32 by vocabulary chunks: make
        # them 32 columns (two full chunks and a ragged one); likewise for the
        # chunks of G of the "tiles" backward.
        monkeypatch.setattr(_pallas_linear, "DW_CHUNK_ENTRIES", 20 * 32)
        monkeypatch.setattr(_pallas_linear, "G_CHUNK_BYTES", 53 * 2 * 32)
    monkeypatch.setattr(_pallas_linear, "BACKWARD", kw.pop("backward", "fused"))
    # The public loss is jitted: its programs traced with other parameters go.
    jax.clear_caches()
    reduction = "mean" if "ignore_index" in kw else "none"
    _compare(h, w, b, y, cot, dtype, reduction=reduction, block_size=(16, 16), **kw)


def test_filter_error_is_bounded():
    # Peaked softmax (each hidden state points at its label's column): most
    # entries of d loss / d x are tiny and whole tiles are dropped.
    n, d, v, eps = 32, 16, 64, 1e-3
    _, w, b, y, cot = _problem(1, n, d, v, "float32")
    h = 6.0 * w.T[y] / jnp.sum(w.T[y] ** 2, axis=1, keepdims=True) ** 0.5
    kw = dict(reduction="none", block_size=(16, 16))
    exact = _run("xla", h, w, b, y, cot, **kw)
    loss, _, grads = _run("pallas", h, w, b, y, cot, filter_eps=eps, **kw)
    assert_close(loss, exact[0])  # the loss itself is exact
    f64 = lambda arrays: [a.astype(jnp.float64) for a in arrays]  # noqa: E731
    (dh, dw, db), (eh, ew, eb), (h64, w64) = f64(grads), f64(exact[2]), f64((h, w))
    # Bounds of the dropped part: |g_i| eps sum_k |w_dk| and eps sum_i |g_i h_id|.
    g = jnp.abs(cot)
    bound_h = eps * g[:, None] * jnp.sum(jnp.abs(w64), axis=1)[None, :]
    bound_w = eps * jnp.sum(g[:, None] * jnp.abs(h64), axis=0)[:, None]
    slack = 1e-5
    assert bool(jnp.all(jnp.abs(dh - eh) <= bound_h + slack))
    assert bool(jnp.all(jnp.abs(dw - ew) <= bound_w + slack))
    assert bool(jnp.all(jnp.abs(db - eb) <= eps * jnp.sum(g) + slack))
    # Something was dropped (test_matches_xla_and_reference[filter-f32] checks
    # that what is kept equals the plain twin's filtered gradient).
    assert float(jnp.max(jnp.abs(dw - ew))) > 1e-4


def test_vocab_parallel_under_vmap_with_axis_name():
    # vmap with an axis name runs the collectives of a vocab-parallel mesh axis
    # over a batch of weight shards (and batches the Pallas grid).
    shards, n, d, v = 2, 24, 16, 40
    h, w, b, y, cot = _problem(2, n, d, shards * v, "float32")
    y = y.at[:3].set(
        jnp.array([0, v - 1, v], jnp.int32)
    )  # first, last, next shard's first
    kw = dict(label_smoothing=0.1, softcap=4.0, z_loss=1e-3, ignore_index=7)
    ws = w.reshape(d, shards, v).transpose(1, 0, 2)
    bs = b.reshape(shards, v)

    def per_shard(h, w, b):
        def scalar(h, w, b):
            loss, aux = lce(
                h, w, y, bias=b, axis_name="v", implementation="pallas",
                block_size=(16, 16), return_aux=True, **kw,
            )  # fmt: skip
            return jnp.sum(loss.astype(jnp.float64) * cot), (loss, aux)

        return jax.value_and_grad(scalar, (0, 1, 2), has_aux=True)(h, w, b)

    mapped = jax.vmap(per_shard, in_axes=(None, 0, 0), axis_name="v")
    (_, (loss, aux)), (dh, dws, dbs) = jax.jit(mapped)(h, ws, bs)
    _, want_aux, want = _run("reference", h, w, b, y, cot, **kw)
    full_loss = _run("reference", h, w, b, y, cot, **kw)[0]
    for k in range(shards):
        assert_close(loss[k], full_loss)
        assert_close(aux.lse[k], want_aux.lse)
        np.testing.assert_array_equal(aux.argmax[k], want_aux.argmax)
        assert_close(dh[k], want[0], kind="grad")
    assert_close(dws.transpose(1, 0, 2).reshape(d, shards * v), want[1], kind="grad")
    assert_close(dbs.reshape(-1), want[2], kind="grad")


def test_shard_map_vmap_and_checkpoint():
    n, d, v = 16, 16, 48
    h, w, b, y, _ = _problem(3, n, d, v, "float32")
    mesh = jax.make_mesh((1,), ("v",), axis_types=(AxisType.Auto,))
    kw = dict(implementation="pallas", reduction="sum", label_smoothing=0.1)

    def sharded(h, w, b, check_vma=INTERPRETED is False):
        body = jax.shard_map(
            lambda h, w, b: lce(h, w, y, bias=b, axis_name="v", **kw),
            mesh=mesh,
            in_specs=(P(), P(None, "v"), P("v")),
            out_specs=P(),
            check_vma=check_vma,
        )
        return body(h, w, b)

    # vmap over a leading batch of token sets (the kernels' grid gets an axis),
    # under jax.checkpoint.
    @jax.checkpoint
    def batched(h, w, b):
        per = jax.vmap(lambda h, y: lce(h, w, y, bias=b, **kw))
        return jnp.sum(per(h.reshape(2, n // 2, d), y.reshape(2, n // 2)))

    plain = dict(kw, implementation="xla")

    def twin(h, w, b):
        return _plain(h, w, y, bias=b, **plain)

    h64, w64, b64 = (a.astype(jnp.float64) for a in (h, w, b))
    want = jax.jit(jax.value_and_grad(twin, (0, 1, 2)))(h64, w64, b64)
    for f in (sharded, batched):
        val, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(h, w, b)
        assert_close(val, want[0])
        for g, e in zip(grads, want[1], strict=True):
            assert_close(g, e, kind="grad")
    # The compiled kernels type-check under shard_map's mesh-axis checks (the
    # interpreter of JAX 0.10 does not: its out-of-bounds padding mixes varying
    # and invariant values, hence check_vma=False when interpreted above).
    grads = jax.grad(functools.partial(sharded, check_vma=True), (0, 1, 2))
    assert _lowered_for("cuda", grads, h, w, b).count(TRITON_CALL) == _KERNELS


def test_second_order_goes_through_the_xla_loops():
    # The kernels have no derivative: differentiating the backward (a Hessian-
    # vector product here) uses the XLA loops' derivative, the same function.
    h, w, b, y, _ = _problem(8, 12, 16, 40, "float32")
    kw = dict(bias=b, softcap=3.0, z_loss=0.01, label_smoothing=0.1)

    def sq_grad(impl):
        def f(h, w):
            return jnp.sum(lce(h, w, y, implementation=impl, **kw))

        def g(h, w):
            return sum(jnp.sum(d**2) for d in jax.grad(f, (0, 1))(h, w))

        return jax.jit(jax.grad(g, (0, 1)))(h, w)

    for got, want in zip(sq_grad("pallas"), sq_grad("xla"), strict=True):
        assert_close(got, want, kind="grad")


def _lowered_for(platform, f, *args):
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


EVERY_OPTION = dict(
    bias=True,
    where=True,
    ignore_index=-100,
    label_smoothing=0.1,
    z_loss=1e-4,
    softcap=30.0,
    filter_eps=1e-4,
    return_aux=True,
)


@pytest.mark.parametrize(
    ("dtype", "shape", "kw"),
    [
        # Ragged everywhere, every option, d weight in float32 chunks.
        ("bfloat16", (250, 500, 1000), EVERY_OPTION),
        # Tiling shapes (no masks), no option.
        ("float32", (256, 512, 1024), {}),
        # The "tiles" backward, G in chunks of 512 columns (one full, one ragged).
        ("bfloat16", (250, 500, 1000), dict(EVERY_OPTION, backward="tiles")),
    ],
    ids=["bf16-ragged-all-options", "f32-tiled-plain", "bf16-tiles-backward"],
)
def test_lowers_to_triton_kernels_for_cuda(dtype, shape, kw, monkeypatch):
    # Lowering only: works on a CPU-only machine (jaxlib emits the Triton IR in
    # the custom call's backend config; compiling it to PTX needs the GPU).
    monkeypatch.setattr(_pallas_linear, "DW_CHUNK_ENTRIES", 500 * 256)
    monkeypatch.setattr(_pallas_linear, "G_CHUNK_BYTES", 250 * 2 * 512)
    backward = kw.get("backward", "fused")
    monkeypatch.setattr(_pallas_linear, "BACKWARD", backward)
    # The public loss is jitted: its programs traced with other parameters go.
    jax.clear_caches()
    kw = {k: a for k, a in kw.items() if k != "backward"}
    n, d, v = shape
    kw = dict(kw, implementation="pallas", reduction="mean")
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((v,), dtype) if kw.pop("bias", False) else None,
        jax.ShapeDtypeStruct((n,), jnp.int32),
        jax.ShapeDtypeStruct((n,), jnp.bool_) if kw.pop("where", False) else None,
    )

    def loss(h, w, b, y, where):
        out = lce(h, w, y, bias=b, where=where, **kw)
        if kw.get("return_aux"):
            return out[0].astype(jnp.float32) + jnp.sum(out[1].lse)
        return out

    def grads(h, w, b, y, where):
        return jax.grad(loss, (0, 1))(h, w, b, y, where)

    forward = _lowered_for("cuda", loss, *args)
    bwd = _lowered_for("cuda", grads, *args)
    names = re.findall(r'name = "(linear_ce_\w+)"', forward)
    assert forward.count(TRITON_CALL) == 1 and names == ["linear_ce_forward"]
    names = sorted(re.findall(r'name = "(linear_ce_\w+)"', bwd))
    if backward == "tiles":
        # G in chunks of 512 columns: a full one and a ragged one.
        want = ["forward"] + ["grad_logits"] * 2
    else:
        # d weight of bfloat16 in chunks of 256 columns: full ones, a ragged one.
        want = ["forward", "grad_hidden"]
        want += ["grad_weight"] * (2 if dtype == "bfloat16" else 1)
    assert names == sorted(f"linear_ce_{k}" for k in want)
    # On CPU the same program holds no Triton call: the kernels are interpreted.
    assert TRITON_CALL not in _lowered_for("cpu", grads, *args)


def test_default_choice_is_made_at_lowering(monkeypatch):
    # With the kernels as CUDA's default, implementation=None lowers to Triton
    # for CUDA and to the XLA loops for CPU, from the same trace.
    monkeypatch.setattr(_linear, "_CUDA_DEFAULT", "pallas")
    jax.clear_caches()
    h, w, b, y, _ = _problem(5, 16, 16, 32, "float32")

    def loss(h, w, b):
        return lce(h, w, y, bias=b, reduction="sum")

    traced = jax.jit(jax.grad(loss, (0, 1, 2))).trace(h, w, b)
    cuda = traced.lower(lowering_platforms=("cuda",)).as_text()
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert cuda.count(TRITON_CALL) == _KERNELS and TRITON_CALL not in cpu

    def xla(h, w, b):
        return lce(h, w, y, bias=b, reduction="sum", implementation="xla")

    got = jax.jit(jax.grad(loss, (0, 1, 2)))(h, w, b)
    want = jax.jit(jax.grad(xla, (0, 1, 2)))(h, w, b)
    for g, e in zip(got, want, strict=True):
        assert_close(g, e, kind="grad")
    # float64 (which the kernels do not take) falls back to the XLA loops.
    h64 = h.astype(jnp.float64)
    traced = jax.jit(loss).trace(h64, w.astype(jnp.float64), b.astype(jnp.float64))
    assert TRITON_CALL not in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_empty_batch():
    _, w, b, _, _ = _problem(6, 1, 8, 20, "float32")
    h, y = jnp.zeros((0, 8), jnp.float32), jnp.zeros((0,), jnp.int32)

    def f(h, w, b):
        return lce(h, w, y, bias=b, implementation="pallas", reduction="mean")

    assert float(jax.jit(f)(h, w, b)) == 0
    grads = jax.jit(jax.grad(f, (0, 1, 2)))(h, w, b)
    assert grads[0].shape == (0, 8)
    assert not bool(jnp.any(grads[1])) and not bool(jnp.any(grads[2]))


@pytest.mark.parametrize(
    ("kw", "match", "falls_back"),
    [
        (dict(dtype="float64"), "implementation='pallas'.*float64", True),
        (dict(block_size=(16, 24)), "block_size", True),
        (dict(block_size=8), "block_size", True),
        (dict(shape=(2**16, 2**15)), r"hidden.*2\*\*31", True),
        (dict(implementation="triton"), "implementation", False),
        (dict(softcap=0.0), "softcap", False),
        (dict(filter_eps=-1.0), "filter_eps", False),
    ],
    ids=str,
)
def test_unsupported_inputs_raise_or_fall_back(kw, match, falls_back, monkeypatch):
    kw = dict(kw)
    dtype = kw.pop("dtype", "float32")
    n, d = kw.pop("shape", (4, 3))
    args = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, 6), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )
    kw.setdefault("implementation", "pallas")

    def loss(h, w, y):
        return lce(h, w, y, **kw)

    with pytest.raises(ValueError, match=match):
        jax.eval_shape(loss, *args)
    if falls_back:
        # Under None, what the kernels do not take runs on the XLA path, also
        # where the kernels would be the default.
        monkeypatch.setattr(_linear, "_CUDA_DEFAULT", "pallas")
        jax.clear_caches()
        kw["implementation"] = None
        assert TRITON_CALL not in _lowered_for("cuda", loss, *args)

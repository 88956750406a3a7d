"""jaxent on JAX's SPMD engine, on 8 CPU devices: automatic partitioning (Auto
mesh), explicit sharding (Explicit mesh under ``jax.set_mesh``), vocab-parallel
``shard_map`` with ``axis_name``, a data-parallel training step, and the
collectives in the compiled programs.

With fewer than 8 devices (a plain ``python -m pytest``), one test re-runs this
file in a subprocess with ``--xla_force_host_platform_device_count=8``; the
others skip in the parent process.
"""

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jaxent
from tests.helpers import (
    FAST_XLA_FLAGS,
    assert_close,
    int_labels,
    logits,
    probabilities,
)

pytestmark = pytest.mark.slow

DEVICES = 8
multi_device = pytest.mark.devices(DEVICES)

# Small shapes keep the 8-device run (111 tests) near two minutes on 2 cores.
N, C, D = 16, 64, 8
IGNORE = -100


_CHILD = "JAXENT_SHARDED_SUBPROCESS"


@pytest.mark.first
@pytest.mark.skipif(
    jax.device_count() >= DEVICES, reason="already running on 8 devices"
)
def test_in_8_device_subprocess():
    """Runs this file again with 8 host devices (the flag only takes effect
    before JAX starts, so it needs a fresh process), compiled with XLA's
    default code generation (tests/conftest.py speeds up the others)."""
    assert not os.environ.get(_CHILD), (
        f"the subprocess sees {jax.device_count()} devices despite the flag"
    )
    root = Path(__file__).absolute().parent.parent
    flags = os.environ.get("XLA_FLAGS", "")
    env = {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={DEVICES}",
        "JAX_PLATFORMS": "cpu",
        _CHILD: "1",
        "JAXENT_TEST_FAST_COMPILE": "0",
    }
    # One process: the parent's other workers are busy meanwhile.
    cmd = [sys.executable, "-m", "pytest", "-q", "-rs", "-n", "0"]
    cmd += ["-p", "no:cacheprovider"]
    proc = subprocess.run(
        [*cmd, str(Path(__file__).absolute())],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert " passed" in output, output
    assert " deselected" not in output, output


@multi_device
def test_subprocess_compiles_with_xla_defaults():
    flags = os.environ.get("XLA_FLAGS", "").split()
    assert FAST_XLA_FLAGS and not set(FAST_XLA_FLAGS) & set(flags), flags


def _mesh(kind):
    axis_type = {"auto": AxisType.Auto, "explicit": AxisType.Explicit}[kind]
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(axis_type,) * 2)


def _inputs():
    """Named inputs of the cases below; ``y`` holds two ``IGNORE`` labels, both
    in the first half of the batch, so that data shards count differently."""
    rng = np.random.default_rng(7)
    y = np.array(int_labels(2, (N,), C))
    y[[1, 4]] = IGNORE
    cmask = rng.random((N, C)) > 0.2
    cmask[:, 0] = True  # every row keeps a class
    f32 = "float32"
    return {
        "x": logits(0, (N, C), f32),
        "t": logits(1, (N, C), f32),
        "p": probabilities(3, (N, C), dtype=f32),
        "q": probabilities(4, (N, C), dtype=f32),
        "y": jnp.asarray(y),
        "y_valid": int_labels(5, (N,), C),
        "w": jnp.asarray(rng.uniform(0.5, 1.5, C), f32),
        "bmask": jnp.asarray(rng.random(N) > 0.3),
        "cmask": jnp.asarray(cmask),
        "cot": jnp.asarray(rng.normal(size=N), f32),
        "h": logits(6, (N, D), f32, scale=1.0),
        "W": logits(8, (D, C), f32, scale=1.0),
        "bias": logits(9, (C,), f32, scale=1.0),
        # A distillation teacher's head: another hidden size, the same classes.
        "th": logits(10, (N, D + 4), f32, scale=1.0),
        "tW": logits(11, (D + 4, C), f32, scale=1.0),
        "tbias": logits(12, (C,), f32, scale=1.0),
        # A top-k teacher: 5 distinct global ids per row, 0.7 of the mass.
        "tids": jnp.asarray(np.argsort(rng.random((N, C)), axis=-1)[:, :5]),
        "tlp": jnp.log(0.7 * probabilities(13, (N, 5), dtype=f32)),
    }


# How each input is laid out: "x" like the logits [N, C], "b" like the batch,
# "c" like the classes, "h" [N, D] by batch, "W" [D, C] by class, "r" replicated.
KIND = {
    "x": "x",
    "t": "x",
    "p": "x",
    "q": "x",
    "cmask": "x",
    "y": "b",
    "y_valid": "b",
    "bmask": "b",
    "cot": "b",
    "w": "c",
    "bias": "c",
    "h": "h",
    "W": "W",
    "th": "h",
    "tW": "W",
    "tbias": "c",
    "tids": "h",
    "tlp": "h",
}


def _spec(kind, batch, classes):
    return {
        "x": P(batch, classes),
        "b": P(batch),
        "c": P(classes),
        "h": P(batch, None),
        "W": P(None, classes),
        "r": P(),
    }[kind]


CE_INT = jaxent.softmax_cross_entropy_with_integer_labels

# name -> (input names, differentiated positions, scalar function of them)
CASES = {
    "int_mean": (("x", "y_valid"), (0,), lambda x, y: CE_INT(x, y, reduction="mean")),
    "int_options": (
        ("x", "y", "w"),
        (0, 2),
        lambda x, y, w: CE_INT(
            x,
            y,
            weights=w,
            ignore_index=IGNORE,
            label_smoothing=0.1,
            z_loss=1e-3,
            reduction="mean",
        ),
    ),
    "int_where_none": (
        ("x", "y_valid", "bmask", "cot"),
        (0,),
        lambda x, y, m, c: jnp.sum(CE_INT(x, y, where=m) * c),
    ),
    "int_class_mask": (
        ("x", "y", "cmask"),
        (0,),
        lambda x, y, m: CE_INT(
            x, y, where=m, ignore_index=IGNORE, label_smoothing=0.2, reduction="sum"
        ),
    ),
    "soft": (
        ("x", "p", "cmask"),
        (0, 1),
        lambda x, p, m: jaxent.softmax_cross_entropy(
            x, p, where=m, label_smoothing=0.1, z_loss=1e-3, reduction="mean"
        ),
    ),
    "log_softmax": (
        ("x", "p"),
        (0,),
        lambda x, p: jnp.sum(jaxent.log_softmax(x) * p),
    ),
    "softmax": (("x", "t"), (0,), lambda x, t: jnp.sum(jaxent.softmax(x) * t)),
    "softmax_entropy": (
        ("x", "cot"),
        (0,),
        lambda x, c: jnp.sum(jaxent.softmax_entropy(x) * c),
    ),
    "softmax_kl": (
        ("x", "t", "bmask"),
        (0, 1),
        lambda x, t, m: jaxent.softmax_kl_divergence(x, t, where=m, reduction="mean"),
    ),
    # The functions without a softmax, together: elementwise or plain sums.
    "no_softmax": (
        ("x", "t", "p", "q", "w", "cot"),
        (0, 1, 2, 3, 4),
        lambda x, t, p, q, w, c: (
            jaxent.sigmoid_binary_cross_entropy(x, p, pos_weight=w, reduction="mean")
            + jnp.sum(jaxent.entropy(p) * c)
            + jnp.sum(jaxent.cross_entropy(p, q) * c)
            + jnp.sum(jaxent.kl_divergence(jax.nn.log_softmax(t), q) * c)
            + jnp.sum(
                jaxent.kl_divergence_with_log_targets(
                    jax.nn.log_softmax(t), jax.nn.log_softmax(x)
                )
                * c
            )
        ),
    ),
    "linear": (
        ("h", "W", "bias", "y"),
        (0, 1, 2),
        lambda h, w, b, y: jaxent.linear_softmax_cross_entropy(
            h,
            w,
            y,
            bias=b,
            ignore_index=IGNORE,
            label_smoothing=0.1,
            z_loss=1e-3,
            reduction="mean",
        ),
    ),
    "linear_distill": (
        ("h", "W", "bias", "th", "tW", "tbias", "y"),
        (0, 1, 2),
        lambda h, w, b, th, tw, tb, y: jaxent.linear_softmax_distillation(
            h,
            w,
            th,
            tw,
            y,
            bias=b,
            teacher_bias=tb,
            ignore_index=IGNORE,
            hard_weight=0.5,
            temperature=2.0,
            reduction="mean",
        ),
    ),
    # Both outputs, each under a cotangent of its own.
    "linear_log_probs": (
        ("h", "W", "bias", "y_valid", "bmask", "cot"),
        (0, 1, 2),
        lambda h, w, b, y, m, c: _log_probs_scalar(
            jaxent.linear_log_probs(
                h,
                w,
                y,
                bias=b,
                where=m,
                temperature=1.5,
                softcap=3.0,
                return_entropy=True,
            ),
            c,
        ),
    ),
}


def _log_probs_scalar(out, cot):
    """A scalar non-linear in the log-probabilities and entropies ``out``."""
    lp, ent = out
    return jnp.sum(jnp.exp(lp) * cot) + jnp.sum(ent**2 * cot)


# The integer-label losses take a different path for each layout (a gather
# along the batch, a comparison over sharded classes); the others are
# checked on the 2-D layout, which partitions both their axes.
LAYOUTS = {"batch": ("data", None), "class": (None, "model"), "both": ("data", "model")}
CASE_LAYOUTS = {
    "int_mean": LAYOUTS,
    "int_options": LAYOUTS,
    "linear": LAYOUTS,
    "linear_distill": LAYOUTS,
    "linear_log_probs": LAYOUTS,
    "int_where_none": ("batch", "both"),
    "int_class_mask": ("batch", "both"),
}
GRID = [(case, layout) for case in CASES for layout in CASE_LAYOUTS.get(case, ["both"])]
# Every layout under explicit sharding; under automatic sharding (the
# partitioner's choices, not the loss's) the 2-D layout of each case.
MODE_GRID = [(c, lay, "explicit") for c, lay in GRID] + [
    (c, lay, "auto") for c, lay in GRID if lay == "both"
]

_reference_cache = {}


def _reference(case):
    """Single-device value and gradients (computed once per case)."""
    if case not in _reference_cache:
        names, argnums, fn = CASES[case]
        args = [_inputs()[k] for k in names]
        _reference_cache[case] = jax.jit(jax.value_and_grad(fn, argnums))(*args)
    return _reference_cache[case]


def _check(out, ref, args, argnums, explicit, scale=1.0):
    (value, grads), (ref_value, ref_grads) = out, ref
    assert_close(value, ref_value, "float32", scale=scale)
    for i, g, rg in zip(argnums, grads, ref_grads, strict=True):
        assert_close(g, rg, "float32", kind="grad")
        if explicit:
            # Under explicit sharding a gradient has its input's sharding.
            assert jax.typeof(g).sharding.spec == jax.typeof(args[i]).sharding.spec


@multi_device
@pytest.mark.parametrize(("case", "layout", "mode"), MODE_GRID)
def test_jit_on_sharded_inputs_matches_one_device(case, layout, mode):
    names, argnums, fn = CASES[case]
    mesh = _mesh(mode)
    batch, classes = LAYOUTS[layout]
    inputs = _inputs()
    args = [
        jax.device_put(inputs[k], NamedSharding(mesh, _spec(KIND[k], batch, classes)))
        for k in names
    ]
    step = jax.jit(jax.value_and_grad(fn, argnums))
    if mode == "explicit":
        with jax.set_mesh(mesh):
            out = step(*args)
            _check(out, _reference(case), args, argnums, explicit=True)
    else:
        _check(step(*args), _reference(case), args, argnums, explicit=False)


@multi_device
@pytest.mark.parametrize("layout", ["batch", "both"])
def test_integer_labels_replicated_while_logits_are_sharded(layout):
    """Labels and class weights left unsharded (a common way to call it) on an
    explicit mesh, where the labels must be laid out like the logits' rows."""
    _, argnums, fn = CASES["int_options"]
    mesh = _mesh("explicit")
    batch, classes = LAYOUTS[layout]
    inputs = _inputs()
    x = jax.device_put(inputs["x"], NamedSharding(mesh, P(batch, classes)))
    args = [x, inputs["y"], inputs["w"]]
    step = jax.jit(jax.value_and_grad(fn, argnums))
    with jax.set_mesh(mesh):
        out = step(*args)
        _check(out, _reference("int_options"), args, argnums, explicit=True)


# Vocab-parallel: inside shard_map over a (data, model) mesh, the class axis of
# every [N, C] input (and of weights/bias) is split over "model" and the batch
# over "data"; with reduction "none" the per-example losses come back sharded
# by "data", and a reduction is taken over the batch of each data shard, so the
# reductions are checked with the batch replicated (batch spec None).
VP_CASES = {
    "int": (("x", "y_valid"), (0,), {}),
    "int_options": (
        ("x", "y", "w"),
        (0, 2),
        dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3),
    ),
    "int_where": (("x", "y", "bmask"), (0,), dict(ignore_index=IGNORE)),
    "int_class_mask": (
        ("x", "y", "cmask"),
        (0,),
        dict(ignore_index=IGNORE, label_smoothing=0.2),
    ),
    "soft": (("x", "p", "cmask"), (0, 1), dict(label_smoothing=0.1, z_loss=1e-3)),
    "log_softmax": (("x",), (0,), {}),
    "softmax": (("x", "cmask"), (0,), {}),
    "softmax_entropy": (("x", "cmask"), (0,), {}),
    "softmax_kl": (("x", "t", "bmask"), (0, 1), {}),
    "jsd": (("x", "t", "cmask"), (0, 1), dict(beta=0.3, temperature=2.0)),
    "jsd_reverse_kl": (("x", "t", "bmask"), (0, 1), dict(beta=1.0, temperature=0.5)),
    "linear": (
        ("h", "W", "bias", "y"),
        (0, 1, 2),
        dict(ignore_index=IGNORE, label_smoothing=0.1, z_loss=1e-3),
    ),
    "linear_distill": (
        ("h", "W", "bias", "th", "tW", "tbias", "y"),
        (0, 1, 2),
        dict(ignore_index=IGNORE, hard_weight=0.5, beta=0.3, temperature=2.0),
    ),
    # The KL ends take one forward pass (a running KL sum merged across shards).
    "linear_distill_kl": (
        ("h", "W", "bias", "th", "tW", "tbias", "y"),
        (0, 1, 2),
        dict(ignore_index=IGNORE, beta=0.0, temperature=2.0),
    ),
    "linear_log_probs": (
        ("h", "W", "bias", "y_valid", "bmask"),
        (0, 1, 2),
        dict(temperature=1.5, softcap=3.0),
    ),
    "linear_topk": (
        ("h", "W", "bias", "tids", "tlp", "y"),
        (0, 1, 2),
        dict(ignore_index=IGNORE, hard_weight=0.5, temperature=2.0, softcap=3.0),
    ),
    # Ids are global: each shard gathers (and masks out of its rest) its own.
    "topk": (("x", "tids", "tlp", "bmask"), (0, 2), dict(temperature=2.0)),
    "topk_renormalize": (("x", "tids", "tlp"), (0, 2), dict(tail="renormalize")),
}


def _vp_loss(case, reduction, axis_name):
    """The case's loss as a function of its inputs, vocab-parallel over
    ``axis_name`` (None: one device)."""
    names, _, kw = VP_CASES[case]
    kw = dict(kw, axis_name=axis_name)
    red = {} if case in UNREDUCED else {"reduction": reduction}

    def loss(*args):
        a = dict(zip(names, args, strict=True))
        if case.startswith("int"):
            extra = {"weights": a["w"]} if "w" in a else {}
            if "bmask" in a or "cmask" in a:
                extra["where"] = a.get("bmask", a.get("cmask"))
            labels = a["y"] if "y" in a else a["y_valid"]
            return CE_INT(a["x"], labels, **extra, **kw, **red)
        if case == "soft":
            return jaxent.softmax_cross_entropy(
                a["x"], a["p"], where=a["cmask"], **kw, **red
            )
        if case == "log_softmax":
            return jaxent.log_softmax(a["x"], **kw)
        if case == "softmax":
            return jaxent.softmax(a["x"], where=a["cmask"], **kw)
        if case == "softmax_entropy":
            return jaxent.softmax_entropy(a["x"], where=a["cmask"], **kw)
        if case == "softmax_kl":
            return jaxent.softmax_kl_divergence(
                a["x"], a["t"], where=a["bmask"], **kw, **red
            )
        if case.startswith("jsd"):
            mask = a.get("cmask", a.get("bmask"))
            return jaxent.softmax_generalized_jsd(
                a["x"], a["t"], where=mask, **kw, **red
            )
        if case == "linear_topk":
            return jaxent.linear_topk_distillation(
                a["h"], a["W"], a["tids"], a["tlp"], a["y"], bias=a["bias"], **kw, **red
            )
        if case == "linear_log_probs":
            return jaxent.linear_log_probs(
                a["h"],
                a["W"],
                a["y_valid"],
                bias=a["bias"],
                where=a["bmask"],
                return_entropy=True,
                **kw,
            )
        if case.startswith("topk"):
            mask = {"where": a["bmask"]} if "bmask" in a else {}
            return jaxent.softmax_topk_kl_divergence(
                a["x"], a["tids"], a["tlp"], **mask, **kw, **red
            )
        if case.startswith("linear_distill"):
            return jaxent.linear_softmax_distillation(
                a["h"],
                a["W"],
                a["th"],
                a["tW"],
                a["y"],
                bias=a["bias"],
                teacher_bias=a["tbias"],
                **kw,
                **red,
            )
        return jaxent.linear_softmax_cross_entropy(
            a["h"], a["W"], a["y"], bias=a["bias"], **kw, **red
        )

    return loss


def _out_spec(case, reduction, batch):
    if case in ("log_softmax", "softmax"):
        return P(batch, "model")
    if case == "softmax_entropy" or reduction == "none":
        return P(batch)
    return P()


def _scalar(out, cot):
    """A scalar whose gradient gives every output entry its own cotangent."""
    if isinstance(out, tuple):
        return _log_probs_scalar(out, cot)
    if out.ndim == 2:
        return jnp.sum(out * cot[:, None] * jnp.arange(1.0, C + 1, dtype=out.dtype))
    return jnp.sum(out * cot) if out.ndim == 1 else out


UNREDUCED = ("log_softmax", "softmax", "softmax_entropy")
# Every case per example; "mean", "sum" and an explicit-sharding mesh (which
# only changes how the inputs arrive) for a few.
VP_GRID = (
    [(case, "none", "auto") for case in VP_CASES]
    + [(case, "mean", "auto") for case in ("int_options", "soft", "softmax_kl", "jsd")]
    + [("linear", "mean", "auto")]
    + [(case, "sum", "auto") for case in ("int_options", "linear")]
    + [(case, "none", "explicit") for case in ("int_options", "linear")]
    + [("linear_log_probs", "none", "explicit")]
    + [("linear_distill", "mean", "explicit")]
    + [("topk", "mean", "auto")]
    + [("linear_topk", "mean", "auto"), ("linear_topk", "sum", "explicit")]
)


@multi_device
@pytest.mark.parametrize(("case", "reduction", "mode"), VP_GRID)
def test_vocab_parallel_shard_map_matches_one_device(case, reduction, mode):
    names, argnums, _ = VP_CASES[case]
    mesh = _mesh(mode)
    # Per-example outputs may stay batch-sharded; reductions need the batch whole.
    batch = "data" if reduction == "none" else None
    inputs = _inputs()
    args = [inputs[k] for k in names]
    specs = tuple(_spec(KIND[k], batch, "model") for k in names)
    cot = inputs["cot"]

    def single(*a):
        return _scalar(_vp_loss(case, reduction, None)(*a), cot)

    parallel_loss = jax.shard_map(
        _vp_loss(case, reduction, "model"),
        mesh=mesh,
        in_specs=specs,
        out_specs=_out_spec(case, reduction, batch),
    )

    def parallel(*a):
        return _scalar(parallel_loss(*a), cot)

    ref = jax.jit(jax.value_and_grad(single, argnums))(*args)
    sharded = [
        jax.device_put(a, NamedSharding(mesh, s))
        for a, s in zip(args, specs, strict=True)
    ]
    with jax.set_mesh(mesh):
        out = jax.jit(jax.value_and_grad(parallel, argnums))(*sharded)
    # An unreduced output enters the scalar as N x C float32 terms weighted up
    # to C: both sums round by ~1e-6 of their size, in different orders.
    scale = 8.0 if case in UNREDUCED else 1.0
    _check(out, ref, sharded, argnums, explicit=mode == "explicit", scale=scale)


_COLLECTIVE = re.compile(
    r"= (\(?[^=]*?\)?) (all-reduce|all-gather|all-to-all|collective-permute|"
    r"reduce-scatter|collective-broadcast|ragged-all-to-all)(?:-start)?\("
)


def _collectives(compiled_text):
    """(op, [element count of each result]) for every collective in HLO text."""
    found = []
    # Long tuples carry /*index=k*/ comments, whose "=" would end a match.
    compiled_text = re.sub(r"/\*.*?\*/", "", compiled_text)
    for shapes, op in _COLLECTIVE.findall(compiled_text):
        dims = re.findall(r"[a-z]+[0-9]*\[([0-9,]*)\]", shapes)
        sizes = [int(np.prod([int(d) for d in s.split(",") if d])) for s in dims]
        found.append((op, sizes))
    return found


def _vp_program(case, mesh):
    names, argnums, _ = VP_CASES[case]
    inputs = _inputs()
    specs = tuple(_spec(KIND[k], "data", "model") for k in names)
    per_shard = _vp_loss(case, "sum", "model")

    def total(*a):
        out = per_shard(*a)
        if isinstance(out, tuple):  # per-token outputs (linear_log_probs)
            out = sum(jnp.sum(o) for o in out)
        return jax.lax.psum(out, "data")

    loss = jax.shard_map(
        total,
        mesh=mesh,
        in_specs=specs,
        out_specs=P(),
    )
    args = [
        jax.device_put(inputs[k], NamedSharding(mesh, s))
        for k, s in zip(names, specs, strict=True)
    ]
    fn = jax.jit(jax.value_and_grad(loss, argnums))
    return fn.lower(*args).compile().as_text()


@multi_device
@pytest.mark.parametrize(
    "case", ["int", "int_options", "soft", "softmax_kl", "jsd", "topk"]
)
def test_vocab_parallel_program_has_only_per_token_all_reduces(case):
    """Forward and backward together: every collective is an all-reduce of one
    value per local token (or a scalar); with class weights also their local
    gradient, summed over the data shards; for a top-k teacher, its k logits
    per token. Never a logits-sized block."""
    found = _collectives(_vp_program(case, _mesh("auto")))
    tokens, classes = N // 2, C // 4
    allowed = {1, tokens} | ({classes} if case == "int_options" else set())
    allowed |= {tokens * 5} if case == "topk" else set()
    for op, sizes in found:
        assert op == "all-reduce", found
        assert set(sizes) <= allowed, found
    assert any(tokens in sizes for _, sizes in found), found


@multi_device
@pytest.mark.parametrize("case", ["linear", "linear_log_probs"])
def test_vocab_parallel_linear_communicates_tokens_not_logits(case):
    """The fused heads all-reduce per-token statistics, ``d hidden`` ([N, D])
    and the data-parallel sums of ``d weight``/``d bias`` ([D, V/4], [V/4]); no
    collective carries an [N, V] block."""
    found = _collectives(_vp_program(case, _mesh("auto")))
    tokens, cols = N // 2, C // 4
    allowed = {1, tokens, tokens * D, D * cols, cols}
    for op, sizes in found:
        assert op == "all-reduce", found
        assert set(sizes) <= allowed, found
    assert any(tokens * D in sizes for _, sizes in found), found


@multi_device
@pytest.mark.parametrize("mode", ["auto", "explicit"])
@pytest.mark.parametrize(
    ("layout", "bound"), [("batch", 1), ("class", N), ("both", N // 2)]
)
def test_jit_partitioned_integer_loss_communicates_per_token(layout, bound, mode):
    """Automatic and explicit partitioning of the integer-label loss: only
    all-reduces of at most one value per token (a scalar when only the batch is
    sharded: the global sum and count of the mean)."""
    mesh = _mesh(mode)
    batch, classes = LAYOUTS[layout]
    inputs = _inputs()
    x = jax.device_put(inputs["x"], NamedSharding(mesh, P(batch, classes)))
    y = jax.device_put(inputs["y"], NamedSharding(mesh, P(batch)))

    def loss(x, y):
        return CE_INT(x, y, ignore_index=IGNORE, label_smoothing=0.1, reduction="mean")

    with jax.set_mesh(mesh):
        text = jax.jit(jax.value_and_grad(loss)).lower(x, y).compile().as_text()
    found = _collectives(text)
    assert found
    for op, sizes in found:
        assert op == "all-reduce", found
        assert max(sizes) <= bound, found


def _init_mlp():
    k1, k2 = jax.random.split(jax.random.key(0))
    return {
        "w1": jax.random.normal(k1, (D, 32), jnp.float32) / math.sqrt(D),
        "b1": jnp.zeros((32,), jnp.float32),
        "w2": jax.random.normal(k2, (32, C), jnp.float32) / math.sqrt(32),
    }


def _mlp_loss(params, h, y):
    logits = jnp.tanh(h @ params["w1"] + params["b1"]) @ params["w2"]
    return CE_INT(logits, y, ignore_index=IGNORE, label_smoothing=0.1, reduction="mean")


def _train(step, params, batches):
    # optax mixes its int32 step count with floats: not allowed by the strict
    # promotion that conftest turns on for jaxent's own code.
    with jax.numpy_dtype_promotion("standard"):
        opt_state = OPTIMIZER.init(params)
        losses = []
        for h, y in batches:
            params, opt_state, loss = step(params, opt_state, h, y)
            losses.append(loss)
    return params, losses


OPTIMIZER = optax.adam(1e-2)


@jax.jit
def _dp_step(params, opt_state, h, y):
    loss, grads = jax.value_and_grad(_mlp_loss)(params, h, y)
    updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _batches():
    inputs = _inputs()
    rng = np.random.default_rng(11)
    out = []
    for _ in range(3):
        # The IGNORE labels stay in the first half: shards count unequally.
        half = N // 2
        perm = np.concatenate([rng.permutation(half), half + rng.permutation(N - half)])
        out.append((inputs["h"][perm], inputs["y"][perm]))
    return out


_training_cache = []


def _one_device_training():
    """Parameters and losses of the reference run (computed once)."""
    if not _training_cache:
        _training_cache.append(_train(_dp_step, _init_mlp(), _batches()))
    return _training_cache[0]


@multi_device
@pytest.mark.parametrize("mode", ["auto", "explicit"])
def test_data_parallel_training_matches_one_device(mode):
    """Three optax steps on a batch-sharded mesh give the one-device parameters:
    the mean is over the global count of counted tokens."""
    batches = _batches()
    ref_params, ref_losses = _one_device_training()
    mesh = _mesh(mode)
    rows = NamedSharding(mesh, P(("data", "model")))
    sharded = [(jax.device_put(h, rows), jax.device_put(y, rows)) for h, y in batches]
    with jax.set_mesh(mesh):
        # Parameters start replicated over the mesh, as the updates leave them
        # (so that every step runs one compiled program).
        init = jax.device_put(_init_mlp(), NamedSharding(mesh, P()))
        params, losses = _train(_dp_step, init, sharded)
    assert_close(jnp.stack(losses), jnp.stack(ref_losses), "float32")
    jax.tree.map(
        lambda a, b: assert_close(a, b, "float32", kind="grad"), params, ref_params
    )
    # The check has teeth: the mean of the two data shards' means differs.
    h, y = batches[0]
    shard_means = jax.jit(jax.vmap(_mlp_loss, (None, 0, 0)))(
        _init_mlp(), h.reshape(2, N // 2, D), y.reshape(2, N // 2)
    )
    assert abs(float(jnp.mean(shard_means)) - float(ref_losses[0])) > 1e-3


@multi_device
def test_shard_map_data_and_vocab_parallel_step_matches_one_device():
    """The hand-written version: per-shard sum and count, summed over "data";
    the head's weight split over "model" (vocab-parallel)."""
    mesh = _mesh("auto")
    batches = _batches()

    def head_loss(params, h, y, axis_name):
        hidden = jnp.tanh(h @ params["w1"] + params["b1"])
        return jaxent.linear_softmax_cross_entropy(
            hidden,
            params["w2"],
            y,
            ignore_index=IGNORE,
            label_smoothing=0.1,
            reduction="sum",
            axis_name=axis_name,
        )

    def sharded_loss(params, h, y):
        total = jax.lax.psum(head_loss(params, h, y, "model"), "data")
        count = jax.lax.psum(jnp.sum(y != IGNORE), "data")
        return total / count

    param_specs = {"w1": P(), "b1": P(), "w2": P(None, "model")}
    loss_fn = jax.shard_map(
        sharded_loss,
        mesh=mesh,
        in_specs=(param_specs, P("data"), P("data")),
        out_specs=P(),
    )

    @jax.jit
    def step(params, opt_state, h, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, h, y)
        updates, opt_state = OPTIMIZER.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    ref_params, ref_losses = _one_device_training()
    init = jax.device_put(_init_mlp(), NamedSharding(mesh, P()))
    params, losses = _train(step, init, batches)
    assert_close(jnp.stack(losses), jnp.stack(ref_losses), "float32")
    jax.tree.map(
        lambda a, b: assert_close(a, b, "float32", kind="grad"), params, ref_params
    )


# Every registered loss with two floating-point inputs, inside shard_map on a
# data axis: one input split by rows, the other split the same way or
# replicated (the same array for every shard, so its gradient is the sum over
# the shards). Drawn from the registry, so a new loss is covered by its entry.
def _two_input_losses():
    from jaxent._define import REGISTRY

    floats = ("logits", "probs", "log_probs", "binary")
    return sorted(
        name
        for name, d in REGISTRY.items()
        if len(d.inputs) == 2 and all(k in floats for k in d.inputs)
    )


def _kind_input(kind, seed, shape):
    rng = np.random.default_rng(seed)
    if kind == "logits":
        return jnp.asarray(rng.normal(size=shape) * 2, "float32")
    p = rng.uniform(0.05, 1.0, size=shape)
    if kind == "binary":
        return jnp.asarray(p, "float32")
    p = p / p.sum(-1, keepdims=True)
    return jnp.asarray(np.log(p) if kind == "log_probs" else p, "float32")


@multi_device
@pytest.mark.parametrize("replicated", [None, 0, 1])
@pytest.mark.parametrize("name", _two_input_losses())
def test_two_input_gradients_in_shard_map(name, replicated):
    from jaxent._define import REGISTRY

    fn = REGISTRY[name].public
    mesh = jax.make_mesh((DEVICES,), ("data",), axis_types=(AxisType.Auto,))
    rows = 2
    kinds = REGISTRY[name].inputs
    full = [_kind_input(k, i, (DEVICES * rows, 8)) for i, k in enumerate(kinds)]
    if replicated is not None:
        full[replicated] = full[replicated][:rows]
    specs = [P() if i == replicated else P("data") for i in range(2)]

    def per_shard(a, b):
        return jax.lax.psum(jnp.sum(fn(a, b)), "data")

    loss = jax.shard_map(per_shard, mesh=mesh, in_specs=tuple(specs), out_specs=P())
    value, grads = jax.jit(jax.value_and_grad(loss, (0, 1)))(*full)

    def one_device(a, b):
        if replicated == 0:
            a = jnp.tile(a, (DEVICES, 1))
        if replicated == 1:
            b = jnp.tile(b, (DEVICES, 1))
        return jnp.sum(fn(a, b))

    ref_value, ref_grads = jax.value_and_grad(one_device, (0, 1))(*full)
    assert_close(value, ref_value, "float32")
    for g, rg in zip(grads, ref_grads, strict=True):
        assert g.shape == rg.shape
        assert_close(g, rg, "float32", kind="grad")


def _head_losses(stored=None):
    """The fused heads (mean over counted tokens), as functions of ``(hidden,
    weight, teacher_weight, labels)``; ``hidden`` and the teacher's hidden
    states are the same here (a self-distilled head); ``stored`` is the top-k
    head's teacher ``(log_probs, ids)``."""

    def ce(h, w, tw, y):
        return jaxent.linear_softmax_cross_entropy(h, w, y, reduction="mean")

    def distill(h, w, tw, y):
        return jaxent.linear_softmax_distillation(
            h, w, h, tw, y, hard_weight=0.5, reduction="mean"
        )

    def topk(h, w, tw, y):
        # A stored teacher: the top 8 classes of the teacher head's softmax,
        # computed offline (outside the program).
        lq, ids = stored
        return jaxent.linear_topk_distillation(
            h, w, ids, lq, y, hard_weight=0.5, reduction="mean"
        )

    return {
        "linear_softmax_cross_entropy": ce,
        "linear_softmax_distillation": distill,
        "linear_topk_distillation": topk,
    }


@multi_device
@pytest.mark.parametrize("devices", [2, 8])
@pytest.mark.parametrize("name", sorted(_head_losses()))
def test_auto_partitioning_keeps_the_fused_head_vocab_sharded(name, devices):
    """Plain ``jax.jit`` on an Auto mesh with the weights sharded by columns:
    the default path (gradient in the forward pass over token chunks of full
    rows) never gathers a weight, returns ``d weight`` sharded like the
    weight, and matches one device. Several token chunks and 4096 columns, so
    that a vocabulary-blocked loop would have to slice the sharded axis."""
    n, d, v = 1024, 8, 4096
    mesh = jax.make_mesh(
        (devices,),
        ("model",),
        axis_types=(AxisType.Auto,),
        devices=jax.devices()[:devices],
    )
    rng = np.random.default_rng(3)
    h = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    w, tw = (jnp.asarray(rng.normal(size=(d, v)) / 3, jnp.float32) for _ in range(2))
    y = jnp.asarray(rng.integers(0, v, size=n)).at[:7].set(IGNORE)
    cols = NamedSharding(mesh, P(None, "model"))
    loss = _head_losses(jax.lax.top_k(jax.nn.log_softmax(h @ tw), 8))[name]
    step = jax.jit(jax.value_and_grad(loss, (0, 1)))
    args = (h, jax.device_put(w, cols), jax.device_put(tw, cols), y)
    compiled = step.lower(*args).compile()
    found = _collectives(compiled.as_text())
    assert found and all(op == "all-reduce" for op, _ in found), found
    # Per-token statistics, d hidden ([N, D]) and scalars; nothing V-sized.
    assert all(max(sizes) <= n * d for _, sizes in found), found
    assert compiled.output_shardings[1][1].spec == P(None, "model")
    value, (dh, dw) = step(*args)
    want, (want_dh, want_dw) = jax.jit(jax.value_and_grad(loss, (0, 1)))(h, w, tw, y)
    assert_close(value, want)
    assert_close(dh, want_dh, kind="grad")
    assert_close(dw, want_dw, kind="grad")

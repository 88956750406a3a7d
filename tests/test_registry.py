"""Registry-driven tests: every loss declared with ``jaxent._define.loss`` is
checked here without a table of function names.

For each registered loss and each of its options (one case per option, with the
values users pass, plus every reduction), in float64: the value and the VJP of
``jaxent.X`` and of ``jaxent.reference.X`` against the closed forms of the NumPy
oracle in ``tests/oracle.py`` (which shares no code with the package); every
bad-input kind its signature admits raises the same error from both; Hessian-
vector products (forward-over-reverse) of the custom rules equal the
reference's. Adding a loss adds a registry entry and an oracle; adding an
option adds one line to ``OPTION_VALUES``.
"""

from __future__ import annotations

import inspect
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxent
from jaxent._define import REGISTRY
from tests.helpers import assert_close
from tests.oracle import ORACLES

ROWS, CLASSES, HIDDEN = 4, 5, 3
IGNORE = -100
TOPK = 3  # a top-k teacher's k
INTEGER_KINDS = ("class_ids", "teacher_ids")

# One value per option, as users pass it. "where" and "weights" are built from
# the loss's shapes below. An option missing here fails
# test_every_option_has_a_value.
OPTION_VALUES = {
    "label_smoothing": 0.1,
    "z_loss": 0.01,
    "ignore_index": IGNORE,
    "base": 2.0,
    "block_size": (2, 3),
    "where": "mask",
    "weights": "array",
    "pos_weight": "array",
    "bias": "array",
    "axis": "moved",
    "temperature": 2.5,
    "beta": 0.3,
    "epsilon": -1.0,
    "alpha": 0.25,
    "gamma": 0.5,
    "softcap": 3.0,
    "teacher_bias": "array",
    "hard_weight": 0.5,
    "soft_weight": 0.7,
    "token_weights": "array",
    "low_memory": True,
    "tail": "renormalize",
}
# Options that select how, not what (reductions run for every case), or whose
# own tests cover them: axis_name (tests/test_sharded.py, test_multihost.py),
# the fused head's implementation, gradient filtering and auxiliary outputs
# (tests/test_linear.py, test_linear_pallas.py; the second output of
# linear_log_probs: tests/test_log_probs.py).
NOT_VALUES = {
    "reduction",
    "axis_name",
    "implementation",
    "filter_eps",
    "return_aux",
    "return_entropy",
}


def _names():
    return sorted(REGISTRY)


def _options(name):
    params = REGISTRY[name].parameters
    positional = _param_names(name)
    return [p for p in params if p not in positional and p not in NOT_VALUES]


def _param_names(name):
    params = list(REGISTRY[name].parameters)
    return tuple(params[: len(REGISTRY[name].inputs)])


def _classes(name):
    return 1 if REGISTRY[name].inputs == ("logits", "binary") else CLASSES


def _draw(kind, rng, name):
    """A float64 array of ``kind`` in the oracle's rows layout ``[1, R, C]``."""
    c = _classes(name)
    if kind == "logits":
        return rng.normal(size=(1, ROWS, c)) * 2
    if kind in ("probs", "log_probs"):
        p = rng.uniform(0.05, 1.0, size=(1, ROWS, c))
        p = p / p.sum(-1, keepdims=True)
        return np.log(p) if kind == "log_probs" else p
    if kind == "class_ids":
        return rng.integers(0, c, size=(1, ROWS))
    if kind == "binary":
        return rng.uniform(0.0, 1.0, size=(1, ROWS, c))
    if kind == "hidden":
        return rng.normal(size=(1, ROWS, HIDDEN))
    if kind == "weight":
        return rng.normal(size=(1, HIDDEN, c))
    # A distillation teacher: another hidden size, the same vocabulary.
    if kind == "teacher_hidden":
        return rng.normal(size=(1, ROWS, HIDDEN + 1))
    if kind == "teacher_weight":
        return rng.normal(size=(1, HIDDEN + 1, c))
    # A top-k teacher: distinct ids per row, mass 0.5 to 0.95 on them.
    if kind == "teacher_ids":
        return np.stack([rng.permutation(c)[:TOPK] for _ in range(ROWS)])[None]
    if kind == "teacher_log_probs":
        q = rng.uniform(0.05, 1.0, size=(1, ROWS, TOPK))
        q = q / q.sum(-1, keepdims=True) * rng.uniform(0.5, 0.95, (1, ROWS, 1))
        return np.log(q)
    raise AssertionError(f"no generator for input kind {kind!r}")


def _case(name, option, reduction, seed=0):
    """``(rows, kwargs, native)``: the oracle's arrays ``{name: [1, ...]}``,
    jaxent's keyword options, and jaxent's positional arrays."""
    rng = np.random.default_rng(seed)
    d = REGISTRY[name]
    names = _param_names(name)
    rows = {n: _draw(k, rng, name) for n, k in zip(names, d.inputs, strict=True)}
    kwargs = {}
    if "reduction" in d.parameters:
        kwargs["reduction"] = reduction
    c = _classes(name)
    if option == "ignore_index":
        ids = names[d.inputs.index("class_ids")]
        rows[ids][0, 1] = IGNORE
        kwargs["ignore_index"] = IGNORE
    elif option == "where":
        if d.where == "classes":
            mask = rng.uniform(size=(1, ROWS, c)) < 0.7
            mask[..., 0] = True
            kwargs["where"] = mask[0]
        else:
            keep = np.array([[True, False, True, True]])
            mask = np.broadcast_to(keep[..., None], (1, ROWS, c))
            kwargs["where"] = keep[0]
        rows["where"] = mask
    elif option in ("weights", "bias", "teacher_bias"):
        rows[option] = rng.uniform(0.5, 2.0, size=(1, c))
        kwargs[option] = rows[option][0]
    elif option == "token_weights":
        # Any sign: sample weights or per-token advantages.
        rows[option] = rng.normal(size=(1, ROWS))
        kwargs[option] = rows[option][0]
    elif option == "pos_weight":
        rows[option] = rng.uniform(0.5, 2.0, size=(1, ROWS, c))
        kwargs[option] = rows[option][0]
    elif option is not None and option != "axis":
        kwargs[option] = OPTION_VALUES[option]
    native = [jnp.asarray(rows[n][0]) for n in names]
    return rows, kwargs, native


def _oracle_opts(kwargs):
    o = {k: v for k, v in kwargs.items() if not hasattr(v, "shape")}
    o.setdefault("reduction", "none")
    return o


def _differentiable(name, kwargs):
    """Positional float inputs and float array options, by name."""
    d = REGISTRY[name]
    out = [
        n
        for n, k in zip(_param_names(name), d.inputs, strict=True)
        if k not in INTEGER_KINDS
    ]
    arrays = ("weights", "pos_weight", "bias", "teacher_bias")
    return out + [k for k in arrays if k in kwargs]


def _cases():
    for name in _names():
        if name not in ORACLES:
            continue
        reductions = ("none", "sum", "mean")
        if "reduction" not in REGISTRY[name].parameters:
            reductions = ("none",)
        for option in (None, *_options(name)):
            if option not in OPTION_VALUES and option is not None:
                continue
            for reduction in reductions:
                yield pytest.param(
                    name, option, reduction, id=f"{name}-{option}-{reduction}"
                )


def _of_differentiated(fn, name, native, kwargs, diff):
    """``(f, primals)``: ``fn`` as a function of the inputs named in ``diff``
    (positional arrays or array options), the others held at their values."""
    names = _param_names(name)
    given = dict(zip(names, native, strict=True))

    def f(*vals):
        args, opts = dict(given), dict(kwargs)
        for k, v in zip(diff, vals, strict=True):
            (args if k in args else opts)[k] = v
        return fn(*(args[n] for n in names), **opts)

    return f, [given[k] if k in given else kwargs[k] for k in diff]


def _vjp(fn, name, native, kwargs, diff, g):
    f, primals = _of_differentiated(fn, name, native, kwargs, diff)
    out, vjp = jax.vjp(f, *primals)
    return out, dict(zip(diff, vjp(jnp.asarray(g).reshape(out.shape)), strict=True))


def _moved(native, name):
    """The inputs with the class axis first (and ``axis=0``)."""
    kinds = REGISTRY[name].inputs
    return [
        a if k == "class_ids" else jnp.moveaxis(a, -1, 0)
        for a, k in zip(native, kinds, strict=True)
    ]


def test_every_loss_has_an_oracle_and_a_twin():
    for name in _names():
        assert name in ORACLES, f"{name}: no ref_{name} in tests/oracle.py"
        d = REGISTRY[name]
        assert getattr(jaxent, name) is d.public, name
        assert getattr(jaxent.reference, name) is d.reference, name
        assert inspect.signature(d.public) == inspect.signature(d.reference)
        assert name in jaxent.__all__ and name in jaxent.reference.__all__


def test_every_option_has_a_value():
    for name in _names():
        for option in _options(name):
            assert option in OPTION_VALUES, f"{name}: add `{option}` to OPTION_VALUES"


@pytest.mark.parametrize(("name", "option", "reduction"), list(_cases()))
def test_value_and_gradient_match_oracle(name, option, reduction):
    rows, kwargs, native = _case(name, option, reduction)
    o = _oracle_opts(kwargs)
    diff = _differentiable(name, kwargs)
    rng = np.random.default_rng(1)
    out_shape = jax.eval_shape(
        lambda *a: REGISTRY[name].public(*a, **kwargs), *native
    ).shape
    g = rng.normal(size=out_shape)
    g_rows = g[None] if out_shape else np.asarray([g])
    expected, expected_grads = ORACLES[name](np, rows, o, g_rows)
    expected = np.asarray(expected)[0]
    for fn in (REGISTRY[name].public, REGISTRY[name].reference):
        value, grads = _vjp(fn, name, native, kwargs, diff, g)
        assert_close(value, expected.reshape(value.shape))
        for k in diff:
            want = np.asarray(expected_grads[k])[0]
            assert_close(grads[k], want.reshape(grads[k].shape), kind="grad")
    if option == "axis":
        moved = _moved(native, name)
        value = REGISTRY[name].public(*moved, **dict(kwargs, axis=0))
        want = expected if expected.ndim < 2 else np.moveaxis(expected, -1, 0)
        assert_close(value, want.reshape(value.shape))


def _bad_inputs(name):
    """``(kind, args, kwargs)`` for every bad-input kind the signature admits."""
    _, kwargs, native = _case(name, None, "mean")
    params = REGISTRY[name].parameters
    kinds = REGISTRY[name].inputs
    yield "input not floating point", [native[0].astype(jnp.int32), *native[1:]], kwargs
    if len(native) > 1 and kinds[1] != "class_ids" and kinds[0] != "hidden":
        wrong = [native[0], native[1][:-1], *native[2:]]
        yield "second input of another shape", wrong, kwargs
    if "class_ids" in kinds:
        i = kinds.index("class_ids")
        bad = list(native)
        bad[i] = bad[i].astype(jnp.float64)
        yield "integer labels not integers", bad, kwargs
    checks = {
        "axis": [("axis not an integer", 1.5), ("axis out of range", 7)],
        "reduction": [("reduction unknown", "avg")],
        "label_smoothing": [("label_smoothing outside [0, 1]", 1.5)],
        "z_loss": [("z_loss negative", -1.0)],
        "ignore_index": [("ignore_index not an integer", 1.5)],
        "base": [("base not a valid logarithm base", 1.0)],
        "where": [("where not boolean", jnp.ones(native[0].shape[:1], jnp.int32))],
        "weights": [("weights of the wrong shape", jnp.ones(CLASSES + 1))],
        "pos_weight": [("pos_weight not floating point", jnp.ones(1, jnp.int32))],
        "block_size": [("block_size not positive", 0)],
        "bias": [("bias of the wrong shape", jnp.ones(CLASSES + 1))],
        "teacher_bias": [("teacher_bias of the wrong shape", jnp.ones(CLASSES + 1))],
        "hard_weight": [("hard_weight negative", -1.0)],
        "temperature": [("temperature not positive", 0.0)],
        "beta": [("beta outside [0, 1]", 1.5)],
        "epsilon": [("epsilon not finite", float("inf"))],
        "alpha": [("alpha outside [0, 1]", 1.5)],
        "gamma": [("gamma negative", -1.0)],
    }
    for option, cases in checks.items():
        if option in params:
            for kind, value in cases:
                yield kind, native, dict(kwargs, **{option: value})


def _bad_cases():
    for name in _names():
        for kind, args, kwargs in _bad_inputs(name):
            yield pytest.param(name, args, kwargs, id=f"{name}-{kind}")


@pytest.mark.parametrize(("name", "args", "kwargs"), list(_bad_cases()))
def test_bad_input_same_error_from_both(name, args, kwargs):
    errors = []
    for fn in (REGISTRY[name].public, REGISTRY[name].reference):
        with pytest.raises((TypeError, ValueError)) as info:
            jax.jit(lambda *a, fn=fn: fn(*a, **kwargs)).trace(*args)
        errors.append((type(info.value), str(info.value)))
    assert errors[0] == errors[1]
    assert re.match(rf"{name}: `", errors[0][1]), errors[0][1]


def _hvp_cases():
    for name in _names():
        for option in (None, *_options(name)):
            if option in OPTION_VALUES and option not in ("axis", "block_size"):
                yield pytest.param(name, option, id=f"{name}-{option}")
        yield pytest.param(name, None, id=f"{name}-None-mean")


def _twins_and_tangents(name, option, seed):
    """``(custom, plain, primals, tangents)``: ``jaxent.X`` and its reference
    twin as functions of every differentiable input (the mean reduction, the
    ``option`` set), those inputs, and random tangents for them."""
    _, kwargs, native = _case(name, option, "mean")
    diff = _differentiable(name, kwargs)
    d = REGISTRY[name]
    custom, primals = _of_differentiated(d.public, name, native, kwargs, diff)
    plain, _ = _of_differentiated(d.reference, name, native, kwargs, diff)
    rng = np.random.default_rng(seed)
    tangents = [jnp.asarray(rng.normal(size=p.shape)) for p in primals]
    return custom, plain, primals, tangents


@pytest.mark.parametrize(("name", "option"), list(_hvp_cases()))
def test_hessian_vector_products_match_reference(name, option):
    """Forward-over-reverse through the custom rules (their backward is plain
    JAX) equals the reference's, every differentiable input at once."""
    custom, plain, primals, tangents = _twins_and_tangents(name, option, seed=2)
    diff = range(len(primals))
    hvps = []
    for f in (custom, plain):
        grad = jax.grad(lambda *v, f=f: jnp.sum(f(*v) ** 2), tuple(diff))
        hvps.append(jax.jvp(grad, primals, tangents)[1])
    for custom, plain in zip(*hvps, strict=True):
        assert np.isfinite(np.asarray(custom)).all()
        assert_close(custom, plain, kind="grad", scale=1e3)


@pytest.mark.parametrize(("name", "option"), list(_hvp_cases()))
def test_reference_forward_mode_matches_the_rule(name, option):
    """``jax.jvp`` of ``jaxent.reference.X`` (the documented forward-mode path)
    equals the custom rule's VJP contracted with the same tangents; ``jax.jvp``
    of ``jaxent.X`` itself is refused, as a ``custom_vjp`` must be."""
    custom, plain, primals, tangents = _twins_and_tangents(name, option, seed=4)
    value, tangent = jax.jvp(lambda *v: jnp.sum(plain(*v)), primals, tangents)
    custom_value, grads = jax.value_and_grad(
        lambda *v: jnp.sum(custom(*v)), tuple(range(len(primals)))
    )(*primals)
    assert_close(value, custom_value)
    want = sum(jnp.vdot(g, t) for g, t in zip(grads, tangents, strict=True))
    assert_close(tangent, want, kind="grad")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(custom, primals, tangents)


def _wide_cases():
    for name in _names():
        d = REGISTRY[name]
        if d.inputs[0] == "logits" and "binary" not in d.inputs:
            yield name


@pytest.mark.parametrize("name", list(_wide_cases()))
def test_half_precision_is_computed_in_float32(name):
    """float16 inputs over 70,000 equal classes: the row's sum-exp (70,000)
    overflows float16 (max 65,504), so only a computation in float32 gives the
    float64 oracle's value on the same inputs."""
    c = 70_000
    rng = np.random.default_rng(3)
    d = REGISTRY[name]
    rows = {}
    for n, kind in zip(_param_names(name), d.inputs, strict=True):
        if kind == "logits":
            rows[n] = np.zeros((1, 1, c))
        elif kind == "class_ids":
            rows[n] = np.array([[7]])
        elif kind == "teacher_ids":
            rows[n] = np.array([[[7, 11, 3]]])
        elif kind == "teacher_log_probs":
            lq = np.log(np.array([[[0.2, 0.1, 0.3]]]))
            rows[n] = lq.astype(np.float16).astype(np.float64)
        else:
            p = rng.uniform(0.5, 1.0, size=(1, 1, c))
            p = (p / p.sum()).astype(np.float16).astype(np.float64)
            rows[n] = np.log(p) if kind == "log_probs" else p
    native = [
        jnp.asarray(rows[n][0], jnp.int32 if k in INTEGER_KINDS else jnp.float16)
        for n, k in zip(_param_names(name), d.inputs, strict=True)
    ]
    value = d.public(*native)
    assert value.dtype == jnp.float16
    out_shape = value.shape
    g = np.ones((1, *out_shape))
    expected = np.asarray(ORACLES[name](np, rows, {"reduction": "none"}, g)[0])[0]
    assert_close(value, expected.reshape(out_shape), dtype="float16")

"""Fused linear head log-probabilities (``linear_log_probs``), the second output
included: values and gradients with random cotangents for both outputs against
the plain-JAX twin, ``jax.nn.log_softmax`` of materialized logits and the
float64 NumPy oracle, for every option (bias, masked classes, temperature,
softcap, ``where``, ragged tiles); finite differences; second order and the
twin's forward mode; jit and vmap; bfloat16 inputs (float32 outputs, an exact
PPO ratio of 1); out-of-range tokens; compiled memory independent of V.

tests/test_registry.py covers the log-probabilities alone option by option
(``return_entropy`` is in its ``NOT_VALUES``); this file covers the pair.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import jaxent
from jaxent import reference
from tests.helpers import assert_close
from tests.oracle import ref_linear_log_probs

pytestmark = pytest.mark.slow

FUSED = jaxent.linear_log_probs
TWIN = reference.linear_log_probs
# 2 x 5 tokens, D = 3, V = 24.
BATCH, D, V = (2, 5), 3, 24
# Classes some cases mask (-inf bias): no token falls on them.
MASKABLE = (2, 9, 17)


def _problem(seed, dtype="float64"):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(*BATCH, D)), dtype)
    w = jnp.asarray(rng.normal(size=(D, V)), dtype)
    b = jnp.asarray(rng.normal(size=V), dtype)
    tokens = rng.integers(0, V, size=BATCH)
    tokens = np.where(np.isin(tokens, MASKABLE), 3, tokens)
    where = jnp.asarray(rng.uniform(size=BATCH) > 0.25).at[0, 0].set(False)
    return h, w, b, jnp.asarray(tokens, jnp.int32), where


# Together: every option, with and without the entropy, masked classes, even,
# single and ragged tiles (block_size dividing neither N = 10 nor V = 24).
CASES = {
    "plain": dict(),
    "plain-entropy": dict(return_entropy=True),
    "bias-masked-T2-where-ragged": dict(
        bias=True,
        masked=MASKABLE,
        temperature=2.0,
        where=True,
        return_entropy=True,
        block_size=(4, 7),
    ),
    "softcap-T0.7": dict(softcap=2.0, temperature=0.7, return_entropy=True),
    "bias-softcap-where": dict(
        bias=True, softcap=1.5, where=True, return_entropy=True, block_size=12
    ),
    "bias-where-no-entropy": dict(bias=True, where=True, temperature=1.3),
}


def _kwargs(b, where, opts):
    kw = dict(opts)
    masked = kw.pop("masked", ())
    if masked:
        b = b.at[jnp.array(masked)].set(-jnp.inf)
    kw["bias"] = b if kw.get("bias") else None
    kw["where"] = where if kw.get("where") else None
    return kw


def _vjp(fn, h, w, tokens, kw, cts):
    """Outputs (always a tuple) and the VJP w.r.t. hidden, weight and the bias
    (when given) with the cotangents ``cts`` (one per output)."""
    names = ["hidden", "weight"] + (["bias"] if kw["bias"] is not None else [])

    def f(h, w, *b):
        opts = dict(kw, bias=b[0]) if b else kw
        out = fn(h, w, tokens, **opts)
        return out if isinstance(out, tuple) else (out,)

    primals = (h, w) + ((kw["bias"],) if kw["bias"] is not None else ())
    out, vjp = jax.vjp(f, *primals)
    return out, dict(zip(names, vjp(cts), strict=True))


def _materialized(
    h,
    w,
    tokens,
    *,
    bias=None,
    temperature=1.0,
    softcap=None,
    return_entropy=False,
    where=None,
    block_size=None,
):
    """The same outputs from ``jax.nn.log_softmax`` of materialized logits."""
    del block_size
    x = h @ w
    if bias is not None:
        x = x + bias
    if softcap is not None:
        x = jnp.where(x == -jnp.inf, -jnp.inf, softcap * jnp.tanh(x / softcap))
    logp = jax.nn.log_softmax(x / temperature)
    lp = jnp.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    p = jnp.exp(logp)
    ent = -jnp.sum(jnp.where(p == 0, 0.0, p * jnp.where(p == 0, 0.0, logp)), -1)
    kept = jnp.ones(tokens.shape, bool) if where is None else where
    out = (jnp.where(kept, lp, 0.0), jnp.where(kept, ent, 0.0))
    return out if return_entropy else out[0]


def _oracle(h, w, tokens, kw, cts):
    rows = {
        "hidden": np.asarray(h).reshape(1, -1, D),
        "weight": np.asarray(w)[None],
        "tokens": np.asarray(tokens).reshape(1, -1),
    }
    if kw["bias"] is not None:
        rows["bias"] = np.asarray(kw["bias"])[None]
    if kw["where"] is not None:
        keep = np.asarray(kw["where"]).reshape(1, -1, 1)
        rows["where"] = np.broadcast_to(keep, (1, keep.shape[1], V))
    o = {k: kw[k] for k in ("temperature", "softcap", "return_entropy") if k in kw}
    g = np.stack([np.asarray(c).reshape(1, -1) for c in cts], -1)
    g = g if kw.get("return_entropy") else g[..., 0]
    with np.errstate(invalid="ignore", divide="ignore"):
        value, grads = ref_linear_log_probs(np, rows, o, g)
    value = np.asarray(value)[0]
    value = np.moveaxis(value, -1, 0) if kw.get("return_entropy") else value[None]
    return value, {k: np.asarray(v)[0] for k, v in grads.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_matches_twin_materialized_and_oracle(case):
    h, w, b, tokens, where = _problem(0)
    kw = _kwargs(b, where, CASES[case])
    rng = np.random.default_rng(1)
    n_out = 2 if kw.get("return_entropy") else 1
    cts = tuple(jnp.asarray(rng.normal(size=BATCH)) for _ in range(n_out))

    @jax.jit
    def all_three(h, w):
        return [_vjp(fn, h, w, tokens, kw, cts) for fn in (FUSED, TWIN, _materialized)]

    (got, grads), *others = all_three(h, w)
    value, oracle_grads = _oracle(h, w, tokens, kw, cts)
    for out, want in zip(got, value, strict=True):
        assert out.shape == BATCH and out.dtype == jnp.float64
        assert bool(jnp.all(jnp.isfinite(out)))
        assert_close(out, want.reshape(BATCH))
        if kw["where"] is not None:
            assert not bool(jnp.any(out[~where]))
    for name, grad in grads.items():
        assert bool(jnp.all(jnp.isfinite(grad)))
        assert_close(grad, oracle_grads[name].reshape(grad.shape), kind="grad")
    if kw["bias"] is not None and "masked" in CASES[case]:
        assert not bool(jnp.any(grads["bias"][jnp.array(MASKABLE)]))
    for want, want_grads in others:
        for out, w_out in zip(got, want, strict=True):
            assert_close(out, w_out)
        for name, grad in grads.items():
            assert_close(grad, want_grads[name], kind="grad")


def _rl_scalar(fn, tokens, where, **kw):
    """A PPO-like objective, non-linear in both outputs."""
    adv = jnp.linspace(-1.0, 1.0, tokens.size).reshape(tokens.shape)

    def f(h, w, b):
        lp, ent = fn(h, w, tokens, bias=b, where=where, return_entropy=True, **kw)
        ratio = jnp.exp(lp - 0.1)
        clipped = jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.2) * adv)
        return -jnp.sum(clipped) - 0.1 * jnp.sum(ent**2)

    return f


def test_finite_differences():
    h, w, b, tokens, where = _problem(3)
    f = _rl_scalar(FUSED, tokens, where, temperature=1.5, softcap=2.5)
    check_grads(jax.jit(f), (h, w, b), order=1, modes=["rev"])


def test_second_order_and_twin_forward_mode_with_entropy():
    # Forward-over-reverse through the custom rule equals the twin's; the
    # twin's forward mode equals the rule's VJP along the same tangents.
    h, w, b, tokens, where = _problem(4)
    kw = dict(temperature=2.0, softcap=3.0, block_size=(4, 7))
    f, g = (_rl_scalar(fn, tokens, where, **kw) for fn in (FUSED, TWIN))
    rng = np.random.default_rng(5)
    tangents = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in (h, w, b))

    @jax.jit
    def run():
        hvps = [
            jax.jvp(jax.grad(fn, (0, 1, 2)), (h, w, b), tangents)[1] for fn in (f, g)
        ]
        value, tangent = jax.jvp(g, (h, w, b), tangents)
        fused_value, grads = jax.value_and_grad(f, (0, 1, 2))(h, w, b)
        along = sum(jnp.vdot(a, t) for a, t in zip(grads, tangents, strict=True))
        return hvps, (value, tangent), (fused_value, along)

    (hvp, twin_hvp), (value, tangent), (fused_value, along) = run()
    for a, e in zip(hvp, twin_hvp, strict=True):
        assert bool(jnp.all(jnp.isfinite(a)))
        assert_close(a, e, kind="grad", scale=1e3)
    assert_close(fused_value, value)
    assert_close(along, tangent, kind="grad")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(f, (h, w, b), tangents)


def test_jit_eager_and_vmap_agree():
    problems = [_problem(s) for s in range(3)]
    _, _, _, tokens, where = problems[0]
    f = jax.value_and_grad(_rl_scalar(FUSED, tokens, where, temperature=0.8), (0, 1, 2))
    stacked = [jnp.stack([p[i] for p in problems]) for i in range(3)]
    looped = [jax.jit(f)(*p[:3]) for p in problems]
    eager = f(*problems[0][:3])
    assert_close(looped[0][0], eager[0])
    for a, e in zip(looped[0][1], eager[1], strict=True):
        assert_close(a, e, kind="grad")
    values, grads = jax.jit(jax.vmap(f))(*stacked)
    assert_close(values, jnp.stack([v for v, _ in looped]))
    for i, g in enumerate(grads):
        assert_close(g, jnp.stack([gs[i] for _, gs in looped]), kind="grad")


def test_bfloat16_inputs_give_float32_outputs_and_an_exact_ratio():
    h, w, b, tokens, where = _problem(5, "bfloat16")
    kw = dict(bias=b, where=where, temperature=1.3, return_entropy=True)
    up = [a.astype(jnp.float32) for a in (h, w, b)]

    lp_old, ent_old = jax.jit(lambda h, w: FUSED(h, w, tokens, **kw))(h, w)
    assert lp_old.dtype == ent_old.dtype == jnp.float32
    want_lp, want_ent = TWIN(up[0], up[1], tokens, **dict(kw, bias=up[2]))
    assert_close(lp_old, want_lp, dtype="float32")
    assert_close(ent_old, want_ent, dtype="float32")

    # The sampling policy's log-probabilities, recomputed under a gradient by
    # the same bfloat16 policy: the ratio is exactly 1 (not bfloat16 noise).
    def objective(h, w):
        lp, ent = FUSED(h, w, tokens, **kw)
        ratio = jnp.exp(lp - lp_old)
        return -jnp.sum(ratio) - 0.01 * jnp.sum(ent), ratio

    (_, ratio), grads = jax.jit(jax.value_and_grad(objective, (0, 1), has_aux=True))(
        h, w
    )
    assert ratio.dtype == jnp.float32
    assert bool(jnp.all(ratio == 1.0))
    assert [g.dtype for g in grads] == [jnp.dtype(jnp.bfloat16)] * 2
    assert bool(jnp.all(jnp.isfinite(grads[0].astype(jnp.float32))))


def test_out_of_range_tokens_are_nan_for_their_token_only():
    h, w, b, tokens, _ = _problem(6)
    bad = tokens.at[0, 1].set(V).at[1, 2].set(-1).at[1, 3].set(V + 5)
    where = jnp.ones(BATCH, bool).at[1, 3].set(False)  # an excluded bad token
    kw = dict(bias=b, where=where, return_entropy=True)

    @jax.jit
    def run():
        def f(h, t):
            lp, ent = FUSED(h, w, t, **kw)
            return jnp.sum(lp) + jnp.sum(ent)

        return [(FUSED(h, w, t, **kw), jax.grad(f)(h, t)) for t in (bad, tokens)]

    ((lp, ent), dh), ((good_lp, good_ent), good_dh) = run()
    nan = np.zeros(BATCH, bool)
    nan[0, 1] = nan[1, 2] = True
    assert bool(jnp.all(jnp.isnan(lp[nan])))
    assert_close(lp[~nan & where], good_lp[~nan & where])
    assert lp[1, 3] == 0 and ent[1, 3] == 0
    # The entropy does not depend on the token.
    assert_close(ent[where], good_ent[where])
    assert bool(jnp.all(jnp.isnan(dh[nan])))
    assert_close(dh[~nan], good_dh[~nan], kind="grad")
    assert not bool(jnp.any(dh[1, 3]))


def test_masked_classes_give_finite_values_and_zero_gradient():
    h, w, b, tokens, _ = _problem(7)
    masked = jnp.array(MASKABLE)
    b = b.at[masked].set(-jnp.inf)
    on_masked = tokens.at[0, 3].set(MASKABLE[0])

    def f(h, w, b, t):
        lp, ent = FUSED(h, w, t, bias=b, return_entropy=True, softcap=3.0)
        return jnp.sum(jnp.where(jnp.isinf(lp), 0.0, lp)) + jnp.sum(ent), (lp, ent)

    (_, (lp, ent)), grads = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))(
        h, w, b, on_masked
    )
    # A token on a masked class has probability 0.
    assert lp[0, 3] == -jnp.inf
    keep = np.ones(BATCH, bool)
    keep[0, 3] = False
    assert bool(jnp.all(jnp.isfinite(lp[keep]))) and bool(jnp.all(jnp.isfinite(ent)))
    for g in grads:
        assert bool(jnp.all(jnp.isfinite(g)))
    assert not bool(jnp.any(grads[1][:, masked])) and not bool(
        jnp.any(grads[2][masked])
    )
    # The masked classes are as if they were not there.
    keep_cols = np.setdiff1d(np.arange(V), MASKABLE)
    lp_small, ent_small = FUSED(
        h,
        w[:, keep_cols],
        jnp.asarray(np.searchsorted(keep_cols, tokens), jnp.int32),
        bias=b[keep_cols],
        return_entropy=True,
        softcap=3.0,
    )
    assert_close(ent, ent_small)
    assert_close(lp[keep], lp_small[keep])


def test_no_vocab_sized_buffer_in_compiled_program():
    # Lowering only: the compiled temp memory of value_and_grad of a PPO-like
    # objective does not grow with V (the materialized path holds N x V).
    n, d = 1024, 64

    def temp_bytes(fn, v):
        args = (
            jax.ShapeDtypeStruct((n, d), jnp.float32),
            jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((v,), jnp.float32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )

        def loss(h, w, b, y):
            lp, ent = fn(h, w, y, bias=b, return_entropy=True, temperature=0.9)
            return -jnp.mean(jnp.exp(lp - 0.5) * 0.3) - 0.01 * jnp.mean(ent)

        step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
        return step.lower(*args).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(FUSED, 8192), temp_bytes(FUSED, 65536)
    logits_bytes = n * 65536 * 4
    assert large <= small * 1.05 + 2**20
    assert large < logits_bytes / 8
    assert temp_bytes(TWIN, 8192) > n * 8192 * 4


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        (dict(return_entropy=1), TypeError, "`return_entropy` must be a bool; got 1"),
        (dict(where=jnp.ones(3, bool)), ValueError, "`where` must be a token mask"),
        (dict(temperature=0.0), ValueError, "`temperature`"),
        (dict(softcap=-1.0), ValueError, "`softcap`"),
        (dict(block_size=(1, 2, 3)), ValueError, "`block_size`"),
    ],
)
def test_bad_options_same_error_from_both(kw, error, match):
    h, w, _, tokens, _ = _problem(8)
    errors = []
    for fn in (FUSED, TWIN):
        with pytest.raises(error, match=match) as info:
            jax.jit(lambda h, fn=fn: fn(h, w, tokens, **kw)).trace(h)
        errors.append(str(info.value))
    assert errors[0] == errors[1]
    assert errors[0].startswith("linear_log_probs: `")


def test_bad_tokens():
    h, w, _, tokens, _ = _problem(9)
    with pytest.raises(TypeError, match="`tokens` must be an integer array"):
        FUSED(h, w, tokens.astype(jnp.float64))
    with pytest.raises(ValueError, match="`tokens` must have hidden's leading shape"):
        FUSED(h, w, tokens[0])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e7])
def test_equal_logits_at_large_offsets_give_exactly_log_v(dtype, offset):
    # Every logit equal (zero weight, a constant bias) over several vocabulary
    # blocks: log p = -log V and H = log V, whatever the offset.
    h = jnp.ones((*BATCH, D), dtype)
    w = jnp.zeros((D, V), dtype)
    b = jnp.full((V,), offset, dtype)
    _, _, _, tokens, _ = _problem(10)
    lp, ent = FUSED(h, w, tokens, bias=b, return_entropy=True, block_size=(3, 5))
    assert_close(lp, np.full(BATCH, -np.log(V)))
    assert_close(ent, np.full(BATCH, np.log(V)))


@pytest.mark.parametrize("order", ["rising", "falling"])
def test_running_sums_across_blocks_whose_max_jumps(order):
    # Logits spread over [-3000, 0] across vocabulary blocks of 5: where the
    # max rises, every earlier block's terms underflow (their rescale is 0).
    h, w, _, tokens, where = _problem(11)
    b = jnp.linspace(-3000.0, 0.0, V)
    b = b if order == "rising" else b[::-1]
    kw = dict(
        bias=b, where=where, temperature=2.0, return_entropy=True, block_size=(3, 5)
    )

    def f(fn):
        def scalar(h, w, b):
            lp, ent = fn(h, w, tokens, **dict(kw, bias=b))
            lp = jnp.where(jnp.isfinite(lp), lp, 0.0)
            return jnp.sum(jnp.sin(lp)) + jnp.sum(ent**2), (lp, ent)

        return jax.value_and_grad(scalar, (0, 1, 2), has_aux=True)(h, w, b)

    (_, (lp, ent)), grads = jax.jit(lambda: f(FUSED))()
    (_, (want_lp, want_ent)), want_grads = jax.jit(lambda: f(TWIN))()
    assert_close(lp, want_lp)
    assert_close(ent, want_ent)
    for g, e in zip(grads, want_grads, strict=True):
        assert bool(jnp.all(jnp.isfinite(g)))
        assert_close(g, e, kind="grad")


@pytest.mark.parametrize("fill", [np.nan, np.inf])
def test_garbage_hidden_states_excluded_by_where_do_not_leak(fill):
    # Padding's hidden states may hold anything: under `where` they change no
    # value and no gradient (d weight and d bias included), and get 0.
    h, w, b, tokens, where = _problem(12)
    dirty = jnp.where(where[..., None], h, fill)

    def f(h, w, b):
        lp, ent = FUSED(h, w, tokens, bias=b, where=where, return_entropy=True)
        return jnp.sum(jnp.exp(lp)) + jnp.sum(ent**2), (lp, ent)

    run = jax.jit(jax.value_and_grad(f, (0, 1, 2), has_aux=True))
    (_, clean), clean_grads = run(h, w, b)
    (_, out), grads = run(dirty, w, b)
    for a, e in zip(out, clean, strict=True):
        assert_close(a, e)
    for g, e in zip(grads, clean_grads, strict=True):
        assert_close(g, e, kind="grad")
    assert not bool(jnp.any(grads[0][~where]))

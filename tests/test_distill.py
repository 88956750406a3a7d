"""Distillation: the generalized Jensen-Shannon divergence and the temperature
option of the softmax divergences, against float64 NumPy formulas, TRL's and
Liger's formulas written in PyTorch, and the plain-JAX reference."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import jaxent
from jaxent import reference
from tests.helpers import assert_close, logits, tolerance

# Deep tests of one family; tests/test_registry.py covers it in the quick subset.
pytestmark = pytest.mark.slow

JSD = jaxent.softmax_generalized_jsd
BETAS = (0.0, 0.1, 0.5, 0.9, 1.0)
TEMPERATURES = (0.5, 1.0, 2.5)
SHAPE = (4, 7)


# -- float64 NumPy: the formulas as written in the definition ------------------


def _log_softmax(x):
    """-inf on a row with no admissible class (all -inf), where SciPy's is NaN."""
    x = np.asarray(x, np.float64)
    empty = np.all(np.isneginf(x), axis=-1, keepdims=True)
    with np.errstate(invalid="ignore"):
        return np.where(empty, -np.inf, scipy.special.log_softmax(x, axis=-1))


def np_jsd(s, t, beta, temperature=1.0):
    """Per row: ``beta KL(p || M) + (1 - beta) KL(q || M)`` from probabilities
    (``rel_entr``: ``0 log 0 = 0``, ``+inf`` for mass on a zero), with the KL
    divergences at the ends."""
    q = np.exp(_log_softmax(np.asarray(s, np.float64) / temperature))
    p = np.exp(_log_softmax(np.asarray(t, np.float64) / temperature))
    kl = lambda a, b: scipy.special.rel_entr(a, b).sum(-1)  # noqa: E731
    if beta == 0:
        return kl(p, q)
    if beta == 1:
        return kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * kl(p, m) + (1 - beta) * kl(q, m)


def np_jsd_grads(s, t, beta, temperature=1.0):
    """The closed-form gradients of the row sum w.r.t. the student and teacher
    logits: ``((1 - beta) / T) q (log q - log M - KL(q || M))`` and ``(beta /
    T) p (log p - log M - KL(p || M))``, the KL ones at the ends."""
    lq = _log_softmax(np.asarray(s, np.float64) / temperature)
    lp = _log_softmax(np.asarray(t, np.float64) / temperature)
    q, p = np.exp(lq), np.exp(lp)
    with np.errstate(invalid="ignore", divide="ignore"):
        if beta in (0, 1):
            # KL(f || h): f the teacher at beta = 0.
            f, lf, lh, h = (p, lp, lq, q) if beta == 0 else (q, lq, lp, p)
            r = np.where(f > 0, lf - lh, 0.0)
            kl = (f * r).sum(-1, keepdims=True)
            d_f, d_h = f * (r - kl), h - f
            ds, dt = (d_h, d_f) if beta == 0 else (d_f, d_h)
        else:
            lm = np.log(beta * p + (1 - beta) * q)
            rq = np.where(q > 0, lq - lm, 0.0)
            rp = np.where(p > 0, lp - lm, 0.0)
            klq = (q * rq).sum(-1, keepdims=True)
            klp = (p * rp).sum(-1, keepdims=True)
            ds = (1 - beta) * q * (rq - klq)
            dt = beta * p * (rp - klp)
    return ds / temperature, dt / temperature


def _value_and_grads(fn, **kw):
    """(value, d/dlogits, d/dtarget_logits) of ``sum(fn(s, t) * w)``, eagerly:
    the primitives compiled for one option value serve every other (a jit per
    static option would compile a program each)."""

    def scalar(s, t, w):
        return jnp.sum(fn(s, t, **kw) * w)

    def run(s, t, w):
        value = fn(s, t, **kw)
        return (value, *jax.grad(scalar, (0, 1))(s, t, w))

    return run


def _inputs(seed=0, shape=SHAPE, dtype="float64"):
    return logits(seed, shape, dtype), logits(seed + 1, shape, dtype)


# -- values and gradients ------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_values_and_gradients_match_numpy(temperature):
    s, t = _inputs()
    w = jnp.asarray(np.random.default_rng(5).normal(size=SHAPE[0]))
    for beta in BETAS:
        kw = dict(beta=beta, temperature=temperature)
        value, ds, dt = _value_and_grads(JSD, **kw)(s, t, w)
        assert_close(value, np_jsd(s, t, beta, temperature))
        es, et = np_jsd_grads(s, t, beta, temperature)
        assert_close(ds, es * np.asarray(w)[:, None], kind="grad")
        assert_close(dt, et * np.asarray(w)[:, None], kind="grad")
        # The plain-JAX twin's autodiff gives the same.
        ref = _value_and_grads(reference.softmax_generalized_jsd, **kw)(s, t, w)
        for a, b in zip((value, ds, dt), ref, strict=True):
            assert_close(a, b, kind="grad")


def test_ends_are_the_kl_divergences_and_the_limits_agree():
    s, t = _inputs(2)
    for temperature in (1.0, 2.5):
        fwd = jaxent.softmax_kl_divergence(s, t, temperature=temperature)
        rev = jaxent.softmax_kl_divergence(t, s, temperature=temperature)
        assert_close(JSD(s, t, beta=0.0, temperature=temperature), fwd)
        assert_close(JSD(s, t, beta=1.0, temperature=temperature), rev)
        # JSD / beta -> KL(p || q) as beta -> 0 and JSD / (1 - beta) -> KL(q || p)
        # as beta -> 1, linearly: the relative error is O(beta) (O(1 - beta)).
        for end, kl in ((0.0, fwd), (1.0, rev)):
            errors = []
            for eps in (1e-4, 1e-6):
                beta = eps if end == 0 else 1 - eps
                ratio = JSD(s, t, beta=beta, temperature=temperature) / eps
                errors.append(np.max(np.abs(np.asarray(ratio / kl) - 1)))
            assert errors[1] < 1e-4 and errors[1] < errors[0] / 50, errors


def test_zero_at_equal_logits_and_nonnegative():
    s, t = _inputs(3)
    for beta in BETAS:
        # Equal logits: exactly 0, with exactly zero gradients.
        value, ds, dt = _value_and_grads(JSD, beta=beta)(s, s, jnp.ones(SHAPE[0]))
        assert not np.any(np.asarray(value)) and not np.any(np.asarray(ds))
        assert not np.any(np.asarray(dt))
    # Non-negative (and at most log 2 at beta = 1/2), in float64 and float32, on
    # logits of scales from 0.01 to 30 (one program per dtype).
    rng = np.random.default_rng(0)
    scale = 10 ** rng.uniform(-2, 1.5, (256, 1))
    s = rng.normal(size=(256, 33)) * scale
    t = s + rng.normal(size=(256, 33)) * scale * rng.uniform(0, 1, (256, 1))

    @jax.jit
    def every_beta(s, t):
        return [JSD(s, t, beta=beta, temperature=0.5) for beta in BETAS]

    for dtype in ("float64", "float32"):
        values = every_beta(jnp.asarray(s, dtype), jnp.asarray(t, dtype))
        atol = tolerance(dtype)["atol"]  # the KL ends round to -2e-8 in float32
        for beta, v in zip(BETAS, values, strict=True):
            assert np.all(np.asarray(v) >= -atol), (beta, dtype)
        assert np.all(np.asarray(values[2]) <= math.log(2))


def test_invariant_to_shifting_either_input():
    s, t = _inputs(4)
    shift = jnp.asarray(np.random.default_rng(1).normal(size=(SHAPE[0], 1)) * 50)
    for beta in (0.0, 0.3, 1.0):
        run = _value_and_grads(JSD, beta=beta, temperature=2.5)
        w = jnp.ones(SHAPE[0])
        for a, b in zip(run(s, t, w), run(s + shift, t - shift, w), strict=True):
            assert_close(a, b, kind="grad", scale=10)


# -- TRL's and Liger's formulas in PyTorch ------------------------------------


def _trl_jsd(torch, student, teacher, beta, temperature):
    """``trl.trainer.gkd_trainer.GKDTrainer.generalized_jsd_loss`` (reduction
    ``"batchmean"`` for 2-D inputs: the sum over tokens and classes / N)."""
    f = torch.nn.functional
    s = f.log_softmax(student / temperature, dim=-1)
    t = f.log_softmax(teacher / temperature, dim=-1)
    if beta == 0:
        jsd = f.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = f.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        mixture = torch.logsumexp(
            torch.stack([s + torch.log(1 - b), t + torch.log(b)]), dim=0
        )
        kl_teacher = f.kl_div(mixture, t, reduction="none", log_target=True)
        kl_student = f.kl_div(mixture, s, reduction="none", log_target=True)
        jsd = b * kl_teacher + (1 - b) * kl_student
    return jsd.sum() / jsd.size(0)


def _liger_jsd(torch, student, teacher, beta, temperature):
    """Liger's torch reference of ``LigerJSD`` (its tests' ``JSD`` module, on
    log-probabilities: ``lerp(q, p, beta)`` as the mixture), per token."""
    f = torch.nn.functional
    log_q = f.log_softmax(student / temperature, dim=-1)
    log_p = f.log_softmax(teacher / temperature, dim=-1)
    kl = torch.nn.KLDivLoss(reduction="none", log_target=True)
    if beta == 0:
        return kl(log_q, log_p).sum(-1)
    if beta == 1:
        return kl(log_p, log_q).sum(-1)
    m = torch.lerp(torch.exp(log_q), torch.exp(log_p), beta)
    return beta * kl(torch.log(m), log_p).sum(-1) + (1 - beta) * kl(
        torch.log(m), log_q
    ).sum(-1)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9, 1.0])
def test_matches_trl_and_liger_in_torch(beta):
    torch = pytest.importorskip("torch")
    s, t = _inputs(6)
    temperature = 2.0
    mean = JSD(s, t, beta=beta, temperature=temperature, reduction="mean")
    d_mean = jax.grad(
        lambda s, t: JSD(s, t, beta=beta, temperature=temperature, reduction="mean"),
        (0, 1),
    )(s, t)
    ts, tt = (torch.tensor(np.asarray(a), requires_grad=True) for a in (s, t))
    trl = _trl_jsd(torch, ts, tt, beta, temperature)
    trl.backward()
    assert_close(mean, trl.item())
    assert_close(d_mean[0], ts.grad.numpy(), kind="grad")
    assert_close(d_mean[1], tt.grad.numpy(), kind="grad")

    ts, tt = (torch.tensor(np.asarray(a), requires_grad=True) for a in (s, t))
    liger = _liger_jsd(torch, ts, tt, beta, temperature)
    cot = np.random.default_rng(7).normal(size=liger.shape)
    (liger * torch.tensor(cot)).sum().backward()
    value, ds, dt = _value_and_grads(JSD, beta=beta, temperature=temperature)(
        s, t, jnp.asarray(cot)
    )
    assert_close(value, liger.detach().numpy())
    assert_close(ds, ts.grad.numpy(), kind="grad")
    assert_close(dt, tt.grad.numpy(), kind="grad")


# -- differentiation ---------------------------------------------------------


# Finite differences to second order through the rule, and against jax.grad of
# the reference, for beta 0, 0.3 and 1: tests/test_properties.py (the gradient
# check); forward mode of the reference: tests/test_registry.py.


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_second_order_through_the_rule_with_both_inputs_from_one(beta):
    """``f(a) = jsd(a, a[::-1])``: both arguments depend on ``a`` (rows 1 and 2
    are equal, so each meets its copy, where the log-ratios are exactly 0).
    Forward mode of the loss itself fails; forward-over-reverse HVPs and
    Hessians go through the rule's backward and equal the reference's."""
    a = np.array(logits(9, SHAPE))
    a[2] = a[1]
    v = logits(10, SHAPE)

    def f(fn):
        return lambda a: jnp.sum(fn(a, a[::-1], beta=beta, temperature=0.5) ** 2)

    custom, plain = f(JSD), f(reference.softmax_generalized_jsd)
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(custom, (a,), (v,))
    hvp, hvp_ref = (jax.jvp(jax.grad(fn), (a,), (v,))[1] for fn in (custom, plain))
    assert_close(hvp, hvp_ref, kind="grad", scale=10)
    if beta == 0.3:  # one program: a jitted Hessian compiles per option value

        @jax.jit
        def hessians(a):
            return jax.hessian(custom)(a), jax.hessian(plain)(a)

        assert_close(*hessians(a), kind="grad", scale=10)


# -- -inf, masks, reductions, dtypes ---------------------------------------------


def test_minus_inf_logits():
    inf = -jnp.inf
    s, t = (np.array(a) for a in _inputs(7))
    # Row 0: classes -inf in the student only (1), the teacher only (2), both (3).
    s[0, [1, 3]] = inf
    t[0, [2, 3]] = inf
    # Row 1: disjoint supports (the JSD at beta = 1/2 is log 2); row 2: one
    # class each; row 3: no admissible class at all.
    s[1, 3:], t[1, :3] = inf, inf
    s[2, 1:], t[2, :-1] = inf, inf
    s[3], t[3] = inf, inf
    w = jnp.asarray([1.0, -2.0, 0.5, 1.0])
    dropped = np.isinf(s) & np.isinf(t)
    for beta in (0.1, 0.5, 0.9):
        for fn in (JSD, reference.softmax_generalized_jsd):
            value, ds, dt = _value_and_grads(fn, beta=beta, temperature=2.5)(s, t, w)
            # One side -inf: finite (M > 0 wherever p or q is); a class -inf in
            # both is excluded and gets zero gradients; an empty row gives 0.
            assert_close(value, np_jsd(s, t, beta, 2.5))
            assert np.asarray(value)[3] == 0
            es, et = np_jsd_grads(s, t, beta, 2.5)
            assert_close(ds, es * np.asarray(w)[:, None], kind="grad")
            assert_close(dt, et * np.asarray(w)[:, None], kind="grad")
            assert np.all(np.asarray(ds)[dropped] == 0)
            assert np.all(np.asarray(dt)[dropped] == 0)
            # Excluding those classes with a mask instead gives the same.
            masked = fn(s, t, beta=beta, temperature=2.5, where=~dropped)
            assert_close(masked, value)
            if beta == 0.5:
                assert_close(value[1], math.log(2))
    # The ends: a -inf student logit under teacher mass is +inf at beta = 0 (row
    # 0 class 1, rows 1 and 2), a -inf teacher logit under student mass is +inf
    # at beta = 1; otherwise finite.
    for fn in (JSD, reference.softmax_generalized_jsd):
        forward = np.asarray(fn(s, t, beta=0.0))
        assert np.all(np.isinf(forward[:3])) and forward[3] == 0
        reverse = np.asarray(fn(s, t, beta=1.0))
        assert np.all(np.isinf(reverse[:3])) and reverse[3] == 0
        assert np.all(
            np.isfinite(np.asarray(fn(s, np.where(np.isinf(s), inf, t), beta=0.0)))
        )
        # NaN and +inf logits give NaN for their row.
        bad = np.array(_inputs(7)[0])
        bad[0, 2], bad[1, 5] = np.nan, np.inf
        out = np.asarray(fn(bad, _inputs(7)[1], beta=0.4))
        assert np.all(np.isnan(out[:2])) and np.all(np.isfinite(out[2:]))


def test_where_class_and_example_masks():
    s, t = _inputs(11)
    rng = np.random.default_rng(3)
    cmask = rng.random(SHAPE) < 0.6
    cmask[:, 0] = True
    keep = np.array([True, False, True, True])
    # Masked entries may hold anything (here NaN): they never reach the result.
    s_nan = jnp.where(cmask, s, jnp.nan)
    for beta in (0.0, 0.3, 1.0):
        for fn in (JSD, reference.softmax_generalized_jsd):
            kw = dict(beta=beta, temperature=2.5, where=cmask)
            value = fn(s_nan, t, **kw)
            ds, dt = jax.grad(
                lambda s, t, fn=fn, kw=kw: jnp.sum(fn(s, t, **kw)), (0, 1)
            )(s_nan, t)
            inf_s = jnp.where(cmask, s, -jnp.inf)
            inf_t = jnp.where(cmask, t, -jnp.inf)
            assert_close(value, np_jsd(inf_s, inf_t, beta, 2.5))
            es, et = np_jsd_grads(inf_s, inf_t, beta, 2.5)
            assert_close(ds, es, kind="grad")
            assert_close(dt, et, kind="grad")
            assert np.all(np.asarray(ds)[~cmask] == 0)
            assert np.all(np.asarray(dt)[~cmask] == 0)
            per_row = fn(s, t, beta=beta, where=keep)
            assert np.asarray(per_row)[1] == 0
            assert_close(per_row, np.where(keep, np_jsd(s, t, beta), 0))
            mean = fn(s, t, beta=beta, where=keep, reduction="mean")
            assert_close(mean, np_jsd(s, t, beta)[keep].mean())


def test_reductions():
    s, t = _inputs(12)
    per_row = JSD(s, t, beta=0.7)
    assert per_row.shape == (SHAPE[0],)
    assert_close(JSD(s, t, beta=0.7, reduction="sum"), jnp.sum(per_row))
    assert_close(JSD(s, t, beta=0.7, reduction="mean"), jnp.mean(per_row))
    # Another class axis.
    moved = JSD(s.T, t.T, beta=0.7, axis=0)
    assert_close(moved, per_row)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_half_precision_computed_in_float32(dtype):
    s, t = (a.astype(dtype) for a in _inputs(14, (6, 50)))
    s64, t64 = s.astype("float64"), t.astype("float64")  # the same rounded inputs

    @jax.jit
    def both(s, t):
        w = jnp.ones(6, s.dtype)
        return [
            _value_and_grads(JSD, beta=b, temperature=2.5)(s, t, w) for b in (0, 0.5)
        ]

    for beta, (value, ds, dt) in zip((0.0, 0.5), both(s, t), strict=True):
        assert value.dtype == ds.dtype == dt.dtype == jnp.dtype(dtype)
        assert_close(value, np_jsd(s64, t64, beta, 2.5), dtype=dtype)
        es, et = np_jsd_grads(s64, t64, beta, 2.5)
        assert_close(ds, es, dtype=dtype, kind="grad")
        assert_close(dt, et, dtype=dtype, kind="grad")


BAD = [
    ({"beta": 1.5}, ValueError, r"`beta` must be in \[0, 1\]; got 1.5"),
    ({"beta": -0.1}, ValueError, r"`beta`"),
    ({"temperature": 0.0}, ValueError, r"`temperature` must be finite and > 0"),
    ({"temperature": -1.0}, ValueError, r"`temperature`"),
    ({"temperature": float("inf")}, ValueError, r"`temperature`"),
    ({"reduction": "batchmean"}, ValueError, r"`reduction`.*'batchmean'"),
    ({"axis": 2}, ValueError, r"`axis`=2"),
    ({"where": np.ones(3, bool)}, ValueError, r"`where`"),
    ({"axis_name": "model", "axis": (0, 1)}, ValueError, r"`axis_name`"),
]


@pytest.mark.parametrize(("kw", "error", "match"), BAD)
def test_bad_input_same_error_from_both(kw, error, match):
    s, t = _inputs()
    messages = []
    for fn in (JSD, reference.softmax_generalized_jsd):
        with pytest.raises(error, match=match) as info:
            jax.jit(lambda s, t, fn=fn: fn(s, t, **kw)).trace(s, t)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    assert messages[0].startswith("softmax_generalized_jsd: ")


def test_bad_arrays_and_traced_options():
    s = jnp.zeros((2, 4))
    for fn in (JSD, reference.softmax_generalized_jsd):
        with pytest.raises(TypeError, match=r"`logits`.*int32"):
            fn(jnp.zeros((2, 4), jnp.int32), s)
        with pytest.raises(ValueError, match=r"`target_logits`.*\(2, 3\)"):
            fn(s, jnp.zeros((2, 3)))
        for option in ("beta", "temperature"):
            with pytest.raises(TypeError, match=f"`{option}` must be a static"):
                jax.jit(lambda s, v, fn=fn, o=option: fn(s, s, **{o: v}))(s, 0.5)


# -- the temperature option of the other softmax divergences ---------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_temperature_of_kl_entropy_and_cross_entropy_match_numpy(temperature):
    x, t = _inputs(15)
    y = jnp.asarray(np.exp(_log_softmax(np.asarray(t))))
    lq = _log_softmax(np.asarray(x) / temperature)
    lp = _log_softmax(np.asarray(t) / temperature)
    q, p = np.exp(lq), np.exp(lp)

    def kl(x, t):
        return jaxent.softmax_kl_divergence(x, t, temperature=temperature)

    assert_close(kl(x, t), scipy.special.rel_entr(p, q).sum(-1))
    gx, gt = jax.grad(lambda x, t: jnp.sum(kl(x, t)), (0, 1))(x, t)
    assert_close(gx, (q - p) / temperature, kind="grad")
    kl_rows = np.sum(p * (lp - lq), -1, keepdims=True)
    assert_close(gt, p * (lp - lq - kl_rows) / temperature, kind="grad")

    def entropy(x):
        return jaxent.softmax_entropy(x, temperature=temperature)

    h = -np.sum(q * lq, -1, keepdims=True)
    assert_close(entropy(x), h[:, 0])
    gh = jax.grad(lambda x: jnp.sum(entropy(x)))(x)
    assert_close(gh, -q * (lq + h) / temperature, kind="grad")

    # Smoothing and z-loss apply to the tempered logits x / T.
    eps, z = 0.1, 0.01
    ys = (1 - eps) * np.asarray(y) + eps / SHAPE[-1]
    lse = scipy.special.logsumexp(np.asarray(x) / temperature, -1, keepdims=True)

    def ce(x, y):
        return jaxent.softmax_cross_entropy(
            x, y, label_smoothing=eps, z_loss=z, temperature=temperature
        )

    assert_close(ce(x, y), -np.sum(ys * lq, -1) + z * lse[:, 0] ** 2)
    gx, gy = jax.grad(lambda x, y: jnp.sum(ce(x, y)), (0, 1))(x, y)
    expected_gx = q * (ys.sum(-1, keepdims=True) + 2 * z * lse) - ys
    assert_close(gx, expected_gx / temperature, kind="grad")
    assert_close(gy, -(1 - eps) * lq, kind="grad")


@pytest.mark.parametrize(
    ("name", "nargs"),
    [
        ("softmax_kl_divergence", 2),
        ("softmax_entropy", 1),
        ("softmax_cross_entropy", 2),
    ],
)
def test_temperature_one_is_todays_program(name, nargs):
    """``temperature=1.0`` traces to the very program of the default call, with no
    division by T; another temperature adds its divisions."""
    x, t = _inputs(16)
    args = (x, jax.nn.softmax(t) if name == "softmax_cross_entropy" else t)[:nargs]
    fn = getattr(jaxent, name)

    def program(**kw):
        def f(*a):
            return jax.value_and_grad(lambda *a: jnp.sum(fn(*a, **kw)), range(nargs))(
                *a
            )

        return str(jax.make_jaxpr(f)(*args))

    default = program()
    assert program(temperature=1.0) == default
    divisions = len(re.findall(r"\bdiv\b", default))
    assert len(re.findall(r"\bdiv\b", program(temperature=2.0))) > divisions
    for fn_ in (fn, getattr(reference, name)):
        np.testing.assert_array_equal(fn_(*args, temperature=1.0), fn_(*args))


def test_temperature_errors_from_every_tempered_loss():
    x = jnp.zeros((2, 3))
    calls = {
        "softmax_kl_divergence": (x, x),
        "softmax_entropy": (x,),
        "softmax_cross_entropy": (x, x),
        "softmax_generalized_jsd": (x, x),
    }
    for name, args in calls.items():
        for fn in (getattr(jaxent, name), getattr(reference, name)):
            with pytest.raises(ValueError, match=f"{name}: `temperature`"):
                fn(*args, temperature=0.0)

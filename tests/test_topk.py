"""Top-k teachers: ``softmax_topk_kl_divergence`` against a direct float64
NumPy computation of the bucket distributions, the plain-JAX reference, the
full KL divergence (k = V), and its edge cases (a tail of 1e-30, padding,
repeated and out-of-range ids, -inf logits, masks, half precision)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.test_util import check_grads

import jaxent
from jaxent import reference
from tests.helpers import assert_close

# Deep tests of one function; tests/test_registry.py covers it in the quick subset.
pytestmark = pytest.mark.slow

TOPK = jaxent.softmax_topk_kl_divergence
TAILS = ("bucket", "renormalize")
TEMPERATURES = (1.0, 0.5, 2.5)


def _teacher(seed, batch, v, k, mass=(0.3, 0.95)):
    """Distinct ids per row and log-probabilities holding ``mass`` of the row."""
    rng = np.random.default_rng(seed)
    ids = np.argsort(rng.random((*batch, v)), axis=-1)[..., :k].astype(np.int32)
    q = rng.uniform(0.1, 1.0, (*batch, k))
    q = q / q.sum(-1, keepdims=True) * rng.uniform(*mass, (*batch, 1))
    return jnp.asarray(ids), jnp.asarray(np.log(q))


def _problem(seed=0, batch=(4,), v=9, k=3, dtype="float64"):
    rng = np.random.default_rng(seed + 1)
    x = jnp.asarray(rng.normal(size=(*batch, v)) * 2, dtype)
    ids, lq = _teacher(seed, batch, v, k)
    return x, ids, lq.astype(dtype)


def np_topk_kl(x, ids, lq, temperature=1.0, tail="bucket"):
    """Per row, directly: the student's bucket probabilities ``[p_ids, p_rest]``
    and the teacher's ``[q, max(0, 1 - sum q)]`` (or ``q / sum q``), and
    ``sum rel_entr(teacher, student)`` over the buckets."""
    x = np.asarray(x, np.float64) / temperature
    ids, lq = np.asarray(ids), np.asarray(lq, np.float64)
    batch, v = x.shape[:-1], x.shape[-1]
    out = np.zeros(batch)
    for r in np.ndindex(batch):
        lp = scipy.special.log_softmax(x[r])
        q = np.exp(lq[r])
        p = np.exp(lp[ids[r]])
        if tail == "renormalize":
            out[r] = scipy.special.rel_entr(q / q.sum(), p).sum()
            continue
        rest = np.setdiff1d(np.arange(v), ids[r])
        p_rest = np.exp(scipy.special.logsumexp(x[r][rest]) - x[r].max())
        p_rest = p_rest / np.exp(scipy.special.logsumexp(x[r]) - x[r].max())
        q_rest = max(0.0, 1 - q.sum())
        out[r] = scipy.special.rel_entr(
            np.append(q, q_rest), np.append(p, p_rest)
        ).sum()
    return out


# -- values and gradients ------------------------------------------------------


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", TAILS)
def test_values_match_direct_numpy(tail, temperature):
    x, ids, lq = _problem(batch=(2, 3), v=11, k=4)
    expected = np_topk_kl(x, ids, lq, temperature, tail)
    for fn in (TOPK, reference.softmax_topk_kl_divergence):
        out = fn(x, ids, lq, temperature=temperature, tail=tail)
        assert out.shape == (2, 3)
        assert_close(out, expected)


@pytest.mark.parametrize(
    "opts",
    [
        {},
        {"temperature": 2.5, "reduction": "mean"},
        {"tail": "renormalize", "temperature": 0.5},
        {"tail": "renormalize", "reduction": "sum", "where": True},
        {"where": True, "reduction": "mean"},
    ],
)
def test_gradients_check_and_match_reference(opts):
    """``check_grads`` to second order, and the custom rule against
    ``jax.grad`` of the plain-JAX reference, w.r.t. the logits and the
    teacher's log-probabilities, in float64."""
    x, ids, lq = _problem(seed=3, batch=(5,), v=8, k=3)
    opts = dict(opts)
    if opts.pop("where", False):
        opts["where"] = jnp.array([True, False, True, True, False])
    u = jnp.asarray(np.random.default_rng(9).normal(size=(5,)))

    def scalar(module):
        def f(x, lq):
            out = module.softmax_topk_kl_divergence(x, ids, lq, **opts)
            return jnp.sum(out * u) if out.ndim else out

        return f

    check_grads(scalar(jaxent), (x, lq), order=2, modes=["rev"])
    grads = jax.grad(scalar(jaxent), (0, 1))(x, lq)
    grads_ref = jax.grad(scalar(reference), (0, 1))(x, lq)
    for g, g_ref in zip(grads, grads_ref, strict=True):
        assert_close(g, g_ref, kind="grad")


@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("tail", TAILS)
def test_teacher_of_every_class_gives_the_full_kl(tail, temperature):
    """k = V (ids in any order): both tails are the KL divergence of the
    teacher's softmax from the student's, values and logits' gradients."""
    rng = np.random.default_rng(4)
    v = 7
    x = jnp.asarray(rng.normal(size=(3, v)) * 2)
    t = jnp.asarray(rng.normal(size=(3, v)) * 2)
    ids = jnp.asarray(np.argsort(rng.random((3, v)), axis=-1).astype(np.int32))
    lq = jnp.take_along_axis(jax.nn.log_softmax(t / temperature), ids, axis=-1)

    def topk(x):
        return jnp.sum(TOPK(x, ids, lq, temperature=temperature, tail=tail))

    def full(x):
        return jnp.sum(jaxent.softmax_kl_divergence(x, t, temperature=temperature))

    assert_close(topk(x), full(x))
    assert_close(jax.grad(topk)(x), jax.grad(full)(x), kind="grad")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_tail_of_1e_30_is_exact(dtype):
    """The top k hold all but 1e-30 of the student's mass: ``log p_r`` comes
    from the rest's own log-sum-exp (``log(1 - sum p)`` would be ``log 0``),
    so the tail term ``q_r (log q_r - log p_r)`` and the rest's gradients are
    exact. Closed forms: ``k`` logits at 0 and ``V - k`` at ``r``."""
    v, k, q_r = 10, 3, 1e-3
    r = np.log(1e-30 / (v - k))  # p_r = 1e-30 / (1 + 1e-30 / k) ~ 1e-30
    x = np.full((1, v), r)
    x[0, [2, 5, 7]] = 0.0
    ids = jnp.array([[5, 2, 7]])
    q = np.array([0.5, 0.3, 0.2 - q_r])
    lq = jnp.asarray(np.log(q)[None], dtype)
    # log p_j = -log(k + 1e-30) and log p_r = log(1e-30) - log(k + 1e-30).
    lse = np.log(k) + np.log1p(1e-30 / k)
    log_p_r = np.log(1e-30) - lse
    expected = np.sum(q * (np.log(q) + lse)) + q_r * (np.log(q_r) - log_p_r)
    for fn in (TOPK, reference.softmax_topk_kl_divergence):
        out, g = jax.value_and_grad(lambda x, fn=fn: fn(x, ids, lq)[0])(
            jnp.asarray(x, dtype)
        )
        assert_close(out, expected)
        # Outside the ids: p_c (sum q + q_r) - q_r p_c / p_r = p_c - q_r / (V - k).
        p_c = 1e-30 / (v - k) / np.exp(lse)
        rest = np.setdiff1d(np.arange(v), [2, 5, 7])
        assert_close(g[0, rest], np.full(v - k, p_c - q_r / (v - k)), kind="grad")
        assert_close(g[0, [5, 2, 7]], 1 / np.exp(lse) - q, kind="grad")


def test_nonnegative_and_zero_exactly_where_the_buckets_agree():
    """Random rows: both tails >= 0. A student whose bucket probabilities are
    the teacher's (any split of the rest's mass) gives 0 and zero gradient;
    moving one logit makes it positive."""
    jitted = jax.jit(TOPK, static_argnames="tail")
    for seed in range(4):
        x, ids, lq = _problem(seed=seed, batch=(16,), v=12, k=5)
        for tail in TAILS:
            assert np.all(np.asarray(jitted(x, ids, lq, tail=tail)) >= -1e-15)
    rng = np.random.default_rng(5)
    v, k = 9, 4
    ids, lq = _teacher(6, (3,), v, k)
    q, q_r = np.exp(np.asarray(lq)), 1 - np.exp(np.asarray(lq)).sum(-1)
    # The rest's mass split at random among the other classes.
    split = rng.uniform(0.1, 1.0, (3, v))
    logp = np.zeros((3, v))
    for i in range(3):
        rest = np.setdiff1d(np.arange(v), np.asarray(ids[i]))
        logp[i, rest] = np.log(q_r[i] * split[i, rest] / split[i, rest].sum())
        logp[i, np.asarray(ids[i])] = np.log(q[i])
    x = jnp.asarray(logp + rng.normal(size=(3, 1)) * 5)  # any row offset
    value, grad = jax.vmap(jax.value_and_grad(lambda x, i, t: TOPK(x, i, t)))(
        x, ids, lq
    )
    assert_close(value, np.zeros(3))
    assert_close(grad, np.zeros((3, v)), kind="grad")
    moved = x.at[:, int(ids[0, 0])].add(0.1)
    assert np.asarray(TOPK(moved, ids, lq))[0] > 1e-6
    # Within the rest only its total matters: its logits reversed, still 0.
    rest = np.setdiff1d(np.arange(v), np.asarray(ids[0]))
    reversed_rest = x.at[0, rest].set(x[0, rest[::-1]])
    assert_close(TOPK(reversed_rest, ids, lq), np.zeros(3))


# -- options ------------------------------------------------------------------


@pytest.mark.parametrize("tail", TAILS)
def test_where_and_reductions(tail):
    """An excluded example gives 0 and zero gradients whatever its inputs hold
    (NaN, ids out of range); ``"sum"`` and ``"mean"`` (over counted examples)
    agree with the per-example values; a mean over nothing is 0."""
    x, ids, lq = _problem(seed=7, batch=(2, 3), v=8, k=3)
    keep = jnp.array([[True, False, True], [False, True, True]])
    dirty_x = jnp.where(keep[..., None], x, jnp.nan)
    dirty_ids = jnp.where(keep[..., None], ids, 99)
    dirty_lq = jnp.where(keep[..., None], lq, jnp.nan)
    per = TOPK(x, ids, lq, tail=tail)
    for fn in (TOPK, reference.softmax_topk_kl_divergence):
        out = fn(dirty_x, dirty_ids, dirty_lq, tail=tail, where=keep)
        assert_close(out, jnp.where(keep, per, 0.0))
        total = fn(dirty_x, dirty_ids, dirty_lq, tail=tail, where=keep, reduction="sum")
        assert_close(total, jnp.sum(jnp.where(keep, per, 0.0)))

        def mean(x, lq, fn=fn, where=keep):
            return fn(x, dirty_ids, lq, tail=tail, where=where, reduction="mean")

        value, (gx, glq) = jax.value_and_grad(mean, (0, 1))(dirty_x, dirty_lq)
        assert_close(value, jnp.sum(jnp.where(keep, per, 0.0)) / 4)
        assert np.all(np.asarray(gx)[~np.asarray(keep)] == 0)
        assert np.all(np.asarray(glq)[~np.asarray(keep)] == 0)
        assert np.all(np.isfinite(np.asarray(gx))) and np.all(np.isfinite(glq))
        value, (gx, glq) = jax.value_and_grad(
            lambda x, lq, fn=fn: mean(x, lq, fn, jnp.zeros_like(keep)), (0, 1)
        )(x, lq)
        assert value == 0 and np.all(np.asarray(gx) == 0) and np.all(glq == 0)


def test_jit_and_vmap_match_the_batched_call():
    x, ids, lq = _problem(seed=8, batch=(3, 4), v=10, k=3)
    batched = TOPK(x, ids, lq, temperature=2.0)
    mapped = jax.jit(jax.vmap(lambda *a: TOPK(*a, temperature=2.0)))(x, ids, lq)
    assert_close(mapped, batched)
    g = jax.grad(lambda x: jnp.sum(TOPK(x, ids, lq)))(x)
    gv = jax.vmap(jax.grad(lambda x, i, t: jnp.sum(TOPK(x, i, t))))(x, ids, lq)
    assert_close(gv, g, kind="grad")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("tail", TAILS)
def test_half_precision_is_computed_in_float32(tail, dtype):
    """Half-precision inputs give the float32 computation on the same values
    (rounded once to the dtype at the end), gradients in the inputs' dtypes."""
    x, ids, lq = _problem(seed=10, batch=(6,), v=300, k=8, dtype="float32")
    x, lq = x.astype(dtype), lq.astype(dtype)

    def f(x, lq):
        return jnp.sum(TOPK(x, ids, lq, tail=tail, temperature=2.0))

    out = TOPK(x, ids, lq, tail=tail, temperature=2.0)
    assert out.dtype == dtype
    want = TOPK(
        x.astype("float32"), ids, lq.astype("float32"), tail=tail, temperature=2.0
    )
    assert_close(out, want.astype(dtype).astype("float32"), dtype=dtype)
    gx, glq = jax.grad(f, (0, 1))(x, lq)
    assert gx.dtype == dtype and glq.dtype == dtype
    wx, wlq = jax.grad(f, (0, 1))(x.astype("float32"), lq.astype("float32"))
    assert_close(gx, wx, dtype=dtype, kind="grad")
    assert_close(glq, wlq, dtype=dtype, kind="grad")


def test_shifting_a_row_changes_nothing():
    """Everything is computed from max-shifted logits: ``x + 1e30`` in
    float32 (a row shift) gives the same value, with no overflow."""
    x, ids, lq = _problem(seed=11, batch=(4,), v=16, k=4, dtype="float32")
    x = jnp.round(x * 4) / 4  # exact after the shift below
    shifted = x + jnp.array([[0.0], [1e4], [-1e4], [1e6]], "float32")
    assert_close(TOPK(shifted, ids, lq), TOPK(x, ids, lq))
    # 1e30 at the teacher's first class: every other log p is -1e30, so the
    # value is 1e30 (1 - q_first) up to O(1), finite in float32.
    huge = jnp.zeros((1, 16), "float32").at[0, int(ids[0, 0])].set(1e30)
    out = TOPK(huge, ids[:1], lq[:1])
    assert_close(out, [1e30 * (1 - np.exp(float(lq[0, 0])))])


# -- documented edge cases ------------------------------------------------------


def test_out_of_range_ids_give_nan_for_their_example():
    """An id < 0 or >= V makes its example NaN, value and gradient rows (logits
    and teacher); the others are exact; a mean is NaN."""
    x, ids, lq = _problem(seed=12, batch=(4,), v=6, k=2)
    bad = ids.at[0, 1].set(-1).at[1, 0].set(6)
    for fn in (TOPK, reference.softmax_topk_kl_divergence):
        value = jax.jit(fn)(x, bad, lq)
        total = jax.jit(jax.grad(lambda x, lq, fn=fn: jnp.sum(fn(x, bad, lq)), (0, 1)))
        gx, glq = total(x, lq)
        assert np.all(np.isnan(np.asarray(value[:2])))
        assert_close(value[2:], TOPK(x[2:], ids[2:], lq[2:]))
        assert np.all(np.isnan(np.asarray(gx[:2]))) and np.all(np.isnan(glq[:2]))
        assert np.all(np.isfinite(np.asarray(gx[2:])))
        assert np.isnan(fn(x, bad, lq, reduction="mean"))


@pytest.mark.parametrize("tail", TAILS)
def test_padding_with_a_repeated_id_and_minus_inf_changes_nothing(tail):
    """Rows with fewer than k teacher classes, padded by repeating one of their
    ids with log-probability -inf: the value and gradients of the unpadded
    rows."""
    x, ids, lq = _problem(seed=13, batch=(3,), v=8, k=3)
    padded_ids = jnp.concatenate([ids, ids[:, :1], ids[:, :1]], axis=-1)
    padded_lq = jnp.concatenate([lq, jnp.full((3, 2), -jnp.inf)], axis=-1)
    for fn in (TOPK, reference.softmax_topk_kl_divergence):

        def f(x, lq, ids, fn=fn):
            return jnp.sum(fn(x, ids, lq, tail=tail) * jnp.arange(1.0, 4.0))

        both = jax.jit(jax.value_and_grad(f, (0, 1)))
        value, (gx, glq) = both(x, padded_lq, padded_ids)
        want, (wx, wlq) = both(x, lq, ids)
        assert_close(value, want)
        assert_close(gx, wx, kind="grad")
        assert_close(glq[:, :3], wlq, kind="grad")
        assert np.all(np.asarray(glq[:, 3:]) == 0)


def test_repeated_ids_with_mass_count_their_class_twice():
    """A repeated id with positive mass adds its own term ``q (log q - log
    p_c)`` again while its class leaves the rest once: the formula, which is
    then no divergence (here negative)."""
    x = jnp.zeros((1, 4))  # p = 1/4 each
    ids = jnp.array([[0, 0]])
    lq = jnp.log(jnp.array([[0.25, 0.25]]))
    # 2 * 0.25 log(0.25 / 0.25) + 0.5 log(0.5 / 0.75)
    expected = 0.5 * np.log(0.5 / 0.75)
    for fn in (TOPK, reference.softmax_topk_kl_divergence):
        assert_close(fn(x, ids, lq), [expected])
    g = jax.grad(lambda x: TOPK(x, ids, lq)[0])(x)
    g_ref = jax.grad(lambda x: reference.softmax_topk_kl_divergence(x, ids, lq)[0])(x)
    assert_close(g, g_ref, kind="grad")


def test_minus_inf_logits():
    """A teacher class at a -inf student logit: +inf under positive teacher
    mass, and nothing under -inf log-probability; a teacher tail over a rest
    of -inf logits is +inf, no tail there is finite; gradients w.r.t. the
    logits stay finite."""
    x = jnp.array(
        [
            [-jnp.inf, 0.0, 1.0, 0.5],  # id 0 has mass
            [-jnp.inf, 0.0, 1.0, 0.5],  # id 0 has no mass
            [0.0, 1.0, -jnp.inf, -jnp.inf],  # empty rest, teacher tail 0.2
            [0.0, 1.0, -jnp.inf, -jnp.inf],  # empty rest, no teacher tail
        ]
    )
    ids = jnp.array([[0, 1], [0, 1], [0, 1], [0, 1]])
    lq = jnp.log(jnp.array([[0.3, 0.3], [0.0, 0.6], [0.5, 0.3], [0.4, 0.6]]))
    for fn in (TOPK, reference.softmax_topk_kl_divergence):
        value = np.asarray(fn(x, ids, lq))
        assert value[0] == np.inf and value[2] == np.inf
        want = np_topk_kl(x[1::2], ids[1::2], lq[1::2])
        assert_close(value[1::2], want)
    g = jax.grad(lambda x: jnp.sum(TOPK(x, ids, lq)[1::2]))(x)
    g_ref = jax.grad(
        lambda x: jnp.sum(reference.softmax_topk_kl_divergence(x, ids, lq)[1::2])
    )(x)
    assert np.all(np.isfinite(np.asarray(g)))
    assert_close(g, g_ref, kind="grad")


def test_bad_arguments_name_themselves():
    x, ids, lq = _problem()
    with pytest.raises(ValueError, match="`teacher_ids` must have shape"):
        TOPK(x, ids[:2], lq)
    with pytest.raises(ValueError, match="`teacher_log_probs` must have the shape"):
        TOPK(x, ids, lq[:, :2])
    with pytest.raises(ValueError, match="`tail` must be one of"):
        TOPK(x, ids, lq, tail="drop")
    with pytest.raises(ValueError, match="`where` must be an example mask"):
        TOPK(x, ids, lq, where=jnp.ones(x.shape, bool))
    with pytest.raises(TypeError, match="`teacher_ids` must be an integer"):
        TOPK(x, lq, lq)

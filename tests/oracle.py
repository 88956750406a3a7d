"""Float64 NumPy oracles of every jaxent loss, written here from the formulas
and sharing no code with the package: the independent reference for values and
closed-form gradients (``tests/test_properties.py``, ``tests/test_registry.py``).

Adding a loss adds one ``ref_<name>`` function here; ``ORACLES`` collects them
and ``tests/test_registry.py`` fails for a registered loss without one.
"""

from __future__ import annotations

import math

# Inputs are in the rows layout [K, R, C] (masks: bool [K, R, C]); cotangents and
# outputs are [K, R] ("none"), [K] ("sum"/"mean") or [K, R, C] (elementwise). Each
# returns (value, {argument: gradient}) with the closed-form gradient (a VJP).


def _mul0(xp, w, v):
    """``w * v`` with ``0 * inf = 0`` (0 log 0 = 0)."""
    return xp.where((w == 0) & xp.isinf(v), 0, w * v)


def _dweight(xp, w, v):
    """Partial ``v`` of ``w * v``, 0 where ``w == 0`` and ``v`` is infinite."""
    return xp.where((w == 0) & xp.isinf(v), 0, v)


def _normalize(xp, x, adm):
    """Max-shifted logits (-inf at excluded classes), the log of the shifted sum
    and the max; a row with no admissible class has normalizer 0."""
    if adm is not None:
        x = xp.where(adm, x, -xp.inf)
    m = xp.max(x, axis=-1, keepdims=True)
    m = xp.where(m == -xp.inf, 0, m)
    xs = x - m
    s = xp.sum(xp.exp(xs), axis=-1, keepdims=True)
    return xs, xp.where(s == 0, 0, xp.log(xp.where(s == 0, 1, s))), m


def _reduce(xp, loss, reduction, count=None):
    """``loss`` [K, R] reduced per case; a mean over nothing is 0."""
    if reduction == "none":
        return loss
    total = xp.sum(loss, axis=1)
    if reduction == "sum":
        return total
    if count is None:
        count = loss.shape[1]
    return xp.where(count != 0, total / xp.where(count != 0, count, 1), 0)


def _coef(xp, g, reduction, shape, count=None):
    """The cotangent of each row's loss, ``[K, R, 1]``."""
    if reduction == "none":
        return g[..., None]
    if reduction == "mean":
        if count is None:
            count = shape[1]
        g = xp.where(count != 0, g / xp.where(count != 0, count, 1), 0)
    return xp.broadcast_to(g[:, None, None], (*shape[:2], 1))


def _ones(xp, x, adm):
    return xp.ones_like(x) if adm is None else adm.astype(x.dtype)


def ref_log_softmax(xp, a, o, g):
    x, adm = a["logits"], a.get("where")
    xs, ls, _ = _normalize(xp, x, adm)
    out = xs - ls
    gm = g if adm is None else xp.where(adm, g, 0)
    dx = gm - xp.exp(out) * xp.sum(gm, axis=-1, keepdims=True)
    return out, {"logits": dx}


def ref_softmax(xp, a, o, g):
    xs, ls, _ = _normalize(xp, a["logits"], a.get("where"))
    p = xp.exp(xs - ls)
    return p, {"logits": p * (g - xp.sum(g * p, axis=-1, keepdims=True))}


def ref_softmax_cross_entropy(xp, a, o, g):
    y, adm = a["labels"], a.get("where")
    eps, z = o.get("label_smoothing", 0.0), o.get("z_loss", 0.0)
    temp = o.get("temperature", 1.0)
    x = a["logits"] / temp  # smoothing and z-loss apply to the tempered logits
    xs, ls, m = _normalize(xp, x, adm)
    ones = _ones(xp, x, adm)
    y = xp.where(ones > 0, y, 0)
    cnt = xp.sum(ones, axis=-1, keepdims=True)
    big_y = (1 - eps) * y + eps * ones / xp.maximum(cnt, 1)
    s = xp.sum(big_y, axis=-1, keepdims=True)
    lse = m + ls
    loss = s * ls - xp.sum(_mul0(xp, big_y, xs), axis=-1, keepdims=True)
    loss = loss + z * lse**2
    kept = cnt > 0
    count = xp.sum(kept[..., 0], axis=1).astype(x.dtype)
    value = _reduce(xp, xp.where(kept, loss, 0)[..., 0], o["reduction"], count)
    coef = xp.where(kept, _coef(xp, g, o["reduction"], x.shape, count), 0)
    dx = coef * (xp.exp(xs - ls) * (s + 2 * z * lse) - big_y) / temp
    dy = coef * (1 - eps) * xp.where(ones > 0, _dweight(xp, y, ls - xs), 0)
    return value, {"logits": dx, "labels": dy}


def ref_softmax_cross_entropy_with_integer_labels(xp, a, o, g):
    x, labels, adm = a["logits"], a["labels"], a.get("where")
    eps, z = o.get("label_smoothing", 0.0), o.get("z_loss", 0.0)
    c = x.shape[-1]
    xs, ls, m = _normalize(xp, x, adm)
    ones = _ones(xp, x, adm)
    onehot = labels[..., None] == xp.arange(c, dtype=labels.dtype)
    w = a["weights"][:, None, :] if "weights" in a else xp.ones_like(x[:, :1])
    w_y = xp.sum(xp.where(onehot, w, 0), axis=-1, keepdims=True)
    x_y = xp.sum(xp.where(onehot, xs, 0), axis=-1, keepdims=True)
    cnt = xp.sum(ones, axis=-1, keepdims=True)
    b = eps / xp.maximum(cnt, 1)
    u = w * ones
    s = (1 - eps) * w_y + b * xp.sum(u, axis=-1, keepdims=True)
    lin = _mul0(xp, (1 - eps) * w_y, x_y)
    lin = lin + xp.sum(_mul0(xp, b * u, xs), axis=-1, keepdims=True)
    lse = m + ls
    loss = s * ls - lin + z * lse**2
    valid = ((labels >= 0) & (labels < c))[..., None]
    counted = cnt > 0
    if o.get("ignore_index") is not None:
        counted = counted & (labels != o["ignore_index"])[..., None]
    loss = xp.where(counted, xp.where(valid, loss, xp.nan), 0)[..., 0]
    count = xp.sum(xp.where(counted, w_y, 0)[..., 0], axis=1)
    value = _reduce(xp, loss, o["reduction"], count)
    coef = _coef(xp, g, o["reduction"], x.shape, count)
    coef = xp.where(counted, xp.where(valid, coef, xp.nan), 0)
    big_y = xp.where(onehot, (1 - eps) * w_y, 0) + b * u
    grads = {"logits": coef * (xp.exp(xs - ls) * (s + 2 * z * lse) - big_y)}
    if "weights" in a:
        dw = (1 - eps) * xp.where(onehot, _dweight(xp, w_y, ls - x_y), 0)
        smooth = _mul0(xp, b * ones, _dweight(xp, w, ls - xs))
        dw = dw + xp.where(ones > 0, smooth, 0)
        grads["weights"] = xp.sum(xp.where(counted, coef * dw, 0), axis=1)
        if o["reduction"] == "mean":
            # The weights are also in the mean's denominator.
            nz = count != 0
            scale = xp.where(
                nz, g * xp.sum(loss, axis=1) / xp.where(nz, count, 1) ** 2, 0
            )
            hits = xp.sum((counted & onehot).astype(x.dtype), axis=1)
            grads["weights"] = grads["weights"] - scale[:, None] * hits
    return value, grads


def ref_linear_softmax_cross_entropy(xp, a, o, g):
    """Materialized logits ``h W + b`` through the integer-label reference."""
    h, w = a["hidden"], a["weight"]
    x = xp.matmul(h, w)
    if "bias" in a:
        x = x + a["bias"][:, None, :]
    cap = o.get("softcap")
    if cap is not None:
        capped = xp.tanh(x / cap)
        x = cap * capped
    inner = {"logits": x, "labels": a["labels"]}
    if "where" in a:
        inner["where"] = a["where"]
    value, grads = ref_softmax_cross_entropy_with_integer_labels(xp, inner, o, g)
    dx = grads["logits"]
    if cap is not None:
        dx = dx * (1 - capped**2)
    out = {
        "hidden": xp.matmul(dx, xp.swapaxes(w, 1, 2)),
        "weight": xp.matmul(xp.swapaxes(h, 1, 2), dx),
    }
    if "bias" in a:
        out["bias"] = xp.sum(dx, axis=1)
    return value, out


def _linear_head(xp, a, o, g, soft_term, frozen):
    """A fused distillation head on materialized student logits ``x = h W + b``
    (capped): ``soft_weight`` times ``soft_term(x, unit) -> (loss, d loss /
    dx)`` plus ``hard_weight`` times the integer-label cross-entropy of ``x``
    (at T = 1), per token; a token mask (``where``, ``ignore_index``) excludes
    tokens. The teacher's arrays named in ``frozen`` get zero gradients."""
    hard, soft = o.get("hard_weight", 0.0), o.get("soft_weight", 1.0)
    h, w = a["hidden"], a["weight"]
    x = xp.matmul(h, w)
    if "bias" in a:
        x = x + a["bias"][:, None, :]
    cap = o.get("softcap")
    if cap is not None:
        # A -inf logit (a masked class) stays -inf.
        capped = xp.tanh(x / cap)
        x = xp.where(x == -xp.inf, -xp.inf, cap * capped)
    labels = a["labels"]
    kept = xp.ones(labels.shape, dtype=bool)
    if "where" in a:
        kept = kept & a["where"][..., 0]
    if o.get("ignore_index") is not None:
        kept = kept & (labels != o["ignore_index"])
    unit = xp.ones(labels.shape, dtype=x.dtype)
    loss, dx = xp.zeros_like(unit), xp.zeros_like(x)
    if soft:
        term, dterm = soft_term(x, unit)
        loss, dx = loss + soft * term, dx + soft * dterm
    if hard:
        inner = {"logits": x, "labels": xp.where(kept, labels, 0)}
        ce, grads = ref_softmax_cross_entropy_with_integer_labels(
            xp, inner, {"reduction": "none"}, unit
        )
        loss, dx = loss + hard * ce, dx + hard * grads["logits"]
    count = xp.sum(kept, axis=1).astype(x.dtype)
    value = _reduce(xp, xp.where(kept, loss, 0), o["reduction"], count)
    coef = xp.where(kept[..., None], _coef(xp, g, o["reduction"], x.shape, count), 0)
    dx = coef * dx
    if cap is not None:
        dx = dx * (1 - capped**2)
    out = {
        "hidden": xp.matmul(dx, xp.swapaxes(w, 1, 2)),
        "weight": xp.matmul(xp.swapaxes(h, 1, 2), dx),
    }
    if "bias" in a:
        out["bias"] = xp.sum(dx, axis=1)
    out.update({k: xp.zeros_like(a[k]) for k in frozen if k in a})
    return value, out


def ref_linear_softmax_distillation(xp, a, o, g):
    """The student ``x = h W + b`` against the teacher's materialized logits
    ``t = h' W' + b'`` (capped alike): the generalized JSD of
    ``ref_softmax_generalized_jsd``, with the hard term of ``_linear_head``."""
    t = xp.matmul(a["teacher_hidden"], a["teacher_weight"])
    if "teacher_bias" in a:
        t = t + a["teacher_bias"][:, None, :]
    cap = o.get("softcap")
    if cap is not None:
        t = xp.where(t == -xp.inf, -xp.inf, cap * xp.tanh(t / cap))

    def jsd(x, unit):
        jsd_opts = {
            "beta": o.get("beta", 0.5),
            "temperature": o.get("temperature", 1.0),
            "reduction": "none",
        }
        inner = {"logits": x, "target_logits": t}
        value, grads = ref_softmax_generalized_jsd(xp, inner, jsd_opts, unit)
        return value, grads["logits"]

    frozen = ("teacher_hidden", "teacher_weight", "teacher_bias")
    return _linear_head(xp, a, o, g, jsd, frozen)


def ref_linear_log_probs(xp, a, o, g):
    """Materialized logits ``h W + b`` (capped), ``log softmax(x / T)`` at each
    token and, with ``return_entropy``, the entropy: then the value and the
    cotangent are the pair stacked on a last axis of 2. Tokens excluded by
    ``where`` give 0; an out-of-range token a NaN log-probability and NaN
    gradients through it."""
    h, w, tokens = a["hidden"], a["weight"], a["tokens"]
    temp = o.get("temperature", 1.0)
    x = xp.matmul(h, w)
    if "bias" in a:
        x = x + a["bias"][:, None, :]
    cap = o.get("softcap")
    if cap is not None:
        capped = xp.tanh(x / cap)
        x = xp.where(x == -xp.inf, -xp.inf, cap * capped)
    xs, ls, _ = _normalize(xp, x / temp, None)
    logp = xs - ls
    p = xp.exp(logp)
    c = x.shape[-1]
    onehot = tokens[..., None] == xp.arange(c, dtype=tokens.dtype)
    valid = (tokens >= 0) & (tokens < c)
    kept = a["where"][..., 0] if "where" in a else xp.ones(tokens.shape, dtype=bool)
    lp = xp.sum(xp.where(onehot, logp, 0), axis=-1)
    lp = xp.where(kept, xp.where(valid, lp, xp.nan), 0)
    ent = -xp.sum(_mul0(xp, p, logp), axis=-1)
    entropy = o.get("return_entropy", False)
    g_lp, g_ent = (g[..., 0], g[..., 1]) if entropy else (g, xp.zeros_like(g))
    g_lp = xp.where(kept, xp.where(valid, g_lp, xp.nan), 0)[..., None]
    g_ent = xp.where(kept, g_ent, 0)[..., None]
    # d log p_y / dz = onehot - p;  d H / dz = -p (log p + H).
    dx = g_lp * (onehot - p) - g_ent * _mul0(xp, p, logp + ent[..., None])
    dx = dx / temp
    if cap is not None:
        dx = dx * (1 - capped**2)
    value = xp.stack([lp, xp.where(kept, ent, 0)], axis=-1) if entropy else lp
    out = {
        "hidden": xp.matmul(dx, xp.swapaxes(w, 1, 2)),
        "weight": xp.matmul(xp.swapaxes(h, 1, 2), dx),
    }
    if "bias" in a:
        out["bias"] = xp.sum(dx, axis=1)
    return value, out


def _softplus(xp, v):
    return xp.logaddexp(xp.zeros_like(v), v)


def ref_sigmoid_binary_cross_entropy(xp, a, o, g):
    x, y = a["logits"], a["labels"]
    pw = a.get("pos_weight")
    sp_neg, sp_pos = _softplus(xp, -x), _softplus(xp, x)
    pos = y if pw is None else pw * y
    loss = (_mul0(xp, pos, sp_neg) + _mul0(xp, 1 - y, sp_pos))[..., 0]
    value = _reduce(xp, loss, o["reduction"])
    coef = _coef(xp, g[..., 0] if g.ndim == 3 else g, o["reduction"], x.shape)
    sig_pos, sig_neg = xp.exp(-sp_neg), xp.exp(-sp_pos)
    d_pos = _dweight(xp, pos, sp_neg)
    grads = {
        "logits": coef * ((1 - y) * sig_pos - pos * sig_neg),
        "labels": coef
        * (
            (d_pos if pw is None else _mul0(xp, pw, d_pos))
            - _dweight(xp, 1 - y, sp_pos)
        ),
    }
    if pw is not None:
        grads["pos_weight"] = coef * _dweight(xp, pw, _mul0(xp, y, sp_neg))
    return (value[..., None] if o["reduction"] == "none" else value), grads


def _base(o):
    return 1.0 if o.get("base") is None else math.log(o["base"])


def ref_entropy(xp, a, o, g):
    p = a["probs"]
    h = -xp.sum(_mul0(xp, p, xp.log(p)), axis=-1) / _base(o)
    dp = -g[..., None] * xp.where(p == 0, 0, xp.log(p) + 1) / _base(o)
    return h, {"probs": dp}


def ref_cross_entropy(xp, a, o, g):
    p, q = a["p"], a["q"]
    h = -xp.sum(_mul0(xp, p, xp.log(q)), axis=-1) / _base(o)
    gb = g[..., None] / _base(o)
    dp = -gb * _dweight(xp, p, xp.log(q))
    dq = -gb * xp.where(p == 0, 0, p / xp.where(p == 0, 1, q))
    return h, {"p": dp, "q": dq}


def ref_kl_divergence(xp, a, o, g):
    lp, t, adm = a["log_predictions"], a["targets"], a.get("where")
    terms = _mul0(xp, t, xp.log(t)) - _mul0(xp, t, lp)
    keep = xp.ones_like(t, dtype=bool) if adm is None else adm
    kl = xp.sum(xp.where(keep, terms, 0), axis=-1)
    dt = xp.where(t == 0, 0, xp.log(t) + 1) - _dweight(xp, t, lp)
    return kl, {
        "log_predictions": xp.where(keep, -g[..., None] * t, 0),
        "targets": xp.where(keep, g[..., None] * dt, 0),
    }


def ref_kl_divergence_with_log_targets(xp, a, o, g):
    lp, lt, adm = a["log_predictions"], a["log_targets"], a.get("where")
    t = xp.exp(lt)
    terms = _mul0(xp, t, lt) - _mul0(xp, t, lp)
    keep = xp.ones_like(t, dtype=bool) if adm is None else adm
    kl = xp.sum(xp.where(keep, terms, 0), axis=-1)
    dlt = _mul0(xp, t, lt + 1) - _mul0(xp, t, lp)
    return kl, {
        "log_predictions": xp.where(keep, -g[..., None] * t, 0),
        "log_targets": xp.where(keep, g[..., None] * dlt, 0),
    }


def ref_softmax_entropy(xp, a, o, g):
    temp = o.get("temperature", 1.0)
    xs, ls, _ = _normalize(xp, a["logits"] / temp, a.get("where"))
    logp = xs - ls
    p = xp.exp(logp)
    h = -xp.sum(_mul0(xp, p, logp), axis=-1, keepdims=True)
    dx = -g[..., None] * _mul0(xp, p, logp + h) / (_base(o) * temp)
    return h[..., 0] / _base(o), {"logits": dx}


def ref_softmax_kl_divergence(xp, a, o, g):
    temp = o.get("temperature", 1.0)
    x, t, adm = a["logits"] / temp, a["target_logits"] / temp, a.get("where")
    xs, lsx, _ = _normalize(xp, x, adm)
    ts, lst, _ = _normalize(xp, t, adm)
    logp, logq = xs - lsx, ts - lst
    q = xp.exp(logq)
    terms = _mul0(xp, q, logq) - _mul0(xp, q, logp)
    kl = xp.sum(terms, axis=-1, keepdims=True)
    kept = xp.sum(_ones(xp, x, adm), axis=-1, keepdims=True) > 0
    count = xp.sum(kept[..., 0], axis=1).astype(x.dtype)
    value = _reduce(xp, xp.where(kept, kl, 0)[..., 0], o["reduction"], count)
    coef = xp.where(kept, _coef(xp, g, o["reduction"], x.shape, count), 0) / temp
    mass = xp.sum(q, axis=-1, keepdims=True)
    return value, {
        "logits": coef * (xp.exp(logp) * mass - q),
        "target_logits": coef * (terms - q * kl),
    }


def ref_softmax_generalized_jsd(xp, a, o, g):
    """Student ``q = softmax(logits / T)``, teacher ``p = softmax(target_logits /
    T)``, ``M = beta p + (1 - beta) q``: ``beta KL(p || M) + (1 - beta) KL(q ||
    M)``, and ``KL(p || q)`` at ``beta = 0``, ``KL(q || p)`` at ``beta = 1``."""
    beta, temp = o.get("beta", 0.5), o.get("temperature", 1.0)
    adm = a.get("where")
    xs, lsx, _ = _normalize(xp, a["logits"] / temp, adm)
    ts, lst, _ = _normalize(xp, a["target_logits"] / temp, adm)
    lq, lp = xs - lsx, ts - lst
    q, p = xp.exp(lq), xp.exp(lp)
    if beta in (0.0, 1.0):
        # KL(f || h): f the teacher at beta = 0, the student at beta = 1.
        lf, lh = (lp, lq) if beta == 0 else (lq, lp)
        f, h = xp.exp(lf), xp.exp(lh)
        terms = _mul0(xp, f, lf) - _mul0(xp, f, lh)
        jsd = xp.sum(terms, axis=-1, keepdims=True)
        d_h = h * xp.sum(f, axis=-1, keepdims=True) - f  # the predicted side
        d_f = terms - f * jsd
        ds, dt = (d_h, d_f) if beta == 0 else (d_f, d_h)
    else:
        lm = xp.logaddexp(math.log(beta) + lp, math.log1p(-beta) + lq)
        lm = xp.where((p == 0) & (q == 0), 0, lm)  # no -inf - -inf below
        # Log-ratios where the probability is positive (M > 0 there).
        rq = xp.where(q == 0, 0, lq - lm)
        rp = xp.where(p == 0, 0, lp - lm)
        klq = xp.sum(q * rq, axis=-1, keepdims=True)
        klp = xp.sum(p * rp, axis=-1, keepdims=True)
        jsd = beta * klp + (1 - beta) * klq
        ds = (1 - beta) * q * (rq - klq)
        dt = beta * p * (rp - klp)
    x = a["logits"]
    kept = xp.sum(_ones(xp, x, adm), axis=-1, keepdims=True) > 0
    count = xp.sum(kept[..., 0], axis=1).astype(x.dtype)
    value = _reduce(xp, xp.where(kept, jsd, 0)[..., 0], o["reduction"], count)
    coef = xp.where(kept, _coef(xp, g, o["reduction"], x.shape, count), 0) / temp
    return value, {"logits": coef * ds, "target_logits": coef * dt}


def ref_safe_softmax_cross_entropy(xp, a, o, g):
    """Soft-label cross-entropy over the last axis (its rows layout's)."""
    return ref_softmax_cross_entropy(xp, a, o, g)


def ref_poly_loss_cross_entropy(xp, a, o, g):
    x, y, adm = a["logits"], a["labels"], a.get("where")
    eps = o.get("epsilon", 2.0)
    xs, ls, _ = _normalize(xp, x, adm)
    ones = _ones(xp, x, adm)
    y = xp.where(ones > 0, y, 0)
    logp = xs - ls
    p = xp.exp(logp)
    sy = xp.sum(y, axis=-1, keepdims=True)
    syp = xp.sum(y * p, axis=-1, keepdims=True)
    loss = -xp.sum(_mul0(xp, y, logp), axis=-1, keepdims=True) + eps * (sy - syp)
    kept = xp.sum(ones, axis=-1, keepdims=True) > 0
    count = xp.sum(kept[..., 0], axis=1).astype(x.dtype)
    reduction = o.get("reduction", "none")
    value = _reduce(xp, xp.where(kept, loss, 0)[..., 0], reduction, count)
    coef = xp.where(kept, _coef(xp, g, reduction, x.shape, count), 0)
    dx = coef * (p * sy - y - eps * p * (y - syp))
    dy = coef * xp.where(ones > 0, _dweight(xp, y, -logp) + eps * (1 - p), 0)
    return value, {"logits": dx, "labels": dy}


def ref_sigmoid_focal_loss(xp, a, o, g):
    """``alpha_t (1 - p_t)**gamma BCE`` and its derivatives, written with
    ``u**(gamma - 1)`` (elementwise; rows layout with one class, as for BCE)."""
    x, y = a["logits"], a["labels"]
    alpha, gamma = o.get("alpha"), o.get("gamma", 2.0)
    sp_neg, sp_pos = _softplus(xp, -x), _softplus(xp, x)
    s, sb = xp.exp(-sp_neg), xp.exp(-sp_pos)
    ce = _mul0(xp, y, sp_neg) + _mul0(xp, 1 - y, sp_pos)
    u = y * sb + (1 - y) * s
    w = u**gamma
    dw = gamma * xp.where(u == 0, 0, u ** (gamma - 1)) if gamma else 0 * u
    at = 1.0 if alpha is None else alpha * y + (1 - alpha) * (1 - y)
    da = 0.0 if alpha is None else 2 * alpha - 1
    loss = (at * ce * w)[..., 0]
    reduction = o.get("reduction", "none")
    value = _reduce(xp, loss, reduction)
    coef = _coef(xp, g[..., 0] if g.ndim == 3 else g, reduction, x.shape)
    dce = _dweight(xp, y, sp_neg) - _dweight(xp, 1 - y, sp_pos)
    dx = at * ((s - y) * w + ce * dw * s * sb * (1 - 2 * y))
    dy = da * ce * w + at * (w * dce + ce * dw * (sb - s))
    value = value[..., None] if reduction == "none" else value
    return value, {"logits": coef * dx, "labels": coef * dy}


def ref_generalized_kl_divergence(xp, a, o, g):
    lp, t, adm = a["log_predictions"], a["targets"], a.get("where")
    terms = _mul0(xp, t, xp.log(t)) - _mul0(xp, t, lp) + xp.exp(lp) - t
    keep = xp.ones_like(t, dtype=bool) if adm is None else adm
    kl = xp.sum(xp.where(keep, terms, 0), axis=-1)
    kept = xp.any(keep, axis=-1)
    count = xp.sum(kept, axis=1).astype(lp.dtype)
    reduction = o.get("reduction", "none")
    value = _reduce(xp, kl, reduction, count)
    coef = xp.where(kept[..., None], _coef(xp, g, reduction, lp.shape, count), 0)
    dt = xp.where(t == 0, 0, xp.log(t) + 1) - _dweight(xp, t, lp) - 1
    return value, {
        "log_predictions": xp.where(keep, coef * (xp.exp(lp) - t), 0),
        "targets": xp.where(keep, coef * dt, 0),
    }


def _times0(xp, w, v):
    """``w * v``, 0 wherever ``w == 0`` (also for a NaN ``v``: -inf - -inf)."""
    return xp.where(w == 0, 0, w * v)


def ref_softmax_topk_kl_divergence(xp, a, o, g):
    """The student ``p = softmax(logits / T)`` against a teacher given by its
    top-k ``teacher_ids`` ``[K, R, k]`` and ``teacher_log_probs``: the KL of
    the k + 1 buckets (the ids and the rest), or of the teacher renormalized
    over its ids; the rest's log-mass is the log-sum-exp of the other logits."""
    temp, tail = o.get("temperature", 1.0), o.get("tail", "bucket")
    x, ids, lq = a["logits"] / temp, a["teacher_ids"], a["teacher_log_probs"]
    adm = a.get("where")
    c, k = x.shape[-1], ids.shape[-1]
    kept = xp.ones(x.shape[:2], dtype=bool) if adm is None else adm[..., 0]
    kept = kept[..., None]
    hit = ids[..., :, None] == xp.arange(c)  # [K, R, k, C]
    in_k = xp.any(hit, axis=-2)
    xs, ls, m = _normalize(xp, x, None)
    logp = xs - ls
    lp_ids = xp.sum(xp.where(hit, logp[..., None, :], 0), axis=-1)
    xr, lsr, mr = _normalize(xp, x, ~in_k)
    some = xp.any(xr > -xp.inf, axis=-1, keepdims=True)
    lp_rest = xp.where(some, (mr + lsr) - (m + ls), -xp.inf)
    q = xp.exp(lq)
    mass = xp.sum(q, axis=-1, keepdims=True)
    if tail == "renormalize":
        w = q / xp.where(mass == 0, 1, mass)
        lw = lq - xp.log(xp.where(mass == 0, 1, mass))
        q_r = xp.zeros_like(mass)
        has = mass < 0
    else:
        w, lw = q, lq
        q_r = 1 - mass
        has = q_r > k * xp.finfo(lq.dtype).eps
        q_r = xp.where(has, q_r, 0)
    lq_r = xp.log(xp.where(has, q_r, 1))
    kl = xp.sum(_times0(xp, w, lw - lp_ids), axis=-1, keepdims=True)
    kl = kl + _times0(xp, q_r, lq_r - lp_rest)
    valid = xp.all((ids >= 0) & (ids < c), axis=-1, keepdims=True)
    kl = xp.where(valid, kl, xp.nan)
    count = xp.sum(kept[..., 0], axis=1).astype(x.dtype)
    value = _reduce(xp, xp.where(kept, kl, 0)[..., 0], o["reduction"], count)
    coef = xp.where(kept, _coef(xp, g, o["reduction"], x.shape, count), 0)
    coef = xp.where(valid | ~kept, coef, xp.nan)
    big_m = xp.sum(w, axis=-1, keepdims=True) + q_r
    w_at = xp.sum(xp.where(hit, w[..., None], 0), axis=-2)
    dx = xp.exp(logp) * big_m - q_r * xp.exp(xr - lsr) - w_at
    if tail == "renormalize":
        dt = _times0(xp, w, lw - lp_ids - kl)
    else:
        rest = xp.where(has, lq_r - lp_rest, -1)
        dt = _times0(xp, w, (lw - lp_ids) - rest)
    return value, {"logits": coef * dx / temp, "teacher_log_probs": coef * dt}


ref_convex_kl_divergence = ref_generalized_kl_divergence


def ref_linear_topk_distillation(xp, a, o, g):
    """The student ``x = h W + b`` (capped) against a stored top-k teacher: the
    KL of ``ref_softmax_topk_kl_divergence``, with the hard term of
    ``_linear_head``; the teacher's log-probabilities get zero gradients."""

    def topk(x, unit):
        inner = {
            "logits": x,
            "teacher_ids": a["teacher_ids"],
            "teacher_log_probs": a["teacher_log_probs"],
        }
        topk_opts = {
            "temperature": o.get("temperature", 1.0),
            "tail": o.get("tail", "bucket"),
            "reduction": "none",
        }
        value, grads = ref_softmax_topk_kl_divergence(xp, inner, topk_opts, unit)
        return value, grads["logits"]

    return _linear_head(xp, a, o, g, topk, ("teacher_log_probs",))


def _token_weighted(ref):
    """``ref`` taking ``token_weights`` [K, R] (a fused head's option): each
    token's loss scaled by its weight, a mean still over the counted tokens;
    the weights get no gradient."""

    def oracle(xp, a, o, g):
        if "token_weights" not in a:
            return ref(xp, a, o, g)
        tw = a["token_weights"]
        a = {k: v for k, v in a.items() if k != "token_weights"}
        kept = xp.ones(a["labels"].shape, dtype=bool)
        if "where" in a:
            kept = kept & a["where"][..., 0]
        if o.get("ignore_index") is not None:
            kept = kept & (a["labels"] != o["ignore_index"])
        count = xp.sum(kept, axis=1).astype(tw.dtype)
        none = dict(o, reduction="none")
        loss, _ = ref(xp, a, none, xp.ones_like(tw))
        value = _reduce(xp, tw * loss, o["reduction"], count)
        coef = _coef(xp, g, o["reduction"], (*tw.shape, 1), count)[..., 0] * tw
        return value, ref(xp, a, none, coef)[1]

    return oracle


ref_linear_softmax_cross_entropy = _token_weighted(ref_linear_softmax_cross_entropy)
ref_linear_softmax_distillation = _token_weighted(ref_linear_softmax_distillation)
ref_linear_topk_distillation = _token_weighted(ref_linear_topk_distillation)

ORACLES = {
    name[len("ref_") :]: fn
    for name, fn in dict(globals()).items()
    if name.startswith("ref_")
}

"""Sigmoid (binary) losses on logits: binary cross-entropy and the focal loss."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from ._args import (
    as_float,
    broadcast_labels,
    check_broadcasts,
    check_fraction,
    check_reduction,
    check_same_shape,
    coefficient,
    static_finite,
)
from ._backend import fusion_barrier
from ._define import Rule, loss
from ._numerics import dweight, mul0, mul0_nonneg, sum_to_shape, upcast
from ._reduction import reduce_loss


@loss("logits", "binary")
def sigmoid_binary_cross_entropy(
    impl,
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    pos_weight: ArrayLike | None = None,
    reduction: str = "none",
) -> jax.Array:
    r"""Elementwise sigmoid (binary) cross-entropy on logits.

    .. math:: \ell = -\,p\, y \log \sigma(x) - (1 - y) \log(1 - \sigma(x))
        = p\, y\, \mathrm{softplus}(-x) + (1-y)\, \mathrm{softplus}(x)

    with ``p = pos_weight`` (default 1): ``torch.nn.functional.
    binary_cross_entropy_with_logits`` and ``optax.sigmoid_binary_cross_entropy``.

    Args:
      logits: floating array of any shape.
      labels: targets in ``[0, 1]`` of the logits' shape (ints/bools are cast).
      pos_weight: weight of the positive term, broadcastable to the logits
        (e.g. ``[C]`` for multi-label).
      reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"`` (over all
        elements).

    Returns:
      the logits' shape (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> jaxent.sigmoid_binary_cross_entropy(jnp.array([0.0]), jnp.array([1.0]))
      Array([0.6931472], dtype=float32)

    Note:
      Gradient w.r.t. logits ``(1 - y) sigmoid(x) - p y sigmoid(-x)`` (``sigmoid(x)
      - y`` without ``pos_weight``); w.r.t. labels ``p softplus(-x) - softplus(x)``.
      Stable for any finite logits; ``x = -inf`` with ``y = 0`` gives 0. A
      ``jax.custom_vjp``: ``jax.jvp``/``jax.jacfwd`` of it fail, use
      :mod:`jaxent.reference` for forward mode; ``jax.hessian`` and
      ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain JAX).
    """
    fn = "sigmoid_binary_cross_entropy"
    x = as_float(fn, "logits", logits)
    check_same_shape(fn, "labels", labels, "logits", x)
    check_reduction(fn, reduction)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(x.dtype)
    if pos_weight is not None:
        pos_weight = as_float(fn, "pos_weight", pos_weight)
        check_broadcasts(fn, "pos_weight", pos_weight, x.shape)
    loss = impl(_SIGMOID_BCE)(x, labels, pos_weight)
    return reduce_loss(loss, reduction).astype(x.dtype)


@jax.custom_vjp
def _sigmoid_bce(x, y, pos_weight):
    return _sigmoid_bce_fwd(x, y, pos_weight)[0]


def _bce_terms(x, y, pos_weight):
    xf = upcast(x)
    y = y.astype(xf.dtype)
    pw = None if pos_weight is None else pos_weight.astype(xf.dtype)
    pos = y if pw is None else pw * y
    return xf, y, pw, pos


def _softplus_pair(xf):
    """``(softplus(x), softplus(-x))`` sharing one ``exp`` and one ``log1p``
    (the same stable formula as :func:`jax.nn.softplus`)."""
    tail = jnp.log1p(jnp.exp(-jnp.abs(xf)))
    return jnp.maximum(xf, 0) + tail, jnp.maximum(-xf, 0) + tail


def _sigmoid_pair(xf):
    """``(sigmoid(x), sigmoid(-x))`` from one ``exp`` and one division."""
    e = jnp.exp(-jnp.abs(xf))
    big = 1 / (1 + e)
    small = e * big
    nonneg = xf >= 0
    return jnp.where(nonneg, big, small), jnp.where(nonneg, small, big)


def _sigmoid_bce_fwd(x, y_in, pos_weight):
    xf, y, _, pos = _bce_terms(x, y_in, pos_weight)
    sp_pos, sp_neg = _softplus_pair(xf)
    loss = mul0_nonneg(pos, sp_neg) + mul0_nonneg(1 - y, sp_pos)
    # The labels as given, not their float32 copy: no N x C residual is created.
    return loss, (x, y_in, pos_weight)


def _sigmoid_bce_bwd(res, g):
    x, y_in, pos_weight = res
    # Recomputed apart from the forward: XLA would otherwise share exp(-|x|)
    # between the two passes and write it to memory.
    xf, y, pw, pos = _bce_terms(fusion_barrier(x), y_in, pos_weight)
    sig_pos, sig_neg = _sigmoid_pair(xf)
    dx = g * ((1 - y) * sig_pos - pos * sig_neg)
    sp_pos, sp_neg = _softplus_pair(xf)
    d_pos = dweight(pos, sp_neg)
    dy = -dweight(1 - y, sp_pos) + (d_pos if pw is None else mul0(pw, d_pos))
    dpw = None
    if pw is not None:
        dpw = g * dweight(pw, mul0(y, sp_neg))
        dpw = sum_to_shape(dpw, pw.shape).astype(pos_weight.dtype)
    return dx.astype(x.dtype), (g * dy).astype(y_in.dtype), dpw


_sigmoid_bce.defvjp(_sigmoid_bce_fwd, _sigmoid_bce_bwd)


def _sigmoid_bce_plain(x, y, pos_weight):
    xf = upcast(x)
    y = y.astype(xf.dtype)
    pos = y if pos_weight is None else pos_weight.astype(xf.dtype) * y

    def times(w, v):  # w * v with 0 * inf = 0
        return w * jnp.where((w == 0) & jnp.isinf(v), 0.0, v)

    return times(pos, jax.nn.softplus(-xf)) + times(1 - y, jax.nn.softplus(xf))


_SIGMOID_BCE = Rule(_sigmoid_bce, _sigmoid_bce_plain, diff=(0, 1, 2))


@loss("logits", "binary")
def sigmoid_focal_loss(
    impl,
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    alpha: ArrayLike | None = None,
    gamma: ArrayLike = 2.0,
    reduction: str = "none",
) -> jax.Array:
    r"""Elementwise sigmoid focal loss on logits (Lin et al. 2017).

    .. math:: \ell = \alpha_t\, (1 - p_t)^\gamma\, \mathrm{BCE}(x, y),
        \quad 1 - p_t = y\, \sigma(-x) + (1 - y)\, \sigma(x),
        \quad \alpha_t = \alpha y + (1 - \alpha)(1 - y)

    with ``BCE(x, y) = y softplus(-x) + (1 - y) softplus(x)`` and
    ``alpha_t = 1`` when ``alpha`` is None: ``optax.sigmoid_focal_loss``,
    continuous labels in ``[0, 1]`` included (`Focal Loss for Dense Object
    Detection <https://arxiv.org/abs/1708.02002>`_).

    Args:
      logits: floating array of any shape.
      labels: targets in ``[0, 1]`` broadcastable to the logits' shape
        (ints/bools are cast).
      alpha: weight of the positive term in ``[0, 1]`` (the negative one gets
        ``1 - alpha``), or None for no weighting: a scalar or an array
        broadcastable to the logits' shape, traced or not, as optax takes it.
      gamma: focusing exponent ``>= 0`` (``0``: ``alpha_t`` times the binary
        cross-entropy): a scalar or an array broadcastable to the logits'
        shape, traced or not.
      reduction: ``"none"`` (elementwise), ``"sum"`` or ``"mean"`` (over all
        elements).

    Returns:
      the logits' shape (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> logits, labels = jnp.array([0.0, 2.0]), jnp.array([1.0, 0.0])
      >>> with jnp.printoptions(precision=4):
      ...     print(jaxent.sigmoid_focal_loss(logits, labels, alpha=0.25))
      [0.0433 1.2376]

    Note:
      With ``u = 1 - p_t`` and ``w = u**gamma``, the gradient w.r.t. logits is
      ``alpha_t (w (sigmoid(x) - y) + gamma w BCE sigmoid(x) sigmoid(-x)
      (1 - 2y) / u)``; w.r.t. labels ``(2 alpha - 1) w BCE + alpha_t (-w x +
      gamma w BCE (sigmoid(-x) - sigmoid(x)) / u)``. Both are formed from
      ``sigmoid(x) sigmoid(-x) / u`` and ``BCE / u`` (bounded), with ``log u``
      exact where ``u`` underflows, so they stay accurate for any finite logits
      and any ``gamma``. ``x = -inf`` with ``y = 0`` (or ``+inf`` with ``y = 1``)
      gives 0 and zero gradients (optax: NaN); an infinite logit against a
      label gives ``+inf``; NaN logits give NaN. A ``jax.custom_vjp``:
      ``jax.jvp`` of it fails, use :mod:`jaxent.reference` for forward mode;
      Hessians and ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain
      JAX, with no quotient by a small ``u``: they stay finite and accurate at
      extreme logits, for any ``gamma``). Gradients w.r.t. ``alpha`` ``(2y -
      1) w BCE`` and w.r.t. ``gamma`` ``alpha_t w log(u) BCE`` (0 where ``w
      BCE`` is 0), summed to their shapes. A concrete Python number ``alpha``
      or ``gamma`` is compiled in as a constant (``gamma = 0`` and ``alpha =
      None`` skip their terms) and checked (``alpha`` in ``[0, 1]``, ``gamma``
      finite and ``>= 0``), as is a concrete array; traced ones are not
      checked (nor are they by optax).
    """
    fn = "sigmoid_focal_loss"
    x = as_float(fn, "logits", logits)
    labels = jnp.asarray(labels)
    if not jnp.issubdtype(labels.dtype, jnp.floating):
        labels = labels.astype(x.dtype)
    labels = broadcast_labels(fn, labels, x)
    alpha_array = None
    if alpha is not None:
        alpha, alpha_array = coefficient(
            fn, "alpha", alpha, x.shape, x.dtype, check_fraction
        )
    gamma, gamma_array = coefficient(
        fn, "gamma", gamma, x.shape, x.dtype, _static_gamma
    )
    check_reduction(fn, reduction)
    opts = _FocalOpts(alpha, gamma, alpha_array is not None, gamma_array is not None)
    loss = impl(_FOCAL)(opts, x, labels, alpha_array, gamma_array)
    return reduce_loss(loss, reduction).astype(x.dtype)


def _static_gamma(fn: str, name: str, value) -> float:
    return static_finite(fn, name, value, low=0.0)


class _FocalOpts(NamedTuple):
    """Static options of the focal rule: a static ``alpha``/``gamma``, or the
    flags saying that the rule's array argument gives it."""

    alpha: float | None
    gamma: float | None
    alpha_array: bool = False
    gamma_array: bool = False


# Below this u = 1 - p_t (labels within 2 * _SMALL_U of 0 or 1, logits on the
# side where p_t -> 1), log u and the backward's ratios by u are formed from
# v = u (1 + e) instead: a quotient by u squares u in its own derivative, which
# underflows (float32 at |x| ~ 50) and made Hessians NaN. Above it, u**2 >=
# 2**-40.
_SMALL_U = 2.0**-20


class _SmallU(NamedTuple):
    """Where ``u < _SMALL_U`` (``mask``), with ``e = exp(-|x|)``, ``q`` the
    label weight of the larger sigmoid (``1 - y`` for ``x >= 0``, else ``y``)
    and ``v = q + (1 - q) e = u (1 + e) >= e``: there ``q < 2 * _SMALL_U``
    and ``e < _SMALL_U (1 + e) / (1 - q)`` are small."""

    mask: jax.Array
    zero: jax.Array  # mask and q = 0: v = e, log v = -|x| even where e underflows
    ax: jax.Array  # |x|
    e: jax.Array
    q: jax.Array
    log_v: jax.Array  # log v where mask, log u elsewhere (one log for both)


def _small_u(xf, y, u) -> _SmallU:
    mask = (u >= 0) & (u < _SMALL_U)
    ax = jnp.abs(xf)
    e = jnp.exp(-ax)
    q = jnp.where(xf >= 0, 1 - y, y)
    zero = mask & (q == 0)
    arg = jnp.where(mask, jnp.where(zero, 1.0, q + (1 - q) * e), u)
    log_v = jnp.where(zero, -ax, jnp.log(arg))
    return _SmallU(mask, zero, ax, e, q, log_v)


class _FocalTerms(NamedTuple):
    """Elementwise pieces of the focal loss, in the compute dtype."""

    y: jax.Array
    sp_pos: jax.Array  # softplus(x)
    sp_neg: jax.Array  # softplus(-x)
    sig_pos: jax.Array  # sigmoid(x)
    sig_neg: jax.Array  # sigmoid(-x)
    ce: jax.Array  # y softplus(-x) + (1 - y) softplus(x), 0 log 0 = 0
    u: jax.Array  # 1 - p_t = y sigmoid(-x) + (1 - y) sigmoid(x)
    small: _SmallU | None  # None: gamma = 0
    w: jax.Array | None  # u**gamma (None: gamma = 0)
    a: jax.Array | None  # alpha_t (None: no alpha)
    log_u: jax.Array | None  # log u, exact where u underflows (None: gamma = 0)
    alpha: jax.Array | float | None
    gamma: jax.Array | float | None


def _focal_coefs(opts: _FocalOpts, alpha, gamma, dtype):
    """``(alpha, gamma)`` as the formulas take them: static floats, arrays in
    the compute dtype, or None (no ``alpha``; ``gamma`` statically 0)."""
    alpha = alpha.astype(dtype) if opts.alpha_array else opts.alpha
    gamma = gamma.astype(dtype) if opts.gamma_array else (opts.gamma or None)
    return alpha, gamma


def _focal_terms(opts: _FocalOpts, x, y_in, alpha, gamma) -> _FocalTerms:
    xf = upcast(x)
    y = y_in.astype(xf.dtype)
    sp_pos, sp_neg = _softplus_pair(xf)
    sig_pos, sig_neg = _sigmoid_pair(xf)
    ce = mul0_nonneg(y, sp_neg) + mul0_nonneg(1 - y, sp_pos)
    u = y * sig_neg + (1 - y) * sig_pos
    alpha, gamma = _focal_coefs(opts, alpha, gamma, xf.dtype)
    small = w = log_u = None
    if gamma is not None:
        # u >= min(y, 1 - y) / 2: for labels in [0, 1] it is small only near
        # y = 0 (x < 0) or y = 1 (x > 0), where log u = log v - log1p(e) and
        # log1p(e) = e (1 - e / 2) to within e**3 / 3.
        small = _small_u(xf, y, u)
        e = small.e
        log_u = jnp.where(small.mask, small.log_v - e * (1 - e / 2), small.log_v)
        w = jnp.exp(gamma * log_u)
        if opts.gamma_array:
            w = jnp.where(gamma == 0, 1.0, w)  # u**0 = 1, at u = 0 too
    a = None
    if alpha is not None:
        a = alpha * y + (1 - alpha) * (1 - y)
    return _FocalTerms(
        y, sp_pos, sp_neg, sig_pos, sig_neg, ce, u, small, w, a, log_u, alpha, gamma
    )


def _focal_ratios(t: _FocalTerms):
    """``(sigmoid(x) sigmoid(-x) / u, ce / u)``, with derivatives free of
    ``1 / u**2``. Where ``u`` is small they come from ``rho = e / v = exp(-|x|
    - log v)`` (1 where ``q = 0``) and ``q / v = 1 - (1 - q) rho``: ``r = rho /
    (1 + e)`` and, as ``ce = log1p(e) + q |x|`` there, ``ce / u = (1 + e)
    (log1p(e) / e * rho + |x| q / v)`` with ``log1p(e) / e = 1 - e / 2 + e**2
    / 3`` to within ``e**3 / 4``."""
    sm = t.small
    # Its argument is 0 (rho = 1) where q = 0 and outside the mask.
    rho = jnp.exp(jnp.where(sm.mask & ~sm.zero, -sm.ax - sm.log_v, 0.0))
    q_v = 1 - (1 - sm.q) * rho
    ax = jnp.where(sm.zero, 0.0, sm.ax)  # q / v = 0 there, |x| may be inf
    log1p_e_over_e = 1 - sm.e * (0.5 - sm.e / 3)
    ce_u_small = (1 + sm.e) * (log1p_e_over_e * rho + ax * q_v)
    safe_u = jnp.where(sm.mask, 1.0, t.u)
    r = jnp.where(sm.mask, rho / (1 + sm.e), t.sig_pos * t.sig_neg / safe_u)
    ce_u = jnp.where(sm.mask, ce_u_small, t.ce / safe_u)
    return r, ce_u


# alpha and gamma are the arrays given (opts.alpha_array, opts.gamma_array) or
# None (static in opts).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _focal(opts, x, y, alpha, gamma):
    return _focal_fwd(opts, x, y, alpha, gamma)[0]


def _focal_fwd(opts, x, y_in, alpha, gamma):
    t = _focal_terms(opts, x, y_in, alpha, gamma)
    loss = t.ce if t.w is None else t.ce * t.w  # w = 0 only where ce = 0
    if t.a is not None:
        loss = mul0_nonneg(t.a, loss)
    return loss, (x, y_in, alpha, gamma)


def _focal_bwd(opts, res, g):
    x, y_in, alpha_in, gamma_in = res
    # Recomputed apart from the forward (see _sigmoid_bce_bwd).
    t = _focal_terms(opts, fusion_barrier(x), y_in, alpha_in, gamma_in)
    y, gamma = t.y, t.gamma
    dx = (1 - y) * t.sig_pos - y * t.sig_neg  # d ce / d x
    dy = dweight(y, t.sp_neg) - dweight(1 - y, t.sp_pos)  # d ce / d y (= -x)
    if t.w is not None:
        # d log u / d x = r (1 - 2y) and d log u / d y = (sigmoid(-x) -
        # sigmoid(x)) / u, with r = sigmoid(x) sigmoid(-x) / u <= 1 and
        # ce / u bounded; both are formed without dividing by a small u.
        r, ce_u = _focal_ratios(t)
        dx = t.w * dx + gamma * t.w * mul0(r * (1 - 2 * y), t.ce)
        dy = mul0(t.w, dy) + gamma * t.w * ce_u * (t.sig_neg - t.sig_pos)
    ce_w = t.ce if t.w is None else t.ce * t.w
    if t.a is not None:
        dx = t.a * dx
        dy = mul0(t.a, dy) + mul0(jnp.asarray(2 * t.alpha - 1, y.dtype), ce_w)
    g = upcast(g)
    dalpha = dgamma = None
    if alpha_in is not None:
        dalpha = g * mul0(2 * y - 1, ce_w)
        dalpha = sum_to_shape(dalpha, alpha_in.shape).astype(alpha_in.dtype)
    if gamma_in is not None:
        # d (u**gamma) / d gamma = w log u: 0 where w ce is (u = 0 included).
        dgamma = mul0(ce_w, t.log_u)
        if t.a is not None:
            dgamma = mul0(t.a, dgamma)
        dgamma = sum_to_shape(g * dgamma, gamma_in.shape).astype(gamma_in.dtype)
    return (g * dx).astype(x.dtype), (g * dy).astype(y_in.dtype), dalpha, dgamma


_focal.defvjp(_focal_fwd, _focal_bwd)


def _focal_plain(opts, x, y, alpha, gamma):
    """The formula as written, with ``0 * inf = 0``. Not optax's
    ``logsumexp(..., b=[1 - y, y])``: JAX drops the terms whose ``b`` is 0, and
    with them their derivative w.r.t. ``b``, so autodiff of it is wrong w.r.t.
    labels that are exactly 0 or 1."""
    xf = upcast(x)
    y = y.astype(xf.dtype)

    def times(w, v):  # w * v with 0 * inf = 0
        return w * jnp.where((w == 0) & jnp.isinf(v), 0.0, v)

    loss = times(y, jax.nn.softplus(-xf)) + times(1 - y, jax.nn.softplus(xf))
    alpha, gamma = _focal_coefs(opts, alpha, gamma, xf.dtype)
    if gamma is not None:
        u = y * jax.nn.sigmoid(-xf) + (1 - y) * jax.nn.sigmoid(xf)
        loss = loss * jnp.exp(gamma * jnp.log(u))
    if alpha is not None:
        loss = times(alpha * y + (1 - alpha) * (1 - y), loss)
    return loss


_FOCAL = Rule(_focal, _focal_plain, diff=(1, 2, 3, 4))

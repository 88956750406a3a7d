"""Softmax cross-entropy on logits: soft and integer labels, and optax's
``-inf``-safe and Poly-1 variants."""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from ._args import (
    Axis,
    as_float,
    as_int,
    as_probs,
    batch_shape,
    broadcast_labels,
    canonical_axes,
    check_axis_name,
    check_fraction,
    check_index,
    check_nonnegative,
    check_positive,
    check_reduction,
    check_same_shape,
    class_mask,
    coefficient,
    describe,
    loss_mask,
    static_finite,
)
from ._backend import fusion_barrier, per_platform
from ._define import Rule, loss
from ._numerics import (
    dweight,
    mul0,
    mul0_nonpos,
    tempered,
    upcast,
)
from ._reduction import count_rows, reduce_loss
from ._sharding import is_sharded, like, replicated, reshard, spec
from ._softmax import (
    class_sum,
    has_class,
    normalizer,
    plain_log_softmax,
    plain_normalizer,
    plain_sum,
    probs,
    shifted,
)


class _Opts(NamedTuple):
    """Static options of the softmax cross-entropy rule."""

    axes: tuple[int, ...]  # class axes, sorted
    label_smoothing: float
    z_loss: float
    ignore_index: int | None
    axis_name: Hashable | None
    temperature: float = 1.0  # divides the logits (soft labels only)


def _class_shape(shape: tuple[int, ...], axes: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of a per-class array laid out along the class axes (keepdims)."""
    return tuple(d if i in axes else 1 for i, d in enumerate(shape))


def _num_local(shape: tuple[int, ...], axes: tuple[int, ...]) -> int:
    return math.prod(shape[a] for a in axes)


def _offset(n_local: int, axis_name: Hashable | None, dtype):
    """First global class id held by this shard (0 unless vocab-parallel)."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name).astype(dtype) * n_local


def _num_classes(n_local: int, axis_name: Hashable | None):
    """Global number of classes (a Python int, also when vocab-parallel)."""
    return n_local if axis_name is None else n_local * lax.axis_size(axis_name)


def _class_ids(opts: _Opts, shape, dtype) -> jax.Array:
    """Global class id of every logit (keepdims)."""
    kshape = _class_shape(shape, opts.axes)
    ids = 0
    for a in opts.axes:
        ids = ids * shape[a] + lax.broadcasted_iota(dtype, kshape, a)
    return ids + _offset(_num_local(shape, opts.axes), opts.axis_name, dtype)


def _is_label(opts: _Opts, shape, labels) -> jax.Array:
    """``class_id == label`` for every logit: the one-hot by comparison, which XLA
    fuses and which partitions cleanly when the classes are sharded."""
    return _class_ids(opts, shape, labels.dtype) == jnp.expand_dims(labels, opts.axes)


def _may_gather(x: jax.Array, axes: tuple[int, ...]) -> bool:
    """Whether the target logit may be gathered (and its gradient scattered)
    rather than found by comparing every class id with the label.

    A gather touches N entries where the comparison reads all N x C. Being
    batched over the other axes, it partitions along them with no
    communication; vocab-parallel shards gather locally. An explicit-sharding
    mesh that shards the class axis rejects it, so that case (and several class
    axes) compares. The gather is then taken on CPU only (see
    :func:`_target_logit`).
    """
    return len(axes) == 1 and spec(x)[axes[0]] is None


def _local_labels(labels, n_local: int, axis_name):
    """Labels as indices into this shard's classes (clipped into range), and
    whether this shard holds them (always, unless vocab-parallel)."""
    local = labels - _offset(n_local, axis_name, labels.dtype)
    held = (local >= 0) & (local < n_local)
    return jnp.clip(local, 0, n_local - 1), held


def _take_label(x: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """``x[..., index, ...]`` along ``axis`` (keepdims), one entry per row."""
    index = jnp.expand_dims(index, axis)
    return jnp.take_along_axis(x, index, axis=axis, mode="promise_in_bounds")


def _add_at_label(dx: jax.Array, index: jax.Array, v: jax.Array, axis: int):
    """``dx[..., index, ...] += v`` along ``axis``, batched over the other axes
    (an indexed ``.at[].add`` would not partition along them)."""
    batch = tuple(d for d in range(dx.ndim) if d != axis)
    dims = lax.ScatterDimensionNumbers(
        update_window_dims=(),
        inserted_window_dims=(axis,),
        scatter_dims_to_operand_dims=(axis,),
        operand_batching_dims=batch,
        scatter_indices_batching_dims=tuple(range(index.ndim)),
    )
    mode = lax.GatherScatterMode.PROMISE_IN_BOUNDS
    return lax.scatter_add(dx, index[..., None], v, dims, mode=mode)


def _take(table: jax.Array, index: jax.Array) -> jax.Array:
    """``table[index]`` for a 1-D table (``index`` in range). Under explicit
    sharding the table (C values) is replicated and looked up where each index
    lives."""
    if is_sharded(table):
        table = reshard(table, (None,), table)
    if is_sharded(index):
        return table.at[index].get(out_sharding=jax.typeof(index).sharding, mode="clip")
    return jnp.take(table, index, mode="clip")


def _target_weight(weights, labels, n_local, axis_name) -> jax.Array:
    """``weights[labels]`` per example; with vocab-parallel weights each shard
    contributes the labels it holds."""
    local, held = _local_labels(labels, n_local, axis_name)
    w = _take(weights, local)
    if axis_name is None:
        return w
    return lax.psum(jnp.where(held, w, 0), axis_name)


def _kept_rows(opts: _Opts, labels, cmask) -> jax.Array | None:
    """Boolean keepdims mask of counted examples, or None when all count."""
    keep = None if cmask is None else has_class(cmask, opts.axes, opts.axis_name)
    if labels is not None and opts.ignore_index is not None:
        counted = jnp.expand_dims(labels, opts.axes) != opts.ignore_index
        keep = counted if keep is None else keep & counted
    return keep


# The softmax cross-entropy family. For one row of logits x (-inf at excluded
# classes) every variant is
#   loss = sumy * lse - <Y, x>  (+ z_loss * lse**2),   lse = m + ls,
# with the implicit target Y = (1 - eps) * dense + a * onehot(label) + b * u,
# where a = (1 - eps) * weights[label], b = eps / C, u = weights (or 1) on the
# admissible classes and sumy = sum(Y). Its one backward is
#   d x = g * (softmax(x) * (sumy + 2 * z_loss * lse) - Y).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _softmax_ce(opts, x, dense, labels, weights, cmask):
    return _softmax_ce_fwd(opts, x, dense, labels, weights, cmask)[0]


class _CERes(NamedTuple):
    """Residuals: the inputs and per-row (keepdims) statistics, no N x C array."""

    x: jax.Array
    dense: jax.Array | None  # soft labels
    labels: jax.Array | None  # integer labels
    weights: jax.Array | None  # class weights [C]
    cmask: jax.Array | None  # admissible classes (or rows)
    m: jax.Array  # row max
    ls: jax.Array  # log sum exp(x - m)
    sumy: jax.Array  # sum(Y)
    a: jax.Array | None  # coefficient of the one-hot part of Y
    xy: jax.Array | None  # x[label] - m
    b: jax.Array | None  # eps / C, the smoothing coefficient
    rowscale: jax.Array | None  # 0: not counted, NaN: bad label, 1: counted


def _smoothing_weights(opts, shape, weights, cmask, dtype):
    """The per-class ``u`` of label smoothing (None means all ones)."""
    kshape = _class_shape(shape, opts.axes)
    u = None if weights is None else weights.astype(dtype).reshape(kshape)
    if cmask is not None:
        # Broadcast in full: a mask may be [N, 1] (examples) or [1, C] (classes).
        cmask = jnp.broadcast_to(cmask, shape)
        u = cmask.astype(dtype) if u is None else jnp.where(cmask, u, 0.0)
    return u


def _target_logit(opts, x, xf, m, labels) -> jax.Array:
    """``x[label] - m`` per row (keepdims), summed over class shards.

    On CPU it is gathered where :func:`_may_gather` allows; elsewhere the
    comparison is fused into the passes that read the logits anyway (integer
    labels at 8192 x 128256 bfloat16 on an H100: 3.2 ms comparing, 6.0 ms and
    4 GiB of temp memory gathering and scattering).
    """
    axes, name = opts.axes, opts.axis_name

    def compare(xf, m, labels):
        hit = _is_label(opts, x.shape, labels)
        return jnp.sum(jnp.where(hit, shifted(xf, m), 0.0), axes, keepdims=True)

    def gather(xf, m, labels):
        local, held = _local_labels(labels, _num_local(x.shape, axes), name)
        xy = _take_label(xf, local, axes[0]) - m
        return xy if name is None else jnp.where(jnp.expand_dims(held, axes), xy, 0)

    if _may_gather(x, axes):
        xy = per_platform(gather, compare, xf, m, labels)
    else:
        xy = compare(xf, m, labels)
    return xy if name is None else lax.psum(xy, name)


def _softmax_ce_fwd(opts, x, dense, labels, weights, cmask):
    axes, eps, name = opts.axes, opts.label_smoothing, opts.axis_name
    xf = tempered(upcast(x, cmask), opts.temperature)
    dtype = xf.dtype
    n_local = _num_local(x.shape, axes)
    m, ls = normalizer(xf, axes, name)
    sumy = jnp.zeros((), dtype)
    lin = jnp.zeros((), dtype)  # <Y, x - m>
    a = xy = b = None
    if dense is not None:
        y = dense.astype(dtype)
        if cmask is not None:
            y = jnp.where(cmask, y, 0.0)
        sumy = sumy + (1 - eps) * class_sum(y, axes, name)
        # xf is -inf at excluded entries, so x - m <= 0 everywhere.
        lin = lin + (1 - eps) * class_sum(mul0_nonpos(y, shifted(xf, m)), axes, name)
    keep = _kept_rows(opts, labels, cmask)
    if labels is not None:
        a = jnp.full((), 1 - eps, dtype)
        if weights is not None:
            w = _target_weight(weights.astype(dtype), labels, n_local, name)
            a = a * jnp.expand_dims(w, axes)
        xy = _target_logit(opts, x, xf, m, labels)
        if keep is not None:
            # An excluded row's -inf must not meet a product: its derivative
            # would be 0 * inf (NaN) when this rule is differentiated again.
            xy = jnp.where(keep, xy, 0.0)
        sumy = sumy + a
        lin = lin + mul0(a, xy)
    if eps:
        u = _smoothing_weights(opts, x.shape, weights, cmask, dtype)
        if cmask is None:
            count = _num_classes(n_local, name)
        else:
            count = class_sum(
                jnp.broadcast_to(cmask, x.shape).astype(dtype), axes, name
            )
        b = eps / jnp.maximum(count, 1).astype(dtype)
        big_u = count if u is None else class_sum(u, axes, name)
        xs = shifted(xf, m)
        ux = class_sum(xs if u is None else mul0(u, xs), axes, name)
        sumy = sumy + b * big_u
        lin = lin + b * ux
    loss = sumy * ls - lin
    if opts.z_loss:
        loss = loss + opts.z_loss * (m + ls) ** 2
    rowscale = keep
    if labels is not None:
        valid = (labels >= 0) & (labels < _num_classes(n_local, name))
        # An out-of-range label makes its example (and its gradient row) NaN.
        nan_or_one = jnp.where(jnp.expand_dims(valid, axes), 1.0, jnp.nan)
        rowscale = (
            nan_or_one if rowscale is None else jnp.where(rowscale, nan_or_one, 0.0)
        )
    if rowscale is not None:
        rowscale = rowscale.astype(dtype)
        loss = jnp.where(rowscale != 0, loss * rowscale, 0.0)
    res = _CERes(x, dense, labels, weights, cmask, m, ls, sumy, a, xy, b, rowscale)
    return jnp.squeeze(loss, axes), res


def _softmax_ce_bwd(opts, res: _CERes, g):
    xf = tempered(upcast(res.x, res.cmask), opts.temperature)
    coef = jnp.expand_dims(g, opts.axes)
    if res.rowscale is not None:
        coef = coef * res.rowscale
    # The logits' gradient gets 1 / T (they enter divided by T); the labels' not.
    dx = _ce_dlogits(opts, res, xf, tempered(coef, opts.temperature))
    d_dense = None if res.dense is None else _ce_dlabels(opts, res, xf, coef)
    d_weights = None if res.weights is None else _ce_dweights(opts, res, xf, coef)
    return dx, d_dense, None, d_weights, None


def _ce_dlogits(opts, res: _CERes, xf, coef):
    """``coef * (softmax(x) * (sumy + 2 z lse) - Y)``: an ignored row has
    ``coef`` 0, so its gradient is 0 for finite logits."""
    axes, eps, name = opts.axes, opts.label_smoothing, opts.axis_name
    x, labels = res.x, res.labels
    scale = res.sumy
    if opts.z_loss:
        scale = scale + 2 * opts.z_loss * (res.m + res.ls)
    # Per-row factors are finished here, not re-derived inside the N x C loop.
    pscale, m, ls = fusion_barrier((coef * scale, res.m, res.ls))
    dx = probs(xf, m, ls) * pscale
    if res.dense is not None:
        dx = dx - (coef * (1 - eps)) * _masked_dense(res, xf.dtype)
    if res.b is not None:
        u = _smoothing_weights(opts, x.shape, res.weights, res.cmask, xf.dtype)
        dx = dx - (coef * res.b if u is None else (coef * res.b) * u)
    if labels is not None:
        minus_a = -coef * res.a * jnp.ones_like(coef)

        def compare(dx, minus_a, labels):
            return dx + jnp.where(_is_label(opts, x.shape, labels), minus_a, 0.0)

        def scatter(dx, minus_a, labels):
            # The one-hot part touches one entry per row: added in place.
            local, held = _local_labels(labels, _num_local(x.shape, axes), name)
            v = jnp.squeeze(minus_a, axes)
            if name is not None:
                v = jnp.where(held, v, 0.0)
            return _add_at_label(dx, local, v, axes[0])

        if _may_gather(x, axes):
            dx = per_platform(scatter, compare, dx, minus_a, labels)
        else:
            dx = compare(dx, minus_a, labels)
    return like(dx.astype(x.dtype), x)


def _masked_dense(res: _CERes, dtype):
    y = res.dense.astype(dtype)
    return y if res.cmask is None else jnp.where(res.cmask, y, 0.0)


def _kept(res: _CERes, v):
    """``v`` with excluded entries and rows set to 0. They hold -inf or NaN
    factors: selecting them away before any product keeps the derivative of
    this rule (whose cotangents multiply these factors) finite."""
    if res.rowscale is not None:
        v = jnp.where(res.rowscale != 0, v, 0.0)
    return v if res.cmask is None else jnp.where(res.cmask, v, 0.0)


def _ce_dlabels(opts, res: _CERes, xf, coef):
    """d / d dense = ``-coef (1 - eps) log_softmax(x)``."""
    y = _masked_dense(res, xf.dtype)
    d = (
        coef
        * (1 - opts.label_smoothing)
        * _kept(res, dweight(y, res.ls - (xf - res.m)))
    )
    return like(d.astype(res.dense.dtype), res.dense)


def _ce_dweights(opts, res: _CERes, xf, coef):
    """d / d weights: ``(1 - eps) (lse - x[y])`` per row, scattered to its
    label's class, plus ``b (lse - x_c)`` summed over rows with smoothing."""
    axes, name = opts.axes, opts.axis_name
    n_local = _num_local(res.x.shape, axes)
    w = res.weights.astype(xf.dtype)
    local, held = _local_labels(res.labels, n_local, name)
    w_y = _take(w, local)
    gap = dweight(jnp.expand_dims(w_y, axes), res.ls - res.xy)
    if res.rowscale is not None:
        gap = jnp.where(res.rowscale != 0, gap, 0.0)
    per_row = coef * (1 - opts.label_smoothing) * gap
    # Out-of-shard (or out-of-range) labels scatter nowhere.
    local = jnp.where(held, local, n_local)
    # Under explicit sharding the per-row terms live on batch shards: their
    # [C] sum is formed replicated (an all-reduce of C values).
    d = (
        jnp.zeros(n_local, xf.dtype)
        .at[local]
        .add(
            jnp.squeeze(per_row, axes),
            mode="drop",
            out_sharding=replicated(per_row, local),
        )
    )
    if res.b is not None:
        wk = w.reshape(_class_shape(res.x.shape, axes))
        term = coef * res.b * _kept(res, dweight(wk, res.ls - (xf - res.m)))
        rows = tuple(i for i in range(res.x.ndim) if i not in axes)
        d = d + jnp.sum(term, axis=rows).reshape(n_local)
    return like(d.astype(res.weights.dtype), res.weights)


_softmax_ce.defvjp(_softmax_ce_fwd, _softmax_ce_bwd)


def _softmax_ce_plain(opts, x, dense, labels, weights, cmask):
    """The same loss in plain JAX, with the explicit (smoothed, weighted)
    target ``Y`` built as an array."""
    axes, eps, name = opts.axes, opts.label_smoothing, opts.axis_name
    xf = tempered(upcast(x, cmask), opts.temperature)
    dtype = xf.dtype
    admissible = jnp.ones(x.shape, dtype)
    if cmask is not None:
        admissible = jnp.broadcast_to(cmask, x.shape).astype(dtype)
    count = plain_sum(admissible, axes, name)
    u = admissible
    y = jnp.zeros((), dtype)
    if dense is not None:
        y = (1 - eps) * dense.astype(dtype) * admissible
    valid = None
    if labels is not None:
        onehot = _class_ids(opts, x.shape, labels.dtype) == _labels_k(opts, labels)
        onehot = onehot.astype(dtype)
        if weights is not None:
            u = u * weights.astype(dtype).reshape(_class_shape(x.shape, axes))
        y = (1 - eps) * plain_sum(onehot * u, axes, name) * onehot
        n_classes = _num_classes(_num_local(x.shape, axes), name)
        valid = (_labels_k(opts, labels) >= 0) & (_labels_k(opts, labels) < n_classes)
    y = y + eps * u / jnp.maximum(count, 1)
    m, ls = plain_normalizer(xf, axes, cmask, name)
    xm = xf - m
    # 0 * log 0 = 0: a zero target at a -inf logit adds nothing.
    xm = jnp.where((y == 0) & jnp.isinf(xm), 0.0, xm)
    loss = plain_sum(y, axes, name) * ls - plain_sum(y * xm, axes, name)
    loss = loss + opts.z_loss * (m + ls) ** 2
    keep = jnp.ones(ls.shape, bool) if cmask is None else count > 0
    if labels is not None and opts.ignore_index is not None:
        keep = keep & (_labels_k(opts, labels) != opts.ignore_index)
    if valid is not None:
        loss = jnp.where(valid, loss, jnp.nan)
    return jnp.squeeze(jnp.where(keep, loss, 0.0), axes)


def _labels_k(opts: _Opts, labels):
    """Integer labels as keepdims rows of the logits."""
    return jnp.expand_dims(labels, opts.axes)


_SOFTMAX_CE = Rule(_softmax_ce, _softmax_ce_plain, diff=(1, 2, 4))


@loss("logits", "probs")
def softmax_cross_entropy(
    impl,
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    axis_name: Hashable | None = None,
    temperature: float = 1.0,
) -> jax.Array:
    r"""Softmax cross-entropy with probability (one-hot or soft) labels.

    .. math:: \ell = -\sum_c y_c \log \mathrm{softmax}(x)_c
        = \Big(\sum_c y_c\Big) \log\sum_k e^{x_k} - \sum_c y_c x_c,
        \quad x = \mathrm{logits} / T

    with smoothed labels ``y = (1 - label_smoothing) * labels + label_smoothing / C``
    (as in PyTorch) and ``z_loss * logsumexp(x)**2`` added per example. The
    temperature ``T`` divides the logits first: smoothing and z-loss apply to the
    tempered logits ``x``. No ``T**2`` factor is applied (distillation recipes
    multiply the loss by ``T**2`` themselves).

    Args:
      logits: floating array ``[..., C, ...]``.
      labels: probabilities of the logits' shape.
      axis: class axis (or axes; ``None`` for all).
      where: boolean mask of the logits' shape (classes to include) or of the
        batch shape (examples to include), as in optax; excluded examples give 0
        and do not count in a mean.
      label_smoothing: in ``[0, 1]``.
      z_loss: coefficient of the ``logsumexp(x)**2`` penalty.
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"`` (over counted
        examples; 0 if none is counted).
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``.
      temperature: ``T``, a static Python float > 0 dividing the logits.

    Returns:
      the batch-shaped losses (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> with jnp.printoptions(precision=4):
      ...     print(jaxent.softmax_cross_entropy(logits, labels))
      [0.2761 2.9518]

    Note:
      Gradient w.r.t. logits ``(softmax(x) * (sum(y) + 2 z_loss lse) - y) / T``; w.r.t.
      labels ``-(1 - label_smoothing) * log_softmax(x)``. A ``-inf`` logit under a zero
      label contributes 0 to the value and both gradients; a positive label on a
      ``-inf`` logit gives ``+inf``. ``+inf``/NaN logits give NaN. A ``jax.custom_vjp``:
      ``jax.jvp``/``jax.jacfwd`` of it fail, use :mod:`jaxent.reference` for forward
      mode; ``jax.hessian`` and ``jax.jvp(jax.grad(f))`` work (the rule's backward is
      plain JAX).
    """
    fn = "softmax_cross_entropy"
    x = as_float(fn, "logits", logits)
    labels = as_probs(fn, "labels", labels)
    check_same_shape(fn, "labels", labels, "logits", x)
    return _soft_ce(
        impl,
        fn,
        x,
        labels,
        axis,
        where,
        label_smoothing,
        z_loss,
        reduction,
        axis_name,
        temperature=temperature,
    )


def _soft_ce(
    impl,
    fn,
    x,
    labels,
    axis,
    where,
    label_smoothing,
    z_loss,
    reduction,
    axis_name,
    temperature=1.0,
):
    """The soft-label cross-entropy after the inputs' checks (shared by
    :func:`softmax_cross_entropy` and :func:`safe_softmax_cross_entropy`)."""
    axes = canonical_axes(fn, axis, x.ndim)
    opts = _options(fn, axes, label_smoothing, z_loss, reduction, None, axis_name)
    opts = opts._replace(temperature=check_positive(fn, "temperature", temperature))
    cmask = loss_mask(fn, where, x.shape, axes)
    loss = impl(_SOFTMAX_CE)(opts, x, labels, None, None, cmask)
    keep = None if cmask is None else has_class(cmask, axes, axis_name)
    count = None if keep is None else count_rows(jnp.squeeze(keep, axes), loss.shape)
    return reduce_loss(loss, reduction, count).astype(x.dtype)


@loss("logits", "class_ids")
def softmax_cross_entropy_with_integer_labels(
    impl,
    logits: ArrayLike,
    labels: ArrayLike,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    *,
    weights: ArrayLike | None = None,
    ignore_index: int | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Softmax cross-entropy with integer class labels (PyTorch semantics).

    .. math:: \ell_i = (1-\varepsilon)\, w_{y_i} (\mathrm{lse}_i - x_{i y_i})
        + \frac{\varepsilon}{C} \sum_c w_c (\mathrm{lse}_i - x_{ic})
        + z\, \mathrm{lse}_i^2

    equal to ``torch.nn.functional.cross_entropy`` with class indices for every
    ``weight``/``ignore_index``/``label_smoothing``/``reduction``; ``"mean"``
    divides by the summed weight of the counted examples, and is 0 (with zero
    gradient) when none is counted. No one-hot array is built.

    Args:
      logits: floating array ``[..., C, ...]``.
      labels: integer class ids, the logits' shape without ``axis``.
      axis: class axis (or axes: labels are then flat indices over them, the
        axes flattened in the order given, as in optax).
      where: boolean mask of the batch shape (examples to count) or, as in
        optax, of the logits' shape (classes to include).
      weights: per-class weights ``[C]``.
      ignore_index: a label value whose examples are not counted.
      label_smoothing: ``eps`` in ``[0, 1]``.
      z_loss: ``z``, the coefficient of the PaLM/T5X ``logsumexp**2`` penalty.
      reduction: ``"none"``, ``"sum"`` or ``"mean"``.
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``
        (labels are global ids; ``weights`` are sharded like the classes).

    Returns:
      the batch-shaped losses (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> jaxent.softmax_cross_entropy_with_integer_labels(
      ...     logits, jnp.array([0, 1]), reduction="mean").round(4)
      Array(1.614, dtype=float32)

    Note:
      Gradient w.r.t. logits ``g * (softmax(x) * (sum(Y) + 2 z lse) - Y)`` with the
      implicit target ``Y``. An out-of-range label that is not ``ignore_index`` gives
      NaN for its example (value and gradient row). A label on a ``-inf`` logit gives
      ``+inf``; ``+inf``/NaN logits give NaN. A ``jax.custom_vjp``:
      ``jax.jvp``/``jax.jacfwd`` of it fail, use :mod:`jaxent.reference` for forward
      mode; ``jax.hessian`` and ``jax.jvp(jax.grad(f))`` work (the rule's backward is
      plain JAX).
    """
    fn = "softmax_cross_entropy_with_integer_labels"
    x = as_float(fn, "logits", logits)
    labels = as_int(fn, "labels", labels)
    order = canonical_axes(fn, axis, x.ndim, ordered=True)
    if len(order) > 1:
        # optax numbers the classes by flattening the class axes in the order
        # given (axis=(3, 2): axis 3 major): the same layout, made explicit.
        x, where = _flatten_classes(fn, x, where, order)
        order = (x.ndim - 1,)
    axes = order
    rows = batch_shape(x.shape, axes)
    if labels.shape != rows:
        raise ValueError(
            f"{fn}: `labels` must have the logits' shape without the class axis "
            f"{rows}; got {describe(labels)}."
        )
    ignore_index = check_index(fn, "ignore_index", ignore_index)
    opts = _options(
        fn, axes, label_smoothing, z_loss, reduction, ignore_index, axis_name
    )
    n_local = _num_local(x.shape, axes)
    if weights is not None:
        weights = as_float(fn, "weights", weights)
        if weights.shape != (n_local,):
            raise ValueError(
                f"{fn}: `weights` must have shape ({n_local},), one per class; "
                f"got {describe(weights)}."
            )
    cmask = loss_mask(fn, where, x.shape, axes)
    # Under explicit sharding the labels are laid out like the logits' batch
    # axes, so that per-example terms line up (a local slice if replicated).
    labels = reshard(labels, batch_shape(spec(x), axes), x)
    loss = impl(_SOFTMAX_CE)(opts, x, None, labels, weights, cmask)
    count = None
    if reduction == "mean":
        keep = _kept_rows(opts, labels, cmask)
        keep = None if keep is None else jnp.squeeze(keep, axes)
        if weights is not None:
            w = _target_weight(weights.astype(loss.dtype), labels, n_local, axis_name)
            count = jnp.sum(w if keep is None else jnp.where(keep, w, 0))
        else:
            count = count_rows(keep, rows)
    return reduce_loss(loss, reduction, count).astype(x.dtype)


def _flatten_classes(fn, x, where, order):
    """``x`` as ``[batch..., C]`` with the class axes flattened in ``order``
    (and a class-shaped ``where`` alike)."""
    rows = tuple(i for i in range(x.ndim) if i not in order)
    perm = rows + order
    flat = (*batch_shape(x.shape, order), -1)
    if where is not None and np.ndim(where) == x.ndim:
        where = class_mask(fn, where, x.shape)
        where = jnp.broadcast_to(where, x.shape).transpose(perm).reshape(flat)
    return x.transpose(perm).reshape(flat), where


def _options(fn, axes, label_smoothing, z_loss, reduction, ignore_index, axis_name):
    check_reduction(fn, reduction)
    check_axis_name(fn, axis_name, axes)
    return _Opts(
        axes,
        check_fraction(fn, "label_smoothing", label_smoothing),
        check_nonnegative(fn, "z_loss", z_loss),
        ignore_index,
        axis_name,
    )


@loss("logits", "probs")
def safe_softmax_cross_entropy(
    impl,
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    where: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""optax's ``-inf``-safe softmax cross-entropy over the last axis.

    .. math:: \ell = -\sum_c y_c \log \mathrm{softmax}(x)_c,
        \qquad 0 \cdot \log 0 = 0

    :func:`softmax_cross_entropy` with the class axis fixed to ``-1`` and the
    labels broadcast to the logits, as ``optax.safe_softmax_cross_entropy``
    (whose values and gradients it has): jaxent's softmax cross-entropy is
    ``-inf``-safe already.

    Args:
      logits: floating array ``[..., C]``.
      labels: probabilities broadcastable to the logits' shape.
      where: boolean mask of the logits' shape (classes to include) or of the
        batch shape ``[...]`` (examples to include).
      label_smoothing: in ``[0, 1]``.
      z_loss: coefficient of the ``logsumexp(x)**2`` penalty.
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"`` (over counted
        examples).
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``.

    Returns:
      the ``[...]`` losses (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> logits = jnp.array([0.0, 0.0, -jnp.inf])
      >>> jaxent.safe_softmax_cross_entropy(logits, jnp.array([0.5, 0.5, 0.0]))
      Array(0.6931472, dtype=float32)

    Note:
      Gradient w.r.t. logits ``softmax(x) * sum(y) - y``; w.r.t. labels
      ``-log_softmax(x)`` (0 at a zero label on a ``-inf`` logit, where the
      value adds 0). A positive label on a ``-inf`` logit gives ``+inf``;
      ``+inf``/NaN logits give NaN. A ``jax.custom_vjp``: ``jax.jvp`` of it
      fails, use :mod:`jaxent.reference` for forward mode; Hessians and
      ``jax.jvp(jax.grad(f))`` work (the rule's backward is plain JAX).
    """
    fn = "safe_softmax_cross_entropy"
    x = as_float(fn, "logits", logits)
    labels = broadcast_labels(fn, as_probs(fn, "labels", labels), x)
    return _soft_ce(
        impl, fn, x, labels, -1, where, label_smoothing, z_loss, reduction, axis_name
    )


class _PolyOpts(NamedTuple):
    """Static options of the Poly-1 rule."""

    axes: tuple[int, ...]
    epsilon: float | None  # None: an array argument of the rule
    axis_name: Hashable | None


@loss("logits", "probs")
def poly_loss_cross_entropy(
    impl,
    logits: ArrayLike,
    labels: ArrayLike,
    *,
    epsilon: ArrayLike = 2.0,
    axis: Axis = -1,
    where: ArrayLike | None = None,
    reduction: str = "none",
    axis_name: Hashable | None = None,
) -> jax.Array:
    r"""Poly-1 loss: softmax cross-entropy plus ``epsilon`` times ``1 - p_t``.

    .. math:: \ell = -\sum_c y_c \log p_c + \varepsilon \sum_c y_c (1 - p_c),
        \qquad p = \mathrm{softmax}(x)

    (Leng et al. 2022, `PolyLoss <https://arxiv.org/abs/2204.12511>`_); for
    labels summing to 1 the second term is ``epsilon * (1 - sum(y * p))``. Same
    values as ``optax.poly_loss_cross_entropy``, whose form it keeps.

    Args:
      logits: floating array ``[..., C, ...]``.
      labels: probabilities broadcastable to the logits' shape.
      epsilon: the coefficient of the first polynomial term (``2.0`` for
        ImageNet classification, ``-1.0`` for detection in the paper): a finite
        scalar or an array broadcastable to the batch shape (one per example),
        traced or not, as optax takes it.
      axis: class axis (or axes; ``None`` for all).
      where: boolean mask of the logits' rank broadcastable to them (classes to
        include, optax's meaning: ``softmax`` and both sums run over them) or of
        the batch shape (examples to include); an excluded example gives 0 and
        does not count in a mean.
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"`` (over counted
        examples; 0 if none is counted).
      axis_name: mesh axis of a vocab-parallel class axis inside ``shard_map``.

    Returns:
      the batch-shaped losses (``"none"``) or a scalar, in the logits' dtype.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> logits = jnp.array([[1.2, -0.8, -0.5], [0.9, -1.2, 1.1]])
      >>> labels = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
      >>> with jnp.printoptions(precision=4):
      ...     print(jaxent.poly_loss_cross_entropy(logits, labels))
      [0.7587 4.8473]

    Note:
      Gradient w.r.t. logits ``p * sum(y) - y - epsilon * p * (y - sum(y * p))``;
      w.r.t. labels ``-log_softmax(x) + epsilon * (1 - p)``. A ``-inf`` logit
      under a zero label adds 0 (optax gives NaN); a positive label on a
      ``-inf`` logit gives ``+inf``; ``+inf``/NaN logits give NaN. A
      ``jax.custom_vjp``: ``jax.jvp`` of it fails, use :mod:`jaxent.reference`
      for forward mode; Hessians and ``jax.jvp(jax.grad(f))`` work (the rule's
      backward is plain JAX). Gradient w.r.t. ``epsilon`` ``sum(y * (1 - p))``
      per example, summed to its shape. A concrete Python number ``epsilon`` is
      compiled in as a constant and checked to be finite, as is a concrete
      array; a traced one is not checked (nor is it by optax).
    """
    fn = "poly_loss_cross_entropy"
    x = as_float(fn, "logits", logits)
    labels = broadcast_labels(fn, as_probs(fn, "labels", labels), x)
    axes = canonical_axes(fn, axis, x.ndim)
    rows = batch_shape(x.shape, axes)
    eps, eps_array = coefficient(fn, "epsilon", epsilon, rows, x.dtype, static_finite)
    if eps_array is not None:
        # Per example; the broadcast's transpose sums its cotangent back.
        eps_array = jnp.broadcast_to(eps_array, rows)
    check_reduction(fn, reduction)
    check_axis_name(fn, axis_name, axes)
    cmask = loss_mask(fn, where, x.shape, axes)
    opts = _PolyOpts(axes, eps, axis_name)
    loss = impl(_POLY_CE)(opts, x, labels, cmask, eps_array)
    keep = None if cmask is None else has_class(cmask, axes, axis_name)
    count = None if keep is None else count_rows(jnp.squeeze(keep, axes), loss.shape)
    return reduce_loss(loss, reduction, count).astype(x.dtype)


def _poly_labels(y: jax.Array, cmask, dtype) -> jax.Array:
    y = y.astype(dtype)
    return y if cmask is None else jnp.where(cmask, y, 0.0)


# Poly-1 on one row of logits x (-inf at excluded classes), p = softmax(x):
#   loss = sumy * ls - <y, x - m> + eps * (sumy - <y, p>),
# d x = g * (p * (sumy + eps <y, p> - eps y) - y),
# d y = g * (ls - (x - m) + eps * (1 - p)),
# d eps = g * (sumy - <y, p>).
# eps is opts.epsilon (static) or, when that is None, the array argument
# (batch-shaped); see _poly_eps.
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _poly_ce(opts, x, y, cmask, eps):
    return _poly_ce_fwd(opts, x, y, cmask, eps)[0]


def _poly_eps(opts, eps, dtype):
    """``epsilon`` to multiply keepdims per-row terms with."""
    if opts.epsilon is not None:
        return opts.epsilon
    return jnp.expand_dims(eps.astype(dtype), opts.axes)


def _poly_ce_fwd(opts, x, y_in, cmask, eps_in):
    axes, name = opts.axes, opts.axis_name
    xf = upcast(x, cmask)
    m, ls = normalizer(xf, axes, name)
    y = _poly_labels(y_in, cmask, xf.dtype)
    sumy = class_sum(y, axes, name)
    # x - m <= 0 (-inf where excluded): 0 * -inf is 0 without a select.
    lin = class_sum(mul0_nonpos(y, shifted(xf, m)), axes, name)
    yp = class_sum(y * probs(xf, m, ls), axes, name)
    loss = sumy * ls - lin + _poly_eps(opts, eps_in, xf.dtype) * (sumy - yp)
    return jnp.squeeze(loss, axes), (x, y_in, cmask, eps_in, m, ls, sumy, yp)


def _poly_ce_bwd(opts, res, g):
    x, y_in, cmask, eps_in, m, ls, sumy, yp = res
    xf = upcast(x, cmask)
    eps = _poly_eps(opts, eps_in, xf.dtype)
    y = _poly_labels(y_in, cmask, xf.dtype)
    coef = jnp.expand_dims(g, opts.axes)
    p = probs(xf, m, ls)
    dx = coef * (p * (sumy + eps * yp - eps * y) - y)
    # -log p is +inf at excluded entries and -inf logits: 0 under a zero label.
    dy = coef * (dweight(y, ls - shifted(xf, m)) + eps * (1 - p))
    if cmask is not None:
        dy = jnp.where(cmask, dy, 0.0)
    deps = None
    if eps_in is not None:
        # Over this device's classes: with a vocab-parallel axis, epsilon was
        # cast to vary over it (Rule.call) and that cast's transpose sums.
        deps = jnp.sum(mul0(y, 1 - p), axis=opts.axes) * upcast(g)
        deps = like(deps.astype(eps_in.dtype), eps_in)
    dx, dy = like(dx.astype(x.dtype), x), like(dy.astype(y_in.dtype), y_in)
    return dx, dy, None, deps


_poly_ce.defvjp(_poly_ce_fwd, _poly_ce_bwd)


def _poly_ce_plain(opts, x, y, cmask, eps):
    axes, name = opts.axes, opts.axis_name
    xf = upcast(x, cmask)
    logp = plain_log_softmax(xf, cmask, axes, name)
    y = _poly_labels(y, cmask, xf.dtype)
    y_logp = y * jnp.where((y == 0) & jnp.isinf(logp), 0.0, logp)
    loss = -plain_sum(y_logp, axes, name)
    eps = _poly_eps(opts, eps, xf.dtype)
    loss = loss + eps * plain_sum(y * (1 - jnp.exp(logp)), axes, name)
    return jnp.squeeze(loss, axes)


_POLY_CE = Rule(_poly_ce, _poly_ce_plain, diff=(1, 2, 4))

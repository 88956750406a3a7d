"""Fused linear projection + integer-label cross-entropy for large vocabularies.

The ``[N, V]`` logits ``hidden @ weight + bias`` are never stored: the forward
streams over tiles of (token chunk, vocabulary block) keeping a running max and
sum-exp per token, and the backward recomputes each logits tile to form its
``softmax - target`` block, which is consumed by the two gradient matmuls at once.

Two implementations of that rule sit behind one dispatch point
(:func:`_per_implementation`): ``"xla"``, blocked loops of XLA ops (this module),
and ``"pallas"``, hand-written Triton kernels (:mod:`jaxent._pallas_linear`),
interpreted off GPU. :func:`_materialized` is the same loss on materialized
logits in plain JAX (the reference twin both are tested against).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.typing import ArrayLike

from . import _pallas_linear as kernels
from ._args import (
    as_bool,
    as_float,
    as_int,
    check_fraction,
    check_index,
    check_nonnegative,
    check_reduction,
    describe,
)
from ._define import Rule, loss
from ._numerics import compute_dtype
from ._sharding import vary, vma

# The tiling, the blocked loops and the tile helpers are shared with the fused
# distillation loss (jaxent/_linear_distill.py): see jaxent/_streaming.py.
from ._streaming import TILE_ACCELERATOR as _TILE_ACCELERATOR
from ._streaming import TILE_CPU as _TILE_CPU
from ._streaming import (
    bias_arg,
    check_head,
    online_max_sumexp,
    run_head,
    scale_grads,
    token_weights_arg,
)
from ._streaming import block_size_arg as _block_size
from ._streaming import blocked as _blocked
from ._streaming import blocks as _blocks
from ._streaming import chunk_rows as _chunk_rows
from ._streaming import col_offset as _col_offset
from ._streaming import common_float as _common_float
from ._streaming import forward_grads as _forward_grads
from ._streaming import logits_tile as _logits_tile
from ._streaming import optional_positive as _optional_positive
from ._streaming import per_platform_chunk as _per_platform_chunk
from ._streaming import slice_rows as _slice_rows
from ._streaming import softcap as _softcap
from ._streaming import tile_grads as _tile_grads
from ._streaming import update_rows as _update_rows

IMPLEMENTATIONS = ("xla", "pallas")
# What ``implementation=None`` runs when lowered for CUDA. The kernels are 5-7%
# faster on an H200 (BENCHMARKS.md) but use Pallas's Triton backend, which JAX
# 0.11 deprecates: the XLA path stays the default.
_CUDA_DEFAULT = "xla"


class LinearCrossEntropyAux(NamedTuple):
    """Per-token by-products of :func:`linear_softmax_cross_entropy` with
    ``return_aux=True``, from the same streaming pass (no extra matmul); they
    carry no gradient.

    Attributes:
      lse: log-normalizer ``log sum_c exp(x_c)`` of the final logits (after
        ``bias`` and ``softcap``), ``labels``' shape, float32 (float64 for
        float64 inputs); every token, counted or not.
      argmax: predicted class ``argmax_c x_c``, int32, ``labels``' shape; a
        global class id under ``axis_name``; ties go to the lowest id, a row
        without a finite logit gives 0.
    """

    lse: jax.Array
    argmax: jax.Array


class _Opts(NamedTuple):
    """Static options of the fused kernel (hashable: a ``nondiff_argnums`` entry)."""

    smoothing: float
    z_loss: float
    softcap: float | None
    filter_eps: float | None
    num_classes: int  # global vocabulary size (all shards)
    block_size: tuple[int | None, int] | None  # (block_n, block_v) as given
    implementation: str  # "xla", "pallas" or "auto"
    aux: bool


@loss("hidden", "weight", "class_ids", where="rows")
def linear_softmax_cross_entropy(
    impl,
    hidden: ArrayLike,
    weight: ArrayLike,
    labels: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int | None = -100,
    where: ArrayLike | None = None,
    token_weights: ArrayLike | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    filter_eps: float | None = None,
    reduction: str = "none",
    block_size: int | tuple[int, int] | None = None,
    axis_name: Hashable | None = None,
    implementation: str | None = None,
    low_memory: bool = False,
    return_aux: bool = False,
) -> jax.Array | tuple[jax.Array, LinearCrossEntropyAux]:
    r"""Cross-entropy of ``hidden @ weight + bias`` without materializing the logits.

    With logits :math:`x_i = c \tanh((h_i W + b) / c)` (or :math:`h_i W + b`
    without ``softcap`` :math:`c`) over :math:`V` classes, label :math:`y_i`,
    smoothing :math:`\epsilon` and :math:`\mathrm{lse}_i = \log\sum_k e^{x_{ik}}`:

    .. math::
        \ell_i = (1-\epsilon)(\mathrm{lse}_i - x_{iy_i})
        + \frac{\epsilon}{V}\sum_k (\mathrm{lse}_i - x_{ik})
        + z\,\mathrm{lse}_i^2

    Same values and gradients (w.r.t. ``hidden``, ``weight`` and ``bias``) as
    ``softmax_cross_entropy_with_integer_labels(x, labels, ...)`` on the
    materialized logits with the same options, to floating-point rounding. No
    ``[N, V]`` array exists at any point. Which path runs:

    * ``reduction="sum"`` or ``"mean"`` (the loss is ``sum_i c_i loss_i`` with
      coefficients known in the forward pass): when differentiated, the
      forward streams over token chunks with full vocabulary rows and, per
      chunk, computes the logits (one matmul), the losses and ``G = c_i
      (softmax * (1 + 2 z lse) - Y)`` (times ``1 - tanh^2`` with a softcap),
      then ``d hidden`` of its rows and ``d weight`` (and ``d bias``)
      accumulated in float32; the backward only multiplies by the scalar
      cotangent. Three vocabulary-sized matmuls, as with materialized logits;
      an input that is not differentiated (a frozen head) skips its gradient
      matmul. Temp memory: the float32 ``d weight`` accumulator (one weight's
      size) plus a few float32 chunks of about ``2**22`` logits on CPU
      (``2**26`` on GPU/TPU; ``block_size``'s ``block_n`` fixes the rows),
      whatever the number of tokens. Undifferentiated, one forward pass.
    * ``reduction="none"`` (a per-token cotangent), ``low_memory=True``, or
      ``implementation="pallas"``: the forward streams over tiles of tokens
      by classes with an online max / log-sum-exp and saves only its inputs
      and the per-token ``lse``; the backward recomputes each logits tile,
      forms ``G`` and feeds it to the two gradient matmuls in the input dtype,
      accumulating in float32. Four matmuls, and temp memory of about two
      float32 tiles plus ``O(N D)``, with no weight-sized accumulator.

    Under automatic partitioning (plain ``jax.jit`` with the weight sharded by
    columns) the first path keeps the vocabulary sharded: only per-token
    statistics and ``d hidden`` are all-reduced, and ``d weight`` comes back
    sharded like the weight; the recompute path's vocabulary blocks gather the
    weight there (use ``axis_name`` or explicit sharding for it). Under
    ``jax.checkpoint`` the first path's forward keeps only its logits matmul
    and the backward runs the whole pass again: 4 matmuls (5 with
    ``low_memory=True``), and the weight-sized accumulator lives in the
    backward.

    Which implementation of the recompute path:

    * ``"xla"``: blocked loops of XLA ops (tiles of ``block_size``). Any float
      dtype, differentiable twice; on a GPU it runs the extra recomputation
      matmul and writes float32 tiles between the matmuls (H200, N=8192,
      D=4096, V=128256 bf16: 63.4 ms against 33.0 ms for the three bare
      matmuls and 38.6 ms for materialized logits, at 7% of their memory).
    * ``"pallas"``: hand-written Triton kernels (forward; ``d hidden``; ``d
      weight``, in ``jaxent/_pallas_linear.py``) that keep every logits tile
      on chip. float32, bfloat16 and float16 only. On CUDA they are compiled;
      on any other platform (CPU included) the same kernels run in Pallas
      interpret mode, which is slow and meant for tests (and, in JAX 0.10,
      fails inside ``shard_map`` with ``check_vma=True``: the interpreter
      mixes varying and invariant values; the compiled kernels do not).
      On an H200, 5-7% faster than ``"xla"`` (60.0 ms at the shape above,
      the same temp memory); built on Pallas's Triton backend, which JAX 0.11
      deprecates.
    * ``None``: the fastest correct path for the platform the program is
      lowered for (a lowering-time choice, so ahead-of-time exports get the
      target's path): ``"xla"`` everywhere (see ``"pallas"`` for why).

    Args:
      hidden: floating array ``[..., D]`` (``N`` = product of the leading dims).
      weight: floating array ``[D, V]`` (``[D, V / shards]`` with
        ``axis_name``). A tied ``[V, D]`` embedding is passed as
        ``embedding.T``.
      labels: integer array ``[...]`` (``hidden``'s leading shape) of class
        indices in ``[0, V)``; global ids when vocab-parallel.
      bias: optional floating array ``[V]`` (sharded like ``weight``'s columns).
      ignore_index: label value whose examples are not counted (loss and
        gradient 0, excluded from the mean's denominator); ``-100`` as in
        PyTorch, ``None`` to count every example.
      where: optional boolean array of ``labels``' shape; ``False`` excludes that
        example like ``ignore_index``.
      token_weights: optional floating array of ``labels``' shape, any sign
        (sample weights, per-token advantages): each counted example's loss is
        multiplied by its weight; ``"mean"`` still divides by the number of
        counted examples (not by the weights' sum). It receives no gradient.
      label_smoothing: ``epsilon`` in ``[0, 1]``: mass spread uniformly over the
        ``V`` classes.
      z_loss: coefficient of the ``lse**2`` penalty (>= 0).
      softcap: optional ``c > 0``: logits become ``c * tanh(logits / c)`` (after
        the bias) before the softmax, as in Gemma 2; a ``-inf`` logit (masked
        class) stays ``-inf``.
      filter_eps: optional ``eps > 0``, Cut Cross-Entropy's gradient filtering:
        the backward drops every entry of ``d loss_i / d x_ik`` (the per-example
        derivative, before the cotangent and the softcap factor) whose magnitude
        is below ``eps``, and skips the matmuls of a tile where all are dropped.
        It approximates the gradient (the loss is exact): each entry of ``d
        hidden`` moves by at most ``eps * |g_i| * sum_k |w_dk|`` and of ``d
        weight`` by ``eps * sum_i |g_i h_id|``, tiny once the softmax is peaked
        (a trained model). The time saved grows with the tiles skipped: the
        XLA path's default tiles are large and seldom all below ``eps``, the
        Pallas default backward multiplies the dropped zeros, and only the
        small tiles of its ``BACKWARD="fused"`` kernels gained on an H200
        (BENCHMARKS.md).
      reduction: ``"none"`` (per example), ``"sum"`` or ``"mean"`` (over counted
        examples; 0 when none is counted).
      block_size: vocabulary block width ``block_v``, or a pair ``(block_n,
        block_v)`` to also fix the token chunk. For ``"xla"``, ``None`` picks
        tiles of about ``T`` logits, the fastest measured: ``T = 2**20`` (4 MiB
        in float32) on CPU, ``2**24`` on GPU/TPU where each loop step has a
        fixed cost; ``block_v = min(V, max(2048, T // N))`` and ``block_n =
        min(N, T // block_v)``; with ``block_v`` alone, ``block_n`` is derived
        the same way. Compiled temp memory is then about two float32 tiles plus
        ``O(N D)``, whatever ``N x V``. For ``"pallas"`` the sizes are the
        kernels' tiles and must be powers of two >= 16 (default ``(64,
        128)``); shapes need not be multiples of them.
      axis_name: mesh axis over which ``weight`` (and ``bias``) are sharded by
        columns, when called inside ``shard_map`` (vocab-parallel). The loss is
        the exact global one, using ``O(N)`` collectives (``pmax`` of the max,
        ``psum`` of the sum-exp, target logit and smoothing sum); the backward
        needs only a ``psum`` of ``d hidden`` (``[N, D]``).
      implementation: ``"xla"``, ``"pallas"`` or ``None`` (see above). With
        ``None``, inputs the kernels do not take run on ``"xla"``; with
        ``"pallas"`` they raise a ValueError naming the argument.
      low_memory: with ``"sum"``/``"mean"``, trade time for memory: the
        recompute path (one more matmul, no weight-sized float32 accumulator).
      return_aux: also return a :class:`jaxent.LinearCrossEntropyAux` of per-token
        ``lse`` and ``argmax``.

    Returns:
      per-example losses of ``labels``' shape for ``reduction="none"``, else a
      scalar; in the dtype of ``hidden``, ``weight`` and ``bias`` promoted, and
      float32 for half-precision inputs (computed and reduced in float32; the
      gradients keep the inputs' dtypes). With ``return_aux``, the pair
      ``(loss, aux)``.

    Example:
      >>> import jax.numpy as jnp, jaxent
      >>> h = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
      >>> jaxent.linear_softmax_cross_entropy(h, w, jnp.array([0, 2])).round(4)
      Array([0.2395, 0.5514], dtype=float32)
      >>> loss, aux = jaxent.linear_softmax_cross_entropy(
      ...     h, w, jnp.array([0, 2]), softcap=1.0, return_aux=True
      ... )
      >>> loss.round(4), aux.argmax
      (Array([0.5669, 0.6595], dtype=float32), Array([0, 2], dtype=int32))

    Note:
      Logits follow the library's conventions: ``-inf`` bias entries are masked
      classes; ``+inf``/NaN in a row give NaN for it (with a softcap, ``+inf``
      becomes ``c``); an out-of-range label (not ``ignore_index``) gives NaN for
      that example's loss and gradients (and hence NaN in ``d weight``, as with
      materialized logits); the ``argmax`` of a row holding NaN is unspecified.
      Being a ``jax.custom_vjp``, it cannot be used with ``jax.jvp``/
      ``jax.jacfwd``; the backward can be differentiated again in reverse mode
      (it is plain JAX on ``"xla"``; the Pallas kernels have no derivative of
      their own, so a second-order derivative of ``"pallas"`` differentiates
      the XLA loops, which compute the same function). For forward mode, use
      ``jaxent.reference.linear_softmax_cross_entropy``.
    """
    fn = "linear_softmax_cross_entropy"
    h = as_float(fn, "hidden", hidden)
    w = as_float(fn, "weight", weight)
    y = as_int(fn, "labels", labels)
    reduction = check_reduction(fn, reduction)
    smoothing = check_fraction(fn, "label_smoothing", label_smoothing)
    z = check_nonnegative(fn, "z_loss", z_loss)
    cap = _optional_positive(fn, "softcap", softcap)
    eps = _optional_positive(fn, "filter_eps", filter_eps)
    for name, flag in (("return_aux", return_aux), ("low_memory", low_memory)):
        if not isinstance(flag, bool | np.bool_):
            raise TypeError(f"{fn}: `{name}` must be a bool; got {flag!r}.")
    _check_shapes(fn, h, w, y)
    dtype = _common_float(h.dtype, w.dtype)
    b = bias_arg(fn, "bias", bias, w.shape[1])
    if b is not None:
        dtype = _common_float(dtype, b.dtype)
        b = b.astype(dtype)
    counted = jnp.ones(y.shape, bool)
    ignore_index = check_index(fn, "ignore_index", ignore_index)
    if ignore_index is not None:
        counted = y != ignore_index
    if where is not None:
        where = as_bool(fn, "where", where)
        if where.shape != y.shape:
            raise ValueError(
                f"{fn}: `where` must have labels' shape {y.shape}; "
                f"got {describe(where)}."
            )
        counted = counted & where
    tw = token_weights_arg(fn, token_weights, y.shape)
    blocks = _block_size(fn, block_size)

    n, (d, v_local) = int(np.prod(y.shape)), w.shape
    chosen = _choose(fn, implementation, dtype, n, d, v_local, blocks)
    num_classes = v_local * (1 if axis_name is None else lax.axis_size(axis_name))
    opts = _Opts(smoothing, z, cap, eps, num_classes, blocks, chosen, bool(return_aux))
    batch, y = y.shape, y.reshape(n)
    # Labels outside [0, V) are flagged before narrowing to int32, so that a
    # wrapped int64 value cannot land on a real class.
    in_range = (y >= 0) & (y < num_classes)
    y32 = jnp.where(in_range, y, -1).astype(jnp.int32)
    params = (h.astype(dtype).reshape(n, d), w.astype(dtype), b)
    rest = (y32, counted.reshape(n), in_range)
    out, aux = run_head(
        impl,
        (_LINEAR_SUM, _LINEAR),
        (*params, *rest),
        _LAYOUT,
        opts,
        axis_name=axis_name,
        reduction=reduction,
        # The Pallas kernels implement the recompute path.
        recompute=low_memory or chosen != "xla",
        counted=counted,
        token_weights=tw,
        acc=compute_dtype(dtype),
        aux=True,
    )
    if not return_aux:
        return out
    lse, argmax = (lax.stop_gradient(a).reshape(batch) for a in aux)
    return out, LinearCrossEntropyAux(lse, argmax)


# Layouts of the kernel's arrays (h, w, b, labels, counted, in_range) for
# :func:`jaxent._streaming.partitioned`.
_LAYOUT = ("hidden", "weight", "bias", "tokens", "tokens", "tokens")


def _check_shapes(fn: str, h, w, y) -> None:
    check_head(fn, h, w)
    if y.shape != h.shape[:-1]:
        raise ValueError(
            f"{fn}: `labels` must have hidden's leading shape {h.shape[:-1]}; "
            f"got {describe(y)}."
        )


def _choose(fn: str, implementation, dtype, n: int, d: int, v: int, blocks) -> str:
    """``"xla"``, ``"pallas"`` or ``"auto"`` (decided at lowering)."""
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"{fn}: `implementation` must be None, 'xla' or 'pallas'; got "
            f"{implementation!r}."
        )
    if implementation == "xla":
        return "xla"
    why = kernels.unsupported(dtype, n, d, v, blocks)
    if implementation == "pallas":
        if why is not None:
            raise ValueError(f"{fn}: implementation='pallas' {why}.")
        return "pallas"
    return "auto" if _CUDA_DEFAULT == "pallas" and why is None else "xla"


def _targets(opts: _Opts) -> tuple[float, float]:
    """Target weights ``(on, off)`` of the label's class and of every other."""
    off = opts.smoothing / opts.num_classes
    return (1 - opts.smoothing) + off, off


def _kernel_options(opts: _Opts) -> kernels.Options:
    return kernels.Options(
        z_loss=opts.z_loss,
        smoothing=opts.smoothing,
        num_classes=opts.num_classes,
        softcap=opts.softcap,
        filter_eps=opts.filter_eps,
        want_xsum=opts.smoothing > 0 and opts.softcap is not None,
        want_argmax=opts.aux,
    )


# -- the dispatch point ----------------------------------------------------------


def _per_implementation(opts: _Opts, xla_fn, pallas_fn, *args):
    """``xla_fn(*args, tile=...)`` or ``pallas_fn(*args, interpret=...)``, the
    choice (and the XLA tile, and whether the kernels are compiled) made for
    the platform the program is lowered for. With one lowering platform the
    other branches are pruned then."""
    xla_cpu = functools.partial(xla_fn, tile=_TILE_CPU)
    xla_other = functools.partial(xla_fn, tile=_TILE_ACCELERATOR)
    compiled = functools.partial(pallas_fn, interpret=False)
    interpreted = functools.partial(pallas_fn, interpret=True)
    if opts.implementation == "xla":
        return lax.platform_dependent(*args, cpu=xla_cpu, default=xla_other)
    if opts.implementation == "pallas":
        return lax.platform_dependent(*args, cuda=compiled, default=interpreted)
    return lax.platform_dependent(*args, cpu=xla_cpu, cuda=compiled, default=xla_other)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused(h, w, b, y, counted, in_range, axis_name, opts):
    return _fused_fwd(h, w, b, y, counted, in_range, axis_name, opts)[0]


def _fused_fwd(h, w, b, y, counted, in_range, axis_name, opts: _Opts):
    offset = _col_offset(axis_name, w.shape[1])
    stats = _per_implementation(
        opts,
        functools.partial(_xla_stats, opts=opts),
        functools.partial(_pallas_stats, opts=opts),
        h,
        w,
        b,
        y - offset,
    )
    loss, lse, am = _finish(stats, h, w, b, counted, in_range, axis_name, opts)
    out = (loss, (lse, am) if opts.aux else None)
    return out, (h, w, b, y, counted, in_range, lse)


def _finish(stats, h, w, b, counted, in_range, axis_name, opts: _Opts):
    """Per-example losses, ``lse`` and argmax (global ids) from the per-token
    statistics of this shard's columns (argmax in local ids)."""
    m, s, t, xs, am = stats
    if am is not None:
        am = am + _col_offset(axis_name, w.shape[1])
    if axis_name is not None:
        m, s, t, xs, am = kernels.combine(m, s, t, xs, am, axis_name)
    shift = jnp.where(m == -jnp.inf, 0.0, m)
    # No admissible class (all -inf): normalizer 0, as in the core losses.
    lse = jnp.where(s == 0, 0.0, shift + jnp.log(s))

    eps = opts.smoothing
    loss = lse + opts.z_loss * lse**2 if opts.z_loss else lse
    if eps < 1:
        loss = loss - (1 - eps) * t
    if eps > 0:
        if xs is None:
            # sum_k x_ik = h_i . rowsum(W) + sum(b): no pass over the logits.
            acc = compute_dtype(h.dtype)
            xs = h.astype(acc) @ jnp.sum(w, axis=1, dtype=acc)
            if b is not None:
                xs = xs + jnp.sum(b, dtype=acc)
            if axis_name is not None:
                xs = lax.psum(xs, axis_name)
        loss = loss - (eps / opts.num_classes) * xs
    loss = jnp.where(counted, jnp.where(in_range, loss, jnp.nan), 0.0)
    return loss, lse, am


def _fused_bwd(axis_name, opts: _Opts, res, cts):
    h, w, b, y, counted, in_range, lse = res
    g = cts[0]
    acc = compute_dtype(h.dtype)
    g = jnp.where(counted, jnp.where(in_range, g.astype(acc), jnp.nan), 0.0)
    y = y - _col_offset(axis_name, w.shape[1])
    dh, dw, db = _per_implementation(
        opts,
        functools.partial(_xla_grads, opts=opts),
        functools.partial(_pallas_grads, opts=opts),
        h,
        w,
        b,
        y,
        lse,
        g,
    )
    if axis_name is not None:
        # Each shard holds the part of d hidden from its own columns.
        dh = lax.psum(dh, axis_name)
    db = None if b is None else db.astype(b.dtype)
    return dh.astype(h.dtype), dw.astype(w.dtype), db, None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _fused_sum(h, w, b, y, counted, in_range, coef, axis_name, opts):
    """``sum_i coef_i loss_i`` (and the aux outputs) of :func:`_fused`'s
    per-token losses. Undifferentiated, one forward pass; differentiated, the
    gradients are formed in the forward pass (three matmuls) and the backward
    only scales them by the cotangent."""
    loss, aux = _fused_fwd(h, w, b, y, counted, in_range, axis_name, opts)[0]
    return jnp.sum(coef.astype(loss.dtype) * loss), aux


def _fused_sum_fwd(h, w, b, y, counted, in_range, coef, axis_name, opts: _Opts):
    # symbolic_zeros: each array comes with whether it is differentiated.
    need = (h.perturbed, w.perturbed, b is not None and b.perturbed)
    h, w, b, y, counted, in_range, coef = (
        None if a is None else a.value for a in (h, w, b, y, counted, in_range, coef)
    )
    sums = functools.partial(_xla_sum_grads, axis_name=axis_name, opts=opts, need=need)
    y_local = y - _col_offset(axis_name, w.shape[1])
    loss, aux, dh, dw, db = _per_platform_chunk(
        sums, h, w, b, y_local, counted, in_range, coef
    )
    if dh is not None and axis_name is not None:
        # Each shard holds the part of d hidden from its own columns.
        dh = lax.psum(dh, axis_name)
    out = (jnp.sum(coef.astype(loss.dtype) * loss), aux)
    grads = tuple(
        None if g is None else g.astype(a.dtype)
        for g, a in zip((dh, dw, db), (h, w, b), strict=True)
    )
    return out, grads


def _fused_sum_bwd(axis_name, opts: _Opts, grads, cts):
    return (*scale_grads(grads, cts[0]), None, None, None, None)


_fused_sum.defvjp(_fused_sum_fwd, _fused_sum_bwd, symbolic_zeros=True)


# -- "xla": blocked loops of XLA ops --------------------------------------------


def _xla_stats(h, w, b, y, *, opts: _Opts, tile: int):
    """Per-token ``(max, sum-exp, target logit, sum of logits or None, argmax
    or None)`` over this shard's columns (local ids), streamed over tiles."""
    n, v = h.shape[0], w.shape[1]
    acc = compute_dtype(h.dtype)
    block_n, block_v = _blocks(opts.block_size, n, v, tile)
    want_xsum = opts.smoothing > 0 and opts.softcap is not None

    def vocab_block(c0, cw, carry):
        def token_chunk(r0, rn, carry):
            _, _, x = _logits_tile(h, w, b, r0, rn, c0, cw, acc)
            if opts.softcap is not None:
                x = _softcap(x, opts.softcap)[0]
            (yb,) = _slice_rows((y,), r0, rn)
            mb, sb, tb, xb, ab = _slice_rows(carry, r0, rn)
            m_new, sb, bm = online_max_sumexp(mb, sb, x)
            cols = c0 + lax.broadcasted_iota(jnp.int32, (1, cw), 1)
            tb = tb + jnp.sum(jnp.where(cols == yb[:, None], x, 0.0), 1)
            if xb is not None:
                xb = xb + jnp.sum(x, 1)
            if ab is not None:
                # Blocks come in increasing column order: a tie keeps the earlier.
                arg = c0 + jnp.argmax(x, axis=1).astype(jnp.int32)
                ab = jnp.where(bm > mb, arg, ab)
            return _update_rows(carry, (m_new, sb, tb, xb, ab), r0)

        return _blocked(n, block_n, token_chunk, carry)

    axes = vma(h) | vma(w)
    zeros = jnp.zeros((n,), acc)
    init = (
        jnp.full((n,), -jnp.inf, acc),
        zeros,
        zeros,
        zeros if want_xsum else None,
        jnp.zeros((n,), jnp.int32) if opts.aux else None,
    )
    init = tuple(None if a is None else vary(a, axes) for a in init)
    return _blocked(v, block_v, vocab_block, init)


def _xla_grads(h, w, b, y, lse, g, *, opts: _Opts, tile: int):
    """``(d hidden in the compute dtype, d weight, d bias)`` from recomputed
    tiles; ``g`` is the per-example cotangent (0 where not counted)."""
    (n, d), v = h.shape, w.shape[1]
    acc = compute_dtype(h.dtype)
    block_n, block_v = _blocks(opts.block_size, n, v, tile)
    axes = vma(h) | vma(w)
    rows = (y, lse, g)

    def vocab_block(c0, cw, carry):
        dh, dw, db = carry

        def token_chunk(r0, rn, inner):
            hb, wb, x = _logits_tile(h, w, b, r0, rn, c0, cw, acc)
            th = None
            if opts.softcap is not None:
                x, th = _softcap(x, opts.softcap)
            yb, lb, gb = (a[:, None] for a in _slice_rows(rows, r0, rn))
            cols = c0 + lax.broadcasted_iota(jnp.int32, (1, cw), 1)
            gx, kept = _logits_grad(x, th, cols == yb, lb, gb, opts)
            # The matmuls run in the input dtype (bf16 stays bf16) with
            # accumulation in `acc`.
            gx = gx.astype(h.dtype)

            def update(inner):
                return _tile_grads(gx, hb, wb, r0, inner, acc)

            if kept is None:
                return update(inner)
            return lax.cond(kept, update, lambda c: c, inner)

        init = (
            dh,
            vary(jnp.zeros((d, cw), acc), axes),
            None if b is None else vary(jnp.zeros((cw,), acc), axes),
        )
        dh, dwb, dbb = _blocked(n, block_n, token_chunk, init)
        dw = lax.dynamic_update_slice_in_dim(dw, dwb.astype(w.dtype), c0, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, dbb.astype(b.dtype), c0, 0)
        return dh, dw, db

    init = (
        vary(jnp.zeros((n, d), acc), axes),
        vary(jnp.zeros_like(w), axes),
        None if b is None else vary(jnp.zeros_like(b), axes),
    )
    return _blocked(v, block_v, vocab_block, init)


def _logits_grad(x, th, hit, lse, g, opts: _Opts):
    """``g_i d loss_i / d x_ik = g_i (p_ik (1 + 2 z lse_i) - Y_ik)`` of a tile of
    (capped) logits ``x``, times ``1 - tanh^2`` with a softcap (``th`` the
    tile's tanh, else None); ``hit`` marks the labels' entries, ``lse`` and
    ``g`` are ``[rows, 1]``. With ``filter_eps`` the entries of ``d loss_i /
    d x_ik`` below it are dropped, and the second result says whether any is
    kept (else None)."""
    on, off = _targets(opts)
    p = jnp.exp(x - lse)
    scale = 1 + 2 * opts.z_loss * lse if opts.z_loss else None
    kept = None
    if opts.filter_eps is not None:
        # d loss_i / d x_ik is formed (and filtered) before g scales it.
        g0 = (p if scale is None else p * scale) - jnp.where(hit, on, off)
        keep = jnp.logical_not(jnp.abs(g0) < opts.filter_eps)
        gx = jnp.where(keep, g0, 0.0) * g
        kept = jnp.any(keep)
    else:
        gx = p * (g if scale is None else g * scale) - jnp.where(hit, g * on, g * off)
    if th is not None:
        gx = gx * (1 - th * th)
    return gx, kept


# -- "xla", gradient in the forward pass: token chunks of full rows ------------


def _xla_sum_grads(
    h, w, b, y, counted, in_range, coef, *, axis_name, opts, need, budget
):
    """``(losses, aux, dh, dw, db)`` of ``sum_i coef_i loss_i`` in one pass over
    token chunks with full rows of this shard's columns (``y`` in local ids):
    per-token losses and ``aux`` as in :func:`_finish`, gradients as in
    :func:`jaxent._streaming.forward_grads` (None where not in ``need``)."""
    n, v = h.shape[0], w.shape[1]
    acc = compute_dtype(h.dtype)
    g = jnp.where(counted, jnp.where(in_range, coef.astype(acc), jnp.nan), 0.0)

    def chunk(x, hb, r0, rn, rows):
        yb, cb, ib, gb = rows
        th = None
        if opts.softcap is not None:
            x, th = _softcap(x, opts.softcap)
        m, s, _ = online_max_sumexp(jnp.full((rn,), -jnp.inf, acc), 0.0, x)
        hit = lax.broadcasted_iota(jnp.int32, (1, v), 1) == yb[:, None]
        t = jnp.sum(jnp.where(hit, x, 0.0), 1)
        xs = jnp.sum(x, 1) if opts.smoothing > 0 else None
        am = jnp.argmax(x, axis=1).astype(jnp.int32) if opts.aux else None
        stats = (m, s, t, xs, am)
        loss, lse, am = _finish(stats, hb, w, b, cb, ib, axis_name, opts)
        gx, _ = _logits_grad(x, th, hit, lse[:, None], gb[:, None], opts)
        return gx, (loss, lse, am)

    outs = (
        jnp.zeros((n,), acc),
        jnp.zeros((n,), acc),
        jnp.zeros((n,), jnp.int32) if opts.aux else None,
    )
    (loss, lse, am), dh, dw, db = _forward_grads(
        h,
        w,
        b,
        (y, counted, in_range, g),
        outs,
        chunk,
        block_n=_chunk_rows(opts.block_size, n, v, budget),
        need=need,
        dh_dtype=h.dtype if axis_name is None else acc,
    )
    return loss, (lse, am) if opts.aux else None, dh, dw, db


# -- "pallas": the Triton kernels of _pallas_linear ------------------------------


def _pallas_stats(h, w, b, y, *, opts: _Opts, interpret: bool):
    return _kernel_stats(opts, interpret, h, w, b, y)


# The kernels have no derivative of their own. A second-order derivative
# (differentiating the forward's statistics and the backward, as JAX does for a
# custom_vjp's rules) goes through the XLA loops, which compute the same
# functions: these custom_jvp rules say so.


def _xla_tile(interpret: bool) -> int:
    return _TILE_CPU if interpret else _TILE_ACCELERATOR


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _kernel_stats(opts: _Opts, interpret: bool, h, w, b, y):
    """Per-token statistics from the Pallas forward kernel."""
    if h.shape[0] == 0:
        empty = jnp.zeros((0,), jnp.float32)
        am = jnp.zeros((0,), jnp.int32) if opts.aux else None
        xs = empty if _kernel_options(opts).want_xsum else None
        return empty, empty, empty, xs, am
    t = kernels.tiles(h.shape[0], w.shape[1], h.shape[1], opts.block_size)
    o = _kernel_options(opts)
    return kernels.row_stats(h, w, b, y, o, t, interpret=interpret)


@_kernel_stats.defjvp
def _kernel_stats_jvp(opts: _Opts, interpret: bool, primals, tangents):
    xla = functools.partial(_xla_stats, opts=opts, tile=_xla_tile(interpret))
    return jax.jvp(xla, primals, tangents)


def _pallas_grads(h, w, b, y, lse, g, *, opts: _Opts, interpret: bool):
    return _kernel_grads(opts, interpret, h, w, b, y, lse, g)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _kernel_grads(opts: _Opts, interpret: bool, h, w, b, y, lse, g):
    """``(d hidden, d weight, d bias)`` from the Pallas kernels."""
    (n, d), v = h.shape, w.shape[1]
    if n == 0:
        db = None if b is None else jnp.zeros_like(b)
        return jnp.zeros((0, d), jnp.float32), jnp.zeros_like(w), db
    t = kernels.tiles(n, v, d, opts.block_size)
    o = _kernel_options(opts)
    lse, g = lse.astype(jnp.float32), g.astype(jnp.float32)
    if kernels.BACKWARD == "tiles":
        return _tiles_grads(h, w, b, y, lse, g, o, t, interpret)
    dh = kernels.grad_hidden(h, w, b, y, lse, g, o, t, interpret=interpret)
    chunk = kernels.dw_chunk(d, v, w.dtype, t.block_v)
    if chunk >= v:
        dw, db = kernels.grad_weight(h, w, b, y, lse, g, o, t, interpret=interpret)
        return dh, dw.astype(w.dtype), None if b is None else db.astype(b.dtype)

    # A narrow d weight is accumulated in float32 one vocabulary chunk at a time.
    def part(c0, cw, carry):
        dw, db = carry
        wc = lax.dynamic_slice_in_dim(w, c0, cw, 1)
        bc = None if b is None else lax.dynamic_slice_in_dim(b, c0, cw)
        yc = y - jnp.asarray(c0, y.dtype)
        dwc, dbc = kernels.grad_weight(h, wc, bc, yc, lse, g, o, t, interpret=interpret)
        dw = lax.dynamic_update_slice_in_dim(dw, dwc.astype(w.dtype), c0, 1)
        if db is not None:
            db = lax.dynamic_update_slice_in_dim(db, dbc, c0, 0)
        return dw, db

    axes = vma(h) | vma(w)
    init = (
        vary(jnp.zeros_like(w), axes),
        None if b is None else vary(jnp.zeros(b.shape, jnp.float32), axes),
    )
    dw, db = _blocked(v, chunk, part, init)
    return dh, dw, None if b is None else db.astype(b.dtype)


def _tiles_grads(h, w, b, y, lse, g, o, t, interpret):
    """The "tiles" backward: per vocabulary chunk, the kernel writes G for all
    tokens and XLA's matmuls (float32 accumulation) consume it."""
    (n, d), v = h.shape, w.shape[1]
    chunk = kernels.g_chunk(n, v, h.dtype, t.block_v)

    def part(c0, cw, carry):
        dh, dw, db = carry
        wc = lax.dynamic_slice_in_dim(w, c0, cw, 1)
        bc = None if b is None else lax.dynamic_slice_in_dim(b, c0, cw)
        yc = y - jnp.asarray(c0, y.dtype)
        gc = kernels.grad_logits(h, wc, bc, yc, lse, g, o, t, interpret=interpret)
        dh = dh + jnp.matmul(gc, wc.T, preferred_element_type=jnp.float32)
        dwc = jnp.matmul(h.T, gc, preferred_element_type=jnp.float32)
        dw = lax.dynamic_update_slice_in_dim(dw, dwc.astype(w.dtype), c0, 1)
        if db is not None:
            dbc = jnp.sum(gc, axis=0, dtype=jnp.float32).astype(b.dtype)
            db = lax.dynamic_update_slice_in_dim(db, dbc, c0, 0)
        return dh, dw, db

    axes = vma(h) | vma(w)
    init = (
        vary(jnp.zeros((n, d), jnp.float32), axes),
        vary(jnp.zeros_like(w), axes),
        None if b is None else vary(jnp.zeros_like(b), axes),
    )
    return _blocked(v, chunk, part, init)


@_kernel_grads.defjvp
def _kernel_grads_jvp(opts: _Opts, interpret: bool, primals, tangents):
    xla = functools.partial(_xla_grads, opts=opts, tile=_xla_tile(interpret))
    return jax.jvp(xla, primals, tangents)


# -- the plain twin: materialized logits, plain autodiff --------------------------


def _materialized(h, w, b, y, counted, in_range, axis_name, opts: _Opts):
    """The loss of :func:`_fused` on materialized ``[N, V]`` logits in plain JAX
    (no ``custom_vjp``; forward mode works), with the same outputs.

    ``filter_eps`` is applied by substitution: dropped logits enter the loss
    through ``stop_gradient``, so the value is exact and the gradient has the
    dropped entries of ``d loss / d x`` at zero.
    """
    acc = compute_dtype(h.dtype)
    v = w.shape[1]
    x = jnp.matmul(h, w, preferred_element_type=acc)
    if b is not None:
        x = x + b.astype(acc)
    if opts.softcap is not None:
        x = _softcap(x, opts.softcap)[0]
    cols = _col_offset(axis_name, v) + jnp.arange(v, dtype=jnp.int32)
    hit = cols[None, :] == y[:, None]
    total = (lambda a: a) if axis_name is None else (lambda a: lax.psum(a, axis_name))

    def normalizer(x):
        m = jnp.max(x, axis=1)
        if axis_name is not None:
            m = lax.pmax(m, axis_name)
        m = lax.stop_gradient(jnp.where(m == -jnp.inf, 0.0, m))
        s = total(jnp.sum(jnp.exp(x - m[:, None]), axis=1))
        return m + jnp.log(jnp.where(s == 0, 1.0, s))

    lse = normalizer(x)
    if opts.filter_eps is not None:
        on0, off0 = _targets(opts)
        ls = lax.stop_gradient(lse)[:, None]
        g0 = jnp.exp(lax.stop_gradient(x) - ls) * (1 + 2 * opts.z_loss * ls)
        g0 = g0 - jnp.where(hit, on0, off0)
        keep = jnp.logical_not(jnp.abs(g0) < opts.filter_eps)
        x = jnp.where(keep, x, lax.stop_gradient(x))
        lse = normalizer(x)
    eps = opts.smoothing
    loss = lse + opts.z_loss * lse**2
    loss = loss - (1 - eps) * total(jnp.sum(jnp.where(hit, x, 0.0), axis=1))
    if eps > 0:
        loss = loss - (eps / opts.num_classes) * total(jnp.sum(x, axis=1))
    loss = jnp.where(counted, jnp.where(in_range, loss, jnp.nan), 0.0)
    aux = None
    if opts.aux:
        am = jnp.argmax(x, axis=1).astype(jnp.int32) + _col_offset(axis_name, v)
        if axis_name is not None:
            m = jnp.max(x, axis=1)
            am = kernels.global_argmax(m, lax.pmax(m, axis_name), am, axis_name)
        aux = (lax.stop_gradient(lse), am)
    return loss, aux


def _materialized_sum(h, w, b, y, counted, in_range, coef, axis_name, opts: _Opts):
    """:func:`_fused_sum` on materialized logits in plain JAX."""
    loss, aux = _materialized(h, w, b, y, counted, in_range, axis_name, opts)
    return jnp.sum(coef.astype(loss.dtype) * loss), aux


_LINEAR = Rule(_fused, _materialized, diff=(0, 1, 2), exclude=6)
_LINEAR_SUM = Rule(
    # Under jit: eager shard_map does not take custom_vjp's symbolic_zeros.
    jax.jit(_fused_sum, static_argnums=(7, 8)),
    _materialized_sum,
    diff=(0, 1, 2),
    exclude=7,
)

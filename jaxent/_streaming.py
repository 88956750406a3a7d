"""The streaming engine of the fused linear heads: one set of tiles, two losses.

:func:`jaxent.linear_softmax_cross_entropy` (``_linear.py``) and
:func:`jaxent.linear_softmax_distillation` (``_linear_distill.py``) never build
their ``[N, V]`` logits: they loop over (token chunk x vocabulary block) tiles,
compute each tile ``h[rows] @ w[:, cols] (+ b[cols])`` with float32 accumulation,
keep per-token running statistics (an online max / sum-exp) and, in the
backward, recompute each tile to feed its logits gradient to the two gradient
matmuls. This module holds what both share: argument checks of the options that
choose the tiling, the tile-size choice (made at lowering, per platform), the
blocked loops, the tile and row-slice helpers, the online max / sum-exp, the
vocab-parallel column offset and the explicit-sharding partitioning.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.sharding import PartitionSpec

from ._args import as_bool, as_float, as_int, check_positive, describe
from ._numerics import compute_dtype
from ._reduction import reduce_loss
from ._sharding import is_sharded, replicated, reshard, spec, vary, vma

# Default tiling of the "xla" implementation, measured with
# benchmarks/linear_ce.py --sweep (forward + backward). CPU, N=2048, D=256,
# V=32768 float32: tiles of 2^20 logits run within ~2% of tiles of 2^21 and below
# the materialized path's time; at a given tile size 2048-column vocab blocks are
# the fastest shape (512 columns ~14% slower, 8192 ~8%). H100, N=8192, D=4096,
# V=128256 bfloat16: each loop step costs a fixed overhead, so tiles of 2^24
# logits (8192 x 2048: 64 ms) beat 2^20 (157 ms) while 2^25 gains only 3%.
# Compiled temp memory is about two float32 tiles (the backward's logits and
# their gradient) plus O(N D). The tile is chosen when the program is lowered
# (``lax.platform_dependent``), not from the tracing host's backend.
TILE_CPU = 2**20
TILE_ACCELERATOR = 2**24
BLOCK_V = 2048
# Default token chunk of the gradient-in-forward path (:func:`forward_grads`),
# in logits per chunk (rows x this shard's vocabulary): a budget that does not
# grow with the number of tokens. Temp memory is the float32 ``d weight``
# accumulator (one weight's size) plus a few float32 chunks. CPU: N=2048,
# D=256, V=32768 float32, chunks of 2^22 logits (128 rows) run below the
# materialized path's time; GPU/TPU: 2^26 (512 rows of a 128k vocabulary), so
# that the accumulator's read-modify-write per chunk stays small against the
# chunk's matmuls (chosen, not measured on a GPU).
CHUNK_CPU = 2**22
CHUNK_ACCELERATOR = 2**26


# -- arguments -------------------------------------------------------------------


def optional_positive(fn: str, name: str, value) -> float | None:
    """None, or a static finite Python float > 0."""
    return None if value is None else check_positive(fn, name, value)


def block_size_arg(fn: str, block_size) -> tuple[int | None, int] | None:
    """``block_size`` as ``(block_n or None, block_v)`` (None: the defaults)."""
    if block_size is None:
        return None
    sizes = (block_size,) if np.ndim(block_size) == 0 else tuple(block_size)
    try:
        sizes = tuple(operator.index(s) for s in sizes)
    except TypeError:
        sizes = ()
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ValueError(
            f"{fn}: `block_size` must be a positive int or a pair of positive "
            f"ints (block_n, block_v); got {block_size!r}."
        )
    return (None, *sizes) if len(sizes) == 1 else sizes


def token_weights_arg(fn: str, token_weights, shape: tuple[int, ...]):
    """``token_weights`` as a floating array of the tokens' ``shape`` (None
    kept), cut from differentiation: it receives no gradient."""
    if token_weights is None:
        return None
    tw = as_float(fn, "token_weights", token_weights)
    if tw.shape != shape:
        raise ValueError(
            f"{fn}: `token_weights` must have the tokens' shape {shape}; got "
            f"{describe(tw)}."
        )
    return lax.stop_gradient(tw)


def token_coefficients(counted, token_weights, reduction: str, dtype):
    """Each token's coefficient ``c_i`` in a scalar reduction ``sum_i c_i
    loss_i``: ``counted`` (times ``token_weights``), over the number of counted
    tokens for ``"mean"`` (all 0 when none is counted)."""
    coef = counted.astype(dtype)
    if token_weights is not None:
        # An excluded token's weight (padding: any value) is never used.
        coef = jnp.where(counted, token_weights.astype(dtype), 0.0)
    if reduction == "mean":
        coef = coef / jnp.maximum(jnp.sum(counted), 1).astype(dtype)
    return coef


def tokens_arg(fn: str, labels, hard: float, ignore_index, where, batch):
    """``(labels, counted)`` of a distillation head: integer labels of the
    tokens' shape ``batch`` (zeros when None, which only a zero
    ``hard_weight`` allows) and the counted tokens (``ignore_index``, which
    has nothing to match without labels, and the token mask ``where``)."""
    if labels is None:
        if hard != 0:
            raise ValueError(
                f"{fn}: `labels` are required with `hard_weight`={hard!r}; got "
                "labels=None."
            )
        y, counted = jnp.zeros(batch, jnp.int32), jnp.ones(batch, bool)
    else:
        y = as_int(fn, "labels", labels)
        if y.shape != batch:
            raise ValueError(
                f"{fn}: `labels` must have hidden's leading shape {batch}; got "
                f"{describe(y)}."
            )
        counted = jnp.ones(batch, bool) if ignore_index is None else y != ignore_index
    if where is not None:
        where = as_bool(fn, "where", where)
        if where.shape != batch:
            raise ValueError(
                f"{fn}: `where` must be a token mask of hidden's leading shape "
                f"{batch}; got {describe(where)}."
            )
        counted = counted & where
    return y, counted


def bias_arg(fn: str, name: str, bias, v: int):
    """``bias`` as a floating ``[V]`` array (None kept)."""
    if bias is None:
        return None
    b = as_float(fn, name, bias)
    if b.shape != (v,):
        raise ValueError(f"{fn}: `{name}` must be [V] = ({v},); got {describe(b)}.")
    return b


def run_head(
    impl,
    rules,
    arrays,
    layout,
    opts,
    *,
    axis_name,
    reduction: str,
    recompute: bool,
    counted,
    token_weights,
    acc,
    aux: bool = False,
):
    """A fused head's loss (and its per-token aux outputs, else None) from its
    rules ``(scalar, per_token)``, the rule arrays and their ``layout`` (see
    :func:`partitioned`).

    A ``"sum"``/``"mean"`` is ``sum_i c_i loss_i`` with the coefficients known
    now (:func:`token_coefficients`): unless ``recompute``, the scalar rule,
    which forms the gradient in the forward pass. Otherwise the per-token
    rule, whose backward recomputes the logits, then :func:`reduce_tokens`.
    Explicitly sharded inputs run per shard (:func:`partitioned`).
    """
    scalar = reduction != "none" and not recompute
    if scalar:
        coef = token_coefficients(counted, token_weights, reduction, acc)
        arrays, layout = (*arrays, coef.reshape(-1)), (*layout, "tokens")
    core = impl(rules[0] if scalar else rules[1])

    def call(*args):
        out = core(*args, opts)
        return out if aux else (out, None)

    if axis_name is None and any(is_sharded(a) for a in arrays if a is not None):
        out, extra = partitioned(call, arrays, layout, scalar)
    else:
        out, extra = call(*arrays, axis_name)
    if not scalar:
        out = reduce_tokens(
            out.reshape(counted.shape), token_weights, counted, reduction
        )
    return out.astype(acc), extra


def reduce_tokens(loss, token_weights, counted, reduction: str):
    """Per-token losses times ``token_weights`` (0 where a token is not
    counted, whatever its weight), reduced; a mean is over counted tokens."""
    if token_weights is not None:
        # Selected before the product, so that its derivative never meets
        # an excluded token's weight either.
        loss = loss * jnp.where(counted, token_weights.astype(loss.dtype), 0.0)
    return reduce_loss(loss, reduction, jnp.sum(counted))


def common_float(a, b) -> jnp.dtype:
    """The wider of two float dtypes (bfloat16 with float16 gives float32),
    independent of the ``jax_numpy_dtype_promotion`` mode: the caller chose to
    pass mixed precisions, so no implicit promotion is being hidden."""
    a, b = jnp.dtype(a), jnp.dtype(b)
    if a == b or a.itemsize > b.itemsize:
        return a
    return b if b.itemsize > a.itemsize else jnp.dtype(jnp.float32)


# -- tiling ------------------------------------------------------------------------


def blocks(block_size, n: int, v: int, tile: int) -> tuple[int, int]:
    """Token chunk and vocabulary block of the XLA path for tiles of about
    ``tile`` logits (see ``block_size``)."""
    block_n, block_v = (None, None) if block_size is None else block_size
    if block_v is None:
        block_v = max(BLOCK_V, tile // max(n, 1) // 128 * 128)
    block_v = min(block_v, max(v, 1))
    if block_n is None:
        block_n = max(8, tile // block_v // 8 * 8)
    return min(block_n, max(n, 1)), block_v


def per_platform_tile(fn: Callable, *args):
    """``fn(*args, tile=...)`` with the tile size of the platform the program
    is lowered for (:data:`TILE_CPU` on CPU, :data:`TILE_ACCELERATOR`
    elsewhere); with one lowering platform the other branch is pruned then."""
    return lax.platform_dependent(
        *args,
        cpu=functools.partial(fn, tile=TILE_CPU),
        default=functools.partial(fn, tile=TILE_ACCELERATOR),
    )


def chunk_rows(block_size, n: int, v: int, budget: int) -> int:
    """Token rows per chunk of :func:`forward_grads`: ``block_size``'s
    ``block_n`` when given, else about ``budget`` logits of full rows."""
    block_n = None if block_size is None else block_size[0]
    if block_n is None:
        block_n = max(8, budget // max(v, 1) // 8 * 8)
    return min(block_n, max(n, 1))


def per_platform_chunk(fn: Callable, *args):
    """``fn(*args, budget=...)`` with the chunk budget of the platform the
    program is lowered for (:data:`CHUNK_CPU` on CPU, :data:`CHUNK_ACCELERATOR`
    elsewhere)."""
    return lax.platform_dependent(
        *args,
        cpu=functools.partial(fn, budget=CHUNK_CPU),
        default=functools.partial(fn, budget=CHUNK_ACCELERATOR),
    )


def varying(arrays, *refs):
    """``arrays`` (None kept) marked as varying over every mesh axis any of
    ``refs`` (None skipped) varies over (loop carries inside ``shard_map``)."""
    axes = frozenset().union(*(vma(r) for r in refs if r is not None))
    return tuple(None if a is None else vary(a, axes) for a in arrays)


def check_head(fn: str, h, w) -> None:
    """``weight`` is ``[D, V]`` with ``D = hidden.shape[-1]`` (a tied ``[V, D]``
    embedding is named as such)."""
    if w.ndim != 2:
        raise ValueError(
            f"{fn}: `weight` must be [D, V] (a tied [V, D] embedding is passed as "
            f"`embedding.T`); got {describe(w)}."
        )
    if h.ndim < 1 or h.shape[-1] != w.shape[0]:
        hint = ""
        if h.ndim >= 1 and w.shape[1] == h.shape[-1]:
            hint = (
                f" `weight` looks like a tied [V, D] embedding: pass `embedding.T` "
                f"([{w.shape[1]}, {w.shape[0]}])."
            )
        raise ValueError(
            f"{fn}: `weight` must be [D, V] with D = hidden.shape[-1]; got "
            f"`weight` {describe(w)} and `hidden` {describe(h)}.{hint}"
        )


def blocked(size: int, block: int, body, carry):
    """``carry = body(start, width, carry)`` over blocks covering ``[0, size)``.

    Full blocks run in a ``fori_loop`` (a ``scan``, so reverse-differentiable);
    a ragged last block is traced once more with its own static width.
    """
    full, rest = divmod(size, block)
    if full == 1:
        carry = body(0, block, carry)
    elif full > 1:
        carry = lax.fori_loop(0, full, lambda i, c: body(i * block, block, c), carry)
    if rest:
        carry = body(full * block, rest, carry)
    return carry


def col_offset(axis_name, v_local: int):
    """Global id of this shard's first column."""
    if axis_name is None:
        return 0
    return lax.axis_index(axis_name).astype(jnp.int32) * v_local


def logits_tile(h, w, b, r0, rn, c0, cw, acc):
    """``h[r0:r0+rn] @ w[:, c0:c0+cw] + b[c0:c0+cw]`` accumulated in ``acc``;
    returns the two slices and the tile."""
    hb = lax.dynamic_slice_in_dim(h, r0, rn, 0)
    wb = lax.dynamic_slice_in_dim(w, c0, cw, 1)
    x = jnp.matmul(hb, wb, preferred_element_type=acc)
    if b is not None:
        x = x + lax.dynamic_slice_in_dim(b, c0, cw).astype(acc)
    return hb, wb, x


def tile_grads(gx, hb, wb, r0, carry, acc):
    """One tile's logits gradient ``gx`` (in the input dtype) fed to the two
    gradient matmuls, accumulated in ``acc``: ``carry`` is ``(d hidden [N,
    D], d weight and d bias of the tile's columns or None)``, the tile's rows
    from ``r0`` on."""
    dh, dwb, dbb = carry
    rn = gx.shape[0]
    dhb = lax.dynamic_slice_in_dim(dh, r0, rn, 0)
    dhb = dhb + jnp.matmul(gx, wb.T, preferred_element_type=acc)
    dh = lax.dynamic_update_slice_in_dim(dh, dhb, r0, 0)
    dwb = dwb + jnp.matmul(hb.T, gx, preferred_element_type=acc)
    if dbb is not None:
        dbb = dbb + jnp.sum(gx, axis=0, dtype=acc)
    return dh, dwb, dbb


def softcap(x, cap):
    """``cap * tanh(x / cap)``, ``-inf`` kept (masked classes), and the tanh."""
    th = jnp.tanh(x / cap)
    return jnp.where(x == -jnp.inf, -jnp.inf, cap * th), th


def slice_rows(arrays, r0, rn):
    """Rows ``[r0, r0 + rn)`` of each array (None kept)."""
    return tuple(
        None if a is None else lax.dynamic_slice_in_dim(a, r0, rn) for a in arrays
    )


def update_rows(arrays, blocks, r0):
    """Each array with rows from ``r0`` on replaced by its block (None kept)."""
    return tuple(
        None if a is None else lax.dynamic_update_slice_in_dim(a, ab, r0, 0)
        for a, ab in zip(arrays, blocks, strict=True)
    )


# -- the gradient in the forward pass ------------------------------------------------


def forward_grads(h, w, b, rows, outs, chunk_fn, *, block_n: int, need, dh_dtype):
    """Values and gradients in one pass over token chunks with full rows.

    For a loss ``sum_i c_i loss_i`` whose coefficients are known in the
    forward, each chunk's logits ``h[rows] @ w + b`` (accumulated in ``h``'s
    compute dtype) give at once the chunk's per-token outputs and its logits
    gradient ``gx = sum_i c_i d loss_i / d x`` (``chunk_fn(x, hb, r0, rn,
    rows_b) -> (gx, outs_b)``; ``rows_b`` are the chunk's rows of ``rows``,
    None kept), which feeds the gradient matmuls right away: three matmuls in
    all, as with materialized logits, and no recomputation in the backward.
    ``need = (d hidden, d weight, d bias)`` says which gradients to form; a
    gradient not needed costs no matmul.

    Returns ``(outs, dh, dw, db)``: ``outs`` is ``outs`` (per-token arrays,
    the initial values) with each chunk's rows written; ``dh`` ``[N, D]`` in
    ``dh_dtype`` (each row is final once its chunk is done, so ``h``'s dtype
    unless the caller still sums it over a vocab-parallel axis), ``dw`` and
    ``db`` accumulated in the compute dtype; None where not needed.
    """
    (n, d), v = h.shape, w.shape[1]
    acc = compute_dtype(h.dtype)
    want_dh, want_dw, want_db = need
    want_db = want_db and b is not None
    axes = vma(h) | vma(w)

    def chunk(r0, rn, carry):
        outs, dh, dw, db = carry
        hb, _, x = logits_tile(h, w, b, r0, rn, 0, v, acc)
        gx, outs_b = chunk_fn(x, hb, r0, rn, slice_rows(rows, r0, rn))
        outs = update_rows(outs, outs_b, r0)
        gx = gx.astype(h.dtype)
        if dh is not None:
            dhb = jnp.matmul(gx, w.T, preferred_element_type=acc).astype(dh.dtype)
            dh = lax.dynamic_update_slice_in_dim(dh, dhb, r0, 0)
        if dw is not None:
            dw = dw + jnp.matmul(hb.T, gx, preferred_element_type=acc)
        if db is not None:
            db = db + jnp.sum(gx, axis=0, dtype=acc)
        return outs, dh, dw, db

    init = (
        outs,
        jnp.zeros((n, d), dh_dtype) if want_dh else None,
        jnp.zeros((d, v), acc) if want_dw else None,
        jnp.zeros((v,), acc) if want_db else None,
    )
    # The per-token outputs are reduced over a vocab-parallel axis in the
    # chunk: they vary like the tokens (``h``), not like the weight's columns.
    init = (
        tuple(None if a is None else vary(a, vma(h)) for a in init[0]),
        *(None if a is None else vary(a, axes) for a in init[1:]),
    )
    return blocked(n, block_n, chunk, init)


def scale_grads(grads: tuple, g) -> tuple:
    """The gradients formed in the forward pass (None kept) times the scalar
    cotangent ``g`` (a ``SymbolicZero`` when the loss is not used), in the
    compute dtype, back in each gradient's dtype."""
    if isinstance(g, SymbolicZero):
        return tuple(None if a is None else jnp.zeros_like(a) for a in grads)
    return tuple(
        None if a is None else (a.astype(compute_dtype(a.dtype)) * g).astype(a.dtype)
        for a in grads
    )


# -- the online max / sum-exp ------------------------------------------------------


def online_max_sumexp(m, s, x):
    """One step of the online log-sum-exp over a tile ``x [rows, cols]``.

    ``m`` is each row's running max and ``s`` its running ``sum exp(x - m)``
    (``-inf`` and 0 before any column); returns the updated ``(m, s)`` and the
    tile's row max. A row with no finite logit yet keeps shift 0, so that
    ``exp(-inf - 0) = 0``.
    """
    bm = jnp.max(x, axis=1)
    m_new = jnp.maximum(m, bm)
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[:, None]), 1)
    return m_new, s, bm


def combine_max_sumexp(m, s, axis_name):
    """The running ``(m, s)`` of each shard's columns merged across the
    vocab-parallel ``axis_name`` (unchanged when it is None)."""
    if axis_name is None:
        return m, s
    m_all = lax.pmax(m, axis_name)
    shift = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    return m_all, lax.psum(s * jnp.exp(m - shift), axis_name)


def log_normalizer(m, s):
    """``(shift, log s)`` with ``logsumexp = shift + log s`` from the final
    ``(m, s)``; a row with no admissible class (all ``-inf``) gets ``(0, 0)``.
    Kept apart, ``(x - shift) - log s`` is exact for large offsets."""
    shift = jnp.where(m == -jnp.inf, 0.0, m)
    return shift, jnp.log(jnp.where(s == 0, 1.0, s))


# -- explicit sharding -------------------------------------------------------------

# How each argument of a fused head is laid out across the mesh: hidden states
# [N, D] split by tokens, weights [D, V] by vocabulary columns, biases [V] like
# the columns, per-token arrays [N] like the tokens.
_LAYOUTS = {
    "hidden": lambda rows, cols: (rows, None),
    "weight": lambda rows, cols: (None, cols),
    "bias": lambda rows, cols: (cols,),
    "tokens": lambda rows, cols: (rows,),
}


def _axes(entry) -> tuple:
    """Mesh axes of one PartitionSpec entry, as a tuple."""
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def partitioned(fn: Callable, args: tuple, kinds: tuple[str, ...], total=False):
    """``fn(*args, axis_name)`` on an explicit-sharding mesh, run per shard in
    ``shard_map``; ``kinds`` gives each argument's layout (``"hidden"``,
    ``"weight"``, ``"bias"``, ``"tokens"``; None arguments are kept).

    Tokens stay split as the first ``"hidden"`` argument's rows are and the
    vocabulary as the first ``"weight"`` argument's columns are (the others are
    laid out alike): each shard streams over its own tiles, vocab-parallel over
    the column axes (``fn`` gets their name as ``axis_name``; None when the
    columns are whole). The blocked loops slice the arrays dynamically, which
    explicit sharding does not allow along a sharded axis. ``fn`` returns
    per-token arrays (any pytree of them); with ``total``, a pair of a scalar
    (each shard's part of a sum over tokens, summed here) and per-token arrays.
    """
    inputs = tuple(a for a in args if a is not None)
    mesh = replicated(*inputs).mesh
    h = args[kinds.index("hidden")]
    w = args[kinds.index("weight")]
    cols = _axes(spec(w)[1])
    rows = tuple(a for a in _axes(spec(h)[0]) if a not in cols)
    row_spec, col_spec = rows or None, cols or None
    layouts = tuple(_LAYOUTS[k](row_spec, col_spec) for k in kinds)
    # A sharded D (the contracted axis) is gathered: each tile needs all of it.
    args = tuple(
        None if a is None else reshard(a, target, *inputs)
        for a, target in zip(args, layouts, strict=True)
    )
    if not rows and not cols:
        return fn(*args, None)
    name = None if not cols else cols[0] if len(cols) == 1 else cols

    def shard(args):
        out = fn(*args, name)
        if total and rows:
            out = (lax.psum(out[0], rows), out[1])
        return out

    out_specs = PartitionSpec(row_spec)
    if total:
        out_specs = (PartitionSpec(), out_specs)
    kernel = jax.shard_map(
        shard,
        mesh=mesh,
        in_specs=(tuple(PartitionSpec(*t) for t in layouts),),
        out_specs=out_specs,
    )
    return kernel(args)

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
from jax.sharding import PartitionSpec

from ._args import check_positive
from ._sharding import replicated, reshard, spec

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


def partitioned(fn: Callable, args: tuple, kinds: tuple[str, ...]):
    """``fn(*args, axis_name)`` on an explicit-sharding mesh, run per shard in
    ``shard_map``; ``kinds`` gives each argument's layout (``"hidden"``,
    ``"weight"``, ``"bias"``, ``"tokens"``; None arguments are kept).

    Tokens stay split as the first ``"hidden"`` argument's rows are and the
    vocabulary as the first ``"weight"`` argument's columns are (the others are
    laid out alike): each shard streams over its own tiles, vocab-parallel over
    the column axes (``fn`` gets their name as ``axis_name``; None when the
    columns are whole). The blocked loops slice the arrays dynamically, which
    explicit sharding does not allow along a sharded axis. ``fn`` returns
    per-token arrays (any pytree of them).
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
    kernel = jax.shard_map(
        lambda args: fn(*args, name),
        mesh=mesh,
        in_specs=(tuple(PartitionSpec(*t) for t in layouts),),
        out_specs=PartitionSpec(row_spec),
    )
    return kernel(args)

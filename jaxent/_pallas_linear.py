"""Pallas (Triton) kernels of the fused linear + cross-entropy.

Three kernels, modelled on JAX's flash-attention kernels
(``jax/experimental/pallas/ops/gpu/attention.py``); none writes a logit to
memory:

* **forward** (:func:`row_stats`), grid ``(token blocks, vocab splits)``: each
  program keeps a ``[block_n]`` running max, sum-exp and target logit (plus the
  argmax and the sum of the logits when asked) while it loops over the vocabulary
  blocks of its split with ``lax.fori_loop``. Each ``[block_n, block_v]`` logits
  tile is a loop over ``block_d`` chunks of the hidden size (``D = 4096`` does
  not fit in shared memory). The splits give the GPU enough programs when ``N``
  is small; they are combined outside, like vocab-parallel shards.
* **d hidden** (:func:`grad_hidden`), grid over token blocks: each program loops
  over the vocabulary, recomputes each logits tile, forms
  ``G = g (softmax (1 + 2 z lse) - target)`` in float32 on chip and adds
  ``G @ W_blk^T`` to its float32 ``d hidden`` rows, ``block_d`` columns at a
  time (the ``[block_n, D]`` accumulator is read and written in memory: it does
  not fit on chip either).
* **d weight** (:func:`grad_weight`), grid over vocabulary blocks: the mirror
  image, looping over token blocks and adding ``H_blk^T @ G`` to float32 ``d
  weight`` columns (and ``G``'s column sums to ``d bias``).

The backward recomputes every logits tile twice (once per kernel): five
``N x V x D`` matmuls in all against three for materialized logits, the price of
never storing ``[N, V]``. ``G`` is cast to the input dtype for the MMAs, which
accumulate in float32 whatever that dtype (``d weight`` summed in bfloat16 makes
training diverge).

Those two kernels cannot keep their accumulators on chip when ``D`` is large
(``[block_n, D]`` float32 rows of ``d hidden``, ``[D, block_v]`` columns of ``d
weight``): they read and write them in memory once per tile, ``N V D (8 /
block_v + 8 / block_n)`` bytes in all (about 800 GB at the Llama-3-8B head with
the default tiles, if L2 does not absorb it). ``BACKWARD = "tiles"`` (the
default, 6.5 x faster on an H200) is the alternative: :func:`grad_logits`
recomputes each tile once and writes ``G`` in the input dtype for one
vocabulary chunk of all tokens, which XLA's matmuls consume (``N V`` entries
written and read twice, ~6 GB there; four ``N x V x D`` matmuls in all).

Shapes need not tile: block sizes are powers of two >= 16 (Triton's dot), and the
ragged edges of ``N``, ``V`` and ``D`` are handled by masked loads (``other=0``)
and stores; a padded vocabulary column is ``-inf`` and a padded token row gets
``G = 0``. With ``interpret=True`` the same kernels run as plain JAX on any
backend (how the CPU tests check them).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Default tiles and launch parameters: the best of `benchmarks/linear_ce.py
# --gpu --pallas-sweep` on an H200 at the Llama-3-8B head (59 ms; 73 ms with
# Triton's tutorial tiles, BLOCK_N = 64). Read when a program is traced.
BLOCK_N = 128
BLOCK_V = 128
BLOCK_D = 64
NUM_WARPS = 4
NUM_STAGES = 3
# The forward splits the vocabulary until the grid has about this many programs
# (a few per SM of an H100).
TARGET_PROGRAMS = 512
# ``d weight`` of a narrow dtype is accumulated in float32 over vocabulary
# chunks of about this many entries (D x chunk), each cast when done, so that
# the float32 buffer stays bounded (2**26 entries = 256 MiB).
DW_CHUNK_ENTRIES = 2**26
# How the backward gets its two matmuls (benchmarks/gpu_check.py times both):
# "fused": the d hidden and d weight kernels above, each accumulating its float32
#   output block by block in memory (flash-attention style; no [N, V] array);
# "tiles": one kernel writes G = d loss / d logits for a vocabulary chunk of all
#   N tokens in the input dtype, and XLA's matmuls take G @ W_c^T and H^T @ G
#   (float32 accumulation) before the next chunk: G_CHUNK_BYTES of G at a time.
# At D = 4096 the "fused" kernels' read-modify-write of float32 accumulators
# moves far more memory than G does (see grad_hidden): on an H200, fwd + bwd at
# the Llama-3-8B head took 490 ms "fused" and 75 ms "tiles" (BENCHMARKS.md).
BACKWARD = "tiles"
# 64 MiB: as fast as 128 MiB on an H200 at the Llama-3-8B head (60.0 against
# 59.1 ms) with 286 MiB of temp memory instead of 372.
G_CHUNK_BYTES = 2**26
# Dtypes the kernels take (Triton has no float64 MMA path here).
DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class Tiles(NamedTuple):
    """Static kernel parameters."""

    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int


class Options(NamedTuple):
    """The loss options the kernels apply on chip (all static)."""

    z_loss: float
    smoothing: float
    num_classes: int  # global V (the smoothing mass is eps / V per class)
    softcap: float | None
    filter_eps: float | None
    want_xsum: bool  # accumulate sum_c x_ic (smoothing with softcap)
    want_argmax: bool


def next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def tiles(n: int, v: int, d: int, block_size=None) -> Tiles:
    """Tiles for ``[n, d] @ [d, v]``: ``block_size`` is ``(block_n, block_v)``
    (either may be None), already checked to be powers of two >= 16."""
    bn, bv = (None, None) if block_size is None else block_size
    bn = bn or min(BLOCK_N, max(16, next_pow2(n)))
    bv = bv or min(BLOCK_V, max(16, next_pow2(v)))
    bd = min(BLOCK_D, max(16, next_pow2(d)))
    return Tiles(bn, bv, bd, NUM_WARPS, NUM_STAGES)


def _local(y, v: int):
    """Labels outside ``[0, V)`` (other shards', other chunks') as -1, so that
    none can match a padding column."""
    return jnp.where((y >= 0) & (y < v), y, -1).astype(jnp.int32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _params(t: Tiles):
    return plgpu.CompilerParams(num_warps=t.num_warps, num_stages=t.num_stages)


def _out(shape, dtype, *like):
    """An output type varying over the mesh axes of ``like`` (in shard_map)."""
    mats = [jax.typeof(a).manual_axis_type for a in like]
    mats = [m for m in mats if m is not None and not m.empty]
    if not mats:
        return jax.ShapeDtypeStruct(shape, dtype)
    # The widest of the inputs' types (they were aligned before the kernel).
    mat = max(mats, key=lambda m: len(m.varying))
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# -- shared tile computations (traced inside the kernels) ---------------------


def _mask(*parts):
    """AND of the non-None masks (None when all are None: no masking)."""
    parts = [p for p in parts if p is not None]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out = out & p
    return out


def _in_range(start, size: int, bound: int, ragged: bool):
    """``start + arange(size) < bound`` when the edge can be ragged, else None."""
    if not ragged:
        return None
    return start + jnp.arange(size, dtype=jnp.int32) < bound


def _loop(lo, hi, body, init):
    """``lax.fori_loop`` with int32 bounds (indices must match ``program_id``'s
    dtype, also under ``jax_enable_x64``)."""
    return lax.fori_loop(jnp.int32(lo), jnp.int32(hi), body, init)


def _load(ref, idx, mask):
    if mask is None:
        return plgpu.load(ref.at[idx])
    return plgpu.load(ref.at[idx], mask=mask, other=0)


def _store(ref, idx, value, mask):
    if mask is None:
        plgpu.store(ref.at[idx], value)
    else:
        plgpu.store(ref.at[idx], value, mask=mask)


class _Dims(NamedTuple):
    n: int
    v: int
    d: int


def _logits(h_ref, w_ref, b_ref, r0, c0, dims: _Dims, t: Tiles):
    """The float32 ``[block_n, block_v]`` tile ``h[r0:] @ w[:, c0:] + b[c0:]``,
    with ``-inf`` in the columns past ``V`` (rows past ``N`` hold junk)."""
    bn, bv, bd = t.block_n, t.block_v, t.block_d
    rows_ok = _in_range(r0, bn, dims.n, dims.n % bn != 0)
    cols_ok = _in_range(c0, bv, dims.v, dims.v % bv != 0)
    d_ragged = dims.d % bd != 0

    def chunk(k, x):
        k_ok = _in_range(k * bd, bd, dims.d, d_ragged)
        hm = _mask(
            None if rows_ok is None else rows_ok[:, None],
            None if k_ok is None else k_ok[None, :],
        )
        wm = _mask(
            None if k_ok is None else k_ok[:, None],
            None if cols_ok is None else cols_ok[None, :],
        )
        hb = _load(h_ref, (pl.ds(r0, bn), pl.ds(k * bd, bd)), hm)
        wb = _load(w_ref, (pl.ds(k * bd, bd), pl.ds(c0, bv)), wm)
        return x + plgpu.dot(hb, wb)

    x = _loop(0, _cdiv(dims.d, bd), chunk, jnp.zeros((bn, bv), jnp.float32))
    if b_ref is not None:
        x = x + _load(b_ref, (pl.ds(c0, bv),), cols_ok).astype(jnp.float32)[None, :]
    if cols_ok is not None:
        x = jnp.where(cols_ok[None, :], x, -jnp.inf)
    return x


def _softcap(x, cap):
    """``cap * tanh(x / cap)`` keeping ``-inf`` (masked classes) at ``-inf``, and
    ``tanh(x / cap)`` for the derivative."""
    th = jnp.tanh(x / cap)
    return jnp.where(x == -jnp.inf, -jnp.inf, cap * th), th


def _tile_grad(x, cols, y, lse, g, rows_ok, cols_ok, o: Options):
    """``d loss / d x`` for one tile (float32) and whether any entry survives the
    filter (None without one).

    ``x`` is the tile before the softcap, ``cols`` its column ids ``[1, bv]``,
    ``y``, ``lse``, ``g`` per-row ``[bn]`` (``g`` is the cotangent, 0 for rows not
    counted and NaN for out-of-range labels).
    """
    th = None
    if o.softcap is not None:
        x, th = _softcap(x, o.softcap)
    p = jnp.exp(x - lse[:, None])
    if o.z_loss:
        p = p * (1 + 2 * o.z_loss * lse)[:, None]
    off = o.smoothing / o.num_classes
    on = (1 - o.smoothing) + off
    hit = cols == y[:, None]
    g0 = p - jnp.where(hit, on, off) if off else p - jnp.where(hit, on, 0.0)
    valid = _mask(
        None if rows_ok is None else rows_ok[:, None],
        None if cols_ok is None else cols_ok[None, :],
    )
    kept = None
    if o.filter_eps is not None:
        keep = jnp.logical_not(jnp.abs(g0) < o.filter_eps)
        keep = _mask(keep, valid)
        g0 = jnp.where(keep, g0, 0.0)
        kept = jnp.max(keep.astype(jnp.int32)) > 0
    grad = g0 * g[:, None]
    if th is not None:
        grad = grad * (1 - th * th)
    if valid is not None:
        grad = jnp.where(valid, grad, 0.0)
    return grad, kept


# -- forward --------------------------------------------------------------------


def _stats_kernel(*refs, dims: _Dims, t: Tiles, o: Options, per_split, has_bias):
    refs = list(refs)
    h_ref, w_ref = refs[:2]
    b_ref = refs[2] if has_bias else None
    y_ref, m_ref, s_ref, t_ref, *extra = refs[2 + has_bias :]
    xs_ref = extra.pop(0) if o.want_xsum else None
    am_ref = extra.pop(0) if o.want_argmax else None
    bn, bv = t.block_n, t.block_v
    i, j = pl.program_id(0), pl.program_id(1)
    r0 = i * bn
    rows_ok = _in_range(r0, bn, dims.n, dims.n % bn != 0)
    y = _load(y_ref, (pl.ds(r0, bn),), rows_ok)
    n_blocks = _cdiv(dims.v, bv)
    first = j * per_split
    last = jnp.minimum(first + per_split, n_blocks)
    cols_ragged = dims.v % bv != 0

    def block(c, carry):
        m, s, tt, xs, am = carry
        c0 = c * bv
        x = _logits(h_ref, w_ref, b_ref, r0, c0, dims, t)
        if o.softcap is not None:
            x = _softcap(x, o.softcap)[0]
        cols = c0 + jnp.arange(bv, dtype=jnp.int32)[None, :]
        bm = jnp.max(x, axis=1)
        m_new = jnp.maximum(m, bm)
        # A row with no finite logit yet keeps shift 0 so exp(-inf - 0) = 0.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        s = s * jnp.exp(m - shift) + jnp.sum(jnp.exp(x - shift[:, None]), axis=1)
        tt = tt + jnp.sum(jnp.where(cols == y[:, None], x, 0.0), axis=1)
        if xs is not None:
            fin = x if not cols_ragged else jnp.where(cols < dims.v, x, 0.0)
            xs = xs + jnp.sum(fin, axis=1)
        if am is not None:
            # Blocks come in increasing column order: a tie keeps the earlier.
            arg = c0 + lax.argmax(x, 1, jnp.int32)
            am = jnp.where(bm > m, arg, am)
        return m_new, s, tt, xs, am

    zeros = jnp.zeros((bn,), jnp.float32)
    init = (
        jnp.full((bn,), -jnp.inf, jnp.float32),
        zeros,
        zeros,
        zeros if o.want_xsum else None,
        jnp.zeros((bn,), jnp.int32) if o.want_argmax else None,
    )
    m, s, tt, xs, am = _loop(first, last, block, init)
    idx = (j, pl.ds(r0, bn))
    for ref, val in ((m_ref, m), (s_ref, s), (t_ref, tt), (xs_ref, xs), (am_ref, am)):
        if ref is not None:
            _store(ref, idx, val, rows_ok)


def row_stats(h, w, b, y, o: Options, t: Tiles, *, interpret: bool):
    """Per-token ``(max, sum-exp, target logit, sum of logits, argmax)`` of the
    logits ``h @ w + b`` (after the softcap), in float32 (argmax int32, local
    column ids), each ``[N]``; the last two are None unless ``o`` asks for
    them. ``y`` are local class ids (anything outside ``[0, V)`` matches no
    column)."""
    (n, d), v = h.shape, w.shape[1]
    dims = _Dims(n, v, d)
    y = _local(y, v)
    n_tok = _cdiv(n, t.block_n)
    n_voc = _cdiv(v, t.block_v)
    splits = max(1, min(n_voc, TARGET_PROGRAMS // n_tok))
    per_split = _cdiv(n_voc, splits)
    splits = _cdiv(n_voc, per_split)
    arrays = (h, w, *(() if b is None else (b,)), y)
    f32 = _out((splits, n), jnp.float32, *arrays)
    out_shape = [f32, f32, f32]
    if o.want_xsum:
        out_shape.append(f32)
    if o.want_argmax:
        out_shape.append(_out((splits, n), jnp.int32, *arrays))
    kernel = functools.partial(
        _stats_kernel, dims=dims, t=t, o=o, per_split=per_split, has_bias=b is not None
    )
    outs = pl.pallas_call(
        kernel,
        grid=(n_tok, splits),
        out_shape=out_shape,
        compiler_params=_params(t),
        interpret=interpret,
        name="linear_ce_forward",
    )(*arrays)
    m, s, tt, *extra = outs
    xs = extra.pop(0) if o.want_xsum else None
    am = extra.pop(0) if o.want_argmax else None
    return combine(m, s, tt, xs, am)


def combine(m, s, t, xs, am, axis_name=None):
    """Merges per-split statistics along axis 0 (``axis_name=None``) or across
    the shards of a mesh axis (then the arrays are per-shard ``[N]``; ``am``
    must hold global ids). Ties of the argmax go to the lowest id."""
    m_all = jnp.max(m, axis=0) if axis_name is None else lax.pmax(m, axis_name)
    shift = jnp.where(m_all == -jnp.inf, 0.0, m_all)
    s = s * jnp.exp(m - shift)
    if am is not None:
        am = global_argmax(m, m_all, am, axis_name)
    total = (
        (lambda a: jnp.sum(a, axis=0))
        if axis_name is None
        else (lambda a: lax.psum(a, axis_name))
    )
    s, t = total(s), total(t)
    xs = None if xs is None else total(xs)
    return m_all, s, t, xs, am


def global_argmax(m, m_all, am, axis_name=None):
    """The lowest of the argmaxes ``am`` (global ids) of the parts whose max
    ``m`` is the overall max ``m_all``, over axis 0 or across ``axis_name``."""
    big = jnp.iinfo(jnp.int32).max
    am = jnp.where(m == m_all, am, big)
    am = jnp.min(am, axis=0) if axis_name is None else lax.pmin(am, axis_name)
    # No part matched (NaN rows): class 0, like a row without a finite logit.
    return jnp.where(am == big, 0, am)


# -- backward -------------------------------------------------------------------


def _rows(y_ref, lse_ref, g_ref, r0, bn, rows_ok):
    y = _load(y_ref, (pl.ds(r0, bn),), rows_ok)
    lse = _load(lse_ref, (pl.ds(r0, bn),), rows_ok)
    g = _load(g_ref, (pl.ds(r0, bn),), rows_ok)
    return y, lse, g


def _dh_kernel(*refs, dims: _Dims, t: Tiles, o: Options, has_bias):
    h_ref, w_ref = refs[:2]
    b_ref = refs[2] if has_bias else None
    y_ref, lse_ref, g_ref, dh_ref = refs[2 + has_bias :]
    bn, bv, bd = t.block_n, t.block_v, t.block_d
    r0 = pl.program_id(0) * bn
    rows_ok = _in_range(r0, bn, dims.n, dims.n % bn != 0)
    y, lse, g = _rows(y_ref, lse_ref, g_ref, r0, bn, rows_ok)
    n_d = _cdiv(dims.d, bd)
    d_ragged = dims.d % bd != 0

    def out_mask(k):
        k_ok = _in_range(k * bd, bd, dims.d, d_ragged)
        return _mask(
            None if rows_ok is None else rows_ok[:, None],
            None if k_ok is None else k_ok[None, :],
        )

    def zero(k, c):
        _store(dh_ref, (pl.ds(r0, bn), pl.ds(k * bd, bd)), 0 * c, out_mask(k))
        return c

    _loop(0, n_d, zero, jnp.zeros((bn, bd), jnp.float32))

    def block(c, carry):
        c0 = c * bv
        x = _logits(h_ref, w_ref, b_ref, r0, c0, dims, t)
        cols = c0 + jnp.arange(bv, dtype=jnp.int32)[None, :]
        cols_ok = _in_range(c0, bv, dims.v, dims.v % bv != 0)
        grad, kept = _tile_grad(x, cols, y, lse, g, rows_ok, cols_ok, o)
        grad = grad.astype(h_ref.dtype)

        def update():
            def chunk(k, c):
                k_ok = _in_range(k * bd, bd, dims.d, d_ragged)
                wm = _mask(
                    None if k_ok is None else k_ok[:, None],
                    None if cols_ok is None else cols_ok[None, :],
                )
                wb = _load(w_ref, (pl.ds(k * bd, bd), pl.ds(c0, bv)), wm)
                idx = (pl.ds(r0, bn), pl.ds(k * bd, bd))
                acc = _load(dh_ref, idx, out_mask(k))
                _store(
                    dh_ref, idx, acc + plgpu.dot(grad, wb, trans_b=True), out_mask(k)
                )
                return c

            _loop(0, n_d, chunk, 0)

        if kept is None:
            update()
        else:
            pl.when(kept)(update)
        return carry

    _loop(0, _cdiv(dims.v, bv), block, 0)


def grad_hidden(h, w, b, y, lse, g, o: Options, t: Tiles, *, interpret: bool):
    """``d hidden`` (float32 ``[N, D]``) of the per-token losses with cotangent
    ``g`` (0 on rows not counted), given the forward's ``lse``."""
    (n, d), v = h.shape, w.shape[1]
    arrays = (h, w, *(() if b is None else (b,)), _local(y, v), lse, g)
    kernel = functools.partial(
        _dh_kernel, dims=_Dims(n, v, d), t=t, o=o, has_bias=b is not None
    )
    return pl.pallas_call(
        kernel,
        grid=(_cdiv(n, t.block_n),),
        out_shape=_out((n, d), jnp.float32, *arrays),
        compiler_params=_params(t),
        interpret=interpret,
        name="linear_ce_grad_hidden",
    )(*arrays)


def _dw_kernel(*refs, dims: _Dims, t: Tiles, o: Options, has_bias):
    h_ref, w_ref = refs[:2]
    b_ref = refs[2] if has_bias else None
    y_ref, lse_ref, g_ref, dw_ref, *db_ref = refs[2 + has_bias :]
    bn, bv, bd = t.block_n, t.block_v, t.block_d
    c0 = pl.program_id(0) * bv
    cols_ok = _in_range(c0, bv, dims.v, dims.v % bv != 0)
    cols = c0 + jnp.arange(bv, dtype=jnp.int32)[None, :]
    n_d = _cdiv(dims.d, bd)
    d_ragged = dims.d % bd != 0
    n_ragged = dims.n % bn != 0

    def out_mask(k):
        k_ok = _in_range(k * bd, bd, dims.d, d_ragged)
        return _mask(
            None if k_ok is None else k_ok[:, None],
            None if cols_ok is None else cols_ok[None, :],
        )

    def zero(k, c):
        _store(dw_ref, (pl.ds(k * bd, bd), pl.ds(c0, bv)), 0 * c, out_mask(k))
        return c

    _loop(0, n_d, zero, jnp.zeros((bd, bv), jnp.float32))

    def block(r, db):
        r0 = r * bn
        rows_ok = _in_range(r0, bn, dims.n, n_ragged)
        y, lse, g = _rows(y_ref, lse_ref, g_ref, r0, bn, rows_ok)
        x = _logits(h_ref, w_ref, b_ref, r0, c0, dims, t)
        grad, kept = _tile_grad(x, cols, y, lse, g, rows_ok, cols_ok, o)
        grad = grad.astype(h_ref.dtype)

        def update():
            def chunk(k, c):
                k_ok = _in_range(k * bd, bd, dims.d, d_ragged)
                hm = _mask(
                    None if rows_ok is None else rows_ok[:, None],
                    None if k_ok is None else k_ok[None, :],
                )
                hb = _load(h_ref, (pl.ds(r0, bn), pl.ds(k * bd, bd)), hm)
                idx = (pl.ds(k * bd, bd), pl.ds(c0, bv))
                acc = _load(dw_ref, idx, out_mask(k))
                _store(
                    dw_ref, idx, acc + plgpu.dot(hb, grad, trans_a=True), out_mask(k)
                )
                return c

            _loop(0, n_d, chunk, 0)

        if kept is None:
            update()
        else:
            pl.when(kept)(update)
        if db is None:
            return db
        # d bias sums the same (rounded) G as the matmuls.
        return db + jnp.sum(grad.astype(jnp.float32), axis=0)

    db = jnp.zeros((bv,), jnp.float32) if db_ref else None
    db = _loop(0, _cdiv(dims.n, bn), block, db)
    if db_ref:
        _store(db_ref[0], (pl.ds(c0, bv),), db, cols_ok)


def grad_weight(h, w, b, y, lse, g, o: Options, t: Tiles, *, interpret: bool):
    """``d weight`` and ``d bias`` (None without bias) in float32 (``[D, V]``,
    ``[V]``) of the per-token losses with cotangent ``g``."""
    (n, d), v = h.shape, w.shape[1]
    arrays = (h, w, *(() if b is None else (b,)), _local(y, v), lse, g)
    out_shape = [_out((d, v), jnp.float32, *arrays)]
    if b is not None:
        out_shape.append(_out((v,), jnp.float32, *arrays))
    kernel = functools.partial(
        _dw_kernel, dims=_Dims(n, v, d), t=t, o=o, has_bias=b is not None
    )
    outs = pl.pallas_call(
        kernel,
        grid=(_cdiv(v, t.block_v),),
        out_shape=out_shape,
        compiler_params=_params(t),
        interpret=interpret,
        name="linear_ce_grad_weight",
    )(*arrays)
    return outs[0], (outs[1] if b is not None else None)


def _g_kernel(*refs, dims: _Dims, t: Tiles, o: Options, has_bias):
    h_ref, w_ref = refs[:2]
    b_ref = refs[2] if has_bias else None
    y_ref, lse_ref, g_ref, out_ref = refs[2 + has_bias :]
    bn, bv = t.block_n, t.block_v
    r0, c0 = pl.program_id(0) * bn, pl.program_id(1) * bv
    rows_ok = _in_range(r0, bn, dims.n, dims.n % bn != 0)
    cols_ok = _in_range(c0, bv, dims.v, dims.v % bv != 0)
    y, lse, g = _rows(y_ref, lse_ref, g_ref, r0, bn, rows_ok)
    x = _logits(h_ref, w_ref, b_ref, r0, c0, dims, t)
    cols = c0 + jnp.arange(bv, dtype=jnp.int32)[None, :]
    grad, _ = _tile_grad(x, cols, y, lse, g, rows_ok, cols_ok, o)
    mask = _mask(
        None if rows_ok is None else rows_ok[:, None],
        None if cols_ok is None else cols_ok[None, :],
    )
    _store(out_ref, (pl.ds(r0, bn), pl.ds(c0, bv)), grad.astype(out_ref.dtype), mask)


def grad_logits(h, w, b, y, lse, g, o: Options, t: Tiles, *, interpret: bool):
    """``G = d loss / d logits`` (``[N, V]`` in ``h``'s dtype) of the per-token
    losses with cotangent ``g``, one recomputed tile per program (the "tiles"
    backward calls it on one vocabulary chunk at a time)."""
    (n, d), v = h.shape, w.shape[1]
    arrays = (h, w, *(() if b is None else (b,)), _local(y, v), lse, g)
    kernel = functools.partial(
        _g_kernel, dims=_Dims(n, v, d), t=t, o=o, has_bias=b is not None
    )
    return pl.pallas_call(
        kernel,
        grid=(_cdiv(n, t.block_n), _cdiv(v, t.block_v)),
        out_shape=_out((n, v), h.dtype, *arrays),
        compiler_params=_params(t),
        interpret=interpret,
        name="linear_ce_grad_logits",
    )(*arrays)


def g_chunk(n: int, v: int, dtype, block_v: int) -> int:
    """Vocabulary columns of G per step of the "tiles" backward: about
    ``G_CHUNK_BYTES`` of it, a multiple of ``block_v``."""
    cols = G_CHUNK_BYTES // max(n * jnp.dtype(dtype).itemsize, 1)
    return min(v, max(block_v, cols // block_v * block_v))


def dw_chunk(d: int, v: int, dtype, block_v: int) -> int:
    """Vocabulary chunk of ``d weight`` accumulated in float32 at a time: all of
    ``V`` for float32 weights (the output is the accumulator), else about
    ``DW_CHUNK_ENTRIES / D`` columns, a multiple of ``block_v``."""
    if jnp.dtype(dtype) == jnp.float32:
        return v
    cols = max(block_v, DW_CHUNK_ENTRIES // max(d, 1) // block_v * block_v)
    return min(v, cols)


def unsupported(dtype, n: int, d: int, v: int, block_size) -> str | None:
    """Why the kernels cannot take these inputs (None when they can)."""
    if jnp.dtype(dtype) not in DTYPES:
        return (
            "supports float32, bfloat16 and float16 `hidden`/`weight`/`bias`; "
            f"got {jnp.dtype(dtype).name}"
        )
    if d == 0 or v == 0:
        return f"needs a non-empty `weight`; got shape ({d}, {v})"
    # The kernels index memory with int32 offsets.
    if d * v >= 2**31:
        return f"takes a `weight` of fewer than 2**31 entries; got ({d}, {v})"
    if n * d >= 2**31:
        return f"takes a `hidden` of fewer than 2**31 entries; got ({n}, {d})"
    if block_size is not None:
        for s in block_size:
            if s is not None and (s < 16 or s & (s - 1)):
                return (
                    "needs `block_size` entries that are powers of two >= 16 "
                    f"(Triton dot tiles); got {tuple(block_size)}"
                )
    return None

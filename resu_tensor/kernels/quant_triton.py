"""Triton kernels for QRESU weights (references in :mod:`quant`): W_eff in one pass, and the
small-M forward x @ W_effᵀ dequantizing inside the K loop so W_eff is never materialised (dX is
W_eff and cuBLAS).

A QRESU weight (rows, cols): 4-bit codes two per byte (even column in the low nibble) or 8-bit
codes one per byte, float32 scale and offset per (row, group of ``group_size`` columns), the
mask bitmap (set bit = active) and θ flat over the clear bits in row-major order. An element's
θ index is the number of clear bits before it: the W_eff kernel walks a prefix block keeping a
running count (start from the stored block prefix); the forward kernels read it from a
``bitmap_tile_prefix`` table (clear bits before each (row, PREFIX_TILE-column tile)) plus an
in-tile scan, so any tile can be decoded independently (they read it once per row and
reduction split, then keep a running count along the row).

Import only where triton imports (``kernels/__init__.py`` checks).
"""
from typing import Optional

import torch

from . import quant
from ._triton_support import (DOT_UPCAST, PREFIX_TILE, Variant, block_walk, cast_to, chunk_elements, chunk_selection,
                              cuda_op, dot_precision, interpreting, next_power_of_2, num_sms, repeat_each,
                              selected_before_block, tl, triton)
from .mask_ops_triton import tile_prefix_and_total

SMALL_M = 64  # the fused forward takes at most this many tokens; more go through W_eff + cuBLAS


# --------------------------------------------------------------------------- device helpers
@triton.jit
def _codes(qdata_ptr, row, col, q_stride, valid, BITS: tl.constexpr):
    """Integer codes (int32) of elements (row, col), broadcast shapes; 0 where not ``valid``."""
    if BITS == 4:
        byte = tl.load(qdata_ptr + row * q_stride + (col >> 1), mask=valid, other=0).to(tl.int32)
        return (byte >> ((col & 1) * 4)) & 15
    else:
        return tl.load(qdata_ptr + row * q_stride + col, mask=valid, other=0).to(tl.int32)


@triton.jit
def _weight_tile(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, theta_ptr, rn, k0, base,
                 rows, cols, q_stride, n_groups, group_size, n_theta,
                 BITS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(W_eff[rn, k0:k0+BLOCK_K] as float32 (BLOCK_N, BLOCK_K), zero outside the matrix; θ entries
    in it per row); k0 is a multiple of BLOCK_K, ``base`` (BLOCK_N,) the θ index of each row's
    first pruned element at or after k0. Any shape: bits and codes are addressed per element
    (:func:`_bytewise_linear_kernel` is the faster forward for whole-byte rows)."""
    rk = k0 + tl.arange(0, BLOCK_K)
    row_ok = rn < rows
    inside = row_ok[:, None] & (rk[None, :] < cols)
    element = rn[:, None] * cols + rk[None, :]
    byte = tl.load(bitmap_ptr + (element >> 3), mask=inside, other=0).to(tl.int32)
    bit = (byte >> (element & 7)) & 1
    active = inside & (bit != 0)
    pruned = tl.where(inside, 1 - bit, 0)
    position = base[:, None] + tl.cumsum(pruned, axis=1) - pruned
    theta = tl.load(theta_ptr + position, mask=(pruned != 0) & (position < n_theta), other=0.0).to(tl.float32)
    code = _codes(qdata_ptr, rn[:, None], rk[None, :], q_stride, inside, BITS)
    if GROUP_ALIGNED:  # the tile lies inside one group of every row
        group = k0 // group_size
        scale = tl.load(scale_ptr + rn * n_groups + group, mask=row_ok, other=1.0)[:, None]
        offset = tl.load(offset_ptr + rn * n_groups + group, mask=row_ok, other=0.0)[:, None]
    else:
        group_index = rn[:, None] * n_groups + rk[None, :] // group_size
        scale = tl.load(scale_ptr + group_index, mask=active, other=1.0)
        offset = tl.load(offset_ptr + group_index, mask=active, other=0.0)
    return tl.where(active, code.to(tl.float32) * scale + offset, theta), tl.sum(pruned, axis=1)


@triton.jit
def _accumulator(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Zeros for :func:`_accumulate`: (BLOCK_N, BLOCK_K) products for one token, else
    (BLOCK_M, BLOCK_N)."""
    if BLOCK_M == 1:
        return tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    else:
        return tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)


@triton.jit
def _accumulate(acc, x, w, PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """acc += x (BLOCK_M, K) @ w (N, K)ᵀ. One token (BLOCK_M == 1) is a GEMV: the products pile
    up element-wise on the CUDA cores and are summed once, in :func:`_accumulated` (a sum per
    step was a cross-lane shuffle reduction for every K chunk), instead of a tl.dot padded to
    16 rows."""
    if BLOCK_M == 1:
        return acc + w.to(tl.float32) * x.to(tl.float32)
    elif UPCAST:
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PRECISION)
    else:
        return tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)


@triton.jit
def _accumulated(acc, BLOCK_M: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) result of an :func:`_accumulator` filled by :func:`_accumulate`."""
    if BLOCK_M == 1:
        return tl.sum(acc, axis=1)[None, :]
    else:
        return acc


# --------------------------------------------------------------------------- kernels
@triton.jit
def _elementwise_effective_weight_kernel(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, block_prefix_ptr, theta_ptr, out_ptr,
                             numel, cols, q_stride, n_groups, group_size, block_size, n_theta,
                             BITS: tl.constexpr, EVEN_COLS: tl.constexpr, ALIGNED: tl.constexpr,
                             GROUP_SHIFT: tl.constexpr, CHUNK: tl.constexpr):
    """One program per prefix block: W_eff for its elements, row-major. Codes come one byte per
    two elements where rows are whole bytes and chunks start on one (EVEN_COLS and ALIGNED, see
    chunk_bits), unpacked by interleaving nibbles; scales one load per group where every chunk
    holds whole groups (GROUP_SHIFT > 0, see :func:`_group_shift`), repeated by interleaving."""
    block = tl.program_id(0)
    start = block.to(tl.int64) * block_size
    running = selected_before_block(block_prefix_ptr, block, start, True)  # clear bits (θ entries) before
    for offset in range(0, block_size, CHUNK):
        first = start + offset
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        pruned, position, has_theta = chunk_selection(bitmap_ptr, first, inside, running, numel, n_theta, True,
                                                      ALIGNED, CHUNK)
        active = inside & (pruned == 0)
        theta = tl.load(theta_ptr + position, mask=has_theta, other=0.0).to(tl.float32)
        first_row = first // cols  # rows and columns in int32 from the chunk's first row
        rest = (first - first_row * cols).to(tl.int32) + tl.arange(0, CHUNK)
        row = first_row + rest // cols
        col = rest % cols
        if BITS == 8:
            code = tl.load(qdata_ptr + element, mask=inside, other=0).to(tl.int32)
        elif EVEN_COLS and ALIGNED:
            pair = first // 2 + tl.arange(0, CHUNK // 2)
            packed = tl.load(qdata_ptr + pair, mask=pair < numel // 2, other=0).to(tl.int32)
            code = tl.interleave(packed & 15, packed >> 4)
        else:
            code = _codes(qdata_ptr, row, col, q_stride, active, BITS)
        if GROUP_SHIFT > 0:  # whole groups of 2**GROUP_SHIFT elements: one scale load per group
            group = (first >> GROUP_SHIFT) + tl.arange(0, CHUNK >> GROUP_SHIFT)
            in_weight = group < (numel >> GROUP_SHIFT)
            scale = repeat_each(tl.load(scale_ptr + group, mask=in_weight, other=1.0), GROUP_SHIFT)
            shift = repeat_each(tl.load(offset_ptr + group, mask=in_weight, other=0.0), GROUP_SHIFT)
        else:
            group_index = row * n_groups + col // group_size
            scale = tl.load(scale_ptr + group_index, mask=active, other=1.0)
            shift = tl.load(offset_ptr + group_index, mask=active, other=0.0)
        value = tl.where(active, code.to(tl.float32) * scale + shift, theta)
        tl.store(out_ptr + element, cast_to(value, out_ptr.dtype.element_ty), mask=inside)
        running += tl.sum(pruned, axis=0).to(tl.int64)


@triton.jit
def _forward_program(tile_prefix_ptr, rows, cols, span, n_prefix_tiles, TILE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """What a forward program (grid (row blocks, reduction splits)) owns: its tokens ``rm``, rows
    ``rn`` (``row_ok`` inside the matrix), ``split``, columns [first, last) and each row's θ index
    at ``first`` (``running``, from the prefix table)."""
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rn < rows
    first = split * span
    last = tl.minimum(first + span, cols)
    running = tl.load(tile_prefix_ptr + rn * n_prefix_tiles + first // TILE, mask=row_ok, other=0)
    return rm, rn, row_ok, split, first, last, running


@triton.jit
def _elementwise_linear_kernel(x_ptr, qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, tile_prefix_ptr, theta_ptr, out_ptr,
                   m, rows, cols, stride_xm, stride_xk, q_stride, n_groups, group_size, n_prefix_tiles,
                   span, stride_os, stride_om, n_theta,
                   BITS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
                   UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[split, :, rn] = x[:, cols of split] @ W_eff[rn, cols of split]ᵀ, a split being ``span``
    columns (a multiple of BLOCK_K and TILE); grid (⌈rows/BLOCK_N⌉, splits). Each program walks
    its rows left to right keeping their θ index, so the prefix table is read once per split."""
    rm, rn, row_ok, split, first, last, running = _forward_program(tile_prefix_ptr, rows, cols, span, n_prefix_tiles,
                                                                 TILE, BLOCK_M, BLOCK_N)
    acc = _accumulator(BLOCK_M, BLOCK_N, BLOCK_K)
    for k0 in range(first, last, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                    mask=(rm[:, None] < m) & (rk[None, :] < cols), other=0.0)
        w, pruned = _weight_tile(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, theta_ptr, rn, k0, running,
                                 rows, cols, q_stride, n_groups, group_size, n_theta, BITS, GROUP_ALIGNED,
                                 BLOCK_N, BLOCK_K)
        running += pruned
        acc = _accumulate(acc, x, cast_to(w, x_ptr.dtype.element_ty), PRECISION, UPCAST, BLOCK_M)
    tl.store(out_ptr + split * stride_os + rm[:, None] * stride_om + rn[None, :],
             cast_to(_accumulated(acc, BLOCK_M), out_ptr.dtype.element_ty),
             mask=(rm[:, None] < m) & (rn[None, :] < rows))


@triton.jit
def _popcount8(v):
    """Set bits of each 8-bit value (int32 lanes)."""
    v = v - ((v >> 1) & 0x55)
    v = (v & 0x33) + ((v >> 2) & 0x33)
    return (v + (v >> 4)) & 0x0F


@triton.jit
def _bytewise_linear_kernel(x_ptr, qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, tile_prefix_ptr, theta_ptr, out_ptr,
                            m, rows, cols, stride_xm, stride_xk, q_stride, n_groups, group_size, n_prefix_tiles,
                            span, stride_os, stride_om, n_theta,
                            BITS: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
    """:func:`_elementwise_linear_kernel` for whole-byte rows (cols and group_size multiples of 8), eight
    columns per lane: one bitmap byte and one 32-bit word of 4-bit codes (two words of 8-bit
    codes) per lane, unpacked by shifts in a static loop over the eight columns, so nothing is
    reshaped across lanes; the θ index is a scan over bytes (popcounts), not over elements."""
    rm, rn, row_ok, split, first, last, running = _forward_program(tile_prefix_ptr, rows, cols, span, n_prefix_tiles,
                                                                 TILE, BLOCK_M, BLOCK_N)
    acc = _accumulator(BLOCK_M, BLOCK_N, BLOCK_G)
    for k0 in range(first, last, 8 * BLOCK_G):
        g = k0 // 8 + tl.arange(0, BLOCK_G)  # byte column within the row
        ok = row_ok[:, None] & (g[None, :] < last // 8)
        byte = tl.load(bitmap_ptr + rn[:, None] * (cols // 8) + g[None, :], mask=ok, other=255).to(tl.int32)
        pruned = _popcount8(255 - byte)
        position = running[:, None] + tl.cumsum(pruned, axis=1) - pruned
        running += tl.sum(pruned, axis=1)
        group = rn[:, None] * n_groups + (8 * g[None, :]) // group_size
        scale = tl.load(scale_ptr + group, mask=ok, other=0.0)
        offset = tl.load(offset_ptr + group, mask=ok, other=0.0)
        words = (qdata_ptr + rn[:, None] * q_stride + BITS * g[None, :]).to(tl.pointer_type(tl.int32))  # 8 codes
        low = tl.load(words, mask=ok, other=0)
        if BITS == 8:
            high = tl.load(words + 1, mask=ok, other=0)
        for j in tl.static_range(8):
            bit = (byte >> j) & 1
            if BITS == 4:
                code = (low >> (4 * j)) & 15
            elif j < 4:
                code = (low >> (8 * j)) & 255
            else:
                code = (high >> (8 * (j - 4))) & 255
            theta = tl.load(theta_ptr + position, mask=ok & (bit == 0) & (position < n_theta), other=0.0)
            position += 1 - bit
            w = tl.where(bit != 0, code.to(tl.float32) * scale + offset, theta.to(tl.float32))
            x = tl.load(x_ptr + rm[:, None] * stride_xm + (8 * g[None, :] + j) * stride_xk,
                        mask=(rm[:, None] < m) & (g[None, :] < last // 8), other=0.0)
            acc = _accumulate(acc, x, cast_to(w, x_ptr.dtype.element_ty), PRECISION, UPCAST, BLOCK_M)
    tl.store(out_ptr + split * stride_os + rm[:, None] * stride_om + rn[None, :],
             cast_to(_accumulated(acc, BLOCK_M), out_ptr.dtype.element_ty),
             mask=(rm[:, None] < m) & (rn[None, :] < rows))


@triton.jit
def _popcount32(v):
    """Set bits of each uint32 value (SWAR)."""
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return ((v * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _word_tile(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, theta_ptr, rn, w, ok, running, cols, q_stride,
               n_groups, group_size, n_theta):
    """W_eff of rows ``rn`` at 32-bit mask words ``w`` (4-bit codes, rows of whole words, each word
    inside one quantization group) as float32 (rows, words, bytes, bits) tiles: column 32w + 8q + j
    at [:, w, q, j]; and each row's θ count after them (``running``: before them). An element's θ
    index is its word's running count, the pruned bits of the bytes below it in the word
    (popcounts) and a scan over its byte; codes come one 32-bit word per eight, scales one per
    mask word, so nothing is reshaped across lanes or reloaded per element."""
    q = tl.arange(0, 4)  # byte of the mask word = code word
    j = tl.arange(0, 8)  # bit of the byte = code of the code word
    bytes_below = ((1 << (8 * q)) - 1).to(tl.uint32)
    bit_of_word = (8 * q[:, None] + j[None, :]).to(tl.uint32)
    mask_words = bitmap_ptr.to(tl.pointer_type(tl.int32))
    code_words = qdata_ptr.to(tl.pointer_type(tl.int32))
    pruned = ~tl.load(mask_words + rn[:, None] * (cols // 32) + w[None, :], mask=ok, other=-1).to(tl.uint32)
    count = _popcount32(pruned)
    word_start = running[:, None] + tl.cumsum(count, axis=1) - count
    byte_start = word_start[:, :, None] + _popcount32(pruned[:, :, None] & bytes_below[None, None, :])
    bit = ((pruned[:, :, None, None] >> bit_of_word[None, None, :, :]) & 1).to(tl.int32)
    position = byte_start[:, :, :, None] + tl.cumsum(bit, axis=3) - bit
    theta = tl.load(theta_ptr + position, mask=(bit != 0) & (position < n_theta), other=0.0)
    words = tl.load(code_words + rn[:, None, None] * (q_stride // 4) + 4 * w[None, :, None] + q[None, None, :],
                    mask=ok[:, :, None], other=0)
    code = (words[:, :, :, None] >> (4 * j)[None, None, None, :]) & 15
    group = rn[:, None] * n_groups + (32 * w[None, :]) // group_size
    scale = tl.load(scale_ptr + group, mask=ok, other=0.0)[:, :, None, None]
    offset = tl.load(offset_ptr + group, mask=ok, other=0.0)[:, :, None, None]
    weight = tl.where(bit != 0, theta.to(tl.float32), code.to(tl.float32) * scale + offset)
    return weight, running + tl.sum(count, axis=1)


@triton.jit
def _wordwise_linear_kernel(x_ptr, qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, tile_prefix_ptr, theta_ptr, out_ptr,
                            m, rows, cols, stride_xm, stride_xk, q_stride, n_groups, group_size, n_prefix_tiles,
                            span, stride_os, stride_om, n_theta,
                            BITS: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """:func:`_elementwise_linear_kernel` on :func:`_word_tile` tiles of BLOCK_W mask words (4-bit codes, cols
    and group_size multiples of 32). One token: a GEMV whose products are summed over each byte in
    the thread that holds it; more: the tile flattened to (rows, 32·BLOCK_W) for tl.dot."""
    rm, rn, row_ok, split, first, last, running = _forward_program(tile_prefix_ptr, rows, cols, span, n_prefix_tiles,
                                                                 TILE, BLOCK_M, BLOCK_N)
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_W, 4), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(first, last, 32 * BLOCK_W):
        w = k0 // 32 + tl.arange(0, BLOCK_W)  # mask word within the row
        w_ok = w < last // 32
        weight, running = _word_tile(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, theta_ptr, rn, w,
                                     row_ok[:, None] & w_ok[None, :], running, cols, q_stride, n_groups, group_size,
                                     n_theta)
        weight = cast_to(weight, x_ptr.dtype.element_ty)
        if BLOCK_M == 1:
            column = 32 * w[:, None, None] + 8 * tl.arange(0, 4)[None, :, None] + tl.arange(0, 8)[None, None, :]
            x = tl.load(x_ptr + column * stride_xk, mask=w_ok[:, None, None], other=0.0)
            acc += tl.sum(weight.to(tl.float32) * x.to(tl.float32)[None, :, :, :], axis=3)
        else:
            rk = k0 + tl.arange(0, 32 * BLOCK_W)
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :] * stride_xk,
                        mask=(rm[:, None] < m) & (rk[None, :] < last), other=0.0)
            acc = _accumulate(acc, x, tl.reshape(weight, (BLOCK_N, 32 * BLOCK_W)), PRECISION, UPCAST, BLOCK_M)
    if BLOCK_M == 1:
        acc = tl.sum(tl.sum(acc, axis=2), axis=1)[None, :]
    tl.store(out_ptr + split * stride_os + rm[:, None] * stride_om + rn[None, :],
             cast_to(acc, out_ptr.dtype.element_ty), mask=(rm[:, None] < m) & row_ok[None, :])


@triton.jit
def _wordwise_effective_weight_kernel(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, block_prefix_ptr, theta_ptr,
                                      out_ptr, numel, group_size, block_size, n_theta, BLOCK_W: tl.constexpr):
    """:func:`_elementwise_effective_weight_kernel` on :func:`_word_tile` tiles of BLOCK_W mask words: where
    rows are whole mask words and whole groups, an element's mask word, code word and group follow
    from its flat index alone, so the weight is read as one long row; one program per prefix block."""
    block = tl.program_id(0)
    start = block.to(tl.int64) * block_size
    row = tl.zeros((1,), dtype=tl.int32)  # the one long row
    running = row.to(tl.int64) + selected_before_block(block_prefix_ptr, block, start, True)  # θ entries before
    end = tl.minimum(start + block_size, numel) // 32
    for offset in range(0, block_size, 32 * BLOCK_W):
        w = (start + offset) // 32 + tl.arange(0, BLOCK_W)
        ok = (w < end)[None, :]
        weight, running = _word_tile(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, theta_ptr, row, w, ok, running,
                                     numel, numel // 2, 0, group_size, n_theta)
        element = 32 * w[:, None, None] + 8 * tl.arange(0, 4)[None, :, None] + tl.arange(0, 8)[None, None, :]
        tl.store(out_ptr + element[None], cast_to(weight, out_ptr.dtype.element_ty), mask=ok[:, :, None, None])


# --------------------------------------------------------------------------- launchers
def _check_quantized(qdata, qscale, bits, group_size, cols):
    if bits not in (4, 8):
        raise ValueError(f"QRESU kernels take bits 4 or 8, got {bits}")
    expected = -(-cols // 2) if bits == 4 else cols
    if qdata.dim() != 2 or qdata.shape[1] != expected or not qdata.is_contiguous():
        raise ValueError(f"qdata must be contiguous (rows, {expected}) for {bits}-bit codes of {cols} columns, "
                         f"got {tuple(qdata.shape)}")
    if qscale.shape != (qdata.shape[0], -(-cols // group_size)):
        raise ValueError(f"qscale must be (rows, {-(-cols // group_size)}), got {tuple(qscale.shape)}")


def _group_shift(group_size: int, cols: int, block_size: int, chunk: int) -> int:
    """log2(group_size) where the W_eff kernel may read scales per group: a power-of-two group
    that divides the rows, the prefix blocks and the chunks (so a chunk holds whole groups and
    element e is in group e >> shift); 0 otherwise (per-element scale loads)."""
    if group_size & (group_size - 1) or cols % group_size or block_size % group_size or chunk % group_size:
        return 0
    return group_size.bit_length() - 1


def effective_weight(qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, bits: int, group_size: int,
                     cols: int, dtype: torch.dtype, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                     theta: torch.Tensor, wordwise: Optional[bool] = None) -> torch.Tensor:
    """:func:`quant.qresu_effective_weight` in one kernel (bit-identical: no FMA contraction): the
    word-wise one where :func:`_flat_words` holds (``wordwise`` None), else the element-wise one."""
    _check_quantized(qdata, qscale, bits, group_size, cols)
    rows = qdata.shape[0]
    out = torch.empty(rows, cols, dtype=dtype, device=qdata.device)
    if out.numel() == 0:
        return out
    grid = (triton.cdiv(out.numel(), block_size),)
    operands = (qdata, qscale.contiguous(), qoffset.contiguous(), bitmap, block_prefix, theta.contiguous(), out,
                out.numel())
    flat_words = _flat_words(qdata, bitmap, bits, cols, group_size, block_size)
    if wordwise is None:
        wordwise = flat_words
    if wordwise:
        if not flat_words:
            raise ValueError("the word-wise W_eff kernel takes 4-bit codes, group_size a multiple of 32 and cols "
                             f"a multiple of group_size, got {bits} bits, cols {cols}, group_size {group_size}")
        _wordwise_effective_weight_kernel[grid](*operands, group_size, block_size, theta.numel(),
                                                BLOCK_W=_EFFECTIVE_WEIGHT_WORDS, num_warps=_EFFECTIVE_WEIGHT_WARPS,
                                                enable_fp_fusion=False)
        return out
    walk = block_walk(block_size)
    _elementwise_effective_weight_kernel[grid](*operands, cols, qdata.shape[1], qscale.shape[1], group_size, block_size,
                                   theta.numel(), BITS=bits, EVEN_COLS=cols % 2 == 0,
                                   GROUP_SHIFT=_group_shift(group_size, cols, block_size, walk["CHUNK"]), **walk,
                                   enable_fp_fusion=False)
    return out


def _configs(tiles, width: str, interpreted: tuple, stages: int = 2):
    """Autotuner configs from (BLOCK_N, width, warps[, stages[, maxnreg]]) tiles; one small config on
    the interpreter."""
    if interpreting():
        tiles = [interpreted]
    return [triton.Config({"BLOCK_N": n, width: k}, num_warps=w, num_stages=rest[0] if rest else stages,
                          maxnreg=rest[1] if len(rest) > 1 else None) for n, k, w, *rest in tiles]


# Tuned per shape on the GPU: GEMV tiles for one token (narrow row blocks, long K chunks), tiles
# for tl.dot (BLOCK_N ≥ 16) for more. Bytewise kernel: BLOCK_G bytes = 8·BLOCK_G columns per step.
_BYTEWISE = {"gemv": _configs([(4, 128, 4), (8, 64, 4), (8, 128, 4), (16, 64, 4), (16, 128, 8), (32, 32, 4)],
                              "BLOCK_G", (16, PREFIX_TILE // 8, 4)),
             "dot": _configs([(16, 32, 4), (16, 64, 4), (32, 32, 4), (32, 64, 8)], "BLOCK_G",
                             (16, PREFIX_TILE // 8, 4))}
# Word-wise GEMV: 1-2 rows per program on 1-2 warps. It is latency-bound with occupancy capped by
# registers, so some configs cap registers at 64 (enough programs per SM for one wave of 4096 rows).
_WORDWISE = {"gemv": _configs([(2, 32, 4), (1, 32, 2), (2, 32, 2), (1, 64, 2), (1, 32, 1), (1, 16, 1),
                               (1, 32, 1, 1), (1, 16, 1, 1), (1, 32, 1, 2, 64), (1, 16, 1, 2, 64)],
                              "BLOCK_W", (4, PREFIX_TILE // 32 or 1, 4)),
             # one stage: pipelining the θ gather slows a float32 θ down and a bfloat16 θ gains nothing
             "dot": _configs([(16, 8, 4), (32, 8, 8), (16, 4, 4), (32, 4, 4), (16, 8, 2), (16, 4, 2)], "BLOCK_W",
                             (16, PREFIX_TILE // 32 or 1, 4), stages=1)}
_ELEMENTWISE = {"gemv": _configs([(8, 256, 4), (16, 128, 4), (8, 512, 8)], "BLOCK_K", (16, PREFIX_TILE, 4)),
                "dot": _configs([(16, 128, 4), (32, 128, 8)], "BLOCK_K", (16, PREFIX_TILE, 4))}
# Word-wise W_eff: mask words per step (1024 elements) and warps; one setting, near the best for the
# layer shapes and sparsities of benchmarks/layers.py, so W_eff needs no autotuning.
_EFFECTIVE_WEIGHT_WORDS, _EFFECTIVE_WEIGHT_WARPS = 32, 2
# Forward splits start on a multiple of every tile width (and of PREFIX_TILE, which divides them).
SPLIT_UNIT = max([c.kwargs["BLOCK_K"] for table in _ELEMENTWISE.values() for c in table] +
                 [8 * c.kwargs["BLOCK_G"] for table in _BYTEWISE.values() for c in table] +
                 [32 * c.kwargs["BLOCK_W"] for table in _WORDWISE.values() for c in table])


def _by_tokens(table):
    """Prune to the GEMV tiles for one token, the tl.dot tiles for more."""
    def prune(configs, named_args, **kwargs):
        return table["gemv" if kwargs["BLOCK_M"] == 1 else "dot"]
    return prune


# A tile inside one quantization group of every row reads one scale and offset per row.
_group_aligned = triton.heuristics({"GROUP_ALIGNED": lambda a: a["group_size"] % a["BLOCK_K"] == 0})
_elementwise_linear_heuristic = _group_aligned(_elementwise_linear_kernel)
_KEY = ["BLOCK_M", "rows", "cols"]


def _tuned(kernel, table):
    return triton.autotune(table["gemv"] + table["dot"], key=_KEY, prune_configs_by={"early_config_prune": _by_tokens(
        table)})(kernel)


_elementwise_linear_tuned = _tuned(_elementwise_linear_heuristic, _ELEMENTWISE)
_bytewise_linear_tuned = _tuned(_bytewise_linear_kernel, _BYTEWISE)
_wordwise_linear_tuned = _tuned(_wordwise_linear_kernel, _WORDWISE)


def _span(reduce_dim: int, programs: int, unit: int, device: torch.device, split: Optional[int],
          per_sm: int) -> int:
    """Reduction elements per split (a multiple of ``unit``): split GEMV-like shapes until there
    are about ``per_sm`` programs per SM."""
    splits = split or max(1, -(-per_sm * num_sms(device) // max(programs, 1)))
    return max(unit, -(-reduce_dim // (splits * unit)) * unit)


def _prepared(bitmap, rows, cols, tile_prefix):
    if tile_prefix is None:
        return tile_prefix_and_total(bitmap, rows, cols, PREFIX_TILE, True)[0]
    expected = (rows, -(-cols // PREFIX_TILE))
    if tuple(tile_prefix.shape) != expected:
        raise ValueError(f"tile_prefix must be bitmap_tile_prefix(bitmap, rows, cols, {PREFIX_TILE}, invert=True) "
                         f"of shape {expected}, got {tuple(tile_prefix.shape)}")
    return tile_prefix


def _whole_bytes(qdata: torch.Tensor, cols: int, group_size: int) -> bool:
    """Whether :func:`_bytewise_linear_kernel` applies: each row's mask bits, codes and groups
    start on byte boundaries and the codes can be read as aligned 32-bit words."""
    return cols % 8 == 0 and group_size % 8 == 0 and qdata.data_ptr() % 4 == 0


def _whole_words(qdata: torch.Tensor, bitmap: torch.Tensor, bits: int, cols: int, group_size: int) -> bool:
    """Whether :func:`_wordwise_linear_kernel` applies: :func:`quant.whole_words` on storage whose
    codes and mask bits start on aligned 32-bit words."""
    return quant.whole_words(bits, cols, group_size) and qdata.data_ptr() % 4 == 0 and bitmap.data_ptr() % 4 == 0


def _flat_words(qdata: torch.Tensor, bitmap: torch.Tensor, bits: int, cols: int, group_size: int,
                block_size: int) -> bool:
    """Whether :func:`_wordwise_effective_weight_kernel` applies: :func:`_whole_words`, rows of
    whole groups and prefix blocks of whole BLOCK_W-word steps."""
    return (_whole_words(qdata, bitmap, bits, cols, group_size) and cols % group_size == 0
            and block_size % (32 * _EFFECTIVE_WEIGHT_WORDS) == 0)


def _forward_kernel(qdata, bitmap, bits, cols, group_size, config: Optional[dict]):
    """(autotuned, plain) forward kernel: the one ``config`` names by its width key (BLOCK_W,
    BLOCK_G or BLOCK_K), else the fastest that applies: word-wise, byte-wise on whole-byte rows,
    element-wise for any shape."""
    whole_words = _whole_words(qdata, bitmap, bits, cols, group_size)
    if config:
        width = next(key for key in ("BLOCK_W", "BLOCK_G", "BLOCK_K") if key in config)
    else:
        width = "BLOCK_W" if whole_words else "BLOCK_G" if _whole_bytes(qdata, cols, group_size) else "BLOCK_K"
    if width == "BLOCK_W" and not whole_words:
        raise ValueError("the word-wise forward kernel (BLOCK_W) takes 4-bit codes and cols and group_size "
                         f"multiples of 32, got {bits} bits, cols {cols}, group_size {group_size}")
    return {"BLOCK_W": (_wordwise_linear_tuned, _wordwise_linear_kernel),
            "BLOCK_G": (_bytewise_linear_tuned, _bytewise_linear_kernel),
            "BLOCK_K": (_elementwise_linear_tuned, _elementwise_linear_heuristic)}[width]


def fused_linear(x: torch.Tensor, qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, bits: int,
                 group_size: int, cols: int, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                 theta: torch.Tensor, tile_prefix: Optional[torch.Tensor] = None, split: Optional[int] = None,
                 config: Optional[dict] = None) -> torch.Tensor:
    """y = x @ W_effᵀ (:func:`quant.qresu_linear_small_m`) in one fused kernel, W_eff never
    materialised, for x (..., cols) with at most SMALL_M tokens, whatever the routing default.
    ``split``: reduction splits (default: enough programs for the GPU). ``config`` (tests): BLOCK_N,
    num_warps and the width key of one kernel, bypassing the autotuner: BLOCK_K (element-wise),
    BLOCK_G (byte-wise; needs :func:`_whole_bytes`) or BLOCK_W (word-wise; needs :func:`_whole_words`)."""
    _check_quantized(qdata, qscale, bits, group_size, cols)
    rows = qdata.shape[0]
    if x.shape[-1] != cols:
        raise ValueError(f"qresu_linear_small_m: x has {x.shape[-1]} features, the weight {cols} columns")
    x2 = x.reshape(-1, cols)
    m = x2.shape[0]
    if m > SMALL_M:
        raise ValueError(f"qresu_linear_small_m: the fused kernel takes at most {SMALL_M} tokens, got {m}")
    if m == 0:
        return x.new_zeros(*x.shape[:-1], rows)
    tile_prefix = _prepared(bitmap, rows, cols, tile_prefix)
    theta = theta.contiguous()
    block_m = 1 if m == 1 else max(16, next_power_of_2(m))
    # Split the columns only where the row blocks leave SMs idle: one token's GEMV runs a few rows
    # per program, the tl.dot form 16-32 and wants two programs per SM.
    span = _span(cols, triton.cdiv(rows, 16), SPLIT_UNIT, x.device, split, 1 if block_m == 1 else 2)
    splits = triton.cdiv(cols, span)
    out = torch.empty(splits, m, rows, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    tuned, untuned = _forward_kernel(qdata, bitmap, bits, cols, group_size, config)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_N"]), splits)

    (tuned if config is None else untuned)[grid](
        x2, qdata, qscale.contiguous(), qoffset.contiguous(), bitmap, tile_prefix, theta, out, m, rows, cols,
        x2.stride(0), x2.stride(1), qdata.shape[1], qscale.shape[1], group_size, tile_prefix.shape[1], span,
        out.stride(0), out.stride(1), theta.numel(), BITS=bits, TILE=PREFIX_TILE, PRECISION=dot_precision(x.dtype),
        UPCAST=DOT_UPCAST, BLOCK_M=block_m, **(config or {}))
    y = out[0] if splits == 1 else out.sum(0).to(x.dtype)
    return y.reshape(*x.shape[:-1], rows)


def linear_small_m(x: torch.Tensor, qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, bits: int,
                   group_size: int, cols: int, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                   theta: torch.Tensor, tile_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`quant.qresu_linear_small_m`: :func:`fused_linear` for 1 to
    ``quant.fused_forward_tokens(...)`` tokens, the W_eff kernel and cuBLAS otherwise."""
    _check_quantized(qdata, qscale, bits, group_size, cols)
    if x.shape[-1] != cols:
        raise ValueError(f"qresu_linear_small_m: x has {x.shape[-1]} features, the weight {cols} columns")
    tokens = x.numel() // cols if cols else 0
    if 0 < tokens <= quant.fused_forward_tokens(bits, cols, group_size):
        return fused_linear(x, qdata, qscale, qoffset, bits, group_size, cols, bitmap, block_prefix, block_size, theta,
                            tile_prefix)
    w = effective_weight(qdata, qscale, qoffset, bits, group_size, cols, x.dtype, bitmap, block_prefix, block_size,
                         theta)
    return x @ w.t()


def grad_input_small_m(grad_out: torch.Tensor, qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor,
                       bits: int, group_size: int, cols: int, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                       block_size: int, theta: torch.Tensor, tile_prefix: Optional[torch.Tensor] = None
                       ) -> torch.Tensor:
    """:func:`quant.qresu_grad_input_small_m` as the W_eff kernel and cuBLAS at every token count
    (``quant.FUSED_GRAD_INPUT_TOKENS``: no fused dX kernel); ``tile_prefix`` is not needed."""
    _check_quantized(qdata, qscale, bits, group_size, cols)
    rows = qdata.shape[0]
    if grad_out.shape[-1] != rows:
        raise ValueError(f"qresu_grad_input_small_m: grad_out has {grad_out.shape[-1]} features, the weight has "
                         f"{rows} rows")
    w = effective_weight(qdata, qscale, qoffset, bits, group_size, cols, grad_out.dtype, bitmap, block_prefix,
                         block_size, theta)
    return grad_out @ w


# --------------------------------------------------------------------------- fake (meta) implementations
def _effective_weight_op(qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, bits: int, group_size: int,
                         cols: int, dtype: torch.dtype, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                         block_size: int, theta: torch.Tensor) -> torch.Tensor:
    return effective_weight(qdata, qscale, qoffset, bits, group_size, cols, dtype, bitmap, block_prefix, block_size,
                            theta)


def _fake_effective_weight(qdata, qscale, qoffset, bits, group_size, cols, dtype, bitmap, block_prefix, block_size,
                           theta):
    return qdata.new_empty(qdata.shape[0], cols, dtype=dtype)


def _fake_linear(x, qdata, qscale, qoffset, bits, group_size, cols, bitmap, block_prefix, block_size, theta,
                 tile_prefix=None):
    return x.new_empty(*x.shape[:-1], qdata.shape[0])


def _fake_grad_input(grad_out, qdata, qscale, qoffset, bits, group_size, cols, bitmap, block_prefix, block_size, theta,
                     tile_prefix=None):
    return grad_out.new_empty(*grad_out.shape[:-1], cols)


# --------------------------------------------------------------------------- compile variants
def _effective_weight_variants(quick: bool):
    for bits in (4, 8):
        types = dict(qdata_ptr="*u8", scale_ptr="*fp32", offset_ptr="*fp32", bitmap_ptr="*u8", block_prefix_ptr="*i32",
                     theta_ptr="*fp32", out_ptr="*bf16", numel="i32", cols="i32", q_stride="i32", n_groups="i32",
                     group_size="i32", block_size="i32", n_theta="i32")
        constexprs = {"BITS": bits, "EVEN_COLS": True, "ALIGNED": True, "GROUP_SHIFT": 6, "CHUNK": 1024}
        yield Variant(_elementwise_effective_weight_kernel, types, constexprs, {"enable_fp_fusion": False})
    for theta in ("*fp32", "*bf16"):
        types = dict(qdata_ptr="*u8", scale_ptr="*fp32", offset_ptr="*fp32", bitmap_ptr="*u8", block_prefix_ptr="*i32",
                     theta_ptr=theta, out_ptr="*bf16", numel="i32", group_size="i32", block_size="i32", n_theta="i32")
        yield Variant(_wordwise_effective_weight_kernel, types, {"BLOCK_W": _EFFECTIVE_WEIGHT_WORDS},
                      {"enable_fp_fusion": False, "num_warps": _EFFECTIVE_WEIGHT_WARPS})


def _linear_variants(quick: bool):
    """Every autotune config of the three forward kernels, for one token (GEMV tiles) and more
    (tl.dot tiles), with 4- and 8-bit codes (the word-wise kernel reads 4-bit codes only); and W_eff."""
    types = dict(x_ptr="*bf16", qdata_ptr="*u8", scale_ptr="*fp32", offset_ptr="*fp32", bitmap_ptr="*u8",
                 tile_prefix_ptr="*i32", theta_ptr="*fp32", out_ptr="*fp32", m="i32", rows="i32", cols="i32",
                 stride_xm="i32", q_stride="i32", n_groups="i32", group_size="i32", n_prefix_tiles="i32", span="i32",
                 stride_os="i32", stride_om="i32", n_theta="i32")
    for kernel, tables in [(_elementwise_linear_kernel, _ELEMENTWISE), (_bytewise_linear_kernel, _BYTEWISE),
                           (_wordwise_linear_kernel, _WORDWISE)]:
        for shape, table in tables.items():
            for config in table:
                for bits, block_m in [(4, 1 if shape == "gemv" else 16), (8, 1 if shape == "gemv" else 64)][
                        :1 if "BLOCK_W" in config.kwargs else 2]:
                    constexprs = dict(config.kwargs, BITS=bits, TILE=PREFIX_TILE, PRECISION="tf32", UPCAST=False,
                                      BLOCK_M=block_m, stride_xk=1)
                    if "BLOCK_K" in config.kwargs:
                        constexprs["GROUP_ALIGNED"] = bits == 4
                    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
                    if config.maxnreg:
                        options["maxnreg"] = config.maxnreg
                    yield Variant(kernel, types, constexprs, options)
                if quick:
                    break
    yield from _effective_weight_variants(quick)


# --------------------------------------------------------------------------- the ops (quant's signatures)
qresu_effective_weight = cuda_op(quant.qresu_effective_weight, _effective_weight_op, _fake_effective_weight,
                                 variants=_effective_weight_variants)
qresu_linear_small_m = cuda_op(quant.qresu_linear_small_m, linear_small_m, _fake_linear, variants=_linear_variants)
qresu_grad_input_small_m = cuda_op(quant.qresu_grad_input_small_m, grad_input_small_m, _fake_grad_input,
                                   variants=_effective_weight_variants)

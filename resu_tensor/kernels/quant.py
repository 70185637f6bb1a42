"""Reference for QRESU's frozen active weights: group-wise asymmetric 4/8-bit codes, two 4-bit
codes per byte (even column in the low nibble), float32 scale and offset per (row, group)."""
from typing import Optional

import torch

from .mask_ops import scatter_by_bitmap_, unpack_bitmap
from ._table import kernel_op

# Most tokens for which the Triton QRESU forward (quant_triton.linear_small_m) runs its fused kernel
# instead of W_eff + cuBLAS; callers read them to know whether a prefix table will be used. Set from
# benchmarks/qresu_routing.py (GPU time on the layer shapes of benchmarks/layers.py): the fused
# forward wins at one token, and where the word-wise kernel applies (4-bit codes, rows of whole
# 32-bit mask words) up to 32 tokens. A fused dX kernel never won, so dX is always W_eff + cuBLAS
# (no prefix table); benchmarks/kernels_unrouted.py keeps that kernel for measuring.
FUSED_FORWARD_TOKENS = 1
FUSED_GRAD_INPUT_TOKENS = 0
FUSED_FORWARD_TOKENS_WORDWISE = 32


def whole_words(bits: int, cols: int, group_size: int) -> bool:
    """Whether the word-wise kernels can read this layout: 4-bit codes, rows of whole 32-bit mask
    words, each word inside one quantization group (they also need word-aligned storage)."""
    return bits == 4 and cols % 32 == 0 and group_size % 32 == 0


def fused_forward_tokens(bits: int, cols: int, group_size: int) -> int:
    """Most tokens the fused forward takes by default for a weight of this layout."""
    return FUSED_FORWARD_TOKENS_WORDWISE if whole_words(bits, cols, group_size) else FUSED_FORWARD_TOKENS


def _groups(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) → (rows, n_groups, group_size), padding the last group by repeating the edge."""
    rows, cols = t.shape
    n_groups = -(-cols // group_size)
    pad = n_groups * group_size - cols
    if pad:
        t = torch.cat([t, t[:, -1:].expand(rows, pad)], dim=1)
    return t.reshape(rows, n_groups, group_size)


def quantize_groupwise(weight: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int):
    """Codes (uint8, one per element), scale and offset (float32, (rows, n_groups)) such that
    ``code * scale + offset`` ≈ weight at kept coordinates. Statistics use kept coordinates only
    (the others hold θ); a group with none gets scale 1, offset 0. Unkept codes are 0."""
    levels = (1 << bits) - 1
    w = weight.float()
    big = torch.finfo(torch.float32).max
    lo = _groups(torch.where(keep, w, big), group_size).amin(dim=2)
    hi = _groups(torch.where(keep, w, -big), group_size).amax(dim=2)
    empty = lo > hi
    lo = torch.where(empty, 0.0, lo)
    scale = torch.where(empty | (hi == lo), 1.0, (hi - lo) / levels)
    full_scale = scale.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    full_lo = lo.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]
    codes = torch.round((w - full_lo) / full_scale).clamp_(0, levels).to(torch.uint8)
    return codes.masked_fill_(~keep, 0), scale, lo


def dequantize_groupwise(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    cols = codes.shape[1]
    full_scale = scale.repeat_interleave(group_size, dim=1)[:, :cols]
    full_offset = offset.repeat_interleave(group_size, dim=1)[:, :cols]
    return (codes.float() * full_scale + full_offset).to(dtype)


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """(rows, cols) codes < 16 → (rows, ceil(cols / 2)) bytes."""
    rows, cols = codes.shape
    if cols % 2:
        codes = torch.cat([codes, codes.new_zeros(rows, 1)], dim=1)
    pairs = codes.view(rows, -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_4bit(packed: torch.Tensor, cols: int) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    return torch.stack([low, high], dim=2).reshape(packed.shape[0], -1)[:, :cols]


def dequantize_active(qdata: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, group_size: int,
                      cols: int, dtype: torch.dtype, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense W_A from stored codes (zero where ``keep`` is False, if given)."""
    codes = unpack_4bit(qdata, cols) if bits == 4 else qdata
    dense = dequantize_groupwise(codes, scale, offset, group_size, dtype)
    return dense if keep is None else dense.masked_fill_(~keep, 0)


# --------------------------------------------------------------------------- QRESU W_eff
# The mask arrives as its packed bitmap (set bit = active, so θ sits at the clear bits, in
# row-major order) with block prefix counts; see kernels/mask_ops.py for the layout.


@kernel_op
def qresu_effective_weight(qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, bits: int,
                           group_size: int, cols: int, dtype: torch.dtype, bitmap: torch.Tensor,
                           block_prefix: torch.Tensor, block_size: int, theta: torch.Tensor) -> torch.Tensor:
    """Dense W_eff (rows, cols) in ``dtype``: dequantized codes where the bitmap bit is set (the
    active set), θ (flat, row-major over the clear bits) everywhere else."""
    rows = qdata.shape[0]
    keep = unpack_bitmap(bitmap, rows * cols).view(rows, cols)
    dense = dequantize_active(qdata, qscale, qoffset, bits, group_size, cols, dtype, keep)
    return scatter_by_bitmap_(dense, bitmap, block_prefix, block_size, True, theta)


@kernel_op
def qresu_linear_small_m(x: torch.Tensor, qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor, bits: int,
                         group_size: int, cols: int, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                         theta: torch.Tensor, tile_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ W_effᵀ for a QRESU weight (rows, cols), x (..., cols) with few tokens (≤ 64), in
    x's dtype (W_eff is built in x's dtype). ``tile_prefix`` is an optional cached
    ``bitmap_tile_prefix(bitmap, rows, cols, QRESU_TILE, invert=True)`` for the kernel."""
    w = qresu_effective_weight(qdata, qscale, qoffset, bits, group_size, cols, x.dtype, bitmap, block_prefix,
                               block_size, theta)
    return x @ w.t()


@kernel_op
def qresu_grad_input_small_m(grad_out: torch.Tensor, qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor,
                             bits: int, group_size: int, cols: int, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                             block_size: int, theta: torch.Tensor,
                             tile_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dX = grad_out @ W_eff for a QRESU weight (rows, cols), grad_out (..., rows) with few
    tokens (≤ 64), in grad_out's dtype; ``tile_prefix`` as in :func:`qresu_linear_small_m`."""
    w = qresu_effective_weight(qdata, qscale, qoffset, bits, group_size, cols, grad_out.dtype, bitmap, block_prefix,
                               block_size, theta)
    return grad_out @ w

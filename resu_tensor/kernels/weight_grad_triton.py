"""Triton versions of the weight-gradient compaction in :mod:`weight_grad`: dW = aᵀ·b restricted
to the trainable coordinates, flat in row-major order.

Two strategies, both callable (a benchmark picks; the table registers ``dense_gather``):

* ``dense_gather``: the dense product by cuBLAS (``a.t() @ b``), then the Triton gather with the
  cast to ``out_dtype`` fused. Needs a temporary rows × cols tensor in a's dtype.
* ``fused``: one Triton matmul whose epilogue writes only the trainable coordinates straight
  into the compact output. Positions come from a ``bitmap_tile_prefix`` table (selected
  elements before each (row, PREFIX_TILE-column tile)) plus an in-tile scan; no dense temporary.

Import only where triton imports (``kernels/__init__.py`` checks).
"""
from typing import Optional

import torch

from . import weight_grad
from ._triton_support import (DOT_UPCAST, PREFIX_TILE, cast_to, define_op, dot_precision, eager_or_op, interpreting,
                              next_power_of_2, tl, triton)
from .mask_ops_triton import _flags, _pack_bitmap, gather_bitmap, gather_masked, tile_prefix_and_total


def _configs():
    if interpreting():  # one small config: the interpreter runs every lane in numpy
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 2 * PREFIX_TILE, "BLOCK_K": 16, "GROUP_M": 2, "SUBTILES": 2})]
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps); BLOCK_N a multiple of PREFIX_TILE. The
        # epilogue runs in 4 column sub-tiles: whole-tile scans spill registers (ptxas, sm_90).
        # BLOCK_K 64 for 16-bit inputs, 32 for float32 (smaller tiles: shared memory, compile time).
        (128, 256, 64, 3, 8),
        (128, 128, 64, 4, 4),
        (128, 128, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 32, 3, 8),
        (64, 128, 32, 3, 4),
    ]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "SUBTILES": 4}, num_stages=s,
                          num_warps=w) for m, n, k, s, w in shapes]


def _configs_for_dtype(configs, named_args, **kwargs):
    if len(configs) == 1:
        return configs
    wide = named_args["a_ptr"].dtype == torch.float32
    return [c for c in configs if (c.kwargs["BLOCK_K"] == 32) == wide]


@triton.autotune(configs=_configs(), key=["rows", "cols", "tokens_bucket"],
                 prune_configs_by={"early_config_prune": _configs_for_dtype})
@triton.jit(do_not_specialize=["tokens_bucket"])
def _compact_matmul_kernel(a_ptr, b_ptr, bitmap_ptr, tile_prefix_ptr, out_ptr,
                           tokens, rows, cols, stride_at, stride_ar, stride_bt, stride_bc, n_prefix_tiles, count,
                           tokens_bucket, INVERT: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr, SUBTILES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out[pos(r, c)] = (aᵀ·b)[r, c] for every selected (r, c); a (tokens, rows), b (tokens, cols).
    ``tokens_bucket`` (unused here) keys the autotuner on the token count rounded to a power of 2."""
    pid = tl.program_id(0)
    pids_m = tl.cdiv(rows, BLOCK_M)
    pids_n = tl.cdiv(cols, BLOCK_N)
    pids_in_group = GROUP_M * pids_n
    first_m = (pid // pids_in_group) * GROUP_M
    group_m = min(pids_m - first_m, GROUP_M)
    pid_m = first_m + (pid % pids_in_group) % group_m
    pid_n = (pid % pids_in_group) // group_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_ar + rk[None, :] * stride_at  # (BLOCK_M, BLOCK_K) of aᵀ
    b_ptrs = b_ptr + rk[:, None] * stride_bt + rn[None, :] * stride_bc  # (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(tokens, BLOCK_K)):
        k_left = tokens - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < rows) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < cols), other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_at
        b_ptrs += BLOCK_K * stride_bt

    # Epilogue: keep the selected coordinates, each at its compact position, in column
    # sub-tiles (fewer live registers than scanning the whole tile at once).
    base = tl.load(tile_prefix_ptr + rm * n_prefix_tiles + pid_n * (BLOCK_N // TILE), mask=rm < rows, other=0)
    if SUBTILES == 1:
        _store_selected(acc, rm, rn, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT)
    else:
        half: tl.constexpr = BLOCK_N // 2
        left, right = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, half)), (0, 2, 1)))
        rn_left = pid_n * BLOCK_N + tl.arange(0, half)
        if SUBTILES == 2:
            base = _store_selected(left, rm, rn_left, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT)
            _store_selected(right, rm, rn_left + half, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT)
        else:
            quarter: tl.constexpr = BLOCK_N // 4
            rn_q = pid_n * BLOCK_N + tl.arange(0, quarter)
            q0, q1 = tl.split(tl.permute(tl.reshape(left, (BLOCK_M, 2, quarter)), (0, 2, 1)))
            base = _store_selected(q0, rm, rn_q, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT)
            base = _store_selected(q1, rm, rn_q + quarter, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT)
            q2, q3 = tl.split(tl.permute(tl.reshape(right, (BLOCK_M, 2, quarter)), (0, 2, 1)))
            base = _store_selected(q2, rm, rn_q + half, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT)
            _store_selected(q3, rm, rn_q + half + quarter, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT)


@triton.jit
def _store_selected(acc, rm, rn, base, bitmap_ptr, out_ptr, rows, cols, count, INVERT: tl.constexpr):
    """Store the selected entries of ``acc`` (rows rm, columns rn) at base[row] + their rank in
    the row segment (never at or past ``count``); returns base advanced past them."""
    inside = (rm[:, None] < rows) & (rn[None, :] < cols)
    element = rm[:, None] * cols + rn[None, :]
    byte = tl.load(bitmap_ptr + (element >> 3), mask=inside, other=0).to(tl.int32)
    bit = (byte >> (element & 7)) & 1
    if INVERT:
        bit = 1 - bit
    flags = tl.where(inside, bit, 0)
    position = base[:, None] + tl.cumsum(flags, axis=1) - flags
    tl.store(out_ptr + position, cast_to(acc, out_ptr.dtype.element_ty), mask=(flags != 0) & (position < count))
    return base + tl.sum(flags, axis=1)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"compact_weight_grad: need a (tokens, rows) and b (tokens, cols) of one dtype, got "
                         f"{tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")


def fused_matmul_bitmap(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor, invert: bool, count: int,
                        out_dtype: torch.dtype, tile_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fused kernel: compact (aᵀ·b)[selected] with no dense temporary. ``tile_prefix``: a
    cached ``bitmap_tile_prefix(bitmap, rows, cols, PREFIX_TILE, invert)`` (else computed)."""
    _check(a, b)
    tokens, rows = a.shape
    cols = b.shape[1]
    if tile_prefix is None:
        tile_prefix = tile_prefix_and_total(bitmap, rows, cols, PREFIX_TILE, invert)[0]
    if tile_prefix.shape != (rows, -(-cols // PREFIX_TILE)):
        raise ValueError(f"compact_weight_grad: tile_prefix must be ({rows}, {-(-cols // PREFIX_TILE)}) for tile "
                         f"{PREFIX_TILE}, got {tuple(tile_prefix.shape)}")
    if tokens == 0 or count == 0:
        return torch.zeros(count, dtype=out_dtype, device=a.device)
    out = torch.empty(count, dtype=out_dtype, device=a.device)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]) * triton.cdiv(cols, meta["BLOCK_N"]),)

    _compact_matmul_kernel[grid](a, b, bitmap, tile_prefix, out, tokens, rows, cols, a.stride(0), a.stride(1),
                                 b.stride(0), b.stride(1), tile_prefix.shape[1], count, next_power_of_2(tokens),
                                 INVERT=bool(invert), TILE=PREFIX_TILE, PRECISION=dot_precision(a.dtype),
                                 UPCAST=DOT_UPCAST)
    return out


# --------------------------------------------------------------------------- the four launchers
def _dense_gather(a: torch.Tensor, b: torch.Tensor, trainable_flat: Optional[torch.Tensor],
                  out_dtype: torch.dtype) -> torch.Tensor:
    _check(a, b)
    dense = a.t() @ b
    if trainable_flat is None:
        return dense.reshape(-1).to(out_dtype)
    return gather_masked(dense, trainable_flat, out_dtype)


def _fused(a: torch.Tensor, b: torch.Tensor, trainable_flat: Optional[torch.Tensor],
           out_dtype: torch.dtype) -> torch.Tensor:
    if trainable_flat is None:
        return _dense_gather(a, b, None, out_dtype)
    _check(a, b)
    rows, cols = a.shape[1], b.shape[1]
    if _flags(trainable_flat).numel() != rows * cols:
        raise ValueError(f"compact_weight_grad: mask has {trainable_flat.numel()} elements, dW {rows * cols}")
    bitmap = _pack_bitmap(trainable_flat)
    tile_prefix, total = tile_prefix_and_total(bitmap, rows, cols, PREFIX_TILE, False)
    return fused_matmul_bitmap(a, b, bitmap, False, int(total), out_dtype, tile_prefix)


def _bitmap_dense_gather(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                         block_size: int, invert: bool, count: int, out_dtype: torch.dtype) -> torch.Tensor:
    _check(a, b)
    return gather_bitmap(a.t() @ b, bitmap, block_prefix, block_size, invert, count, out_dtype)


def _bitmap_fused(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                  block_size: int, invert: bool, count: int, out_dtype: torch.dtype) -> torch.Tensor:
    return fused_matmul_bitmap(a, b, bitmap, invert, count, out_dtype)


def _fake_compact(a, b, trainable_flat, out_dtype):
    if trainable_flat is None:
        return a.new_empty(a.shape[1] * b.shape[1], dtype=out_dtype)
    return a.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=out_dtype)


def _fake_compact_bitmap(a, b, bitmap, block_prefix, block_size, invert, count, out_dtype):
    return a.new_empty(count, dtype=out_dtype)


dense_gather_op = define_op("compact_weight_grad_dense_gather", _dense_gather, _fake_compact)
fused_op = define_op("compact_weight_grad_fused", _fused, _fake_compact)
bitmap_dense_gather_op = define_op("compact_weight_grad_bitmap_dense_gather", _bitmap_dense_gather,
                                   _fake_compact_bitmap)
bitmap_fused_op = define_op("compact_weight_grad_bitmap_fused", _bitmap_fused, _fake_compact_bitmap)

# Table entries (signatures of weight_grad.compact_weight_grad / compact_weight_grad_bitmap).
compact_weight_grad_dense_gather = eager_or_op("compact_weight_grad_dense_gather", _dense_gather, dense_gather_op,
                                               weight_grad.compact_weight_grad)
compact_weight_grad_fused = eager_or_op("compact_weight_grad_fused", _fused, fused_op, weight_grad.compact_weight_grad)
compact_weight_grad_bitmap_dense_gather = eager_or_op("compact_weight_grad_bitmap_dense_gather", _bitmap_dense_gather,
                                                      bitmap_dense_gather_op, weight_grad.compact_weight_grad_bitmap)
compact_weight_grad_bitmap_fused = eager_or_op("compact_weight_grad_bitmap_fused", _bitmap_fused, bitmap_fused_op,
                                               weight_grad.compact_weight_grad_bitmap)

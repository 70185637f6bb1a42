"""Triton kernels the library does not route to, kept to measure against the ones it does.

* The weight gradient as one Triton matmul whose epilogue writes only the trainable coordinates
  (no rows × cols temporary): :func:`compact_weight_grad_fused` (bool mask) and
  :func:`compact_weight_grad_bitmap_fused` (bitmap), signatures of ``kernels.compact_weight_grad``
  / ``compact_weight_grad_bitmap``, which run cuBLAS and a gather instead. Positions come from a
  ``bitmap_tile_prefix`` table (selected elements before each (row, PREFIX_TILE-column tile))
  plus an in-tile scan.
* QRESU's dX = g @ W_eff dequantizing inside the K loop: :func:`fused_grad_input`, where
  ``kernels.qresu_grad_input_small_m`` builds W_eff and calls cuBLAS.

``benchmarks/layers.py`` and ``benchmarks/qresu_routing.py`` time them; tests/test_kernels_unrouted.py
checks them against the references. Needs triton (import it only where ``kernels.HAS_TRITON``)::

    from benchmarks import kernels_unrouted
    kernels.register("compact_weight_grad", "cuda", kernels_unrouted.compact_weight_grad_fused)
"""
from typing import Optional

import torch

from resu_tensor.kernels._triton_support import (DOT_UPCAST, PREFIX_TILE, cast_to, dot_precision, interpreting,
                                                 next_power_of_2, tl, triton)
from resu_tensor.kernels.mask_ops_triton import _mask_bytes, _pack_bitmap, tile_prefix_and_total
from resu_tensor.kernels.quant_triton import (SMALL_M, _check_quantized, _configs, _group_aligned, _prepared, _span,
                                              _weight_tile)
from resu_tensor.kernels.weight_grad_triton import _compact_weight_grad, check_operands


# --------------------------------------------------------------------------- fused weight gradient
def _matmul_configs():
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


@triton.autotune(configs=_matmul_configs(), key=["rows", "cols", "tokens_bucket"],
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


def fused_matmul_bitmap(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor, invert: bool, count: int,
                        out_dtype: torch.dtype, tile_prefix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Compact (aᵀ·b)[selected] in one Triton matmul, no dense temporary. ``tile_prefix``: a cached
    ``kernels.bitmap_tile_prefix(bitmap, rows, cols, PREFIX_TILE, invert)`` (else computed)."""
    check_operands(a, b)
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


def compact_weight_grad_fused(a: torch.Tensor, b: torch.Tensor, trainable_flat: Optional[torch.Tensor],
                              out_dtype: torch.dtype) -> torch.Tensor:
    """``kernels.compact_weight_grad`` through :func:`fused_matmul_bitmap` (the bool mask packed
    into a bitmap first); every coordinate trains (``trainable_flat`` None): cuBLAS, as the library."""
    if trainable_flat is None:
        return _compact_weight_grad(a, b, None, out_dtype)
    check_operands(a, b)
    rows, cols = a.shape[1], b.shape[1]
    if _mask_bytes(trainable_flat).numel() != rows * cols:
        raise ValueError(f"compact_weight_grad: mask has {trainable_flat.numel()} elements, dW {rows * cols}")
    bitmap = _pack_bitmap(trainable_flat)
    tile_prefix, total = tile_prefix_and_total(bitmap, rows, cols, PREFIX_TILE, False)
    return fused_matmul_bitmap(a, b, bitmap, False, int(total), out_dtype, tile_prefix)


def compact_weight_grad_bitmap_fused(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor,
                                     block_prefix: torch.Tensor, block_size: int, invert: bool, count: int,
                                     out_dtype: torch.dtype) -> torch.Tensor:
    """``kernels.compact_weight_grad_bitmap`` through :func:`fused_matmul_bitmap`."""
    return fused_matmul_bitmap(a, b, bitmap, invert, count, out_dtype)


# --------------------------------------------------------------------------- fused QRESU dX
@triton.jit
def _grad_input_kernel(g_ptr, qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, tile_prefix_ptr, theta_ptr, out_ptr,
                       m, rows, cols, stride_gm, stride_gn, q_stride, n_groups, group_size, n_prefix_tiles,
                       span, stride_os, stride_om, n_theta,
                       BITS: tl.constexpr, GROUP_ALIGNED: tl.constexpr, TILE: tl.constexpr,
                       PRECISION: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """out[split, :, rk] = g[:, rows of split] @ W_eff[rows of split, rk], a split being ``span``
    rows; grid (⌈cols/BLOCK_K⌉, splits)."""
    pid_k = tl.program_id(0)
    split = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    first = split * span
    last = tl.minimum(first + span, rows)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(first, last, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(g_ptr + rm[:, None] * stride_gm + rn[None, :] * stride_gn,
                    mask=(rm[:, None] < m) & (rn[None, :] < last), other=0.0)  # last ≤ rows
        base = tl.load(tile_prefix_ptr + rn * n_prefix_tiles + pid_k * (BLOCK_K // TILE), mask=rn < rows, other=0)
        w, _ = _weight_tile(qdata_ptr, scale_ptr, offset_ptr, bitmap_ptr, theta_ptr, rn, pid_k * BLOCK_K, base,
                            rows, cols, q_stride, n_groups, group_size, n_theta, BITS, GROUP_ALIGNED,
                            BLOCK_N, BLOCK_K)
        w = cast_to(w, g_ptr.dtype.element_ty)
        if UPCAST:
            acc = tl.dot(g.to(tl.float32), w.to(tl.float32), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(g, w, acc, input_precision=PRECISION)
    tl.store(out_ptr + split * stride_os + rm[:, None] * stride_om + rk[None, :],
             cast_to(acc, out_ptr.dtype.element_ty), mask=(rm[:, None] < m) & (rk[None, :] < cols))


_GRAD_INPUT_CONFIGS = _configs([(16, PREFIX_TILE, 4), (32, PREFIX_TILE, 8)], "BLOCK_K", (16, PREFIX_TILE, 4))
_grad_input_heuristic = _group_aligned(_grad_input_kernel)
_grad_input_tuned = triton.autotune(_GRAD_INPUT_CONFIGS, key=["BLOCK_M", "rows", "cols"])(_grad_input_heuristic)


def fused_grad_input(grad_out: torch.Tensor, qdata: torch.Tensor, qscale: torch.Tensor, qoffset: torch.Tensor,
                     bits: int, group_size: int, cols: int, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                     block_size: int, theta: torch.Tensor, tile_prefix: Optional[torch.Tensor] = None,
                     split: Optional[int] = None, config: Optional[dict] = None) -> torch.Tensor:
    """``kernels.qresu_grad_input_small_m`` (dX = grad_out @ W_eff) in one kernel for at most
    ``quant_triton.SMALL_M`` tokens. Programs own PREFIX_TILE columns; ``split``: splits of the
    rows (default: two programs per SM); ``config`` (tests): BLOCK_N and num_warps, bypassing the
    autotuner."""
    _check_quantized(qdata, qscale, bits, group_size, cols)
    rows = qdata.shape[0]
    if grad_out.shape[-1] != rows:
        raise ValueError(f"qresu_grad_input_small_m: grad_out has {grad_out.shape[-1]} features, the weight has "
                         f"{rows} rows")
    g2 = grad_out.reshape(-1, rows)
    m = g2.shape[0]
    if m > SMALL_M:
        raise ValueError(f"qresu_grad_input_small_m: the fused kernel takes at most {SMALL_M} tokens, got {m}")
    if m == 0:
        return grad_out.new_zeros(*grad_out.shape[:-1], cols)
    tile_prefix = _prepared(bitmap, rows, cols, tile_prefix)
    theta = theta.contiguous()
    span = _span(rows, triton.cdiv(cols, PREFIX_TILE), PREFIX_TILE, g2.device, split, 2)
    splits = triton.cdiv(rows, span)
    out = torch.empty(splits, m, cols, dtype=g2.dtype if splits == 1 else torch.float32, device=g2.device)
    kernel = _grad_input_tuned if config is None else _grad_input_heuristic
    kernel[(triton.cdiv(cols, PREFIX_TILE), splits)](
        g2, qdata, qscale.contiguous(), qoffset.contiguous(), bitmap, tile_prefix, theta, out, m, rows, cols,
        g2.stride(0), g2.stride(1), qdata.shape[1], qscale.shape[1], group_size, tile_prefix.shape[1], span,
        out.stride(0), out.stride(1), theta.numel(), BITS=bits, TILE=PREFIX_TILE, PRECISION=dot_precision(g2.dtype),
        UPCAST=DOT_UPCAST, BLOCK_M=max(16, next_power_of_2(m)),
        **({} if config is None else {**config, "BLOCK_K": PREFIX_TILE}))
    dx = out[0] if splits == 1 else out.sum(0).to(g2.dtype)
    return dx.reshape(*grad_out.shape[:-1], cols)

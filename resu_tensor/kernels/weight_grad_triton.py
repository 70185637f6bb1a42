"""CUDA versions of the weight-gradient compaction in :mod:`weight_grad`: dW = aᵀ·b restricted to
the trainable coordinates, flat in row-major order, as the dense product by cuBLAS followed by the
Triton gather of :mod:`mask_ops_triton` with the cast to ``out_dtype`` fused into it; the cost is
a rows × cols temporary in a's dtype. ``benchmarks/kernels_unrouted.py`` keeps a Triton matmul
that writes only the trainable coordinates (no temporary), to measure against this.

Import only where triton imports (``kernels/__init__.py`` checks).
"""
from typing import Optional

import torch

from . import weight_grad
from ._triton_support import cuda_op
from .mask_ops_triton import gather_by_bitmap_cast, gather_by_mask_cast


def check_operands(a: torch.Tensor, b: torch.Tensor) -> None:
    """ValueError unless a is (tokens, rows) and b (tokens, cols) of one dtype."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[0] or a.dtype != b.dtype:
        raise ValueError(f"compact_weight_grad: need a (tokens, rows) and b (tokens, cols) of one dtype, got "
                         f"{tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype}")


def _compact_weight_grad(a: torch.Tensor, b: torch.Tensor, trainable_flat: Optional[torch.Tensor],
                         out_dtype: torch.dtype) -> torch.Tensor:
    check_operands(a, b)
    dense = a.t() @ b
    if trainable_flat is None:
        return dense.reshape(-1).to(out_dtype)
    return gather_by_mask_cast(dense, trainable_flat, out_dtype)


def _compact_weight_grad_bitmap(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                                block_size: int, invert: bool, count: int, out_dtype: torch.dtype) -> torch.Tensor:
    check_operands(a, b)
    return gather_by_bitmap_cast(a.t() @ b, bitmap, block_prefix, block_size, invert, count, out_dtype)


def _fake_compact(a, b, trainable_flat, out_dtype):
    if trainable_flat is None:
        return a.new_empty(a.shape[1] * b.shape[1], dtype=out_dtype)
    return a.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=out_dtype)


def _fake_compact_bitmap(a, b, bitmap, block_prefix, block_size, invert, count, out_dtype):
    return a.new_empty(count, dtype=out_dtype)


# The ops (weight_grad's signatures); the gathers' kernels are declared with the gather ops.
compact_weight_grad = cuda_op(weight_grad.compact_weight_grad, _compact_weight_grad, _fake_compact)
compact_weight_grad_bitmap = cuda_op(weight_grad.compact_weight_grad_bitmap, _compact_weight_grad_bitmap,
                                     _fake_compact_bitmap)

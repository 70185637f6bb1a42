"""Reference for the weight-gradient compaction: dW = aᵀ·b, keeping only trainable coordinates."""
from typing import Optional

import torch

from . import mask_ops
from ._table import kernel_op


@kernel_op
def compact_weight_grad(a: torch.Tensor, b: torch.Tensor, trainable_flat: Optional[torch.Tensor], out_dtype: torch.dtype) -> torch.Tensor:
    """Flat trainable part of ``a.T @ b`` (row-major), in ``out_dtype``.

    ``a`` is (tokens, rows) and ``b`` is (tokens, cols) of one dtype; ``trainable_flat`` is a
    bool mask over the rows × cols result, or None when every coordinate trains. The reference
    builds the dense product; a kernel may store only the trainable coordinates instead.
    """
    dense = (a.t() @ b).to(out_dtype)
    if trainable_flat is None:
        return dense.reshape(-1)
    return dense.reshape(-1)[trainable_flat]


@kernel_op
def compact_weight_grad_bitmap(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                               block_size: int, invert: bool, count: int, out_dtype: torch.dtype) -> torch.Tensor:
    """:func:`compact_weight_grad` with the trainable set given as a packed bitmap: its set bits
    (clear bits if ``invert``, e.g. the pruned set of a mask bitmap), ``count`` of them."""
    dense = a.t() @ b
    if dense.dtype != out_dtype:
        dense = dense.to(out_dtype)
    return mask_ops.gather_by_bitmap(dense, bitmap, block_prefix, block_size, invert, count)

"""Reference for the weight-gradient compaction: dW = aᵀ·b, keeping only trainable coordinates."""
from typing import Optional

import torch


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

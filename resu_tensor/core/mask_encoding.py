"""Mask encodings: whichever of int32 indices or a bitmap is smaller for a given mask.

* ``active_indices`` / ``pruned_indices``: sorted row-major flat int32 indices of the smaller
  side, 4 bytes each; wins only at very low or very high sparsity.
* ``bitmap``: 1 bit per element (``ceil(numel / 8)`` bytes) plus int32 prefix counts per block of
  ``prefix_block_size(in_features)`` elements (block 0's prefix, always 0, is not stored).
* ``none``: no mask (DENSE).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from resu_tensor import kernels

KINDS = ("none", "bitmap", "active_indices", "pruned_indices")
_INT32_LIMIT = 2**31 - 1


def prefix_block_size(in_features: int) -> int:
    """Elements per prefix-count block: a multiple of 1024 that is at least one row long, so a
    weight never holds more prefix counts than rows."""
    return 1024 * max(1, -(-in_features // 1024))


@dataclass(frozen=True)
class EncodedMask:
    kind: str
    bitmap: Optional[torch.Tensor] = None
    block_prefix: Optional[torch.Tensor] = None
    indices: Optional[torch.Tensor] = None


def bitmap_nbytes(numel: int, in_features: int) -> int:
    n_blocks = -(-numel // prefix_block_size(in_features))
    return -(-numel // 8) + 4 * max(n_blocks - 1, 0)


def encode_mask(mask: torch.Tensor) -> EncodedMask:
    """Encode a 2-D bool mask (True = active) in its smallest form."""
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"encode_mask expects a 2-D bool mask, got dtype={mask.dtype} shape={tuple(mask.shape)}")
    numel = mask.numel()
    if numel > _INT32_LIMIT:
        raise ValueError(f"weights with more than {_INT32_LIMIT} elements are not supported (got {numel})")
    flat = mask.reshape(-1)
    n_active = int(flat.sum())
    n_pruned = numel - n_active
    index_bytes = 4 * min(n_active, n_pruned)
    if index_bytes < bitmap_nbytes(numel, mask.shape[1]):
        side = flat if n_active <= n_pruned else ~flat
        kind = "active_indices" if n_active <= n_pruned else "pruned_indices"
        return EncodedMask(kind, indices=side.nonzero().view(-1).to(torch.int32))
    return EncodedMask(
        "bitmap",
        bitmap=kernels.pack_bitmap(flat),
        block_prefix=kernels.block_prefix_counts(flat, prefix_block_size(mask.shape[1])),
    )


def decode_mask(encoded: EncodedMask, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The (rows, cols) bool mask (True = active) that ``encoded`` stands for."""
    numel = shape[0] * shape[1]
    if encoded.kind == "none":
        return torch.ones(shape, dtype=torch.bool, device=device)
    if encoded.kind == "bitmap":
        return kernels.unpack_bitmap(encoded.bitmap, numel).view(shape)
    fill = encoded.kind == "pruned_indices"
    flat = torch.full((numel,), fill, dtype=torch.bool, device=device)
    flat[encoded.indices.long()] = not fill
    return flat.view(shape)


def active_count(encoded: EncodedMask, numel: int, unpacked: Optional[torch.Tensor] = None) -> int:
    """Set coordinates of ``encoded``; ``unpacked``: its bitmap already unpacked (saves a pass)."""
    if encoded.kind == "none":
        return numel
    if encoded.kind == "active_indices":
        return encoded.indices.numel()
    if encoded.kind == "pruned_indices":
        return numel - encoded.indices.numel()
    if unpacked is None:
        unpacked = kernels.unpack_bitmap(encoded.bitmap, numel)
    return int(unpacked.sum())


def encoded_nbytes(encoded: EncodedMask) -> int:
    return sum(t.nbytes for t in (encoded.bitmap, encoded.block_prefix, encoded.indices) if t is not None)

"""Plain-PyTorch references for the mask utilities (bitmap packing, prefix counts, compaction).

Conventions shared with every kernel: a mask is flattened row-major; bit ``j`` of bitmap byte
``i`` is element ``8 * i + j``; compact vectors list the selected elements in row-major order.
"""
import torch

_BIT_WEIGHTS = [1 << j for j in range(8)]


def pack_bitmap(mask_flat: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool mask into ``ceil(n / 8)`` uint8 bytes, little-endian bits."""
    n = mask_flat.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask_flat.device)
    padded[:n] = mask_flat.to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask_flat.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bitmap(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmap`: a 1-D bool mask of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    bits = (bitmap.view(-1, 1) >> shifts) & 1
    return bits.view(-1)[:numel].bool()


def block_prefix_counts(mask_flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """Number of set elements before the start of blocks 1, 2, ... (block 0 starts at 0).

    int32, ``ceil(n / block_size) - 1`` entries: kernels find an element's compact position as
    the prefix of its block plus a popcount inside the block.
    """
    n = mask_flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.zeros(n_blocks * block_size, dtype=torch.int64, device=mask_flat.device)
    padded[:n] = mask_flat.to(torch.int64)
    per_block = padded.view(n_blocks, block_size).sum(dim=1)
    return per_block.cumsum(0)[:-1].to(torch.int32)


def gather_trainable(values: torch.Tensor, trainable_flat: torch.Tensor) -> torch.Tensor:
    """The selected elements of ``values`` (any shape, read row-major) as a new 1-D tensor."""
    return values.reshape(-1)[trainable_flat]


def scatter_trainable_(values: torch.Tensor, trainable_flat: torch.Tensor, compact: torch.Tensor) -> torch.Tensor:
    """Write ``compact`` into the selected elements of contiguous ``values``; others stay untouched."""
    values.view(-1).masked_scatter_(trainable_flat, compact.to(values.dtype))
    return values

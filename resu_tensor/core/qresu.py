"""QRESU storage: frozen active weights W_A as 4/8-bit group-wise codes, θ as a flat tensor.

It is QLoRA's idea applied to RESU's frozen active set: during the RESU phase W_A never changes,
so it is stored compressed while θ (p values, row-major over the pruned coordinates) stays in
full precision and trains.
"""
from typing import Optional

import torch

from resu_tensor import kernels
from resu_tensor.kernels import quant
from resu_tensor.core.mask_encoding import prefix_block_size
from resu_tensor.core.tracing import is_traced

QUANT_BITS = (4, 8)


def check_quant_args(bits: int, group_size: Optional[int], in_features: int) -> int:
    """Validated group size (None = per-channel, one group per row)."""
    if bits not in QUANT_BITS:
        raise ValueError(f"quantize_bits must be one of {QUANT_BITS}, got {bits!r}")
    if group_size is None:
        return in_features
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even int >= 2 or None (per-channel), got {group_size!r}")
    return group_size


def quantize_active(values: torch.Tensor, keep: torch.Tensor, bits: int, group_size: int) -> tuple:
    """(qdata, qscale, qoffset) for the kept coordinates of ``values``."""
    codes, scale, offset = quant.quantize_groupwise(values, keep, bits, group_size)
    qdata = quant.pack_4bit(codes) if bits == 4 else codes
    return qdata, scale, offset


def kernel_operands(tensor) -> tuple[tuple, tuple]:
    """The QRESU kernels' arguments of a bitmap-masked QRESU weight, around their input or dtype:
    (qdata, qscale, qoffset, bits, group_size, cols) and (bitmap, block_prefix, block_size, θ)."""
    cols = tensor.storage_shape[1]
    return ((tensor.qdata, tensor.qscale, tensor.qoffset, tensor.quant_bits, tensor.group_size, cols),
            (tensor.mask_bitmap, tensor.mask_block_prefix, prefix_block_size(cols), tensor.theta))


def tile_prefix(tensor, tokens: int, grad_input: bool) -> Optional[torch.Tensor]:
    """The fused matmuls' table of θ entries before each (row, PREFIX_TILE-column tile), kept
    while the mask is unchanged (building it is a kernel launch and a cumsum per call). None
    where the kernels will not fuse a product of ``tokens`` tokens (they build W_eff instead, see
    ``quant.fused_forward_tokens``) and while tracing (the op builds it inside the graph)."""
    rows, cols = tensor.storage_shape
    fused_tokens = quant.FUSED_GRAD_INPUT_TOKENS if grad_input else quant.fused_forward_tokens(
        tensor.quant_bits, cols, tensor.group_size)
    bitmap = tensor.mask_bitmap
    if tokens > fused_tokens or is_traced(bitmap):
        return None
    return tensor.kept_while_unchanged("_tile_prefix_cache", bitmap, lambda: kernels.bitmap_tile_prefix(
        bitmap, rows, cols, kernels.PREFIX_TILE, True))


def effective_weight(tensor) -> torch.Tensor:
    """Dense W_eff (storage orientation, compute dtype): dequantized W_A at active coordinates,
    θ at pruned ones."""
    if tensor.mask_kind == "bitmap" and (tensor.qdata.device.type == "cuda" or not is_traced(tensor.qdata)):
        quantized, mask = kernel_operands(tensor)
        return kernels.qresu_effective_weight(*quantized, tensor.compute_dtype, *mask)
    cols = tensor.storage_shape[1]
    keep = tensor.storage_mask()
    dense = quant.dequantize_active(tensor.qdata, tensor.qscale, tensor.qoffset, tensor.quant_bits, tensor.group_size,
                                    cols, tensor.compute_dtype, keep)
    return kernels.scatter_trainable_(dense, ~keep.view(-1), tensor.theta)


def gather_inputs(tensor, theta_capacity: int) -> tuple:
    """A QRESU row shard as the packed all-gather inputs of FSDP2: (codes, scales, offsets, mask
    bitmap of the shard's rows (any mask encoding), θ zero-padded to ``theta_capacity``).

    Example::

        codes, scales, offsets, bitmap, theta = gather_inputs(shard, shard.theta.numel() + 3)
    """
    bitmap = tensor.mask_bitmap if tensor.mask_kind == "bitmap" else kernels.pack_bitmap(
        tensor.storage_mask().reshape(-1))
    theta = tensor.theta
    if theta.numel() < theta_capacity:
        theta = torch.cat([theta, theta.new_zeros(theta_capacity - theta.numel())])
    return (tensor.qdata.contiguous(), tensor.qscale.contiguous(), tensor.qoffset.contiguous(), bitmap.contiguous(),
            theta.contiguous())


def effective_weight_from_gathered(gathered: tuple, theta_lengths: list[int], rows_per_rank: int, cols: int,
                                   bits: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense W_eff (world · rows_per_rank, cols) in ``dtype`` from the all-gathered outputs of
    :func:`gather_inputs` (each input's per-rank chunks stacked along dim 0; ``theta_lengths``: each
    rank's θ length before padding): the kernel the unsharded weight uses, on the whole layer's
    codes, scales, mask and θ, so the result equals the rows of each shard's own W_eff bit for bit.

    Example::

        inputs = [gather_inputs(shard, capacity) for shard in shards]       # one per rank
        gathered = [torch.cat(parts) for parts in zip(*inputs)]
        w = effective_weight_from_gathered(gathered, [s.theta.numel() for s in shards], rows, cols, 4, 128,
                                           torch.bfloat16)
    """
    qdata, qscale, qoffset, bitmaps, thetas = gathered
    world = len(theta_lengths)
    rows, shard_numel = world * rows_per_rank, rows_per_rank * cols
    # each rank's bits start on a byte: unpack per rank, then pack the whole layer's mask
    keep = kernels.unpack_bitmap(bitmaps.reshape(-1), bitmaps.numel() * 8).view(world, -1)[:, :shard_numel]
    keep = keep.reshape(-1)
    thetas = thetas.reshape(world, -1)
    theta = torch.cat([thetas[r, :n] for r, n in enumerate(theta_lengths)])
    block = prefix_block_size(cols)
    return kernels.qresu_effective_weight(qdata.reshape(rows, -1), qscale.reshape(rows, -1),
                                          qoffset.reshape(rows, -1), bits, group_size, cols, dtype,
                                          kernels.pack_bitmap(keep), kernels.block_prefix_counts(keep, block),
                                          block, theta)

"""CPU versions of the bitmap-selection ops of :mod:`mask_ops` and :mod:`weight_grad`, on the C
loops of ``_bitmap_cpu.c`` (built with the package where a C compiler is present;
``HAS_CPU_KERNELS`` says whether it was): the gather and the in-place updates walk the bitmap
itself, 16 elements per step (AVX-512's masked, compressing and expanding loads and stores where
the CPU has them), so no positions are decoded or kept.

The loops read and write float32 contiguous CPU tensors; any other call (another dtype, a view
that is not contiguous, a tensor that needs autograd, a traced or subclassed tensor, an update op
the loops do not compute bit for bit as torch does) runs the plain-PyTorch reference, so results
never depend on which one ran.
"""
from typing import List, Optional

import torch

from . import mask_ops, weight_grad
from ._table import declared

try:
    from . import _bitmap_cpu
except ImportError:  # built without a C compiler: the references serve
    _bitmap_cpu = None

HAS_CPU_KERNELS = _bitmap_cpu is not None

# update_by_bitmap_ op → its number in _bitmap_cpu.c. "add" only with alpha 1 (torch contracts
# v + s·t1 for other alphas into one rounding); addcdiv as "add" of (s·t1)/t2 computed by torch
# over the compact operands, which is how torch's CPU addcdiv rounds it in float32; lerp and
# addcmul take the reference.
_LOOP_OPS = {"mul_scalar": 0, "mul": 1, "add": 2, "addcdiv": 2, "copy": 3}


def _checked_count(op: str, bitmap: torch.Tensor, numel: int, invert: bool, count: Optional[int]) -> None:
    """ValueError unless ``bitmap`` covers ``numel`` elements and selects ``count`` of them (if
    given): checked before the loops read or write past a tensor's end."""
    if numel > 8 * bitmap.numel():
        raise ValueError(f"{op}: a bitmap of {bitmap.numel()} bytes holds at most {8 * bitmap.numel()} elements, "
                         f"not {numel}")
    if count is not None:
        mask_ops.check_selected_count(op, _bitmap_cpu.count_selected(bitmap.data_ptr(), numel, bool(invert)), count)


def _loop_operands(bitmap: torch.Tensor, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether the C loops may read ``bitmap`` (plain contiguous uint8 CPU memory) and read and
    write ``tensors`` (None entries are absent operands): plain float32 CPU memory, contiguous,
    outside autograd. Not autograd's zero tensors (no memory behind them) nor lazily negated views
    (their memory holds −t)."""
    if not (type(bitmap) is torch.Tensor and bitmap.device.type == "cpu" and bitmap.dtype == torch.uint8
            and bitmap.is_contiguous()):
        return False
    grad = torch.is_grad_enabled()
    return all(t is None or (type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32
                             and t.is_contiguous() and not (grad and t.requires_grad) and not t._is_zerotensor()
                             and not t.is_neg()) for t in tensors)


def gather_by_bitmap(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                     invert: bool, count: int) -> torch.Tensor:
    if not _loop_operands(bitmap, values):
        return mask_ops.gather_by_bitmap(values, bitmap, block_prefix, block_size, invert, count)
    _checked_count("gather_by_bitmap", bitmap, values.numel(), invert, count)
    out = torch.empty(count, dtype=values.dtype)
    _bitmap_cpu.gather(bitmap.data_ptr(), values.numel(), bool(invert), values.data_ptr(), out.data_ptr())
    return out


def compact_weight_grad_bitmap(a: torch.Tensor, b: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor,
                               block_size: int, invert: bool, count: int, out_dtype: torch.dtype) -> torch.Tensor:
    if out_dtype != torch.float32 or a.dtype != torch.float32:
        return weight_grad.compact_weight_grad_bitmap(a, b, bitmap, block_prefix, block_size, invert, count, out_dtype)
    return gather_by_bitmap(a.t() @ b, bitmap, block_prefix, block_size, invert, count)


def update_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                      invert: bool, op: str, tensor1, tensor2, scalar: float) -> torch.Tensor:
    mask_ops.check_update(op, values, tensor1, tensor2)
    loop_op = _LOOP_OPS.get(op)
    if loop_op is None or (op == "add" and scalar != 1) or not _loop_operands(bitmap, values, tensor1, tensor2):
        return mask_ops.update_by_bitmap_(values, bitmap, block_prefix, block_size, invert, op, tensor1, tensor2,
                                          scalar)
    _checked_count("update_by_bitmap_", bitmap, values.numel(), invert,
                   tensor1.numel() if tensor1 is not None else None)  # before any write
    if op == "addcdiv":  # into the selection's work vector: a new one per step would fault its pages in
        scratch = mask_ops.selection_scratch(bitmap, values.numel(), invert, tensor1.numel())
        tensor1 = torch.mul(tensor1, scalar, out=scratch).div_(tensor2)
    operand = tensor1 if tensor1 is not None else values  # mul_scalar reads none: any valid address
    _bitmap_cpu.update(bitmap.data_ptr(), values.numel(), bool(invert), values.data_ptr(), loop_op,
                       operand.data_ptr(), float(scalar))
    return values


def foreach_update_by_bitmap_(values: List[torch.Tensor], bitmaps: List[torch.Tensor],
                              block_prefixes: List[torch.Tensor], block_sizes: List[int], inverts: List[bool], op: str,
                              tensor1s: List[Optional[torch.Tensor]], tensor2s: List[Optional[torch.Tensor]],
                              scalars: List[float]) -> None:
    mask_ops.update_each_weight_(update_by_bitmap_, values, bitmaps, block_prefixes, block_sizes, inverts, op,
                                 tensor1s, tensor2s, scalars)


if HAS_CPU_KERNELS:  # each op's CPU implementation in the kernel table, beside its reference
    for reference, cpu in [(mask_ops.gather_by_bitmap, gather_by_bitmap),
                           (weight_grad.compact_weight_grad_bitmap, compact_weight_grad_bitmap),
                           (mask_ops.update_by_bitmap_, update_by_bitmap_),
                           (mask_ops.foreach_update_by_bitmap_, foreach_update_by_bitmap_)]:
        declared(reference).implementations["cpu"] = cpu

"""Triton version of :func:`mask_ops.update_by_bitmap_`: an optimizer's in-place op (mul_, add_,
addcmul_, addcdiv_, lerp_, copy_) on a bitmap-selected weight in one pass (read the selected
weights and their compact operands, write the weights back), instead of a gather, the op on the
compact vector and a scatter.

Formulas are those of aten's CUDA kernels, in float32 (opmath): ``v + s * (t1 / t2)`` for
addcdiv, torch.lerp's two-sided form. Import only where triton imports (``kernels/__init__.py``
checks).
"""
from typing import Optional

import torch

from . import mask_ops
from ._triton_support import (block_walk, cast_to, chunk_elements, chunk_selection, define_op, eager_or_op,
                              selected_before_block, tl, triton)


@triton.jit
def _update_bitmap_kernel(values_ptr, bitmap_ptr, block_prefix_ptr, t1_ptr, t2_ptr, numel, block_size, n_compact,
                          scalar, INVERT: tl.constexpr, OP: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """One program per prefix block; positions as in mask_ops_triton._bitmap_move_kernel."""
    block = tl.program_id(0)
    start = block.to(tl.int64) * block_size
    running = selected_before_block(block_prefix_ptr, block, start, INVERT)
    for offset in range(0, block_size, CHUNK):
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        if OP != "copy":  # before the mask walk; the store stays selected
            v = tl.load(values_ptr + element, mask=inside).to(tl.float32)
        flags, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel, n_compact,
                                                    INVERT, ALIGNED, CHUNK)
        if OP == "copy":
            out = tl.load(t1_ptr + position, mask=selected).to(tl.float32)
        elif OP == "mul_scalar":
            out = v * scalar
        else:
            a = tl.load(t1_ptr + position, mask=selected).to(tl.float32)
            # aten's CUDA formulas as nvcc compiles them (a + b·c contracted to one fma), written
            # out so the result does not depend on Triton's fp-fusion default.
            if OP == "mul":
                out = v * a
            elif OP == "add":
                out = tl.fma(scalar, a, v)
            elif OP == "addcmul":
                out = tl.fma(scalar, a * tl.load(t2_ptr + position, mask=selected).to(tl.float32), v)
            elif OP == "addcdiv":  # IEEE division (Triton's / is approximate)
                b = tl.load(t2_ptr + position, mask=selected, other=1.0).to(tl.float32)
                out = tl.fma(scalar, tl.math.div_rn(a, b), v)
            else:  # lerp, from the nearer end as aten does
                out = tl.where(tl.abs(scalar) < 0.5, tl.fma(scalar, a - v, v), tl.fma(v - a, 1.0 - scalar, a))
        tl.store(values_ptr + element, cast_to(out, values_ptr.dtype.element_ty), mask=selected)
        running += tl.sum(flags, axis=0).to(tl.int64)


def _update_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                       invert: bool, op: str, tensor1: Optional[torch.Tensor], tensor2: Optional[torch.Tensor],
                       scalar: float) -> None:
    mask_ops.check_update(op, values, tensor1, tensor2)
    if not values.is_contiguous():
        raise ValueError("update_by_bitmap_: values must be contiguous")
    # No compact operand (mul_scalar): nothing to bound positions by; they stay below numel.
    n_compact = values.numel() if tensor1 is None else tensor1.numel()
    if values.numel() == 0 or n_compact == 0:
        return
    t1 = values if tensor1 is None else tensor1.contiguous()  # unused pointers still need a tensor
    t2 = t1 if tensor2 is None else tensor2.contiguous()
    _update_bitmap_kernel[(triton.cdiv(values.numel(), block_size),)](
        values, bitmap, block_prefix, t1, t2, values.numel(), block_size, n_compact, float(scalar),
        INVERT=bool(invert), OP=op, **block_walk(block_size))


def _fake_update(values, bitmap, block_prefix, block_size, invert, op, tensor1, tensor2, scalar):
    return None


def _returning_values(values, *args):
    _update_by_bitmap_(values, *args)
    return values


update_by_bitmap_op = define_op("update_by_bitmap_", _update_by_bitmap_, _fake_update, mutates_args=["values"])
# What the kernel table registers for "cuda" (signature and result of mask_ops.update_by_bitmap_).
update_by_bitmap_ = eager_or_op("update_by_bitmap_", _returning_values, update_by_bitmap_op,
                                mask_ops.update_by_bitmap_, returns_first_arg=True)

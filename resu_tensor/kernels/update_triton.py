"""Triton version of :func:`mask_ops.update_by_bitmap_`: an optimizer's in-place op (mul_, add_,
addcmul_, addcdiv_, lerp_, copy_) on a bitmap-selected weight in one pass (read the selected
weights and their compact operands, write the weights back), instead of a gather, the op on the
compact vector and a scatter.

Formulas are those of aten's CUDA kernels, in float32 (opmath): ``v + s * (t1 / t2)`` for
addcdiv, torch.lerp's two-sided form. Import only where triton imports (``kernels/__init__.py``
checks).
"""
import itertools
from typing import List, Optional

import torch

from . import mask_ops
from ._triton_support import (TABLE_COLUMNS, TL_DTYPES, Variant, address_table, block_walk, cast_to, chunk_elements,
                              chunk_count, chunk_grid, chunk_selection, cuda_op, float32_bits, load_float,
                              program_chunk, selected_before_chunk, store_float, table_chunk, table_chunk_start,
                              table_entry, table_group, table_pointer, table_row, tl, triton)


@triton.jit
def _updated(v, a, b, scalar, OP: tl.constexpr):
    """The new weights (float32) from weights ``v``, compact operands ``a``, ``b`` and ``scalar``.
    aten's CUDA formulas as nvcc compiles them (a + b·c contracted to one fma), written out so the
    result does not depend on Triton's fp-fusion default."""
    if OP == "copy":
        out = a
    elif OP == "mul_scalar":
        out = v * scalar
    elif OP == "mul":
        out = v * a
    elif OP == "add":
        out = tl.fma(scalar, a, v)
    elif OP == "addcmul":
        out = tl.fma(scalar, a * b, v)
    elif OP == "addcdiv":  # IEEE division (Triton's / is approximate)
        out = tl.fma(scalar, tl.math.div_rn(a, b), v)
    else:  # lerp, from the nearer end as aten does
        out = tl.where(tl.abs(scalar) < 0.5, tl.fma(scalar, a - v, v), tl.fma(v - a, 1.0 - scalar, a))
    return out


@triton.jit
def _update_bitmap_kernel(values_ptr, bitmap_ptr, block_prefix_ptr, t1_ptr, t2_ptr, numel, block_size, n_compact,
                          scalar, INVERT: tl.constexpr, OP: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """One program per CHUNK of a prefix block (as optim_triton._adam_bitmap_kernel); positions as in
    mask_ops_triton._gather_by_bitmap_kernel."""
    block, start, offset = program_chunk(tl.program_id(0), block_size, CHUNK)
    if start + offset < numel:
        running = selected_before_chunk(bitmap_ptr, block_prefix_ptr, block, start, offset, numel, INVERT, ALIGNED,
                                        CHUNK)
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        v = tl.zeros((CHUNK,), dtype=tl.float32)
        if OP != "copy":  # before the mask walk; the store stays selected
            v = tl.load(values_ptr + element, mask=inside).to(tl.float32)
        _, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel, n_compact,
                                                INVERT, ALIGNED, CHUNK)
        a = v
        if OP != "mul_scalar":
            a = tl.load(t1_ptr + position, mask=selected).to(tl.float32)
        b = a
        if OP == "addcmul" or OP == "addcdiv":
            b = tl.load(t2_ptr + position, mask=selected, other=1.0).to(tl.float32)
        out = _updated(v, a, b, scalar, OP)
        tl.store(values_ptr + element, cast_to(out, values_ptr.dtype.element_ty), mask=selected)


# Columns of the foreach kernel's address table (_triton_support.address_table), one row per weight.
_TABLE = (*TABLE_COLUMNS, "tensor1", "tensor2", "scalar (float32 bits)")
_WIDTH = tl.constexpr(len(_TABLE))


@triton.jit
def _foreach_update_bitmap_kernel(table_ptr, P_DTYPE: tl.constexpr, T1_DTYPE: tl.constexpr,
                                  T2_DTYPE: tl.constexpr, INVERT: tl.constexpr, OP: tl.constexpr,
                                  ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """:func:`_update_bitmap_kernel` for many weights in one launch: grid (most chunks of any
    weight, weights), as optim_triton._foreach_adam_bitmap_kernel; each row has its scalar."""
    row = tl.program_id(1)
    block, start, offset, numel, n_compact, block_size = table_chunk(table_ptr, row, tl.program_id(0), _WIDTH, CHUNK)
    if start + offset < numel:
        bitmap_ptr, running = table_chunk_start(table_ptr, row, block, start, offset, numel, _WIDTH, INVERT, ALIGNED,
                                                CHUNK)
        values_ptr = table_pointer(table_ptr, row, 0, _WIDTH, P_DTYPE)
        t1_ptr = table_pointer(table_ptr, row, 6, _WIDTH, T1_DTYPE)
        t2_ptr = table_pointer(table_ptr, row, 7, _WIDTH, T2_DTYPE)
        scalar = table_entry(table_ptr, row, 8, _WIDTH).to(tl.int32).to(tl.float32, bitcast=True)
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        v = tl.zeros((CHUNK,), dtype=tl.float32)
        if OP != "copy":
            v = load_float(values_ptr, element, inside, P_DTYPE)
        _, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel,
                                                n_compact, INVERT, ALIGNED, CHUNK)
        a = v
        if OP != "mul_scalar":
            a = load_float(t1_ptr, position, selected, T1_DTYPE)
        b = a
        if OP == "addcmul" or OP == "addcdiv":
            b = tl.where(selected, load_float(t2_ptr, position, selected, T2_DTYPE), 1.0)
        store_float(values_ptr, element, _updated(v, a, b, scalar, OP), selected, P_DTYPE)


def _operands(op: str, values: torch.Tensor, tensor1: Optional[torch.Tensor], tensor2: Optional[torch.Tensor]):
    """(t1, t2, n_compact) of a checked update: absent operands replaced by a tensor (unused
    pointers still need one); with no compact operand (mul_scalar) nothing bounds positions, which
    stay below numel."""
    mask_ops.check_update(op, values, tensor1, tensor2)
    if not values.is_contiguous():
        raise ValueError("update_by_bitmap_: values must be contiguous")
    t1 = values if tensor1 is None else tensor1.contiguous()
    t2 = t1 if tensor2 is None else tensor2.contiguous()
    return t1, t2, values.numel() if tensor1 is None else tensor1.numel()


def _update_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                       invert: bool, op: str, tensor1: Optional[torch.Tensor], tensor2: Optional[torch.Tensor],
                       scalar: float) -> None:
    t1, t2, n_compact = _operands(op, values, tensor1, tensor2)
    if values.numel() == 0 or n_compact == 0:
        return
    walk = block_walk(block_size)
    _update_bitmap_kernel[(chunk_count(values.numel(), block_size, walk["CHUNK"]),)](
        values, bitmap, block_prefix, t1, t2, values.numel(), block_size, n_compact, float(scalar),
        INVERT=bool(invert), OP=op, **walk)


def _foreach_update_by_bitmap_(values: List[torch.Tensor], bitmaps: List[torch.Tensor],
                               block_prefixes: List[torch.Tensor], block_sizes: List[int], inverts: List[bool], op: str,
                               tensor1s: List[Optional[torch.Tensor]], tensor2s: List[Optional[torch.Tensor]],
                               scalars: List[float]) -> None:
    """:func:`mask_ops.foreach_update_by_bitmap_` in one launch per group of weights that share
    dtypes, side and walk (usually one), as optim_triton's foreach Adam."""
    lists = (values, bitmaps, block_prefixes, block_sizes, inverts, tensor1s, tensor2s, scalars)
    mask_ops.check_foreach_lengths("foreach_update_by_bitmap_", lists)
    groups = {}
    for j, (p, tensor1, tensor2) in enumerate(zip(values, tensor1s, tensor2s)):
        t1, t2, n_compact = _operands(op, p, tensor1, tensor2)
        key = (bool(inverts[j]), *table_group("foreach_update_by_bitmap_", j, block_sizes[j], values=p, tensor1=t1,
                                              tensor2=t2))
        if p.numel() and n_compact:
            groups.setdefault(key, []).append((j, t1, t2, n_compact))
    for (invert, p_dtype, t1_dtype, t2_dtype, chunk, aligned), rows in groups.items():
        if len(rows) == 1:  # no table to build and copy
            j = rows[0][0]
            _update_by_bitmap_(values[j], bitmaps[j], block_prefixes[j], block_sizes[j], invert, op, tensor1s[j],
                               tensor2s[j], scalars[j])
            continue
        table = [table_row(values[j], bitmaps[j], block_prefixes[j], n_compact, block_sizes[j], t1.data_ptr(),
                           t2.data_ptr(), float32_bits(scalars[j])) for j, t1, t2, n_compact in rows]
        _foreach_update_bitmap_kernel[chunk_grid(table, chunk)](
            address_table(table, values[rows[0][0]].device), P_DTYPE=TL_DTYPES[p_dtype], T1_DTYPE=TL_DTYPES[t1_dtype],
            T2_DTYPE=TL_DTYPES[t2_dtype], INVERT=invert, OP=op, ALIGNED=aligned, CHUNK=chunk)


def _fake_update(values, bitmap, block_prefix, block_size, invert, op, tensor1, tensor2, scalar):
    return None


def _fake_foreach_update(values, bitmaps, block_prefixes, block_sizes, inverts, op, tensor1s, tensor2s, scalars):
    return None


def _update_variants(quick: bool):
    """Every op on a bf16 weight with float32 operands (clear bits) and on float32 ones (set bits)."""
    for update, (values, operand, invert) in itertools.product(mask_ops.UPDATE_OPS, [("*bf16", "*fp32", True),
                                                                                  ("*fp32", "*fp32", False)]):
        types = dict(values_ptr=values, bitmap_ptr="*u8", block_prefix_ptr="*i32", t1_ptr=operand, t2_ptr=operand,
                     numel="i32", block_size="i32", n_compact="i32", scalar="fp32")
        yield Variant(_update_bitmap_kernel, types, {"INVERT": invert, "OP": update, "ALIGNED": True, "CHUNK": 1024})


def _foreach_update_variants(quick: bool):
    yield from _update_variants(quick)  # a group of one weight
    for update, (values, operand, invert) in itertools.product(mask_ops.UPDATE_OPS, [
            (torch.bfloat16, torch.float32, True), (torch.float32, torch.float32, False)]):
        values, operand = TL_DTYPES[values], TL_DTYPES[operand]
        constexprs = {"P_DTYPE": values, "T1_DTYPE": operand, "T2_DTYPE": operand, "INVERT": invert, "OP": update,
                      "ALIGNED": True, "CHUNK": 1024}
        yield Variant(_foreach_update_bitmap_kernel, dict(table_ptr="*i64"), constexprs)


# The ops (mask_ops' signatures)
update_by_bitmap_ = cuda_op(mask_ops.update_by_bitmap_, _update_by_bitmap_, _fake_update, mutates_args=["values"],
                            returns_first_arg=True, variants=_update_variants)
foreach_update_by_bitmap_ = cuda_op(mask_ops.foreach_update_by_bitmap_, _foreach_update_by_bitmap_,
                                    _fake_foreach_update, mutates_args=["values"], variants=_foreach_update_variants)

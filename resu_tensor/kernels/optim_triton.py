"""Triton version of :mod:`optim`: the whole Adam/AdamW step of a bitmap-masked weight in one pass
(read the selected weights and their compact grad and moments, write all three back), instead of
a gather, the optimizer's element-wise ops and a scatter; and the same step for many weights in one
launch (what ``torch._fused_adamw_`` hands over: every parameter of a param group).

Import only where triton imports (``kernels/__init__.py`` checks).
"""
from typing import List

import torch

from . import optim
from .mask_ops import check_foreach_lengths
from ._triton_support import (TABLE_COLUMNS, TL_DTYPES, Variant, address_table, block_walk, cast_to, chunk_elements,
                              chunk_count, chunk_grid, chunk_selection, cuda_op, load_float, program_chunk,
                              selected_before_chunk, store_float, table_chunk, table_chunk_start, table_entry,
                              table_group, table_pointer, table_row, tl, triton)


@triton.jit
def _bias_corrections(step_ptr, beta1, beta2):
    """(1 − β1ᵗ, √(1 − β2ᵗ)) for the already incremented step count t."""
    t = tl.load(step_ptr).to(tl.float32)
    return 1.0 - tl.exp2(t * tl.log2(beta1)), tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))


@triton.jit
def _adam_update(p, g, m, v, bias1, bias2_sqrt, lr, beta1, beta2, weight_decay, eps,
                 DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
    """One Adam (DECOUPLED: AdamW) step in float32: the new (p, m, v), as optim.adam_math_."""
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        p = p - lr * weight_decay * p
    else:
        g = g + weight_decay * p
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
    return p, m, v


@triton.jit
def _adam_bitmap_kernel(values_ptr, bitmap_ptr, block_prefix_ptr, grad_ptr, m_ptr, v_ptr, step_ptr,
                        numel, block_size, n_compact, lr, beta1, beta2, weight_decay, eps,
                        INVERT: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                        ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """One program per CHUNK of a prefix block; positions as in mask_ops_triton._gather_by_bitmap_kernel."""
    block, start, offset = program_chunk(tl.program_id(0), block_size, CHUNK)
    if start + offset < numel:
        running = selected_before_chunk(bitmap_ptr, block_prefix_ptr, block, start, offset, numel, INVERT, ALIGNED,
                                        CHUNK)
        bias1, bias2_sqrt = _bias_corrections(step_ptr, beta1, beta2)
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        p = tl.load(values_ptr + element, mask=inside).to(tl.float32)  # before the mask walk; stores stay selected
        _, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel, n_compact,
                                                INVERT, ALIGNED, CHUNK)
        g = tl.load(grad_ptr + position, mask=selected).to(tl.float32)
        m = tl.load(m_ptr + position, mask=selected).to(tl.float32)
        v = tl.load(v_ptr + position, mask=selected).to(tl.float32)
        p, m, v = _adam_update(p, g, m, v, bias1, bias2_sqrt, lr, beta1, beta2, weight_decay, eps, DECOUPLED,
                               MAXIMIZE)
        tl.store(values_ptr + element, cast_to(p, values_ptr.dtype.element_ty), mask=selected)
        tl.store(m_ptr + position, cast_to(m, m_ptr.dtype.element_ty), mask=selected)
        tl.store(v_ptr + position, cast_to(v, v_ptr.dtype.element_ty), mask=selected)


# Columns of the foreach kernel's address table (_triton_support.address_table), one row per weight.
_TABLE = (*TABLE_COLUMNS, "grad", "exp_avg", "exp_avg_sq", "step")
_WIDTH = tl.constexpr(len(_TABLE))


@triton.jit
def _foreach_adam_bitmap_kernel(table_ptr, lr, beta1, beta2, weight_decay, eps, P_DTYPE: tl.constexpr,
                                G_DTYPE: tl.constexpr, S_DTYPE: tl.constexpr, INVERT: tl.constexpr,
                                DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
                                CHUNK: tl.constexpr):
    """:func:`_adam_bitmap_kernel` for many weights in one launch: grid (most chunks of any
    weight, weights); program (c, w) steps chunk c of the weight in table row w (see ``_TABLE``),
    if it has one. P/G/S_DTYPE: the weights', grads' and moments' dtypes."""
    row = tl.program_id(1)
    block, start, offset, numel, n_compact, block_size = table_chunk(table_ptr, row, tl.program_id(0), _WIDTH, CHUNK)
    if start + offset < numel:
        bitmap_ptr, running = table_chunk_start(table_ptr, row, block, start, offset, numel, _WIDTH, INVERT, ALIGNED,
                                                CHUNK)
        values_ptr = table_pointer(table_ptr, row, 0, _WIDTH, P_DTYPE)
        grad_ptr = table_pointer(table_ptr, row, 6, _WIDTH, G_DTYPE)
        m_ptr = table_pointer(table_ptr, row, 7, _WIDTH, S_DTYPE)
        v_ptr = table_pointer(table_ptr, row, 8, _WIDTH, S_DTYPE)
        bias1, bias2_sqrt = _bias_corrections(table_pointer(table_ptr, row, 9, _WIDTH, tl.float32), beta1, beta2)
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        p = load_float(values_ptr, element, inside, P_DTYPE)
        _, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel,
                                                n_compact, INVERT, ALIGNED, CHUNK)
        g = load_float(grad_ptr, position, selected, G_DTYPE)
        m = load_float(m_ptr, position, selected, S_DTYPE)
        v = load_float(v_ptr, position, selected, S_DTYPE)
        p, m, v = _adam_update(p, g, m, v, bias1, bias2_sqrt, lr, beta1, beta2, weight_decay, eps, DECOUPLED,
                               MAXIMIZE)
        store_float(values_ptr, element, p, selected, P_DTYPE)
        store_float(m_ptr, position, m, selected, S_DTYPE)
        store_float(v_ptr, position, v, selected, S_DTYPE)


def _check_adam_operands(values, grad, exp_avg, exp_avg_sq) -> None:
    for name, t in (("values", values), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"adam_by_bitmap_: {name} must be contiguous")
    if not grad.numel() == exp_avg.numel() == exp_avg_sq.numel():
        raise ValueError(f"adam_by_bitmap_: grad, exp_avg and exp_avg_sq must be the same length, got "
                         f"{grad.numel()}, {exp_avg.numel()}, {exp_avg_sq.numel()}")


def _adam_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                     invert: bool, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     step: torch.Tensor, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                     decoupled: bool, maximize: bool) -> None:
    _check_adam_operands(values, grad, exp_avg, exp_avg_sq)
    if values.numel() == 0 or grad.numel() == 0:
        return
    walk = block_walk(block_size)
    _adam_bitmap_kernel[(chunk_count(values.numel(), block_size, walk["CHUNK"]),)](
        values, bitmap, block_prefix, grad, exp_avg, exp_avg_sq, step, values.numel(), block_size, grad.numel(),
        float(lr), float(beta1), float(beta2), float(weight_decay), float(eps), INVERT=bool(invert),
        DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize), **walk)


def _foreach_adam_by_bitmap_(values: List[torch.Tensor], bitmaps: List[torch.Tensor],
                             block_prefixes: List[torch.Tensor], block_sizes: List[int], inverts: List[bool],
                             grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                             exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], lr: float, beta1: float,
                             beta2: float, weight_decay: float, eps: float, decoupled: bool, maximize: bool) -> None:
    """:func:`optim.foreach_adam_by_bitmap_` in one launch per group of weights that share dtypes,
    side and walk (usually one): a table of their addresses goes to the GPU (pinned, asynchronous)
    instead of a launch per weight, whose host cost dominates a step of many small weights."""
    lists = (values, bitmaps, block_prefixes, block_sizes, inverts, grads, exp_avgs, exp_avg_sqs, steps)
    check_foreach_lengths("foreach_adam_by_bitmap_", lists)
    groups = {}
    for j, (p, g, m, v, step) in enumerate(zip(values, grads, exp_avgs, exp_avg_sqs, steps)):
        key = (bool(inverts[j]), *table_group("foreach_adam_by_bitmap_", j, block_sizes[j], values=p, grad=g,
                                              exp_avg=m, exp_avg_sq=v))
        if m.dtype != v.dtype or step.dtype != torch.float32 or step.numel() != 1:
            raise ValueError(f"foreach_adam_by_bitmap_: weight {j} needs moments of one dtype and a one-element "
                             f"float32 step, got {m.dtype}, {v.dtype} and a {step.dtype} step of {step.numel()}")
        if p.numel() and g.numel():
            groups.setdefault(key, []).append(j)
    for (invert, p_dtype, g_dtype, s_dtype, _, chunk, aligned), rows in groups.items():
        if len(rows) == 1:  # no table to build and copy
            j = rows[0]
            _adam_by_bitmap_(values[j], bitmaps[j], block_prefixes[j], block_sizes[j], invert, grads[j], exp_avgs[j],
                             exp_avg_sqs[j], steps[j], lr, beta1, beta2, weight_decay, eps, decoupled, maximize)
            continue
        table = []
        for j in rows:
            _check_adam_operands(values[j], grads[j], exp_avgs[j], exp_avg_sqs[j])
            table.append(table_row(values[j], bitmaps[j], block_prefixes[j], grads[j].numel(), block_sizes[j],
                                   grads[j].data_ptr(), exp_avgs[j].data_ptr(), exp_avg_sqs[j].data_ptr(),
                                   steps[j].data_ptr()))
        _foreach_adam_bitmap_kernel[chunk_grid(table, chunk)](
            address_table(table, values[rows[0]].device), float(lr), float(beta1), float(beta2), float(weight_decay),
            float(eps), P_DTYPE=TL_DTYPES[p_dtype], G_DTYPE=TL_DTYPES[g_dtype], S_DTYPE=TL_DTYPES[s_dtype],
            INVERT=invert, DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize), ALIGNED=aligned, CHUNK=chunk)


def _fake_foreach_adam(values, bitmaps, block_prefixes, block_sizes, inverts, grads, exp_avgs, exp_avg_sqs, steps, lr,
                       beta1, beta2, weight_decay, eps, decoupled, maximize):
    return None


def _foreach_adam_by_bitmap_variants(quick: bool):
    """The single-weight kernel (a group of one) and the table kernel, on bf16 and float32 weights."""
    for values, invert, decoupled in [("*bf16", True, True), ("*fp32", False, False)]:
        types = dict(values_ptr=values, bitmap_ptr="*u8", block_prefix_ptr="*i32", grad_ptr=values, m_ptr=values,
                     v_ptr=values, step_ptr="*fp32", numel="i32", block_size="i32", n_compact="i32", lr="fp32",
                     beta1="fp32", beta2="fp32", weight_decay="fp32", eps="fp32")
        yield Variant(_adam_bitmap_kernel, types, {"INVERT": invert, "DECOUPLED": decoupled, "MAXIMIZE": False,
                                                   "ALIGNED": True, "CHUNK": 1024})
    for dtype, invert in [(torch.bfloat16, True), (torch.float32, False)]:
        types = dict(table_ptr="*i64", lr="fp32", beta1="fp32", beta2="fp32", weight_decay="fp32", eps="fp32")
        tl_dtype = TL_DTYPES[dtype]
        yield Variant(_foreach_adam_bitmap_kernel, types, {"P_DTYPE": tl_dtype, "G_DTYPE": tl_dtype,
                                                           "S_DTYPE": tl_dtype, "INVERT": invert, "DECOUPLED": True,
                                                           "MAXIMIZE": False, "ALIGNED": True, "CHUNK": 1024})


foreach_adam_by_bitmap_ = cuda_op(optim.foreach_adam_by_bitmap_, _foreach_adam_by_bitmap_, _fake_foreach_adam,
                                  mutates_args=["values", "exp_avgs", "exp_avg_sqs"],
                                  variants=_foreach_adam_by_bitmap_variants)


# Flat parameters whose every element trains (QRESU's θ): the same step without a mask walk, many
# parameters in one launch (torch's own fused AdamW launches per chunk of a tensor list).
_FLAT_TABLE = ("param", "grad", "exp_avg", "exp_avg_sq", "step", "numel")  # offsets from the bases, length
_FLAT_WIDTH = tl.constexpr(len(_FLAT_TABLE))
_FLAT_BLOCK, _FLAT_WARPS = 1024, 4


@triton.jit
def _adam_flat_span(p_ptr, g_ptr, m_ptr, v_ptr, element, inside, bias1, bias2_sqrt, lr, beta1, beta2, weight_decay,
                    eps, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr):
    p = tl.load(p_ptr + element, mask=inside).to(tl.float32)
    g = tl.load(g_ptr + element, mask=inside).to(tl.float32)
    m = tl.load(m_ptr + element, mask=inside).to(tl.float32)
    v = tl.load(v_ptr + element, mask=inside).to(tl.float32)
    p, m, v = _adam_update(p, g, m, v, bias1, bias2_sqrt, lr, beta1, beta2, weight_decay, eps, DECOUPLED, MAXIMIZE)
    tl.store(p_ptr + element, cast_to(p, p_ptr.dtype.element_ty), mask=inside)
    tl.store(m_ptr + element, cast_to(m, m_ptr.dtype.element_ty), mask=inside)
    tl.store(v_ptr + element, cast_to(v, v_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _adam_flat_block(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, block, body, numel, lr, beta1, beta2, weight_decay, eps,
                     DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    """Block ``block`` of the first ``body`` elements (a multiple of 16, so the masked loads and
    stores stay vectorized: an odd length makes them scalar); block 0 also the last ``numel - body``."""
    bias1, bias2_sqrt = _bias_corrections(step_ptr, beta1, beta2)
    element = block.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adam_flat_span(p_ptr, g_ptr, m_ptr, v_ptr, element, element < body, bias1, bias2_sqrt, lr, beta1, beta2,
                    weight_decay, eps, DECOUPLED, MAXIMIZE)
    if block == 0:
        tail = body + tl.arange(0, 16)
        _adam_flat_span(p_ptr, g_ptr, m_ptr, v_ptr, tail, tail < numel, bias1, bias2_sqrt, lr, beta1, beta2,
                        weight_decay, eps, DECOUPLED, MAXIMIZE)


@triton.jit
def _adam_flat_kernel(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, body, numel, lr, beta1, beta2, weight_decay, eps,
                      DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, BLOCK: tl.constexpr):
    """One parameter: program b steps block b (:func:`_adam_flat_block`)."""
    _adam_flat_block(p_ptr, g_ptr, m_ptr, v_ptr, step_ptr, tl.program_id(0), body, numel, lr, beta1, beta2,
                     weight_decay, eps, DECOUPLED, MAXIMIZE, BLOCK)


@triton.jit
def _foreach_adam_flat_kernel(p_base, g_base, m_base, v_base, step_base, table_ptr, lr, beta1, beta2, weight_decay,
                              eps, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
                              BLOCK: tl.constexpr):
    """Many parameters in one launch: grid (most blocks of any parameter, parameters); program
    (b, j) steps block b of the parameter in table row j, whose tensors lie at the table's element
    offsets from the ``*_base`` tensors (ALIGNED: every offset a multiple of 16 elements). Tensor
    arguments plus offsets, not absolute addresses turned into pointers: Triton then knows each
    pointer's dtype and alignment, and the loads vectorize."""
    block = tl.program_id(0)
    row = tl.program_id(1)
    numel = table_entry(table_ptr, row, 5, _FLAT_WIDTH)
    body = (numel // 16) * 16
    if block.to(tl.int64) * BLOCK < tl.maximum(body, 1):
        p_offset = table_entry(table_ptr, row, 0, _FLAT_WIDTH)
        g_offset = table_entry(table_ptr, row, 1, _FLAT_WIDTH)
        m_offset = table_entry(table_ptr, row, 2, _FLAT_WIDTH)
        v_offset = table_entry(table_ptr, row, 3, _FLAT_WIDTH)
        if ALIGNED:  # the same offsets, rounded where Triton's alignment analysis sees it: the loads
            # vectorize (16 bytes), which tl.multiple_of on the loaded offsets does not achieve
            p_offset = p_offset // 16 * 16
            g_offset = g_offset // 16 * 16
            m_offset = m_offset // 16 * 16
            v_offset = v_offset // 16 * 16
        _adam_flat_block(p_base + p_offset, g_base + g_offset, m_base + m_offset, v_base + v_offset,
                         step_base + table_entry(table_ptr, row, 4, _FLAT_WIDTH), block, body, numel, lr, beta1,
                         beta2, weight_decay, eps, DECOUPLED, MAXIMIZE, BLOCK)


def _refuse_flat_parameter(j: int, p, g, m, v, step) -> None:
    """ValueError naming what parameter ``j`` of a :func:`_foreach_adam_flat_` call gets wrong."""
    for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v), ("step", step)):
        if t.device != p.device:
            raise ValueError(f"foreach_adam_flat_: {name} of parameter {j} is on {t.device}, the parameter on "
                             f"{p.device}")
        if name != "step" and (not t.is_contiguous() or t.dtype not in TL_DTYPES):
            raise ValueError(f"foreach_adam_flat_: {name} of parameter {j} must be contiguous and one of "
                             f"{sorted(str(d) for d in TL_DTYPES)}, got {t.dtype}, contiguous={t.is_contiguous()}")
    optim.check_flat_lengths(j, p, g, m, v)
    raise ValueError(f"foreach_adam_flat_: parameter {j} needs moments of one dtype and a one-element "
                     f"float32 step, got {m.dtype}, {v.dtype} and a {step.dtype} step of {step.numel()}")


def _foreach_adam_flat_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                        exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], lr: float, beta1: float,
                        beta2: float, weight_decay: float, eps: float, decoupled: bool, maximize: bool) -> None:
    """:func:`optim.foreach_adam_flat_` in one launch per group of parameters that share dtypes."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
    check_foreach_lengths("foreach_adam_flat_", lists)
    groups = {}
    for j, (p, g, m, v, step) in enumerate(zip(*lists)):
        # one expression per parameter, the message only on failure: this host time grows with the
        # parameter count
        device, numel = p.device, p.numel()
        if not (g.device == device and m.device == device and v.device == device and step.device == device
                and p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous()
                and p.dtype in TL_DTYPES and g.dtype in TL_DTYPES and m.dtype in TL_DTYPES and v.dtype == m.dtype
                and g.numel() == numel and m.numel() == numel and v.numel() == numel
                and step.dtype == torch.float32 and step.numel() == 1):
            _refuse_flat_parameter(j, p, g, m, v, step)
        if numel:
            groups.setdefault((device, p.dtype, g.dtype, m.dtype), []).append(j)  # one table: one address space
    hyper = (float(lr), float(beta1), float(beta2), float(weight_decay), float(eps))
    for rows in groups.values():
        numel = max(params[j].numel() for j in rows)
        if len(rows) == 1:  # no table to build and copy
            j = rows[0]
            _adam_flat_kernel[(_flat_blocks(numel),)](
                params[j], grads[j], exp_avgs[j], exp_avg_sqs[j], steps[j], numel // 16 * 16, numel, *hyper,
                **_flat_flags(bool(decoupled), bool(maximize)))
        else:
            launch_flat_table(*flat_table(lists, rows), numel, *hyper, bool(decoupled), bool(maximize))


def _flat_blocks(numel: int) -> int:
    """Programs per parameter: blocks of the 16-multiple body (block 0 also takes the tail)."""
    return max(1, triton.cdiv(numel // 16 * 16, _FLAT_BLOCK))


def _flat_flags(decoupled: bool, maximize: bool) -> dict:
    return dict(DECOUPLED=decoupled, MAXIMIZE=maximize, BLOCK=_FLAT_BLOCK, num_warps=_FLAT_WARPS)


def flat_table(lists: tuple, rows: List[int]) -> tuple:
    """(base tensors, table, ALIGNED) of :func:`_foreach_adam_flat_kernel` for parameters ``rows``
    of ``lists`` (params, grads, exp_avgs, exp_avg_sqs, steps), one device and dtype group: each
    tensor as an element offset from the first row's tensor of its column (tensors of one dtype:
    their addresses differ by whole elements)."""
    bases = [column[rows[0]] for column in lists]
    columns = [(column, base.data_ptr(), base.element_size()) for column, base in zip(lists, bases)]
    table = [[(column[j].data_ptr() - address) // size for column, address, size in columns] + [lists[0][j].numel()]
             for j in rows]
    aligned = all(offset % 16 == 0 for row in table for offset in row[:4])
    return bases, address_table(table, bases[0].device), aligned


def launch_flat_table(bases: list, table: torch.Tensor, aligned: bool, numel: int, lr: float, beta1: float,
                      beta2: float, weight_decay: float, eps: float, decoupled: bool, maximize: bool) -> None:
    """One launch over a :func:`flat_table` (``numel``: the longest parameter's length)."""
    grid = (_flat_blocks(numel), table.shape[0])
    _foreach_adam_flat_kernel[grid](*bases, table, lr, beta1, beta2, weight_decay, eps, ALIGNED=aligned,
                                    **_flat_flags(decoupled, maximize))


def _fake_foreach_adam_flat(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, weight_decay, eps, decoupled,
                            maximize):
    return None


def _foreach_adam_flat_variants(quick: bool):
    """The single-parameter kernel and the table kernel (aligned offsets or not), bf16 and float32."""
    hyper = dict(lr="fp32", beta1="fp32", beta2="fp32", weight_decay="fp32", eps="fp32")
    flags = dict(DECOUPLED=True, MAXIMIZE=False, BLOCK=_FLAT_BLOCK)
    options = dict(num_warps=_FLAT_WARPS)
    for dtype in ("*bf16", "*fp32"):
        types = dict(p_ptr=dtype, g_ptr=dtype, m_ptr=dtype, v_ptr=dtype, step_ptr="*fp32", body="i32", numel="i32",
                     **hyper)
        yield Variant(_adam_flat_kernel, types, flags, options)
        for aligned in (True, False):
            types = dict(p_base=dtype, g_base=dtype, m_base=dtype, v_base=dtype, step_base="*fp32", table_ptr="*i64",
                         **hyper)
            yield Variant(_foreach_adam_flat_kernel, types, dict(flags, ALIGNED=aligned), options)


foreach_adam_flat_ = cuda_op(optim.foreach_adam_flat_, _foreach_adam_flat_, _fake_foreach_adam_flat,
                             mutates_args=["params", "exp_avgs", "exp_avg_sqs"], variants=_foreach_adam_flat_variants)

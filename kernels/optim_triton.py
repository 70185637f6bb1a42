"""Triton version of :mod:`optim`: the whole Adam/AdamW step of a bitmap-masked weight in one pass
(read the selected weights and their compact grad and moments, write all three back), instead of
a gather, the optimizer's element-wise ops and a scatter.

Import only where triton imports (``kernels/__init__.py`` checks).
"""
import torch

from . import optim
from ._triton_support import (block_walk, cast_to, chunk_elements, chunk_selection, define_op, eager_or_op,
                              selected_before_block, tl, triton)


@triton.jit
def _adam_bitmap_kernel(values_ptr, bitmap_ptr, block_prefix_ptr, grad_ptr, m_ptr, v_ptr, step_ptr,
                        numel, block_size, n_compact, lr, beta1, beta2, weight_decay, eps,
                        INVERT: tl.constexpr, DECOUPLED: tl.constexpr, MAXIMIZE: tl.constexpr,
                        ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """One program per prefix block; positions as in mask_ops_triton._bitmap_move_kernel."""
    block = tl.program_id(0)
    start = block.to(tl.int64) * block_size
    running = selected_before_block(block_prefix_ptr, block, start, INVERT)
    t = tl.load(step_ptr).to(tl.float32)
    bias1 = 1.0 - tl.exp2(t * tl.log2(beta1))
    bias2_sqrt = tl.sqrt(1.0 - tl.exp2(t * tl.log2(beta2)))
    for offset in range(0, block_size, CHUNK):
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        p = tl.load(values_ptr + element, mask=inside).to(tl.float32)  # before the mask walk; stores stay selected
        flags, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel, n_compact,
                                                    INVERT, ALIGNED, CHUNK)
        g = tl.load(grad_ptr + position, mask=selected).to(tl.float32)
        m = tl.load(m_ptr + position, mask=selected).to(tl.float32)
        v = tl.load(v_ptr + position, mask=selected).to(tl.float32)
        if MAXIMIZE:
            g = -g
        if DECOUPLED:
            p = p - lr * weight_decay * p
        else:
            g = g + weight_decay * p
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        p = p - (lr / bias1) * m / (tl.sqrt(v) / bias2_sqrt + eps)
        tl.store(values_ptr + element, cast_to(p, values_ptr.dtype.element_ty), mask=selected)
        tl.store(m_ptr + position, cast_to(m, m_ptr.dtype.element_ty), mask=selected)
        tl.store(v_ptr + position, cast_to(v, v_ptr.dtype.element_ty), mask=selected)
        running += tl.sum(flags, axis=0).to(tl.int64)


def _adam_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                     invert: bool, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                     step: torch.Tensor, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                     decoupled: bool, maximize: bool) -> None:
    for name, t in (("values", values), ("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if not t.is_contiguous():
            raise ValueError(f"adam_by_bitmap_: {name} must be contiguous")
    if not grad.numel() == exp_avg.numel() == exp_avg_sq.numel():
        raise ValueError(f"adam_by_bitmap_: grad, exp_avg and exp_avg_sq must be the same length, got "
                         f"{grad.numel()}, {exp_avg.numel()}, {exp_avg_sq.numel()}")
    if values.numel() == 0 or grad.numel() == 0:
        return
    _adam_bitmap_kernel[(triton.cdiv(values.numel(), block_size),)](
        values, bitmap, block_prefix, grad, exp_avg, exp_avg_sq, step, values.numel(), block_size, grad.numel(),
        float(lr), float(beta1), float(beta2), float(weight_decay), float(eps), INVERT=bool(invert),
        DECOUPLED=bool(decoupled), MAXIMIZE=bool(maximize), **block_walk(block_size))


def _fake_adam(values, bitmap, block_prefix, block_size, invert, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2,
               weight_decay, eps, decoupled, maximize):
    return None


def _returning_values(values, *args):
    _adam_by_bitmap_(values, *args)
    return values


adam_by_bitmap_op = define_op("adam_by_bitmap_", _adam_by_bitmap_, _fake_adam,
                              mutates_args=["values", "exp_avg", "exp_avg_sq"])
# What the kernel table registers for "cuda" (signature and result of optim.adam_by_bitmap_).
adam_by_bitmap_ = eager_or_op("adam_by_bitmap_", _returning_values, adam_by_bitmap_op, optim.adam_by_bitmap_,
                              returns_first_arg=True)

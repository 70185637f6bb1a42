"""Reference for the fused Adam/AdamW step on a weight's bitmap-selected coordinates, for one weight
or a list of them: the formula of ``torch._fused_adam_`` / ``torch._fused_adamw_`` (the
``fused=True`` optimizers), with the weight stored dense and its gradient and moments compact
(row-major over the selection); and the same step on flat weights that are all trainable (QRESU's θ)."""
from typing import List

import torch

from .mask_ops import check_foreach_lengths, gather_by_bitmap, scatter_by_bitmap_
from ._table import kernel_op


def adam_math_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
               step: torch.Tensor, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
               decoupled: bool, maximize: bool) -> None:
    """One Adam (``decoupled``: AdamW) step on flat tensors, in float32, in place; ``step`` is the
    already incremented step count (a one-element tensor)."""
    p, g = param.float(), grad.float()
    if maximize:
        g = -g
    if decoupled:
        p = p - lr * weight_decay * p
    else:
        g = g + weight_decay * p
    m = beta1 * exp_avg.float() + (1 - beta1) * g
    v = beta2 * exp_avg_sq.float() + (1 - beta2) * g * g
    t = step.float().reshape(())
    bias1 = 1 - torch.pow(beta1, t)
    bias2_sqrt = torch.sqrt(1 - torch.pow(beta2, t))
    p = p - (lr / bias1) * m / (torch.sqrt(v) / bias2_sqrt + eps)
    param.copy_(p)
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)


def adam_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                    invert: bool, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                    step: torch.Tensor, lr: float, beta1: float, beta2: float, weight_decay: float, eps: float,
                    decoupled: bool, maximize: bool) -> torch.Tensor:
    """:func:`adam_math_` on the elements of contiguous ``values`` whose bit is set (clear if
    ``invert``); ``grad``, ``exp_avg`` and ``exp_avg_sq`` hold one entry per selected element
    (the moments are updated in place). Every other element of ``values`` stays untouched.
    Returns ``values``."""
    flat = gather_by_bitmap(values, bitmap, block_prefix, block_size, invert, grad.numel())
    adam_math_(flat, grad, exp_avg, exp_avg_sq, step, lr, beta1, beta2, weight_decay, eps, decoupled, maximize)
    return scatter_by_bitmap_(values, bitmap, block_prefix, block_size, invert, flat)


@kernel_op
def foreach_adam_by_bitmap_(values: List[torch.Tensor], bitmaps: List[torch.Tensor], block_prefixes: List[torch.Tensor],
                            block_sizes: List[int], inverts: List[bool], grads: List[torch.Tensor],
                            exp_avgs: List[torch.Tensor], exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor],
                            lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, decoupled: bool,
                            maximize: bool) -> None:
    """:func:`adam_by_bitmap_` on each weight of equally long lists (entry j of every list
    belongs to weight j), with shared hyperparameters."""
    lists = (values, bitmaps, block_prefixes, block_sizes, inverts, grads, exp_avgs, exp_avg_sqs, steps)
    check_foreach_lengths("foreach_adam_by_bitmap_", lists)
    flats = [gather_by_bitmap(v, bitmap, prefix, block_size, invert, g.numel())
             for v, bitmap, prefix, block_size, invert, g in zip(values, bitmaps, block_prefixes, block_sizes, inverts, grads)]
    flats = _adam_math_grouped_(flats, grads, exp_avgs, exp_avg_sqs, steps,
                                (lr, beta1, beta2, weight_decay, eps, decoupled, maximize))
    for v, bitmap, prefix, block_size, invert, flat in zip(values, bitmaps, block_prefixes, block_sizes, inverts, flats):
        scatter_by_bitmap_(v, bitmap, prefix, block_size, invert, flat)


def _adam_math_grouped_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                        exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], hyper: tuple) -> List[torch.Tensor]:
    """:func:`adam_math_` on each (param, grad, exp_avg, exp_avg_sq, step) of flat tensors; the
    moments are updated in place, the new params are returned (views of a concatenation where
    grouped). Entries with the same dtypes, device, lengths and step value take one call on
    their concatenation: the step is element-wise, so each element is computed exactly as a call
    per entry would, with one set of small ops for the group instead of one per weight."""
    groups = {}
    for j, (p, g, m, v, step) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, steps)):
        if not p.numel() == g.numel() == m.numel() == v.numel():
            groups[("alone", j)] = [j]  # adam_math_ raises its own error
            continue
        key = (p.dtype, g.dtype, m.dtype, v.dtype, step.dtype, p.device, g.device, m.device, v.device, float(step))
        groups.setdefault(key, []).append(j)
    new_params = list(params)
    for members in groups.values():
        if len(members) == 1:
            j = members[0]
            adam_math_(params[j], grads[j], exp_avgs[j], exp_avg_sqs[j], steps[j], *hyper)
            continue
        p, g, m, v = (torch.cat([t[j] for j in members]) for t in (params, grads, exp_avgs, exp_avg_sqs))
        adam_math_(p, g, m, v, steps[members[0]], *hyper)
        start = 0
        for j in members:
            end = start + params[j].numel()
            new_params[j] = p[start:end]
            exp_avgs[j].copy_(m[start:end])
            exp_avg_sqs[j].copy_(v[start:end])
            start = end
    return new_params


@kernel_op
def foreach_adam_flat_(params: List[torch.Tensor], grads: List[torch.Tensor], exp_avgs: List[torch.Tensor],
                       exp_avg_sqs: List[torch.Tensor], steps: List[torch.Tensor], lr: float, beta1: float,
                       beta2: float, weight_decay: float, eps: float, decoupled: bool, maximize: bool) -> None:
    """:func:`adam_math_` on each of equally long lists of contiguous flat tensors (entry j of
    every list belongs to parameter j), with shared hyperparameters."""
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps)
    check_foreach_lengths("foreach_adam_flat_", lists)
    for j, (p, g, m, v, step) in enumerate(zip(*lists)):
        check_flat_lengths(j, p, g, m, v)
    new_params = _adam_math_grouped_(params, grads, exp_avgs, exp_avg_sqs, steps,
                                     (lr, beta1, beta2, weight_decay, eps, decoupled, maximize))
    for p, new in zip(params, new_params):
        if new is not p:
            p.copy_(new)


def check_flat_lengths(j: int, param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
                       exp_avg_sq: torch.Tensor) -> None:
    """ValueError unless parameter ``j`` of a :func:`foreach_adam_flat_` call and its grad and
    moments are equally long."""
    if not param.numel() == grad.numel() == exp_avg.numel() == exp_avg_sq.numel():
        raise ValueError(f"foreach_adam_flat_: parameter {j}, its grad and moments must be the same length, got "
                         f"{param.numel()}, {grad.numel()}, {exp_avg.numel()}, {exp_avg_sq.numel()}")

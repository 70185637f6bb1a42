"""Model-level drop-and-grow mask updates (RigL, SET) on SPARSE ResuTensor weights.

The coordinate choice is ``method/regrowth.py``'s; here it is applied to every chosen layer
through the per-tensor prune (``ResuTensor.prune`` with scores that select exactly the new
mask), all layers or none, with the optimizer state of the coordinates that stay remapped."""
from typing import Callable, Optional

import torch
from torch import nn

from resu_tensor.core.mode import Mode
from resu_tensor.method.regrowth import drop_and_grow
from resu_tensor.training.filters import FilterFn, require_chosen, resu_weights
from resu_tensor.training.lifecycle import all_or_none
from resu_tensor.training.optimizer_state import optimizer_state_kept
from resu_tensor.training.sharded import sharded_weights


def dense_gradients(model: nn.Module, probe_fn: Callable[[nn.Module], torch.Tensor],
                    filter_fn: Optional[FilterFn] = None) -> dict[str, torch.Tensor]:
    """{layer name: dense gradient (storage orientation (out, in))} of ``probe_fn(model)`` with
    respect to every chosen ResuTensor weight's effective weight, pruned coordinates included.

    For the backward each weight is replaced by a plain dense copy of W_eff (restored after,
    also on error); no ``.grad`` of the model changes and no optimizer state is made.

    Example::

        grads = dense_gradients(model, lambda m: loss_fn(m(x), y))
    """
    if sharded_weights(model, filter_fn):
        raise NotImplementedError("dense_gradients runs the model on dense copies of its weights; FSDP2-sharded "
                                  "weights are not supported")
    layers = require_chosen(list(resu_weights(model, filter_fn)), model, filter_fn, "dense_gradients")
    copies = {id(weight): nn.Parameter(weight.dequantize().detach().clone()) for _, _, weight in layers}
    # every place a chosen weight sits (a tied weight sits in several); setattr, so modules that
    # cache their parameters (RNNs' flat weights) see the swap
    slots = [(module, name, param) for module in model.modules() for name, param in module._parameters.items()
             if param is not None and id(param) in copies]
    try:
        for module, name, param in slots:
            setattr(module, name, copies[id(param)])
        loss = probe_fn(model)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise TypeError(f"probe_fn(model) must return a one-element loss tensor, got {type(loss).__name__}")
        grads = torch.autograd.grad(loss, [copies[id(weight)] for _, _, weight in layers], allow_unused=True)
    finally:
        for module, name, param in slots:
            setattr(module, name, param)
    result = {}
    for (name, _, weight), grad in zip(layers, grads):
        grad = torch.zeros(weight.logical_shape, dtype=weight.dtype, device=weight.device) if grad is None else grad
        result[name] = weight.to_storage(grad)
    return result


def drop_and_grow_(model: nn.Module, fraction: float, grow_scores: Optional[dict[str, torch.Tensor]] = None,
                   filter_fn: Optional[FilterFn] = None, generator: Optional[torch.Generator] = None, *,
                   optimizer=None) -> dict[str, tuple[int, int]]:
    """In every chosen SPARSE weight, drop ``round(fraction·n_active)`` smallest-magnitude active
    weights and grow as many coordinates pruned before the call, at zero: those of largest
    ``grow_scores[layer]`` (RigL: |dense gradient|, storage orientation) or, without
    ``grow_scores``, at random from ``generator`` (SET). The sparsity stays the same.
    ``optimizer`` (one or a list): state of coordinates that stay active is kept, grown ones
    start at zero. Returns {layer: (dropped, grown)}.

    Example::

        grads = dense_gradients(model, probe_fn)
        drop_and_grow_(model, 0.3, {n: g.abs() for n, g in grads.items()}, optimizer=optimizer)
    """
    if sharded_weights(model, filter_fn):
        raise NotImplementedError("drop_and_grow_ does not support FSDP2-sharded weights")
    layers = require_chosen(list(resu_weights(model, filter_fn)), model, filter_fn, "drop_and_grow_")
    for name, _, weight in layers:
        if weight.mode != Mode.SPARSE:
            raise ValueError(f"drop_and_grow_: layer {name!r} is in mode {weight.mode.value!r}; it needs 'sparse' "
                             "(prune first)")
        if grow_scores is not None and name not in grow_scores:
            raise ValueError(f"drop_and_grow_: grow_scores has no entry for layer {name!r}")
    plans = {}
    for name, _, weight in layers:
        keep = weight.storage_mask()
        score = None if grow_scores is None else grow_scores[name]
        plans[name] = drop_and_grow(keep, weight.values.abs(), fraction, score, generator)
    weights = [weight for _, _, weight in layers]
    with all_or_none(weights), optimizer_state_kept(optimizer, weights):
        for name, _, weight in layers:
            new_keep = plans[name][0]
            pruned = weight.storage_numel - int(new_keep.sum())
            # scores 1 on the new mask, 0 elsewhere: the prune keeps exactly the new mask
            weight.prune(pruned / weight.storage_numel, scores=new_keep.to(weight.values.dtype))
    return {name: (int(plan[1].sum()), int(plan[2].sum())) for name, plan in plans.items()}


__all__ = ["dense_gradients", "drop_and_grow_"]

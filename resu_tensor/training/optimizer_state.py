"""Optimizer state of ResuTensor parameters: find and drop what belongs to an earlier trainable set.

Covers plain ResuTensor parameters and FSDP2-sharded ones (a DTensor whose local tensor is this
rank's ResuTensor row block, with DTensor optimizer state of CompactTensors)."""
from typing import Optional

import torch
from torch import nn

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.fsdp_extension import is_sharded_resu
from resu_tensor.core.tensor import ResuTensor


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None) -> int:
    """Drop the optimizer state of every ResuTensor parameter (of ``model``, if given; plain or
    FSDP2-sharded) whose state belongs to another trainable set than the parameter's current
    one. Returns how many (on this rank). Returning 0 is normal (nothing was stale); a ``model``
    with no ResuTensor parameter at all raises ``ValueError`` (the call could never do anything:
    the weights were not converted, or the wrong model was passed).

    Example::

        rt.enter_resu_(model); rt.reset_optimizer_state_(optimizer, model)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (or None for every parameter), got {type(model).__name__}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if model is not None:
        model_params = list(model.parameters())
        if not any(isinstance(p, ResuTensor) or is_sharded_resu(p) for p in model_params):
            raise ValueError("reset_optimizer_state_: the model has no ResuTensor weight; convert its Linear weights "
                             "first: quantize_(model, rt.resu_config(...))")
        allowed = {id(p) for p in model_params}
        params = [p for p in params if id(p) in allowed]
    plain = [p for p in params if isinstance(p, ResuTensor)]
    sharded = [p for p in params if is_sharded_resu(p)]
    stale = stale_parameters(optimizer, plain) + stale_sharded_parameters(optimizer, sharded)
    for param in stale:
        del optimizer.state[param]
    return len(stale)


def stale_parameters(optimizer: torch.optim.Optimizer, params: Optional[list] = None) -> list[ResuTensor]:
    """ResuTensor parameters (of ``params``, default: all of ``optimizer``'s) whose optimizer
    state belongs to another trainable set."""
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"] if isinstance(p, ResuTensor)]
    state = optimizer.state
    return [param for param in params if any(_is_stale(v, param) for v in state.get(param, {}).values())]


def stale_sharded_parameters(optimizer: torch.optim.Optimizer, params: list) -> list:
    """FSDP2-sharded ResuTensor parameters of ``params`` whose optimizer state belongs to another
    trainable set than their shard's."""
    state = optimizer.state
    return [param for param in params
            if any(is_stale_for_shard(v, param._local_tensor) for v in state.get(param, {}).values())]


def is_stale_for_shard(value, shard: ResuTensor) -> bool:
    """Whether one optimizer state entry of a sharded parameter (a DTensor of a CompactTensor)
    was made for another trainable set than ``shard``'s."""
    local = getattr(value, "_local_tensor", value)
    return isinstance(local, CompactTensor) and local.trainable_key != shard.trainable_key


def _is_stale(value, param: ResuTensor) -> bool:
    if isinstance(value, CompactTensor):
        return value.trainable_key != param.trainable_key
    # dim() first: the step counters are 0-d, and param.shape costs a __torch_function__ call
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape

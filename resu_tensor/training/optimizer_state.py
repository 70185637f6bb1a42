"""Optimizer state of ResuTensor parameters: find and drop what belongs to an earlier trainable set."""
from typing import Optional

import torch
from torch import nn

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.tensor import ResuTensor
from resu_tensor.training.filters import resu_weights


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None) -> int:
    """Drop the optimizer state of every ResuTensor parameter (of ``model``, if given) whose state
    belongs to another trainable set than the parameter's current one. Returns how many.

    Example::

        rt.enter_resu_(model); rt.reset_optimizer_state_(optimizer, model)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    allowed = None if model is None else {id(w) for _, _, w in resu_weights(model)}
    stale = [p for p in stale_parameters(optimizer) if allowed is None or id(p) in allowed]
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


def _is_stale(value, param: ResuTensor) -> bool:
    if isinstance(value, CompactTensor):
        return value.trainable_key != param.trainable_key
    # dim() first: the step counters are 0-d, and param.shape costs a __torch_function__ call
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape

"""Model-level lifecycle functions: apply a ResuTensor method to every chosen weight."""
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from resu_tensor.compact import CompactTensor
from resu_tensor.tensor import ResuTensor

FilterFn = Callable[[nn.Module, str], bool]


def resu_weights(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> Iterator[tuple[str, nn.Module, ResuTensor]]:
    """(module name, module, weight) for every module whose ``weight`` is a ResuTensor and that
    ``filter_fn(module, name)`` accepts (all of them when it is None)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, ResuTensor) and (filter_fn is None or filter_fn(module, name)):
            yield name, module, weight


def prune_(model: nn.Module, sparsity: float, method: str = "magnitude", filter_fn: Optional[FilterFn] = None,
           generator: Optional[torch.Generator] = None) -> nn.Module:
    """Prune every chosen ResuTensor weight to ``sparsity`` (→ SPARSE).

    Example::

        rt.prune_(model, sparsity=0.7, method="magnitude")
    """
    for _, _, weight in resu_weights(model, filter_fn):
        weight.prune(sparsity, method=method, generator=generator)
    return model


def enter_resu_(model: nn.Module, epsilon: float = 0.1, freeze_active: bool = True,
                filter_fn: Optional[FilterFn] = None, generator: Optional[torch.Generator] = None) -> nn.Module:
    """Move every chosen SPARSE weight into RESU (θ in the pruned slots).

    Example::

        rt.enter_resu_(model, epsilon=0.1, freeze_active=True)
    """
    for _, _, weight in resu_weights(model, filter_fn):
        weight.enter_resu(epsilon=epsilon, freeze_active=freeze_active, generator=generator)
    return model


def commit_(model: nn.Module, strategy: str = "simple", filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Merge θ into every chosen RESU weight and pick its new mask (→ SPARSE).

    Example::

        rt.commit_(model, strategy="magnitude")
    """
    for _, _, weight in resu_weights(model, filter_fn):
        weight.commit(strategy)
    return model


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None) -> int:
    """Drop the optimizer state of every ResuTensor parameter (of ``model``, if given) whose state
    belongs to another trainable set than the parameter's current one. Returns how many.

    Example::

        rt.enter_resu_(model); rt.reset_optimizer_state_(optimizer, model)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    allowed = None if model is None else {id(w) for _, _, w in resu_weights(model)}
    dropped = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, ResuTensor) or (allowed is not None and id(param) not in allowed):
                continue
            state = optimizer.state.get(param)
            if state and any(_is_stale(v, param) for v in state.values()):
                del optimizer.state[param]
                dropped += 1
    return dropped


def _is_stale(value, param: ResuTensor) -> bool:
    if isinstance(value, CompactTensor):
        return value.trainable_key != param.trainable_key
    return isinstance(value, torch.Tensor) and value.shape == param.shape

"""Model-level lifecycle functions: apply a ResuTensor method to every chosen weight."""
from typing import Callable, Iterator, Optional

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

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
    stale = [p for p in stale_parameters(optimizer) if allowed is None or id(p) in allowed]
    for param in stale:
        del optimizer.state[param]
    return len(stale)


def stale_parameters(optimizer: torch.optim.Optimizer) -> list[ResuTensor]:
    """ResuTensor parameters whose optimizer state belongs to another trainable set."""
    return [
        param
        for group in optimizer.param_groups
        for param in group["params"]
        if isinstance(param, ResuTensor) and any(_is_stale(v, param) for v in optimizer.state.get(param, {}).values())
    ]


def _is_stale(value, param: ResuTensor) -> bool:
    if isinstance(value, CompactTensor):
        return value.trainable_key != param.trainable_key
    return isinstance(value, torch.Tensor) and value.shape == param.shape


def _refuse_stale_state(optimizer, args, kwargs) -> None:
    """Runs before every optimizer.step(): stale state raises before any coordinate moves."""
    stale = stale_parameters(optimizer)
    if stale:
        raise ValueError(
            f"{type(optimizer).__name__}.step(): optimizer state of {len(stale)} ResuTensor parameter(s) was "
            "created for an earlier trainable set (their mode or mask changed since). Call "
            "rt.reset_optimizer_state_(optimizer, model) after mode changes; the ResuScheduler does it for you."
        )


register_optimizer_step_pre_hook(_refuse_stale_state)

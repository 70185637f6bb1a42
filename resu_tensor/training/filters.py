"""Which weights a model-level call applies to."""
from typing import Callable, Iterator, Optional

from torch import nn

from resu_tensor.core.fsdp_extension import is_sharded_resu
from resu_tensor.core.tensor import ResuTensor

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


def require_chosen(chosen: list, model: nn.Module, filter_fn: Optional[FilterFn], call: str) -> list:
    """``chosen`` (the layers a model-level call found) when it is not empty, else ``ValueError``
    saying whether the model has no ResuTensor weight at all or ``filter_fn`` matched none, and how
    to convert weights. A call that finds nothing to change is a mistake, not a no-op.

    Example::

        layers = require_chosen(list(resu_weights(model, filter_fn)), model, filter_fn, "prune_")
    """
    if chosen:
        return chosen
    convert = "convert its Linear weights first: quantize_(model, rt.resu_config(...))"
    if filter_fn is None or not has_resu_weights(model):
        raise ValueError(f"{call}: the model has no ResuTensor weight; {convert}")
    raise ValueError(f"{call}: filter_fn matched none of the model's ResuTensor weights "
                     f"({[name for name, _, _ in resu_weights(model)]}); widen it, or {convert}")


def has_resu_weights(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ResuTensor (plain or FSDP2-sharded)."""
    return any(isinstance(p, ResuTensor) or is_sharded_resu(p) for p in model.parameters())

"""Which weights a model-level call applies to."""
from typing import Callable, Iterator, Optional

from torch import nn

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

"""Which weights a model-level call applies to."""
from typing import Callable, Iterator, NamedTuple, Optional

from torch import nn

from resu_tensor.core.fsdp_extension import is_sharded_resu
from resu_tensor.core.tensor import ResuTensor
from resu_tensor.training.modules import resu_param_names

FilterFn = Callable[[nn.Module, str], bool]


class ResuParameter(NamedTuple):
    """One ResuTensor parameter of a model: ``name`` is the layer's name in model-level results
    (the module name for a ``weight``, else ``module name.parameter name``), held by ``module`` as
    ``param_name``."""

    name: str
    module_name: str
    module: nn.Module
    param_name: str
    weight: ResuTensor


def layer_name(module_name: str, param_name: str) -> str:
    """The name model-level results give a parameter: its module's name for ``weight`` (so a
    model of Linear layers reads ``{"0": ..., "2": ...}``), else the parameter's qualified name.

    Example::

        layer_name("attn", "in_proj_weight")   # "attn.in_proj_weight"
    """
    if param_name == "weight":
        return module_name
    return f"{module_name}.{param_name}" if module_name else param_name


def resu_parameters(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> Iterator[ResuParameter]:
    """Every ResuTensor parameter of ``model`` that the module table (training/modules.py) lists
    for its module, where ``filter_fn(module, module name)`` accepts the module (all when None).
    A parameter shared by several modules or names (tied weights) is yielded once, under its
    first accepted owner in ``named_modules`` order.

    Example::

        [p.name for p in resu_parameters(model)]   # ["embed", "lstm.weight_ih_l0", "head"]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    seen = set()
    for module_name, module in model.named_modules():
        names = [n for n in resu_param_names(module) if isinstance(module._parameters.get(n), ResuTensor)]
        if not names or (filter_fn is not None and not filter_fn(module, module_name)):
            continue
        for param_name in names:
            weight = module._parameters[param_name]
            if id(weight) in seen:
                continue
            seen.add(id(weight))
            yield ResuParameter(layer_name(module_name, param_name), module_name, module, param_name, weight)


def resu_weights(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> Iterator[tuple[str, nn.Module, ResuTensor]]:
    """(layer name, module, weight) for every ResuTensor parameter that the module table lists
    (``weight`` of Linear/Conv/Embedding/Conv1D, MultiheadAttention's in-projection, RNN/LSTM/GRU
    ``weight_ih_l*``/``weight_hh_l*``), of modules that ``filter_fn(module, name)`` accepts (all
    when None). The layer name is the module name for ``weight``, else ``module.param``; a tied
    weight comes once.

    Example::

        for name, module, weight in rt.resu_weights(model):
            print(name, weight.mode, weight.sparsity)
    """
    for entry in resu_parameters(model, filter_fn):
        yield entry.name, entry.module, entry.weight


def replace_parameter_everywhere(model: nn.Module, old, new) -> None:
    """Register ``new`` under every (module, name) of ``model`` that holds ``old`` (ties kept).
    Goes through ``setattr`` so RNN modules refresh their cached flat weights."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is old:
                setattr(module, name, new)


def require_chosen(chosen: list, model: nn.Module, filter_fn: Optional[FilterFn], call: str) -> list:
    """``chosen`` (the layers a model-level call found) when it is not empty, else ``ValueError``
    saying whether the model has no ResuTensor weight at all or ``filter_fn`` matched none, and how
    to convert weights. A call that finds nothing to change is a mistake, not a no-op.

    Example::

        layers = require_chosen(list(resu_weights(model, filter_fn)), model, filter_fn, "prune_")
    """
    if chosen:
        return chosen
    convert = "convert its weights first: quantize_(model, rt.resu_config(...), filter_fn=rt.is_supported_module)"
    if filter_fn is None or not has_resu_weights(model):
        raise ValueError(f"{call}: the model has no ResuTensor weight; {convert}")
    raise ValueError(f"{call}: filter_fn matched none of the model's ResuTensor weights "
                     f"({[name for name, _, _ in resu_weights(model)]}); widen it, or {convert}")


def has_resu_weights(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ResuTensor (plain or FSDP2-sharded)."""
    return any(isinstance(p, ResuTensor) or is_sharded_resu(p) for p in model.parameters())

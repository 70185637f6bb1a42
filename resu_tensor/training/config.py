"""torchao entry point: ``quantize_(model, resu_config(...))`` turns the weights of the supported
module types (training/modules.py) into ResuTensors, keeping tied weights tied."""
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from resu_tensor.method.pruning import check_method, check_sparsity
from resu_tensor.core.qresu import check_quant_args
from resu_tensor.core.tensor import ResuTensor, check_weight
from resu_tensor.training.filters import replace_parameter_everywhere
from resu_tensor.training.modules import MODULE_KINDS, is_transposed_kind, resu_param_names


@dataclass
class ResuConfig(AOBaseConfig):
    """How ``quantize_`` wraps each chosen weight: pruned to ``sparsity`` by ``method``
    (``sparsity=0`` keeps it DENSE, to prune later); with ``quantize_bits`` it goes straight to
    QRESU (frozen active weights in 4/8-bit ``group_size`` groups, θ ~ N(0, (ε·σ_A)²) trainable)."""

    sparsity: float = 0.0
    method: str = "magnitude"
    quantize_bits: Optional[int] = None
    group_size: Optional[int] = 128
    epsilon: float = 0.1

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_method(self.method)
        if self.method == "wanda" and self.sparsity > 0:
            raise ValueError("quantize_ has no calibration data for wanda: quantize with sparsity=0.0, then "
                             "rt.prune_(model, sparsity, method='wanda', calibration=batches)")
        if self.quantize_bits is not None:
            check_quant_args(self.quantize_bits, self.group_size, in_features=2)
            if self.sparsity == 0:
                raise ValueError("quantize_bits stores the active weights of a pruned layer: it needs sparsity > 0")


def resu_config(sparsity: float = 0.0, method: str = "magnitude", quantize_bits: Optional[int] = None,
                group_size: Optional[int] = 128, epsilon: float = 0.1) -> ResuConfig:
    """Config for torchao's ``quantize_``.

    Example::

        from torchao.quantization import quantize_
        quantize_(model, rt.resu_config(sparsity=0.5, method="magnitude"))
        quantize_(model, rt.resu_config(sparsity=0.5, quantize_bits=4, group_size=128))  # straight to QRESU
    """
    return ResuConfig(sparsity=sparsity, method=method, quantize_bits=quantize_bits, group_size=group_size,
                      epsilon=epsilon)


# Old Parameter -> weak refs to (the config of the quantize_ call that converted it, its ResuTensor
# Parameter). torchao calls the handler once per matched module, so a Parameter shared by two modules (tied
# weights) is met twice; the second owner gets the same new Parameter. Weak keys: an entry lives
# only while something still holds the old Parameter, and ids are never reused while it does; weak
# values: the table keeps no converted weight alive.
_converted = WeakIdKeyDictionary()


@register_quantize_module_handler(ResuConfig)
def _resu_transform(module: nn.Module, config: ResuConfig, **_) -> nn.Module:
    """Convert every parameter the module table lists for ``module`` and for each supported module
    inside it (torchao does not descend into a module its filter matched: MultiheadAttention's
    ``out_proj``)."""
    owners = [(name, m, resu_param_names(m)) for name, m in module.named_modules()]
    owners = [(name, m, params) for name, m, params in owners if params]
    if not owners:
        raise TypeError(f"quantize_ with ResuConfig: {type(module).__name__} holds no supported layer; "
                        f"supported: {[kind.name for kind in MODULE_KINDS]} (use filter_fn=rt.is_supported_module)")
    made = set()  # ids of the Parameters this call made (a Parameter held under two names is met twice)
    for name, owner, params in owners:
        for param_name in params:
            where = f"{type(owner).__name__}.{param_name}" + (f" (in {name!r})" if name else "")
            if id(owner._parameters.get(param_name)) not in made:
                made.add(id(_convert(owner, param_name, config, where)))
    return module


def _convert(module: nn.Module, param_name: str, config: ResuConfig, where: str) -> nn.Parameter:
    weight = module._parameters.get(param_name)
    if isinstance(weight, ResuTensor):
        raise ValueError(f"{where} is already a ResuTensor; quantize_ it only once")
    done = _converted.get(weight) if isinstance(weight, torch.Tensor) else None
    if done is not None:
        done_config, new_param = done[0](), done[1]()
        if new_param is None:  # the converted Parameter is gone: nothing left to tie to
            done = None
        elif done_config is not config:
            raise ValueError(f"{where} is tied to a parameter an earlier quantize_ call converted; the tie would "
                             "split. Convert every module sharing it in one quantize_ call (filter_fn choosing all "
                             "of them)")
        else:
            setattr(module, param_name, new_param)  # the tie kept: one ResuTensor Parameter
            return new_param
    try:
        check_weight(weight)
    except (TypeError, ValueError) as error:
        raise type(error)(f"quantize_: {where}: {error}") from error
    new_weight = ResuTensor.from_dense(weight.detach(), sparsity=config.sparsity, method=config.method,
                                       transposed=is_transposed_kind(module))  # Conv1D: stored (in, out)
    if config.quantize_bits is not None:
        new_weight.enter_resu(config.epsilon, quantize_bits=config.quantize_bits, group_size=config.group_size)
    new_param = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    _converted[weight] = (weakref.ref(config), weakref.ref(new_param))
    replace_parameter_everywhere(module, weight, new_param)  # under every name of it in the module
    return new_param


__all__ = ["ResuConfig", "resu_config"]

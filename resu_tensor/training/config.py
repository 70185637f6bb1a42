"""torchao entry point: ``quantize_(model, resu_config(...))`` turns Linear weights into ResuTensors."""
from dataclasses import dataclass
from typing import Optional

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from resu_tensor.method.pruning import check_method, check_sparsity
from resu_tensor.core.qresu import check_quant_args
from resu_tensor.core.tensor import ResuTensor, check_weight


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


@register_quantize_module_handler(ResuConfig)
def _resu_transform(module: nn.Module, config: ResuConfig, **_) -> nn.Module:
    weight = getattr(module, "weight", None)
    if isinstance(weight, ResuTensor):
        raise ValueError(f"{type(module).__name__}.weight is already a ResuTensor; quantize_ it only once")
    check_weight(weight)
    new_weight = ResuTensor.from_dense(weight.detach(), sparsity=config.sparsity, method=config.method)
    if config.quantize_bits is not None:
        new_weight.enter_resu(config.epsilon, quantize_bits=config.quantize_bits, group_size=config.group_size)
    module.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    return module


__all__ = ["ResuConfig", "resu_config"]

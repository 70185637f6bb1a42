"""torchao entry point: ``quantize_(model, resu_config(...))`` turns Linear weights into ResuTensors."""
from dataclasses import dataclass

from torch import nn
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from resu_tensor.pruning import check_method, check_sparsity
from resu_tensor.tensor import ResuTensor, check_weight


@dataclass
class ResuConfig(AOBaseConfig):
    """How ``quantize_`` wraps each chosen weight: pruned to ``sparsity`` by ``method``
    (``sparsity=0`` keeps it DENSE, to prune later)."""

    sparsity: float = 0.0
    method: str = "magnitude"

    def __post_init__(self):
        check_sparsity(self.sparsity)
        check_method(self.method)
        if self.method == "wanda" and self.sparsity > 0:
            raise ValueError("quantize_ has no calibration data for wanda: quantize with sparsity=0.0, then "
                             "rt.prune_(model, sparsity, method='wanda', calibration=batches)")


def resu_config(sparsity: float = 0.0, method: str = "magnitude") -> ResuConfig:
    """Config for torchao's ``quantize_``.

    Example::

        from torchao.quantization import quantize_
        quantize_(model, rt.resu_config(sparsity=0.5, method="magnitude"))
    """
    return ResuConfig(sparsity=sparsity, method=method)


@register_quantize_module_handler(ResuConfig)
def _resu_transform(module: nn.Module, config: ResuConfig, **_) -> nn.Module:
    weight = getattr(module, "weight", None)
    if isinstance(weight, ResuTensor):
        raise ValueError(f"{type(module).__name__}.weight is already a ResuTensor; quantize_ it only once")
    check_weight(weight)
    new_weight = ResuTensor.from_dense(weight.detach(), sparsity=config.sparsity, method=config.method)
    module.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    return module


__all__ = ["ResuConfig", "resu_config"]

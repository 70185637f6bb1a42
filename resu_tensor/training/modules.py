"""Which module types hold weights that become ResuTensors: the one table model-level code reads.

Each row names a module type and the parameters of it that ``quantize_`` converts, and whether a
parameter is stored (in, out) (transformers' ``Conv1D``), i.e. ``ResuTensor.from_dense(w, ...,
transposed=True)``. Everything that finds ResuTensors in a model (``resu_weights``, the
lifecycle calls, export, save/load) asks :func:`resu_param_names`, so a type added here is
handled everywhere. transformers stays optional: its ``Conv1D`` is recognised by class name and
attributes, without importing transformers.
"""
from dataclasses import dataclass
from typing import Callable

from torch import nn


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (GPT-2's projections, weight stored (in, out)),
    recognised without importing transformers: a class named ``Conv1D`` in its MRO whose instances
    carry ``nf`` (its output width), as ``transformers.pytorch_utils.Conv1D`` does.

    Example::

        is_hf_conv1d(gpt2.transformer.h[0].attn.c_attn)   # True
    """
    return any(cls.__name__ == "Conv1D" for cls in type(module).__mro__) and hasattr(module, "nf")


def _weight(module: nn.Module) -> tuple[str, ...]:
    return ("weight",)


def _attention_weights(module: nn.MultiheadAttention) -> tuple[str, ...]:
    # out_proj is an nn.Linear child and is converted as its own module.
    if module._qkv_same_embed_dim:
        return ("in_proj_weight",)
    return ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def _recurrent_weights(module: nn.RNNBase) -> tuple[str, ...]:
    # weight_hr (LSTM's projection, proj_size > 0) stays a plain parameter.
    return tuple(name for name in module._flat_weights_names if name.startswith(("weight_ih_l", "weight_hh_l")))


@dataclass(frozen=True)
class ModuleKind:
    """A module type whose parameters ``param_names(module)`` become ResuTensors; ``transposed``:
    they are stored (in, out). Wanda scores every row (training/calibration.py and
    training/wanda_inputs.py say what each weight column multiplies)."""

    name: str
    matches: Callable[[nn.Module], bool]
    param_names: Callable[[nn.Module], tuple[str, ...]]
    transposed: bool = False


MODULE_KINDS = (
    ModuleKind("nn.Linear", lambda m: isinstance(m, nn.Linear), _weight),
    ModuleKind("nn.Conv1d/2d/3d", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), _weight),
    ModuleKind("nn.Embedding", lambda m: isinstance(m, nn.Embedding), _weight),
    ModuleKind("transformers Conv1D", is_hf_conv1d, _weight, transposed=True),
    ModuleKind("nn.MultiheadAttention", lambda m: isinstance(m, nn.MultiheadAttention), _attention_weights),
    ModuleKind("nn.RNN/LSTM/GRU", lambda m: isinstance(m, (nn.RNN, nn.LSTM, nn.GRU)), _recurrent_weights),
)


def module_kind(module: nn.Module):
    """The :class:`ModuleKind` row of ``module``'s type, or None when the table has none."""
    for kind in MODULE_KINDS:
        if kind.matches(module):
            return kind
    return None


def resu_param_names(module: nn.Module) -> tuple[str, ...]:
    """Names of ``module``'s own parameters that the table converts to ResuTensors (empty for a
    type it does not list).

    Example::

        resu_param_names(nn.LSTM(4, 8))   # ("weight_ih_l0", "weight_hh_l0")
    """
    kind = module_kind(module)
    return () if kind is None else kind.param_names(module)


def is_transposed_kind(module: nn.Module) -> bool:
    """Whether ``module``'s converted parameters are stored (in, out), as transformers' Conv1D."""
    kind = module_kind(module)
    return kind is not None and kind.transposed


def is_supported_module(module: nn.Module, fqn: str = "") -> bool:
    """Whether ``module`` has parameters that become ResuTensors: nn.Linear, nn.Conv1d/2d/3d,
    nn.Embedding, transformers' Conv1D, nn.MultiheadAttention (its in-projection; its
    ``out_proj`` is a Linear of its own) and nn.RNN/LSTM/GRU (``weight_ih_l*`` and
    ``weight_hh_l*``). Has the ``filter_fn(module, fqn)`` signature of ``quantize_``.

    Example::

        quantize_(model, rt.resu_config(sparsity=0.5), filter_fn=rt.is_supported_module)
    """
    return bool(resu_param_names(module))


__all__ = ["ModuleKind", "MODULE_KINDS", "module_kind", "resu_param_names", "is_transposed_kind",
           "is_supported_module", "is_hf_conv1d"]

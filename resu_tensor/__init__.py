"""resu-tensor: RESU sparse training as a drop-in PyTorch tensor subclass.

Example::

    import resu_tensor as rt
    from torchao.quantization import quantize_

    quantize_(model, rt.resu_config(sparsity=0.5))
    ...  # your own training loop and optimizer
    rt.enter_resu_(model); rt.reset_optimizer_state_(optimizer, model)
"""
import torch

from resu_tensor import ops  # noqa: F401  (registers the op tables)
from resu_tensor.compact import CompactTensor
from resu_tensor.config import ResuConfig, resu_config
from resu_tensor.lifecycle import COMMIT_STRATEGIES
from resu_tensor.memory import MemoryReport, memory_report
from resu_tensor.model_api import commit_, enter_resu_, prune_, reset_optimizer_state_, resu_weights
from resu_tensor.mode import Mode
from resu_tensor.pruning import PRUNE_METHODS
from resu_tensor.tensor import ResuTensor

# torch.load(weights_only=True) must be allowed to rebuild our tensors.
torch.serialization.add_safe_globals([ResuTensor, CompactTensor])

__all__ = [
    "ResuTensor", "CompactTensor", "Mode", "ResuConfig", "resu_config", "prune_", "enter_resu_", "commit_",
    "reset_optimizer_state_", "resu_weights", "memory_report", "MemoryReport", "PRUNE_METHODS", "COMMIT_STRATEGIES",
]

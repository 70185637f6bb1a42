"""resu-tensor: RESU sparse training as a drop-in PyTorch tensor subclass.

Example::

    import resu_tensor as rt
    from torchao.quantization import quantize_

    quantize_(model, rt.resu_config(sparsity=0.5), filter_fn=rt.is_supported_module)
    ...  # your own training loop and optimizer
    rt.enter_resu_(model); rt.reset_optimizer_state_(optimizer, model)
"""
import logging

import torch


def _import_torchao_quietly() -> None:
    # torchao warns on import about optional C++ extensions built for other torch versions
    # (harmless: we use none of them); keep those lines out of every user's output.
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        import torchao  # noqa: F401
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


_import_torchao_quietly()

from resu_tensor.core import torch_compat  # noqa: E402,F401  (torch.compile(optimizer.step) on torch 2.11)
from resu_tensor import ops  # noqa: E402,F401  (registers the op tables)
from resu_tensor.training.calibration import calibrate  # noqa: E402
from resu_tensor.core.compact import CompactTensor  # noqa: E402
from resu_tensor.training.config import ResuConfig, resu_config  # noqa: E402
from resu_tensor.training.cuda_graph import CudaGraphStep  # noqa: E402
from resu_tensor.core.transitions import COMMIT_STRATEGIES  # noqa: E402
from resu_tensor.training.memory import MemoryReport, memory_report  # noqa: E402
from resu_tensor.training.filters import resu_weights  # noqa: E402
from resu_tensor.training.modules import is_supported_module  # noqa: E402
from resu_tensor.training.lifecycle import commit_, enter_resu_, prune_  # noqa: E402
from resu_tensor.training.optimizer_state import reset_optimizer_state_  # noqa: E402
from resu_tensor.training.optimizer_state import remap_optimizer_state_  # noqa: E402
from resu_tensor.training.regrowth import dense_gradients, drop_and_grow_  # noqa: E402
from resu_tensor.method.schedule import METHODS as SCHEDULE_METHODS  # noqa: E402
from resu_tensor.training import optimizer_hook  # noqa: E402,F401  (installs the one optimizer step pre-hook)
from resu_tensor.core.mode import Mode  # noqa: E402
from resu_tensor.method.pruning import PRUNE_GRANULARITIES, PRUNE_METHODS, PRUNE_SCOPES  # noqa: E402
from resu_tensor.method.selective import SelectiveConfig, StaticSubsetConfig  # noqa: E402
from resu_tensor.method.amnesty import AmnestyStats, format_stats_table, resurrection_ratio  # noqa: E402
from resu_tensor.training.plot import plot_history  # noqa: E402
from resu_tensor.method.schedule import ScheduleConfig  # noqa: E402
from resu_tensor.training.scheduler import CycleStats, ResuScheduler, StepRecord  # noqa: E402
from resu_tensor.core.tensor import ResuTensor  # noqa: E402
from resu_tensor import distributed  # noqa: E402,F401  (rt.distributed.prepare_ddp)
from resu_tensor.training.export import to_dense_, to_semi_structured_  # noqa: E402
from resu_tensor.integrations import enable_flat_state_dict, load_resu_safetensors, save_resu_safetensors  # noqa: E402

# torch.load(weights_only=True) must be allowed to rebuild our tensors.
torch.serialization.add_safe_globals([ResuTensor, CompactTensor])

__all__ = [
    "ResuTensor", "CompactTensor", "CudaGraphStep", "Mode", "ResuConfig", "resu_config", "prune_", "enter_resu_", "commit_",
    "reset_optimizer_state_", "SelectiveConfig", "StaticSubsetConfig", "ScheduleConfig", "ResuScheduler", "CycleStats", "StepRecord",
    "AmnestyStats", "format_stats_table", "resurrection_ratio", "plot_history", "resu_weights", "is_supported_module", "memory_report", "MemoryReport", "PRUNE_METHODS", "COMMIT_STRATEGIES",
    "calibrate", "PRUNE_GRANULARITIES", "PRUNE_SCOPES", "to_dense_", "to_semi_structured_",
    "distributed", "enable_flat_state_dict", "load_resu_safetensors", "save_resu_safetensors",
]
__all__ += ["remap_optimizer_state_", "drop_and_grow_", "dense_gradients", "SCHEDULE_METHODS"]

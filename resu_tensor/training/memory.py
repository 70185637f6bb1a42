"""memory_report: the bytes a model's ResuTensor weights, grads and optimizer state hold."""
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.tensor import ResuTensor


def tensor_nbytes(t) -> int:
    """Bytes actually held by a plain, ResuTensor or CompactTensor tensor."""
    if t is None:
        return 0
    if isinstance(t, ResuTensor):
        return sum(t.nbytes_breakdown().values())
    if isinstance(t, CompactTensor):
        return t.flat.nbytes
    return t.nbytes if isinstance(t, torch.Tensor) else 0


@dataclass
class LayerMemory:
    name: str
    shape: tuple
    mode: str
    sparsity: float
    weights: int
    mask: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.mask + self.grads + self.optimizer


@dataclass
class MemoryReport:
    layers: list[LayerMemory] = field(default_factory=list)

    @property
    def total(self) -> LayerMemory:
        sums = [sum(getattr(row, f) for row in self.layers) for f in ("weights", "mask", "grads", "optimizer")]
        return LayerMemory("total", (), "", float("nan"), *sums)

    def __str__(self) -> str:
        header = ("parameter", "shape", "mode", "sparsity", "weights", "mask", "grads", "optimizer", "total")
        rows = [header]
        for r in [*self.layers, self.total]:
            shape = "x".join(map(str, r.shape))
            sparsity = "" if r.sparsity != r.sparsity else f"{r.sparsity:.3f}"
            rows.append((r.name, shape, r.mode, sparsity,
                         *(f"{v:,}" for v in (r.weights, r.mask, r.grads, r.optimizer, r.total))))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                 for row in rows]
        lines.insert(1, "-" * len(lines[0]))
        lines.insert(len(lines) - 1, "-" * len(lines[0]))
        return "\n".join(line.rstrip() for line in lines) + "\n(bytes)"


def memory_report(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> MemoryReport:
    """Per-parameter bytes: weights (values, θ, quantized W_A), mask (and a static subset, and
    bitmap positions and work vectors the CPU kernels keep between a backward and its optimizer
    step), grads and optimizer state (with RESU-Selective EMAs and gradient statistics), and their
    total.
    Plain parameters (biases, norms) are listed too, with mode "plain".

    Example::

        print(rt.memory_report(model, optimizer))
    """
    report = MemoryReport()
    for name, param in model.named_parameters():
        state = optimizer.state.get(param, {}) if optimizer is not None else {}
        optimizer_bytes = sum(tensor_nbytes(v) for v in state.values())
        if isinstance(param, ResuTensor):
            parts = param.nbytes_breakdown()
            row = LayerMemory(name, tuple(param.shape), param.mode.value, param.sparsity,
                              weights=parts["values"] + parts.get("quantized", 0),
                              mask=parts["mask"] + parts.get("subset", 0) + parts.get("selection_cache", 0),
                              grads=tensor_nbytes(param.grad),
                              optimizer=optimizer_bytes + parts.get("selective", 0) + parts.get("grad_stats", 0))
        else:
            row = LayerMemory(name, tuple(param.shape), "plain", float("nan"), tensor_nbytes(param), 0,
                              tensor_nbytes(param.grad), optimizer_bytes)
        report.layers.append(row)
    return report

"""An independent masked-dense reference: plain tensors and stock autograd, no ResuTensor code.

The trainable coordinates are one flat nn.Parameter; the frozen ones a constant. The reference
weight is ``frozen`` with the parameter scattered into the trainable slots.
"""
import torch
from torch import nn


class MaskedDenseWeight(nn.Module):
    def __init__(self, dense: torch.Tensor, trainable: torch.Tensor):
        super().__init__()
        self.register_buffer("frozen", dense.detach().clone())
        self.register_buffer("trainable", trainable.clone())
        self.flat = nn.Parameter(dense.detach()[trainable].clone())

    def weight(self) -> torch.Tensor:
        return self.frozen.masked_scatter(self.trainable, self.flat)

    def dense_grad(self) -> torch.Tensor:
        grad = torch.zeros_like(self.frozen)
        grad[self.trainable] = self.flat.grad
        return grad


def random_mask(shape, keep: float, generator=None) -> torch.Tensor:
    return torch.rand(shape, generator=generator) < keep

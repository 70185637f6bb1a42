"""Pruning scores and masks (magnitude, random) for one weight."""
from typing import Optional

import torch

PRUNE_METHODS = ("magnitude", "random")


def check_sparsity(sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {sparsity!r} ({type(sparsity).__name__})")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def check_method(method: str) -> None:
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; accepted: {', '.join(PRUNE_METHODS)}")


def check_finite(weight: torch.Tensor, what: str = "prune") -> None:
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise ValueError(f"{what}: the weight holds {bad} NaN/Inf values; scores would be meaningless")


def prune_mask(weight: torch.Tensor, sparsity: float, method: str = "magnitude",
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool mask (True = keep) keeping ``numel - round(sparsity * numel)`` coordinates of the
    highest score: |W| for ``magnitude``, uniform noise for ``random``."""
    check_sparsity(sparsity)
    check_method(method)
    check_finite(weight)
    numel = weight.numel()
    n_keep = numel - round(float(sparsity) * numel)
    if method == "magnitude":
        scores = weight.detach().abs().float().reshape(-1)
    else:
        scores = torch.rand(numel, generator=generator, device="cpu" if generator is None else generator.device).to(weight.device)
    keep = torch.zeros(numel, dtype=torch.bool, device=weight.device)
    keep[torch.topk(scores, n_keep, sorted=False).indices] = True
    return keep.view(weight.shape)

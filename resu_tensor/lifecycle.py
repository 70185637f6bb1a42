"""Mode changes of one ResuTensor: prune (→ SPARSE), enter_resu (→ RESU), commit (→ SPARSE)."""
from typing import Optional

import torch

from resu_tensor import kernels
from resu_tensor.mask_encoding import encode_mask
from resu_tensor.mode import Mode
from resu_tensor.pruning import check_finite, check_method, check_sparsity, prune_mask

COMMIT_STRATEGIES = ("simple", "magnitude")


def _require_mode(tensor, allowed: tuple[Mode, ...], action: str) -> None:
    if tensor.mode not in allowed:
        raise ValueError(
            f"{action}: the weight is in mode {tensor.mode.value!r}; {action} needs "
            f"{' or '.join(repr(m.value) for m in allowed)}"
        )


def _set_sparse(tensor, keep: torch.Tensor, target_sparsity: Optional[float]) -> None:
    values = tensor.values.masked_fill(~keep, 0)
    tensor.set_state_(values=values, mode=Mode.SPARSE, mask=encode_mask(keep),
                      trainable_side="active", target_sparsity=target_sparsity)


def prune(tensor, sparsity: float, method: str = "magnitude", generator: Optional[torch.Generator] = None) -> None:
    """DENSE/SPARSE → SPARSE at ``sparsity``: pruned coordinates become exactly zero."""
    _require_mode(tensor, (Mode.DENSE, Mode.SPARSE), "prune")
    keep = prune_mask(tensor.values, sparsity, method, generator)
    _set_sparse(tensor, keep, sparsity)


def enter_resu(tensor, epsilon: float = 0.1, freeze_active: bool = True,
               generator: Optional[torch.Generator] = None) -> None:
    """SPARSE → RESU: θ ~ N(0, (ε·σ_A)²) written in place into the pruned slots."""
    _require_mode(tensor, (Mode.SPARSE,), "enter_resu")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a non-negative float, got {epsilon!r}")
    pruned = ~tensor.storage_mask().view(-1)
    active_values = tensor.values.reshape(-1)[~pruned].float()
    sigma = active_values.std().item() if active_values.numel() > 1 else 0.0
    n_pruned = int(pruned.sum())
    noise_device = "cpu" if generator is None else generator.device
    theta = torch.randn(n_pruned, generator=generator, device=noise_device).to(tensor.values.device)
    kernels.scatter_trainable_(tensor.values, pruned, theta * (float(epsilon) * sigma))
    tensor.set_state_(values=tensor.values, mode=Mode.RESU, mask=tensor.encoded_mask(),
                      trainable_side="pruned" if freeze_active else "all")


def commit(tensor, strategy: str = "simple") -> None:
    """RESU → SPARSE. ``simple``: every θ becomes an active weight (no re-prune). ``magnitude``:
    re-prune the merged weight to the layer's sparsity by |W|."""
    if strategy not in COMMIT_STRATEGIES:
        raise ValueError(f"unknown commit strategy {strategy!r}; accepted: {', '.join(COMMIT_STRATEGIES)}")
    _require_mode(tensor, (Mode.RESU,), "commit")
    if strategy == "simple":
        keep = torch.ones_like(tensor.values, dtype=torch.bool)
    else:
        check_finite(tensor.values, "commit")
        keep = prune_mask(tensor.values, tensor.target_sparsity, "magnitude")
    _set_sparse(tensor, keep, None)


__all__ = ["prune", "enter_resu", "commit", "COMMIT_STRATEGIES", "check_method", "check_sparsity"]

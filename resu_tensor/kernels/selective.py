"""Reference for RESU-Selective's consistency filter, split in its two elementwise
passes so that the top-k thresholds between them stay on the device:

1. :func:`selective_scores_`: update the EMAs m, v with g, and score each θ: C·|g| if it passed
   the magnitude screen and C > τ, else −1 (C = |m| / (v + δ));
2. :func:`selective_apply_`: g ← C·g where the score reaches the selection threshold, else 0.

All math is float32; m and v are stored in their own dtype (float32 or bfloat16) and C is
always computed from the stored values, so both passes see the same C.
"""
import torch

from ._table import kernel_op


def _check(op: str, threshold_name: str, threshold: torch.Tensor, **flat: torch.Tensor) -> None:
    for name, t in flat.items():
        if not t.is_contiguous():
            raise ValueError(f"{op}: {name} must be contiguous, got strides {t.stride()}")
    lengths = {name: t.numel() for name, t in flat.items()}
    first = next(iter(lengths.values()))
    # pairwise, not through a set: hashing a symbolic length under torch.compile fixes its value
    if any(n != first for n in lengths.values()):
        raise ValueError(f"{op}: {', '.join(lengths)} must have the same number of elements, got {lengths}")
    if "score" in flat and flat["score"].dtype != torch.float32:
        raise ValueError(f"{op}: score must be float32 (from selective_scores_), got {flat['score'].dtype}")
    like = flat["grad"]
    if threshold.numel() != 1 or threshold.dtype != torch.float32 or threshold.device != like.device:
        raise ValueError(f"{op}: {threshold_name} must be a one-element float32 tensor on {like.device}, got "
                         f"{threshold.dtype} of shape {tuple(threshold.shape)} on {threshold.device}")


def check_scores_args(grad, m, v, screen_threshold) -> None:
    """What both implementations accept: contiguous flat tensors of one length, and a one-element
    float32 threshold on their device (a tensor, so that no value crosses to the host)."""
    _check("selective_scores_", "screen_threshold", screen_threshold, grad=grad, m=m, v=v)


def check_apply_args(grad, m, v, score, select_threshold) -> None:
    _check("selective_apply_", "select_threshold", select_threshold, grad=grad, m=m, v=v, score=score)


def consistency(m: torch.Tensor, v: torch.Tensor, delta: float) -> torch.Tensor:
    """C = |m| / (v + δ) in float32."""
    return m.float().abs() / (v.float() + delta)


@kernel_op
def selective_scores_(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta: float, tau: float, delta: float,
                      screen_threshold: torch.Tensor) -> torch.Tensor:
    """m ← β·m + (1−β)·g and v ← β·v + (1−β)·|g| in place; returns the float32 score
    C·|g| where |g| ≥ ``screen_threshold`` (a one-element tensor) and C > τ, else −1."""
    check_scores_args(grad, m, v, screen_threshold)
    g = grad.float()
    m.copy_(beta * m.float() + (1 - beta) * g)
    v.copy_(beta * v.float() + (1 - beta) * g.abs())
    c = consistency(m, v, delta)
    candidates = (g.abs() >= screen_threshold.reshape(())) & (c > tau)
    return torch.where(candidates, c * g.abs(), -1.0)


@kernel_op
def selective_apply_(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, score: torch.Tensor, delta: float,
                     select_threshold: torch.Tensor) -> torch.Tensor:
    """grad ← C·g where ``score`` ≥ ``select_threshold`` (a one-element tensor) and score ≥ 0,
    else 0, in place and in grad's dtype. Returns ``grad``."""
    check_apply_args(grad, m, v, score, select_threshold)
    chosen = (score >= select_threshold.reshape(())) & (score >= 0)
    return grad.copy_(torch.where(chosen, consistency(m, v, delta) * grad.float(), 0.0))

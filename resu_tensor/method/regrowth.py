"""Mask arithmetic of the sparse-training baselines (GMP, RigL, SET): which coordinates drop and
which grow. Plain tensors only; the scheduler (training/scheduler.py) applies the masks."""
import math
from typing import Optional

import torch


def gmp_sparsity(step: int, start: int, end: int, initial: float, final: float) -> float:
    """Zhu & Gupta's cubic sparsity at ``step`` of a pruning window ``[start, end]``:
    ``s_f + (s_i − s_f)·(1 − (t − start)/(end − start))³``, ``initial`` before the window and
    ``final`` after it. The cubic prunes fast while many redundant weights are left and slowly
    near the target, where each pruned weight costs more.

    Example::

        gmp_sparsity(50, 0, 100, 0.0, 0.8)  # 0.7
    """
    if end < start:
        raise ValueError(f"the pruning window must have end >= start, got start={start}, end={end}")
    if step <= start and end > start:
        return float(initial)
    if step >= end:
        return float(final)
    progress = (step - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def cosine_drop_fraction(step: int, end: int, alpha: float) -> float:
    """RigL's update fraction ``α/2·(1 + cos(π·t/T_end))``: the share of active weights a mask
    update at ``step`` drops and regrows (0 from ``end`` on).

    Example::

        cosine_drop_fraction(0, 100, 0.3)  # 0.3
    """
    if step >= end:
        return 0.0
    return alpha / 2 * (1 + math.cos(math.pi * step / end))


def smallest_active(magnitude: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` active coordinates (``keep``) of smallest ``magnitude``; ties
    go to the lower flat index, so the choice is deterministic.

    Example::

        drop = smallest_active(w.abs(), mask, 10)
    """
    return _top(-magnitude.float(), keep, count)


def largest_pruned(score: torch.Tensor, keep: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the ``count`` pruned coordinates (``~keep``) of largest ``score`` (RigL's
    grow criterion with ``score`` = |dense gradient|).

    Example::

        grow = largest_pruned(grad.abs(), mask, 10)
    """
    return _top(score.float(), ~keep, count)


def random_pruned(keep: torch.Tensor, count: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool mask of ``count`` pruned coordinates (``~keep``) drawn uniformly without replacement
    (SET's regrowth).

    Example::

        grow = random_pruned(mask, 10, torch.Generator().manual_seed(0))
    """
    return _top(torch.rand(keep.shape, generator=generator).to(keep.device), ~keep, count)


def _top(score: torch.Tensor, allowed: torch.Tensor, count: int) -> torch.Tensor:
    available = int(allowed.sum())
    if not 0 <= count <= available:
        raise ValueError(f"cannot choose {count} coordinates out of {available} candidates")
    flat = score.reshape(-1).masked_fill(~allowed.reshape(-1), -math.inf)
    # stable sort: equal scores keep flat order, so ties are broken the same way every time
    order = torch.sort(flat, descending=True, stable=True).indices[:count]
    chosen = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    chosen[order] = True
    return chosen.view(allowed.shape)


def drop_and_grow(keep: torch.Tensor, magnitude: torch.Tensor, fraction: float, grow_score: Optional[torch.Tensor],
                  generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One RigL (``grow_score`` = |dense gradient|) or SET (``grow_score`` None: random) mask
    update: drop ``round(fraction·n_active)`` smallest-magnitude active coordinates and grow as
    many of the coordinates pruned before the update, so the active count stays the same.
    Returns ``(new_keep, dropped, grown)``. A just-dropped coordinate cannot grow back in the same
    update (it would return at zero, losing its value for nothing).

    Example::

        new_keep, dropped, grown = drop_and_grow(mask, w.abs(), 0.3, grad.abs())
    """
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    count = min(round(fraction * int(keep.sum())), int((~keep).sum()))
    dropped = smallest_active(magnitude, keep, count)
    grown = largest_pruned(grow_score, keep, count) if grow_score is not None else random_pruned(keep, count, generator)
    return (keep & ~dropped) | grown, dropped, grown


__all__ = ["gmp_sparsity", "cosine_drop_fraction", "smallest_active", "largest_pruned", "random_pruned",
           "drop_and_grow"]

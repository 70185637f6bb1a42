"""Commit-time mask selection (see docs/method.md): the amnesty tournament, Wanda re-prune and the
simple merge, as pure tensor functions (plain tensors in, plain tensors out).

Typical use at commit, for one weight in RESU mode (``values`` holds W at A and θ at P)::

    scores = score_for_commit(values, "magnitude")
    ratio = resurrection_ratio(cycle, num_cycles)
    new_mask, stats = amnesty_mask(scores, old_mask, sparsity=0.5, ratio=ratio)
"""
import math
import numbers
from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from resu_tensor.method.pruning import check_sparsity

COMMIT_SCORE_METHODS = ("magnitude", "gradient", "wanda")
# How amnesty's r(c)·n_keep slots are filled: "quota" fills them with the best θ whatever their
# scores; "beats_weakest" makes r(c) a cap: a θ takes a slot only where it outscores the active
# weight it would displace.
ADMIT_RULES = ("quota", "beats_weakest")


# ---------------------------------------------------------------------------------------------
# Schedule


def resurrection_ratio(cycle: int, num_cycles: int, r_start: float = 0.10, r_end: float = 0.02) -> float:
    """Share of the kept slots reserved for resurrected coordinates at ``cycle`` of ``num_cycles``:
    r(c) = r_start − (r_start − r_end)·c/C, linear from ``r_start`` (c = 0) to ``r_end`` (c = C).

    >>> resurrection_ratio(0, 10), resurrection_ratio(5, 10), resurrection_ratio(10, 10)
    (0.1, 0.06, 0.02)
    """
    for name, value in (("cycle", cycle), ("num_cycles", num_cycles)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if num_cycles < 1:
        raise ValueError(f"num_cycles must be >= 1, got {num_cycles}")
    if not 0 <= cycle <= num_cycles:
        raise ValueError(f"cycle must be in [0, num_cycles={num_cycles}], got {cycle}")
    _check_fraction("r_start", r_start)
    _check_fraction("r_end", r_end)
    # Interpolation form of the same line: exact r_start at c = 0 and exact r_end at c = C.
    return (float(r_start) * (num_cycles - cycle) + float(r_end) * cycle) / num_cycles


# ---------------------------------------------------------------------------------------------
# Scores


def score_for_commit(values: torch.Tensor, method: str, grad_mean_abs: Optional[torch.Tensor] = None,
                     input_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Float32 (out, in) importance scores of the merged weight ``values`` (W at A, θ at P).

    ``magnitude``: |W|. ``gradient``: |W|·|ḡ| (``grad_mean_abs``: (out, in), e.g. a running mean
    of |∇W|). ``wanda``: |W|·‖X_j‖ (``input_norms``: (in,), the L2 norm of each input feature
    over calibration tokens). Arguments a method does not use are ignored.

    >>> score_for_commit(torch.tensor([[-2.0, 1.0]]), "wanda", input_norms=torch.tensor([0.5, 3.0]))
    tensor([[1., 3.]])
    """
    if method not in COMMIT_SCORE_METHODS:
        raise ValueError(f"unknown commit score method {method!r}; accepted: {', '.join(COMMIT_SCORE_METHODS)}")
    _check_matrix("values", values)
    magnitude = values.detach().float().abs()
    if method == "magnitude":
        scores = magnitude
    elif method == "gradient":
        if grad_mean_abs is None:
            raise ValueError("score method 'gradient' needs grad_mean_abs, a dense (out, in) tensor of mean |grad|")
        _check_same_shape("grad_mean_abs", grad_mean_abs, tuple(values.shape))
        scores = magnitude * grad_mean_abs.detach().float().abs().to(values.device)
    else:
        if input_norms is None:
            raise ValueError("score method 'wanda' needs input_norms, an (in,) tensor of per-input-feature L2 norms")
        if tuple(input_norms.shape) != tuple(values.shape):  # (out, in) norms: per row (a grouped conv's)
            _check_same_shape("input_norms", input_norms, (values.shape[1],))
        scores = magnitude * input_norms.detach().float().abs().to(values.device)
    _check_finite_scores(scores, f"score_for_commit({method!r})")
    return scores


# ---------------------------------------------------------------------------------------------
# Masks


@dataclass(frozen=True)
class AmnestyStats:
    """What a commit did to one weight. ``budget`` = n_keep; ``reserved_for_resurrected`` = the
    slots reserved for resurrected coordinates, round(ratio·n_keep) capped at the candidates."""
    active_kept: int
    resurrected_kept: int
    active_pruned: int
    resurrected_dropped: int
    budget: int
    budget_used: int
    reserved_for_resurrected: int


def amnesty_mask(scores: torch.Tensor, old_mask: torch.Tensor, sparsity: float, ratio: float,
                 nm: Optional[Sequence[int]] = None, admit: str = "quota") -> tuple[torch.Tensor, AmnestyStats]:
    """The relative tournament (amnesty): keep n_keep = numel − round(sparsity·numel)
    coordinates, with round(ratio·n_keep) slots reserved for resurrected ones (``old_mask`` False)
    and the rest for old-active ones (``old_mask`` True); top-k by ``scores`` runs inside each
    side separately. Slots a side cannot fill go to resurrected first, then active. Equal
    scores: the lower row-major flat index wins. Returns (bool mask, True = keep; AmnestyStats).

    ``admit="beats_weakest"``: round(ratio·n_keep) is a cap, not a quota. The kept set is the
    plain top-n_keep by score over both sides, except that at most that many resurrected
    coordinates enter it (the best ones; the slots over the cap go to the next-best active
    weights). So a resurrected coordinate is kept only where it outscores the weakest active
    weight that would otherwise be kept, and a commit whose θ all score below the active weights
    keeps the old active set (while it has n_keep weights). ``stats.reserved_for_resurrected``
    is then the cap.

    ``nm=(N, M)``: every run of M consecutive elements in a row keeps exactly N (``sparsity``
    must then be 1 − N/M). Chosen rule: first run the plain tournament above; it fixes the split
    R = how many resurrected coordinates are kept. Then choose the N:M mask that keeps exactly R
    resurrected (or the nearest count the layout allows) and, among those, minimises the sum of
    *relative ranks* (rank inside its own side / that side's slots; < 1 exactly for the plain
    winners). It is solved exactly by a greedy exchange per N:M group (the cost of taking one
    more resurrected coordinate in a group grows with each one taken). Why: repairing by raw
    score lets large old weights evict the small resurrected ones and undoes the reservation;
    repairing by relative rank alone skews the split (there are many more candidate losers than
    active losers to fill from). This rule keeps the plain split exactly whenever the N:M layout
    allows it and returns the plain mask unchanged when that mask is already N:M.

    >>> scores = torch.tensor([[0.9, 0.1, 0.5, 0.05], [0.3, 0.02, 0.8, 0.04]])
    >>> old = torch.tensor([[True, False, True, False], [True, False, True, False]])
    >>> mask, stats = amnesty_mask(scores, old, sparsity=0.5, ratio=0.25)
    >>> mask  # plain top-4 by score would keep 0.3 instead of the resurrected 0.1
    tensor([[ True,  True,  True, False],
            [False, False,  True, False]])
    >>> stats.resurrected_kept, stats.active_kept, stats.budget_used
    (1, 3, 4)
    >>> amnesty_mask(scores, old, sparsity=0.5, ratio=0.25, admit="beats_weakest")[1].resurrected_kept  # 0.1 < 0.3
    0
    """
    if admit not in ADMIT_RULES:
        raise ValueError(f"unknown admit rule {admit!r}; accepted: {', '.join(ADMIT_RULES)}")
    _check_scores(scores)
    _check_old_mask(old_mask, scores)
    check_sparsity(sparsity)
    _check_fraction("ratio", ratio)
    numel = scores.numel()
    n_keep = numel - round(float(sparsity) * numel)
    if nm is not None:
        n_per_group, group_size = _check_nm(nm, scores.shape, n_keep)

    flat_scores = scores.detach().reshape(-1)
    was_active = old_mask.reshape(-1)
    n_active = int(was_active.sum())
    n_candidates = numel - n_active
    reserved, active_slots, resurrected_slots = _split_budget(n_keep, n_active, n_candidates, float(ratio))
    if admit == "beats_weakest":
        # the resurrected coordinates the plain top-n_keep would keep, up to the cap
        winners = int((_top_k_flags(flat_scores, n_keep) & ~was_active).sum())
        resurrected_slots = min(winners, reserved)
        active_slots = min(n_keep - resurrected_slots, n_active)
        resurrected_slots = n_keep - active_slots  # too few active weights: the rest go to θ

    if nm is None:
        keep = torch.zeros_like(was_active)
        for members, slots in ((was_active, active_slots), (~was_active, resurrected_slots)):
            member_index = members.nonzero().squeeze(1)
            keep[member_index[_top_k_flags(flat_scores[member_index], slots)]] = True
    else:
        # Relative rank: rank inside its own side in units of that side's slots (< 1 = winner).
        rank = _rank_within_sides(flat_scores, was_active)
        slots = torch.where(was_active, active_slots, resurrected_slots)
        relative_rank = (rank.double() + 0.5) / slots.clamp(min=1).double()
        keep = _nm_keep_with_split(relative_rank.view(scores.shape), old_mask, n_per_group, group_size,
                                   resurrected_target=resurrected_slots).reshape(-1)

    active_kept = int((keep & was_active).sum())
    resurrected_kept = int((keep & ~was_active).sum())
    stats = AmnestyStats(
        active_kept=active_kept, resurrected_kept=resurrected_kept,
        active_pruned=n_active - active_kept, resurrected_dropped=n_candidates - resurrected_kept,
        budget=n_keep, budget_used=active_kept + resurrected_kept, reserved_for_resurrected=reserved,
    )
    return keep.view(scores.shape), stats


def wanda_reprune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """"Merge all, re-prune": keep the numel − round(sparsity·numel) highest ``scores`` (e.g.
    Wanda's |W|·‖X_j‖), old-active and resurrected alike. Ties: lower flat index wins.

    >>> wanda_reprune_mask(torch.tensor([[0.3, 0.9, 0.1, 0.5]]), sparsity=0.5)
    tensor([[False,  True, False,  True]])
    """
    _check_scores(scores)
    check_sparsity(sparsity)
    numel = scores.numel()
    n_keep = numel - round(float(sparsity) * numel)
    return _top_k_flags(scores.detach().reshape(-1), n_keep).view(scores.shape)


def simple_mask(shape: Sequence[int], device: Optional[torch.device] = None) -> torch.Tensor:
    """"Merge all, no re-prune": every coordinate (old-active and resurrected) stays active.

    >>> simple_mask((1, 3))
    tensor([[True, True, True]])
    """
    return torch.ones(tuple(shape), dtype=torch.bool, device=device)


def format_stats_table(rows: dict[str, AmnestyStats]) -> str:
    """A per-layer text table of AmnestyStats (one column per field) with a ``total`` row.

    >>> print(format_stats_table({"fc": AmnestyStats(3, 1, 1, 3, 4, 4, 1)}))  # doctest: +SKIP
    layer  active_kept  resurrected_kept  active_pruned  ...
    """
    for name, stats in rows.items():
        if not isinstance(stats, AmnestyStats):
            raise TypeError(f"row {name!r} must be an AmnestyStats, got {type(stats).__name__}")
    columns = [field.name for field in fields(AmnestyStats)]
    body = [[str(name)] + [str(getattr(stats, column)) for column in columns] for name, stats in rows.items()]
    total = ["total"] + [str(sum(getattr(stats, column) for stats in rows.values())) for column in columns]
    table = [["layer"] + columns] + body + [total]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(cells[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule] + [line(row) for row in body] + [rule, line(total)])


# ---------------------------------------------------------------------------------------------
# Internals


def _split_budget(n_keep: int, n_active: int, n_candidates: int, ratio: float) -> tuple[int, int, int]:
    """(reserved, active slots, resurrected slots) of the plain tournament."""
    reserved = min(round(ratio * n_keep), n_candidates)
    resurrected_slots = reserved
    active_slots = min(n_keep - reserved, n_active)
    leftover = n_keep - resurrected_slots - active_slots
    to_resurrected = min(leftover, n_candidates - resurrected_slots)  # leftover: resurrected first
    resurrected_slots += to_resurrected
    active_slots += min(leftover - to_resurrected, n_active - active_slots)  # ... then active
    return reserved, active_slots, resurrected_slots


def _top_k_flags(values: torch.Tensor, k: int) -> torch.Tensor:
    """Bool flags of the k largest of 1-D ``values``; ties at the cut go to the lower index.
    A threshold (kthvalue) instead of a sort: O(n), and topk alone does not fix tie order."""
    flags = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k <= 0:
        return flags
    if k >= values.numel():
        return ~flags
    threshold = torch.kthvalue(values, values.numel() - k + 1).values  # the k-th largest
    flags = values > threshold
    at_threshold = (values == threshold).nonzero().squeeze(1)  # ascending index
    flags[at_threshold[:k - int(flags.sum())]] = True
    return flags


def _rank_within_sides(flat_scores: torch.Tensor, in_first_side: torch.Tensor) -> torch.Tensor:
    """int64 rank of every element inside its side (0 = highest score; ties: lower index first)."""
    rank = torch.empty(flat_scores.numel(), dtype=torch.int64, device=flat_scores.device)
    for members in (in_first_side, ~in_first_side):
        member_index = members.nonzero().squeeze(1)  # ascending, so the stable sort breaks ties by index
        order = torch.sort(flat_scores[member_index], descending=True, stable=True).indices
        rank[member_index[order]] = torch.arange(order.numel(), device=rank.device)
    return rank


def _nm_keep_with_split(relative_rank: torch.Tensor, old_mask: torch.Tensor, n_per_group: int, group_size: int,
                        resurrected_target: int) -> torch.Tensor:
    """Exactly ``n_per_group`` of each ``group_size`` run per row, as close to
    ``resurrected_target`` resurrected as possible, minimising the total relative rank."""
    key = relative_rank.reshape(-1, group_size)
    is_candidate = ~old_mask.reshape(-1, group_size)
    # Within each N:M group: candidates first (best relative rank first), then old-active ones.
    by_key = torch.sort(key, dim=1, stable=True).indices
    order = by_key.gather(1, torch.sort((~is_candidate.gather(1, by_key)).to(torch.uint8), dim=1, stable=True).indices)
    sorted_key = key.gather(1, order)
    n_cand = is_candidate.sum(1)
    n_act = group_size - n_cand
    fewest = (n_per_group - n_act).clamp(min=0)  # resurrected a group must take
    most = n_cand.clamp(max=n_per_group)  # resurrected a group can take
    target = min(max(resurrected_target, int(fewest.sum())), int(most.sum()))

    # Cost of going from k to k+1 resurrected in a group: add candidate k, drop active N-1-k
    # (both in sorted position). It grows with k, so the cheapest steps overall form prefixes.
    steps = torch.arange(n_per_group, device=key.device)
    valid = (steps >= fewest[:, None]) & (steps < most[:, None])
    cand_pos = steps.expand(key.shape[0], -1).clamp(max=group_size - 1)
    act_pos = (n_cand[:, None] + n_per_group - 1 - steps).clamp(min=0, max=group_size - 1)
    step_cost = sorted_key.gather(1, cand_pos) - sorted_key.gather(1, act_pos)
    step_cost = step_cost.masked_fill(~valid, math.inf).reshape(-1)
    taken = torch.zeros_like(step_cost, dtype=torch.bool)
    taken[torch.sort(step_cost, stable=True).indices[:target - int(fewest.sum())]] = True
    resurrected_per_group = fewest + taken.view(-1, n_per_group).sum(1)

    position = torch.arange(group_size, device=key.device)
    keep_sorted = (position < resurrected_per_group[:, None]) | (
        (position >= n_cand[:, None]) & (position < (n_cand + n_per_group - resurrected_per_group)[:, None]))
    keep = torch.empty_like(keep_sorted)
    keep.scatter_(1, order, keep_sorted)
    return keep.view(old_mask.shape)


def _check_fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in [0, 1], got {value!r} ({type(value).__name__})")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def _check_matrix(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be 2-D (out, in), got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def _check_same_shape(name: str, tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(tensor.shape)}")


def _check_finite_scores(scores: torch.Tensor, what: str) -> None:
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{what}: the scores hold {bad} NaN/Inf values; a mask chosen from them would be meaningless")


def _check_scores(scores) -> None:
    _check_matrix("scores", scores)
    _check_finite_scores(scores, "scores")
    negative = int((scores < 0).sum())
    if negative:
        raise ValueError(f"scores must be >= 0 (importance, e.g. |W|), got {negative} negative values")


def _check_old_mask(old_mask, scores: torch.Tensor) -> None:
    if not isinstance(old_mask, torch.Tensor) or old_mask.dtype != torch.bool:
        got = old_mask.dtype if isinstance(old_mask, torch.Tensor) else type(old_mask).__name__
        raise TypeError(f"old_mask must be a bool tensor (True = active before RESU), got {got}")
    if old_mask.shape != scores.shape:
        raise ValueError(f"old_mask shape {tuple(old_mask.shape)} must match scores shape {tuple(scores.shape)}")
    if old_mask.device != scores.device:
        raise ValueError(f"old_mask is on {old_mask.device} but scores are on {scores.device}")


def _check_nm(nm, shape: torch.Size, n_keep: int) -> tuple[int, int]:
    if (not isinstance(nm, (tuple, list)) or len(nm) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in nm)):
        raise TypeError(f"nm must be a pair of ints (N, M), got {nm!r}")
    n_per_group, group_size = int(nm[0]), int(nm[1])
    if not 1 <= n_per_group <= group_size:
        raise ValueError(f"nm=(N, M) needs 1 <= N <= M, got {tuple(nm)}")
    if shape[1] % group_size:
        raise ValueError(f"nm=(N, M)={tuple(nm)}: in_features={shape[1]} is not a multiple of M={group_size}")
    numel = shape[0] * shape[1]
    if n_keep != numel // group_size * n_per_group:
        raise ValueError(f"nm={tuple(nm)} keeps exactly N/M of the weights, so sparsity must be "
                         f"1 - {n_per_group}/{group_size} = {1 - n_per_group / group_size:g}; "
                         f"got a sparsity that keeps {n_keep} of {numel}")
    return n_per_group, group_size


__all__ = [
    "ADMIT_RULES", "AmnestyStats", "COMMIT_SCORE_METHODS", "amnesty_mask", "format_stats_table", "resurrection_ratio",
    "score_for_commit", "simple_mask", "wanda_reprune_mask",
]

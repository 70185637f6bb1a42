"""Mode changes of one ResuTensor: prune (→ SPARSE), enter_resu (→ RESU), commit (→ SPARSE)."""
from typing import Optional

import torch

from resu_tensor import kernels
from resu_tensor.core.mask_encoding import encode_mask
from resu_tensor.core.mode import Mode
from resu_tensor.core.qresu import check_quant_args, quantize_active
from resu_tensor.core.state import SUPPORTED_DTYPES, QuantizedActive
from resu_tensor.core.subset import restrict_to_subset_
from resu_tensor.method import amnesty
from resu_tensor.method.amnesty import AmnestyStats
from resu_tensor.method.selective import EMA_DTYPES, SelectiveConfig, StaticSubsetConfig
from resu_tensor.method.pruning import (check_finite, check_input_norms, check_keeps_weights, check_method,
                                        check_sparsity, mask_from_scores, parse_granularity, resolve_sparsity,
                                        row_pattern, score)

COMMIT_STRATEGIES = ("amnesty", "wanda_reprune", "magnitude", "simple")


def _require_mode(tensor, allowed: tuple[Mode, ...], action: str) -> None:
    if tensor.mode not in allowed:
        raise ValueError(
            f"{action}: the weight is in mode {tensor.mode.value!r}; {action} needs "
            f"{' or '.join(repr(m.value) for m in allowed)}"
        )


def _set_sparse(tensor, keep: torch.Tensor, target_sparsity: Optional[float],
                nm_pattern: Optional[tuple[int, int]], row_keep: Optional[int]) -> None:
    values = tensor.values.masked_fill(~keep, 0)
    tensor.set_state_(values=values, mode=Mode.SPARSE, mask=encode_mask(keep), trainable_side="active",
                      target_sparsity=target_sparsity, nm_pattern=nm_pattern, row_keep=row_keep)


def storage_oriented(tensor, scores, what: str) -> torch.Tensor:
    """Per-coordinate ``scores`` in storage orientation (out, in): given in that shape (which wins
    for a square transposed weight), or in the weight's logical shape (an N-D conv weight's, a
    transposed weight's (in, out)) and reshaped.

    Example::

        storage_oriented(conv_weight, torch.rand(8, 4, 3, 3), "prune: scores").shape   # (8, 36)
    """
    shape = tuple(getattr(scores, "shape", ()))
    if isinstance(scores, torch.Tensor) and shape == tuple(tensor.storage_shape):
        return scores
    if isinstance(scores, torch.Tensor) and shape == tuple(tensor.logical_shape):
        return tensor.to_storage(scores)
    raise ValueError(f"{what} must be a tensor of the weight's storage shape {tuple(tensor.storage_shape)} or its "
                     f"logical shape {tuple(tensor.logical_shape)}, got {getattr(scores, 'shape', type(scores).__name__)}")


def prune(tensor, sparsity: Optional[float], method: str = "magnitude", generator: Optional[torch.Generator] = None,
          granularity: str = "element", scores: Optional[torch.Tensor] = None) -> None:
    """DENSE/SPARSE → SPARSE at ``sparsity`` and ``granularity`` (see ``pruning.mask_from_scores``):
    pruned coordinates become exactly zero. ``scores`` (storage shape (out, in)) replaces the
    ``method``'s own scores; ``wanda`` needs them (``pruning.score(w.values, "wanda", input_norms)``).
    An N:M prune remembers (N, M) in ``tensor.nm_pattern``, a row prune the count kept per row in
    ``tensor.row_keep`` (both None otherwise), so a re-prune or commit keeps the same count in every
    group or row."""
    _require_mode(tensor, (Mode.DENSE, Mode.SPARSE), "prune")
    target_sparsity = resolve_sparsity(sparsity, granularity)
    check_keeps_weights(target_sparsity, granularity, tensor.storage_shape)
    check_method(method)
    check_finite(tensor.values)
    if scores is None:
        if method == "wanda":
            raise ValueError(
                "prune(method='wanda') needs scores: pass scores=resu_tensor.method.pruning.score(w.values, 'wanda', input_norms=...) "
                "or use rt.prune_(model, sparsity, method='wanda', calibration=batches)"
            )
        scores = score(tensor.values, method, generator=generator)
    else:
        scores = storage_oriented(tensor, scores, "prune: scores")
    keep = mask_from_scores(scores, target_sparsity, granularity).to(tensor.values.device)
    row_keep = row_pattern(target_sparsity, tensor.storage_shape[1])[0] if granularity == "row" else None
    _set_sparse(tensor, keep, target_sparsity, parse_granularity(granularity), row_keep)


def check_enter_resu(tensor, epsilon: float = 0.1, freeze_active: bool = True, generator=None, *,
                     quantize_bits: Optional[int] = None, group_size: Optional[int] = 128,
                     theta_dtype: Optional[torch.dtype] = None, selective=None, track_gradients: bool = False,
                     subset_scores: Optional[torch.Tensor] = None, probed: bool = False) -> None:
    """Every check :func:`enter_resu` makes before it changes ``tensor`` (same arguments; an
    unknown option is a TypeError): a model-level call runs it on every layer first.
    ``probed``: gradient subset scores will be provided by a probe (so none are needed yet).

    Example::

        check_enter_resu(w, 0.1, quantize_bits=4, group_size=64)
    """
    _require_mode(tensor, (Mode.SPARSE,), "enter_resu")
    if tensor.layout_view:
        raise ValueError("enter_resu applies to the weight itself, not to a view of it (w.t())")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon >= 0:
        raise ValueError(f"epsilon must be a non-negative float, got {epsilon!r}")
    if not isinstance(freeze_active, bool):
        raise TypeError(f"freeze_active must be a bool, got {freeze_active!r}")
    if selective is not None and not isinstance(selective, (SelectiveConfig, StaticSubsetConfig)):
        raise TypeError(f"selective must be a SelectiveConfig or StaticSubsetConfig, got {type(selective).__name__}")
    if quantize_bits is not None and not freeze_active:
        raise ValueError("QRESU stores the active weights frozen: quantize_bits needs freeze_active=True")
    if quantize_bits is not None:
        check_quant_args(quantize_bits, group_size, tensor.storage_shape[1])
    if theta_dtype is not None and theta_dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"theta_dtype must be one of {[str(d) for d in SUPPORTED_DTYPES]} or None, got {theta_dtype!r}")
    if isinstance(selective, StaticSubsetConfig) and not freeze_active:
        raise ValueError("a static subset trains θ only: it needs freeze_active=True")
    if isinstance(selective, StaticSubsetConfig) and selective.by == "gradient" and subset_scores is None and not probed:
        raise ValueError('StaticSubsetConfig(by="gradient") needs probe gradients (enter_resu_(..., probe_fn=...))')
    if subset_scores is not None:
        storage_oriented(tensor, subset_scores, "enter_resu: subset_scores")


def enter_resu(tensor, epsilon: float = 0.1, freeze_active: bool = True, generator: Optional[torch.Generator] = None,
               *, quantize_bits: Optional[int] = None, group_size: Optional[int] = 128,
               theta_dtype: Optional[torch.dtype] = None, selective=None, track_gradients: bool = False,
               subset_scores: Optional[torch.Tensor] = None) -> None:
    """SPARSE → RESU (or QRESU with ``quantize_bits``): θ ~ N(0, (ε·σ_A)²) at the pruned slots.

    RESU writes θ in place into the stored values. QRESU stores the frozen active weights as
    ``quantize_bits``-bit group-wise codes and θ flat in ``theta_dtype`` (default: the weight's
    dtype). ``selective`` is a SelectiveConfig (consistency filter) or StaticSubsetConfig
    (``subset_scores``, dense |gradient| from a probe, picks S when ``by="gradient"``).
    ``track_gradients`` accumulates Σ|g| per θ for gradient-scored commits.
    """
    check_enter_resu(tensor, epsilon, freeze_active, quantize_bits=quantize_bits, group_size=group_size,
                     theta_dtype=theta_dtype, selective=selective, track_gradients=track_gradients,
                     subset_scores=subset_scores)
    keep = tensor.storage_mask()
    pruned = ~keep.view(-1)
    active_values = tensor.values.reshape(-1)[~pruned].float()
    sigma = active_values.std().item() if active_values.numel() > 1 else 0.0
    noise_device = "cpu" if generator is None else generator.device
    theta = torch.randn(int(pruned.sum()), generator=generator, device=noise_device).to(tensor.values.device)
    theta = theta * (float(epsilon) * sigma)
    side = "pruned" if freeze_active else "all"
    n_trainable = theta.numel() if freeze_active else tensor.storage_numel
    resu_state = {}
    if isinstance(selective, SelectiveConfig):
        dtype = EMA_DTYPES[selective.ema_dtype]
        resu_state.update(selective=selective,
                          selective_m=torch.zeros(n_trainable, dtype=dtype, device=theta.device),
                          selective_v=torch.zeros(n_trainable, dtype=dtype, device=theta.device))
    if track_gradients:
        resu_state["grad_abs_sum"] = torch.zeros(n_trainable, device=theta.device)
    if quantize_bits is None:
        kernels.scatter_trainable_(tensor.values, pruned, theta)
        tensor.set_state_(values=tensor.values, mode=Mode.RESU, mask=tensor.encoded_mask(), trainable_side=side,
                          **resu_state)
    else:
        group_size = check_quant_args(quantize_bits, group_size, tensor.storage_shape[1])
        qdata, scale, offset = quantize_active(tensor.values, keep, quantize_bits, group_size)
        theta = theta.to(theta_dtype or tensor.compute_dtype)
        tensor.set_state_(quantized=QuantizedActive(qdata, scale, offset, theta, quantize_bits, group_size), mode=Mode.QRESU,
                          mask=tensor.encoded_mask(), trainable_side=side, **resu_state)
    if isinstance(selective, StaticSubsetConfig):
        scores = storage_oriented(tensor, subset_scores, "enter_resu: subset_scores") if selective.by == "gradient" \
            else None
        restrict_to_subset_(tensor, selective, scores, generator)


def check_commit(tensor, strategy: str = "simple", *, sparsity: Optional[float] = None, cycle: int = 0,
                 num_cycles: int = 1, score: str = "magnitude", r_start: float = 0.10, r_end: float = 0.02,
                 input_norms: Optional[torch.Tensor] = None, norms_later: bool = False, admit: str = "quota") -> float:
    """Every check :func:`commit` makes before it changes ``tensor`` (same arguments; an unknown
    option is a TypeError); returns the sparsity the commit prunes to. A model-level call runs it
    on every layer first (``norms_later``: Wanda's input norms come after, from calibration). A
    re-prune that would keep no weight (or none in a row of a row-pruned layer) is refused here.

    Example::

        check_commit(w, "amnesty", cycle=1, num_cycles=4)
    """
    if strategy not in COMMIT_STRATEGIES:
        raise ValueError(f"unknown commit strategy {strategy!r}; accepted: {', '.join(COMMIT_STRATEGIES)}")
    _require_mode(tensor, (Mode.RESU, Mode.QRESU), "commit")
    if tensor.layout_view:
        raise ValueError("commit applies to the weight itself, not to a view of it (w.t())")
    sparsity = tensor.target_sparsity if sparsity is None else sparsity
    check_sparsity(sparsity)
    if strategy == "amnesty":
        amnesty.resurrection_ratio(cycle, num_cycles, r_start, r_end)
        if admit not in amnesty.ADMIT_RULES:
            raise ValueError(f"unknown admit rule {admit!r}; accepted: {', '.join(amnesty.ADMIT_RULES)}")
        if score not in amnesty.COMMIT_SCORE_METHODS:
            raise ValueError(f"unknown commit score method {score!r}; accepted: {', '.join(amnesty.COMMIT_SCORE_METHODS)}")
        if score == "gradient" and tensor.grad_abs_sum is None:
            raise ValueError("commit(score='gradient') needs gradient statistics: enter RESU with track_gradients=True")
    wanda = strategy == "wanda_reprune" or (strategy == "amnesty" and score == "wanda")
    if wanda and not norms_later:
        if input_norms is None:
            raise ValueError(f"commit strategy {strategy!r} with Wanda scores needs input_norms (rt.commit_(..., "
                             "calibration=batches))")
        check_input_norms(input_norms, tensor.storage_shape[1], tensor.storage_shape[0])
    if strategy != "simple" and tensor.nm_pattern is None:
        granularity = "row" if tensor.row_keep is not None else "element"
        check_keeps_weights(sparsity, granularity, tensor.storage_shape, f"commit (re-prune at {strategy!r})")
    return sparsity


def commit(tensor, strategy: str = "simple", *, sparsity: Optional[float] = None, cycle: int = 0,
           num_cycles: int = 1, score: str = "magnitude", r_start: float = 0.10, r_end: float = 0.02,
           input_norms: Optional[torch.Tensor] = None, admit: str = "quota"):
    """RESU/QRESU → SPARSE: merge θ and choose the new mask. Returns AmnestyStats.

    * ``simple``: every θ becomes an active weight (no re-prune).
    * ``magnitude``: re-prune the merged weight by |W|.
    * ``wanda_reprune``: re-prune the merged weight by Wanda scores (needs ``input_norms``).
    * ``amnesty``: the relative tournament: r(c)·n_keep slots reserved for resurrected
      coordinates (r from ``r_start`` to ``r_end`` over ``num_cycles``), top-k by ``score``
      (``magnitude``, ``gradient`` = |W|·|ḡ| with ḡ from ``enter_resu(track_gradients=True)``,
      ``wanda``) inside each group; N:M masks stay N:M. ``admit="beats_weakest"``: r(c) caps the
      resurrected coordinates instead of reserving slots for them (``amnesty_mask``).

    ``sparsity`` defaults to the layer's last pruning sparsity. QRESU's W_A is dequantized first.
    """
    sparsity = check_commit(tensor, strategy, sparsity=sparsity, cycle=cycle, num_cycles=num_cycles, score=score,
                            r_start=r_start, r_end=r_end, input_norms=input_norms, admit=admit)
    nm_pattern, row_keep = tensor.nm_pattern, tensor.row_keep
    group_pattern = nm_pattern  # (kept, group length) that every group of a row keeps exactly
    if row_keep is not None:
        # A per-row count (row prune): the requested sparsity sets it, rounded per row; one group per row.
        group_pattern = row_pattern(sparsity, tensor.storage_shape[1])
        row_keep = group_pattern[0]
        sparsity = 1 - group_pattern[0] / group_pattern[1]
    grad_abs = None
    if tensor.grad_abs_sum is not None:
        grad_abs = tensor.to_storage(tensor.expand_trainable(tensor.grad_abs_sum))  # (out, in) like merged
    old_mask = tensor.storage_mask()
    merged = tensor.storage_weight()
    if strategy != "simple":
        check_finite(merged, "commit")
    if strategy == "simple":
        keep = amnesty.simple_mask(old_mask.shape, old_mask.device)
        reserved = 0
    elif strategy == "amnesty":
        scores = amnesty.score_for_commit(merged, score, grad_mean_abs=grad_abs, input_norms=input_norms)
        if score == "gradient" and tensor.trainable_side != "all":
            scores = torch.where(old_mask, merged.abs().float(), scores)  # frozen active weights have no ḡ
        ratio = amnesty.resurrection_ratio(cycle, num_cycles, r_start, r_end)
        keep, stats = amnesty.amnesty_mask(scores, old_mask, sparsity, ratio, nm=group_pattern, admit=admit)
        reserved = stats.reserved_for_resurrected
    else:
        method = "magnitude" if strategy == "magnitude" else "wanda"
        scores = amnesty.score_for_commit(merged, method, input_norms=input_norms)
        # an N:M (or per-row) layer stays so
        granularity = f"{group_pattern[0]}:{group_pattern[1]}" if group_pattern else "element"
        keep = mask_from_scores(scores, None if group_pattern else sparsity, granularity)
        reserved = 0
    if tensor.values is None:  # QRESU: back to dense storage before the new mask is applied
        tensor.set_state_(values=merged, mode=Mode.RESU, mask=tensor.encoded_mask(), trainable_side="pruned")
    if strategy == "simple":
        _set_sparse(tensor, keep, None, None, None)
    else:
        _set_sparse(tensor, keep, sparsity, nm_pattern, row_keep)
    return commit_stats(old_mask, keep, reserved)


def commit_stats(old_mask: torch.Tensor, new_mask: torch.Tensor, reserved: int = 0):
    """AmnestyStats of any commit: who stayed, who came back, who left."""
    kept = int(new_mask.sum())
    return AmnestyStats(
        active_kept=int((old_mask & new_mask).sum()), resurrected_kept=int((~old_mask & new_mask).sum()),
        active_pruned=int((old_mask & ~new_mask).sum()), resurrected_dropped=int((~old_mask & ~new_mask).sum()),
        budget=kept, budget_used=kept, reserved_for_resurrected=reserved,
    )


__all__ = ["prune", "enter_resu", "commit", "check_enter_resu", "check_commit", "COMMIT_STRATEGIES", "check_method",
           "check_sparsity"]

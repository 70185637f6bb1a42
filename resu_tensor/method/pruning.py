"""Pruning as pure functions on plain tensors: scores (magnitude, random, Wanda), keep-masks at a
granularity (element, row, structured row/column, N:M) and per-layer sparsities for a scope
(layer, global, ERK). ``core.transitions.prune`` and ``training.lifecycle.prune_`` apply them to ResuTensors.

Example::

    scores = score(weight, "wanda", input_norms=norms)       # |W_ij| * ||X_j||_2
    keep = mask_from_scores(scores, None, granularity="2:4")  # True = keep
"""
import re
from collections.abc import Mapping
from typing import Optional

import torch

PRUNE_METHODS = ("magnitude", "random", "wanda")
PRUNE_GRANULARITIES = ("element", "row", "structured_row", "structured_column", "N:M")
PRUNE_SCOPES = ("layer", "global", "erk")

_N_M_PATTERN = re.compile(r"(\d+):(\d+)")
_SPARSITY_TOLERANCE = 1e-9


def check_sparsity(sparsity) -> None:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"sparsity must be a float in [0, 1), got {sparsity!r} ({type(sparsity).__name__})")
    if not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")


def check_method(method: str) -> None:
    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; accepted: {', '.join(PRUNE_METHODS)}")


def check_scope(scope: str) -> None:
    if scope not in PRUNE_SCOPES:
        raise ValueError(f"unknown pruning scope {scope!r}; accepted: {', '.join(PRUNE_SCOPES)}")


def check_finite(weight: torch.Tensor, what: str = "prune", holder: str = "the weight") -> None:
    if weight.is_meta:
        raise ValueError(f"{what}: {holder} is on the meta device and has no values to score; build on meta with "
                         "sparsity=0.0, then model.to_empty(device=...), initialise the weights, and prune "
                         "(rt.prune_(model, sparsity))")
    bad = (~torch.isfinite(weight)).sum().item()
    if bad:
        raise ValueError(f"{what}: {holder} holds {bad} NaN/Inf values; scores would be meaningless")


def row_pattern(sparsity: float, in_features: int) -> tuple[int, int]:
    """(kept per row, in_features): what a ``"row"`` prune at ``sparsity`` keeps in every row
    (remembered as ``tensor.row_keep``, so commits keep the same count per row), as an N:M pattern
    with one group per row."""
    return in_features - round(sparsity * in_features), in_features


def check_keeps_weights(sparsity: float, granularity: str, shape: tuple[int, int], where: str = "prune") -> None:
    """Refuse a ``sparsity`` at ``granularity`` that would keep no weight of a (out, in) layer, or
    none in some row (``row``; ``"N:M"`` keeps N >= 1 per group by construction): ``ValueError``
    naming ``where`` (e.g. the layer), the sparsity and the largest sparsity that keeps one.

    Example::

        check_keeps_weights(0.97, "row", (8, 16))   # ValueError: ... largest ... 0.9375
    """
    if parse_granularity(granularity) is not None:
        return
    n_rows, n_cols = shape
    counts = {"element": (n_rows * n_cols, "weight of the layer"), "row": (n_cols, "weight in every row"),
              "structured_row": (n_rows, "row of the layer"), "structured_column": (n_cols, "input column of the layer")}
    count, unit = counts[granularity]
    if count - round(float(sparsity) * count) < 1:
        raise ValueError(f"{where}: sparsity {sparsity:g} at granularity {granularity!r} keeps no {unit} "
                         f"({count} to choose from); the largest sparsity that keeps at least one is "
                         f"{(count - 1) / count:g} (= {count - 1}/{count})")


def parse_granularity(granularity: str) -> Optional[tuple[int, int]]:
    """Validate a granularity name; return (N, M) for an ``"N:M"`` string, None for the others.

    Example::

        parse_granularity("2:4")      # (2, 4)
        parse_granularity("row")      # None
    """
    if isinstance(granularity, str):
        if granularity in PRUNE_GRANULARITIES[:-1]:
            return None
        match = _N_M_PATTERN.fullmatch(granularity)
        if match:
            n, m = int(match.group(1)), int(match.group(2))
            if 1 <= n <= m:
                return n, m
    raise ValueError(
        f"unknown pruning granularity {granularity!r}; accepted: {', '.join(PRUNE_GRANULARITIES[:-1])}, "
        "or 'N:M' with 1 <= N <= M (e.g. '2:4', '4:8')"
    )


def resolve_sparsity(sparsity: Optional[float], granularity: str = "element") -> float:
    """The sparsity a granularity prunes to: ``sparsity`` itself, or for ``"N:M"`` the implied
    1 − N/M (pass None, or that same value; any other value raises).

    Example::

        resolve_sparsity(None, "2:4")       # 0.5
        resolve_sparsity(0.7, "row")        # 0.7
    """
    n_m = parse_granularity(granularity)
    if n_m is None:
        check_sparsity(sparsity)
        return float(sparsity)
    implied = 1.0 - n_m[0] / n_m[1]
    if sparsity is None:
        return implied
    check_sparsity(sparsity)
    if abs(float(sparsity) - implied) > _SPARSITY_TOLERANCE:
        raise ValueError(
            f"granularity {granularity!r} fixes sparsity at 1 - {n_m[0]}/{n_m[1]} = {implied:g}, "
            f"got sparsity={sparsity}; pass sparsity=None (or that value)"
        )
    return implied


def check_input_norms(input_norms, in_features: int, out_features: Optional[int] = None) -> torch.Tensor:
    """``input_norms`` checked: (in_features,) (one per input column), or (out_features,
    in_features) (per row and column: a grouped conv's rows read different channels), finite,
    >= 0. Without ``out_features`` any row count of the 2-D form passes (the scorer checks it)."""
    if not isinstance(input_norms, torch.Tensor):
        raise TypeError(f"wanda: input_norms must be a tensor of shape ({in_features},), "
                        f"got {type(input_norms).__name__}")
    shape = tuple(input_norms.shape)
    per_row = len(shape) == 2 and shape[1] == in_features and out_features in (None, shape[0])
    if shape != (in_features,) and not per_row:
        raise ValueError(f"wanda: input_norms must have shape ({in_features},) (one per input feature) or "
                         f"({out_features if out_features is not None else 'out'}, {in_features}) (per row), "
                         f"got {shape}")
    check_finite(input_norms, "wanda", "input_norms")
    if (input_norms < 0).any():
        raise ValueError("wanda: input_norms are L2 norms and must be >= 0")
    return input_norms


def score(weight: torch.Tensor, method: str = "magnitude", input_norms: Optional[torch.Tensor] = None,
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Float32 importance scores of a (out, in) weight, higher = keep: ``magnitude`` |W|,
    ``random`` uniform noise (from ``generator``), ``wanda`` |W_ij|·‖X_j‖₂ with ``input_norms``
    the (in,) L2 norms of the layer's input features, or (out, in) per row (a grouped conv's; see
    :func:`resu_tensor.calibrate`).

    Example::

        scores = score(linear.weight.detach(), "wanda", input_norms=rt.calibrate(model, batches)["0"])
    """
    check_method(method)
    if weight.dim() != 2:
        raise ValueError(f"score needs a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    check_finite(weight)
    if method == "magnitude":
        return weight.detach().abs().float()
    if method == "random":
        noise_device = "cpu" if generator is None else generator.device
        return torch.rand(weight.numel(), generator=generator, device=noise_device).to(weight.device).view(weight.shape)
    if input_norms is None:
        raise ValueError("wanda needs input_norms: the (in_features,) L2 norms of the layer's inputs over "
                         "calibration tokens, e.g. from rt.calibrate(model, batches)")
    norms = check_input_norms(input_norms, weight.shape[1], weight.shape[0])
    return weight.detach().abs().float() * norms.to(device=weight.device, dtype=torch.float32).expand(weight.shape)


def _keep_top(scores: torch.Tensor, n_keep: int, dim: int) -> torch.Tensor:
    """Bool mask, True at the ``n_keep`` highest scores along ``dim``."""
    keep = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(dim, torch.topk(scores, n_keep, dim=dim, sorted=False).indices, True)


def mask_from_scores(scores: torch.Tensor, sparsity: Optional[float], granularity: str = "element") -> torch.Tensor:
    """Bool keep-mask (True = keep) of a (out, in) score matrix at ``granularity``:

    * ``element``: the ``numel − round(sparsity·numel)`` highest scores of the whole matrix;
    * ``row``: in every row, the ``in − round(sparsity·in)`` highest (same count per row);
    * ``structured_row`` / ``structured_column``: whole rows / columns, ranked by their score sums,
      ``round(sparsity·out)`` rows / ``round(sparsity·in)`` columns pruned;
    * ``"N:M"``: in every group of M consecutive input elements of a row, the N highest
      (``sparsity`` must be None or 1 − N/M; ``in`` must be divisible by M).

    Example::

        keep = mask_from_scores(weight.abs(), 0.5, "row")
        keep = mask_from_scores(weight.abs(), None, "2:4")
    """
    n_m = parse_granularity(granularity)
    sparsity = resolve_sparsity(sparsity, granularity)
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        got = getattr(scores, "shape", type(scores).__name__)
        raise ValueError(f"scores must be a 2-D (out, in) tensor, got {got}")
    check_finite(scores, "prune", "the scores")
    scores = scores.detach()
    n_rows, n_cols = scores.shape
    if granularity == "element":
        numel = scores.numel()
        return _keep_top(scores.reshape(-1), numel - round(sparsity * numel), 0).view(scores.shape)
    if granularity == "row":
        return _keep_top(scores, row_pattern(sparsity, n_cols)[0], 1)
    if granularity == "structured_row":
        rows = _keep_top(scores.double().sum(1), n_rows - round(sparsity * n_rows), 0)
        return rows[:, None].expand(n_rows, n_cols).clone()
    if granularity == "structured_column":
        cols = _keep_top(scores.double().sum(0), n_cols - round(sparsity * n_cols), 0)
        return cols[None, :].expand(n_rows, n_cols).clone()
    n, m = n_m
    if n_cols % m:
        raise ValueError(f"granularity {granularity!r} needs in_features divisible by {m}, got {n_cols}")
    return _keep_top(scores.reshape(n_rows, n_cols // m, m), n, 2).view(n_rows, n_cols)


def prune_mask(weight: torch.Tensor, sparsity: Optional[float], method: str = "magnitude",
               generator: Optional[torch.Generator] = None, granularity: str = "element",
               input_norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Bool keep-mask of ``weight``: :func:`score` by ``method``, then :func:`mask_from_scores`.

    Example::

        keep = prune_mask(weight, 0.5, "magnitude")                       # element-wise, per layer
        keep = prune_mask(weight, None, "wanda", granularity="2:4", input_norms=norms)
    """
    resolve_sparsity(sparsity, granularity)  # bad arguments fail before any scoring work
    return mask_from_scores(score(weight, method, input_norms, generator), sparsity, granularity)


def global_sparsities(scores_by_layer: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, float]:
    """Per-layer sparsities of one global threshold: the ``round(sparsity·total)`` lowest scores
    over all layers together are pruned. Pruning each layer element-wise to its sparsity with the
    same scores then keeps exactly the globally chosen coordinates (up to ties at the threshold).

    Example::

        sparsities = global_sparsities({"fc1": s1, "fc2": s2}, 0.7)   # e.g. {"fc1": 0.62, "fc2": 0.81}
    """
    check_sparsity(sparsity)
    names = list(scores_by_layer)
    if not names:
        return {}
    device = scores_by_layer[names[0]].device
    flat = torch.cat([scores_by_layer[name].detach().reshape(-1).float().to(device) for name in names])
    check_finite(flat, "prune", "the scores")
    numels = torch.tensor([scores_by_layer[name].numel() for name in names], device=device)
    n_keep = flat.numel() - round(float(sparsity) * flat.numel())
    kept_indices = torch.topk(flat, n_keep, sorted=False).indices
    layer_of_index = torch.searchsorted(torch.cumsum(numels, 0), kept_indices, right=True)
    kept = torch.bincount(layer_of_index, minlength=len(names)).tolist()
    return {name: (numel - k) / numel for name, numel, k in zip(names, numels.tolist(), kept)}


def erk_densities(shapes: Mapping[str, tuple[int, int]], sparsity: float) -> dict[str, float]:
    """Erdős–Rényi-Kernel per-layer densities (RigL): density_l = ε·(out+in)/(out·in), ε chosen so
    that Σ density_l·numel_l = (1 − sparsity)·Σ numel_l; a layer whose density would exceed 1 is
    kept dense (density 1) and ε is solved again over the others.

    Example::

        erk_densities({"fc1": (256, 784), "fc2": (10, 256)}, 0.9)   # the small layer gets more density
    """
    check_sparsity(sparsity)
    numels = {name: int(out) * int(inp) for name, (out, inp) in shapes.items()}
    raw = {name: (out + inp) / (out * inp) for name, (out, inp) in shapes.items()}
    target_kept = (1.0 - float(sparsity)) * sum(numels.values())
    dense: set[str] = set()
    while True:
        free = [name for name in shapes if name not in dense]
        if not free:
            break
        budget = target_kept - sum(numels[name] for name in dense)
        epsilon = budget / sum(raw[name] * numels[name] for name in free)
        over = [name for name in free if raw[name] * epsilon > 1.0]
        if not over:
            break
        # Capping a layer frees budget, so ε only grows: every layer over 1 now stays over 1.
        dense.update(over)
    return {name: 1.0 if name in dense else raw[name] * epsilon for name in shapes}


def granularity_of(tensor) -> str:
    """The granularity that keeps a ResuTensor's mask structure on a re-prune/commit: its
    remembered N:M pattern (``tensor.nm_pattern``, set by an N:M prune) as ``"N:M"``, its per-row
    count (``tensor.row_keep``, set by a row prune) as ``"kept:in_features"``, else ``"element"``.

    Example::

        keep = prune_mask(w.values, w.target_sparsity, "magnitude", granularity=granularity_of(w))
    """
    pattern, row_keep = getattr(tensor, "nm_pattern", None), getattr(tensor, "row_keep", None)
    if pattern is not None:
        return f"{pattern[0]}:{pattern[1]}"
    if row_keep is not None:
        return f"{row_keep}:{tensor.storage_shape[1]}"
    return "element"

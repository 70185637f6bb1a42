"""RESU-Selective: which θ move at each step (consistency filtering), or which ever can (static subset).

Consistency filtering keeps per-θ EMAs m ← βm + (1−β)g and v ← βv + (1−β)|g|, with
C = |m| / (v + δ) ∈ [0, 1]. Each step: P_mag = the ``screen`` fraction of θ with the largest |g|;
P_con = {C > τ}; P_select = the ``select``·p coordinates of P_mag ∩ P_con with the largest C·|g|.
The optimizer receives 1[P_select]·C·g (with SGD that is the method's update rule exactly). The
library runs it in its optimizer step pre-hook, so it sees the gradient the step will apply (after
any accumulation or clipping) and stock optimizers need no change.

The static subset picks S ⊂ P, |S| = ⌊α·p⌋, once at phase start (at random, or by gradient
magnitude from a probe batch): only S is trainable, so grads and optimizer state are O(αp).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from resu_tensor import kernels

EMA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUBSET_BY = ("random", "gradient")


def _check_fraction(name: str, value, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (0 < value <= 1 if low_open else 0 <= value <= 1)
    if not ok:
        raise ValueError(f"{name} must be a float in {'(0, 1]' if low_open else '[0, 1]'}, got {value!r}")


@dataclass(frozen=True)
class SelectiveConfig:
    """Consistency filtering of θ's updates.

    Example::

        rt.enter_resu_(model, selective=rt.SelectiveConfig(tau=0.5, select=0.2))
    """

    beta: float = 0.9
    tau: float = 0.5
    screen: float = 0.5
    select: float = 0.2
    delta: float = 1e-8
    ema_dtype: str = "float32"

    def __post_init__(self):
        for name in ("beta", "tau", "screen", "select"):
            _check_fraction(name, getattr(self, name))
        if not self.delta > 0:
            raise ValueError(f"delta must be > 0, got {self.delta!r}")
        if self.ema_dtype not in EMA_DTYPES:
            raise ValueError(f"ema_dtype must be one of {tuple(EMA_DTYPES)}, got {self.ema_dtype!r}")

    def as_tuple(self) -> tuple:
        return (self.beta, self.tau, self.screen, self.select, self.delta, self.ema_dtype)


@dataclass(frozen=True)
class StaticSubsetConfig:
    """Train only a fixed subset S ⊂ P of ⌊alpha·p⌋ θ, chosen at phase start ``by`` "random" or
    "gradient" (needs a probe: ``enter_resu_(..., probe_fn=...)``). ``refresh_every`` N steps
    the ResuScheduler picks S again (None: never).

    Example::

        rt.enter_resu_(model, selective=rt.StaticSubsetConfig(alpha=0.2, by="random"))
    """

    alpha: float = 0.2
    by: str = "random"
    refresh_every: Optional[int] = None

    def __post_init__(self):
        _check_fraction("alpha", self.alpha, low_open=True)
        if self.by not in SUBSET_BY:
            raise ValueError(f"StaticSubsetConfig.by must be one of {SUBSET_BY}, got {self.by!r}")
        if self.refresh_every is not None and (not isinstance(self.refresh_every, int) or self.refresh_every < 1):
            raise ValueError(f"refresh_every must be a positive int or None, got {self.refresh_every!r}")


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of flat ``x`` as a float32 0-dim tensor, on x's device (no sync);
    from the smaller side, since topk's cost grows with the count it returns."""
    x = x.reshape(-1)
    if 2 * k <= x.numel():
        return torch.topk(x, k, sorted=False).values.min().float()
    return torch.topk(x, x.numel() - k + 1, largest=False, sorted=False).values.max().float()


def consistency_filter_(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, config) -> torch.Tensor:
    """Update the EMAs ``m``, ``v`` with ``grad`` and replace ``grad`` by 1[P_select]·C·g, all in
    place (contiguous flat tensors; ``config`` is a SelectiveConfig, e.g. ``w.selective``, or its
    ``as_tuple()``). Returns ``grad``.

    Two elementwise kernels (``kernels.selective_scores_`` / ``selective_apply_``) around two
    top-k thresholds that stay on the device, so nothing waits for the host. Coordinates tied
    with a threshold value are all included (P_mag may exceed ``screen``·p, P_select ``select``·p
    when ties are present), which is deterministic where topk's choice among ties was arbitrary.

    Example::

        grad = consistency_filter_(grad, m, v, rt.SelectiveConfig())
    """
    if isinstance(config, SelectiveConfig):
        beta, tau, screen, select, delta = config.beta, config.tau, config.screen, config.select, config.delta
    else:
        beta, tau, screen, select, delta, _ = config
    p = grad.numel()
    if p == 0:
        return grad
    screen_threshold = _kth_largest(grad.abs(), min(p, max(1, round(screen * p))))
    score = kernels.selective_scores_(grad, m, v, beta, tau, delta, screen_threshold)
    # non-candidates score −1 and candidates ≥ 0: the top select·p scores hold every candidate
    # when there are fewer, and selective_apply_ skips the −1s
    n_select = int(select * p)
    if n_select == 0:
        return grad.zero_()
    return kernels.selective_apply_(grad, m, v, score, delta, _kth_largest(score, n_select))


def subset_mask(pruned: torch.Tensor, alpha: float, scores: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Bool mask (storage shape) of S ⊂ P with ⌊alpha·p⌋ members: the highest ``scores``
    (e.g. |gradient| from a probe) or, when None, a uniform random choice."""
    flat_pruned = pruned.reshape(-1)
    candidates = flat_pruned.nonzero().view(-1)
    k = int(alpha * candidates.numel())
    if scores is None:
        noise_device = "cpu" if generator is None else generator.device
        order = torch.randperm(candidates.numel(), generator=generator, device=noise_device).to(pruned.device)
    else:
        order = torch.argsort(scores.reshape(-1)[candidates].float(), descending=True, stable=True)
    chosen = torch.zeros_like(flat_pruned)
    chosen[candidates[order[:k]]] = True
    return chosen.view(pruned.shape)

"""RESU-Selective: which θ move at each step (consistency filtering), or which ever can (static subset).

Consistency filtering (DESIGN.md §1) keeps per-θ EMAs m ← βm + (1−β)g and v ← βv + (1−β)|g|, with
C = |m| / (v + δ) ∈ [0, 1]. Each step: P_mag = the ``screen`` fraction of θ with the largest |g|;
P_con = {C > τ}; P_select = the ``select``·p coordinates of P_mag ∩ P_con with the largest C·|g|.
The optimizer receives 1[P_select]·C·g (with SGD that is the method's update rule exactly). It
runs in an optimizer step pre-hook, so it sees the gradient the step will apply (after any
accumulation or clipping) and stock optimizers need no change.

The static subset picks S ⊂ P, |S| = ⌊α·p⌋, once at phase start (at random, or by gradient
magnitude from a probe batch): only S is trainable, so grads and optimizer state are O(αp).
"""
from dataclasses import dataclass
from typing import Optional

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from resu_tensor.compact import CompactTensor
from resu_tensor.mask_encoding import encode_mask
from resu_tensor.tensor import ResuTensor

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


def consistency_filter_(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, config: tuple) -> torch.Tensor:
    """Update the EMAs ``m``, ``v`` in place with ``grad`` (flat) and return the filtered gradient
    1[P_select]·C·g. Reference implementation (plain PyTorch)."""
    beta, tau, screen, select, delta, _ = config
    g = grad.float()
    m.mul_(beta).add_((1 - beta) * g)
    v.mul_(beta).add_((1 - beta) * g.abs())
    consistency = m.float().abs() / (v.float() + delta)
    p = g.numel()
    screened = torch.zeros(p, dtype=torch.bool, device=g.device)
    screened[torch.topk(g.abs(), min(p, max(1, round(screen * p))), sorted=False).indices] = True
    candidates = screened & (consistency > tau)
    score = torch.where(candidates, consistency * g.abs(), -1.0)
    n_select = min(int(candidates.sum()), int(select * p))
    chosen = torch.zeros(p, dtype=torch.bool, device=g.device)
    if n_select:
        chosen[torch.topk(score, n_select, sorted=False).indices] = True
    return torch.where(chosen, consistency * g, 0.0).to(grad.dtype)


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


def restrict_to_subset_(tensor: ResuTensor, config: StaticSubsetConfig, scores: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> None:
    """Make only a static subset S ⊂ P of a RESU/QRESU weight trainable (a new trainable set)."""
    if tensor.trainable_side not in ("pruned", "subset"):
        raise ValueError("a static subset needs a RESU weight whose active set is frozen (freeze_active=True)")
    subset = subset_mask(~tensor.storage_mask(), config.alpha, scores, generator)
    resu_state = {"nm": tensor.nm}
    if tensor.selective is not None:
        n = int(subset.sum())
        dtype = EMA_DTYPES[tensor.selective[-1]]
        resu_state.update(selective=tensor.selective, selective_m=torch.zeros(n, dtype=dtype, device=subset.device),
                          selective_v=torch.zeros(n, dtype=dtype, device=subset.device))
    if tensor.grad_abs_sum is not None:
        resu_state["grad_abs_sum"] = torch.zeros(int(subset.sum()), device=subset.device)
    storage = {"values": tensor.values} if tensor.values is not None else {"quantized": (
        tensor.qdata, tensor.qscale, tensor.qoffset, tensor.theta, tensor.quant_bits, tensor.group_size)}
    tensor.set_state_(mode=tensor.mode, mask=tensor.encoded_mask(), trainable_side="subset",
                      subset=encode_mask(subset), **storage, **resu_state)


def _prepare_resu_gradients(optimizer, args, kwargs) -> None:
    """Before each step: accumulate |g| for gradient-scored commits, then apply the consistency
    filter, on every ResuTensor parameter that asks for either."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not isinstance(param, ResuTensor) or not isinstance(param.grad, CompactTensor):
                continue
            if param.grad.trainable_key != param.trainable_key:
                continue  # stale: the stale-state check reports it
            flat = param.grad.flat
            if param.grad_abs_sum is not None:
                param.grad_abs_sum.add_(flat.abs().float())
            if param.selective is not None:
                flat.copy_(consistency_filter_(flat, param.selective_m, param.selective_v, param.selective))


register_optimizer_step_pre_hook(_prepare_resu_gradients)

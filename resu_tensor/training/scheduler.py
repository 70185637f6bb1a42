"""ResuScheduler: drives every ResuTensor of a model through RESU cycles from the user's own loop.

    scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4))
    for x, y in data:
        loss = loss_fn(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()
        scheduler.step(loss)            # once per optimizer step

It never runs the training loop; Wanda pruning or scoring only needs ``calibration`` batches.
The same class drives a model whose ResuTensor weights FSDP2 shards: each phase change runs on
the gathered layers (training/sharded.py), identically on every rank.
"""
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Iterable, Optional

import torch
from torch import nn

from resu_tensor import kernels
from resu_tensor.core.subset import restrict_to_subset_
from resu_tensor.method.schedule import ScheduleConfig
from resu_tensor.training.calibration import calibrate
from resu_tensor.training.filters import require_chosen, resu_weights
from resu_tensor.training.lifecycle import commit_, enter_resu_, prune_
from resu_tensor.training.optimizer_state import reset_optimizer_state_
from resu_tensor.training.sharded import check_gatherable_options, full_weights, sharded_weights

PHASES = ("train", "stabilize", "resu")


@dataclass
class CycleStats:
    """What one cycle did, over all scheduled layers."""

    cycle: int
    sparsity: float
    resurrected: int  # pruned before RESU, active after commit
    survivors: int  # resurrected in an earlier cycle and still active after this commit
    mean_consistency: Optional[float]  # RESU-Selective's mean C over θ at commit (None without it)
    loss: Optional[float]  # mean of the losses passed to step() during the cycle


class ResuScheduler:
    """Call :meth:`step` once per optimizer step. Mode changes reset exactly the optimizer state
    of the layers whose trainable set changed. ``history`` holds one :class:`CycleStats` per
    finished cycle; ``state_dict``/``load_state_dict`` make runs resumable mid-cycle.

    ``calibration`` (for Wanda): input batches, or the dict of :func:`resu_tensor.calibrate`.

    Under FSDP2 (``fully_shard`` sharding the ResuTensor weights by rows) call :meth:`step` on
    every rank with the same config and seed: every phase change (prune, enter RESU, commit,
    subset refresh) runs on the gathered layers, so masks are identical on every rank and equal
    to a single-process run's. Calibration batches are then each rank's own (norms over every
    rank's). RESU-Selective's consistency filter and gradient-probed subsets are not supported
    there (``NotImplementedError``).

    Example::

        scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4))
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: ScheduleConfig,
                 calibration: Optional[Iterable] = None, filter_fn=None):
        if not isinstance(config, ScheduleConfig):
            raise TypeError(f"config must be a ScheduleConfig, got {type(config).__name__}")
        needs_wanda = config.prune_method == "wanda" or config.commit_score == "wanda" or config.commit_strategy == "wanda_reprune"
        if needs_wanda and calibration is None:
            raise ValueError("Wanda pruning/scoring needs calibration batches: ResuScheduler(..., calibration=batches)")
        if isinstance(calibration, torch.Tensor):
            raise TypeError("calibration needs an iterable of batches; wrap a single batch tensor in a list: [x]")
        self.model, self.optimizer, self.config = model, optimizer, config
        self.calibration = dict(calibration) if isinstance(calibration, Mapping) else \
            list(calibration) if calibration is not None else None
        self.filter_fn = filter_fn
        self.generator = torch.Generator().manual_seed(config.seed)
        self.global_step = 0
        self.history: list[CycleStats] = []
        self._loss_sum, self._loss_count = 0.0, 0
        self._ever_resurrected: dict[str, torch.Tensor] = {}  # packed bitmaps, 1 bit per element
        self._pre_resu_masks: dict[str, torch.Tensor] = {}
        self._progress = None
        self._sharded = bool(sharded_weights(model, filter_fn))
        if not self._sharded:
            require_chosen(list(resu_weights(model, filter_fn)), model, filter_fn, "ResuScheduler")
        if self._sharded:
            check_gatherable_options({"selective": config.selective})

    # ------------------------------------------------------------------ position in the schedule
    @property
    def cycle(self) -> int:
        return min(self.global_step // self.config.steps_per_cycle, self.config.num_cycles)

    @property
    def finished(self) -> bool:
        return self.global_step >= self.config.steps_per_cycle * self.config.num_cycles

    @property
    def phase(self) -> str:
        if self.finished:
            return "done"
        in_cycle = self.global_step % self.config.steps_per_cycle
        c = self.config
        if in_cycle < c.train_steps:
            return "train"
        return "stabilize" if in_cycle < c.train_steps + c.stabilize_steps else "resu"

    # ------------------------------------------------------------------ stepping
    def step(self, loss=None) -> None:
        """Advance one optimizer step; runs PRUNE / enter RESU / COMMIT at phase boundaries."""
        if self.finished:
            return
        if loss is not None:
            self._loss_sum += float(loss.detach() if isinstance(loss, torch.Tensor) else loss)
            self._loss_count += 1
        before = self.phase
        cycle = self.cycle
        self.global_step += 1
        self._maybe_refresh_subset()
        in_cycle = self.global_step % self.config.steps_per_cycle
        if in_cycle == 0:
            self._commit(cycle)
        elif before == "train" and self.phase == "stabilize":
            self._prune(cycle)
        elif before != "resu" and self.phase == "resu":
            if before == "train":  # no STABILIZE budget: prune and enter RESU at once
                self._prune(cycle)
            self._enter_resu()
        self._update_progress()

    def _reset_state(self) -> None:
        reset_optimizer_state_(self.optimizer, self.model)

    def _gathered(self):
        """Whole layers for a phase change: FSDP2-sharded weights are gathered (and the optimizer
        state they made stale dropped on exit); unsharded ones are used as they are."""
        return full_weights(self.model, self.optimizer, self.filter_fn)

    def _calibration(self, needed: bool):
        """Input norms, computed while the model can still run when its weights are sharded (the
        model must not run inside :meth:`_gathered`); otherwise what the user passed."""
        if not needed or not self._sharded or self.calibration is None or isinstance(self.calibration, dict):
            return self.calibration
        return calibrate(self.model, self.calibration, self.filter_fn)

    def _prune(self, cycle: int) -> None:
        c = self.config
        calibration = self._calibration(c.prune_method == "wanda")
        with self._gathered():
            prune_(self.model, c.sparsity_at(cycle), method=c.prune_method, granularity=c.granularity, scope=c.scope,
                   calibration=calibration, filter_fn=self.filter_fn, generator=self.generator)
            self._reset_state()

    def _enter_resu(self) -> None:
        c = self.config
        with self._gathered():
            self._pre_resu_masks = {name: kernels.pack_bitmap(w.storage_mask().view(-1))
                                    for name, _, w in resu_weights(self.model, self.filter_fn)}
            enter_resu_(self.model, epsilon=c.epsilon, freeze_active=c.freeze_active, filter_fn=self.filter_fn,
                        generator=self.generator, quantize_bits=c.quantize_bits, group_size=c.group_size,
                        selective=c.selective, track_gradients=c.commit_score == "gradient")
            self._reset_state()

    def _maybe_refresh_subset(self) -> None:
        every = getattr(self.config.selective, "refresh_every", None)
        if not every or self.phase != "resu":
            return
        resu_start = self.config.train_steps + self.config.stabilize_steps
        in_resu = self.global_step % self.config.steps_per_cycle - resu_start
        if in_resu > 0 and in_resu % every == 0:
            with self._gathered():
                for _, _, w in resu_weights(self.model, self.filter_fn):
                    restrict_to_subset_(w, self.config.selective, None, self.generator)
                self._reset_state()

    def _commit(self, cycle: int) -> None:
        c = self.config
        wanda = c.commit_score == "wanda" or c.commit_strategy == "wanda_reprune"
        calibration = self._calibration(wanda)
        with self._gathered():
            self._commit_layers(cycle, calibration)
        if cycle in tuple(c.pause_at):
            c.on_pause(self, cycle)

    def _commit_layers(self, cycle: int, calibration) -> None:
        c = self.config
        weights = list(resu_weights(self.model, self.filter_fn))
        consistency = [w.selective_m.float().abs() / (w.selective_v.float() + w.selective.delta)
                       for _, _, w in weights if w.selective_m is not None]
        mean_consistency = torch.cat(consistency).mean().item() if consistency else None
        commit_(self.model, strategy=c.commit_strategy, sparsity=c.sparsity_at(cycle), cycle=cycle,
                num_cycles=c.num_cycles, score=c.commit_score, r_start=c.r_start, r_end=c.r_end,
                calibration=calibration, filter_fn=self.filter_fn)
        self._reset_state()
        resurrected = survivors = pruned = numel = 0
        for name, _, w in weights:
            mask = w.storage_mask().view(-1)
            before = self._pre_resu_masks.get(name)
            before = kernels.unpack_bitmap(before, mask.numel()) if before is not None else mask
            new = mask & ~before
            ever = self._ever_resurrected.get(name)
            ever = kernels.unpack_bitmap(ever, mask.numel()) if ever is not None else torch.zeros_like(mask)
            survivors += int((ever & mask).sum())
            resurrected += int(new.sum())
            self._ever_resurrected[name] = kernels.pack_bitmap(ever | new)
            pruned += mask.numel() - int(mask.sum())
            numel += mask.numel()
        loss = self._loss_sum / self._loss_count if self._loss_count else None
        self.history.append(CycleStats(cycle, pruned / numel, resurrected, survivors, mean_consistency, loss))
        self._loss_sum, self._loss_count = 0.0, 0

    # ------------------------------------------------------------------ progress bar
    def _update_progress(self) -> None:
        if not self.config.progress:
            return
        if self._progress is None:
            from tqdm.auto import tqdm

            total = self.config.steps_per_cycle * self.config.num_cycles
            self._progress = tqdm(total=total, initial=self.global_step - 1, desc="RESU", unit="step")
        self._progress.update(1)
        self._progress.set_postfix(cycle=self.cycle, phase=self.phase)
        if self.finished:
            self._progress.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "history": [asdict(h) for h in self.history],
            "loss_sum": self._loss_sum,
            "loss_count": self._loss_count,
            "ever_resurrected": dict(self._ever_resurrected),
            "pre_resu_masks": dict(self._pre_resu_masks),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.history = [CycleStats(**h) for h in state["history"]]
        self._loss_sum, self._loss_count = state["loss_sum"], state["loss_count"]
        self._ever_resurrected = dict(state["ever_resurrected"])
        self._pre_resu_masks = dict(state["pre_resu_masks"])
        self.generator.set_state(state["generator"])

    def summary(self) -> str:
        """The per-cycle stats as a table."""
        header = f"{'cycle':>5}  {'sparsity':>8}  {'resurrected':>11}  {'survivors':>9}  {'consistency':>11}  {'loss':>8}"
        rows = [header, "-" * len(header)]
        for h in self.history:
            consistency = "" if h.mean_consistency is None else f"{h.mean_consistency:.3f}"
            loss = "" if h.loss is None else f"{h.loss:.4f}"
            rows.append(f"{h.cycle:>5}  {h.sparsity:>8.3f}  {h.resurrected:>11,}  {h.survivors:>9,}  {consistency:>11}  {loss:>8}")
        return "\n".join(rows)


__all__ = ["ResuScheduler", "CycleStats", "PHASES"]

"""ResuScheduler: drives every ResuTensor of a model through RESU cycles from the user's own loop.

    scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4))
    for x, y in data:
        loss = loss_fn(model(x), y); loss.backward(); optimizer.step(); optimizer.zero_grad()
        scheduler.step(loss)            # once per optimizer step

It never runs the training loop; Wanda pruning or scoring only needs ``calibration`` batches.
Every phase change is announced on the ``resu_tensor`` logger (INFO: the phase change and its
figures; DEBUG: per-layer details); ``logging.basicConfig(level=logging.INFO)`` shows them.
The same class drives a model whose ResuTensor weights FSDP2 shards: each phase change runs on
the gathered layers (training/sharded.py), identically on every rank.
"""
import logging
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Iterable, Optional

import torch
from torch import nn

from resu_tensor import kernels
from resu_tensor.core.subset import restrict_to_subset_
from resu_tensor.method.amnesty import AmnestyStats, format_stats_table
from resu_tensor.method.regrowth import cosine_drop_fraction, gmp_sparsity
from resu_tensor.method.schedule import ScheduleConfig
from resu_tensor.training.calibration import calibrate
from resu_tensor.training.filters import require_chosen, resu_weights
from resu_tensor.training.lifecycle import commit_, enter_resu_, full_weights_keeping_state, prune_
from resu_tensor.training.optimizer_state import reset_optimizer_state_
from resu_tensor.training.regrowth import dense_gradients, drop_and_grow_
from resu_tensor.training.sharded import check_gatherable_options, full_weights, sharded_weights

PHASES = ("train", "stabilize", "resu", "finetune")
# Losses passed as tensors are read together at most this many steps apart (one transfer each time).
UNREAD_LOSSES_LIMIT = 256

logger = logging.getLogger("resu_tensor")
logger.addHandler(logging.NullHandler())  # silent unless the application configures logging


@dataclass
class CycleStats:
    """What one cycle did, over all scheduled layers."""

    cycle: int
    sparsity: float
    resurrected: int  # pruned before this cycle's RESU, active after its commit
    # resurrected in an earlier cycle and still active after this commit, and not counted in
    # ``resurrected`` again (a coordinate pruned and resurrected a second time counts there only)
    survivors: int
    mean_consistency: Optional[float]  # RESU-Selective's mean C over θ at commit (None without it)
    loss: Optional[float]  # mean of the losses passed to step() during the cycle
    active: Optional[int] = None  # size of the active set after the commit
    # share of that active set pruned at some point before (each coordinate once, however often
    # it was pruned and resurrected)
    resurrected_share: Optional[float] = None


@dataclass(slots=True)  # one per step of a long run: no per-instance __dict__
class StepRecord:
    """One optimizer step of a ResuScheduler run (``scheduler.steps``).

    ``step``: the step count after it (1 for the first step, as ``global_step``); ``phase``: the
    phase the step trained in; ``sparsity`` and ``resurrected_share`` (share of the active set
    pruned at some point before, each coordinate once) as they are after the step, after any
    phase change it triggered (None for FSDP2-sharded weights before the first phase change);
    ``event``: the phase change the step triggered (``prune``, ``enter_resu``, ``commit``; a
    step ending TRAIN with no STABILIZE budget gives ``prune+enter_resu``), else None;
    ``metrics``: what was passed to ``step(loss, metrics=...)``.
    """

    step: int
    cycle: int
    phase: str
    loss: Optional[float]
    sparsity: Optional[float]
    resurrected_share: Optional[float]
    event: Optional[str] = None
    metrics: dict = field(default_factory=dict)


class ResuScheduler:
    """Call :meth:`step` once per optimizer step. ``history`` holds one :class:`CycleStats` per
    finished cycle, ``phase_changes`` the figures of every logged phase change (prune, enter_resu,
    commit, finished) and ``steps`` one :class:`StepRecord` per step (loss, phase, sparsity, the
    exact resurrected share, your metrics); ``state_dict``/``load_state_dict`` make runs
    resumable mid-cycle and carry both. Phase changes are logged on the ``resu_tensor`` logger.

    Evaluation metrics: pass them with the step they belong to, e.g. every 100 steps
    ``scheduler.step(loss, metrics={"val_acc": evaluate(model)})``; they land in that step's
    record and in :func:`resu_tensor.plot_history`.

    ``calibration`` (for Wanda): input batches, or the dict of :func:`resu_tensor.calibrate`.

    ``config.method`` picks RESU (default) or a baseline (``one_shot``, ``gmp``, ``rigl``, ``set``;
    see :class:`ScheduleConfig`), all stepped the same way and ending in ``config.finetune_steps``
    of final fine-tuning (``phase == "finetune"``). RigL needs ``probe_fn(model) -> loss``, whose
    dense gradient ranks the pruned coordinates to grow. Baselines that start sparse (RigL, SET,
    one-shot without warm-up) prune when the scheduler is created; a resumed run then loads the
    model, optimizer and scheduler states over that. Mask changes keep the optimizer state of the
    coordinates that stay trainable (baselines, plain weights; FSDP2-sharded weights start afresh);
    RESU's phase changes start the changed layers' state afresh.

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
                 calibration: Optional[Iterable] = None, filter_fn=None, probe_fn=None):
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
        self._steps: list[StepRecord] = []
        # (record, 0-d tensor) of losses passed as tensors and not read yet: reading one waits for
        # the device, so they are read together, at a commit or when the history is asked for
        self._unread_losses: list[tuple[StepRecord, torch.Tensor]] = []
        self.phase_changes: list[dict] = []  # {"step", "event", "cycle", figures...} per logged phase change
        self._sparsity: Optional[float] = None  # after the last phase change (masks move only there)
        self._resurrected_share: Optional[float] = None
        self._ever_pruned: dict[str, torch.Tensor] = {}  # packed bitmaps: pruned at some point
        self._loss_sum, self._loss_count = 0.0, 0
        self._ever_resurrected: dict[str, torch.Tensor] = {}  # packed bitmaps, 1 bit per element
        self._pre_resu_masks: dict[str, torch.Tensor] = {}
        self._progress = None
        self._sharded = bool(sharded_weights(model, filter_fn))
        if not self._sharded:
            require_chosen(list(resu_weights(model, filter_fn)), model, filter_fn, "ResuScheduler")
        if self._sharded:
            check_gatherable_options({"selective": config.selective})
        if config.method in ("rigl", "set") and self._sharded:
            raise NotImplementedError(f"method={config.method!r} does not support FSDP2-sharded weights; use 'gmp', "
                                      "'one_shot' or 'resu'")
        if config.method == "rigl" and not callable(probe_fn):
            raise ValueError("method='rigl' grows by the dense gradient: pass probe_fn(model) -> loss (e.g. the loss "
                             "of a training batch) to ResuScheduler")
        self.probe_fn = probe_fn
        if config.method != "resu":
            self._mask_change_at_start()

    # ------------------------------------------------------------------ position in the schedule
    @property
    def cycle(self) -> int:
        """RESU: the cycle the next step trains in (``num_cycles`` during the final fine-tuning);
        the baselines: 0."""
        if self.config.method != "resu":
            return 0
        return min(self.global_step // self.config.steps_per_cycle, self.config.num_cycles)

    @property
    def finished(self) -> bool:
        return self.global_step >= self.config.total_steps

    @property
    def phase(self) -> str:
        """What the next step does: ``train`` / ``stabilize`` / ``resu`` (RESU cycles; the
        baselines train until the final fine-tuning), ``finetune`` or ``done``."""
        if self.finished:
            return "done"
        c = self.config
        if self.global_step >= c.mask_steps:
            return "finetune"
        if c.method != "resu":
            return "train"
        in_cycle = self.global_step % c.steps_per_cycle
        if in_cycle < c.train_steps:
            return "train"
        return "stabilize" if in_cycle < c.train_steps + c.stabilize_steps else "resu"

    # ------------------------------------------------------------------ stepping
    def step(self, loss=None, metrics: Optional[Mapping] = None) -> None:
        """Advance one optimizer step; runs PRUNE / enter RESU / COMMIT at phase boundaries.

        ``loss`` (a number or a 0-d tensor) and ``metrics`` ({name: number}, e.g. an evaluation
        score computed for this step) go into the step's :class:`StepRecord`. A tensor loss is
        not read at once (that would make the host wait for the GPU every step): the losses are
        read together, in one transfer, when a cycle's loss is needed, when :attr:`steps` or
        :meth:`state_dict` is asked for, or every ``UNREAD_LOSSES_LIMIT`` steps.

        Example::

            scheduler.step(loss, metrics={"val_acc": 0.91} if step % 100 == 0 else None)
        """
        metrics = _check_metrics(metrics)
        if self.finished:
            return
        unread = None
        if isinstance(loss, torch.Tensor):
            unread = _as_scalar_tensor("loss", loss)
            self._loss_sum = unread + self._loss_sum
            loss = None
        elif loss is not None:
            loss = _as_float("loss", loss)
            self._loss_sum += loss
        self._loss_count += unread is not None or loss is not None
        if not self._steps and self._sparsity is None and not self._sharded:
            self._update_mask_figures()  # the starting point (a model may start SPARSE)
        before = self.phase
        cycle = self.cycle
        self.global_step += 1
        if self.config.method != "resu":
            event = self._baseline_event()
        else:
            event = self._resu_event(before, cycle)
        record = StepRecord(self.global_step, cycle, before, loss, self._sparsity, self._resurrected_share, event,
                            metrics)
        self._steps.append(record)
        if unread is not None:
            self._unread_losses.append((record, unread))
            if len(self._unread_losses) >= UNREAD_LOSSES_LIMIT:
                self._read_losses()
        if self.finished:
            self._announce_finished()
        self._update_progress()

    def _announce_finished(self) -> None:
        c = self.config
        if c.method == "resu":
            self._announce("finished", "step %d: RESU schedule finished after %d cycles: sparsity %.4f, resurrected "
                           "share %.4f", self.global_step, c.num_cycles, self._sparsity, self._resurrected_share,
                           cycle=c.num_cycles - 1, sparsity=self._sparsity, resurrected_share=self._resurrected_share,
                           finetune_steps=c.finetune_steps)
            return
        self._announce("finished", "step %d: %s schedule finished: sparsity %.4f after %d final fine-tuning steps",
                       self.global_step, c.method, self._sparsity, c.finetune_steps, sparsity=self._sparsity,
                       finetune_steps=c.finetune_steps)

    def _resu_event(self, before: str, cycle: int) -> Optional[str]:
        """The RESU phase change the step that just ended triggers, run."""
        self._maybe_refresh_subset()
        in_cycle = self.global_step % self.config.steps_per_cycle
        if before == "finetune":
            return None
        event = None
        if in_cycle == 0:
            self._commit(cycle)
            event = "commit"
        elif before == "train" and self.phase == "stabilize":
            self._prune(cycle)
            event = "prune"
        elif before != "resu" and self.phase == "resu":
            event = "enter_resu"
            if before == "train":  # no STABILIZE budget: prune and enter RESU at once
                self._prune(cycle)
                event = "prune+enter_resu"
            self._enter_resu(cycle)
        return event

    # ------------------------------------------------------------------ baselines
    def _mask_change_at_start(self) -> None:
        """Step 0 of a baseline: RigL/SET start sparse at the target, one-shot without warm-up
        prunes now, GMP prunes to ``initial_sparsity`` when its window starts at 0."""
        c = self.config
        if self.global_step:
            return
        if not self._sharded:
            self._update_mask_figures()
        if c.method in ("rigl", "set") or c.method == "one_shot" and c.prune_start_step == 0:
            self._prune_to(c.sparsity)
        elif c.method == "gmp" and c.prune_start_step == 0 and c.initial_sparsity > 0:
            self._prune_to(c.initial_sparsity)

    def _baseline_event(self) -> Optional[str]:
        """The baseline mask change the step that just ended triggers, run."""
        c, t = self.config, self.global_step
        if t > c.mask_steps:
            return None
        if c.method == "one_shot":
            if t == c.prune_start_step:
                self._prune_to(c.sparsity)
                return "prune"
            return None
        if c.method == "gmp":
            start = c.prune_start_step
            if t >= start and ((t - start) % c.update_every == 0 or t == c.mask_steps):
                target = gmp_sparsity(t, start, c.mask_steps, c.initial_sparsity, c.sparsity)
                if target > 0:
                    self._prune_to(target)
                    return "prune"
            return None
        if t % c.update_every or t >= c.mask_steps:
            return None
        fraction = cosine_drop_fraction(t, c.mask_steps, c.drop_fraction) if c.method == "rigl" else c.drop_fraction
        scores = None
        if c.method == "rigl":
            scores = {name: g.abs() for name, g in dense_gradients(self.model, self.probe_fn, self.filter_fn).items()}
        changed = drop_and_grow_(self.model, fraction, scores, self.filter_fn, self.generator, optimizer=self.optimizer)
        self._update_mask_figures()
        swapped = sum(grown for _, grown in changed.values())
        self._announce("regrow", "step %d: %s: dropped and regrew %d weights (fraction %.4f): sparsity %.4f",
                       t, c.method, swapped, fraction, self._sparsity, fraction=fraction, swapped=swapped,
                       sparsity=self._sparsity)
        return "regrow"

    def _prune_to(self, sparsity: float) -> None:
        c = self.config
        calibration = self._calibration(c.prune_method == "wanda")
        # sharded weights: the state of coordinates that stay active is remapped on exit;
        # plain ones: prune_ remaps it
        with full_weights(self.model, self.optimizer, self.filter_fn, keep_state=True):
            self._update_mask_figures()
            prune_(self.model, sparsity, method=c.prune_method, granularity=c.granularity, scope=c.scope,
                   calibration=calibration, filter_fn=self.filter_fn, generator=self.generator,
                   optimizer=self.optimizer)
            layers = self._update_mask_figures()
        self._announce("prune", "step %d: %s: pruned %d layers (%s) to target sparsity %.4f: actual sparsity %.4f",
                       self.global_step, c.method, len(layers), c.prune_method, sparsity, self._sparsity,
                       target_sparsity=sparsity, layers=len(layers), sparsity=self._sparsity)

    def _reset_state(self) -> None:
        """After a phase change: drop the state made stale, unless ``optimizer_state="carry"``
        (:meth:`_gathered` then remaps it)."""
        if self.config.optimizer_state != "carry":
            reset_optimizer_state_(self.optimizer, self.model)

    def _gathered(self):
        """Whole layers for a phase change: FSDP2-sharded weights are gathered (and the optimizer
        state they made stale dropped on exit); unsharded ones are used as they are. With
        ``optimizer_state="carry"`` the state is remapped to the new trainable sets on exit instead."""
        if self.config.optimizer_state == "carry":
            return full_weights_keeping_state(self.model, self.optimizer, self.filter_fn)
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
            self._update_mask_figures()  # coordinates pruned before the scheduler's first prune count too
            prune_(self.model, c.sparsity_at(cycle), method=c.prune_method, granularity=c.granularity, scope=c.scope,
                   calibration=calibration, filter_fn=self.filter_fn, generator=self.generator)
            # optimizer_state="reset": the prune starts the active set's state afresh, as the other
            # phase changes do, with FSDP2-sharded weights (whose state full_weights drops) as without
            self._reset_state()
            layers = self._update_mask_figures()
        self._announce("prune", "step %d: cycle %d: pruned %d layers (%s) to target sparsity %.4f: actual sparsity %.4f",
                       self.global_step, cycle, len(layers), c.prune_method, c.sparsity_at(cycle), self._sparsity,
                       cycle=cycle, target_sparsity=c.sparsity_at(cycle), layers=len(layers), sparsity=self._sparsity)
        for name, sparsity in layers.items():
            logger.debug("step %d: cycle %d: pruned layer %r: sparsity %.4f", self.global_step, cycle, name, sparsity)

    def _enter_resu(self, cycle: int) -> None:
        c = self.config
        with self._gathered():
            self._pre_resu_masks = {name: kernels.pack_bitmap(w.storage_mask().view(-1))
                                    for name, _, w in resu_weights(self.model, self.filter_fn)}
            enter_resu_(self.model, epsilon=c.epsilon, freeze_active=c.freeze_active, filter_fn=self.filter_fn,
                        generator=self.generator, quantize_bits=c.quantize_bits, group_size=c.group_size,
                        selective=c.selective, track_gradients=c.commit_score == "gradient")
            self._reset_state()
            # θ fills every pruned slot; ``trainable`` is what the optimizer moves (a subset of θ
            # under a static subset, θ and the active weights with freeze_active=False)
            counts = {name: (w.storage_numel - w.n_active, w.trainable_count)
                      for name, _, w in resu_weights(self.model, self.filter_fn)}
        theta = sum(t for t, _ in counts.values())
        trainable = sum(n for _, n in counts.values())
        figures = dict(cycle=cycle, mode="resu" if c.quantize_bits is None else "qresu", layers=len(counts),
                       theta=theta, trainable=trainable, bits=c.quantize_bits)
        if c.quantize_bits is None:
            self._announce("enter_resu", "step %d: cycle %d: entered RESU on %d layers: %d θ, %d trainable",
                           self.global_step, cycle, len(counts), theta, trainable, **figures)
        else:
            self._announce("enter_resu", "step %d: cycle %d: entered QRESU (%d-bit) on %d layers: %d θ, %d trainable",
                           self.global_step, cycle, c.quantize_bits, len(counts), theta, trainable, **figures)
        for name, (t, n) in counts.items():
            logger.debug("step %d: cycle %d: entered RESU layer %r: %d θ, %d trainable", self.global_step, cycle, name, t, n)

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
        at_commit = c.optimizer_state == "carry_at_commit"
        layer_stats = commit_(self.model, strategy=c.commit_strategy, sparsity=c.sparsity_at(cycle), cycle=cycle,
                              num_cycles=c.num_cycles, score=c.commit_score, r_start=c.r_start, r_end=c.r_end,
                              admit=c.commit_admit, calibration=calibration, filter_fn=self.filter_fn,
                              optimizer=self.optimizer if at_commit else None)
        if not at_commit:  # "reset": a fresh state for the new active set; "carry": remapped by _gathered
            self._reset_state()
        resurrected = survivors = 0
        for name, _, w in weights:
            mask = w.storage_mask().view(-1)
            before = self._pre_resu_masks.get(name)
            before = kernels.unpack_bitmap(before, mask.numel()) if before is not None else mask
            new = mask & ~before
            ever = self._ever_resurrected.get(name)
            ever = kernels.unpack_bitmap(ever, mask.numel()) if ever is not None else torch.zeros_like(mask)
            survivors += int((ever & mask & ~new).sum())  # a second resurrection counts in ``resurrected`` only
            resurrected += int(new.sum())
            self._ever_resurrected[name] = kernels.pack_bitmap(ever | new)
        self._update_mask_figures()
        active = sum(int(w.n_active) for _, _, w in weights)
        loss = float(self._loss_sum) / self._loss_count if self._loss_count else None
        stats = CycleStats(cycle, self._sparsity, resurrected, survivors, mean_consistency, loss, active,
                           self._resurrected_share)
        self.history.append(stats)
        self._loss_sum, self._loss_count = 0.0, 0
        totals = AmnestyStats(*(sum(getattr(s, f.name) for s in layer_stats.values()) for f in fields(AmnestyStats)))
        self._announce("commit", "step %d: cycle %d: committed (%s): %d resurrected (%.2f%% of the new active set of "
                       "%d), %d survivors, resurrected share %.4f, sparsity %.4f; %s",
                       self.global_step, cycle, c.commit_strategy, resurrected, 100 * resurrected / max(active, 1),
                       active, survivors, self._resurrected_share, self._sparsity,
                       ", ".join(f"{f.name}={getattr(totals, f.name)}" for f in fields(AmnestyStats)),
                       cycle=cycle, strategy=c.commit_strategy, resurrected=resurrected, active=active,
                       resurrected_of_active=resurrected / active if active else 0.0, survivors=survivors,
                       resurrected_share=self._resurrected_share, sparsity=self._sparsity, amnesty=asdict(totals))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("step %d: cycle %d: commit per layer:\n%s", self.global_step, cycle,
                         format_stats_table(layer_stats))

    def _announce(self, event: str, message: str, *args, **figures) -> None:
        """Log a phase change at INFO and keep its figures in ``phase_changes``; the log record
        carries them too (``record.resu``), for handlers that want numbers rather than text."""
        entry = {"step": self.global_step, "event": event, **figures}
        self.phase_changes.append(entry)
        logger.info(message, *args, extra={"resu": entry})

    def _update_mask_figures(self) -> dict:
        """Sparsity and resurrected share of the scheduled layers as the masks are now; marks the
        pruned coordinates as pruned at some point. Returns {layer: sparsity}."""
        pruned = numel = resurrected_active = active = 0
        layers = {}
        for name, _, w in resu_weights(self.model, self.filter_fn):
            mask = w.storage_mask().view(-1)
            ever = self._ever_pruned.get(name)
            ever = (kernels.unpack_bitmap(ever, mask.numel()) if ever is not None else torch.zeros_like(mask)) | ~mask
            self._ever_pruned[name] = kernels.pack_bitmap(ever)
            kept = int(mask.sum())
            resurrected_active += int((ever & mask).sum())
            active += kept
            pruned += mask.numel() - kept
            numel += mask.numel()
            layers[name] = 1 - kept / mask.numel()
        self._sparsity = pruned / numel if numel else 0.0
        self._resurrected_share = resurrected_active / active if active else 0.0
        return layers

    @property
    def steps(self) -> list[StepRecord]:
        """One :class:`StepRecord` per step so far, every loss read."""
        self._read_losses()
        return self._steps

    def _read_losses(self) -> None:
        """Fill in the losses passed as tensors, in one transfer."""
        if not self._unread_losses:
            return
        values = torch.stack([t.to(self._unread_losses[0][1].device) for _, t in self._unread_losses]).tolist()
        for (record, _), value in zip(self._unread_losses, values):
            record.loss = value
        self._unread_losses.clear()

    # ------------------------------------------------------------------ progress bar
    def _update_progress(self) -> None:
        if not self.config.progress:
            return
        if self._progress is None:
            from tqdm.auto import tqdm

            self._progress = tqdm(total=self.config.total_steps, initial=self.global_step - 1,
                                  desc=self.config.method.upper(), unit="step")
        self._progress.update(1)
        self._progress.set_postfix(cycle=self.cycle, phase=self.phase)
        if self.finished:
            self._progress.close()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "history": [asdict(h) for h in self.history],
            "loss_sum": float(self._loss_sum),
            "loss_count": self._loss_count,
            "ever_resurrected": dict(self._ever_resurrected),
            "pre_resu_masks": dict(self._pre_resu_masks),
            "generator": self.generator.get_state(),
            "steps": [asdict(r) for r in self.steps],
            "phase_changes": [dict(e) for e in self.phase_changes],
            "ever_pruned": dict(self._ever_pruned),
            "mask_figures": (self._sparsity, self._resurrected_share),
        }

    def load_state_dict(self, state: dict) -> None:
        self.global_step = state["global_step"]
        self.history = [CycleStats(**h) for h in state["history"]]
        self._loss_sum, self._loss_count = state["loss_sum"], state["loss_count"]
        self._ever_resurrected = dict(state["ever_resurrected"])
        self._pre_resu_masks = dict(state["pre_resu_masks"])
        self.generator.set_state(state["generator"])
        # states saved before the per-step history existed have none of these
        self._steps = [StepRecord(**r) for r in state.get("steps", [])]
        self._unread_losses.clear()
        self.phase_changes = [dict(e) for e in state.get("phase_changes", [])]
        self._ever_pruned = dict(state.get("ever_pruned", {}))
        self._sparsity, self._resurrected_share = state.get("mask_figures", (None, None))

    def summary(self) -> str:
        """The per-cycle stats as a table."""
        header = f"{'cycle':>5}  {'sparsity':>8}  {'resurrected':>11}  {'survivors':>9}  {'consistency':>11}  {'loss':>8}"
        rows = [header, "-" * len(header)]
        for h in self.history:
            consistency = "" if h.mean_consistency is None else f"{h.mean_consistency:.3f}"
            loss = "" if h.loss is None else f"{h.loss:.4f}"
            rows.append(f"{h.cycle:>5}  {h.sparsity:>8.3f}  {h.resurrected:>11,}  {h.survivors:>9,}  {consistency:>11}  {loss:>8}")
        return "\n".join(rows)


def _as_scalar_tensor(name: str, value: torch.Tensor) -> torch.Tensor:
    """A one-element tensor as a detached 0-d float32 copy on its device (not read). A copy: the
    caller may overwrite its tensor before the loss is read (a CUDA graph's output is rewritten by
    every replay)."""
    if value.numel() != 1:
        raise ValueError(f"{name} must be a number or a one-element tensor, got a tensor of shape {tuple(value.shape)}")
    return value.detach().reshape(()).to(torch.float32, copy=True)


def _as_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        return float(_as_scalar_tensor(name, value))
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number or a one-element tensor, got {value!r} ({type(value).__name__})")
    return float(value)


def _check_metrics(metrics) -> dict:
    if metrics is None:
        return {}
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics must be a dict {{name: number}}, got {type(metrics).__name__}")
    for name in metrics:
        if not isinstance(name, str):
            raise TypeError(f"metrics names must be str, got {name!r} ({type(name).__name__})")
    return {name: _as_float(f"metrics[{name!r}]", value) for name, value in metrics.items()}


__all__ = ["ResuScheduler", "CycleStats", "StepRecord", "PHASES", "logger"]

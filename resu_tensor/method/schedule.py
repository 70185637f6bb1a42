"""ScheduleConfig: the method, step budget and sparsity schedule of a ResuScheduler run."""
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

from resu_tensor.method.regrowth import gmp_sparsity

SPARSITY_SCHEDULES = ("constant", "linear", "cubic", "cosine")
METHODS = ("resu", "gmp", "rigl", "set", "one_shot")
# The final fine-tuning at the last mask, the same for every method, so that comparing methods
# changes one value. On the MNIST-1D MLP and CNN at 90% (docs/results.md) 0.4 beat 0.25 and 0.1
# for RESU on every seed, and GMP with 0.4 beat GMP with 0.25 on the CNN and tied on the MLP.
DEFAULT_FINETUNE_FRACTION = 0.4
# RESU's recipe: the active weights stay frozen through the RESU phase (only θ trains), in 5
# cycles, with the optimizer state of the coordinates that stay trainable kept across phase
# changes. With the state kept this beat the active weights training alongside θ in 20 cycles on
# a language model trained from scratch (GPU, 2000 steps at 90%: 3.57 against 3.82 perplexity,
# every seed; its CPU-sized stand-in at 800 and 2000 steps) and on the pretrained MiniLM's
# recovery (0.952 against 0.944 cosine); the 20-cycle form keeps a 3-point lead on the MNIST-1D MLP
# (docs/results.md). Where the active weights train (freeze_active=False) 20 cycles beat 2, 3 and 5
# on MNIST-1D.
DEFAULT_NUM_CYCLES = 5
DEFAULT_NUM_CYCLES_TRAINING_ACTIVE = 20
# The RESU phase's share of each cycle. With the active weights frozen, a phase of 20% instead of
# 40% lets them train for more of the run: on the CPU-sized language model at 90% it beat 40% on
# every seed at 800 and 2000 steps (and GMP pruning every 600 steps at 2000), and on MNIST-1D at
# 90% it took the CNN from 0.827 to 0.865 (ahead of GMP on every seed) and the MLP from 0.655 to
# 0.673 (docs/results.md). Where the active weights train through the RESU phase, 40% (its
# measured recipe) stays.
DEFAULT_RESU_FRACTION = 0.2
DEFAULT_RESU_FRACTION_TRAINING_ACTIVE = 0.4
# A short budget gets fewer default cycles, so that each keeps at least this many steps.
MIN_STEPS_PER_DEFAULT_CYCLE = 10
COMMIT_ADMIT_RULES = ("quota", "beats_weakest")  # = method.amnesty.ADMIT_RULES
OPTIMIZER_STATES = ("reset", "carry", "carry_at_commit")


@dataclass
class ScheduleConfig:
    """How a :class:`~resu_tensor.training.scheduler.ResuScheduler` drives a sparse training run.

    ``method`` picks what changes the masks; everything else (the step budget, the target
    ``sparsity``, the final fine-tuning phase, the optimizer-state handling) is shared, so methods
    are compared by changing that one value:

    * ``resu`` (default): RESU cycles. Each cycle of ``steps_per_cycle`` optimizer steps is
      TRAIN → PRUNE → STABILIZE → RESU → COMMIT; the fractions give the TRAIN, STABILIZE and RESU
      budgets (TRAIN takes what is left). Give ``total_steps`` (and optionally ``num_cycles``:
      the cycles share what the final fine-tuning leaves), or ``steps_per_cycle`` and
      ``num_cycles``. By default the active weights stay frozen through the RESU phase, which takes
      ``DEFAULT_RESU_FRACTION`` = 0.2 of each cycle (0.4 where they train), and a
      ``total_steps`` budget is shared by ``DEFAULT_NUM_CYCLES`` = 5 cycles; with
      ``freeze_active=False`` they train alongside θ, in ``DEFAULT_NUM_CYCLES_TRAINING_ACTIVE`` = 20 cycles
      (QRESU's ``quantize_bits`` needs them frozen). A budget too short for that many cycles of
      ``MIN_STEPS_PER_DEFAULT_CYCLE`` = 10 steps gets fewer.
    * ``one_shot``: prune once to ``sparsity``, after a dense warm-up of
      ``prune_start_fraction``·total_steps (0: when the scheduler is created), then train.
    * ``gmp``: Zhu & Gupta's gradual magnitude pruning: every ``update_every`` steps of the window
      from ``prune_start_fraction``·total_steps to the start of the final fine-tuning, prune to
      the cubic ``s_f + (s_i − s_f)·(1 − progress)³`` from ``initial_sparsity`` to ``sparsity``.
    * ``rigl``: sparse at ``sparsity`` from the start (``prune_method``, e.g. ``random`` as in the
      paper); every ``update_every`` steps until the final fine-tuning, drop the
      ``drop_fraction``·½(1 + cos(π·t/T_end)) smallest-magnitude active weights of each layer and
      grow as many pruned coordinates with the largest dense-gradient magnitude, at zero. The
      dense gradient comes from one extra backward of ``probe_fn(model) -> loss`` (given to the
      scheduler) through a dense copy of the weights: no dense optimizer state.
    * ``set``: as ``rigl`` with a constant ``drop_fraction`` and random regrowth.

    ``final_finetune_fraction`` of ``total_steps`` trains at the final mask after the last mask
    change (default 0.4 for every method). The one exception: the cycle form
    ``ScheduleConfig(steps_per_cycle, num_cycles)`` without ``total_steps`` keeps its exact cycle
    layout (no fine-tuning unless ``final_finetune_fraction`` is given; it then adds steps).

    RESU cycle c prunes to ``sparsity_at(c)``: ``constant`` (= ``sparsity``), or ``linear`` /
    ``cubic`` (GMP) / ``cosine`` from ``initial_sparsity`` at step 0 to ``sparsity`` at the last
    cycle's prune, evaluated at each cycle's prune step, as GMP evaluates its cubic at each of its
    prunes, or an explicit list (one value per cycle).
    A schedule that decreases densifies. The default is ``cubic`` (``constant`` in the cycle
    form): pruning straight to the target in cycle 0 removes the most weights while the dense
    model has not yet adapted to any sparsity, and the cubic, like GMP, takes large steps early,
    while many redundant weights are left, and small ones near the target, where every weight
    counts. ``commit_admit``: how the amnesty commit fills its r(c)·n_keep slots: ``quota``
    (reserved for the best θ) or ``beats_weakest`` (a cap: θ enter only where they outscore the
    active weight they displace; ``rt.method.amnesty.amnesty_mask``). ``optimizer_state``: what
    RESU's phase changes (prune, RESU entry, commit) do with the optimizer state: ``reset`` starts
    the new trainable set afresh (zero moments, step 0) at each; ``carry`` keeps the state of every
    coordinate that stays trainable, as the baselines' mask changes do (joiners start at zero
    moments under the kept step count); ``carry_at_commit`` resets at the prune and the RESU entry
    and at the commit keeps θ's state for the resurrected coordinates (the old active weights,
    frozen during RESU, join with zero moments). The default is ``carry``, for every method and
    mode. ``pause_at`` cycle indices call ``on_pause(scheduler, cycle)`` at those cycles' ends.

    Example::

        config = rt.ScheduleConfig(method="gmp", total_steps=10_000, sparsity=0.9, final_finetune_fraction=0.1)
        config = rt.ScheduleConfig(total_steps=10_000, num_cycles=4, sparsity=0.9)  # RESU, same budget
    """

    steps_per_cycle: Optional[int] = None
    num_cycles: Optional[int] = None
    sparsity: float = 0.5
    sparsity_schedule: Union[str, Sequence[float], None] = None
    initial_sparsity: float = 0.0
    stabilize_fraction: float = 0.1
    resu_fraction: Optional[float] = None
    prune_method: str = "magnitude"
    granularity: str = "element"
    scope: str = "layer"
    commit_strategy: str = "amnesty"
    commit_score: str = "magnitude"
    commit_admit: str = "quota"
    optimizer_state: str = "carry"
    r_start: float = 0.10
    r_end: float = 0.02
    epsilon: float = 0.1
    freeze_active: bool = True
    quantize_bits: Optional[int] = None
    group_size: Optional[int] = 128
    selective: object = None
    seed: int = 0
    pause_at: Sequence[int] = field(default_factory=tuple)
    on_pause: Optional[Callable] = None
    progress: bool = True
    method: str = "resu"
    total_steps: Optional[int] = None
    final_finetune_fraction: Optional[float] = None
    update_every: int = 100
    drop_fraction: float = 0.3
    prune_start_fraction: float = 0.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; accepted: {', '.join(METHODS)}")
        for name in ("total_steps", "update_every"):
            _check_positive_int(name, getattr(self, name), optional=name == "total_steps")
        fraction = self.final_finetune_fraction
        if fraction is not None and (isinstance(fraction, bool) or not 0 <= fraction < 1):
            raise ValueError(f"final_finetune_fraction must be in [0, 1), got {fraction!r}")
        if not 0 <= self.prune_start_fraction < 1:
            raise ValueError(f"prune_start_fraction must be in [0, 1), got {self.prune_start_fraction!r}")
        if not 0 <= self.drop_fraction <= 1:
            raise ValueError(f"drop_fraction must be in [0, 1], got {self.drop_fraction!r}")
        for name, accepted in (("commit_admit", COMMIT_ADMIT_RULES), ("optimizer_state", OPTIMIZER_STATES)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; accepted: {', '.join(accepted)}")
        if self.method == "resu":
            self._check_freeze_active()
            self._resolve_cycles()
        else:
            self._resolve_baseline()
        if self.sparsity_schedule is None:
            self.sparsity_schedule = "cubic" if self._budgeted else "constant"
        if isinstance(self.sparsity_schedule, str):
            if self.sparsity_schedule not in SPARSITY_SCHEDULES:
                raise ValueError(f"unknown sparsity_schedule {self.sparsity_schedule!r}; accepted: "
                                 f"{', '.join(SPARSITY_SCHEDULES)} or a list of per-cycle sparsities")
        elif self.method == "resu" and len(self.sparsity_schedule) != self.num_cycles:
            raise ValueError(f"a sparsity list needs one value per cycle ({self.num_cycles}), got {len(self.sparsity_schedule)}")
        sparsities = self.cycle_sparsities() if self.method == "resu" else []
        for s in [self.sparsity, self.initial_sparsity, *sparsities]:
            if not 0 <= s < 1:
                raise ValueError(f"sparsities must be in [0, 1), got {s!r}")
        if self.pause_at and self.on_pause is None:
            raise ValueError("pause_at needs an on_pause(scheduler, cycle) callback")

    def _check_freeze_active(self) -> None:
        if not isinstance(self.freeze_active, bool):
            raise TypeError(f"freeze_active must be a bool, got {self.freeze_active!r}")
        if not self.freeze_active and self.quantize_bits is not None:
            raise ValueError("QRESU stores the active weights frozen: quantize_bits needs freeze_active=True "
                             "(the default)")

    def _cycles_budget(self) -> int:
        """The steps RESU's cycles share over a ``total_steps`` budget: what the final fine-tuning
        (the default fraction where none is given) leaves."""
        fraction = DEFAULT_FINETUNE_FRACTION if self.final_finetune_fraction is None else self.final_finetune_fraction
        return self.total_steps - round(fraction * self.total_steps)

    def _resolve_cycles(self) -> None:
        """RESU: fill in whichever of total_steps / steps_per_cycle was left out."""
        if self.num_cycles is None:
            default = DEFAULT_NUM_CYCLES if self.freeze_active else DEFAULT_NUM_CYCLES_TRAINING_ACTIVE
            if self.total_steps is None:
                raise ValueError(f"method='resu' needs total_steps (num_cycles defaults to {default}) or "
                                 "steps_per_cycle with num_cycles")
            if self.steps_per_cycle is None:
                default = max(1, min(default, self._cycles_budget() // MIN_STEPS_PER_DEFAULT_CYCLE))
            self.num_cycles = default
        _check_positive_int("num_cycles", self.num_cycles)
        self._budgeted = self.steps_per_cycle is None or self.final_finetune_fraction is None and \
            self.total_steps is not None
        if self.steps_per_cycle is None:
            if self.total_steps is None:
                raise ValueError("method='resu' needs total_steps or steps_per_cycle (with num_cycles)")
            if self.final_finetune_fraction is None:
                self.final_finetune_fraction = DEFAULT_FINETUNE_FRACTION
            self.steps_per_cycle = self._cycles_budget() // self.num_cycles
            if self.steps_per_cycle < 1:
                raise ValueError(f"total_steps={self.total_steps} leaves no step per cycle for {self.num_cycles} "
                                 f"cycles after the final fine-tuning")
        _check_positive_int("steps_per_cycle", self.steps_per_cycle)
        cycles_steps = self.steps_per_cycle * self.num_cycles
        if self.total_steps is None:
            if self.final_finetune_fraction is None:
                self.final_finetune_fraction = 0.0  # the cycle form keeps its exact layout
            f = self.final_finetune_fraction
            self.total_steps = cycles_steps + round(f / (1 - f) * cycles_steps)
        elif self.total_steps < cycles_steps:
            raise ValueError(f"total_steps={self.total_steps} is shorter than num_cycles·steps_per_cycle="
                             f"{cycles_steps}")
        if self.final_finetune_fraction is None:
            self.final_finetune_fraction = (self.total_steps - cycles_steps) / self.total_steps
        if not 0 <= self.stabilize_fraction < 1:
            raise ValueError(f"stabilize_fraction must be in [0, 1), got {self.stabilize_fraction!r}")
        if self.resu_fraction is None:  # the default, and at least one RESU step in a short cycle
            default = DEFAULT_RESU_FRACTION if self.freeze_active else DEFAULT_RESU_FRACTION_TRAINING_ACTIVE
            self.resu_fraction = max(default, 1 / self.steps_per_cycle)
        if not 0 < self.resu_fraction < 1 or self.resu_steps < 1:
            raise ValueError(f"resu_fraction must be in (0, 1) and give at least one RESU step, got {self.resu_fraction!r}")
        if self.stabilize_fraction + self.resu_fraction >= 1:
            raise ValueError("stabilize_fraction + resu_fraction must leave room for TRAIN (sum < 1)")

    def _resolve_baseline(self) -> None:
        if self.total_steps is None:
            raise ValueError(f"method={self.method!r} needs total_steps (the whole run's optimizer steps)")
        if self.steps_per_cycle is not None or self.num_cycles is not None:
            raise ValueError(f"steps_per_cycle/num_cycles lay out RESU cycles; method={self.method!r} takes "
                             f"total_steps, update_every and final_finetune_fraction")
        self._budgeted = True
        if self.final_finetune_fraction is None:
            self.final_finetune_fraction = DEFAULT_FINETUNE_FRACTION
        if self.mask_steps <= self.prune_start_step:
            raise ValueError(f"prune_start_fraction={self.prune_start_fraction} leaves no step before the final "
                             f"fine-tuning ({self.finetune_steps} of {self.total_steps} steps)")

    @property
    def finetune_steps(self) -> int:
        """Steps trained at the final mask after the last mask change."""
        if self.method == "resu":
            return self.total_steps - self.steps_per_cycle * self.num_cycles
        return round(self.final_finetune_fraction * self.total_steps)

    @property
    def mask_steps(self) -> int:
        """The step at which the final fine-tuning starts: masks change only before it (RESU: the
        last commit happens at it)."""
        return self.total_steps - self.finetune_steps

    @property
    def prune_start_step(self) -> int:
        """one_shot: the end of the dense warm-up; gmp: the start of the pruning window."""
        return round(self.prune_start_fraction * self.total_steps)

    @property
    def stabilize_steps(self) -> int:
        return round(self.stabilize_fraction * self.steps_per_cycle)

    @property
    def resu_steps(self) -> int:
        return round(self.resu_fraction * self.steps_per_cycle)

    @property
    def train_steps(self) -> int:
        return self.steps_per_cycle - self.stabilize_steps - self.resu_steps

    def sparsity_at(self, cycle: int) -> float:
        """The sparsity RESU cycle ``cycle`` prunes to: the schedule at that cycle's prune step,
        over the window from step 0 to the last cycle's prune (which reaches ``sparsity``)."""
        if not isinstance(self.sparsity_schedule, str):
            return float(self.sparsity_schedule[cycle])
        if self.sparsity_schedule == "constant":
            return float(self.sparsity)
        prune_step = cycle * self.steps_per_cycle + self.train_steps
        last_prune = (self.num_cycles - 1) * self.steps_per_cycle + self.train_steps
        start, end = self.initial_sparsity, self.sparsity
        if self.sparsity_schedule == "cubic":  # Zhu & Gupta's gradual magnitude pruning
            return gmp_sparsity(prune_step, 0, last_prune, start, end)
        t = prune_step / last_prune if last_prune else 1.0
        if self.sparsity_schedule == "linear":
            return start + (end - start) * t
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))

    def cycle_sparsities(self) -> list[float]:
        return [self.sparsity_at(c) for c in range(self.num_cycles)]


def _check_positive_int(name: str, value, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")

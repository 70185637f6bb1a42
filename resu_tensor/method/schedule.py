"""ScheduleConfig: the cycle layout and per-cycle sparsity of a ResuScheduler run."""
import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

SPARSITY_SCHEDULES = ("constant", "linear", "cubic", "cosine")


@dataclass
class ScheduleConfig:
    """How a :class:`~resu_tensor.training.scheduler.ResuScheduler` moves layers through RESU cycles.

    Each cycle of ``steps_per_cycle`` optimizer steps is TRAIN → PRUNE → STABILIZE → RESU →
    COMMIT; the fractions give the TRAIN, STABILIZE and RESU budgets (TRAIN takes what is left).
    Cycle c prunes to ``sparsity_at(c)``: ``constant`` (= ``sparsity``), or ``linear`` /
    ``cubic`` (GMP) / ``cosine`` from ``initial_sparsity`` to ``sparsity``, or an explicit list
    (one value per cycle). A schedule that decreases densifies. ``pause_at`` cycle indices call
    ``on_pause(scheduler, cycle)`` at those cycles' ends.

    Example::

        config = rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4, sparsity=0.7, sparsity_schedule="cubic")
    """

    steps_per_cycle: int
    num_cycles: int
    sparsity: float = 0.5
    sparsity_schedule: Union[str, Sequence[float]] = "constant"
    initial_sparsity: float = 0.0
    stabilize_fraction: float = 0.1
    resu_fraction: float = 0.4
    prune_method: str = "magnitude"
    granularity: str = "element"
    scope: str = "layer"
    commit_strategy: str = "amnesty"
    commit_score: str = "magnitude"
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

    def __post_init__(self):
        for name in ("steps_per_cycle", "num_cycles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not 0 <= self.stabilize_fraction < 1:
            raise ValueError(f"stabilize_fraction must be in [0, 1), got {self.stabilize_fraction!r}")
        if not 0 < self.resu_fraction < 1 or self.resu_steps < 1:
            raise ValueError(f"resu_fraction must be in (0, 1) and give at least one RESU step, got {self.resu_fraction!r}")
        if self.stabilize_fraction + self.resu_fraction >= 1:
            raise ValueError("stabilize_fraction + resu_fraction must leave room for TRAIN (sum < 1)")
        if isinstance(self.sparsity_schedule, str):
            if self.sparsity_schedule not in SPARSITY_SCHEDULES:
                raise ValueError(f"unknown sparsity_schedule {self.sparsity_schedule!r}; accepted: "
                                 f"{', '.join(SPARSITY_SCHEDULES)} or a list of per-cycle sparsities")
        elif len(self.sparsity_schedule) != self.num_cycles:
            raise ValueError(f"a sparsity list needs one value per cycle ({self.num_cycles}), got {len(self.sparsity_schedule)}")
        for s in [self.sparsity, self.initial_sparsity, *self.cycle_sparsities()]:
            if not 0 <= s < 1:
                raise ValueError(f"sparsities must be in [0, 1), got {s!r}")
        if self.pause_at and self.on_pause is None:
            raise ValueError("pause_at needs an on_pause(scheduler, cycle) callback")

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
        if not isinstance(self.sparsity_schedule, str):
            return float(self.sparsity_schedule[cycle])
        if self.sparsity_schedule == "constant":
            return float(self.sparsity)
        t = 1.0 if self.num_cycles == 1 else cycle / (self.num_cycles - 1)
        start, end = self.initial_sparsity, self.sparsity
        if self.sparsity_schedule == "linear":
            return start + (end - start) * t
        if self.sparsity_schedule == "cubic":  # Zhu & Gupta's gradual magnitude pruning
            return end + (start - end) * (1 - t) ** 3
        return end + (start - end) * 0.5 * (1 + math.cos(math.pi * t))

    def cycle_sparsities(self) -> list[float]:
        return [self.sparsity_at(c) for c in range(self.num_cycles)]

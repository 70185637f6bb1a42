"""Schedule configs for the quality benchmarks, with the ablation of where RESU's sparsity
schedule is evaluated."""
import resu_tensor as rt
from resu_tensor.method.regrowth import gmp_sparsity


def schedule_config(schedule_at_cycle_end: bool = False, **options) -> rt.ScheduleConfig:
    """``rt.ScheduleConfig(**options)``. With ``schedule_at_cycle_end`` RESU's cubic is evaluated
    at the end of each cycle, (c + 1)/num_cycles of the way from ``initial_sparsity`` to
    ``sparsity``, instead of at each cycle's prune step as the library does: each cycle prunes
    to the sparsity its end reaches, about half a cycle ahead of the library's schedule."""
    config = rt.ScheduleConfig(**options)
    if not schedule_at_cycle_end:
        return config
    if config.method != "resu" or config.sparsity_schedule != "cubic":
        raise ValueError(f"schedule_at_cycle_end needs RESU's cubic schedule, got method={config.method!r}, "
                         f"sparsity_schedule={config.sparsity_schedule!r}")
    start, end, n = config.initial_sparsity, config.sparsity, config.num_cycles
    return rt.ScheduleConfig(**{**options, "num_cycles": n,
                                "sparsity_schedule": [gmp_sparsity(c + 1, 0, n, start, end) for c in range(n)]})

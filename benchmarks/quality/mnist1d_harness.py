"""The MNIST-1D comparison harness: data, models, one training loop shared by every method, the
baselines (dense, one-shot + fine-tune, GMP, RigL, SET; all but dense as ``rt.ScheduleConfig`` methods) and the RESU variants (RESU with amnesty,
RESU-Selective, QRESU-4, and two ablations), run over a grid of (arch, method, sparsity, seed).

Used by ``python -m benchmarks.quality.mnist1d`` (the full grid of docs/results.md, JSON and plot)
and by ``python examples/mnist1d_demo.py`` (a reduced grid of the same runs, so its numbers match).
MNIST-1D is generated locally by the ``mnist1d`` package (no download).
"""
import functools
import math
import os
import statistics
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.method.schedule import DEFAULT_FINETUNE_FRACTION
from benchmarks.quality.schedules import schedule_config

# Shared by every method: AdamW(lr=1e-2), one cosine over the run, batch 128, 2000 steps (picked for
# the dense models on a held-out 500 of the training set; see docs/results.md).
LR, BATCH_SIZE, STEPS = 1e-2, 128, 2000
METHODS = ("dense", "oneshot", "gmp", "rigl", "set", "resu", "resu_selective", "qresu4")
# RESU variants, each one change to ``resu_dev`` (extra ScheduleConfig fields; ``cycles`` is the
# harness's cycle count): what ``python -m benchmarks.quality.mnist1d --ablation NAME`` compares.
# ``resu_dev`` is RESU as it was before this ablation chose the defaults: 3 cycles, the
# baselines' final fine-tuning (0.25), active weights frozen in the RESU phase; every variant
# pins it, so its runs stay reproducible.
# optimizer_state="reset" and resu_fraction=0.4: what every variant below ran with before the
# library's defaults kept the state across phase changes and shortened the frozen RESU phase (a
# variant that says otherwise overrides them)
DEV_BASE = dict(cycles=3, final_finetune_fraction=0.25, freeze_active=True, optimizer_state="reset", resu_fraction=0.4)
FROZEN_CARRY = dict(cycles=5, final_finetune_fraction=0.4, optimizer_state="carry")
ABLATION_OPTIONS = {
    "resu_dev": {},
    # commit: a plain magnitude re-prune (θ compete with W_A on |W|); amnesty's reservation r = 0
    # (no θ ever comes back: the schedule's pauses without resurrection)
    "resu_magnitude": dict(commit_strategy="magnitude"),
    "resu_no_resurrection": dict(r_start=0.0, r_end=0.0),
    # the sparsity schedule across cycles: the target from cycle 0 on, instead of the cubic
    "resu_constant": dict(sparsity_schedule="constant"),
    # the final fine-tuning after the last commit (the baselines take the library default, 0.4)
    "resu_finetune_0.1": dict(final_finetune_fraction=0.1),
    "resu_finetune_0.4": dict(final_finetune_fraction=0.4),
    "resu_finetune_0.5": dict(final_finetune_fraction=0.5),
    # optimizer state at commit: θ's AdamW state carried into the resurrected coordinates
    "resu_carry_state": dict(optimizer_state="carry_at_commit"),
    # amnesty: r(c) as a cap on the θ admitted, each one only where it beats the weight it displaces
    "resu_beats_weakest": dict(commit_admit="beats_weakest"),
    # the active weights train alongside θ in the RESU phase
    "resu_train_active": dict(freeze_active=False),
    # θ's initial scale
    "resu_epsilon_0.01": dict(epsilon=0.01),
    "resu_epsilon_1": dict(epsilon=1.0),
    # cycles and the RESU phase's share of each cycle
    "resu_cycles_2": dict(cycles=2),
    "resu_cycles_5": dict(cycles=5),
    "resu_fraction_0.2": dict(resu_fraction=0.2),
    "resu_fraction_0.6": dict(resu_fraction=0.6),
    # combinations of the settings above that won alone
    "resu_constant_finetune_0.4": dict(sparsity_schedule="constant", final_finetune_fraction=0.4),
    "resu_cycles_5_finetune_0.4": dict(cycles=5, final_finetune_fraction=0.4),
    "resu_constant_cycles_5_finetune_0.4": dict(sparsity_schedule="constant", cycles=5, final_finetune_fraction=0.4),
    # one change each to the adopted defaults (5 cycles, 40% fine-tuning: resu_cycles_5_finetune_0.4)
    "resu_cycles_5_finetune_0.4_train_active": dict(cycles=5, final_finetune_fraction=0.4, freeze_active=False),
    "resu_cycles_5_finetune_0.4_fraction_0.2": dict(cycles=5, final_finetune_fraction=0.4, resu_fraction=0.2),
    "resu_cycles_5_finetune_0.4_epsilon_0.01": dict(cycles=5, final_finetune_fraction=0.4, epsilon=0.01),
    "resu_cycles_8_finetune_0.4": dict(cycles=8, final_finetune_fraction=0.4),
    "resu_cycles_5_finetune_0.4_beats_weakest": dict(cycles=5, final_finetune_fraction=0.4,
                                                     commit_admit="beats_weakest"),
    # the pair that did best in the MiniLM recovery
    "resu_cycles_5_finetune_0.4_train_active_beats_weakest": dict(cycles=5, final_finetune_fraction=0.4,
                                                                  freeze_active=False, commit_admit="beats_weakest"),
    # ... and with twice the cycles: a prune, RESU phase and capped commit every 120 steps
    "resu_cycles_10_finetune_0.4": dict(cycles=10, final_finetune_fraction=0.4),
    "resu_cycles_10_finetune_0.4_train_active": dict(cycles=10, final_finetune_fraction=0.4, freeze_active=False),
    "resu_cycles_20_finetune_0.4_train_active": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False),
    "resu_cycles_10_finetune_0.4_train_active_beats_weakest": dict(cycles=10, final_finetune_fraction=0.4,
                                                                   freeze_active=False, commit_admit="beats_weakest"),
    # one change each to the 20-cycle recipe with the active weights training (40% fine-tuning):
    # no θ admitted at commit, a plain magnitude commit, θ's initial scale, and the last two together
    "resu_defaults_no_resurrection": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False,
                                          r_start=0.0, r_end=0.0),
    "resu_defaults_magnitude": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False,
                                    commit_strategy="magnitude"),
    "resu_defaults_epsilon_0.01": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False, epsilon=0.01),
    "resu_defaults_magnitude_epsilon_0.01": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False,
                                                 commit_strategy="magnitude", epsilon=0.01),
    # ... and the cubic evaluated at each cycle's end (each prune half a cycle ahead of the defaults')
    "resu_defaults_schedule_at_cycle_end": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False,
                                                schedule_at_cycle_end=True),
    # ... and fewer cycles (fewer RESU phases, each longer)
    "resu_defaults_cycles_2": dict(cycles=2, final_finetune_fraction=0.4, freeze_active=False),
    "resu_defaults_cycles_3": dict(cycles=3, final_finetune_fraction=0.4, freeze_active=False),
    "resu_defaults_cycles_5": dict(cycles=5, final_finetune_fraction=0.4, freeze_active=False),
    # ... with the optimizer state started afresh at every phase change (the defaults until the
    # state of the coordinates that stay trainable was kept)
    "resu_defaults_reset_state": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False),
    # today's defaults (frozen active weights, 5 cycles, the state kept) with the capped amnesty
    "resu_beats_weakest_carry_state": dict(cycles=5, final_finetune_fraction=0.4, commit_admit="beats_weakest",
                                           optimizer_state="carry"),
    # ... and with the state kept: the library's defaults before the active weights were frozen again
    "resu_train_active_carry_state": dict(cycles=20, final_finetune_fraction=0.4, freeze_active=False,
                                          optimizer_state="carry"),
    # the frozen recipe (5 cycles, 40% fine-tuning, the state kept, a RESU phase of 40%: the
    # defaults before the phase was shortened), then with one change each: a shorter RESU phase
    # (today's default), no stabilisation, more cycles, θ's initial scale
    "resu_frozen_carry_state": FROZEN_CARRY,
    **{f"resu_frozen_carry_{suffix}": {**FROZEN_CARRY, **change}
       for suffix, change in [("fraction_0.2", dict(resu_fraction=0.2)), ("stabilize_0", dict(stabilize_fraction=0.0)),
                              ("epsilon_0.01", dict(epsilon=0.01)),
                              ("fraction_0.2_stabilize_0", dict(resu_fraction=0.2, stabilize_fraction=0.0)),
                              ("fraction_0.2_epsilon_0.01", dict(resu_fraction=0.2, epsilon=0.01)),
                              ("fraction_0.2_beats_weakest", dict(resu_fraction=0.2, commit_admit="beats_weakest")),
                              ("cycles_10", dict(cycles=10))]},
    # RESU-Selective's selection: more θ updated per step, a looser consistency threshold
    "resu_selective_select_0.5": dict(selective=rt.SelectiveConfig(select=0.5)),
    "resu_selective_tau_0.25": dict(selective=rt.SelectiveConfig(tau=0.25)),
}
# Baseline variants, to check that a RESU setting that wins is not one the baseline gains from as much.
BASELINE_VARIANTS = {"gmp_finetune_0.4": ("gmp", dict(final_finetune_fraction=0.4))}
ABLATIONS = tuple(ABLATION_OPTIONS) + tuple(BASELINE_VARIANTS)
ABLATION_BASE = {**{name: "resu_dev" for name in ABLATION_OPTIONS}, **{n: m for n, (m, _) in BASELINE_VARIANTS.items()}}
LABELS = {"dense": "dense", "oneshot": "one-shot + FT", "gmp": "GMP (cubic)", "rigl": "RigL", "set": "SET",
          "resu": "RESU (amnesty)", "resu_selective": "RESU-Selective", "qresu4": "QRESU-4",
          "resu_magnitude": "RESU (magn. commit)", "resu_no_resurrection": "RESU (r = 0)",
          "resu_dev": "RESU (3 cycles, FT 0.25)",
          **{name: "RESU " + ", ".join(f"{k}={v}" for k, v in opts.items() if k != "selective") +
             (f"selective {opts['selective'].select}/{opts['selective'].tau}" if "selective" in opts else "")
             for name, opts in ABLATION_OPTIONS.items()
             if name not in ("resu_magnitude", "resu_no_resurrection", "resu_dev")},
          "gmp_finetune_0.4": "GMP final_finetune_fraction=0.4",
          # the same settings as resu_cycles_N_finetune_0.4_train_active, run under today's sparsity schedule rule
          **{f"resu_defaults_cycles_{n}": f"RESU, active weights train, cycles={n}" for n in (2, 3, 5)},
          "resu_defaults_reset_state": "RESU, active weights train, 20 cycles, optimizer_state=reset",
          "resu_train_active_carry_state": "RESU, active weights train, 20 cycles, optimizer_state=carry",
          "resu_beats_weakest_carry_state": "RESU defaults, commit_admit=beats_weakest"}
FULL = {"archs": ["mlp", "cnn"], "sparsities": [0.5, 0.7, 0.9], "seeds": [0, 1, 2]}


def available_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ============================================================================ data and models
@functools.lru_cache(maxsize=1)
def load_mnist1d() -> tuple[torch.Tensor, ...]:
    """(x, y, x_test, y_test): the standard 4000/1000 split, inputs standardised with the training
    set's statistics. Cached: generating it takes about a second and it is the same every time
    (mnist1d seeds its own generator)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, x_test = (torch.tensor(data[k], dtype=torch.float32) for k in ("x", "x_test"))
    y, y_test = (torch.tensor(data[k], dtype=torch.long) for k in ("y", "y_test"))
    mean, std = x.mean(), x.std()
    return (x - mean) / std, y, (x_test - mean) / std, y_test


class Conv1dAsLinear(nn.Module):
    """A 1-D convolution computed as im2col + nn.Linear, so its (out, in·k) weight can be a
    ResuTensor: the library handles 2-D Linear weights, not Conv1d's 3-D ones."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.linear = nn.Linear(in_channels * kernel_size, out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, channels, length)
        patches = F.pad(x, (self.padding, self.padding)).unfold(2, self.kernel_size, self.stride)
        return self.linear(patches.transpose(1, 2).flatten(2)).transpose(1, 2)


def make_model(arch: str) -> nn.Module:
    """``mlp``: 40-256-256-10. ``cnn``: mnist1d's small CNN (3 strided convs, 32 channels, then a
    Linear). Every nn.Linear weight becomes a DENSE ResuTensor; the CNN's first conv (160 weights,
    one input channel) stays a plain dense Conv1d, as first layers usually do in sparse training."""
    if arch == "mlp":
        model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    elif arch == "cnn":
        model = nn.Sequential(nn.Unflatten(1, (1, 40)), nn.Conv1d(1, 32, 5, stride=2, padding=1), nn.ReLU(),
                              Conv1dAsLinear(32, 32, 3, stride=2, padding=1), nn.ReLU(),
                              Conv1dAsLinear(32, 32, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(32 * 5, 10))
    else:
        raise ValueError(f"unknown arch {arch!r}; accepted: mlp, cnn")
    quantize_(model, rt.resu_config(sparsity=0.0))
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    return (model(data[2]).argmax(dim=1) == data[3]).float().mean().item()


# ============================================================================ the training loop
class Trainer:
    """One run: model, a stock AdamW and a seeded minibatch stream. The learning rate follows one
    cosine over the whole run whatever the method does, so methods differ only in their masks.
    Records the peak training-state bytes once every weight is sparse (RESU's θ phase shows up
    there; the dense start that most methods share does not)."""

    def __init__(self, model: nn.Module, data, total_steps: int, seed: int, lr: float = LR,
                 batch_size: int = BATCH_SIZE):
        self.model, self.data, self.total_steps, self.lr, self.batch_size = model, data, total_steps, lr, batch_size
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        self.batches = torch.Generator().manual_seed(seed)
        self.step = 0
        self.sparse_peak_bytes = 0
        self._tracked_modes = ()
        self.last_batch = None  # the current step's batch (RigL's dense gradient is taken on it)

    def train_until(self, step: int, before: Optional[Callable] = None, after: Optional[Callable] = None) -> None:
        """Optimizer steps up to global step ``step``; ``before(x, y)`` runs ahead of each step's
        forward, ``after(loss)`` after its optimizer.step()."""
        x, y = self.data[0], self.data[1]
        while self.step < min(step, self.total_steps):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * 0.5 * (1 + math.cos(math.pi * self.step / self.total_steps))
            idx = torch.randint(0, len(x), (self.batch_size,), generator=self.batches)
            self.last_batch = (x[idx], y[idx])
            if before is not None:
                before(x[idx], y[idx])
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            # every 10 steps, and after the first step of every new mode (a RESU phase can be shorter)
            modes = tuple(w.mode for _, _, w in rt.resu_weights(self.model))
            if self.step % 10 == 0 or self.step == self.total_steps or modes != self._tracked_modes:
                self._tracked_modes = modes
                self._track_bytes()
            if after is not None:
                after(loss)

    def change(self, mode_change: Callable[[], object]) -> None:
        """A mask or mode change; AdamW state of the old trainable set must not carry over."""
        mode_change()
        rt.reset_optimizer_state_(self.optimizer, self.model)

    def state_bytes(self) -> int:
        return rt.memory_report(self.model, self.optimizer).total.total

    def _track_bytes(self) -> None:
        if all(w.mode != rt.Mode.DENSE for _, _, w in rt.resu_weights(self.model)):
            self.sparse_peak_bytes = max(self.sparse_peak_bytes, self.state_bytes())


# ============================================================================ the methods
# Each takes (trainer, sparsity, seed), trains to trainer.total_steps and returns extra results.
def dense(tr: Trainer, sparsity: float, seed: int) -> dict:
    tr.train_until(tr.total_steps)
    return {}


# Every sparse method runs through rt.ResuScheduler on the same ResuTensor weights and compact AdamW
# state, with one step budget: the methods differ in ``method`` alone, plus each one's own knobs
# below, and all end with the library's default final fine-tuning (0.4 of the run).
FINETUNE_FRACTION = DEFAULT_FINETUNE_FRACTION


def scheduled(tr: Trainer, sparsity: float, seed: int, method: str, **options) -> rt.ResuScheduler:
    """Train the whole run under ``rt.ScheduleConfig(method=method, ...)``; returns the scheduler."""
    config = schedule_config(method=method, total_steps=tr.total_steps, sparsity=sparsity, seed=seed,
                             progress=False, **options)
    probe = (lambda m: F.cross_entropy(m(tr.last_batch[0]), tr.last_batch[1])) if method == "rigl" else None
    scheduler = rt.ResuScheduler(tr.model, tr.optimizer, config, probe_fn=probe)
    tr.train_until(tr.total_steps, after=scheduler.step)
    return scheduler


def one_shot(tr: Trainer, sparsity: float, seed: int) -> dict:
    """Dense for half the run, magnitude-prune once, sparse fine-tune for the other half."""
    scheduled(tr, sparsity, seed, "one_shot", prune_start_fraction=0.5)
    return {}


def gmp(tr: Trainer, sparsity: float, seed: int, start: float = 0.2, events: int = 10,
        final_finetune_fraction: float = FINETUNE_FRACTION) -> dict:
    """Gradual magnitude pruning (Zhu & Gupta 2017): ``events`` magnitude prunes along the cubic
    from 0 to ``sparsity`` over [start, 1 − final_finetune_fraction] of the run, then sparse fine-tuning."""
    window = (1 - final_finetune_fraction - start) * tr.total_steps
    scheduled(tr, sparsity, seed, "gmp", prune_start_fraction=start, update_every=max(1, round(window / events)),
              final_finetune_fraction=final_finetune_fraction)
    return {}


def rigl(tr: Trainer, sparsity: float, seed: int, updates: int = 20, alpha: float = 0.3) -> dict:
    """RigL (Evci et al. 2020): sparse from the start (random mask); every 1/``updates`` of the run
    (100 steps of 2000) until the final fine-tuning, drop the smallest-magnitude active weights and
    grow as many pruned ones with the largest dense gradient on the current batch, at zero. The
    swapped fraction decays by a cosine from ``alpha``."""
    scheduler = scheduled(tr, sparsity, seed, "rigl", prune_method="random", drop_fraction=alpha,
                          update_every=max(1, round(tr.total_steps / updates)))
    return {"rigl_swapped": [e["swapped"] for e in scheduler.phase_changes if e["event"] == "regrow"]}


def set_(tr: Trainer, sparsity: float, seed: int, updates: int = 20, zeta: float = 0.3) -> dict:
    """SET (Mocanu et al. 2018): as RigL with a constant drop fraction ``zeta`` and random regrowth."""
    scheduler = scheduled(tr, sparsity, seed, "set", prune_method="random", drop_fraction=zeta,
                          update_every=max(1, round(tr.total_steps / updates)))
    return {"set_swapped": [e["swapped"] for e in scheduler.phase_changes if e["event"] == "regrow"]}


def resu(tr: Trainer, sparsity: float, seed: int, cycles: Optional[int] = None, commit_strategy: str = "amnesty",
         **variant) -> dict:
    """RESU through rt.ResuScheduler with the library's defaults: ``cycles`` cycles over the run less
    its final fine-tuning (None: the library's default; cycle 0's TRAIN is dense and ends in a magnitude prune; each cycle prunes
    along the default cubic schedule). ``variant``: extra ScheduleConfig fields (selective,
    quantize_bits). Reports the share of the final active weights that were once pruned and came
    back through a commit."""
    variant.setdefault("final_finetune_fraction", None)  # None: the library's default for RESU
    if cycles is not None:
        variant["num_cycles"] = cycles
    scheduler = scheduled(tr, sparsity, seed, "resu", commit_strategy=commit_strategy, **variant)
    n_active = sum(w.n_active for _, _, w in rt.resu_weights(tr.model))
    last = scheduler.history[-1]
    return {"resurrected": (last.survivors + last.resurrected) / n_active,
            "resurrected_per_commit": [h.resurrected for h in scheduler.history],
            "cycle_losses": [h.loss for h in scheduler.history]}


METHOD_FNS = {
    "dense": dense, "oneshot": one_shot, "gmp": gmp, "rigl": rigl, "set": set_, "resu": resu,
    "resu_selective": functools.partial(resu, selective=rt.SelectiveConfig()),
    "qresu4": functools.partial(resu, quantize_bits=4),
    **{name: functools.partial(resu, **{**DEV_BASE, **options}) for name, options in ABLATION_OPTIONS.items()},
}
METHOD_FNS.update({name: functools.partial(METHOD_FNS[method], **options)
                   for name, (method, options) in BASELINE_VARIANTS.items()})


# ============================================================================ running a grid
def run_one(spec: dict) -> dict:
    """One (arch, method, sparsity, seed) run from scratch; the same seed gives every method the
    same initial weights and minibatch order."""
    torch.set_num_threads(spec.get("threads", 1))
    data = load_mnist1d()
    start, cpu_start = time.perf_counter(), time.process_time()
    torch.manual_seed(spec["seed"])
    model = make_model(spec["arch"])
    tr = Trainer(model, data, spec["steps"], spec["seed"], spec.get("lr", LR), spec.get("batch_size", BATCH_SIZE))
    extra = METHOD_FNS[spec["method"]](tr, spec["sparsity"], spec["seed"])
    weights = [w for _, _, w in rt.resu_weights(model)]
    return {
        **spec, **extra,
        "accuracy": accuracy(model, data),
        "final_sparsity": sum(w.numel() - w.n_active for w in weights) / sum(w.numel() for w in weights),
        "final_bytes": tr.state_bytes(),
        "sparse_peak_bytes": tr.sparse_peak_bytes or tr.state_bytes(),
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu_start,  # unlike wall_s, not inflated by other load on the machine
    }


def make_specs(archs, methods, sparsities, seeds, steps: int, threads: int = 1) -> list[dict]:
    """Every run of the grid; dense runs once per (arch, seed), at sparsity 0."""
    specs = []
    for arch in archs:
        for method in methods:
            for sparsity in ([0.0] if method == "dense" else sparsities):
                specs += [dict(arch=arch, method=method, sparsity=sparsity, seed=seed, steps=steps, threads=threads)
                          for seed in seeds]
    return specs


def compare(specs: list[dict], jobs: int = 1, say: Callable = print) -> dict:
    """Run every spec (``jobs`` worker processes, one torch thread each); returns {"runs", "summary",
    "wall_s", "cpu_s"} (cpu_s: the runs' CPU seconds, summed)."""
    start = time.perf_counter()
    runs = []

    def done(result: dict) -> None:
        runs.append(result)
        say(f"[{len(runs):>3}/{len(specs)}] {result['arch']} {LABELS[result['method']]:<19} s={result['sparsity']:.2f} "
            f"seed {result['seed']}: acc {result['accuracy']:.3f} ({result['wall_s']:.1f} s)", flush=True)

    if jobs > 1:
        import multiprocessing

        # spawn, not fork: a forked child of a process that already ran torch ops can deadlock.
        with multiprocessing.get_context("spawn").Pool(jobs) as pool:
            # the slower CNN runs first, so the two workers finish together
            for result in pool.imap_unordered(run_one, sorted(specs, key=lambda s: s["arch"] != "cnn")):
                done(result)
    else:
        for spec in specs:
            done(run_one(spec))
    key = {(s["arch"], s["method"], s["sparsity"], s["seed"]): i for i, s in enumerate(specs)}
    runs.sort(key=lambda r: key[(r["arch"], r["method"], r["sparsity"], r["seed"])])
    return {"runs": runs, "summary": summarize(runs), "wall_s": time.perf_counter() - start,
            "cpu_s": sum(r["cpu_s"] for r in runs)}


def summarize(runs: list[dict]) -> list[dict]:
    """Mean and sample std over seeds of each (arch, method, sparsity), in run order."""
    groups: dict = {}
    for r in runs:
        groups.setdefault((r["arch"], r["method"], r["sparsity"]), []).append(r)

    def mean_std(values):
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0

    rows = []
    for (arch, method, sparsity), group in groups.items():
        acc_mean, acc_std = mean_std([r["accuracy"] for r in group])
        resurrected = [r["resurrected"] for r in group if "resurrected" in r]
        rows.append({"arch": arch, "method": method, "sparsity": sparsity, "seeds": len(group),
                     "accuracy_mean": acc_mean, "accuracy_std": acc_std,
                     "resurrected_mean": statistics.fmean(resurrected) if resurrected else None,
                     "sparse_peak_bytes": max(r["sparse_peak_bytes"] for r in group),
                     "final_bytes": max(r["final_bytes"] for r in group),
                     "wall_s_mean": statistics.fmean(r["wall_s"] for r in group),
                     "cpu_s_mean": statistics.fmean(r["cpu_s"] for r in group)})
    return rows


TABLE_COLUMNS = ("arch", "method", "sparsity", "test accuracy", "resurrected", "state bytes", "final bytes", "wall s",
                 "CPU s")


def format_table(summary: list[dict], markdown: bool = False) -> str:
    """The summary as aligned text (or a Markdown table). Rows by arch, then sparsity."""
    order = {m: i for i, m in enumerate(LABELS)}
    rows = []
    for r in sorted(summary, key=lambda r: (r["arch"], r["sparsity"], order[r["method"]])):
        resurrected = "" if r["resurrected_mean"] is None else f"{r['resurrected_mean']:.1%}"
        rows.append((r["arch"], LABELS[r["method"]], f"{r['sparsity']:.2f}",
                     f"{r['accuracy_mean']:.3f} ± {r['accuracy_std']:.3f}", resurrected,
                     f"{r['sparse_peak_bytes']:,}", f"{r['final_bytes']:,}", f"{r['wall_s_mean']:.1f}",
                     f"{r['cpu_s_mean']:.1f}"))
    if markdown:
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(row[i]) for row in [TABLE_COLUMNS, *rows]) for i in range(len(TABLE_COLUMNS))]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(TABLE_COLUMNS), "-" * len(line(TABLE_COLUMNS)), *map(line, rows)])


TABLE_NOTE = """\
test accuracy: mean ± sample std over seeds, on MNIST-1D's 1000 test samples. resurrected: share
of the final active weights that were pruned before a RESU phase and came back at a commit.
state bytes: peak training state (weights + mask + grads + AdamW state, biases included) once
every weight is sparse; for dense, the whole run. final bytes: the same at the end of training.
wall s / CPU s: per run, mean over seeds; wall time grows with other load on the machine, CPU time
does not."""

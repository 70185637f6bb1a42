"""CPU training step, side by side: dense, ResuTensor (SPARSE, RESU with frozen or training active
weights, QRESU-4), torch.nn.utils.prune and torch.ao.pruning, at sparsity 0.7, one
model/batch/AdamW per shape, in one process.

Rounds interleave the variants (each round runs every variant for ``steps`` timed steps after
its own warm-up), so machine load drifts over all of them alike; step time is the median over
every round. A second pass times forward, backward and optimizer step separately (medians).
Each step is timed twice: wall clock, and the process's CPU time (user + system, page faults
included), which on one thread is the step's own work without the time other jobs on a shared
machine held the core; both go into the JSON (``*_ms`` wall, ``*_cpu_ms`` CPU).
State memory is weight + grad + optimizer state (+ masks) bytes after a step: rt.memory_report
for ResuTensor models, the bytes of every parameter, gradient, buffer and optimizer-state tensor
for the others.

    python -m benchmarks.cpu [--quick] [--threads N] [--reference-kernels] [--out benchmarks/results/cpu.json]

The bitmap gathers and in-place updates run on the package's C loops where they were built
(``kernels.HAS_CPU_KERNELS``, recorded as ``cpu_kernels``); ``--reference-kernels`` runs their
plain-PyTorch references instead, to measure the difference.

``--threads`` (default: torch's own choice) sets torch.set_num_threads; on a machine whose cores
are shared with other jobs, one thread gives steadier figures, since every multi-threaded op
waits for its slowest thread (recorded in the JSON with the load average).
"""
import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import prune
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor import kernels

SPARSITY = 0.7
# name → (layer widths, batch)
SHAPES = {
    "mlp": ((1024, 4096, 1024), 64),
    "small": ((256, 1024, 256), 32),
    "wide": ((4096, 4096), 16),
}
# resu: a RESU phase with the active weights frozen (θ trains), as the scheduler's default recipe,
# QRESU and RESU-Selective run it; resu_train_active: the RESU phase with freeze_active=False, in
# which the active weights train alongside θ.
VARIANTS = ("dense", "sparse", "resu", "resu_train_active", "qresu4", "nn_prune", "ao_pruning")
RESUTENSOR_VARIANTS = ("sparse", "resu", "resu_train_active", "qresu4")
# QRESU rebuilds W_eff from 4-bit codes in plain PyTorch on the CPU (its fused kernels are CUDA
# only): seconds per step at the larger shapes, so it runs at the small shape only.
QRESU_SHAPES = ("small",)


def make_mlp(widths) -> nn.Sequential:
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths, widths[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]


def build(variant: str, widths) -> nn.Module:
    """The model of ``variant``, from the same seeded initial weights for every variant."""
    torch.manual_seed(0)
    model = make_mlp(widths)
    if variant in RESUTENSOR_VARIANTS:
        quantize_(model, rt.resu_config(sparsity=SPARSITY))
        for _, layer in linears(model):
            if variant == "resu":
                layer.weight.enter_resu()
            elif variant == "resu_train_active":
                layer.weight.enter_resu(freeze_active=False)
            elif variant == "qresu4":
                layer.weight.enter_resu(quantize_bits=4)
    elif variant == "nn_prune":
        for _, layer in linears(model):
            prune.l1_unstructured(layer, "weight", amount=SPARSITY)  # weight = weight_orig * mask, a pre-hook
    elif variant == "ao_pruning":
        # unstructured: blocks of one element, each zeroed by norm; the masks are fixed by one step()
        # and applied by a parametrization in every forward while training (squash_mask at the end)
        sparsifier = WeightNormSparsifier(sparsity_level=SPARSITY, sparse_block_shape=(1, 1), zeros_per_block=1)
        sparsifier.prepare(model, [{"tensor_fqn": f"{name}.weight"} for name, _ in linears(model)])
        sparsifier.step()
    elif variant != "dense":
        raise ValueError(f"unknown variant {variant!r}, expected one of {VARIANTS}")
    return model


class Run:
    """One variant's model, AdamW and batch, stepping and timing."""

    def __init__(self, variant: str, widths, batch: int):
        self.variant = variant
        self.model = build(variant, widths)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.01)
        generator = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, widths[0], generator=generator)
        self.y = torch.randn(batch, widths[-1], generator=generator)

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        F.mse_loss(self.model(self.x), self.y).backward()
        self.optimizer.step()

    def timed_steps(self, n: int) -> tuple[list[float], list[float]]:
        """(wall, CPU) seconds of ``n`` steps."""
        wall, cpu = [], []
        for _ in range(n):
            start, start_cpu = time.perf_counter(), time.process_time()
            self.step()
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
        return wall, cpu

    def timed_phases(self, n: int) -> dict[str, list[float]]:
        """Seconds of each phase of ``n`` steps, wall clock (``forward``, ...) and CPU time
        (``forward_cpu``, ...)."""
        names = ("forward", "backward", "optimizer")
        phases = {f"{name}{clock}": [] for clock in ("", "_cpu") for name in names}
        for _ in range(n):
            self.optimizer.zero_grad(set_to_none=True)
            marks = [(time.perf_counter(), time.process_time())]
            loss = F.mse_loss(self.model(self.x), self.y)
            marks.append((time.perf_counter(), time.process_time()))
            loss.backward()
            marks.append((time.perf_counter(), time.process_time()))
            self.optimizer.step()
            marks.append((time.perf_counter(), time.process_time()))
            for name, (before, after) in zip(names, zip(marks, marks[1:])):
                phases[name].append(after[0] - before[0])
                phases[f"{name}_cpu"].append(after[1] - before[1])
        return phases

    def state_bytes(self) -> int:
        if self.variant in RESUTENSOR_VARIANTS:
            return rt.memory_report(self.model, self.optimizer).total.total
        tensors = [*self.model.parameters(), *self.model.buffers()]
        tensors += [p.grad for p in self.model.parameters() if p.grad is not None]
        tensors += [v for state in self.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
        return sum(t.nbytes for t in tensors)


def bench_shape(name: str, widths, batch: int, rounds: int, steps: int, warmup: int) -> dict:
    variants = [v for v in VARIANTS if v != "qresu4" or name in QRESU_SHAPES]
    runs = {v: Run(v, widths, batch) for v in variants}
    for run in runs.values():
        for _ in range(warmup):
            run.step()
    step_times = {v: [] for v in variants}
    step_cpu_times = {v: [] for v in variants}
    phase_times = {v: {} for v in variants}
    for _ in range(rounds):
        for v, run in runs.items():
            wall, cpu = run.timed_steps(steps)
            step_times[v] += wall
            step_cpu_times[v] += cpu
    for _ in range(rounds):
        for v, run in runs.items():
            for phase, times in run.timed_phases(steps).items():
                phase_times[v].setdefault(phase, []).extend(times)
    dense_ms = statistics.median(step_times["dense"]) * 1e3
    dense_cpu_ms = statistics.median(step_cpu_times["dense"]) * 1e3
    dense_bytes = runs["dense"].state_bytes()
    rows = {}
    for v, run in runs.items():
        ms = statistics.median(step_times[v]) * 1e3
        cpu_ms = statistics.median(step_cpu_times[v]) * 1e3
        state = run.state_bytes()
        rows[v] = {
            "step_ms": round(ms, 2), "x_dense": round(ms / dense_ms, 3),
            "step_cpu_ms": round(cpu_ms, 2), "x_dense_cpu": round(cpu_ms / dense_cpu_ms, 3),
            **{f"{phase}_ms": round(statistics.median(t) * 1e3, 2) for phase, t in phase_times[v].items()},
            "state_bytes": state, "state_x_dense": round(state / dense_bytes, 3),
            "steps_timed": len(step_times[v]),
        }
    skipped = {"qresu4": "CPU QRESU rebuilds W_eff in plain PyTorch each step; run at the small shape only"} \
        if "qresu4" not in variants else {}
    return {"widths": list(widths), "batch": batch, "variants": rows, "skipped": skipped}


def run(quick: bool = False) -> dict:
    rounds, steps, warmup = (2, 3, 1) if quick else (5, 4, 2)
    results = {
        "sparsity": SPARSITY, "optimizer": "AdamW(lr=1e-3, weight_decay=0.01), default (for-loop) implementation",
        "dtype": "float32", "torch": torch.__version__, "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "rounds": rounds, "steps_per_round": steps, "warmup_steps": warmup,
        "loadavg_before": [round(x, 2) for x in os.getloadavg()], "shapes": {},
    }
    for name, (widths, batch) in SHAPES.items():
        results["shapes"][name] = bench_shape(name, widths, batch, rounds, steps, warmup)
        print(f"{name} {widths} batch {batch}:")
        for v, row in results["shapes"][name]["variants"].items():
            print(f"  {v:11s} {row['step_ms']:8.1f} ms  {row['x_dense']:5.2f}x dense  fwd {row['forward_ms']:7.1f}  "
                  f"bwd {row['backward_ms']:7.1f}  opt {row['optimizer_ms']:7.1f}  state {row['state_x_dense']:.3f}x  |  "
                  f"CPU time {row['step_cpu_ms']:8.1f} ms  {row['x_dense_cpu']:5.2f}x  fwd {row['forward_cpu_ms']:7.1f}  "
                  f"bwd {row['backward_cpu_ms']:7.1f}  opt {row['optimizer_cpu_ms']:7.1f}")
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def use_reference_kernels() -> None:
    """Unregister the C loops' CPU implementations (for this process): every bitmap op runs its
    plain-PyTorch reference, positions decoded by numpy."""
    for op in kernels.OPS.values():
        op.implementations.pop("cpu", None)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--reference-kernels", action="store_true",
                        help="run the plain-PyTorch references instead of the package's C loops (the CPU "
                             "bitmap gathers and updates), to measure what the loops save")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cpu.json"))
    args = parser.parse_args(argv)
    if args.reference_kernels:
        use_reference_kernels()
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be a positive number of threads, got {args.threads}")
        torch.set_num_threads(args.threads)
    results = run(args.quick)
    results["cpu_kernels"] = "reference" if args.reference_kernels or not kernels.HAS_CPU_KERNELS else "C loops"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"load average before {results['loadavg_before']}, after {results['loadavg_after']}; wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

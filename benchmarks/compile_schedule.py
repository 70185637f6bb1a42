"""Compile cost of a whole ResuScheduler run: a small MLP (CPU, or ``--device cuda``) with its model compiled
(``fullgraph=True``) and its optimizer step compiled, next to an eager twin.

Per step it records the graphs compiled so far (model, step: ``CompileCounterWithBackend``
wrapping the backend), the phase and the trainable count, and the step's wall time; the steps
that compiled a graph give the compile cost (the first steps after a mode change or a new
trainable count). At the end the compiled and eager weights are compared (max abs diff).

    python -m benchmarks.compile_schedule --backend aot_eager
    python -m benchmarks.compile_schedule --backend inductor --out benchmarks/results/compile_schedule_cpu.json
    python -m benchmarks.compile_schedule --backend inductor --device cuda --out benchmarks/results/compile_schedule_h100.json

The budgeted RESU config (``total_steps``, ``num_cycles``, ``sparsity``) prunes along a cubic
schedule, so the trainable count changes at every cycle; Dynamo's ``recompile_limit`` is raised
for the run (``--recompile-limit``) so that the count of graphs it would take is measured rather
than cut off, and whether the default limit (8) was exceeded is recorded.
"""
import argparse
import copy
import json
import pathlib
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torchao.quantization import quantize_

import resu_tensor as rt

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "compile_schedule_cpu.json"
WIDTH, CLASSES, BATCH = 64, 10, 16
DEFAULT_RECOMPILE_LIMIT = 8


def make_model(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.ReLU(), nn.Linear(2 * WIDTH, 2 * WIDTH), nn.ReLU(),
                          nn.Linear(2 * WIDTH, CLASSES)).to(device)
    quantize_(model, rt.resu_config(sparsity=0.0))
    return model


def dense_weights(model: nn.Module) -> list:
    return [p.dequantize() if isinstance(p, rt.ResuTensor) else p.detach() for p in model.parameters()]


def phase_of(model: nn.Module) -> tuple:
    """(mode of the first ResuTensor layer, trainable coordinates over all ResuTensor layers)."""
    weights = [p for p in model.parameters() if isinstance(p, rt.ResuTensor)]
    return weights[0].mode_name, sum(int(w.trainable_count) for w in weights)


def run(backend: str, cycles: int, steps_per_cycle: int, sparsity: float, schedule: str,
        recompile_limit: int, device: str = "cpu") -> dict:
    """One schedule, compiled next to eager; returns the JSON record.

    Example::

        record = run("aot_eager", cycles=10, steps_per_cycle=8, sparsity=0.9, schedule="cubic", recompile_limit=64)
    """
    torch._dynamo.reset()
    model = make_model(device)
    eager = copy.deepcopy(model)
    total = cycles * steps_per_cycle
    config_args = dict(total_steps=total, num_cycles=cycles, sparsity=sparsity, progress=False)
    if schedule != "cubic":
        config_args["sparsity_schedule"] = schedule
    config = rt.ScheduleConfig(**config_args)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    scheduler, eager_scheduler = rt.ResuScheduler(model, opt, config), rt.ResuScheduler(eager, eager_opt, config)
    model_counter, step_counter = CompileCounterWithBackend(backend), CompileCounterWithBackend(backend)
    compiled_model = torch.compile(model, backend=model_counter, fullgraph=True)
    compiled_step = torch.compile(opt.step, backend=step_counter)
    generator = torch.Generator().manual_seed(1)
    steps, started = [], time.perf_counter()
    with torch._dynamo.config.patch(recompile_limit=recompile_limit):
        for step in range(total):
            mode, trainable = phase_of(model)
            x = torch.randn(BATCH, WIDTH, generator=generator).to(device)
            y = torch.randint(0, CLASSES, (BATCH,), generator=generator).to(device)
            before = (model_counter.frame_count, step_counter.frame_count)
            t0 = time.perf_counter()
            F.cross_entropy(compiled_model(x), y).backward()
            compiled_step()
            opt.zero_grad()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            F.cross_entropy(eager(x), y).backward()
            eager_opt.step()
            eager_opt.zero_grad()
            steps.append({"step": step, "mode": mode, "trainable": trainable, "model_graphs": model_counter.frame_count,
                          "step_graphs": step_counter.frame_count, "seconds": round(seconds, 4),
                          "compiled": (model_counter.frame_count, step_counter.frame_count) != before})
            scheduler.step()
            eager_scheduler.step()
    wall = time.perf_counter() - started
    compiling = [s for s in steps if s["compiled"]]
    diff = max((a - b).abs().max().item() for a, b in zip(dense_weights(model), dense_weights(eager)))
    return {
        "backend": backend, "device": device, "cycles": cycles, "steps_per_cycle": steps_per_cycle, "sparsity": sparsity,
        "schedule": schedule, "recompile_limit": recompile_limit,
        "model_graphs": model_counter.frame_count, "step_graphs": step_counter.frame_count,
        "exceeds_default_recompile_limit": max(model_counter.frame_count, step_counter.frame_count)
        > DEFAULT_RECOMPILE_LIMIT,
        "compiling_steps": len(compiling),
        "compile_step_seconds": {"total": round(sum(s["seconds"] for s in compiling), 3),
                                 "max": round(max((s["seconds"] for s in compiling), default=0.0), 3),
                                 "first_after_mode_change": first_after_mode_change(steps)},
        "steady_step_seconds_median": median([s["seconds"] for s in steps if not s["compiled"]]),
        "wall_seconds": round(wall, 2),
        "max_abs_diff_vs_eager": diff,
        "steps": steps,
    }


def first_after_mode_change(steps: list) -> list:
    """Wall time of each first step in a new mode, and whether it compiled."""
    out = []
    for previous, current in zip([None, *steps], steps):
        if previous is None or previous["mode"] != current["mode"]:
            out.append({"step": current["step"], "mode": current["mode"], "seconds": current["seconds"],
                        "compiled": current["compiled"]})
    return out


def median(values: list) -> float:
    values = sorted(values)
    return round(values[len(values) // 2], 5) if values else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["aot_eager", "inductor"], default="aot_eager")
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--steps-per-cycle", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--schedule", choices=["cubic", "constant"], default="cubic")
    parser.add_argument("--recompile-limit", type=int, default=64)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--out", type=pathlib.Path, default=None, help=f"JSON file to update (e.g. {DEFAULT_OUT})")
    args = parser.parse_args()
    torch.set_num_threads(1)
    record = run(args.backend, args.cycles, args.steps_per_cycle, args.sparsity, args.schedule, args.recompile_limit,
                 args.device)
    summary = {k: v for k, v in record.items() if k != "steps"}
    print(json.dumps(summary, indent=2))
    if args.out is not None:
        results = json.loads(args.out.read_text()) if args.out.exists() else {}
        results["machine"] = {"platform": platform.platform(), "torch": torch.__version__, "threads": 1,
                              **({"gpu": torch.cuda.get_device_name()} if args.device == "cuda" else {})}
        results[f"{args.backend} {args.schedule}"] = record
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()

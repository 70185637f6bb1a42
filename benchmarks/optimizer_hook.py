"""Host time that resu_tensor's optimizer step pre-hook(s) add to every ``optimizer.step()`` (CPU).

Two optimizers, SGD with momentum after one step (so their state exists):
* ``plain``: 48 plain ``nn.Linear`` weights, no ResuTensor — what every user of torch pays once
  resu_tensor is imported, since the hooks are global;
* ``sparse``: 48 ResuTensor weights in SPARSE mode.

For each, the library's hook callables (every global optimizer step pre-hook defined in a
``resu_tensor`` module) are called directly over many iterations, median per step of several
repeats; ``optimizer.step()`` is also timed with and without them registered (noisier: it
includes the update itself). Runs against whichever ``resu_tensor`` is importable (``resu_tensor.fsdp``
is imported too, as an FSDP user would), and adds its figures under ``--label`` to the JSON file.

    PYTHONPATH=. python benchmarks/optimizer_hook.py --label after
    cd /path/to/other/checkout && PYTHONPATH=. python /path/to/benchmarks/optimizer_hook.py --label before \
        --out /path/to/benchmarks/results/optimizer_hook_cpu.json
"""
import argparse
import json
import pathlib
import platform
import statistics
import subprocess
import time

import torch
from torch import nn
from torch.optim.optimizer import _global_optimizer_pre_hooks
from torchao.quantization import quantize_

import resu_tensor as rt
import resu_tensor.fsdp  # noqa: F401  (registers its hook where the package has a separate one)

LAYERS, FEATURES, BATCH = 48, 64, 8
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "optimizer_hook_cpu.json"


def library_hooks() -> list:
    return [hook for hook in _global_optimizer_pre_hooks.values()
            if getattr(hook, "__module__", "").startswith("resu_tensor")]


def make_optimizer(resu: bool) -> torch.optim.Optimizer:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(FEATURES, FEATURES, bias=False) for _ in range(LAYERS)])
    if resu:
        quantize_(model, rt.resu_config(sparsity=0.5))
        assert all(isinstance(m.weight, rt.ResuTensor) and m.weight.mode == rt.Mode.SPARSE for m in model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model(torch.randn(BATCH, FEATURES)).square().mean().backward()
    optimizer.step()  # creates the momentum buffers; the gradients stay for the timed steps
    return optimizer


def median_per_call(fn, iterations: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean seconds per call of ``fn`` over ``iterations`` calls."""
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        samples.append((time.perf_counter() - start) / iterations)
    return statistics.median(samples)


def measure(optimizer, hooks: list, iterations: int, repeats: int) -> dict:
    def run_hooks():
        for hook in hooks:
            hook(optimizer, (), {})

    hooks_us = median_per_call(run_hooks, iterations, repeats) * 1e6
    step_with_us = median_per_call(optimizer.step, max(1, iterations // 100), repeats) * 1e6
    removed = {key: hook for key, hook in _global_optimizer_pre_hooks.items() if hook in hooks}
    for key in removed:
        del _global_optimizer_pre_hooks[key]
    try:
        step_without_us = median_per_call(optimizer.step, max(1, iterations // 100), repeats) * 1e6
    finally:
        _global_optimizer_pre_hooks.update(removed)
    return {"hooks_us_per_step": round(hooks_us, 2), "step_us_with_hooks": round(step_with_us, 1),
            "step_us_without_hooks": round(step_without_us, 1)}


def package_commit() -> str:
    root = pathlib.Path(rt.__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True, help="key of these figures in the JSON file, e.g. before/after")
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    hooks = library_hooks()
    entry = {
        "package": rt.__name__,
        "commit": package_commit(),
        "hooks": [f"{h.__module__}.{h.__name__}" for h in hooks],
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "layers": LAYERS, "features": FEATURES, "iterations": args.iterations, "repeats": args.repeats,
        "plain": measure(make_optimizer(resu=False), hooks, args.iterations, args.repeats),
        "sparse": measure(make_optimizer(resu=True), hooks, args.iterations, args.repeats),
    }
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[args.label] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({args.label: entry}, indent=2))


if __name__ == "__main__":
    main()

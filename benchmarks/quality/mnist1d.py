"""The full MNIST-1D comparison of docs/results.md: dense, one-shot + fine-tune, GMP, RigL, RESU
(amnesty), RESU-Selective and QRESU-4 on an MLP and a small 1-D CNN at sparsity 0.5/0.7/0.9,
3 seeds, every run the same number of AdamW steps. The methods and the training loop live in
``benchmarks/quality/mnist1d_harness.py`` (``python examples/mnist1d_demo.py`` runs a reduced grid of
the same runs, so its numbers match these).

    python -m benchmarks.quality.mnist1d [--out benchmarks/results/mnist1d.json] [--plot docs/mnist1d_accuracy.png]
"""
import argparse
import json
import platform
from pathlib import Path

import torch

from benchmarks.quality.plot import plot_accuracy
from benchmarks.quality import mnist1d_harness as harness


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/mnist1d.json"))
    p.add_argument("--plot", default="docs/mnist1d_accuracy.png", help="PNG path ('' for none)")
    p.add_argument("--jobs", type=int, default=min(2, harness.available_cpus()))
    p.add_argument("--steps", type=int, default=harness.STEPS)
    p.add_argument("--methods", nargs="+", choices=harness.METHODS + harness.ABLATIONS, default=list(harness.METHODS))
    args = p.parse_args(argv)
    grid = harness.FULL
    specs = harness.make_specs(grid["archs"], args.methods, grid["sparsities"], grid["seeds"], args.steps)
    config = {**grid, "methods": args.methods, "steps": args.steps, "lr": harness.LR, "batch_size": harness.BATCH_SIZE,
              "optimizer": "AdamW", "jobs": args.jobs, "threads_per_job": 1, "torch": torch.__version__,
              "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
              "cpus": harness.available_cpus()}
    results = {"config": config, **harness.compare(specs, args.jobs)}
    print("\n" + harness.format_table(results["summary"]) + "\n\n" + harness.TABLE_NOTE)
    print(f"\n{len(specs)} runs in {results['wall_s']:.0f} s with {args.jobs} worker(s) "
          f"({results['cpu_s']:.0f} CPU s in the runs)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot_accuracy(results["summary"], args.plot)
    return results


if __name__ == "__main__":
    main()

"""The full MNIST-1D comparison of docs/results.md: dense, one-shot + fine-tune, GMP, RigL, RESU
(amnesty), RESU-Selective and QRESU-4 on an MLP and a small 1-D CNN at sparsity 0.5/0.7/0.9,
3 seeds, every run the same number of AdamW steps. The methods and the training loop live in
``benchmarks/quality/mnist1d_harness.py`` (``python examples/mnist1d_demo.py`` runs a reduced grid of
the same runs, so its numbers match these).

    python -m benchmarks.quality.mnist1d [--out benchmarks/results/mnist1d.json] [--plot docs/mnist1d_accuracy.png]
    python -m benchmarks.quality.mnist1d --sparsities 0.9          # one column of the grid
    python -m benchmarks.quality.mnist1d --sparsities 0.9 --methods resu --merge   # rerun RESU's runs alone
    python -m benchmarks.quality.mnist1d --ablation resu_constant resu_carry_state   # RESU variants vs RESU

``--ablation NAME ...`` runs the RESU variants of ``harness.ABLATION_OPTIONS`` next to plain RESU
(and ``harness.BASELINE_VARIANTS`` next to their baseline; sparsity 0.9 unless ``--sparsities``) and merges them into ``benchmarks/results/mnist1d_ablation.json``
(``all``: every variant); a variant run again replaces its earlier runs there.
"""
import argparse
import json
import platform
from pathlib import Path

import torch

from benchmarks.quality.plot import plot_accuracy
from benchmarks.quality import mnist1d_harness as harness


DEFAULT_OUT = Path("benchmarks/results/mnist1d.json")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT} ({ABLATION_OUT} with --ablation)")
    p.add_argument("--plot", default="docs/mnist1d_accuracy.png", help="PNG path ('' for none)")
    p.add_argument("--jobs", type=int, default=min(2, harness.available_cpus()))
    p.add_argument("--steps", type=int, default=harness.STEPS)
    p.add_argument("--methods", nargs="+", choices=harness.METHODS + harness.ABLATIONS, default=list(harness.METHODS))
    p.add_argument("--sparsities", nargs="+", type=float, default=None,
                   help=f"default {harness.FULL['sparsities']} ({ABLATION_SPARSITIES} with --ablation)")
    p.add_argument("--ablation", nargs="+", choices=("all",) + harness.ABLATIONS, default=None, metavar="NAME",
                   help="RESU variants to run next to RESU: " + ", ".join(harness.ABLATIONS))
    p.add_argument("--rerun-base", action="store_true", help="--ablation: run the base methods again")
    p.add_argument("--merge", action="store_true", help="add the runs to --out's (a rerun replaces its earlier runs)")
    args = p.parse_args(argv)
    if args.ablation:
        return ablation(args)
    grid = {**harness.FULL, "sparsities": args.sparsities or harness.FULL["sparsities"]}
    specs = harness.make_specs(grid["archs"], args.methods, grid["sparsities"], grid["seeds"], args.steps)
    fresh = harness.compare(specs, args.jobs)
    report(fresh, specs, args.jobs)
    results = merged(args.out, fresh, grid, args) if args.merge else {"config": run_config(grid, args.methods, args), **fresh}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    if args.plot:
        plot_accuracy(results["summary"], args.plot)
    return results


ABLATION_SPARSITIES = [0.9]
ABLATION_OUT = Path("benchmarks/results/mnist1d_ablation.json")


def run_config(grid: dict, methods: list, args) -> dict:
    return {**grid, "methods": methods, "steps": args.steps, "lr": harness.LR, "batch_size": harness.BATCH_SIZE,
            "optimizer": "AdamW", "jobs": args.jobs, "threads_per_job": 1, "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
            "cpus": harness.available_cpus(), "library_commit": library_commit()}


def library_commit() -> str:
    """The last commit that changed the library (``resu_tensor/``; + "-dirty" with uncommitted
    changes there): which code and defaults a run used."""
    import subprocess

    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "resu_tensor"], capture_output=True,
                              text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", "resu_tensor"],
                               capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def ablation(args) -> dict:
    """The named variants and the methods they vary (RESU, GMP) on the full grid's archs and seeds; merged into the
    ablation JSON (this call's runs replace any of the same arch, method, sparsity and seed)."""
    names = list(harness.ABLATIONS) if "all" in args.ablation else args.ablation
    grid = {**harness.FULL, "sparsities": args.sparsities or ABLATION_SPARSITIES}
    out = args.out if args.out != DEFAULT_OUT else ABLATION_OUT
    # a base method already measured there on this grid is not run again (--rerun-base: it is;
    # needed after a change of the library's defaults)
    done = {(r["arch"], r["method"], r["sparsity"], r["seed"], r["steps"])
            for r in (json.loads(out.read_text())["runs"] if out.exists() and not args.rerun_base else [])}
    bases = [m for m in sorted({harness.ABLATION_BASE[name] for name in names})
             if not all((a, m, s, seed, args.steps) in done
                        for a in grid["archs"] for s in grid["sparsities"] for seed in grid["seeds"])]
    methods = bases + names
    specs = harness.make_specs(grid["archs"], methods, grid["sparsities"], grid["seeds"], args.steps)
    fresh = harness.compare(specs, args.jobs)
    results = merged(out, fresh, grid, args)
    report(fresh, specs, args.jobs)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results


def merged(out: Path, fresh: dict, grid: dict, args) -> dict:
    """``out``'s runs (if it exists) with ``fresh``'s added; a fresh run replaces one of the same
    arch, method, sparsity, seed and steps. Each run keeps the library commit it ran on."""
    commit = library_commit()
    for r in fresh["runs"]:
        r["library_commit"] = commit
    key = lambda r: (r["arch"], r["method"], r["sparsity"], r["seed"], r["steps"])  # noqa: E731
    runs = json.loads(out.read_text())["runs"] if out.exists() else []
    new_keys = {key(r) for r in fresh["runs"]}
    runs = [r for r in runs if key(r) not in new_keys] + fresh["runs"]
    grid = {**grid, "sparsities": sorted({r["sparsity"] for r in runs} - {0.0})}
    return {"config": run_config(grid, sorted({r["method"] for r in runs}), args), "runs": runs,
            "summary": harness.summarize(runs), "wall_s": fresh["wall_s"], "cpu_s": fresh["cpu_s"]}


def report(results: dict, specs: list, jobs: int) -> None:
    print("\n" + harness.format_table(results["summary"]) + "\n\n" + harness.TABLE_NOTE)
    print(f"\n{len(specs)} runs in {results['wall_s']:.0f} s with {jobs} worker(s) "
          f"({results['cpu_s']:.0f} CPU s in the runs)")


if __name__ == "__main__":
    main()

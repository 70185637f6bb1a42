"""The Markdown tables of docs/results.md's MNIST-1D section, from the committed JSON: accuracy seed by
seed for each method (with the best baseline and RESU's margin over it), and the ablation's variants
against plain RESU.

    python -m benchmarks.quality.mnist1d_tables [benchmarks/results/mnist1d.json] [benchmarks/results/mnist1d_ablation.json]
"""
import json
import statistics
import sys
from pathlib import Path

from benchmarks.quality.mnist1d_harness import LABELS

BASELINES = ("oneshot", "gmp", "rigl", "set")


def by_seed(runs: list[dict], arch: str, method: str, sparsity: float) -> dict[int, float]:
    """{seed: test accuracy} of one (arch, method, sparsity)."""
    return {r["seed"]: r["accuracy"] for r in runs
            if r["arch"] == arch and r["method"] == method and r["sparsity"] == sparsity}


def accuracy_table(runs: list[dict], sparsity: float) -> str:
    """One row per (arch, method): accuracy per seed and mean ± std; then, per arch, RESU minus
    the best baseline of each seed (the baseline with the highest accuracy on that seed)."""
    seeds = sorted({r["seed"] for r in runs})
    archs = [a for a in ("mlp", "cnn") if any(r["arch"] == a for r in runs)]
    methods = [m for m in LABELS if any(r["method"] == m for r in runs)]
    head = "| arch | method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std |"
    lines = [head, "|" + "---|" * (3 + len(seeds))]
    for arch in archs:
        for method in methods:
            acc = by_seed(runs, arch, method, 0.0 if method == "dense" else sparsity)
            if not acc:
                continue
            values = [acc[s] for s in seeds]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            lines.append(f"| {arch} | {LABELS[method]} | " + " | ".join(f"{v:.3f}" for v in values)
                         + f" | {statistics.fmean(values):.3f} ± {std:.3f} |")
        best = {s: max((by_seed(runs, arch, m, sparsity).get(s, 0.0), m) for m in BASELINES) for s in seeds}
        resu = by_seed(runs, arch, "resu", sparsity)
        if resu:
            margins = [resu[s] - best[s][0] for s in seeds]
            lines.append(f"| {arch} | *RESU − best baseline* | " + " | ".join(
                f"{m:+.3f} ({LABELS[best[s][1]]})" for m, s in zip(margins, seeds)) +
                f" | {statistics.fmean(margins):+.3f} |")
    return "\n".join(lines)


def ablation_table(runs: list[dict], sparsity: float) -> str:
    """One row per variant: mean accuracy per arch and its difference from its base method
    (``resu_dev``, or GMP for a GMP variant) seed by seed."""
    from benchmarks.quality.mnist1d_harness import ABLATION_BASE

    seeds = sorted({r["seed"] for r in runs})
    lines = ["| variant | MLP mean | MLP Δ per seed | CNN mean | CNN Δ per seed |", "|---|---|---|---|---|"]
    names = ["resu_dev", "gmp"] + [n for n in ABLATION_BASE if n != "resu_dev" and any(r["method"] == n for r in runs)]
    for name in names:
        cells = []
        for arch in ("mlp", "cnn"):
            acc = by_seed(runs, arch, name, sparsity)
            base = by_seed(runs, arch, ABLATION_BASE.get(name, name), sparsity)
            if not acc:
                cells += ["", ""]
                continue
            cells.append(f"{statistics.fmean(acc.values()):.3f}")
            cells.append("" if name in ("resu_dev", "gmp") else
                         "/".join(f"{acc[s] - base[s]:+.3f}" for s in seeds if s in acc and s in base))
        if any(cells):
            lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    grid = Path(argv[0] if argv else "benchmarks/results/mnist1d.json")
    ablation = Path(argv[1] if len(argv) > 1 else "benchmarks/results/mnist1d_ablation.json")
    for path, table in ((grid, accuracy_table), (ablation, ablation_table)):
        if path.exists():
            runs = json.loads(path.read_text())["runs"]
            for sparsity in sorted({r["sparsity"] for r in runs} - {0.0}):
                print(f"\n{path} at sparsity {sparsity}:\n\n{table(runs, sparsity)}")


if __name__ == "__main__":
    main()

"""Accuracy vs sparsity, one panel per architecture, one line per method, from a comparison's JSON.

    python -m benchmarks.quality.plot [benchmarks/results/mnist1d.json] [docs/mnist1d_accuracy.png]
"""
import json
import sys
from pathlib import Path

from benchmarks.quality.mnist1d_harness import LABELS


def plot_accuracy(summary: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = sorted({r["arch"] for r in summary}, key=["mlp", "cnn"].index)
    fig, axes = plt.subplots(1, len(archs), figsize=(5.5 * len(archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], archs):
        rows = [r for r in summary if r["arch"] == arch]
        for i, method in enumerate(LABELS):
            points = sorted((r["sparsity"], r["accuracy_mean"], r["accuracy_std"])
                            for r in rows if r["method"] == method)
            if not points:
                continue
            if method == "dense":  # no sparsity axis: a reference line with its ±std band
                _, mean, std = points[0]
                ax.axhline(mean, color="black", linestyle="--", linewidth=1, label="dense")
                ax.axhspan(mean - std, mean + std, color="black", alpha=0.08)
                continue
            x, mean, std = zip(*points)
            x = [v + 0.004 * (i - len(LABELS) / 2) for v in x]  # dodge: error bars must not hide each other
            ax.errorbar(x, mean, yerr=std, marker="o", markersize=4, capsize=3, label=LABELS[method])
        seeds = max(r["seeds"] for r in rows)
        ax.set(title=f"MNIST-1D, {arch.upper()} ({seeds} seeds, mean ± std)", xlabel="sparsity",
               ylabel="test accuracy", xticks=sorted({r["sparsity"] for r in rows if r["method"] != "dense"}))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/mnist1d.json")
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "docs/mnist1d_accuracy.png")
    print(plot_accuracy(json.loads(source.read_text())["summary"], target))

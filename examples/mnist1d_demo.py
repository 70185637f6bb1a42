"""RESU on MNIST-1D, on the CPU: dense, one-shot, GMP, RigL (SET with --full) and three RESU variants compared.

    python examples/mnist1d_demo.py                 # reduced grid: MLP, sparsity 0.7 and 0.9, seed 0 (~1.5 min)
    python examples/mnist1d_demo.py --full          # the comparison of docs/results.md (MLP and CNN, 3 seeds)
    python examples/mnist1d_demo.py --walkthrough   # one RESU lifecycle, phase by phase

Trains a small MLP on MNIST-1D (generated locally by the ``mnist1d`` package, no download) with
every method for the same number of AdamW steps and prints test accuracy, the share of resurrected
weights, training-state bytes and wall time. The methods and the training loop live in
``benchmarks/quality/mnist1d_harness.py`` (``python -m benchmarks.quality.mnist1d`` runs the full grid
and writes its JSON and plot). ``--help`` lists the flags.
"""
import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

import resu_tensor as rt

# Run as a script, Python puts examples/ (not the repo root) on sys.path; the comparison harness is
# in the repo's benchmarks/ folder, which is not part of the installed package.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.quality.mnist1d_harness import (  # noqa: E402
    ABLATIONS, BATCH_SIZE, FULL, LABELS, LR, METHODS as ALL_METHODS, STEPS, TABLE_NOTE, Trainer, accuracy, available_cpus, compare,
    format_table, load_mnist1d, make_model, make_specs,
)

REDUCED = {"archs": ["mlp"], "sparsities": [0.7, 0.9], "seeds": [0]}
# The demo's default methods: the reduced grid leaves SET out (RigL with random regrowth) to stay
# near 1.5 min; --full and --methods set run it.
METHODS = tuple(m for m in ALL_METHODS if m != "set")


# ============================================================================ the lifecycle walk-through
WALKTHROUGH_HEADER = """\
RESU walk-through: an MLP (40-256-256-10) learns MNIST-1D on the CPU, then goes through the RESU
lifecycle. Its Linear weights are ResuTensors. 'prune' zeroes the smallest {sparsity:.0%} of each
weight (SPARSE: only the active weights train); 'resu' puts small random theta values in the
pruned slots and trains only them (active weights and biases frozen); 'commit' merges theta
and re-prunes each weight by magnitude back to {sparsity:.0%}. Each row is taken at the end of its
phase: test accuracy and the training state in bytes (weight values plus mask, gradients,
AdamW state; biases included). Weight values stay stored dense, so the savings show in the
grads and optimizer state, which hold only the trainable coordinates. The prune and commit
rows come right after the mode change, before any step: the weights' stale grads and
optimizer state were just dropped, to be rebuilt (compact) at the next step."""
WALKTHROUGH_COLUMNS = ("phase", "mode", "sparsity", "test acc", "weights+mask", "grads", "optimizer", "total")
WALKTHROUGH_WIDTHS = (10, 6, 8, 8, 12, 9, 9, 9)


def set_plain_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or thaw the plain parameters (biases): the walk-through's RESU trains theta alone.
    A frozen bias gets no grad, so AdamW skips it and keeps its state for later."""
    for p in model.parameters():
        if not isinstance(p, rt.ResuTensor):
            p.requires_grad_(trainable)


def snapshot(name: str, model, optimizer, data) -> dict:
    """One walk-through row: mode, overall weight sparsity, test accuracy, training-state bytes."""
    weights = [w for _, _, w in rt.resu_weights(model)]
    total = rt.memory_report(model, optimizer).total
    return {"phase": name, "mode": "/".join(sorted({w.mode.value for w in weights})),
            "sparsity": sum(w.numel() - w.n_active for w in weights) / sum(w.numel() for w in weights),
            "accuracy": accuracy(model, data), "weights_mask": total.weights + total.mask, "grads": total.grads,
            "optimizer": total.optimizer, "total": total.total}


def walkthrough(sparsity: float, steps_per_phase: int, seed: int, lr: float = LR, batch_size: int = BATCH_SIZE,
                say: Callable = print) -> dict:
    """dense → prune → fine-tune → RESU → commit → fine-tune, one row per phase; returns
    {phase name: row dict}."""
    data = load_mnist1d()
    torch.manual_seed(seed)  # model init
    model = make_model("mlp")
    theta_init = torch.Generator().manual_seed(seed + 1)  # RESU's theta draw
    # One Trainer (one AdamW, one batch stream) for every phase: the Parameter objects survive each
    # mode change. Its step restarts at each training phase, so each has its own cosine.
    tr = Trainer(model, data, steps_per_phase, seed, lr, batch_size)

    def train() -> None:
        tr.step = 0
        tr.train_until(steps_per_phase)

    def resu_phase() -> None:
        tr.change(lambda: rt.enter_resu_(model, epsilon=0.1, freeze_active=True, generator=theta_init))
        set_plain_trainable(model, False)
        train()
        set_plain_trainable(model, True)

    phases = [
        ("dense", train),
        ("prune", lambda: tr.change(lambda: rt.prune_(model, sparsity, method="magnitude"))),
        ("finetune", train),
        ("resu", resu_phase),
        ("commit", lambda: tr.change(lambda: rt.commit_(model, strategy="magnitude"))),
        ("refinetune", train),
    ]

    def row(cells) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WALKTHROUGH_WIDTHS)))

    say(WALKTHROUGH_HEADER.format(sparsity=sparsity), end="\n\n")
    say(row(WALKTHROUGH_COLUMNS))
    say("-" * len(row(WALKTHROUGH_COLUMNS)))
    results, start = {}, time.perf_counter()
    for name, phase in phases:
        phase()
        r = results[name] = snapshot(name, model, tr.optimizer, data)
        say(row((r["phase"], r["mode"], f"{r['sparsity']:.3f}", f"{r['accuracy']:.3f}",
                 *(f"{r[k]:,}" for k in ("weights_mask", "grads", "optimizer", "total")))))
    say(f"\n{steps_per_phase} steps of batch {batch_size} per training phase; {time.perf_counter() - start:.1f} s")
    return results


# ============================================================================ command line
def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mnist1d_demo.py", description=__doc__.splitlines()[0])
    p.add_argument("--full", action="store_true",
                   help=f"the docs/results.md comparison: {FULL} (explicit flags below still override it)")
    p.add_argument("--archs", nargs="+", choices=("mlp", "cnn"), help=f"default {REDUCED['archs']}")
    p.add_argument("--methods", nargs="+", choices=ALL_METHODS + ABLATIONS, default=None, metavar="METHOD",
                   help=f"any of {', '.join(ALL_METHODS)} (default: {', '.join(METHODS)}; with --full: all) or "
                        f"the ablations {', '.join(ABLATIONS)}")
    p.add_argument("--sparsities", nargs="+", type=float, help=f"default {REDUCED['sparsities']}")
    p.add_argument("--seeds", nargs="+", type=int, help=f"default {REDUCED['seeds']}")
    p.add_argument("--steps", type=int, default=STEPS, help=f"optimizer steps per run, every method (default {STEPS})")
    p.add_argument("--jobs", type=int, default=min(2, available_cpus()),
                   help="worker processes, one torch thread each (default: 2 if the machine has 2 cores)")
    p.add_argument("--out", type=Path, help="folder to write mnist1d_demo.json into (default: print only)")
    p.add_argument("--walkthrough", action="store_true",
                   help="print one RESU lifecycle phase by phase (MLP, first sparsity and seed) instead")
    p.add_argument("--steps-per-phase", type=int, default=1000, help="walk-through: optimizer steps per training phase")
    p.add_argument("--quiet", action="store_true", help="print nothing; just return the results")
    args = p.parse_args(argv)
    preset = FULL if args.full else REDUCED
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.methods is None:
        args.methods = list(ALL_METHODS if args.full else METHODS)
    return args


def main(argv: Optional[list[str]] = None) -> dict:
    """Run with command-line flags ``argv``. Returns the comparison ({"config", "runs", "summary",
    "wall_s", "cpu_s"}) or, with ``--walkthrough``, the walk-through's {phase name: row dict}."""
    args = parse_args(argv)
    say = (lambda *a, **k: None) if args.quiet else print
    if args.walkthrough:
        torch.set_num_threads(1)  # the matmuls are small: more threads gain little
        return walkthrough(args.sparsities[0], args.steps_per_phase, args.seeds[0], say=say)
    config = {"archs": args.archs, "methods": args.methods, "sparsities": args.sparsities, "seeds": args.seeds,
              "steps": args.steps, "lr": LR, "batch_size": BATCH_SIZE, "optimizer": "AdamW", "jobs": args.jobs}
    say(f"MNIST-1D, {args.steps} AdamW steps per run: {', '.join(LABELS[m] for m in args.methods)}; "
        f"archs {args.archs}, sparsities {args.sparsities}, seeds {args.seeds}\n")
    specs = make_specs(args.archs, args.methods, args.sparsities, args.seeds, args.steps)
    results = {"config": config, **compare(specs, args.jobs, say)}
    say("\n" + format_table(results["summary"]) + "\n\n" + TABLE_NOTE)
    say(f"\n{len(specs)} runs in {results['wall_s']:.0f} s with {args.jobs} worker(s) "
        f"({results['cpu_s']:.0f} CPU s in the runs)")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mnist1d_demo.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

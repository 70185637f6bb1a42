"""RESU end to end on a CPU: dense → prune → sparse fine-tune → RESU → commit → sparse fine-tune.

Trains a small MLP on MNIST-1D (generated locally by the ``mnist1d`` package, no download) and
prints, after each phase, the test accuracy and the bytes of training state ``rt.memory_report``
counts. Run it with ``python -m resu_tensor.demo`` or ``resu-demo``; ``--help`` lists the flags.
"""
import argparse
import functools
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt

HEADER = """\
RESU demo: an MLP (40-256-256-10) learns MNIST-1D on the CPU, then goes through the RESU
lifecycle. Its Linear weights are ResuTensors. 'prune' zeroes the smallest {sparsity:.0%} of each
weight (SPARSE: only the active weights train); 'resu' puts small random theta values in the
pruned slots and trains only them (active weights and biases frozen); 'commit' merges theta
and re-prunes each weight by magnitude back to {sparsity:.0%}. Each row is taken at the end of its
phase: test accuracy and the training state in bytes (weight values plus mask, gradients,
AdamW state; biases included). Weight values stay stored dense, so the savings show in the
grads and optimizer state, which hold only the trainable coordinates. The prune and commit
rows come right after the mode change, before any step: the weights' stale grads and
optimizer state were just dropped, to be rebuilt (compact) at the next step."""

COLUMNS = ("phase", "mode", "sparsity", "test acc", "weights+mask", "grads", "optimizer", "total")
WIDTHS = (10, 6, 8, 8, 12, 9, 9, 9)


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="resu-demo", description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.7, help="fraction of each weight pruned (default 0.7)")
    p.add_argument("--steps-per-phase", type=int, default=1000, help="optimizer steps per training phase")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate of each phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch.set_num_threads (default 1: the matmuls are small, more threads gain little)")
    p.add_argument("--quiet", action="store_true", help="print nothing; just return the results")
    return p.parse_args(argv)


@functools.lru_cache(maxsize=1)
def load_mnist1d() -> tuple[torch.Tensor, ...]:
    """(x, y, x_test, y_test); inputs standardised with the training set's statistics.
    Cached: generating the data set takes about a second and it is the same every time
    (mnist1d seeds its own generator)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, x_test = (torch.tensor(data[k], dtype=torch.float32) for k in ("x", "x_test"))
    y, y_test = (torch.tensor(data[k], dtype=torch.long) for k in ("y", "y_test"))
    mean, std = x.mean(), x.std()
    return (x - mean) / std, y, (x_test - mean) / std, y_test


def make_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    quantize_(model, rt.resu_config(sparsity=0.0))  # every Linear weight -> a DENSE ResuTensor
    return model


def train(model, optimizer, data, steps: int, batch_size: int, lr: float, generator: torch.Generator) -> None:
    """``steps`` AdamW steps on random minibatches. The learning rate follows a cosine from
    ``lr`` to 0 within each phase, so every phase ends settled rather than mid-jitter."""
    x, y = data[0], data[1]
    for i in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model, data) -> float:
    x_test, y_test = data[2], data[3]
    return (model(x_test).argmax(dim=1) == y_test).float().mean().item()


def set_plain_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or thaw the plain parameters (biases): RESU trains theta alone. A frozen bias
    gets no grad, so AdamW skips it and keeps its state for later."""
    for p in model.parameters():
        if not isinstance(p, rt.ResuTensor):
            p.requires_grad_(trainable)


def snapshot(name: str, model, optimizer, data) -> dict:
    """One table row: mode, overall weight sparsity, test accuracy and training-state bytes."""
    weights = [w for _, _, w in rt.resu_weights(model)]
    numel = sum(w.numel() for w in weights)
    total = rt.memory_report(model, optimizer).total
    return {
        "phase": name,
        "mode": "/".join(sorted({w.mode.value for w in weights})),
        "sparsity": sum(w.numel() - w.n_active for w in weights) / numel,
        "accuracy": accuracy(model, data),
        "weights_mask": total.weights + total.mask,
        "grads": total.grads,
        "optimizer": total.optimizer,
        "total": total.total,
    }


def format_row(cells) -> str:
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, WIDTHS)))


def format_result(r: dict) -> str:
    return format_row((r["phase"], r["mode"], f"{r['sparsity']:.3f}", f"{r['accuracy']:.3f}",
                       *(f"{r[k]:,}" for k in ("weights_mask", "grads", "optimizer", "total"))))


def run(args: argparse.Namespace) -> dict:
    """Run every phase; returns {phase name: row dict}, in phase order."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # model init
    batches = torch.Generator().manual_seed(args.seed)  # minibatch order
    theta_init = torch.Generator().manual_seed(args.seed + 1)  # RESU's theta draw
    data = load_mnist1d()
    model = make_model()
    # One stock optimizer for the whole run: the Parameter objects survive every mode change.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    step = functools.partial(train, model, optimizer, data, args.steps_per_phase, args.batch_size,
                             args.lr, batches)

    def change_mode(change) -> None:
        change()
        # The trainable set changed: AdamW state of the old set must not be applied to it.
        rt.reset_optimizer_state_(optimizer, model)

    def resu_phase() -> None:
        change_mode(lambda: rt.enter_resu_(model, epsilon=0.1, freeze_active=True, generator=theta_init))
        set_plain_trainable(model, False)
        step()
        set_plain_trainable(model, True)

    phases = [
        ("dense", step),
        ("prune", lambda: change_mode(lambda: rt.prune_(model, args.sparsity, method="magnitude"))),
        ("finetune", step),
        ("resu", resu_phase),
        ("commit", lambda: change_mode(lambda: rt.commit_(model, strategy="magnitude"))),
        ("refinetune", step),
    ]
    say = (lambda *a, **k: None) if args.quiet else print
    say(HEADER.format(sparsity=args.sparsity), end="\n\n")
    say(format_row(COLUMNS))
    say("-" * len(format_row(COLUMNS)))
    results, start = {}, time.perf_counter()
    for name, phase in phases:
        phase()
        results[name] = snapshot(name, model, optimizer, data)
        say(format_result(results[name]))
    say(f"\n{args.steps_per_phase} steps of batch {args.batch_size} per training phase; "
        f"{time.perf_counter() - start:.1f} s")
    return results


def main(argv: Optional[list[str]] = None) -> dict:
    """Run the demo with command-line flags ``argv``; returns the per-phase results (see :func:`run`)."""
    return run(parse_args(argv))


def cli() -> None:
    """The ``resu-demo`` console script (it exits with what this returns, so: nothing)."""
    main()


if __name__ == "__main__":
    main()

"""Data-parallel step time, 1 → N GPUs: a GPT-2-small-shaped model, dense vs ResuTensor (SPARSE, RESU).

Weak scaling: every rank trains on its own ``--batch`` × ``--seq`` tokens, so N ranks process N×
the tokens of one; ideal scaling keeps the step time flat (efficiency = t₁ / t_N). One launch
measures every world size from 1 to N (a sub-group of ranks 0..w−1 trains, the others wait).

* ``dense``: plain ``nn.Linear`` weights, plain DistributedDataParallel.
* ``sparse`` / ``resu``: the 48 block linears are ResuTensors at ``--sparsity`` (RESU: active set
  frozen, θ trains), ``rt.distributed.prepare_ddp`` + DistributedDataParallel; DDP reduces the
  embeddings, LayerNorms and head, the ResuGradSync the compact block gradients.
* ``sparse_end_of_backward``: ``sparse`` with ``prepare_ddp(overlap=False)``.

Run on a GPU host (NCCL; writes benchmarks/results/distributed.json from rank 0)::

    torchrun --nproc_per_node=2 -m benchmarks.distributed
    torchrun --nproc_per_node=2 -m benchmarks.distributed --modes dense sparse --steps 30

CPU smoke test (gloo, a tiny model)::

    torchrun --nproc_per_node=2 -m benchmarks.distributed --device cpu --preset tiny --out /tmp/d.json
"""
import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # `torchrun benchmarks/distributed.py` (not -m): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor import distributed as rtd

MODES = ("dense", "sparse", "resu", "sparse_end_of_backward")


@dataclass
class GPTConfig:
    vocab: int = 50257
    seq: int = 1024
    layers: int = 12
    heads: int = 12
    width: int = 768


PRESETS = {"gpt2-small": GPTConfig(), "tiny": GPTConfig(vocab=256, seq=32, layers=2, heads=2, width=64)}


class Block(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.heads = c.heads
        self.ln1, self.ln2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)
        self.qkv, self.proj = nn.Linear(c.width, 3 * c.width), nn.Linear(c.width, c.width)
        self.fc, self.fc2 = nn.Linear(c.width, 4 * c.width), nn.Linear(4 * c.width, c.width)

    def forward(self, x):
        b, t, width = x.shape
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(width, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, width))
        return x + self.fc2(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, c: GPTConfig):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(c.vocab, c.width), nn.Embedding(c.seq, c.width)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.ln_f, self.head = nn.LayerNorm(c.width), nn.Linear(c.width, c.vocab, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def build(mode: str, config: GPTConfig, sparsity: float, device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if mode != "dense":
        quantize_(model, rt.resu_config(sparsity=sparsity),
                  filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and fqn.startswith("blocks."))
    if mode == "resu":
        rt.enter_resu_(model, epsilon=0.1, generator=torch.Generator(device=device).manual_seed(0))
    return model


def optimizer_for(model: nn.Module, fused: bool = False, capturable: bool = False) -> torch.optim.Optimizer:
    """Stock AdamW over every parameter, ResuTensors included (its default foreach path on CUDA,
    or ``fused=True``; ``capturable=True`` for a step recorded in a CUDA graph)."""
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=fused or None,
                             capturable=capturable)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(mode: str, world: int, group, sync_group, args, device: torch.device,
            config: Optional[GPTConfig] = None, builder: Optional[Callable] = None) -> dict:
    """Median step time over ``args.steps`` (after ``args.warmup``) on ranks 0..world−1 (``group``
    for DDP, ``sync_group`` for the ResuTensor gradients); the slowest rank's time per step.
    Other ranks return {} at once. ``config`` (default ``PRESETS[args.preset]``) and
    ``builder(mode, config, sparsity, device) -> model`` (default :func:`build`) let other
    benchmarks (``benchmarks.model --ddp``) measure their own variants; a model with ResuTensor
    parameters goes through ``prepare_ddp``, one without through plain DDP."""
    rank = dist.get_rank()
    if rank >= world:
        return {}
    config = config or PRESETS[args.preset]
    model = (builder or build)(mode, config, args.sparsity, device)
    if rtd.resu_parameters(model):
        overlap = mode != "sparse_end_of_backward"
        rtd.prepare_ddp(model, group=group, overlap=overlap, sync_group=sync_group if overlap else None)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  process_group=group)
    optimizer = optimizer_for(model)
    generator = torch.Generator(device=device).manual_seed(1 + rank)
    tokens = torch.randint(0, config.vocab, (args.batch, config.seq + 1), device=device, generator=generator)
    x, y = tokens[:, :-1], tokens[:, 1:]
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(args.warmup + args.steps):
        dist.barrier(group=group)
        synchronize(device)
        start = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(ddp(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    slowest = torch.tensor(times, dtype=torch.float64, device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX, group=group)
    median = statistics.median(slowest.tolist())
    resu = [p for _, p in rtd.resu_parameters(model)]
    resu_ids = {id(p) for p in resu}
    ddp_bytes = sum(p.numel() * p.element_size() for p in model.parameters()
                    if id(p) not in resu_ids and p.requires_grad)
    resu_bytes = sum(p.trainable_count * p.element_size() for p in resu)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    row = {"mode": mode, "world_size": world, "step_ms_median": 1e3 * median,
           "step_ms_min": 1e3 * min(slowest.tolist()), "tokens_per_s": world * args.batch * config.seq / median,
           "loss": loss.item(), "ddp_grad_bytes": ddp_bytes, "resu_grad_bytes": resu_bytes,
           "weights_total": sum(p.numel() for p in model.parameters()), "peak_memory_gib_rank0": peak}
    del ddp, model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def init_distributed(device_name: str) -> torch.device:
    """The device of this rank (``cuda:LOCAL_RANK`` or cpu) after ``init_process_group`` (NCCL / gloo)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_name == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def measure_scaling(modes, args, device: torch.device, world_sizes=None, **measure_options) -> list[dict]:
    """:func:`measure` every mode at every world size (default 1..N), in that order, on every
    process; returns rank 0's rows, [] elsewhere. ``scaling_efficiency`` = t₁ / t_w (weak scaling:
    1.0 is ideal; t₁ is the smallest world size measured).
    ``measure_options`` (``config``, ``builder``) go to :func:`measure`."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    world_sizes = sorted(set(world_sizes or range(1, world_size + 1)))
    if world_sizes[0] < 1 or world_sizes[-1] > world_size:
        raise ValueError(f"world sizes {world_sizes} must lie in 1..{world_size} (the launched processes)")
    # Every process creates every group, in the same order (new_group is collective).
    groups = {world: dist.new_group(list(range(world))) for world in world_sizes}
    sync_groups = {world: dist.new_group(list(range(world))) for world in world_sizes}
    rows = []
    for mode in modes:
        for world in world_sizes:
            row = measure(mode, world, groups[world], sync_groups[world], args, device, **measure_options)
            dist.barrier()
            if rank == 0:
                rows.append(row)
                print(f"{mode:<24} world={world}  step {row['step_ms_median']:8.2f} ms  "
                      f"{row['tokens_per_s']:12,.0f} tok/s  grads: DDP {row['ddp_grad_bytes'] / 2**20:7.1f} MiB "
                      f"+ ResuTensor {row['resu_grad_bytes'] / 2**20:7.1f} MiB", flush=True)
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and r["world_size"] == world_sizes[0])
        row["scaling_efficiency"] = base["step_ms_median"] / row["step_ms_median"]
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=8, help="sequences per rank and step")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 compute (default: bf16 autocast)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "distributed.json"))
    args = parser.parse_args(argv)
    if "RANK" not in os.environ:
        parser.error("launch with torchrun, e.g. torchrun --nproc_per_node=2 -m benchmarks.distributed")
    if args.device == "cpu":
        args.bf16 = False
    device = init_distributed(args.device)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rows = measure_scaling(args.modes, args, device)
    results = {}
    if rank == 0:
        results = {
            "benchmark": "DDP weak scaling, GPT-2-small-shaped (block linears as ResuTensors)",
            "config": {**asdict(PRESETS[args.preset]), "preset": args.preset, "batch_per_rank": args.batch,
                       "sparsity": args.sparsity, "steps": args.steps, "warmup": args.warmup,
                       "bf16_autocast": args.bf16, "optimizer": "AdamW"},
            "backend": dist.get_backend(), "world_size": world_size,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "rows": rows,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.out}")
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()

"""Whole-model training step, GPT-2-small-shaped: plain nn.Linear vs ResuTensor DENSE / SPARSE / RESU / QRESU-4.

The model is ``benchmarks.distributed.GPT`` (plain PyTorch, every projection an ``nn.Linear``):
12 blocks, width 768, 12 heads, MLP 3072, vocabulary 50257, learned positions, pre-LayerNorm,
``F.scaled_dot_product_attention(is_causal=True)``, an **untied** LM head (its own
``nn.Linear(768, 50257)``, not the token embedding: 163 M parameters instead of GPT-2's tied
124 M). Only the 48 block linears (qkv, proj, fc, fc2: 85 M weights) become ResuTensors, through
``quantize_(model, rt.resu_config(...), filter_fn=block_linears)``; embeddings, LayerNorms, biases
and the head stay plain tensors. bf16 autocast, one stock ``torch.optim.AdamW`` over all parameters (lr 1e-4, weight decay 0.1,
its default foreach path on CUDA, ResuTensors included),
fixed seeded random tokens (``torch.randint``), no downloads.

Variants, each a fresh model and optimizer, measured side by side in one process:

* ``plain``: stock ``nn.Linear`` weights (the baseline);
* ``dense``: ResuTensor in DENSE mode (every coordinate trains);
* ``sparse``: ``rt.prune_`` to ``--sparsity`` (magnitude), active weights train, pruned ones stay 0;
* ``resu``: then ``rt.enter_resu_``: active weights frozen, θ trains in the pruned slots;
* ``qresu4``: ``rt.enter_resu_(quantize_bits=4)``: active weights frozen as 4-bit codes, θ trains.

``--cuda-graph`` records each variant's whole step as one CUDA graph (``rt.CudaGraphStep``,
``AdamW(capturable=True)``) and times its replays: the step without per-op host overhead (no
``host_ms`` then).

Per variant: median step time (forward + backward + ``optimizer.step()`` + ``zero_grad()``;
``triton.testing.do_bench`` on CUDA, ``time.perf_counter`` on CPU) and its ratio to ``plain``,
tokens/s, on CUDA the GPU kernel time per step (torch.profiler over ``--profile-steps`` steps: what
the step would take if the host never made the GPU wait; the top kernels by time; measured on a
fresh model after every variant is timed, since profiling slows later launches) and its ratio, the
host time per step (``host_ms``: the same model at batch 1 × 32 tokens, where the step waits for
the host alone; a step takes about max(host, GPU) plus host jitter), peak memory of one step
(``torch.cuda.max_memory_allocated``, stats reset just before) and its ratio, first/last loss, and a check that no frozen coordinate moved over the whole run
(``frozen_changed`` = how many frozen coordinates differ bitwise from their initial value; must
be 0). Every variant runs in its own try/except: a failure is an ``error`` in the JSON.

    python -m benchmarks.model                                     # GPU: GPT-2 small, batch 8 × 1024
    python -m benchmarks.model --cuda-graph --out benchmarks/results/model_h100_cuda_graph.json
    python -m benchmarks.model --device cpu --preset tiny --out /tmp/model_cpu.json

Data-parallel scaling (``--ddp``, under torchrun): every variant at every world size 1..N (weak
scaling, ``--batch-size`` sequences per rank; ranks 0..w−1 train in a sub-group, the others wait)
with DistributedDataParallel, ``rt.distributed.prepare_ddp(model)`` for the ResuTensor variants;
the timing loop is ``benchmarks.distributed.measure`` (slowest rank's median step)::

    torchrun --nproc_per_node=2 -m benchmarks.model --ddp --variants plain resu
    torchrun --nproc_per_node=2 -m benchmarks.model --ddp --device cpu --preset tiny --out /tmp/model_ddp.json
"""
import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/model.py` (not -m): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from benchmarks.distributed import GPT, PRESETS, GPTConfig, optimizer_for, synchronize

VARIANTS = {"plain": "plain nn.Linear", "dense": "DENSE ResuTensor", "sparse": "SPARSE", "resu": "RESU",
            "qresu4": "QRESU-4"}
PRUNED = ("sparse", "resu", "qresu4")
RESULTS = Path(__file__).parent / "results"


def label(variant: str, sparsity: float) -> str:
    return VARIANTS[variant] + (f" s={sparsity:g}" if variant in PRUNED else "")


def block_linears(module: nn.Module, fqn: str) -> bool:
    """quantize_ filter: the attention and MLP linears of the blocks (not the LM head)."""
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def build_variant(variant: str, config: GPTConfig, sparsity: float, device, group_size: int = 128) -> nn.Module:
    """A fresh model for ``variant``, identical initial weights for every variant (seed 0)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {sorted(VARIANTS)}")
    device = torch.device(device)
    torch.manual_seed(0)
    model = GPT(config).to(device)
    if variant == "plain":
        return model
    # qresu4: every block linear's in_features (width or 4·width) is a multiple of the group
    return convert_block_linears_(model, variant, sparsity, device, min(group_size, config.width))


def convert_block_linears_(model: nn.Module, variant: str, sparsity: float, device, group_size: int) -> nn.Module:
    """The blocks' linears of a fresh model as ResuTensors in ``variant``'s mode: ``dense``,
    ``sparse`` (magnitude-pruned to ``sparsity``), ``resu`` or ``qresu4`` (4-bit frozen actives in
    groups of ``group_size``); θ is drawn with seed 0, the same for every variant."""
    quantize_(model, rt.resu_config(sparsity=0.0), filter_fn=block_linears)
    if variant == "dense":
        return model
    rt.prune_(model, sparsity=sparsity, method="magnitude")
    if variant == "sparse":
        return model
    generator = torch.Generator(device=device).manual_seed(0)
    if variant == "resu":
        rt.enter_resu_(model, epsilon=0.1, freeze_active=True, generator=generator)
    else:
        rt.enter_resu_(model, epsilon=0.1, generator=generator, quantize_bits=4, group_size=group_size)
    return model


def token_batch(config: GPTConfig, batch: int, device, seed: int = 1):
    """Fixed random (inputs, next-token targets), (batch, seq) each."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, config.vocab, (batch, config.seq + 1), device=device, generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer, x, y, bf16: bool, losses: list):
    """One training step; returns its (detached, unsynchronised) loss and appends it to ``losses``."""
    device_type = x.device.type

    def step():
        with torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        return loss.detach()

    return step


def training_step(model: nn.Module, args, x, y, losses: list):
    """(optimizer, step): a stock AdamW and the step of ``model`` on (x, y), eager or
    (``--cuda-graph``) recorded and replayed by ``rt.CudaGraphStep`` with ``capturable=True``."""
    optimizer = optimizer_for(model, fused=args.fused_adamw, capturable=args.cuda_graph)
    if not args.cuda_graph:
        return optimizer, make_step(model, optimizer, x, y, args.bf16, losses)
    graphed = rt.CudaGraphStep(make_step(model, optimizer, x, y, args.bf16, []), model, optimizer)

    def replay():
        losses.append(graphed().clone())  # the next replay overwrites the tensor it returns

    return optimizer, replay


# --------------------------------------------------------------------------- frozen-coordinate check
def snapshot(model: nn.Module) -> dict:
    """Per ResuTensor weight: its effective weight, trainable mask and mask, on the CPU (so the
    snapshot does not count in the GPU peak)."""
    return {name: (w.dequantize().cpu(), w.trainable_mask().cpu(), w.mask().cpu())
            for name, _, w in rt.resu_weights(model)}


def movement(model: nn.Module, before: dict) -> dict:
    """How the ResuTensor weights moved since ``before``: frozen coordinates that changed (must be
    0), the fraction of trainable ones that changed, and whether any mask or trainable set changed."""
    frozen_changed = frozen_total = trainable_moved = trainable_total = 0
    masks_changed, frozen_max_abs = [], 0.0
    for name, _, w in rt.resu_weights(model):
        old, trainable, mask = before[name]
        new = w.dequantize().cpu()
        if not (torch.equal(w.trainable_mask().cpu(), trainable) and torch.equal(w.mask().cpu(), mask)):
            masks_changed.append(name)
        differs = new != old  # NaN counts as changed
        frozen_changed += int((differs & ~trainable).sum())
        frozen_total += int((~trainable).sum())
        trainable_moved += int((differs & trainable).sum())
        trainable_total += int(trainable.sum())
        if (~trainable).any():
            frozen_max_abs = max(frozen_max_abs, float((new.float() - old.float())[~trainable].abs().max()))
    return {"frozen_coordinates": frozen_total, "frozen_changed": frozen_changed,
            "frozen_max_abs_change": frozen_max_abs, "trainable_coordinates": trainable_total,
            "trainable_moved_fraction": trainable_moved / trainable_total if trainable_total else None,
            "masks_changed": masks_changed}


# --------------------------------------------------------------------------- timing
def _do_bench_ms(step, rep_ms: float) -> list:
    """do_bench times of ``step`` (ms), all of them where this triton can return them."""
    from triton.testing import do_bench

    try:
        times = do_bench(step, warmup=1, rep=rep_ms, return_mode="all")
    except (AssertionError, ValueError, TypeError):  # an older triton without return_mode="all"
        times = do_bench(step, warmup=1, rep=rep_ms, return_mode="median")
    return [float(t) for t in times] if isinstance(times, (list, tuple)) else [float(times)]


def time_step(step, device: torch.device, warmup: int, steps: int) -> dict:
    """Warm up, measure peak memory around one step, then time ``steps`` steps."""
    warm_ms = []
    for _ in range(max(1, warmup)):  # creates optimizer state, autotunes/compiles kernels
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        warm_ms.append(1e3 * (time.perf_counter() - start))
    figures = {"warmup_ms": warm_ms}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        figures.update(peak_bytes=peak, allocated_before_bytes=before, peak_over_start_bytes=peak - before)
        # do_bench repeats for ``rep`` ms: size it to about ``steps`` steps from the warm-up times
        times = _do_bench_ms(step, rep_ms=steps * statistics.median(warm_ms))
        figures["timing"] = "triton.testing.do_bench"
    else:
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(1e3 * (time.perf_counter() - start))
        figures["timing"] = "time.perf_counter"
    figures.update(step_ms=statistics.median(times), step_ms_min=min(times), step_ms_max=max(times),
                   timed_steps=len(times), step_ms_all=[round(t, 4) for t in times])
    return figures


def gpu_kernel_time(step, steps: int, top: int = 12) -> dict:
    """GPU kernel time per step (ms): the kernels' own device time summed over ``steps`` profiled
    steps (torch.profiler), idle gaps between them excluded. Against ``step_ms`` it splits a step
    into GPU work and the host time that the GPU waits for. ``gpu_kernels_top``: the ``top``
    kernels by device time, so a variant's extra GPU time can be traced to its kernels."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    # user annotations (``Optimizer.step#AdamW.step``) show as GPU ranges spanning kernels: not counted
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return {"gpu_kernel_ms": sum(e.self_device_time_total for e in kernels) / steps / 1e3,
            "gpu_kernel_launches": sum(e.count for e in kernels) / steps,
            "gpu_kernels_top": [{"kernel": e.key[:120], "ms": round(e.self_device_time_total / steps / 1e3, 4),
                                 "calls": e.count / steps} for e in kernels[:top]]}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_variant(variant: str, args, config: GPTConfig, device: torch.device, on_variant=None) -> dict:
    """Figures of one variant (a fresh model and optimizer). ``on_variant(variant, model, record)``
    is called at the end, before the model is freed (tests inspect the trained model there)."""
    began = time.perf_counter()
    model = build_variant(variant, config, args.sparsity, device, args.group_size)
    resu = [w for _, _, w in rt.resu_weights(model)]
    record = {"variant": variant, "label": label(variant, args.sparsity),
              "sparsity": args.sparsity if variant in PRUNED else 0.0,
              "parameters": sum(p.numel() for p in model.parameters()), "resu_weights": len(resu),
        "resu_weight_elements": sum(w.numel() for w in resu),
        "trainable_weight_elements": sum(w.trainable_count for w in resu), "build_s": time.perf_counter() - began}
    before = snapshot(model) if args.check else None
    x, y = token_batch(config, args.batch, device)
    losses = []
    optimizer, step = training_step(model, args, x, y, losses)
    record.update(time_step(step, device, args.warmup, args.steps))
    record.update(steps_taken=len(losses), loss_first=losses[0].item(), loss_last=losses[-1].item(),
                  tokens_per_s=args.batch * config.seq / (record["step_ms"] / 1e3))
    if before is not None:
        record.update(movement(model, before))
    record["memory_report_bytes"] = _memory_bytes(model, optimizer)  # after zero_grad: no grads
    if on_variant is not None:
        on_variant(variant, model, record)
    del model, optimizer, step, before
    return record


def _warm_step(variant: str, args, config: GPTConfig, device: torch.device, batch: int):
    """The training step of a fresh model of ``variant``, after ``args.warmup`` steps."""
    model = build_variant(variant, config, args.sparsity, device, args.group_size)
    x, y = token_batch(config, batch, device)
    _, step = training_step(model, args, x, y, [])
    for _ in range(max(1, args.warmup)):
        step()
    return step


HOST_SEQ = 32  # tokens per sequence of the host-time model: too little GPU work to wait for


def host_ms(variant: str, args, config: GPTConfig, device: torch.device, rounds: int = 5, steps: int = 10) -> float:
    """Host time of one step (ms): the same model, ops and launches at batch 1 × ``HOST_SEQ``
    tokens, where the GPU finishes each kernel before the host launches the next, so the step
    takes as long as the host needs (best of ``rounds`` × ``steps``). A step takes about
    max(host, GPU kernel time) plus the host's jitter."""
    step = _warm_step(variant, args, dataclasses.replace(config, seq=min(HOST_SEQ, config.seq)), device, batch=1)
    best = float("inf")
    for _ in range(rounds):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(device)
        best = min(best, (time.perf_counter() - start) / steps)
    return 1e3 * best


def profile_variant(variant: str, args, config: GPTConfig, device: torch.device) -> dict:
    """:func:`gpu_kernel_time` of a fresh model of ``variant``."""
    return gpu_kernel_time(_warm_step(variant, args, config, device, args.batch), args.profile_steps)


def _memory_bytes(model, optimizer) -> dict:
    """rt.memory_report totals over every parameter (weights, masks, grads, optimizer state), best effort."""
    try:
        total = rt.memory_report(model, optimizer).total
        return {k: getattr(total, k) for k in ("weights", "mask", "grads", "optimizer", "total")}
    except Exception as exc:  # informational only
        return {"error": f"{type(exc).__name__}: {exc}"[:300]}


def add_ratios(records: list) -> None:
    """Ratios to the first ``plain`` record of each round (the first plain overall where a round
    has none)."""
    first = next((r for r in records if r["variant"] == "plain" and "step_ms" in r), None)
    for round_index in sorted({r.get("round", 0) for r in records}):
        same = [r for r in records if r.get("round", 0) == round_index]
        _ratios(same, next((r for r in same if r["variant"] == "plain" and "step_ms" in r), first))


def summarize_rounds(records: list) -> dict:
    """Per variant over the rounds: every round's step ratio to that round's plain, and their
    median (what to quote when the lent machine's state moves single timings)."""
    summary = {}
    for variant in dict.fromkeys(r["variant"] for r in records):
        ratios = [r["vs_plain"] for r in records if r["variant"] == variant and "vs_plain" in r]
        if ratios:
            summary[variant] = {"vs_plain_each": [round(x, 4) for x in ratios],
                                "vs_plain_median": statistics.median(ratios)}
    return summary


def _ratios(records: list, base) -> None:
    if base is None:
        return
    for r in records:
        if "step_ms" in r:
            r["vs_plain"] = r["step_ms"] / base["step_ms"]
        if "peak_bytes" in r and "peak_bytes" in base:
            r["peak_vs_plain"] = r["peak_bytes"] / base["peak_bytes"]
        if "gpu_kernel_ms" in r and "gpu_kernel_ms" in base:
            r["gpu_kernel_vs_plain"] = r["gpu_kernel_ms"] / base["gpu_kernel_ms"]
        if "host_ms" in r and "host_ms" in base:
            r["host_vs_plain"] = r["host_ms"] / base["host_ms"]


# --------------------------------------------------------------------------- entry points
def model_config(args) -> GPTConfig:
    config = PRESETS[args.preset]
    overrides = {k: getattr(args, k) for k in ("vocab", "seq", "layers", "heads", "width")
                 if getattr(args, k) is not None}
    config = dataclasses.replace(config, **overrides)
    if config.width % config.heads:
        raise SystemExit(f"--width {config.width} must be a multiple of --heads {config.heads}")
    return config


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "cpu"


def _header(args, config: GPTConfig, device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "config": {**dataclasses.asdict(config), "mlp": 4 * config.width, "preset": args.preset,
                       "lm_head": "untied nn.Linear (plain tensor)", "batch": args.batch,
                       "tokens_per_step": args.batch * config.seq, "sparsity": args.sparsity,
                       "qresu_group_size": min(args.group_size, config.width), "warmup": args.warmup,
                       "steps": args.steps, "bf16_autocast": args.bf16,
                       "optimizer": "torch.optim.AdamW(lr=1e-4, weight_decay=0.1), one group, "
                                    + ("fused=True" if args.fused_adamw else "default (foreach)")
                                    + (", capturable=True" if args.cuda_graph else ""),
                       "step": "one CUDA graph, replayed" if args.cuda_graph else "eager"},
            "started": time.strftime("%Y-%m-%d %H:%M:%S")}


def run(args, on_variant=None) -> dict:
    """The single-process benchmark: every variant in ``args.variants``, one after another."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --preset tiny)")
    config = model_config(args)
    results = {"benchmark": "training step, whole GPT-2-shaped model (block linears as ResuTensors)",
               **_header(args, config, device)}
    print(f"{results['device']}  torch {results['torch']}  {config}  batch {args.batch}", flush=True)
    start, records = time.perf_counter(), []
    # Rounds interleave the variants (plain, sparse, ..., plain, sparse, ...): a lent machine's
    # host can slow down for a whole variant's timing (the same RESU model measured 1.08x, then
    # 1.00x in one process), so each round's ratios are against that round's plain.
    for round_index in range(args.rounds):
        for variant in args.variants:
            began = time.perf_counter()
            try:
                record = measure_variant(variant, args, config, device, on_variant)
                if device.type == "cuda" and round_index == 0 and not args.cuda_graph:  # replays wait for no host
                    _release(device)
                    record["host_ms"] = host_ms(variant, args, config, device)
            except Exception as exc:  # keep going: the JSON says what failed and why
                record = {"variant": variant, "label": label(variant, args.sparsity),
                          "error": f"{type(exc).__name__}: {exc}"[:500], "traceback": traceback.format_exc()[-3000:]}
            record["wall_s"] = round(time.perf_counter() - began, 2)
            record["round"] = round_index
            records.append(record)
            _release(device)
            status = record.get("error") or (f"{record['step_ms']:9.2f} ms  {record['tokens_per_s']:12,.0f} tok/s  "
                                             f"loss {record['loss_first']:.3f} → {record['loss_last']:.3f}")
            print(f"  [{time.perf_counter() - start:6.1f}s] {record['label']:22s} {status}", flush=True)
    if device.type == "cuda" and args.profile_steps:
        # Only after every variant is timed: a torch.profiler session leaves the CUDA profiling
        # hooks in place and every later kernel launch costs more host time (timed before this
        # order, every variant after the first ran up to 1.3x slower, its GPU work unchanged).
        for record in records:
            if "error" not in record and record["round"] == 0:
                record.update(profile_variant(record["variant"], args, config, device))
                _release(device)
    add_ratios(records)
    results.update(variants=records, rounds=args.rounds, total_s=round(time.perf_counter() - start, 1))
    if args.rounds > 1:
        results["summary"] = summarize_rounds(records)
    return results


def print_table(records) -> None:
    print(f"\n{'variant':22s} {'step ms':>9s} {'×plain':>7s} {'GPU ms':>7s} {'×plain':>7s} {'host ms':>7s} {'tokens/s':>11s} "
          f"{'peak MiB':>9s} {'×plain':>7s} {'loss':>7s} {'frozen moved':>12s}")
    for r in records:
        if "error" in r:
            print(f"{r['label']:22s} ERROR {r['error'][:150]}")
            continue
        peak = f"{r['peak_bytes'] / 2**20:9.0f}" if "peak_bytes" in r else f"{'-':>9s}"
        peak_ratio = f"{r['peak_vs_plain']:7.3f}" if "peak_vs_plain" in r else f"{'-':>7s}"
        ratio = f"{r['vs_plain']:7.2f}" if "vs_plain" in r else f"{'-':>7s}"
        frozen = f"{r['frozen_changed']}/{r['frozen_coordinates']}" if "frozen_changed" in r else "-"
        gpu = f"{r['gpu_kernel_ms']:7.2f}" if "gpu_kernel_ms" in r else f"{'-':>7s}"
        gpu_ratio = f"{r['gpu_kernel_vs_plain']:7.2f}" if "gpu_kernel_vs_plain" in r else f"{'-':>7s}"
        host = f"{r['host_ms']:7.2f}" if "host_ms" in r else f"{'-':>7s}"
        print(f"{r['label']:22s} {r['step_ms']:9.2f} {ratio} {gpu} {gpu_ratio} {host} {r['tokens_per_s']:11,.0f} {peak} "
              f"{peak_ratio} {r['loss_last']:7.3f} {frozen:>12s}")


def run_ddp(args) -> dict:
    """Under torchrun: ``benchmarks.distributed.measure_scaling`` with this file's variants."""
    import torch.distributed as dist

    from benchmarks import distributed as bd

    if "RANK" not in os.environ:
        raise SystemExit("--ddp runs under torchrun: torchrun --nproc_per_node=2 -m benchmarks.model --ddp ...")
    device = bd.init_distributed(args.device)
    config = model_config(args)
    builder = functools.partial(build_variant, group_size=args.group_size)
    rows = bd.measure_scaling(args.variants, args, device, world_sizes=args.world_sizes, config=config,
                              builder=builder)
    results = {}
    if dist.get_rank() == 0:
        for row in rows:
            row["variant"] = row.pop("mode")
            row["label"] = label(row["variant"], args.sparsity)
        summary = {}
        for variant in args.variants:
            mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["world_size"])
            first, last = mine[0], mine[-1]
            summary[variant] = {"world_sizes": [r["world_size"] for r in mine],
                                "step_ms": [r["step_ms_median"] for r in mine],
                                "tokens_per_s": [r["tokens_per_s"] for r in mine],
                                "throughput_gain": last["tokens_per_s"] / first["tokens_per_s"],
                                "scaling_efficiency": last["scaling_efficiency"]}
        for row in rows:
            same = next((r for r in rows if r["variant"] == "plain" and r["world_size"] == row["world_size"]), None)
            if same is not None:
                row["vs_plain"] = row["step_ms_median"] / same["step_ms_median"]
        results = {"benchmark": "DDP weak scaling, whole GPT-2-shaped model (block linears as ResuTensors, "
                                "rt.distributed.prepare_ddp)",
                   **_header(args, config, device), "backend": dist.get_backend(),
                   "world_size": dist.get_world_size(), "timing": "benchmarks.distributed.measure: perf_counter, "
                   "barrier before each step, device synchronised after, slowest rank's median",
                   "rows": rows, "summary": summary}
        out = Path(args.out or RESULTS / f"model_ddp_{slug(results['device'])}_x{dist.get_world_size()}.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1, default=str) + "\n")
        print(f"\n{'variant':22s} {'world':>5s} {'step ms':>9s} {'×plain':>7s} {'tokens/s':>11s} {'efficiency':>10s}")
        for r in rows:
            ratio = f"{r['vs_plain']:7.2f}" if "vs_plain" in r else f"{'-':>7s}"
            print(f"{r['label']:22s} {r['world_size']:5d} {r['step_ms_median']:9.2f} {ratio} "
                  f"{r['tokens_per_s']:11,.0f} {r['scaling_efficiency']:10.3f}")
        print(f"wrote {out}")
    dist.destroy_process_group()
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS),
                        help="model shape (default gpt2-small on cuda, tiny on cpu); the options below override it")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--width", type=int, default=None, help="model width d (MLP 4d)")
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default 1024 / tiny 32)")
    parser.add_argument("--batch-size", dest="batch", type=int, default=8, help="sequences per step (per rank)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--group-size", type=int, default=128, help="QRESU-4 quantization group")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (do_bench: about this many)")
    parser.add_argument("--fused-adamw", action="store_true", help="AdamW(fused=True) for every variant")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA: record each variant's whole step (forward, backward, AdamW(capturable=True), "
                             "zero_grad) as one CUDA graph and time its replays")
    parser.add_argument("--rounds", type=int, default=1,
                        help="time the variants this many times, interleaved; ratios per round, median in 'summary'")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="CUDA: steps profiled for the GPU kernel time per step (0: skip)")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="float32 compute (default bf16 autocast)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the frozen-coordinate check (a CPU copy of every ResuTensor weight)")
    parser.add_argument("--ddp", action="store_true", help="DDP scaling 1..N ranks (launch with torchrun)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=None,
                        help="--ddp: world sizes to measure (default 1..N)")
    parser.add_argument("--out", default=None,
                        help="JSON path (default benchmarks/results/model_<device>.json, "
                             "model_ddp_<device>_x<N>.json with --ddp)")
    args = parser.parse_args(argv)
    if args.preset is None:
        args.preset = "gpt2-small" if args.device == "cuda" else "tiny"
    if not 0 < args.sparsity < 1:
        parser.error("--sparsity must lie in (0, 1)")
    if args.cuda_graph and (args.device != "cuda" or args.ddp):
        parser.error("--cuda-graph records the step on one GPU: it needs --device cuda and no --ddp")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    return args


def main(argv=None, on_variant=None) -> dict:
    args = parse_args(argv)
    if args.ddp:
        return run_ddp(args)
    results = run(args, on_variant)
    out = Path(args.out or RESULTS / f"model_{slug(results['device'])}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_table(results["variants"])
    for variant, row in results.get("summary", {}).items():
        each = " ".join(f"{x:.2f}" for x in row["vs_plain_each"])
        print(f"{label(variant, args.sparsity):22s} ×plain per round: {each}   median {row['vs_plain_median']:.3f}")
    print(f"\nwrote {out} ({results['total_s']} s)")
    return results


if __name__ == "__main__":
    main()

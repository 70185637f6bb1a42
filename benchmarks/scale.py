"""The largest Llama-shaped decoder one GPU trains: dense vs SPARSE / RESU (s = 0.5) vs QRESU-4.

The model (``Llama`` below, plain PyTorch): token embedding, ``L`` blocks of pre-RMSNorm attention
(rotary positions, ``F.scaled_dot_product_attention(is_causal=True)``, optional grouped KV heads)
and a SwiGLU MLP (width 8/3·d rounded up to a multiple of 256, as Llama does), a final RMSNorm and
an untied LM head. Every weight in bf16 (the model is built in ``torch.bfloat16``; AdamW keeps its
state in the parameter dtype, so bf16 too), random init, one batch of 1 × ``seq`` random token ids,
activation checkpointing of every block (``checkpoint(block, x, use_reentrant=False)``) in every
variant, one stock ``torch.optim.AdamW(lr=1e-4)`` (``fused=True`` on CUDA, foreach on CPU). This
measures memory and speed, not learning: with bf16 weights and no float32 master copy, most lr 1e-4
updates of weights of magnitude ~0.1 round away (bf16 spacing there is ~5e-4).

Variants (only the block linears change; embeddings, norms and the head stay plain tensors):

* ``dense``: plain ``nn.Linear`` weights;
* ``sparse``: ``quantize_(model, rt.resu_config(), filter_fn=block_linears)`` then
  ``rt.prune_(model, 0.5)`` (magnitude): the active half trains;
* ``resu``: then ``rt.enter_resu_``: the active half frozen, θ trains in the pruned half;
* ``qresu4``: ``rt.enter_resu_(quantize_bits=4, group_size=128)``: the frozen half as 4-bit codes.

Search, per variant, at fixed width over the number of blocks ``L``: peak memory is nearly affine
in ``L``, so the model is trained (build + 3 steps) at two small ``L``, ``peak = a + b·L`` is fitted
and ``L_pred`` = the largest ``L`` whose predicted peak stays within the budget; then ``L_pred`` and
its neighbours are trained until one ``L`` trains and ``L + 1`` does not (each probe a fresh model,
everything freed in between; the fit is redone with every probe that trained). What "trains" and
"peak" mean depends on the device, and the JSON says which:

* CUDA: peak = ``torch.cuda.max_memory_allocated`` over the build and the 3 steps; a probe trains
  when no ``torch.OutOfMemoryError`` is raised (and, with ``--memory-gib``, its peak fits that
  budget). The fit's budget is the card's total memory (``torch.cuda.mem_get_info``) less a 3%
  margin (the CUDA context and allocator slack live outside ``max_memory_allocated``).
* CPU (a dry run of the same code on a tiny model): peak = an estimate, ``rt.memory_report`` total
  (weights, masks, grads, AdamW state, read after the last step) + the activations of
  :func:`activation_bytes`; a probe trains when that estimate fits ``--memory-gib``.

For the largest ``L`` of each variant: parameters (all, and those of the block linears), peak
memory, tokens/s (median of timed steps after the 3 untimed ones), and against dense's largest
model: parameters ×dense and tokens/s × parameters ×dense (∝ the model FLOP/s each sustains). At
one common ``L`` that every variant fits (dense's largest unless ``--common-layers``), tokens/s side
by side. The JSON is rewritten after every probe, so a run cut off by a time limit keeps what it
measured; ``--time-budget-s`` stops starting new probes when the run has used that much time.

    python -m benchmarks.scale                              # GPU: d 4096, 32 heads, vocab 32000, seq 2048
    python -m benchmarks.scale --memory-gib 40 --variants dense resu   # as if the card had 40 GiB
    python -m benchmarks.scale --device cpu --out /tmp/scale_cpu.json  # dry run, tiny model
"""
import argparse
import dataclasses
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):  # `python benchmarks/scale.py` (not -m): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import resu_tensor as rt
from benchmarks.distributed import synchronize
from benchmarks.model import block_linears, convert_block_linears_, device_name, slug

VARIANTS = {"dense": "dense nn.Linear", "sparse": "SPARSE s=0.5", "resu": "RESU s=0.5", "qresu4": "QRESU-4 s=0.5"}
SPARSITY = 0.5
QRESU_GROUP = 128
FIT_LAYERS = (2, 4)
MARGIN = 0.03  # of the card's total memory, kept out of the fit's budget
TRAIN_STEPS = 3  # untimed steps of every probe; the peak is taken over them
RESULTS = Path(__file__).parent / "results"
GIB = 2**30
GOALS = {"resu": "parameters ≥ 1.5× dense's and tokens/s × parameters ≥ 0.9× dense's",
         "qresu4": "parameters above RESU's, tokens/s × parameters ≥ 0.9× dense's"}


# --------------------------------------------------------------------------- model
@dataclass
class LlamaConfig:
    """Shape of the decoder; ``layers`` is what the search varies."""

    vocab: int = 32000
    width: int = 4096
    layers: int = 2
    heads: int = 32
    kv_heads: Optional[int] = None  # None: as many as ``heads`` (no grouped-query attention)
    seq: int = 2048

    def __post_init__(self):
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads} with an even head "
                             "dimension (rotary positions rotate pairs)")
        if self.heads % self.n_kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.n_kv_heads}")

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def mlp(self) -> int:
        """SwiGLU width: 8/3·d rounded up to a multiple of 256 (Llama: 4096 → 11008)."""
        return 256 * math.ceil(int(8 * self.width / 3) / 256)


def rotary_tables(config: LlamaConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq, head_dim) for rotate-half rotary positions (base 10000)."""
    head_dim = config.width // config.heads
    inverse = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(config.seq, device=device, dtype=torch.float32), inverse)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-second, first], dim=-1) * sin).to(x.dtype)


class Block(nn.Module):
    def __init__(self, c: LlamaConfig, **factory):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.n_kv_heads, c.width // c.heads
        kv_width = self.kv_heads * self.head_dim
        self.attn_norm, self.mlp_norm = nn.RMSNorm(c.width, **factory), nn.RMSNorm(c.width, **factory)
        self.q = nn.Linear(c.width, c.width, bias=False, **factory)
        self.k = nn.Linear(c.width, kv_width, bias=False, **factory)
        self.v = nn.Linear(c.width, kv_width, bias=False, **factory)
        self.o = nn.Linear(c.width, c.width, bias=False, **factory)
        self.gate = nn.Linear(c.width, c.mlp, bias=False, **factory)
        self.up = nn.Linear(c.width, c.mlp, bias=False, **factory)
        self.down = nn.Linear(c.mlp, c.width, bias=False, **factory)

    def forward(self, x, cos, sin):
        b, t, width = x.shape
        h = self.attn_norm(x)
        q = self.q(h).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(h).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos[:t], sin[:t]), apply_rotary(k, cos[:t], sin[:t])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.kv_heads != self.heads)
        x = x + self.o(y.transpose(1, 2).reshape(b, t, width))
        h = self.mlp_norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Llama(nn.Module):
    """Llama-shaped decoder; every block runs under activation checkpointing while training."""

    def __init__(self, c: LlamaConfig, device=None, dtype=torch.bfloat16):
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.embed = nn.Embedding(c.vocab, c.width, **factory)
        self.blocks = nn.ModuleList(Block(c, **factory) for _ in range(c.layers))
        self.norm = nn.RMSNorm(c.width, **factory)
        self.head = nn.Linear(c.width, c.vocab, bias=False, **factory)
        cos, sin = rotary_tables(c, device)
        self.register_buffer("cos", cos.to(dtype), persistent=False)
        self.register_buffer("sin", sin.to(dtype), persistent=False)

    def forward(self, idx):
        x = self.embed(idx)
        for block in self.blocks:
            if self.training:
                x = checkpoint(block, x, self.cos, self.sin, use_reentrant=False)
            else:
                x = block(x, self.cos, self.sin)
        return self.head(self.norm(x))


def build(variant: str, config: LlamaConfig, device, group_size: int = QRESU_GROUP) -> nn.Module:
    """A fresh bf16 model of ``variant`` (seed 0: the same initial weights for every variant).

    Example::

        model = build("resu", LlamaConfig(width=128, heads=4, vocab=512, seq=64, layers=2), "cpu")
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")
    device = torch.device(device)
    torch.manual_seed(0)
    model = Llama(config, device=device)
    if variant == "dense":
        return model
    if variant == "qresu4":
        for size in (config.width, config.mlp):
            if size % group_size:
                raise ValueError(f"qresu4: group_size {group_size} must divide every block linear's in_features "
                                 f"(width {config.width}, mlp {config.mlp})")
    return convert_block_linears_(model, variant, SPARSITY, device, group_size)


def optimizer_for(model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Stock AdamW over every parameter, ResuTensors included: fused on CUDA, foreach on CPU."""
    fused = device.type == "cuda"
    return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused or None, foreach=None if fused else True)


def token_batch(config: LlamaConfig, device, seed: int = 1):
    """Fixed random (inputs, next-token targets), (1, seq) each."""
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.randint(0, config.vocab, (1, config.seq + 1), device=device, generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def train_step(model, optimizer, x, y, before_zero_grad: Optional[Callable[[], None]] = None) -> torch.Tensor:
    """Forward, backward, optimizer step, zero_grad; returns the detached loss."""
    loss = F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())
    loss.backward()
    optimizer.step()
    if before_zero_grad is not None:
        before_zero_grad()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def trained_model(variant: str, layers: int, device: torch.device, steps: int,
                  make_optimizer: Optional[Callable[[nn.Module], torch.optim.Optimizer]] = None, **config) -> tuple:
    """(model, optimizer, inputs, targets) of ``variant`` at ``layers`` blocks of the default
    4096-wide decoder (``config`` overrides LlamaConfig fields) after ``steps`` training steps, so
    its optimizer state exists: the start of the step profiles and timings beside this benchmark.
    ``make_optimizer(model)``: the optimizer (default: :func:`optimizer_for`'s)."""
    config = LlamaConfig(**{**dict(vocab=32000, width=4096, heads=32, seq=2048), **config, "layers": layers})
    model = build(variant, config, device)
    model.train()
    optimizer = make_optimizer(model) if make_optimizer else optimizer_for(model, device)
    x, y = token_batch(config, device)
    for _ in range(steps):
        train_step(model, optimizer, x, y)
    return model, optimizer, x, y


def parameter_counts(model: nn.Module) -> dict:
    """All parameters (a ResuTensor counts its dense shape), those of the block linears, and the
    trainable coordinates of the block linears."""
    linears = [m.weight for name, m in model.named_modules() if block_linears(m, name)]
    resu = [w for _, _, w in rt.resu_weights(model)]
    return {"parameters": sum(p.numel() for p in model.parameters()),
            "block_linear_parameters": sum(w.numel() for w in linears),
            "block_linear_trainable": sum(w.trainable_count for w in resu) if resu else sum(w.numel() for w in linears)}


def activation_bytes(config: LlamaConfig, layers: int) -> int:
    """CPU dry run's activation estimate (bf16 = 2 bytes, fp32 = 4) with every block checkpointed:
    the block inputs kept for the backward (one (seq, d) per block), one block recomputed in the
    backward (its norms, q/k/v/attention output, and the SwiGLU's gate/up/product: about
    (6·d + 3·mlp) per token), and the logits (bf16, their fp32 copy and its gradient)."""
    t, d = config.seq, config.width
    return 2 * t * d * layers + 2 * t * (6 * d + 3 * config.mlp) + t * config.vocab * (2 + 4 + 4)


# --------------------------------------------------------------------------- one probe
def probe(variant: str, config: LlamaConfig, device: torch.device, timed_steps: int = 0,
          group_size: int = QRESU_GROUP, budget_bytes: Optional[int] = None) -> dict:
    """Build ``variant`` at ``config.layers`` blocks and train :data:`TRAIN_STEPS` steps (then
    ``timed_steps`` timed ones, unless the peak is over ``budget_bytes``). Returns its record: peak
    bytes (see the module docstring for how each device measures it), parameter counts, losses,
    step times. A CUDA out-of-memory error propagates; the caller frees the memory once this frame
    is gone.

    Example::

        record = probe("resu", LlamaConfig(width=128, heads=4, vocab=512, seq=64, layers=2), torch.device("cpu"))
    """
    record = {"layers": config.layers}
    began = time.perf_counter()
    if device.type == "cuda":
        synchronize(device)
        record["allocated_before_bytes"] = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    model = build(variant, config, device, group_size)
    model.train()
    if device.type == "cuda":
        synchronize(device)
        record["build_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    record["build_s"] = round(time.perf_counter() - began, 2)
    record.update(parameter_counts(model))
    optimizer = optimizer_for(model, device)
    x, y = token_batch(config, device)
    state = {}

    def read_state_bytes():  # CPU estimate: after the last step, before zero_grad drops the grads
        state["bytes"] = rt.memory_report(model, optimizer).total.total

    losses = []
    for i in range(TRAIN_STEPS):
        last = i == TRAIN_STEPS - 1 and device.type != "cuda"
        losses.append(train_step(model, optimizer, x, y, read_state_bytes if last else None))
    synchronize(device)
    if device.type == "cuda":
        record["peak_bytes"] = torch.cuda.max_memory_allocated(device)
    else:
        record["state_bytes"] = state["bytes"]
        record["activation_bytes"] = activation_bytes(config, config.layers)
        record["peak_bytes"] = state["bytes"] + record["activation_bytes"]
    record["loss_first"], record["loss_last"] = losses[0].item(), losses[-1].item()
    if timed_steps and (budget_bytes is None or record["peak_bytes"] <= budget_bytes):
        times = []
        for _ in range(timed_steps):
            synchronize(device)
            start = time.perf_counter()
            train_step(model, optimizer, x, y)
            synchronize(device)
            times.append(time.perf_counter() - start)
        record.update(step_ms=1e3 * statistics.median(times), step_ms_all=[round(1e3 * t, 3) for t in times],
                      tokens_per_s=config.seq / statistics.median(times))
    record["probe_s"] = round(time.perf_counter() - began, 2)
    return record


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def safe_probe(variant: str, config: LlamaConfig, device: torch.device, budget_bytes: Optional[int],
               timed_steps: int, group_size: int = QRESU_GROUP) -> dict:
    """:func:`probe`, with out-of-memory turned into ``ok: False`` and every tensor freed after.
    ``ok``: the model trained, and (where ``budget_bytes`` is given) its peak fits it."""
    try:
        record = probe(variant, config, device, timed_steps, group_size, budget_bytes)
        record["ok"] = budget_bytes is None or record["peak_bytes"] <= budget_bytes
        if not record["ok"]:
            record["over_budget"] = True
    except torch.OutOfMemoryError as exc:
        record = {"layers": config.layers, "ok": False, "oom": True, "error": str(exc).splitlines()[0][:300]}
    release(device)  # the failed probe's frames (model, optimizer, graph) are gone by now
    if device.type == "cuda":
        record["allocated_after_bytes"] = torch.cuda.memory_allocated(device)
    return record


# --------------------------------------------------------------------------- the search
def affine_fit(points: dict) -> tuple[float, float]:
    """Least-squares (a, b) of peak = a + b·L over ``points`` {L: peak}, at least two distinct L."""
    if len(points) < 2:
        raise ValueError(f"an affine fit needs peaks at two or more layer counts, got {sorted(points)}")
    xs, ys = list(points), list(points.values())
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return mean_y - b * mean_x, b


def predict_layers(points: dict, budget_bytes: float) -> Optional[int]:
    """The largest L within ``budget_bytes`` on the line through the peaks of the two largest L in
    ``points`` (the nearest to the boundary, so a slightly curved memory is followed); None when
    memory does not grow with L there."""
    largest_two = dict(sorted(points.items())[-2:])
    a, b = affine_fit(largest_two)
    if b <= 0:
        return None
    return math.floor((budget_bytes - a) / b)


@dataclass
class SearchResult:
    largest: Optional[int]  # the largest L that trained (None: not even the smallest probed)
    confirmed: bool  # largest + 1 was probed and failed (or largest is the cap)
    fit: Optional[tuple]  # (a, b) of the least-squares line over every peak
    predicted: Optional[int]  # the first prediction, from the fit points
    probes: list  # (L, ok, peak or None) in probe order


def search_largest(fits: Callable[[int], tuple[bool, Optional[float]]], budget_bytes: float,
                   fit_layers=FIT_LAYERS, max_layers: Optional[int] = None, max_probes: int = 5) -> SearchResult:
    """Largest L with ``fits(L)`` true, for a memory that grows nearly affinely with L.

    ``fits(L)`` trains a model of L blocks and returns (trained, peak bytes or None). The peaks at
    ``fit_layers`` give the first prediction (:func:`predict_layers`); each later probe is the
    prediction through the two largest L that trained, kept strictly between the largest L that
    trained and the smallest that did not. When the prediction points at or past a failure (no new
    peak moved it), the search backs off from the failure by 1, 2, 4, ... layers instead. It ends
    with L trained and L + 1 not (``confirmed``), at ``max_layers``, or after ``max_probes``
    probes past the fit points (then ``largest`` is the largest L seen to train).

    Example::

        result = search_largest(lambda L: (10 + 3 * L <= 100, 10 + 3 * L), budget_bytes=100)
        assert result.largest == 30 and result.confirmed
    """
    if len(set(fit_layers)) < 2 or min(fit_layers) < 1:
        raise ValueError(f"fit_layers must hold two or more distinct layer counts ≥ 1, got {fit_layers}")
    if max_layers is not None and max_layers < 1:
        raise ValueError(f"max_layers must be ≥ 1 or None, got {max_layers}")
    probes, peaks, cache = [], {}, {}

    def run(layers: int) -> bool:
        if layers not in cache:
            ok, peak = fits(layers)
            cache[layers] = ok
            probes.append((layers, ok, peak))
            if ok and peak is not None:
                peaks[layers] = peak
        return cache[layers]

    def result(largest, confirmed, predicted):
        return SearchResult(largest, confirmed, affine_fit(peaks) if len(peaks) >= 2 else None, predicted, probes)

    fit_layers = sorted(set(fit_layers) if max_layers is None else {min(L, max_layers) for L in fit_layers})
    for layers in fit_layers:
        run(layers)
    lowest_fail = min((L for L, ok in cache.items() if not ok), default=None)
    if lowest_fail is not None:  # a fit point already fails: step down from it
        while lowest_fail > 1 and not run(lowest_fail - 1):
            lowest_fail -= 1
        return result(lowest_fail - 1 if lowest_fail > 1 else None, True, None)
    predicted = predict_layers(peaks, budget_bytes) if len(peaks) >= 2 else None
    first_prediction, back_off = predicted, 1
    for _ in range(max_probes):
        trained = max(L for L, ok in cache.items() if ok)
        failed = min((L for L, ok in cache.items() if not ok), default=None)
        if failed == trained + 1 or trained == max_layers:
            break
        low, high = trained + 1, (failed - 1 if failed is not None else max_layers)
        if predicted is None:
            target = low
        elif failed is not None and predicted >= failed:
            target, back_off = failed - back_off, 2 * back_off
        else:
            target = predicted
        target = max(low, target if high is None else min(high, target))
        if run(target):
            back_off = 1
            predicted = predict_layers(peaks, budget_bytes) if len(peaks) >= 2 else None
    trained = max(L for L, ok in cache.items() if ok)
    failed = min((L for L, ok in cache.items() if not ok), default=None)
    return result(trained, failed == trained + 1 or trained == max_layers, first_prediction)


# --------------------------------------------------------------------------- the run
class Recorder:
    """The results dict, rewritten to ``path`` after every change (a cut-off run keeps its probes)."""

    def __init__(self, path: Path, results: dict):
        self.path, self.results, self.started = path, results, time.perf_counter()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.path.write_text(json.dumps(self.results, indent=1, default=str) + "\n")


def budget_for(args, device: torch.device) -> dict:
    """The memory budget of the search and how each probe is judged on this device."""
    if args.memory_gib is not None:
        budget = int(args.memory_gib * GIB)
        return {"budget_bytes": budget, "fit_budget_bytes": budget, "judge_bytes": budget,
                "budget_source": f"--memory-gib {args.memory_gib:g} (pretend card size)"}
    if device.type != "cuda":
        raise SystemExit("--device cpu needs --memory-gib (a pretend budget for the dry run)")
    total = torch.cuda.mem_get_info(device)[1]
    return {"budget_bytes": total, "fit_budget_bytes": int(total * (1 - MARGIN)), "judge_bytes": None,
            "budget_source": f"torch.cuda.mem_get_info total, fit against {1 - MARGIN:.0%} of it"}


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return ("torch.cuda.max_memory_allocated over build + 3 steps (stats reset before the build); "
                "a probe fails on torch.OutOfMemoryError (or, with --memory-gib, a peak over that budget)")
    return ("estimate: rt.memory_report total (weights, masks, grads, AdamW state) after the last of 3 steps, "
            "before zero_grad, + activation_bytes(config, L) (checkpointed block inputs, one recomputed block, "
            "logits); a probe fails when the estimate exceeds --memory-gib")


def search_variant(variant: str, args, base: LlamaConfig, device: torch.device, budget: dict,
                   recorder: Recorder, deadline: float) -> dict:
    """Probe ``variant`` until its largest L is found; every probe lands in the JSON at once."""
    entry = {"variant": variant, "label": VARIANTS[variant], "probes": []}
    recorder.results["variants"].append(entry)
    records = {}

    def fits(layers: int):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"--time-budget-s {args.time_budget_s} spent before probing L={layers}")
        config = dataclasses.replace(base, layers=layers)
        timed = args.timed_steps if layers > max(FIT_LAYERS) else 0  # the fit points are not candidates
        record = safe_probe(variant, config, device, budget["judge_bytes"], timed, args.group_size)
        records[layers] = record
        entry["probes"].append(record)
        recorder.save()
        peak = record.get("peak_bytes")
        status = "ok " if record["ok"] else ("OOM" if record.get("oom") else "over")
        peak_text = f"{size(peak):>11s}" if peak is not None else f"{'-':>11s}"
        speed = f"  {record['tokens_per_s']:9,.0f} tok/s" if "tokens_per_s" in record else ""
        build = f"  build {record['build_s']:.1f}s" if "build_s" in record else ""
        print(f"  [{recorder.elapsed():6.1f}s] {variant:7s} L={layers:3d} {status} {peak_text}"
              f"{speed}{build}", flush=True)
        return record["ok"], peak if record["ok"] else None

    try:
        result = search_largest(fits, budget["fit_budget_bytes"], max_layers=args.max_layers,
                                max_probes=args.max_probes)
    except TimeoutError as exc:  # keep the largest timed L that trained, unconfirmed
        entry["error"] = str(exc)
        print(f"  {variant}: {exc}", flush=True)
        timed = [r for r in records.values() if r["ok"] and "tokens_per_s" in r]
        if timed:
            best = max(timed, key=lambda r: r["layers"])
            entry.update(largest_layers=best["layers"], confirmed=False, largest=best)
        recorder.save()
        return entry
    except Exception as exc:  # a library failure: keep the other variants going
        entry["error"] = f"{type(exc).__name__}: {exc}"[:500]
        entry["traceback"] = traceback.format_exc()[-3000:]
        print(f"  {variant}: ERROR {entry['error']}", flush=True)
        return entry
    entry.update(largest_layers=result.largest, confirmed=result.confirmed, predicted_layers=result.predicted,
                 fit_bytes={"a": result.fit[0], "b_per_layer": result.fit[1]} if result.fit else None)
    fit = f"peak ≈ {size(result.fit[0])} + {size(result.fit[1])}·L, " if result.fit else ""
    print(f"  {variant}: {fit}first prediction L={result.predicted}, largest L={result.largest}"
          f"{'' if result.confirmed else ' (unconfirmed)'}", flush=True)
    if result.largest is not None:
        best = records[result.largest]
        if "tokens_per_s" not in best and time.perf_counter() < deadline:  # L_max was a fit point: time it
            best = safe_probe(variant, dataclasses.replace(base, layers=result.largest), device,
                              budget["judge_bytes"], args.timed_steps, args.group_size)
            entry["probes"].append(best)
        entry["largest"] = best
    recorder.save()
    return entry


def common_layer_speeds(args, base: LlamaConfig, device: torch.device, budget: dict, recorder: Recorder,
                        deadline: float) -> None:
    """Tokens/s of every variant at one L all of them fit (dense's largest unless --common-layers):
    a search probe already timed at that L is reused, the others are timed now."""
    entries = [e for e in recorder.results["variants"] if e.get("largest_layers")]
    if not entries:
        return
    layers = args.common_layers or min(e["largest_layers"] for e in entries)
    rows = []
    recorder.results["common"] = {"layers": layers, "rows": rows}
    for entry in entries:
        timed = next((p for p in entry["probes"] if p["layers"] == layers and "tokens_per_s" in p), None)
        if timed is None:
            if time.perf_counter() > deadline:
                rows.append({"variant": entry["variant"], "skipped": "time budget spent"})
                continue
            timed = safe_probe(entry["variant"], dataclasses.replace(base, layers=layers), device,
                               budget["judge_bytes"], args.timed_steps, args.group_size)
            timed["source"] = "common-L probe"
        else:
            timed = {**timed, "source": "search probe at this L"}
        rows.append({"variant": entry["variant"], **timed})
        recorder.save()
    dense = next((r for r in rows if r["variant"] == "dense" and "tokens_per_s" in r), None)
    for row in rows:
        if dense is not None and "tokens_per_s" in row:
            row["tokens_per_s_vs_dense"] = row["tokens_per_s"] / dense["tokens_per_s"]


def summarize(results: dict) -> list:
    """The results table: per variant at its largest L, with ratios to dense's largest model."""
    table = []
    for entry in results["variants"]:
        best = entry.get("largest")
        if best is None or "tokens_per_s" not in best:
            table.append({"variant": entry["variant"], "largest_layers": entry.get("largest_layers"),
                          "error": entry.get("error", "no timed probe at the largest L")})
            continue
        table.append({"variant": entry["variant"], "largest_layers": best["layers"],
                      "confirmed": entry["confirmed"] and "error" not in entry, "parameters": best["parameters"],
                      "block_linear_parameters": best["block_linear_parameters"],
                      "block_linear_trainable": best["block_linear_trainable"],
                      "peak_gib": best["peak_bytes"] / GIB, "tokens_per_s": best["tokens_per_s"]})
    dense = next((r for r in table if r["variant"] == "dense" and "tokens_per_s" in r), None)
    for row in table:
        if dense is not None and "tokens_per_s" in row:
            row["parameters_vs_dense"] = row["parameters"] / dense["parameters"]
            row["tokens_x_parameters_vs_dense"] = (row["tokens_per_s"] * row["parameters"]
                                                   / (dense["tokens_per_s"] * dense["parameters"]))
    rows = {r["variant"]: r for r in table}
    goals = {}
    resu, qresu = rows.get("resu", {}), rows.get("qresu4", {})
    if "parameters_vs_dense" in resu:
        goals["resu"] = {"goal": GOALS["resu"], "met": resu["parameters_vs_dense"] >= 1.5
                         and resu["tokens_x_parameters_vs_dense"] >= 0.9}
    if "parameters_vs_dense" in qresu:
        goals["qresu4"] = {"goal": GOALS["qresu4"],
                           "met": qresu["parameters_vs_dense"] > resu.get("parameters_vs_dense", 1.5)
                           and qresu["tokens_x_parameters_vs_dense"] >= 0.9}
    results["goals"] = goals
    return table


def count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def print_table(results: dict) -> None:
    print(f"\n{'variant':15s} {'L':>4s} {'params':>9s} {'×dense':>7s} {'peak':>11s} {'tokens/s':>10s} "
          f"{'tok/s×params ×dense':>20s}")
    for r in results["table"]:
        if "error" in r:
            print(f"{VARIANTS[r['variant']]:15s} {'-' if r['largest_layers'] is None else r['largest_layers']:>4} "
                  f"{r['error'][:90]}")
            continue
        ratio = f"{r['parameters_vs_dense']:7.2f}" if "parameters_vs_dense" in r else f"{'-':>7s}"
        work = f"{r['tokens_x_parameters_vs_dense']:20.2f}" if "tokens_x_parameters_vs_dense" in r else f"{'-':>20s}"
        mark = "" if r["confirmed"] else " (unconfirmed)"
        print(f"{VARIANTS[r['variant']]:15s} {r['largest_layers']:4d} {count(r['parameters']):>9s} {ratio} "
              f"{size(r['peak_gib'] * GIB):>11s} {r['tokens_per_s']:10,.0f} {work}{mark}")
    common = results.get("common")
    if common:
        speeds = "  ".join(f"{r['variant']} {r['tokens_per_s']:,.0f}"
                           + (f" ({r['tokens_per_s_vs_dense']:.2f}×)" if "tokens_per_s_vs_dense" in r else "")
                           for r in common["rows"] if "tokens_per_s" in r)
        print(f"at L={common['layers']} (every variant fits): tokens/s {speeds}")
    for variant, goal in results.get("goals", {}).items():
        print(f"goal {VARIANTS[variant]}: {goal['goal']}: {'met' if goal['met'] else 'NOT met'}")


def header(args, base: LlamaConfig, device: torch.device, budget: dict) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"benchmark": "largest Llama-shaped model one device trains (bf16, AdamW, checkpointed blocks)",
            "device": device_name(device), "device_type": device.type, "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "config": {**dataclasses.asdict(base), "layers": "searched", "mlp": base.mlp, "batch": 1,
                       "tokens_per_step": base.seq, "dtype": "bfloat16 weights, grads and AdamW state",
                       "sparsity": SPARSITY, "qresu_group_size": args.group_size,
                       "optimizer": "torch.optim.AdamW(lr=1e-4), " + ("fused=True" if device.type == "cuda"
                                                                      else "foreach=True"),
                       "activation_checkpointing": "every block, use_reentrant=False",
                       "converted": "block linears (q, k, v, o, gate, up, down); embedding, norms, head plain"},
            "memory_measurement": memory_method(device), **budget,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
            "search": {"fit_layers": list(FIT_LAYERS), "max_layers": args.max_layers, "max_probes": args.max_probes,
                       "untimed_steps": TRAIN_STEPS, "timed_steps": args.timed_steps,
                       "timing": "median of timed steps, torch.cuda.synchronize + time.perf_counter"},
            "started": time.strftime("%Y-%m-%d %H:%M:%S"), "variants": []}


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (a dry run on a tiny model)")
    base = LlamaConfig(vocab=args.vocab, width=args.width, heads=args.heads, kv_heads=args.kv_heads, seq=args.seq)
    budget = budget_for(args, device)
    results = header(args, base, device, budget)
    out = Path(args.out or RESULTS / f"scale_{slug(results['device'])}.json")
    recorder = Recorder(out, results)
    deadline = recorder.started + (args.time_budget_s or float("inf"))
    print(f"{results['device']}  torch {results['torch']}  d={base.width} heads={base.heads} mlp={base.mlp} "
          f"vocab={base.vocab} seq={base.seq}  budget {size(budget['fit_budget_bytes'])} "
          f"({budget['budget_source']})", flush=True)
    for variant in args.variants:
        search_variant(variant, args, base, device, budget, recorder, deadline)
    common_layer_speeds(args, base, device, budget, recorder, deadline)
    results["table"] = summarize(results)
    recorder.save()
    results["out"] = str(out)
    return results


CPU_DEFAULTS = {"width": 128, "heads": 4, "vocab": 512, "seq": 64, "memory_gib": 0.05}
CUDA_DEFAULTS = {"width": 4096, "heads": 32, "vocab": 32000, "seq": 2048, "memory_gib": None}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--width", type=int, default=None, help="model width d (default 4096; cpu 128)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 32; cpu 4)")
    parser.add_argument("--kv-heads", type=int, default=None, help="grouped KV heads (default: as many as --heads)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32000; cpu 512)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per step, batch 1 (default 2048; cpu 64)")
    parser.add_argument("--variants", nargs="+", default=["dense", "resu", "qresu4", "sparse"],
                        choices=list(VARIANTS), help="run in this order (default: the goals' variants first)")
    parser.add_argument("--max-layers", type=int, default=None, help="search no further than this many blocks")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="pretend the device has this many GiB: search against it (cpu default 0.05)")
    parser.add_argument("--group-size", type=int, default=QRESU_GROUP, help="QRESU-4 quantization group")
    parser.add_argument("--timed-steps", type=int, default=3, help="timed steps per candidate probe (median)")
    parser.add_argument("--max-probes", type=int, default=4, help="probes per variant after the two fit points")
    parser.add_argument("--common-layers", type=int, default=None,
                        help="L of the side-by-side speed comparison (default: the smallest largest L)")
    parser.add_argument("--time-budget-s", type=float, default=300,
                        help="start no probe after this many seconds (0: no limit)")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scale_<device>.json)")
    args = parser.parse_args(argv)
    for key, value in (CPU_DEFAULTS if args.device == "cpu" else CUDA_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.memory_gib is not None and args.memory_gib <= 0:
        parser.error(f"--memory-gib must be positive, got {args.memory_gib}")
    if args.max_layers is not None and args.max_layers < 1:
        parser.error(f"--max-layers must be at least 1, got {args.max_layers}")
    if args.timed_steps < 1:
        parser.error(f"--timed-steps must be at least 1, got {args.timed_steps}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda":  # set before the first CUDA allocation: probes of many sizes, less fragmentation
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    results = run(args)
    print_table(results)
    print(f"\nwrote {results['out']} ({results['elapsed_s']} s)", flush=True)
    return results


if __name__ == "__main__":
    main()

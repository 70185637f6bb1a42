"""``optimizer.step()`` of a Llama-shaped model's block weights: dense against SPARSE and RESU.

The model is ``benchmarks.scale``'s decoder (width 4096, SwiGLU MLP 11008; ``--layers`` blocks,
default 4), bf16 weights and AdamW state, ``torch.optim.AdamW(fused=True)`` as that benchmark
trains it (``--foreach``: torch's default foreach AdamW, whose in-place ops a ResuTensor runs as
bitmap update kernels). Each variant (dense ``nn.Linear``, SPARSE and RESU at s = 0.5) is built,
trained 2 steps so its state exists, given one more backward, then its ``optimizer.step()`` is timed with
``triton.testing.do_bench`` (median; the step updates the weights each time, as training does).
A ResuTensor's step runs the library's bitmap AdamW kernel over its trainable coordinates; the
dense model's runs torch's fused AdamW over every coordinate. Embeddings, norms and the head are
dense in every variant and stepped too.

Figures go under ``--label`` into the JSON file, so two checkouts can be compared (copy this file
into the other checkout's ``benchmarks/``)::

    PYTHONPATH=. python -m benchmarks.optimizer_step --label after
    cd /path/to/other/checkout && PYTHONPATH=. python -m benchmarks.optimizer_step --label before \\
        --out /path/to/benchmarks/results/optimizer_step_h100.json
"""
import argparse
import json
import pathlib
import platform

import torch

import resu_tensor as rt
from benchmarks.scale import release, trained_model

DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "optimizer_step_h100.json"
VARIANTS = ("dense", "sparse", "resu")


def foreach_adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def time_step(variant: str, layers: int, foreach: bool = False) -> dict:
    """Median ``optimizer.step()`` of ``variant`` at ``layers`` blocks, and its trainable count."""
    from triton.testing import do_bench

    device = torch.device("cuda")
    model, optimizer, x, y = trained_model(variant, layers, device, steps=2,
                                           make_optimizer=foreach_adamw if foreach else None)
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1).float(), y.flatten()).backward()
    ms = do_bench(optimizer.step, warmup=5, rep=50)
    trainable = sum(p.trainable_count if isinstance(p, rt.ResuTensor) else p.numel() for p in model.parameters())
    record = {"variant": variant, "layers": layers, "optimizer": "foreach AdamW" if foreach else "fused AdamW",
              "step_ms": ms, "trainable_coordinates": trainable}
    del model, optimizer
    release(device)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--foreach", action="store_true", help="torch's foreach AdamW instead of the fused one")
    parser.add_argument("--label", default="after", help="key of this checkout's figures in the JSON")
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.optimizer_step times CUDA kernels: it needs a GPU")
    rows = [time_step(v, args.layers, args.foreach) for v in VARIANTS]
    dense = rows[0]["step_ms"]
    for row in rows:
        row["vs_dense"] = row["step_ms"] / dense
        print(f"{args.label:8s} {row['variant']:7s} {row['step_ms']:8.3f} ms  {row['vs_dense']:.3f}× dense  "
              f"({row['trainable_coordinates']:,} trainable)", flush=True)
    out = pathlib.Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    results[args.label] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                           "python": platform.python_version(), "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()

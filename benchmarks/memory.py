"""Training-state bytes per weight element: ResuTensor (SPARSE, RESU) vs a dense nn.Linear, AdamW.

Counts the bytes each tensor actually holds after one AdamW step (weights, mask, grad, optimizer
state), so the figures are exact and device-independent. Writes benchmarks/results/memory.json.

    python -m benchmarks.memory [--out benchmarks/results/memory.json]
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt

SHAPE = (4096, 4096)
SPARSITIES = [0.01, 0.05, 0.5, 0.7, 0.9, 0.95, 0.99]


def bytes_per_element(model: nn.Linear, mode: str) -> dict[str, float]:
    opt = torch.optim.AdamW([model.weight], lr=1e-3)
    F.linear(torch.randn(2, SHAPE[1]), model.weight).sum().backward()
    opt.step()
    row = rt.memory_report(model, opt).layers[0]
    numel = model.weight.numel()
    return {
        "mode": mode,
        "weight_store": (row.weights + row.mask) / numel,
        "mask": row.mask / numel,
        "weight_grad_adamw": row.total / numel,
    }


def run() -> dict:
    torch.manual_seed(0)
    results = {"shape": list(SHAPE), "dtype": "float32", "optimizer": "AdamW", "rows": []}
    dense = nn.Linear(*SHAPE[::-1], bias=False)
    results["dense"] = bytes_per_element(dense, "plain")
    for sparsity in SPARSITIES:
        for mode in ("sparse", "resu"):
            layer = nn.Linear(*SHAPE[::-1], bias=False)
            quantize_(layer, rt.resu_config(sparsity=sparsity))
            if mode == "resu":
                layer.weight.enter_resu()
            results["rows"].append({"sparsity": sparsity, **bytes_per_element(layer, mode)})
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "memory.json"))
    args = parser.parse_args(argv)
    results = run()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"dense AdamW: {results['dense']['weight_grad_adamw']:.3f} bytes/element")
    print("sparsity  mode    store  mask   weight+grad+AdamW  (bytes/element)")
    for r in results["rows"]:
        print(f"{r['sparsity']:<8}  {r['mode']:<6}  {r['weight_store']:.3f}  {r['mask']:.4f}  {r['weight_grad_adamw']:.3f}")
    return results


if __name__ == "__main__":
    main()

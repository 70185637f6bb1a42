"""Host time of a whole training step (forward, backward, AdamW step) on a model so small that
the arithmetic is negligible: what a step costs in Python and dispatch for plain nn.Linear weights
and for ResuTensor weights in SPARSE, RESU and QRESU-4 mode, with AdamW on its foreach and fused
paths (CPU, one thread).

Two 64×64 linears, batch 8, sparsity 0.5. Per (variant, AdamW path): 20 warm-up steps, then the
median over ``--repeats`` repeats of the mean step time over 50 steps. Runs against whichever
``resu_tensor`` is importable and appends its figures under ``--label`` to the JSON file, so two
checkouts can be compared on one machine by alternating invocations:

    PYTHONPATH=. python -m benchmarks.host_step --label after
    cd /path/to/other/checkout && PYTHONPATH=. python /path/to/benchmarks/host_step.py --label before \
        --out /path/to/benchmarks/results/host_step_cpu.json
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import time

import torch
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt

WIDTH, BATCH, SPARSITY, WARMUP, STEPS = 64, 8, 0.5, 20, 50
VARIANTS = ("plain", "sparse", "resu", "qresu4")
PATHS = ("foreach", "fused")
DEFAULT_OUT = pathlib.Path(__file__).resolve().parent / "results" / "host_step_cpu.json"


def make_model(variant: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH))
    if variant != "plain":
        quantize_(model, rt.resu_config(sparsity=0.0))
        rt.prune_(model, SPARSITY)
        if variant != "sparse":
            rt.enter_resu_(model, **({"quantize_bits": 4} if variant == "qresu4" else {}))
    return model


def step_ms(variant: str, path: str, repeats: int) -> float:
    model = make_model(variant)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, **({"fused": True} if path == "fused" else {"foreach": True}))
    x = torch.randn(BATCH, WIDTH)

    def step():
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(STEPS):
            step()
        times.append((time.perf_counter() - start) / STEPS * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="key under which this run's figures are appended")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    figures = {f"{variant} {path}": round(step_ms(variant, path, args.repeats), 4)
               for variant in VARIANTS for path in PATHS}
    results = json.loads(args.out.read_text()) if args.out.exists() else {
        "what": __doc__.split("\n\n")[0].replace("\n", " "), "unit": "ms per step (median of repeats)",
        "torch": torch.__version__, "machine": platform.machine(), "cpu_count": os.cpu_count(), "runs": {}}
    results["runs"].setdefault(args.label, []).append({"loadavg": os.getloadavg(), "step_ms": figures})
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({args.label: figures}, indent=2))


if __name__ == "__main__":
    main()

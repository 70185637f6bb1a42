"""Where a training step of ``benchmarks.scale``'s decoder spends its time: wall clock against GPU
kernel time, per variant (dense ``nn.Linear``, SPARSE, RESU, QRESU-4 at s = 0.5).

Per variant, a fresh model of ``--layers`` blocks (width 4096, batch 1 × 2048 tokens, bf16,
fused AdamW, every block checkpointed, as in ``benchmarks.scale``) trains 3 steps, then 5 steps
are timed (median wall clock, synchronized), then ``torch.profiler`` records 2 more. ``gpu_ms`` is
the sum of the CUDA kernels' self time per step; ``kernels`` lists the 25 largest (name, ms per
step, launches per step) and ``ops`` the 30 CPU ops with the most device time under them. Where
``step_ms`` exceeds ``gpu_ms`` the GPU waits for the host (the profiler's own overhead inflates
``gpu_ms`` a little).

    python -m benchmarks.scale_profile --layers 8 --out benchmarks/results/scale_profile_h100.json
"""
import argparse
import json
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.scale import VARIANTS, release, train_step, trained_model

PROFILED_STEPS = 2


def profile_variant(variant: str, layers: int) -> dict:
    device = torch.device("cuda")
    model, optimizer, x, y = trained_model(variant, layers, device, steps=3)
    times = []
    for _ in range(5):
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, optimizer, x, y)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(PROFILED_STEPS):
            train_step(model, optimizer, x, y)
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: -e.self_device_time_total)
    ops = sorted((e for e in events if e.device_type.name == "CPU"), key=lambda e: -e.device_time_total)
    per_step = 1e3 * PROFILED_STEPS  # profiler times are µs over all profiled steps
    record = {"step_ms": 1e3 * statistics.median(times),
              "gpu_ms": sum(e.self_device_time_total for e in kernels) / per_step,
              "kernels": [(e.key[:110], round(e.self_device_time_total / per_step, 3), e.count // PROFILED_STEPS)
                          for e in kernels[:25]],
              "ops": [(e.key[:80], round(e.device_time_total / per_step, 3), e.count // PROFILED_STEPS)
                      for e in ops[:30]]}
    del model, optimizer
    release(device)
    return record


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--variants", nargs="+", default=["dense", "sparse", "resu", "qresu4"], choices=list(VARIANTS))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.scale_profile profiles CUDA kernels: it needs a GPU")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": args.layers}
    for variant in args.variants:
        record = results[variant] = profile_variant(variant, args.layers)
        print(f"{variant:7s} step {record['step_ms']:8.2f} ms  GPU kernels {record['gpu_ms']:8.2f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()

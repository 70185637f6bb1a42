"""Where the host time of a training step goes: the GPT-2-small-shaped model of
``benchmarks.model`` at batch 1 × 32 tokens (too little arithmetic for the GPU to set the pace),
per variant (plain nn.Linear, SPARSE, RESU, QRESU-4; s = 0.5, bf16 autocast, foreach AdamW).

Per variant, after the warm-up steps: the mean time of 10 steps, then torch.profiler's op counts
and self-time table over 5 steps, then cProfile's top functions over 10 steps (by own time and by
cumulative time). A text report, not JSON: it explains a host-time figure of
``benchmarks.model``; that benchmark's JSON holds the figures themselves.

    python -m benchmarks.host_profile --out benchmarks/results/host_profile_h100.txt
    python -m benchmarks.host_profile --device cpu --preset tiny --out /tmp/host_profile_cpu.txt
"""
import argparse
import collections
import cProfile
import dataclasses
import io
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import model as bench
from benchmarks.distributed import PRESETS, synchronize

VARIANTS = ("plain", "sparse", "resu", "qresu4")


def report(variant: str, args, config, device: torch.device, steps: int = 10) -> str:
    """``args``: benchmarks.model's settings (sparsity, group size, warm-up, AdamW path, bf16)."""
    step = bench._warm_step(variant, args, config, device, batch=1)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    ms = (time.perf_counter() - start) * 1e3 / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            step()
        synchronize(device)
    counts = collections.Counter(e.name for e in prof.events())
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    synchronize(device)
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(45)
    lines = [f"==== {variant}: {ms:.2f} ms/step; ops per step {sum(counts.values()) / 5:.0f}"]
    lines += [f"  {c / 5:7.1f} {name}" for name, c in counts.most_common(40)]
    return "\n".join(lines) + "\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=35) \
        + text.getvalue()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--preset", default="gpt2-small", choices=sorted(PRESETS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    # the model benchmark's defaults for everything else, so both measure the same step
    settings = bench.parse_args(["--device", args.device, "--preset", args.preset])
    config = dataclasses.replace(bench.model_config(settings), seq=bench.HOST_SEQ)
    device = torch.device(args.device)
    with open(args.out, "w") as out:
        for variant in args.variants:
            out.write(report(variant, settings, config, device))
            out.flush()
            print(f"{variant} done", flush=True)


if __name__ == "__main__":
    main()

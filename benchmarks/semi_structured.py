"""Inference speed of 2:4 semi-structured export vs dense F.linear (CUDA, do_bench medians).

For each weight shape and token count: a 2:4-pruned ResuTensor layer is exported with
``resu_tensor.export.to_semi_structured_`` (cuSPARSELt and CUTLASS where available) and timed
against ``F.linear`` with the same masked weight stored dense, in one process, under
``torch.inference_mode``: eager calls, and the same calls replayed from a CUDA graph (kernel time
alone, without Python and launch overhead). Reports medians, the dense/sparse ratios (> 1: 2:4 is
faster), the dense matmul floor at the reference rate and the outputs' largest
difference.
Writes benchmarks/results/semi_structured.json.

    python -m benchmarks.semi_structured [--dtype bfloat16] [--quick] [--out PATH]
"""
import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import resu_tensor as rt
from resu_tensor.export import to_semi_structured_

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
TOKENS = [1, 16, 128, 1024, 8192]
QUICK_SHAPES, QUICK_TOKENS = [(4096, 4096)], [16, 2048]
REFERENCE_TFLOPS = 745.0  # measured bf16 matmul rate of the lent H100


def backends() -> list[str]:
    return (["cusparselt"] if torch.backends.cusparselt.is_available() else []) + ["cutlass"]


def sparse_layer(weight: torch.Tensor, backend: str) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(rt.ResuTensor.from_dense(weight))
    layer.weight.prune(None, granularity="2:4")
    return to_semi_structured_(nn.Sequential(layer), backend=backend)[0]


def graphed(fn):
    """``fn`` captured in a CUDA graph, replayed: kernel time without Python / launch overhead."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.recorded_from = fn  # the graph holds raw addresses: what fn uses must live as long as it
    return graph.replay


def timings(fn) -> dict:
    """Eager median and, where the ops can be captured, the CUDA-graph median (ms)."""
    from triton.testing import do_bench

    result = {"ms": do_bench(fn, return_mode="median")}
    try:
        result["graph_ms"] = do_bench(graphed(fn), return_mode="median")
    except RuntimeError as error:
        result["graph_error"] = str(error).splitlines()[0][:300]
    return result


def bench_case(out_features: int, in_features: int, tokens: int, dtype: torch.dtype) -> dict:

    weight = torch.randn(out_features, in_features, device="cuda", dtype=dtype) * 0.02
    masked = rt.ResuTensor.from_dense(weight)
    masked.prune(None, granularity="2:4")
    dense_weight = masked.dequantize()  # M⊙W stored dense: the baseline serves the same function
    x = torch.randn(tokens, in_features, device="cuda", dtype=dtype)
    flops = 2 * tokens * in_features * out_features
    row = {"out_features": out_features, "in_features": in_features, "tokens": tokens, "flops": flops,
           "dense_floor_ms": flops / (REFERENCE_TFLOPS * 1e12) * 1e3}
    with torch.inference_mode():
        reference = F.linear(x, dense_weight)
        dense = timings(lambda: F.linear(x, dense_weight))
        row["dense_ms"], row["dense_graph_ms"] = dense["ms"], dense.get("graph_ms")
        for backend in backends():
            try:
                layer = sparse_layer(weight, backend)
                y = layer(x)
                sparse = timings(lambda: layer(x))
            except (RuntimeError, ValueError) as error:  # a kernel that refuses this device or shape
                row[backend] = {"error": str(error).splitlines()[0][:300]}
                continue
            sparse["dense_over_sparse"] = row["dense_ms"] / sparse["ms"]
            if "graph_ms" in sparse and row["dense_graph_ms"]:
                sparse["graph_dense_over_sparse"] = row["dense_graph_ms"] / sparse["graph_ms"]
            sparse["max_abs_diff"] = (y.float() - reference.float()).abs().max().item()
            row[backend] = sparse
    return row


def run(dtype: torch.dtype, quick: bool) -> dict:
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.semi_structured needs a CUDA GPU (2:4 sparse tensor cores, compute "
                         "capability >= 8.0)")
    torch.manual_seed(0)
    shapes, tokens = (QUICK_SHAPES, QUICK_TOKENS) if quick else (SHAPES, TOKENS)
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "dtype": str(dtype).split(".")[1], "backends": backends(),
               "timing": "triton.testing.do_bench median ms, torch.inference_mode; graph_ms: the same call "
                         "replayed from a CUDA graph (kernel time without Python/launch overhead)",
               "baseline": "F.linear with the same 2:4-masked weight stored dense", "rows": []}
    for out_features, in_features in shapes:
        for n in tokens:
            row = bench_case(out_features, in_features, n, dtype)
            results["rows"].append(row)
            sparse = "  ".join(f"{b} {row[b]['ms']:.4f} ms ({row[b]['dense_over_sparse']:.2f}x), "
                               f"graph {row[b].get('graph_ms', 0):.4f} ms" if "ms" in row[b] else f"{b} error"
                               for b in results["backends"])
            print(f"{out_features:>6}x{in_features:<6} tokens {n:>5}: dense {row['dense_ms']:.4f} ms "
                  f"(graph {row['dense_graph_ms'] or 0:.4f})  {sparse}")
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--quick", action="store_true", help="one shape, two token counts")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "semi_structured.json"))
    args = parser.parse_args(argv)
    results = run(getattr(torch, args.dtype), args.quick)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()

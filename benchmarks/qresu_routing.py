"""Where the QRESU fused small-M kernels beat W_eff + cuBLAS: forward and dX at 1–32 tokens, as
CUDA-graph replays (GPU time), for the layer shapes and sparsities of ``benchmarks.layers``.
``kernels.quant.FUSED_FORWARD_TOKENS`` / ``FUSED_GRAD_INPUT_TOKENS`` come from this; the fused dX
kernel, which the library does not route to, is in ``benchmarks.kernels_unrouted``.

    python -m benchmarks.qresu_routing [--out benchmarks/results/qresu_routing_<gpu>.json]
"""
import argparse
import json

import torch


def run() -> list:
    from benchmarks.layers import Bench
    from resu_tensor import kernels
    from benchmarks import kernels_unrouted
    from resu_tensor.kernels import quant_triton as qt
    from resu_tensor.core.mask_encoding import prefix_block_size
    from resu_tensor.core.qresu import quantize_active

    bench = Bench(quick=False)

    def graph_us(fn) -> float:  # GPU time of one call (do_bench_cudagraph), in µs
        return bench.graph_ms(fn) * 1e3

    records = []
    for rows, cols in ((4096, 4096), (11008, 4096), (4096, 11008)):
        for sparsity, theta_dtype in ((0.5, torch.bfloat16), (0.9, torch.bfloat16), (0.5, torch.float32)):
            torch.manual_seed(0)
            keep = torch.rand(rows, cols, device="cuda") >= sparsity
            weight = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
            qdata, qscale, qoffset = quantize_active(weight, keep, 4, 64)
            bitmap = kernels.pack_bitmap(keep.reshape(-1))
            block_size = prefix_block_size(cols)
            prefix = kernels.block_prefix_counts(keep.reshape(-1), block_size)
            theta = torch.randn(int((~keep).sum()), device="cuda", dtype=theta_dtype)
            tiles = kernels.bitmap_tile_prefix(bitmap, rows, cols, kernels.PREFIX_TILE, True)
            args = (qdata, qscale, qoffset, 4, 64, cols, bitmap, prefix, block_size, theta)
            for tokens in (1, 2, 4, 8, 16, 32):
                x = torch.randn(tokens, cols, device="cuda", dtype=torch.bfloat16)
                g = torch.randn(tokens, rows, device="cuda", dtype=torch.bfloat16)
                record = dict(rows=rows, cols=cols, s=sparsity, theta=str(theta_dtype), m=tokens)
                record["fwd_fused"] = graph_us(lambda: qt.fused_linear(x, *args, tile_prefix=tiles))
                record["fwd_weff_mm"] = graph_us(lambda: x @ qt.effective_weight(*args[:6], x.dtype, *args[6:]).t())
                record["dx_fused"] = graph_us(lambda: kernels_unrouted.fused_grad_input(g, *args, tile_prefix=tiles))
                record["dx_weff_mm"] = graph_us(lambda: qt.grad_input_small_m(g, *args))
                record["dense_fwd"] = graph_us(lambda: x @ weight.t())
                print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in record.items()}),
                      flush=True)
                records.append(record)
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/qresu_routing_<gpu>.json)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.qresu_routing needs a CUDA GPU (it times Triton kernels)")
    records = run()
    gpu = torch.cuda.get_device_name().split()[1].lower()
    out = args.out or f"benchmarks/results/qresu_routing_{gpu}.json"
    with open(out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "unit": "us",
                   "records": records}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

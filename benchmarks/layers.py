"""Layer speed and memory on a GPU: dense nn.Linear vs ResuTensor SPARSE / RESU / QRESU-4.

One process, bf16, ``triton.testing.do_bench`` medians, dense and ours side by side:

* training steps (fwd + bwd + AdamW) at M=8192 tokens for 4096→4096 and 4096→11008 at sparsity
  0.5 and 0.9: dense ``nn.Linear`` with fused AdamW vs the library (``quantize_`` +
  ``rt.enter_resu_``, stock ``torch.optim.AdamW``, default foreach and ``fused=True``), and the same steps with the fused Triton
  weight-gradient kernel of ``benchmarks.kernels_unrouted`` registered instead of the library's
  dense-matmul-then-gather; the floor (three
  matmuls at the bf16 matmul rate measured here) and peak memory of one step;
* the small shape (M=32, 512→256), eager, under ``torch.compile``, and with the whole step
  captured in one CUDA graph;
* decode forwards at M=1 and M=16: dense ``F.linear`` vs QRESU (bf16 θ and float32 θ), through
  the library and through the fused small-M kernel directly, each eager (host overhead included)
  and as CUDA-graph replays (GPU time alone);
* torchao NF4 (frozen weight) fwd+bwd and M=1 forward, where torchao has it;
* the kernels alone (weight-gradient compaction variants, W_eff, gather/scatter).

Every case runs in its own try/except: a failure is recorded as an error string in the JSON and
the run goes on. Writes JSON with every figure and the ratios, prints a table.

    python -m benchmarks.layers [--out benchmarks/results/<gpu>.json] [--quick] [--sections decode ...]
"""
import argparse
import gc
import json
import platform
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TOKENS = 8192
SHAPES = [(4096, 4096), (4096, 11008)]  # (in_features, out_features)
SPARSITIES = [0.5, 0.9]
SMALL = (32, 512, 256)  # (tokens, in, out)
DECODE_TOKENS = [1, 16]
# θ of GPT-2 small's 48 linear weights at s=0.5 (12 × attention in/out, MLP in/out): one optimizer
# step over many parameters, the multi-tensor path of the flat AdamW kernel
MANY_THETA = [768 * 2304 // 2, 768 * 768 // 2, 768 * 3072 // 2, 3072 * 768 // 2] * 12
GROUP_SIZE = 128
DTYPE = torch.bfloat16
BUDGET_S = 270  # optional cases are skipped once this much time has passed
COMPILE_BACKEND = "inductor"  # the CPU smoke test uses "aot_eager" (no C++ builds)
DEVICE = "cuda"  # the CPU smoke test (tests/test_kernels_benchmark.py) swaps in "cpu" and tiny shapes


class Bench:
    def __init__(self, quick: bool):
        self.records = []
        self.start = time.time()
        self.quick = quick
        from triton.testing import do_bench

        self._do_bench = do_bench

    def time_ms(self, fn) -> float:
        warmup, rep = (5, 20) if self.quick else (25, 100)
        return float(self._do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def graph_ms(self, fn) -> float:
        """GPU time of ``fn`` alone: median of CUDA-graph replays (``do_bench_cudagraph``), so
        the host's Python and launch overhead, which eager ``time_ms`` includes, is not counted."""
        if not _on_gpu():
            return self.time_ms(fn)
        from triton.testing import do_bench_cudagraph

        fn()  # autotune and fill caches outside the capture
        return float(do_bench_cudagraph(fn, rep=20 if self.quick else 100, return_mode="median"))

    def over_budget(self) -> bool:
        return time.time() - self.start > BUDGET_S

    def case(self, section: str, name: str, fn, optional: bool = False, **info) -> dict:
        """Run one measurement ``fn() -> dict``; record its figures or its error."""
        record = {"section": section, "name": name, **info}
        if optional and self.over_budget():
            record["error"] = f"skipped: past the {BUDGET_S}s time budget"
        else:
            began = time.time()
            try:
                record.update(fn())
            except Exception as exc:  # keep going: the JSON says what failed and why
                record["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                record["traceback"] = traceback.format_exc()[-2000:]
            record["wall_s"] = round(time.time() - began, 2)
            _release()
        self.records.append(record)
        status = record.get("error") or f"{record.get('ms', float('nan')):.4f} ms"
        print(f"  [{time.time() - self.start:6.1f}s] {section:8s} {name:46s} {status}", flush=True)
        return record


def _on_gpu() -> bool:
    return DEVICE == "cuda"


def _sync():
    if _on_gpu():
        torch.cuda.synchronize()


def _release(collect: bool = False):
    """Hand freed memory back between cases (refcounting frees a case's tensors; a full
    ``gc.collect`` is slow in a big process, so it runs only between sections)."""
    if collect:
        gc.collect()
    if _on_gpu():
        torch.cuda.empty_cache()


def _peak_bytes(step) -> dict:
    """Peak memory of one call of ``step`` (after warm-up, so optimizer state already exists)."""
    if not _on_gpu():
        step()
        return {}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return {"peak_bytes": peak, "peak_over_start_bytes": peak - before, "allocated_before_bytes": before}


def _timed_step(bench: Bench, step, warmup_steps: int = 2) -> dict:
    for _ in range(warmup_steps):  # compiles/autotunes the kernels, creates optimizer state
        step()
    _sync()
    figures = _peak_bytes(step)
    figures["ms"] = bench.time_ms(step)
    return figures


# --------------------------------------------------------------------------- models
def _linear(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=False, device=DEVICE, dtype=DTYPE)


def _resu_linear(in_features: int, out_features: int, mode: str, sparsity: float, theta_dtype=None) -> nn.Linear:
    import resu_tensor as rt
    from torchao.quantization import quantize_

    layer = _linear(in_features, out_features)
    quantize_(layer, rt.resu_config(sparsity=sparsity))
    if mode == "resu":
        rt.enter_resu_(layer)
    elif mode == "qresu":
        options = {"theta_dtype": theta_dtype} if theta_dtype is not None else {}
        rt.enter_resu_(layer, quantize_bits=4, group_size=GROUP_SIZE, **options)
    elif mode != "sparse":
        raise ValueError(f"unknown mode {mode!r}")
    return layer


def _train_step(layer: nn.Linear, optimizer, x: torch.Tensor, grad_out: torch.Tensor):
    def step():
        optimizer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad_out)
        optimizer.step()

    return step


def _inputs(tokens: int, in_features: int, out_features: int):
    torch.manual_seed(1)
    x = torch.randn(tokens, in_features, device=DEVICE, dtype=DTYPE, requires_grad=True)
    grad_out = torch.randn(tokens, out_features, device=DEVICE, dtype=DTYPE)
    return x, grad_out


# --------------------------------------------------------------------------- sections
def measure_matmul_rate(bench: Bench) -> float:
    """bf16 TFLOP/s of the training matmuls, as cuBLAS runs them here; returns the best."""
    best = 0.0
    for in_features, out_features in SHAPES:
        for label, (m, k, n) in {"forward": (TOKENS, in_features, out_features),
                                 "grad_input": (TOKENS, out_features, in_features),
                                 "grad_weight": (out_features, TOKENS, in_features)}.items():
            def run(m=m, k=k, n=n):
                a = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
                b = torch.randn(k, n, device=DEVICE, dtype=DTYPE)
                ms = bench.time_ms(lambda: torch.mm(a, b))
                return {"ms": ms, "tflops": 2 * m * k * n / ms / 1e9}

            record = bench.case("matmul", f"{m}x{k}x{n} ({label})", run, shape=[in_features, out_features])
            best = max(best, record.get("tflops", 0.0))
    bench.records.append({"section": "matmul", "name": "rate", "tflops": best})
    print(f"  measured bf16 matmul rate: {best:.0f} TFLOP/s", flush=True)
    return best


def measure_training(bench: Bench, rate_tflops: float, tokens: int, shapes, sparsities, section: str,
                     fused_grad: bool = True):
    from resu_tensor import kernels

    for in_features, out_features in shapes:
        info = dict(shape=[in_features, out_features], tokens=tokens)
        flops = 3 * 2 * tokens * in_features * out_features
        floor_ms = flops / (rate_tflops * 1e9) if rate_tflops else None
        bench.records.append({"section": section, "name": "floor (3 matmuls at the measured rate)", **info,
                              "ms": floor_ms, "flops": flops})

        def dense():
            layer = _linear(in_features, out_features)
            x, grad_out = _inputs(tokens, in_features, out_features)
            optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4, fused=True)
            return _timed_step(bench, _train_step(layer, optimizer, x, grad_out))

        dense_record = bench.case(section, "dense nn.Linear + fused AdamW", dense, mode="dense", **info)
        # (mode, AdamW fused=..., fused dW kernel): stock AdamW's default (foreach) and fused paths
        variants = [(mode, fused_adam, False) for fused_adam in (False, True) for mode in ("sparse", "resu", "qresu")]
        if fused_grad and kernels.HAS_TRITON:
            variants += [("sparse", True, True), ("resu", True, True)]
        for sparsity in sparsities:
            for mode, fused_adam, fused in variants:
                def resu(mode=mode, sparsity=sparsity, fused=fused, fused_adam=fused_adam):
                    layer = _resu_linear(in_features, out_features, mode, sparsity)
                    x, grad_out = _inputs(tokens, in_features, out_features)
                    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4, fused=fused_adam)
                    step = _train_step(layer, optimizer, x, grad_out)
                    if not fused:
                        return _timed_step(bench, step)
                    default = kernels.implementation("compact_weight_grad", "cuda")
                    from benchmarks import kernels_unrouted

                    kernels.register("compact_weight_grad", "cuda", kernels_unrouted.compact_weight_grad_fused)
                    try:
                        return _timed_step(bench, step)
                    finally:
                        kernels.register("compact_weight_grad", "cuda", default)

                name = (f"{mode} s={sparsity}" + (" + fused AdamW" if fused_adam else " + AdamW")
                        + (" (fused dW kernel)" if fused else ""))
                record = bench.case(section, name, resu, optional=fused, mode=mode, sparsity=sparsity,
                                    fused_grad_kernel=fused, fused_adamw=fused_adam, **info)
                _add_ratios(record, dense_record, floor_ms)
        _add_ratios(dense_record, dense_record, floor_ms)


def measure_small_compiled(bench: Bench):
    """The small shape with ``torch.compile``: the layer (forward + backward) and the AdamW step,
    the same optimizer on both sides. With fused AdamW only the step's Python compiles (torch
    never traces the fused kernel, for any tensor type); the foreach step compiles whole."""
    tokens, in_features, out_features = SMALL

    def run(layer, fused: bool):
        torch._dynamo.reset()  # every variant compiles afresh (past recompile_limit Dynamo runs eagerly)
        x, grad_out = _inputs(tokens, in_features, out_features)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4, fused=fused, foreach=not fused)
        optimizer.step = torch.compile(optimizer.step, backend=COMPILE_BACKEND)
        step = _train_step(torch.compile(layer, backend=COMPILE_BACKEND), optimizer, x, grad_out)
        return {**_timed_step(bench, step, warmup_steps=3), "optimizer_step_compiled": True}

    for fused in (True, False):
        adamw = "fused AdamW" if fused else "foreach AdamW"
        _small_cases(bench, "small_compiled", f"{adamw}, compiled", lambda layer, fused=fused: run(layer, fused),
                     fused_adamw=fused)


def _small_cases(bench: Bench, section: str, label: str, run, **tags) -> None:
    """The small shape's dense ``nn.Linear`` and its SPARSE, RESU and QRESU (s=0.5) forms, each
    measured by ``run(layer) -> figures`` and recorded as "<mode> + <label>" with its ratio to dense."""
    tokens, in_features, out_features = SMALL
    info = dict(shape=[in_features, out_features], tokens=tokens, **tags)
    dense_record = bench.case(section, f"dense nn.Linear + {label}", lambda: run(_linear(in_features, out_features)),
                              mode="dense", **info)
    for mode in ("sparse", "resu", "qresu"):
        record = bench.case(section, f"{mode} s=0.5 + {label}",
                            lambda mode=mode: run(_resu_linear(in_features, out_features, mode, 0.5)),
                            mode=mode, sparsity=0.5, **info)
        _add_ratios(record, dense_record, None)
    _add_ratios(dense_record, dense_record, None)


def measure_small_graph(bench: Bench):
    """The small shape's whole training step (zero_grad, forward, backward, AdamW) captured in one
    CUDA graph and replayed, dense and ours alike (``capturable=True``): what a loop that records
    its step pays, GPU work with no per-op host overhead."""
    from benchmarks.semi_structured import graphed  # PyTorch's whole-network capture recipe

    tokens, in_features, out_features = SMALL

    def run(layer, fused: bool, compiled: bool):
        if compiled:  # forward and backward as Inductor graphs, inside the captured step
            torch._dynamo.reset()
            layer = torch.compile(layer, backend=COMPILE_BACKEND)
        x, grad_out = _inputs(tokens, in_features, out_features)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-4, fused=fused, foreach=not fused,
                                      capturable=_on_gpu())
        step = _train_step(layer, optimizer, x, grad_out)
        replay = graphed(step) if _on_gpu() else step  # warm-up steps on a side stream, then the capture
        return {"ms": bench.time_ms(replay), "captured": _on_gpu()}

    for compiled in (False, True):
        for fused in (True, False):
            adamw = ("fused AdamW" if fused else "foreach AdamW") + (", compiled layer" if compiled else "")
            _small_cases(bench, "small_graph", f"{adamw}, one CUDA graph",
                         lambda layer, fused=fused, compiled=compiled: run(layer, fused, compiled),
                         fused_adamw=fused, compiled=compiled)


def _add_ratios(record: dict, dense: dict, floor_ms) -> None:
    if "ms" in record and "ms" in dense:
        record["vs_dense"] = record["ms"] / dense["ms"]
    if "ms" in record and floor_ms:
        record["vs_floor"] = record["ms"] / floor_ms
    if "peak_bytes" in record and "peak_bytes" in dense:
        record["peak_vs_dense"] = record["peak_bytes"] / dense["peak_bytes"]


def measure_decode(bench: Bench):
    """Each forward timed eagerly (``time_ms``: what a Python decoding loop pays per call, host
    overhead included) and as CUDA-graph replays (``graph_ms``: the GPU's time, as in a
    graph-captured decoder); ratios compare like with like."""
    from resu_tensor import kernels
    from resu_tensor.core.mask_encoding import prefix_block_size

    for in_features, out_features in SHAPES:
        for tokens in DECODE_TOKENS:
            info = dict(shape=[in_features, out_features], tokens=tokens)
            torch.manual_seed(2)
            x = torch.randn(tokens, in_features, device=DEVICE, dtype=DTYPE)
            dense_weight = _linear(in_features, out_features).weight.detach()
            dense = {timing: bench.case("decode", f"dense F.linear, {timing}", lambda timer=timer: {
                "ms": timer(lambda: F.linear(x, dense_weight))}, mode="dense", timing=timing, **info)
                for timing, timer in (("eager", bench.time_ms), ("graph", bench.graph_ms))}
            for sparsity in SPARSITIES:
                for theta_dtype in (torch.bfloat16, torch.float32):
                    theta_name = str(theta_dtype).replace("torch.", "")
                    layer = _resu_linear(in_features, out_features, "qresu", sparsity, theta_dtype)
                    w = layer.weight
                    if w.mask_kind != "bitmap":
                        raise ValueError(f"the fused kernel reads a bitmap; this mask is {w.mask_kind}")
                    args = (w.qdata, w.qscale, w.qoffset, w.quant_bits, w.group_size, in_features, w.mask_bitmap,
                            w.mask_block_prefix, prefix_block_size(in_features), w.theta)
                    tile_prefix = kernels.bitmap_tile_prefix(w.mask_bitmap, out_features, in_features,
                                                             kernels.PREFIX_TILE, True)
                    # What the forward must read at least, against the dense bf16 weight: at equal
                    # bandwidth no kernel beats this ratio (θ alone is 1.8× the dense bytes at s=0.9 in fp32).
                    bytes_vs_dense = sum(w.nbytes_breakdown().values()) / dense_weight.nbytes

                    def kernel_alone():  # the fused kernel at any token count (the library routes M > 1 to W_eff)
                        if not (kernels.HAS_TRITON and x.is_cuda):
                            return kernels.qresu_linear_small_m(x, *args, tile_prefix=tile_prefix)
                        from resu_tensor.kernels import quant_triton

                        return quant_triton.fused_linear(x, *args, tile_prefix=tile_prefix)

                    with torch.no_grad():
                        torch.testing.assert_close(kernel_alone(), F.linear(x, w.dequantize()), rtol=2e-2, atol=5e-2)
                    for path, fn in (("library F.linear", lambda layer=layer: layer(x)),
                                     ("fused small-M kernel", kernel_alone)):
                        for timing, timer in (("eager", bench.time_ms), ("graph", bench.graph_ms)):
                            def measure(fn=fn, timer=timer):
                                with torch.no_grad():
                                    return {"ms": timer(fn), "config": _tuned_config()}

                            record = bench.case("decode", f"qresu s={sparsity} θ {theta_name} ({path}, {timing})",
                                                measure, optional=path != "library F.linear", mode="qresu",
                                                sparsity=sparsity, theta_dtype=theta_name, path=path, timing=timing,
                                                weight_bytes_vs_dense=bytes_vs_dense, **info)
                            _add_ratios(record, dense[timing], None)
                    del layer, w
                    _release()


def _tuned_config():
    """The autotuner's choice for the last fused QRESU forward it tuned or ran (the word-wise kernel,
    else the byte-wise or element-wise one; None without Triton)."""
    from resu_tensor.kernels import HAS_TRITON

    if not HAS_TRITON:
        return None
    from resu_tensor.kernels import quant_triton

    configs = [getattr(kernel, "best_config", None) for kernel in (
        quant_triton._wordwise_linear_tuned, quant_triton._bytewise_linear_tuned,
        quant_triton._elementwise_linear_tuned)]
    return next((str(c) for c in configs if c is not None), None)


def _nf4_api():
    """(to_nf4, linear_nf4, module name) from whichever torchao location has them."""
    for name in ("torchao.dtypes.nf4tensor", "torchao.quantization.quantize_.workflows.nf4.nf4_tensor"):
        try:
            module = __import__(name, fromlist=["to_nf4", "linear_nf4"])
            return module.to_nf4, module.linear_nf4, name
        except (ImportError, AttributeError):
            continue
    return None


def measure_nf4(bench: Bench):
    api = _nf4_api()
    if api is None:
        bench.records.append({"section": "nf4", "name": "torchao NF4", "error": "torchao NF4Tensor does not import"})
        print("  nf4: torchao NF4Tensor does not import; skipped", flush=True)
        return
    to_nf4, linear_nf4, where = api
    for in_features, out_features in SHAPES:
        info = dict(shape=[in_features, out_features], module=where)
        weight = _linear(in_features, out_features).weight.detach()
        for tokens in (TOKENS, 1):
            x, grad_out = _inputs(tokens, in_features, out_features)
            if tokens == 1:
                x = x.detach()

            def dense(tokens=tokens, x=x, grad_out=grad_out):
                if tokens == 1:
                    return {"ms": bench.time_ms(lambda: F.linear(x, weight))}

                def step():
                    x.grad = None
                    F.linear(x, weight).backward(grad_out)

                return _timed_step(bench, step)

            def nf4(tokens=tokens, x=x, grad_out=grad_out):
                quantized = to_nf4(weight)
                if tokens == 1:
                    return {"ms": bench.time_ms(lambda: linear_nf4(x, quantized))}

                def step():
                    x.grad = None
                    linear_nf4(x, quantized).backward(grad_out)

                return _timed_step(bench, step)

            what = "fwd+bwd, frozen weight" if tokens > 1 else "forward"
            dense_record = bench.case("nf4", f"dense {what}", dense, optional=True, tokens=tokens, **info)
            record = bench.case("nf4", f"torchao NF4 {what}", nf4, optional=True, tokens=tokens, **info)
            _add_ratios(record, dense_record, None)


def measure_kernels(bench: Bench):
    """The kernels alone, so a caller can pick the faster weight-gradient strategy."""
    from resu_tensor import kernels
    from resu_tensor.kernels import mask_ops, quant, weight_grad
    from resu_tensor.core.mask_encoding import prefix_block_size

    if not kernels.HAS_TRITON:
        bench.records.append({"section": "kernels", "name": "all", "error": "triton does not import"})
        return
    from benchmarks import kernels_unrouted
    from resu_tensor.kernels import mask_ops_triton, optim_triton, quant_triton, weight_grad_triton

    adam = dict(lr=1e-4, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8)
    for in_features, out_features in SHAPES:
        rows, cols = out_features, in_features
        torch.manual_seed(3)
        grad_out = torch.randn(TOKENS, rows, device=DEVICE, dtype=DTYPE)
        x = torch.randn(TOKENS, cols, device=DEVICE, dtype=DTYPE)
        for sparsity in SPARSITIES:
            keep = torch.rand(rows * cols, device=DEVICE) >= sparsity
            bitmap = mask_ops.pack_bitmap(keep)
            block_size = prefix_block_size(cols)
            prefix = mask_ops.block_prefix_counts(keep, block_size)
            for side, invert in (("active (SPARSE)", False), ("pruned (RESU)", True)):
                selected = ~keep if invert else keep
                count = int(selected.sum())
                info = dict(shape=[in_features, out_features], tokens=TOKENS, sparsity=sparsity, trainable=side)
                cached = kernels.bitmap_tile_prefix(bitmap, rows, cols, kernels.PREFIX_TILE, invert)
                candidates = {
                    "dW reference (mm, bool index)": lambda: weight_grad.compact_weight_grad(grad_out, x, selected,
                                                                                             DTYPE),
                    "dW dense cuBLAS + Triton gather": lambda: weight_grad_triton.compact_weight_grad(
                        grad_out, x, selected, DTYPE),
                    "dW fused Triton (bool mask)": lambda: kernels_unrouted.compact_weight_grad_fused(
                        grad_out, x, selected, DTYPE),
                    "dW bitmap dense + gather": lambda: weight_grad_triton.compact_weight_grad_bitmap(
                        grad_out, x, bitmap, prefix, block_size, invert, count, DTYPE),
                    "dW bitmap fused": lambda: kernels_unrouted.compact_weight_grad_bitmap_fused(
                        grad_out, x, bitmap, prefix, block_size, invert, count, DTYPE),
                    "dW bitmap fused, cached tile prefix": lambda: kernels_unrouted.fused_matmul_bitmap(
                        grad_out, x, bitmap, invert, count, DTYPE, tile_prefix=cached),
                }
                for name, fn in candidates.items():
                    def run(fn=fn):
                        fn()
                        _sync()
                        figures = _peak_bytes(fn)
                        figures["ms"] = bench.time_ms(fn)
                        return figures

                    bench.case("kernels", name, run, optional=True, **info)
                values = torch.randn(rows, cols, device=DEVICE, dtype=DTYPE)
                compact = torch.randn(count, device=DEVICE, dtype=DTYPE)
                others = {
                    "gather reference (bool index)": lambda: mask_ops.gather_trainable(values, selected),
                    "gather Triton (bool mask)": lambda: mask_ops_triton.gather_trainable(values, selected),
                    "gather Triton (bitmap)": lambda: mask_ops_triton.gather_by_bitmap(values, bitmap, prefix,
                                                                                       block_size, invert, count),
                    "scatter reference (masked_scatter_)": lambda: mask_ops.scatter_trainable_(values, selected,
                                                                                               compact),
                    "scatter Triton (bool mask)": lambda: mask_ops_triton.scatter_trainable_(values, selected,
                                                                                             compact),
                    "scatter Triton (bitmap)": lambda: mask_ops_triton.scatter_by_bitmap_(values, bitmap, prefix,
                                                                                         block_size, invert, compact),
                }
                for name, fn in others.items():
                    bench.case("kernels", name, lambda fn=fn: {"ms": bench.time_ms(fn)}, optional=True, **info)
            # W_eff of a QRESU weight (θ at the pruned coordinates)
            qdata = torch.randint(0, 256, (rows, cols // 2), device=DEVICE, dtype=torch.uint8)
            scale = torch.rand(rows, -(-cols // GROUP_SIZE), device=DEVICE)
            offset = torch.randn(rows, -(-cols // GROUP_SIZE), device=DEVICE)
            theta = torch.randn(int((~keep).sum()), device=DEVICE, dtype=DTYPE)
            args = (qdata, scale, offset, 4, GROUP_SIZE, cols, DTYPE, bitmap, prefix, block_size, theta)
            info = dict(shape=[in_features, out_features], sparsity=sparsity)
            bench.case("kernels", "W_eff reference", lambda: {"ms": bench.time_ms(
                lambda: quant.qresu_effective_weight(*args))}, optional=True, **info)
            bench.case("kernels", "W_eff Triton", lambda: {"ms": bench.time_ms(
                lambda: quant_triton.qresu_effective_weight(*args))}, optional=True, **info)
            bench.case("kernels", "W_eff Triton element-wise", lambda: {"ms": bench.time_ms(
                lambda: quant_triton.effective_weight(*args, wordwise=False))}, optional=True, **info)
            # QRESU θ's AdamW(fused=True) step: torch's fused op vs the library's flat kernel
            grad, exp_avg, exp_avg_sq = (torch.randn_like(theta) for _ in range(3))
            exp_avg_sq.abs_()
            step = torch.tensor(3.0, device=DEVICE)
            flat = ([theta], [grad], [exp_avg], [exp_avg_sq])
            bench.case("kernels", "θ AdamW torch._fused_adamw_", lambda: {"ms": bench.time_ms(
                lambda: torch._fused_adamw_(*flat, [], [step], amsgrad=False, maximize=False, **adam))},
                optional=True, **info)
            bench.case("kernels", "θ AdamW kernels.foreach_adam_flat_", lambda: {"ms": bench.time_ms(
                lambda: kernels.foreach_adam_flat_(*flat, [step], *adam.values(), True, False))}, optional=True, **info)

    # Many parameters in one step: the kernel's multi-tensor (table) path against torch's fused op
    thetas = [torch.randn(n, device=DEVICE, dtype=DTYPE) for n in MANY_THETA]
    grads, exp_avgs, exp_avg_sqs = ([torch.randn_like(t) for t in thetas] for _ in range(3))
    torch._foreach_abs_(exp_avg_sqs)
    steps = [torch.tensor(3.0, device=DEVICE) for _ in thetas]
    many = (thetas, grads, exp_avgs, exp_avg_sqs)
    info = dict(parameters=len(thetas), elements=sum(MANY_THETA))
    bench.case("kernels", f"{len(thetas)} θ AdamW torch._fused_adamw_", lambda: {"ms": bench.time_ms(
        lambda: torch._fused_adamw_(*many, [], steps, amsgrad=False, maximize=False, **adam))}, optional=True, **info)
    bench.case("kernels", f"{len(thetas)} θ AdamW kernels.foreach_adam_flat_", lambda: {"ms": bench.time_ms(
        lambda: kernels.foreach_adam_flat_(*many, steps, *adam.values(), True, False))}, optional=True, **info)
    # the same launch with its offset table built once: the GPU's time where the eager call is host-bound
    table = optim_triton.flat_table((*many, steps), list(range(len(thetas))))
    bench.case("kernels", f"{len(thetas)} θ AdamW flat kernel alone", lambda: {"ms": bench.time_ms(
        lambda: optim_triton.launch_flat_table(*table, max(MANY_THETA), *adam.values(), True, False))},
        optional=True, **info)


# --------------------------------------------------------------------------- report
def print_table(records) -> None:
    print(f"\n{'section':9s} {'case':52s} {'shape':>11s} {'M':>5s} {'ms':>9s} {'×dense':>7s} {'×floor':>7s} "
          f"{'peak MiB':>9s}")
    for r in records:
        shape = "x".join(map(str, r.get("shape", []))) or "-"
        ms = f"{r['ms']:.4f}" if isinstance(r.get("ms"), float) else ("ERROR" if "error" in r else "-")
        ratio = f"{r['vs_dense']:.2f}" if "vs_dense" in r else ""
        floor = f"{r['vs_floor']:.2f}" if "vs_floor" in r else ""
        peak = f"{r['peak_bytes'] / 2**20:.0f}" if "peak_bytes" in r else ""
        name = r["name"] + (f" [{r['trainable']}, s={r['sparsity']}]" if "trainable" in r else "")
        print(f"{r['section']:9s} {name[:52]:52s} {shape:>11s} {str(r.get('tokens', '')):>5s} {ms:>9s} {ratio:>7s} "
              f"{floor:>7s} {peak:>9s}")
        if "error" in r:
            print(f"{'':9s}   {r['error'][:150]}")


# name → what it measures, given the Bench and the measured matmul rate (--sections picks by name)
SECTIONS = {
    "train": lambda bench, rate: measure_training(bench, rate, TOKENS, SHAPES, SPARSITIES, "train"),
    "small": lambda bench, rate: measure_training(bench, rate, SMALL[0], [SMALL[1:]], [0.5], "small",
                                                  fused_grad=False),
    "small_compiled": lambda bench, rate: measure_small_compiled(bench),
    "small_graph": lambda bench, rate: measure_small_graph(bench),
    "decode": lambda bench, rate: measure_decode(bench),
    "nf4": lambda bench, rate: measure_nf4(bench),
    "kernels": lambda bench, rate: measure_kernels(bench),
}


def run(quick: bool = False, only=()) -> dict:
    if _on_gpu() and not torch.cuda.is_available():
        raise SystemExit("benchmarks.layers needs a CUDA GPU")
    import triton

    import resu_tensor  # noqa: F401  (registers the kernels)
    from resu_tensor import kernels

    bench = Bench(quick)
    header = {"device": torch.cuda.get_device_name() if _on_gpu() else "cpu (smoke test)",
              "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
              "dtype": "bfloat16", "tokens": TOKENS, "timing": "do_bench median",
              "kernels_have_triton": kernels.HAS_TRITON, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"{header['device']}  torch {header['torch']}  triton {header['triton']}", flush=True)
    rate = measure_matmul_rate(bench)
    for name, section in SECTIONS.items():
        if only and name not in only:
            continue
        try:
            section(bench, rate)
        except Exception as exc:  # a bug in a section's own setup: record it, run the next section
            bench.records.append({"section": "error", "name": "section setup",
                                  "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-2000:]})
        _release(collect=True)
    from resu_tensor.kernels._triton_support import FALLEN_BACK

    header.update(matmul_tflops=rate, total_s=round(time.time() - bench.start, 1), kernels_fallen_back=FALLEN_BACK)
    return {**header, "records": bench.records}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/layers_<gpu>.json)")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=(),
                        help="run only these (default: all)")
    args = parser.parse_args(argv)
    results = run(args.quick, args.sections)
    gpu = results["device"].lower().replace(" ", "_")
    out = Path(args.out or Path(__file__).parent / "results" / f"layers_{gpu}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, default=str) + "\n")
    print_table(results["records"])
    print(f"\nwrote {out} ({results['total_s']} s)")
    return results


if __name__ == "__main__":
    main()

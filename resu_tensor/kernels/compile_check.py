"""Compile every Triton kernel of this package for a GPU target, without a GPU.

CI machines have no GPU, and the interpreter (``TRITON_INTERPRET=1``) checks results but not
that a kernel lowers to PTX and through ptxas. This builds each kernel, with each autotune config
and constexpr variant, for a target architecture the way a real launch specializes it (unit
strides as constants, sizes divisible by 16), and reports shared memory per variant.

    python -m resu_tensor.kernels.compile_check [--arch 90] [--quick]

Needs triton with its NVIDIA backend (ptxas ships in the wheel); no GPU or driver.
"""
import argparse
import itertools
import sys
import time

import torch

from ._triton_support import HAS_TRITON, PREFIX_TILE


def _variants(quick: bool):
    """(kernel, argument types, constexprs, options) for every variant worth compiling."""
    from . import mask_ops_triton as mo, optim_triton as op, quant_triton as qt, weight_grad_triton as wg
    from . import mask_ops, update_triton as up
    from . import selective_triton as sel

    i32 = "i32"
    yield mo._pack_bitmap_kernel, dict(mask_ptr="*u8", out_ptr="*u8", numel=i32, n_bytes=i32), {"BYTES": 256}, {}
    yield mo._unpack_bitmap_kernel, dict(bitmap_ptr="*u8", out_ptr="*u8", numel=i32), {"BLOCK": 1024}, {}
    yield mo._block_count_kernel, dict(mask_ptr="*u8", counts_ptr="*i32", numel=i32), {"BLOCK": 1024}, {}
    for gather, (values, compact) in itertools.product([True, False], [("*bf16", "*bf16"), ("*bf16", "*fp32")]):
        types = dict(values_ptr=values, mask_ptr="*u8", block_start_ptr="*i32", compact_ptr=compact, numel=i32,
                     n_compact=i32)
        yield mo._masked_move_kernel, types, {"GATHER": gather, "BLOCK": 1024}, {}
    for gather, invert in itertools.product([True, False], [True, False]):
        types = dict(values_ptr="*bf16", bitmap_ptr="*u8", block_prefix_ptr="*i32", compact_ptr="*fp32", numel=i32,
                     block_size=i32, n_compact=i32)
        yield mo._bitmap_move_kernel, types, {"INVERT": invert, "GATHER": gather, "ALIGNED": True, "CHUNK": 1024}, {}
    types = dict(bitmap_ptr="*u8", counts_ptr="*i32", cols=i32, n_tiles=i32)
    yield mo._tile_count_kernel, types, {"INVERT": True, "TILE": PREFIX_TILE, "TILES": 32}, {}
    for values, invert, decoupled in [("*bf16", True, True), ("*fp32", False, False)]:
        types = dict(values_ptr=values, bitmap_ptr="*u8", block_prefix_ptr="*i32", grad_ptr=values, m_ptr=values,
                     v_ptr=values, step_ptr="*fp32", numel=i32, block_size=i32, n_compact=i32, lr="fp32",
                     beta1="fp32", beta2="fp32", weight_decay="fp32", eps="fp32")
        yield op._adam_bitmap_kernel, types, {"INVERT": invert, "DECOUPLED": decoupled, "MAXIMIZE": False,
                                              "ALIGNED": True, "CHUNK": 1024}, {}
    for dtype, invert in [(torch.bfloat16, True), (torch.float32, False)]:
        types = dict(table_ptr="*i64", lr="fp32", beta1="fp32", beta2="fp32", weight_decay="fp32", eps="fp32")
        tl_dtype = op.TL_DTYPES[dtype]
        yield op._foreach_adam_bitmap_kernel, types, {"P_DTYPE": tl_dtype, "G_DTYPE": tl_dtype, "S_DTYPE": tl_dtype,
                                                      "INVERT": invert, "DECOUPLED": True, "MAXIMIZE": False,
                                                      "ALIGNED": True, "CHUNK": 1024}, {}
    for update, (values, operand, invert) in itertools.product(mask_ops.UPDATE_OPS, [("*bf16", "*fp32", True),
                                                                                  ("*fp32", "*fp32", False)]):
        types = dict(values_ptr=values, bitmap_ptr="*u8", block_prefix_ptr="*i32", t1_ptr=operand, t2_ptr=operand,
                     numel=i32, block_size=i32, n_compact=i32, scalar="fp32")
        yield up._update_bitmap_kernel, types, {"INVERT": invert, "OP": update, "ALIGNED": True, "CHUNK": 1024}, {}
    for update, (values, operand, invert) in itertools.product(mask_ops.UPDATE_OPS, [
            (torch.bfloat16, torch.float32, True), (torch.float32, torch.float32, False)]):
        values, operand = up.TL_DTYPES[values], up.TL_DTYPES[operand]
        constexprs = {"P_DTYPE": values, "T1_DTYPE": operand, "T2_DTYPE": operand, "INVERT": invert, "OP": update,
                      "ALIGNED": True, "CHUNK": 1024}
        yield up._foreach_update_bitmap_kernel, dict(table_ptr="*i64"), constexprs, {}
    for grad, ema in [("*bf16", "*bf16"), ("*fp32", "*fp32")]:
        common = dict(grad_ptr=grad, m_ptr=ema, v_ptr=ema, score_ptr="*fp32", numel=i32, delta="fp32")
        yield sel._scores_kernel, dict(common, screen_ptr="*fp32", beta="fp32", one_minus_beta="fp32", tau="fp32"), \
            {"BLOCK": sel.BLOCK}, {"enable_fp_fusion": False}
        yield sel._apply_kernel, dict(common, select_ptr="*fp32"), {"BLOCK": sel.BLOCK}, {"enable_fp_fusion": False}

    for config in wg._compact_matmul_kernel.configs:
        wide = config.kwargs["BLOCK_K"] == 32
        element = "*fp32" if wide else "*bf16"
        types = dict(a_ptr=element, b_ptr=element, bitmap_ptr="*u8", tile_prefix_ptr="*i32", out_ptr=element,
                     tokens=i32, rows=i32, cols=i32, stride_at=i32, stride_bt=i32, n_prefix_tiles=i32, count=i32,
                     tokens_bucket=i32)
        constexprs = dict(config.kwargs, INVERT=True, TILE=PREFIX_TILE, PRECISION="ieee" if wide else "tf32",
                          UPCAST=False, stride_ar=1, stride_bc=1)
        yield wg._compact_matmul_kernel, types, constexprs, dict(num_warps=config.num_warps,
                                                                 num_stages=config.num_stages)
        if quick:
            break

    for bits in (4, 8):
        types = dict(qdata_ptr="*u8", scale_ptr="*fp32", offset_ptr="*fp32", bitmap_ptr="*u8", block_prefix_ptr="*i32",
                     theta_ptr="*fp32", out_ptr="*bf16", numel=i32, cols=i32, q_stride=i32, n_groups=i32,
                     group_size=i32, block_size=i32, n_theta=i32)
        constexprs = {"BITS": bits, "EVEN_COLS": True, "ALIGNED": True, "GROUP_SHIFT": 6, "CHUNK": 1024}
        yield qt._effective_weight_kernel, types, constexprs, {"enable_fp_fusion": False}
    for theta in ("*fp32", "*bf16"):
        types = dict(qdata_ptr="*u8", scale_ptr="*fp32", offset_ptr="*fp32", bitmap_ptr="*u8", block_prefix_ptr="*i32",
                     theta_ptr=theta, out_ptr="*bf16", numel=i32, group_size=i32, block_size=i32, n_theta=i32)
        yield qt._wordwise_effective_weight_kernel, types, {"BLOCK_W": qt._EFFECTIVE_WEIGHT_WORDS}, \
            {"enable_fp_fusion": False, "num_warps": qt._EFFECTIVE_WEIGHT_WARPS}
    common = dict(qdata_ptr="*u8", scale_ptr="*fp32", offset_ptr="*fp32", bitmap_ptr="*u8", tile_prefix_ptr="*i32",
                  theta_ptr="*fp32", out_ptr="*fp32", m=i32, rows=i32, cols=i32, q_stride=i32, n_groups=i32,
                  group_size=i32, n_prefix_tiles=i32, span=i32, stride_os=i32, stride_om=i32, n_theta=i32)
    forward, grad_input = ("x_ptr", ("stride_xm", "stride_xk")), ("g_ptr", ("stride_gm", "stride_gn"))
    for kernel, (operand, (row_stride, unit_stride)), tables in [
            (qt._linear_kernel, forward, qt._ELEMENTWISE), (qt._bytewise_linear_kernel, forward, qt._BYTEWISE),
            (qt._wordwise_linear_kernel, forward, qt._WORDWISE),
            (qt._grad_input_kernel, grad_input, {"dot": qt._GRAD_INPUT})]:
        for shape, table in tables.items():
            for config in table:
                for bits, block_m in [(4, 1 if shape == "gemv" else 16), (8, 1 if shape == "gemv" else 64)][
                        :1 if "BLOCK_W" in config.kwargs else 2]:  # word-wise: 4-bit codes only
                    types = dict(common, **{operand: "*bf16", row_stride: i32})
                    constexprs = dict(config.kwargs, BITS=bits, TILE=PREFIX_TILE, PRECISION="tf32", UPCAST=False,
                                      BLOCK_M=block_m, **{unit_stride: 1})
                    if "BLOCK_K" in config.kwargs:
                        constexprs["GROUP_ALIGNED"] = bits == 4
                    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
                    yield kernel, types, constexprs, dict(options, maxnreg=config.maxnreg) if config.maxnreg else options
                if quick:
                    break


def _jit_function(kernel):
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):  # unwrap autotuners / heuristics
        kernel = kernel.fn
    return kernel


def compile_all(arch: int = 90, quick: bool = False, verbose: bool = True) -> list:
    """Compile every variant for ``sm_<arch>``; returns (name, constexprs, error or None) rows."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    sized = {"numel", "n_bytes", "cols", "rows", "tokens", "n_tiles", "n_prefix_tiles", "q_stride", "n_groups",
             "group_size", "block_size", "span", "count", "n_compact", "n_theta", "stride_at", "stride_bt", "stride_xm",
             "stride_gm", "stride_os", "stride_om"}
    rows = []
    for kernel, types, constexprs, options in _variants(quick):
        fn = _jit_function(kernel)
        signature = {name: "constexpr" if name in constexprs else types[name] for name in fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
                 if signature[name].startswith("*") or (name in sized and signature[name] != "constexpr")}
        start = time.time()
        try:
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)
            error = None
            detail = f"shared={compiled.metadata.shared}"
        except Exception as exc:  # report every failure, keep going
            error = f"{type(exc).__name__}: {exc}"
            detail = "FAILED"
        shown = {k: v for k, v in constexprs.items() if not k.startswith("stride")}
        if verbose:
            print(f"{fn.__name__:26s} {detail:14s} {time.time() - start:5.1f}s  {shown}", flush=True)
            if error:
                print("   ", error.splitlines()[0][:300], flush=True)
        rows.append((fn.__name__, shown, error))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability ×10 (90 = H100)")
    parser.add_argument("--quick", action="store_true", help="one autotune config per kernel")
    args = parser.parse_args(argv)
    if not HAS_TRITON:
        print("triton does not import here: nothing to compile")
        return 1
    rows = compile_all(args.arch, args.quick)
    failed = [r for r in rows if r[2]]
    print(f"{len(rows) - len(failed)}/{len(rows)} kernel variants compiled for sm_{args.arch}")
    return 1 if failed else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())

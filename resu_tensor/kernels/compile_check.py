"""Compile every Triton kernel of this package for a GPU target, without a GPU.

CI machines have no GPU, and the interpreter (``TRITON_INTERPRET=1``) checks results but not
that a kernel lowers to PTX and through ptxas. This builds every compile variant that the ops of
the kernel table declare (``_triton_support.cuda_op(..., variants=...)``: each autotune config and
constexpr variant) for a target architecture the way a real launch specializes it (unit strides
as constants, sizes divisible by 16), and reports shared memory per variant.

    python -m resu_tensor.kernels.compile_check [--arch 90] [--quick]

Needs triton with its NVIDIA backend (ptxas ships in the wheel); no GPU or driver.
"""
import argparse
import sys
import time

import torch

from ._table import OPS
from ._triton_support import HAS_TRITON


def variants(quick: bool):
    """Every ``_table.Variant`` the declared ops' CUDA implementations compile to, each once (ops
    share kernels). ``quick``: one autotune config per kernel."""
    seen = set()
    for op in OPS.values():
        for variant in op.variants(quick) if op.variants else ():
            key = (id(_jit_function(variant.kernel)), repr(variant.types), repr(variant.constexprs),
                   repr(variant.options))
            if key not in seen:
                seen.add(key)
                yield variant


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
    for kernel, types, constexprs, options in variants(quick):
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

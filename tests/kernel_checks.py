"""What the Triton kernel test files share: fresh random data, and running their checks under
the Triton interpreter on CPU.

``TRITON_INTERPRET=1`` must be set before triton is imported, so a test file's checks run in
child processes (the file executed as a script, :func:`child_main`); the rest of the suite never
sees the variable. On the GPU (``pytest -m cuda``) the same checks run compiled, on larger shapes.
"""
import json
import os
import subprocess
import sys
import traceback
import zlib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def package():
    """The kernels package, ``resu_tensor.kernels``."""
    from resu_tensor import kernels

    return kernels


def random_mask(n, p, device):
    """A random bool mask with both sides non-empty."""
    while True:
        m = torch.rand(n, device=device) < p
        if m.any() and not m.all():
            return m


def random_data(shape, dtype, device):
    x = torch.randn(shape, device=device).to(dtype)
    assert x.abs().sum() > 0
    return x


def grad_cases(big):
    """(tokens, rows, cols) of the weight-gradient checks."""
    if big:
        return [(777, 1001, 1537)]
    return [(45, 37, 45), (5, 3, 70)]


def matmul_tolerance(dtype):
    """Outputs are sums of ~cols products of N(0, 1) values (|y| up to ~40 on the GPU shapes):
    bf16 results may differ by a couple of bf16 steps, float32 ones by summation order."""
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-3)


def qresu_weight(rows, cols, bits, group_size, sparsity, theta_dtype, device):
    """(the kernel arguments of a random QRESU weight, by name; its keep mask)."""
    k = package()
    quant, masks = k.quant, k.mask_ops
    weight = torch.randn(rows, cols, device=device)
    keep = random_mask(rows * cols, 1 - sparsity, device).view(rows, cols)
    codes, scale, offset = quant.quantize_groupwise(weight, keep, bits, group_size)
    qdata = quant.pack_4bit(codes) if bits == 4 else codes
    bitmap = masks.pack_bitmap(keep.view(-1))
    block_size = 1024 * max(1, -(-cols // 1024))
    prefix = masks.block_prefix_counts(keep.view(-1), block_size)
    theta = random_data(int((~keep).sum()), theta_dtype, device)
    return dict(qdata=qdata, qscale=scale, qoffset=offset, bits=bits, group_size=group_size, cols=cols,
                bitmap=bitmap, block_prefix=prefix, block_size=block_size, theta=theta), keep


def qresu_cases(big):
    """(rows, cols, bits, group_size) of the QRESU checks: odd shapes on the interpreter."""
    if big:
        return [(1001, 1536, 4, 128), (515, 1000, 8, 64), (700, 999, 4, 999)]
    # (9, 64, 4, 16): W_eff reads scales per group; (13, 96, 4, 32): the word-wise kernels apply (two prefix
    # blocks, the second starting inside a row)
    return [(19, 37, 4, 6), (13, 48, 4, 32), (11, 40, 8, 16), (9, 64, 4, 16), (13, 96, 4, 32)]



def run_checks(checks: dict, names) -> dict:
    """name → None or the traceback; each check seeded by its name (fresh data per check)."""
    results = {}
    for name in names:
        torch.manual_seed(zlib.crc32(name.encode()))
        try:
            checks[name]("cpu", big=False)
            results[name] = None
        except Exception:  # report, keep going
            results[name] = traceback.format_exc()
    return results


def child_main(checks: dict) -> None:
    """The script side: run this shard (argv ``i/n``, default all) of ``checks`` and print them."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run by the tests with TRITON_INTERPRET=1"
    torch.set_num_threads(1)
    sys.path.insert(0, str(REPO))  # the source tree's resu_tensor, as pytest's pythonpath gives

    shard, count = (int(part) for part in sys.argv[1].split("/")) if len(sys.argv) > 1 else (0, 1)
    print("RESULTS " + json.dumps(run_checks(checks, sorted(checks)[shard::count])))
    sys.exit(0)


def triton_importable() -> bool:
    from resu_tensor import kernels

    return kernels.HAS_TRITON


def interpreter_works() -> bool:
    """Triton < 3.7's interpreter breaks in loops with numpy 2 ("only 0-dimensional arrays can be
    converted to Python scalars", seen with triton 3.6 on the GPU machine); CI has a newer triton."""
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 7)


def run_interpreted(script: str, shards: int = 1):
    """Run ``script``'s checks under TRITON_INTERPRET=1 in ``shards`` concurrent children:
    (name → traceback or None, failures of whole children)."""
    if not triton_importable():
        pytest.skip("triton is not installed")
    if not interpreter_works():
        pytest.skip("this triton's interpreter cannot run loops with numpy 2; the GPU tests cover the kernels")
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1", PYTHONWARNINGS="ignore")
    children = [subprocess.Popen([sys.executable, script, f"{i}/{shards}"], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(shards)]
    results, failures = {}, []
    for child in children:
        out, err = child.communicate(timeout=600)
        lines = [line for line in out.splitlines() if line.startswith("RESULTS ")]
        if child.returncode != 0 or not lines:
            failures.append(f"exit {child.returncode}\n{out[-3000:]}\n{err[-3000:]}")
            continue
        results.update(json.loads(lines[-1][len("RESULTS "):]))
    return results, failures


def assert_passed(name: str, interpreted) -> None:
    results, failures = interpreted
    if name not in results:
        pytest.fail("interpreter child failed:\n" + "\n".join(failures))
    if results[name] is not None:
        pytest.fail(f"{name} under TRITON_INTERPRET=1:\n{results[name]}")

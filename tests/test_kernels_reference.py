"""The kernel table's references for the bitmap-direct and QRESU ops, against independent
computations and against the library's own tensors; and the table's import guards."""
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import resu_tensor as rt
from resu_tensor import kernels
from resu_tensor.kernels import mask_ops, quant, weight_grad
from resu_tensor.core.mask_encoding import prefix_block_size

REPO = Path(__file__).resolve().parents[1]


def random_mask(n, p):
    while True:
        mask = torch.rand(n) < p
        if mask.any() and not mask.all():
            return mask


@pytest.mark.parametrize("numel,block_size", [(1517, 1024), (1517, 300), (9, 1024), (4099, 2048)])
@pytest.mark.parametrize("invert", [False, True])
def test_gather_and_scatter_by_bitmap_select_the_right_side(numel, block_size, invert):
    mask = random_mask(numel, 0.45)
    bitmap = mask_ops.pack_bitmap(mask)
    prefix = mask_ops.block_prefix_counts(mask, block_size)
    values = torch.randn(numel)
    selected = ~mask if invert else mask
    indices = [i for i in range(numel) if bool(selected[i])]  # plain-Python order of the selection
    gathered = mask_ops.gather_by_bitmap(values, bitmap, prefix, block_size, invert, len(indices))
    assert gathered.tolist() == values[indices].tolist()
    compact = torch.randn(len(indices))
    out = values.clone()
    assert mask_ops.scatter_by_bitmap_(out, bitmap, prefix, block_size, invert, compact) is out
    assert out[indices].tolist() == compact.tolist()
    assert torch.equal(out[~selected], values[~selected])
    with pytest.raises(ValueError, match="selects"):
        mask_ops.gather_by_bitmap(values, bitmap, prefix, block_size, invert, len(indices) + 1)


@pytest.mark.parametrize("rows,cols,tile", [(13, 45, 16), (7, 128, 128), (5, 3, 16)])
@pytest.mark.parametrize("invert", [False, True])
def test_bitmap_tile_prefix_counts_selected_elements_before_each_tile(rows, cols, tile, invert):
    mask = random_mask(rows * cols, 0.3)
    table = mask_ops.bitmap_tile_prefix(mask_ops.pack_bitmap(mask), rows, cols, tile, invert)
    selected = (~mask if invert else mask).tolist()
    assert table.dtype == torch.int32 and table.shape == (rows, -(-cols // tile))
    for r in range(rows):
        for j in range(table.shape[1]):
            assert table[r, j] == sum(selected[: r * cols + j * tile])


@pytest.mark.parametrize("invert", [False, True])
def test_compact_weight_grad_bitmap_matches_the_bool_mask_version(invert):
    a, b = torch.randn(11, 7), torch.randn(11, 9)
    mask = random_mask(63, 0.5)
    selected = ~mask if invert else mask
    expected = weight_grad.compact_weight_grad(a, b, selected, torch.float64)
    got = weight_grad.compact_weight_grad_bitmap(a, b, mask_ops.pack_bitmap(mask),
                                                 mask_ops.block_prefix_counts(mask, 16), 16, invert,
                                                 int(selected.sum()), torch.float64)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("bits,group_size,theta_dtype", [(4, 128, None), (4, 32, torch.float32), (8, 64, None)])
def test_qresu_references_agree_with_a_library_qresu_weight(bits, group_size, theta_dtype):
    """The layout the kernels assume (bitmap bits, block prefix, θ order, codes) is the library's."""
    dense = torch.randn(48, 1100)
    w = rt.ResuTensor.from_dense(dense, sparsity=0.5)
    w.enter_resu(quantize_bits=bits, group_size=group_size, theta_dtype=theta_dtype)
    assert w.mask_kind == "bitmap"
    cols = w.shape[1]
    args = (w.qdata, w.qscale, w.qoffset, bits, group_size, cols)
    mask_args = (w.mask_bitmap, w.mask_block_prefix, prefix_block_size(cols), w.theta)
    w_eff = quant.qresu_effective_weight(*args, w.dtype, *mask_args)
    assert torch.equal(w_eff, w.dequantize())
    x = torch.randn(3, cols)
    torch.testing.assert_close(quant.qresu_linear_small_m(x, *args, *mask_args), x @ w.dequantize().t())
    g = torch.randn(3, w.shape[0])
    torch.testing.assert_close(quant.qresu_grad_input_small_m(g, *args, *mask_args), g @ w.dequantize())


CUDA_OPS = ["pack_bitmap", "unpack_bitmap", "gather_trainable", "scatter_trainable_", "gather_by_bitmap",
            "scatter_by_bitmap_", "bitmap_tile_prefix", "compact_weight_grad", "compact_weight_grad_bitmap",
            "qresu_effective_weight", "qresu_linear_small_m", "qresu_grad_input_small_m", "foreach_adam_by_bitmap_",
            "foreach_adam_flat_", "update_by_bitmap_", "foreach_update_by_bitmap_", "selective_scores_",
            "selective_apply_"]


CPU_OPS = ["gather_by_bitmap", "compact_weight_grad_bitmap", "update_by_bitmap_", "foreach_update_by_bitmap_"]


def test_every_op_has_a_reference_and_kernels_exactly_where_they_were_built():
    """CUDA kernels where triton imports; the C loops' CPU implementations where they were built."""
    assert sorted(kernels.OPS) == sorted(CUDA_OPS + ["block_prefix_counts"])
    assert set(kernels.__all__) == set(kernels.OPS) | {"HAS_TRITON", "HAS_CPU_KERNELS", "PREFIX_TILE", "register",
                                                       "implementation"}
    for name, op in kernels.OPS.items():
        assert callable(getattr(kernels, name)) and getattr(kernels, name).__doc__ == op.reference.__doc__
        reference = op.reference
        assert reference.__name__ == name
        has_cpu_kernel = kernels.HAS_CPU_KERNELS and name in CPU_OPS
        assert (kernels.implementation(name, "cpu") is not reference) == has_cpu_kernel, name
        has_kernel = kernels.HAS_TRITON and name in CUDA_OPS
        assert (kernels.implementation(name, "cuda") is not reference) == has_kernel, name


def test_register_replaces_an_implementation_and_refuses_unknown_ops():
    def doubled(mask_flat):
        return kernels.mask_ops.pack_bitmap(mask_flat) * 2

    mask = torch.rand(20) < 0.5
    default = kernels.implementation("pack_bitmap", "cpu")
    kernels.register("pack_bitmap", "cpu", doubled)
    try:
        assert torch.equal(kernels.pack_bitmap(mask), default(mask) * 2)
    finally:
        kernels.OPS["pack_bitmap"].implementations.pop("cpu")
    assert torch.equal(kernels.pack_bitmap(mask), default(mask))
    with pytest.raises(ValueError, match="unknown kernel op 'no_such_op'"):
        kernels.register("no_such_op", "cpu", doubled)


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_every_cuda_op_declares_the_compile_variants_of_its_kernels():
    """compile_check builds what the ops declare: every kernel of the Triton modules, each variant
    naming every argument of its kernel (the weight gradients launch only the gather ops' kernels)."""
    from triton.runtime.jit import JITFunction

    from resu_tensor.kernels import compile_check

    without = {name for name, op in kernels.OPS.items() if op.variants is None}
    assert without == {"block_prefix_counts", "compact_weight_grad", "compact_weight_grad_bitmap"}
    kernels_seen = set()
    for variant in compile_check.variants(quick=True):
        fn = variant.kernel
        while not isinstance(fn, JITFunction):
            fn = fn.fn
        kernels_seen.add(fn.__name__)
        assert set(fn.arg_names) == set(variant.types) | set(variant.constexprs), fn.__name__
    defined = {name for module in (kernels.mask_ops_triton, kernels.optim_triton, kernels.quant_triton,
                                   kernels.selective_triton, kernels.update_triton)
               for name, value in vars(module).items() if isinstance(value, JITFunction) and name.endswith("_kernel")}
    assert kernels_seen == defined


def test_kernels_import_and_run_without_triton():
    """A machine without triton and without the C loops (no compiler at install) gets the
    references only (both blocked in a fresh process)."""
    script = (
        "import sys; sys.modules['triton'] = None; sys.modules['resu_tensor.kernels._bitmap_cpu'] = None\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import torch\n"
        "from resu_tensor import kernels\n"
        "assert not kernels.HAS_TRITON and not kernels.HAS_CPU_KERNELS\n"
        "assert kernels.OPS and all(set(op.implementations) == {'reference'} for op in kernels.OPS.values())\n"
        "m = torch.rand(100) < 0.5\n"
        "assert torch.equal(kernels.unpack_bitmap(kernels.pack_bitmap(m), 100), m)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.skipif(not kernels.HAS_TRITON, reason="triton is not installed")
def test_a_kernel_that_does_not_compile_falls_back_to_its_reference_once():
    from triton.compiler.errors import CompilationError

    from resu_tensor.kernels import _triton_support

    calls = []

    def broken(*args):
        calls.append(args)
        raise CompilationError("src", None, "no such instruction on this GPU")

    def wrong_input(*args):
        raise ValueError("bad input")

    fn = _triton_support.eager_or_op("test_broken_op", broken, None, lambda x: x + 1)
    try:
        with pytest.warns(RuntimeWarning, match="does not compile"):
            assert fn(1) == 2
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fn(2) == 3  # no second attempt, no second warning
        assert len(calls) == 1 and "test_broken_op" in _triton_support.FALLEN_BACK
    finally:
        _triton_support.FALLEN_BACK.pop("test_broken_op", None)
    strict = _triton_support.eager_or_op("test_strict_op", wrong_input, None, lambda x: x)
    with pytest.raises(ValueError, match="bad input"):  # input errors are not compile errors
        strict(1)


def test_no_top_level_kernels_module_of_ours_shadows_hugging_faces():
    """The repository root is on sys.path in tests, benchmarks and `python -m` runs from it: a
    top-level `kernels/` there hid Hugging Face's `kernels` package, which transformers imports."""
    spec = importlib.util.find_spec("kernels")
    assert spec is None or Path(spec.origin).parent.parent != REPO, spec.origin

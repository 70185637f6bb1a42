"""kernels.update_by_bitmap_ (an optimizer's in-place op on a weight's bitmap-selected coordinates
in one pass): the Triton kernel (kernels/update_triton.py) against its reference in mask_ops.

As in tests/test_kernels_triton.py: on CPU the kernel runs under ``TRITON_INTERPRET=1`` in a
child process (this file executed as a script), on small odd shapes; ``pytest -m cuda`` runs the
same checks compiled on larger ones. Every check uses fresh random non-zero data, both invert
sides and a block size that is not a multiple of the kernel's chunk, and asserts that elements
outside the selection are bit-identical to what they were.
"""
import pytest
import torch

import kernel_checks
from kernel_checks import package, random_data, random_mask

# (op, scalar, number of compact operands); lerp twice: aten takes another formula for |weight| ≥ 0.5
CASES = [("mul_scalar", 0.93, 0), ("mul", 1.0, 1), ("add", -0.37, 1), ("addcmul", 0.61, 2),
         ("addcdiv", -0.013, 2), ("lerp", 0.1, 1), ("lerp", 0.75, 1), ("copy", 1.0, 1)]


def _assert_matches(ours, expected, dtype):
    """Equal up to rounding: the kernel computes as aten's CUDA kernels do, in float32 with fma;
    torch's CPU kernels (the reference here) fuse differently from numpy (the interpreter) and
    round add's alpha to bfloat16 first. float32: an ulp or two of the operands; bfloat16: one step."""
    tolerance = dict(rtol=2.4e-7, atol=2e-6) if dtype == torch.float32 else dict(rtol=7.9e-3, atol=1e-2)
    torch.testing.assert_close(ours, expected, **tolerance)

# --------------------------------------------------------------------------- checks
def check_update_by_bitmap(device, big):
    k = package()
    ref, tri = k.mask_ops, k.update_triton
    shape = (37, 41) if not big else (1003, 4099)
    for dtype in (torch.float32, torch.bfloat16):
        values = random_data(shape, dtype, device)
        mask = random_mask(values.numel(), 0.55, device)
        bitmap = ref.pack_bitmap(mask)
        for block_size in (300, 1500) if not big else (5120, 1000):  # chunks 512 and 1024: a partial last one
            prefix = ref.block_prefix_counts(mask, block_size)
            for invert in (False, True):
                selected = ~mask if invert else mask
                count = int(selected.sum())
                for i, (op, scalar, n_operands) in enumerate(CASES):
                    mixed = i % 2 and op != "lerp"  # bf16 weights with float32 operands too (not lerp: aten refuses)
                    operand_dtype = torch.float32 if mixed else dtype
                    operands = [random_data(count, operand_dtype, device) for _ in range(n_operands)]
                    if op == "addcdiv":  # Adam's denominators: positive, away from zero
                        operands[1] = operands[1].abs() + 0.1
                    tensors = operands + [None] * (2 - n_operands)
                    ours, theirs = values.clone(), values.clone()
                    assert tri.update_by_bitmap_(ours, bitmap, prefix, block_size, invert, op, *tensors, scalar) is ours
                    ref.update_by_bitmap_(theirs, bitmap, prefix, block_size, invert, op, *tensors, scalar)
                    where = (op, dtype, block_size, invert)
                    assert torch.equal(ours.view(-1)[~selected], values.view(-1)[~selected]), where
                    assert not torch.equal(ours.view(-1)[selected], values.view(-1)[selected]), where
                    _assert_matches(ours.view(-1)[selected], theirs.view(-1)[selected], dtype)


def check_foreach_update_by_bitmap(device, big):
    """Every op on three weights of one call plus one of another group (other side), each with its
    own scalar: bit-identical to the single-weight kernel, frozen elements untouched."""
    k = package()
    ref, tri = k.mask_ops, k.update_triton
    shapes = [(37, 41), (5, 300), (23, 17), (11, 13)] if not big else [(1003, 4099), (768, 3072), (301, 777), (64, 64)]
    for dtype in (torch.float32, torch.bfloat16):
        weights = []
        # block sizes that share the kernel's chunk walk, so the first three go in one launch
        for shape, block_size, invert in zip(shapes, (1024, 2048, 3072, 1024) if not big else (5120, 3072, 1024, 1024),
                                             (True, True, True, False)):
            values = random_data(shape, dtype, device)
            mask = random_mask(values.numel(), 0.55, device)
            weights.append(dict(values=values, bitmap=ref.pack_bitmap(mask), block_size=block_size, invert=invert,
                                prefix=ref.block_prefix_counts(mask, block_size), selected=~mask if invert else mask))
        for op, scalar, n_operands in CASES:
            operands = []
            for w in weights:
                count = int(w["selected"].sum())
                tensors = [random_data(count, dtype, device) for _ in range(n_operands)]
                if op == "addcdiv":
                    tensors[1] = tensors[1].abs() + 0.1
                operands.append(tensors + [None] * (2 - n_operands))
            scalars = [scalar * (1 + j / 8) for j in range(len(weights))]
            ours = [w["values"].clone() for w in weights]
            tri.foreach_update_by_bitmap_(ours, [w["bitmap"] for w in weights], [w["prefix"] for w in weights],
                                          [w["block_size"] for w in weights], [w["invert"] for w in weights], op,
                                          [o[0] for o in operands], [o[1] for o in operands], scalars)
            for w, values, (t1, t2), s in zip(weights, ours, operands, scalars):
                single = tri.update_by_bitmap_(w["values"].clone(), w["bitmap"], w["prefix"], w["block_size"],
                                               w["invert"], op, t1, t2, s)
                theirs = ref.update_by_bitmap_(w["values"].clone(), w["bitmap"], w["prefix"], w["block_size"],
                                               w["invert"], op, t1, t2, s)
                selected, where = w["selected"], (op, dtype, values.shape)
                assert torch.equal(values, single), where
                assert torch.equal(values.view(-1)[~selected], w["values"].view(-1)[~selected]), where
                _assert_matches(values.view(-1)[selected], theirs.view(-1)[selected], dtype)


def check_update_custom_op_traces(device, big):
    """The custom op's fake implementation agrees with the real one, and torch.compile traces it."""
    k = package()
    values = random_data((9, 13), torch.float32, device)
    mask = random_mask(values.numel(), 0.5, device)
    bitmap, prefix = k.mask_ops.pack_bitmap(mask), k.mask_ops.block_prefix_counts(mask, 64)
    t1, t2 = random_data(int(mask.sum()), torch.float32, device), random_data(int(mask.sum()), torch.float32, device).abs() + 1
    op = torch.ops.resu_tensor.update_by_bitmap_
    for args in [(values.clone(), bitmap, prefix, 64, False, "addcdiv", t1, t2, -0.5),
                 (values.clone(), bitmap, prefix, 64, False, "mul_scalar", None, None, 0.5)]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    args = ([values.clone(), values.clone()], [bitmap] * 2, [prefix] * 2, [64, 64], [False, False], "addcdiv",
            [t1, t1], [t2, t2], [-0.5, 0.25])
    torch.library.opcheck(torch.ops.resu_tensor.foreach_update_by_bitmap_, args,
                          test_utils=("test_schema", "test_faketensor"))

    def step(values, t1, t2):
        values = values.clone()
        k.update_triton.update_by_bitmap_(values, bitmap, prefix, 64, False, "mul_scalar", None, None, 0.9)
        return k.update_triton.update_by_bitmap_(values, bitmap, prefix, 64, False, "addcdiv", t1, t2, -0.1)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(values, t1, t2), step(values, t1, t2))


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


if __name__ == "__main__":
    kernel_checks.child_main(CHECKS)


@pytest.fixture(scope="module")
def interpreted():
    return kernel_checks.run_interpreted(__file__)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_on_interpreter(name, interpreted):
    kernel_checks.assert_passed(name, interpreted)


def test_reference_refuses_bad_input():
    from resu_tensor import kernels

    values = torch.randn(5, 7)
    mask = torch.rand(35) < 0.5
    bitmap, prefix = kernels.pack_bitmap(mask), kernels.block_prefix_counts(mask, 1024)
    count = int(mask.sum())
    t = torch.randn(count)
    for op, t1, t2, match in [("div", t, None, "unknown op"), ("add", None, None, "takes 1"),
                              ("addcdiv", t, None, "takes 2"), ("mul_scalar", t, None, "takes 0"),
                              ("addcmul", t, t[:-1], "differ in length"), ("lerp", t.double(), None, "dtype"),
                              ("add", torch.randn(count + 1), None, "selects")]:
        with pytest.raises(ValueError, match=match):
            kernels.update_by_bitmap_(values, bitmap, prefix, 1024, False, op, t1, t2, 1.0)


def test_reference_is_the_aten_op_on_the_gathered_coordinates():
    from resu_tensor import kernels

    values = torch.randn(7, 11)
    mask = torch.rand(77) < 0.4
    bitmap, prefix = kernels.pack_bitmap(mask), kernels.block_prefix_counts(mask, 1024)
    t1, t2 = torch.randn(int((~mask).sum())), torch.rand(int((~mask).sum())) + 0.5
    ours = kernels.update_by_bitmap_(values.clone(), bitmap, prefix, 1024, True, "addcdiv", t1, t2, -0.3)
    expected = values.clone()
    expected.view(-1)[~mask] = values.view(-1)[~mask].addcdiv(t1, t2, value=-0.3)
    assert torch.equal(ours, expected)


# --------------------------------------------------------------------------- GPU
@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu(name):
    CHECKS[name]("cuda", big=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_table_dispatches_update_to_triton():
    from resu_tensor import kernels
    from resu_tensor.kernels._triton_support import FALLEN_BACK

    assert kernels.implementation("update_by_bitmap_", "cuda") is kernels.update_triton.update_by_bitmap_
    values = random_data((257, 515), torch.bfloat16, "cuda")
    mask = random_mask(values.numel(), 0.5, "cuda")
    bitmap, prefix = kernels.pack_bitmap(mask), kernels.block_prefix_counts(mask, 1024)
    ours = kernels.update_by_bitmap_(values.clone(), bitmap, prefix, 1024, False, "mul_scalar", None, None, 0.5)
    assert torch.equal(ours.view(-1)[mask], values.view(-1)[mask] * 0.5)
    assert not FALLEN_BACK, FALLEN_BACK

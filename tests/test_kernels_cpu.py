"""The C loops' CPU implementations of the bitmap ops (kernels.mask_ops_cpu) against their
plain-PyTorch references, on fresh random inputs, in both their forms (AVX-512 where this CPU has
it, and the scalar loops every other CPU runs): same bits, unselected elements untouched, the
same errors before anything is written, and the reference wherever the loops do not apply."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from resu_tensor import kernels
from resu_tensor.kernels import mask_ops, mask_ops_cpu, weight_grad
from resu_asserts import bits

pytestmark = pytest.mark.skipif(not kernels.HAS_CPU_KERNELS, reason="the C loops were not built (no compiler)")


def _has_avx512() -> bool:
    if not kernels.HAS_CPU_KERNELS:
        return False
    from resu_tensor.kernels import _bitmap_cpu
    try:
        _bitmap_cpu.set_simd(_bitmap_cpu.set_simd(True))  # back to what it was
    except ValueError:  # no AVX-512 here (or not built for it)
        return False
    return True


LOOP_FORMS = ["scalar", pytest.param("avx512", marks=pytest.mark.skipif(not _has_avx512(), reason="no AVX-512"))]


@pytest.fixture(scope="module", params=LOOP_FORMS)
def loops(request):
    """Runs the test with the loops' AVX-512 form, then with the scalar form."""
    from resu_tensor.kernels import _bitmap_cpu
    before = _bitmap_cpu.set_simd(request.param == "avx512")
    yield request.param
    _bitmap_cpu.set_simd(before)

LOOP_UPDATES = [("mul_scalar", 0.999), ("mul_scalar", -1.7), ("mul", 1.0), ("add", 1.0), ("addcdiv", -1e-3),
                ("copy", 1.0)]


def _selection(numel: int, density: float, invert: bool, seed: int):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(numel, generator=generator) < density
    selected = ~mask if invert else mask
    return generator, kernels.pack_bitmap(mask), selected


@settings(max_examples=40, deadline=None)
@given(numel=st.integers(1, 5000), density=st.floats(0.0, 1.0), invert=st.booleans(), seed=st.integers(0, 2**16))
def test_count_and_gather_equal_the_references(loops, numel, density, invert, seed):
    from resu_tensor.kernels import _bitmap_cpu
    generator, bitmap, selected = _selection(numel, density, invert, seed)
    count = int(selected.sum())
    assert _bitmap_cpu.count_selected(bitmap.data_ptr(), numel, invert) == count
    values = torch.randn(numel, generator=generator)
    out = mask_ops_cpu.gather_by_bitmap(values, bitmap, None, 1024, invert, count)
    assert torch.equal(bits(out), bits(values[selected]))
    assert mask_ops.held_selection_nbytes(bitmap) == 0  # the loops keep no positions


@settings(max_examples=30, deadline=None)
@given(numel=st.integers(1, 5000), density=st.floats(0.0, 1.0), invert=st.booleans(), seed=st.integers(0, 2**16),
       update=st.sampled_from(LOOP_UPDATES))
def test_updates_give_the_bits_of_the_reference(loops, numel, density, invert, seed, update):
    op, scalar = update
    generator, bitmap, selected = _selection(numel, density, invert, seed)
    count = int(selected.sum())
    values = torch.randn(numel, generator=generator) * 3
    t1 = torch.randn(count, generator=generator) if op != "mul_scalar" else None
    t2 = torch.rand(count, generator=generator) + 1e-3 if op == "addcdiv" else None
    expected = mask_ops.update_by_bitmap_(values.clone(), mask_ops.pack_bitmap(~selected if invert else selected),
                                          None, 1024, invert, op, t1, t2, scalar)
    try:
        out = mask_ops_cpu.update_by_bitmap_(values.clone(), bitmap, None, 1024, invert, op, t1, t2, scalar)
    finally:
        mask_ops.release_selections(bitmap)
    assert torch.equal(bits(out)[~selected], bits(values)[~selected])
    assert torch.equal(bits(out), bits(expected))


def test_a_training_step_runs_the_loops():
    """The dispatch of a CPU float32 weight reaches the C loops (not the reference)."""
    assert kernels.implementation("update_by_bitmap_", "cpu") is mask_ops_cpu.update_by_bitmap_
    assert kernels.implementation("compact_weight_grad_bitmap", "cpu") is mask_ops_cpu.compact_weight_grad_bitmap


def test_a_wrong_count_raises_before_anything_is_written(loops):
    _, bitmap, selected = _selection(999, 0.4, True, 3)
    values = torch.randn(999)
    before = values.clone()
    count = int(selected.sum())
    for op in ("add", "copy", "addcdiv"):
        with pytest.raises(ValueError, match=f"selects {count} elements but count={count + 1}"):
            mask_ops_cpu.update_by_bitmap_(values, bitmap, None, 1024, True, op, torch.ones(count + 1),
                                           torch.ones(count + 1) if op == "addcdiv" else None, 1.0)
        assert torch.equal(values, before)
    with pytest.raises(ValueError, match="selects"):
        mask_ops_cpu.gather_by_bitmap(values, bitmap, None, 1024, True, count - 1)
    mask_ops.release_selections(bitmap)
    too_long = torch.randn(8 * bitmap.numel() + 1)  # the loops would read past the bitmap's end
    with pytest.raises(ValueError, match=f"holds at most {8 * bitmap.numel()} elements, not {too_long.numel()}"):
        mask_ops_cpu.gather_by_bitmap(too_long, bitmap, None, 1024, False, count)
    with pytest.raises(ValueError, match=f"holds at most {8 * bitmap.numel()} elements"):
        mask_ops_cpu.update_by_bitmap_(too_long, bitmap, None, 1024, False, "mul_scalar", None, None, 0.5)


def test_other_dtypes_views_and_autograd_take_the_reference():
    generator, bitmap, selected = _selection(640, 0.5, False, 7)
    count = int(selected.sum())
    half = torch.randn(640, generator=generator).bfloat16()
    assert torch.equal(mask_ops_cpu.gather_by_bitmap(half, bitmap, None, 1024, False, count), half[selected])
    strided = torch.randn(640, 2, generator=generator)[:, 0]  # not contiguous
    assert torch.equal(mask_ops_cpu.gather_by_bitmap(strided, bitmap, None, 1024, False, count), strided[selected])
    zeros = torch._efficientzerotensor(640)  # autograd's zero gradient: no memory behind it
    assert torch.equal(mask_ops_cpu.gather_by_bitmap(zeros, bitmap, None, 1024, False, count), torch.zeros(count))
    negated = torch._neg_view(strided.contiguous())  # its memory holds the values before negation
    assert torch.equal(mask_ops_cpu.gather_by_bitmap(negated, bitmap, None, 1024, False, count), negated[selected])
    leaf = torch.randn(640, generator=generator, requires_grad=True)
    mask_ops_cpu.gather_by_bitmap(leaf, bitmap, None, 1024, False, count).sum().backward()
    assert torch.equal(leaf.grad, selected.float())  # the gradient flows: the reference's index_select ran
    a, b = torch.randn(5, 32, generator=generator).double(), torch.randn(5, 20, generator=generator).double()
    assert torch.equal(mask_ops_cpu.compact_weight_grad_bitmap(a, b, bitmap, None, 1024, False, count, torch.float64),
                       weight_grad.compact_weight_grad_bitmap(a, b, bitmap, None, 1024, False, count, torch.float64))
    values = torch.randn(640, generator=generator)
    t1 = torch.randn(count, generator=generator)
    for op, scalar in [("add", -0.3), ("lerp", 0.1)]:  # forms the loops do not compute as torch rounds them
        expected = mask_ops.update_by_bitmap_(values.clone(), bitmap, None, 1024, False, op, t1, None, scalar)
        out = mask_ops_cpu.update_by_bitmap_(values.clone(), bitmap, None, 1024, False, op, t1, None, scalar)
        assert torch.equal(bits(out), bits(expected))
    mask_ops.release_selections(bitmap)

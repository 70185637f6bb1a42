"""Every PyTorch OpInfo op on a ResuTensor and on a CompactTensor gradient gives the dense answer.

As PyTorch's own DTensor op test does: for each op of ``op_db`` whose samples take a float tensor
of rank 2 as first input, the input is replaced by a ResuTensor (SPARSE, RESU, QRESU) built from
it, or by a CompactTensor gradient of such a weight, and the result is compared with the same op
on the dense reference (``w.dequantize()``, ``w.expand_trainable(g)``). A compact result (optimizer
arithmetic, ``*_like``) is compared on the trainable coordinates it holds.
"""
import pytest
import torch
from torch.testing._internal.common_methods_invocations import op_db
from torch.utils._pytree import tree_flatten, tree_map

from resu_tensor import CompactTensor, ResuTensor

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}

# Ops whose result values are random or uninitialised: only shape and dtype are compared.
UNDETERMINED_VALUES = {"empty_like", "new_empty", "new_empty_strided", "rand_like", "randn_like", "randint_like",
                       "bernoulli", "normal", "nn.functional.dropout", "nn.functional.alpha_dropout",
                       "nn.functional.feature_alpha_dropout", "nn.functional.dropout2d", "nn.functional.dropout3d",
                       "multinomial", "uniform", "nn.functional.rrelu", "empty", "empty_strided", "cauchy",
                       "exponential", "geometric", "log_normal", "svd_lowrank", "pca_lowrank"}
# (op name, variant) → why it is not run. Variant "weight", "grad" or "*".
SKIPS = {
    ("_unsafe_masked_index", "backward"): "a private aten op (leading underscore): the autograd entry takes underscore "
                                          "names for metadata queries (_is_view, ...) and lets them through",
    ("_unsafe_masked_index_put_accumulate", "backward"): "as _unsafe_masked_index",
    ("normal.in_place", "*"): "normal_ on a parameter is nn.init's: it fills the trainable coordinates "
                              "(tests/test_safety.py), so it neither raises nor has a dense reference",
}


def _first_matrix_sample(op):
    """The op's first float32 sample when its input is a matrix (the ops this file covers), else None."""
    if torch.float32 not in op.supported_dtypes("cpu"):
        return None
    try:
        sample = next(iter(op.sample_inputs("cpu", torch.float32, requires_grad=False)))
    except Exception:  # a sample generator needing what this build lacks: not an op on matrices here
        return None
    x = sample.input
    dense_matrix = (isinstance(x, torch.Tensor) and x.layout == torch.strided and x.dtype == torch.float32
                    and x.dim() == 2 and x.numel() >= 4)
    return sample if dense_matrix else None


CASES = [(op, sample) for op in op_db if (sample := _first_matrix_sample(op)) is not None]
CASE_IDS = [f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name for op, _ in CASES]


def _weight(x: torch.Tensor, mode: str) -> ResuTensor:
    """A ResuTensor of ``x``'s shape, half pruned. RESU holds ``x`` itself (θ = x at pruned slots),
    so ops that need a structured input (a positive-definite matrix, ...) get one."""
    generator = torch.Generator().manual_seed(0)
    w = ResuTensor.from_dense(x.detach() + 0.1 * torch.randn(x.shape, generator=generator), sparsity=0.5)
    if mode == "resu":
        w.enter_resu(0.1, generator=generator)
        w.values.copy_(x)
    elif mode == "qresu":
        w.enter_resu(0.1, generator=generator, quantize_bits=8, group_size=None)
    assert w.dequantize().abs().sum() > 0
    return w


def _run(op, sample, first):
    """The op's result, or the exception it raised."""
    torch.manual_seed(1)
    try:
        return op(first, *sample.args, **sample.kwargs)
    except Exception as error:  # compared with the reference's own error
        return error


def _is_in_place(op) -> bool:
    return op.name.endswith("_") or op.variant_test_name == "in_place"


def _read(t):
    """A ResuTensor result (a layout view: ``w.t()``, a row block) reads as its W_eff."""
    return t.dequantize() if isinstance(t, ResuTensor) else t


def _compare(op, out, expected, weight):
    if isinstance(expected, Exception):
        assert isinstance(out, type(expected)), f"{op.name}: the dense input raised {expected!r}, got {out!r}"
        return
    if _is_in_place(op):  # by design: in-place ops without a handler refuse a ResuTensor/CompactTensor
        assert isinstance(out, TypeError) and "cannot write into" in str(out), out
        return
    if isinstance(out, Exception):
        raise out
    if isinstance(out, CompactTensor):  # optimizer arithmetic: holds the trainable coordinates
        expected = weight.gather_trainable(expected.t() if out.transposed else expected)
        out = out.flat
    out = tree_map(_read, out)
    outs, _ = tree_flatten(out)
    refs, _ = tree_flatten(expected)
    assert len(outs) == len(refs)
    for got, want in zip(outs, refs):
        if isinstance(want, torch.Tensor):
            assert type(got) is torch.Tensor, f"{op.name} returned {type(got).__name__}, expected a plain tensor"
            assert got.shape == want.shape and got.dtype == want.dtype
            if op.name not in UNDETERMINED_VALUES:
                torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCE)
        elif isinstance(want, float) and op.name not in UNDETERMINED_VALUES:
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5, nan_ok=True)
        else:
            assert got == want or op.name in UNDETERMINED_VALUES


def _skip(op, variant):
    name = f"{op.name}.{op.variant_test_name}" if op.variant_test_name else op.name
    reason = SKIPS.get((name, variant)) or SKIPS.get((name, "*"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("op, sample", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_op_on_resu_tensor_reads_the_effective_weight(op, sample, mode):
    _skip(op, "weight")
    w = _weight(sample.input, mode)
    _compare(op, _run(op, sample, w), _run(op, sample, w.dequantize()), w)


@pytest.mark.parametrize("op, sample", CASES, ids=CASE_IDS)
def test_op_on_compact_gradient_reads_the_dense_gradient(op, sample):
    _skip(op, "grad")
    w = _weight(sample.input, "resu")
    grad = w.compact(torch.randn(w.trainable_count, generator=torch.Generator().manual_seed(2)))
    _compare(op, _run(op, sample, grad), _run(op, sample, w.expand_trainable(grad)), w)


def _float_outputs(out):
    flat, _ = tree_flatten(out)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]


def _backward(op, sample, first):
    """Gradient of a fixed random projection of the op's float outputs, or the error it raised."""
    out = _run(op, sample, first)
    if isinstance(out, Exception):
        return out
    outputs = _float_outputs(out)
    if not outputs:
        return None
    generator = torch.Generator().manual_seed(3)
    loss = sum((t * torch.randn(t.shape, generator=generator)).sum() for t in outputs)
    try:
        loss.backward()
    except Exception as error:  # compared with the reference's own error
        return error
    return first.grad


DIFFERENTIABLE = [i for i, (op, _) in enumerate(CASES) if op.supports_autograd and op.name not in UNDETERMINED_VALUES]


@pytest.mark.parametrize("op, sample", [CASES[i] for i in DIFFERENTIABLE], ids=[CASE_IDS[i] for i in DIFFERENTIABLE])
@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_backward_through_an_op_hands_the_weight_its_compact_gradient(op, sample, mode):
    _skip(op, "backward")
    w = _weight(sample.input, mode)
    reference = w.dequantize().requires_grad_()
    expected = _backward(op, sample, reference)
    parameter = torch.nn.Parameter(w)
    got = _backward(op, sample, parameter)
    if isinstance(expected, Exception) or expected is None:
        assert type(got) is type(expected), f"{op.name}: the dense input gave {expected!r}, got {got!r}"
        return
    if isinstance(got, Exception):
        raise got
    assert isinstance(got, CompactTensor) and got.trainable_key == w.trainable_key
    # the gradient of W_eff at the trainable coordinates, nothing else
    torch.testing.assert_close(got.flat, w.gather_trainable(expected), equal_nan=True, **TOLERANCE)


def test_the_sampled_ops_cover_pytorchs_matrix_ops_with_few_skips():
    assert len(CASES) >= 150
    assert len(SKIPS) <= 0.05 * len(CASES)

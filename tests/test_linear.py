"""linear / mm / addmm / matmul with a ResuTensor weight vs the masked-dense reference."""
import pytest
import torch
import torch.nn.functional as F

import resu_tensor as rt
from masked_reference import MaskedDenseWeight

MODES = ["dense", "sparse", "resu", "resu_unfrozen"]


def make_weight(mode, shape=(24, 40), dtype=torch.float32):
    w = rt.ResuTensor.from_dense(torch.randn(shape, dtype=dtype), sparsity=0.0 if mode == "dense" else 0.6)
    if mode.startswith("resu"):
        w.enter_resu(epsilon=0.5, freeze_active=(mode == "resu"))
    return torch.nn.Parameter(w)


def reference_for(w):
    return MaskedDenseWeight(w.dequantize(), w.trainable_mask())


CALLS = {
    "F.linear": lambda x, w, b: F.linear(x, w, b),
    "aten.linear": lambda x, w, b: torch.ops.aten.linear(x, w, b),
    "matmul_t": lambda x, w, b: torch.matmul(x, w.t()) + (0 if b is None else b),
    "at_T": lambda x, w, b: (x @ w.T) + (0 if b is None else b),
    "mm": lambda x, w, b: torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t()),
    "aten.mm": lambda x, w, b: torch.ops.aten.mm(x, w.t()) if b is None else torch.ops.aten.addmm(b, x, w.t()),
}


CASES = [(call, shape) for call in CALLS for shape in [(7,), (3, 5)] if len(shape) == 1 or "mm" not in call]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("call,batch_shape", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_forward_backward_match_reference(mode, call, bias, batch_shape):
    w = make_weight(mode)
    ref = reference_for(w)
    b = torch.randn(w.shape[0], requires_grad=True) if bias else None
    b_ref = b.detach().clone().requires_grad_() if bias else None
    x = torch.randn(*batch_shape, w.shape[1], requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y = CALLS[call](x, w, b)
    y_ref = F.linear(x_ref, ref.weight(), b_ref)
    torch.testing.assert_close(y, y_ref)
    grad_out = torch.randn_like(y_ref)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    torch.testing.assert_close(x.grad, x_ref.grad)
    if bias:
        torch.testing.assert_close(b.grad, b_ref.grad)
    assert isinstance(w.grad, rt.CompactTensor)
    assert w.grad.flat.numel() == w.trainable_count
    torch.testing.assert_close(w.grad.flat, ref.flat.grad)
    torch.testing.assert_close(w.expand_trainable(w.grad), ref.dense_grad())


@pytest.mark.parametrize("mode", MODES)
def test_weight_on_the_right_without_transpose(mode):
    """x @ W with W (out, in): the weight's logical orientation used as is."""
    w = make_weight(mode)
    ref = reference_for(w)
    x = torch.randn(2, 6, w.shape[0])
    y = x @ w
    y_ref = x @ ref.weight()
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(w.grad.flat, ref.flat.grad)


def test_one_dimensional_input():
    w = make_weight("sparse")
    x = torch.randn(w.shape[1])
    torch.testing.assert_close(F.linear(x, w), F.linear(x, w.dequantize()))


def test_linear_in_an_nn_module():
    from torchao.quantization import quantize_

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    dense = [m.weight.detach().clone() for m in (model[0], model[2])]
    x = torch.randn(9, 16)
    y_dense = model(x)
    quantize_(model, rt.resu_config(sparsity=0.0))
    assert all(isinstance(m.weight, rt.ResuTensor) for m in (model[0], model[2]))
    torch.testing.assert_close(model(x), y_dense)
    assert torch.equal(model[0].weight.dequantize(), dense[0])


def test_repeated_backward_accumulates_compact_grads():
    w = make_weight("resu")
    ref = reference_for(w)
    for _ in range(3):
        x = torch.randn(5, w.shape[1])
        F.linear(x, w).pow(2).sum().backward()
        F.linear(x, ref.weight()).pow(2).sum().backward()
    torch.testing.assert_close(w.grad.flat, ref.flat.grad)

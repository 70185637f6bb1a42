"""Existing training code runs unchanged on a model whose Linear weights are ResuTensors."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from masked_reference import MaskedDenseWeight


def make_model(sparsity=0.5, resu=False):
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    quantize_(model, rt.resu_config(sparsity=sparsity))
    if resu:
        rt.enter_resu_(model, epsilon=0.2)
    return model


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def batch(n=16):
    return torch.randn(n, 20), torch.randint(0, 5, (n,))


def test_autocast_bfloat16_on_cpu():
    model = make_model(resu=True)
    w = model[0].weight
    ref = MaskedDenseWeight(w.dequantize(), w.trainable_mask())
    x = torch.randn(6, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, w, model[0].bias)
        y_ref = F.linear(x, ref.weight(), model[0].bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.flat, ref.flat.grad)


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_grad_clipping(clip):
    model = make_model(resu=True)
    w = model[0].weight
    ref = MaskedDenseWeight(w.dequantize(), w.trainable_mask())
    x, y = batch()
    F.cross_entropy(model(x), y).mul(50).backward()
    h = F.relu(F.linear(x, ref.weight(), model[0].bias))
    F.cross_entropy(F.linear(h, model[2].weight.dequantize(), model[2].bias), y).mul(50).backward()
    dense_grad = ref.dense_grad()
    if clip == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
        returned = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        torch.testing.assert_close(returned, total)
        expected = dense_grad * (0.5 / (total + 1e-6))
    else:
        nn.utils.clip_grad_value_(model.parameters(), clip_value=0.01)
        expected = dense_grad.clamp(-0.01, 0.01)
    torch.testing.assert_close(w.expand_trainable(w.grad), expected)


def test_gradient_accumulation_and_zero_grad_modes():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [batch() for _ in range(3)]
    w = model[0].weight
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        for x, y in batches:
            loss_fn(model, x, y).backward()
        accumulated = w.grad.flat.clone()
        opt.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert w.grad is None
        else:
            assert isinstance(w.grad, rt.CompactTensor) and w.grad.flat.abs().sum() == 0
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        (loss_fn(model, x, y) * 3).backward()
        torch.testing.assert_close(w.grad.flat, accumulated)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_model_to_dtype(dtype):
    model = make_model(resu=True)
    w = model[0].weight
    before = w.dequantize()
    if dtype == torch.float64:
        with pytest.raises(TypeError, match="supports dtypes"):
            model.to(dtype)
        return
    model.to(dtype)
    assert model[0].weight is w and w.dtype == dtype and w.values.dtype == dtype
    assert w.mode == rt.Mode.RESU
    torch.testing.assert_close(w.dequantize(), before.to(dtype))
    out = model(torch.randn(3, 20, dtype=dtype))
    out.float().sum().backward()
    assert w.grad.dtype == dtype


def test_deepcopy_is_independent():
    model = make_model(resu=True)
    clone = copy.deepcopy(model)
    w, w2 = model[0].weight, clone[0].weight
    assert isinstance(w2, rt.ResuTensor) and w2 is not w and isinstance(w2, nn.Parameter)
    assert torch.equal(w2.dequantize(), w.dequantize()) and w2.mode == w.mode
    assert w2.values.data_ptr() != w.values.data_ptr()
    opt = torch.optim.SGD(clone.parameters(), lr=1.0)
    loss_fn(clone, *batch()).backward()
    opt.step()
    assert not torch.equal(w2.dequantize(), w.dequantize())


def test_eval_inference_mode():
    model = make_model(resu=True).eval()
    x = torch.randn(4, 20)
    with torch.inference_mode():
        y = model(x)
    assert not y.requires_grad
    h = F.relu(F.linear(x, model[0].weight.dequantize(), model[0].bias))
    torch.testing.assert_close(y, F.linear(h, model[2].weight.dequantize(), model[2].bias))


def test_save_and_load_weights_only_into_fresh_model():
    model = make_model(resu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, *batch()).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh = make_model(sparsity=0.2)  # different mask and mode: the checkpoint must win
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    w_fresh = fresh[0].weight
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["optim"])
    assert fresh[0].weight is w_fresh
    for a, b in zip(model.parameters(), fresh.parameters()):
        if isinstance(a, rt.ResuTensor):
            assert b.mode == a.mode and torch.equal(b.mask(), a.mask()) and b.trainable_key == a.trainable_key
            assert torch.equal(b.dequantize(), a.dequantize())
        else:
            assert torch.equal(a, b)
    # Training continues identically from the restored state.
    x, y = batch()
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        loss_fn(m, x, y).backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        da = a.dequantize() if isinstance(a, rt.ResuTensor) else a
        db = b.dequantize() if isinstance(b, rt.ResuTensor) else b
        assert torch.equal(da, db)

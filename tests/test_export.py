"""Export for inference: to_dense_ (plain Parameters, M⊙W) and to_semi_structured_ (2:4, CUDA)."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.export import to_dense_, to_semi_structured_


def small_model(sparsity=0.6, width=64):
    model = nn.Sequential(nn.Linear(32, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 8))
    quantize_(model, rt.resu_config(sparsity=sparsity))
    return model


def train_a_little(model, steps=3):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        F.cross_entropy(model(torch.randn(16, 32)), torch.randint(0, 8, (16,))).backward()
        opt.step()
        opt.zero_grad()


def test_to_dense_gives_plain_parameters_with_masked_weights():
    model = small_model()
    train_a_little(model)
    model[2].weight.requires_grad_(False)
    expected = {i: model[i].weight.values.masked_fill(~model[i].weight.mask(), 0) for i in (0, 2, 4)}
    masks = {i: model[i].weight.mask() for i in (0, 2, 4)}
    x = torch.randn(5, 32)
    y = model(x)
    assert to_dense_(model) is model
    for i in (0, 2, 4):
        w = model[i].weight
        assert type(w) is nn.Parameter and type(w.data) is torch.Tensor
        assert torch.equal(w, expected[i]) and not w[~masks[i]].any() and w[masks[i]].ne(0).any()
    assert model[0].weight.requires_grad and not model[2].weight.requires_grad
    assert not any(isinstance(p, rt.ResuTensor) for p in model.parameters())
    torch.testing.assert_close(model(x), y)
    buffer = io.BytesIO()  # saves and loads like any model now
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert all(type(t) is torch.Tensor for t in state.values())


def test_to_dense_refuses_uncommitted_layers_and_changes_nothing():
    model = small_model()
    rt.enter_resu_(model, filter_fn=lambda m, name: name == "2")
    model[4].weight.enter_resu(quantize_bits=4, group_size=16)
    with pytest.raises(ValueError, match=r"'2 \(resu\)', '4 \(qresu\)'.*commit_"):
        to_dense_(model)
    assert all(isinstance(model[i].weight, rt.ResuTensor) for i in (0, 2, 4))
    rt.commit_(model, strategy="magnitude", filter_fn=lambda m, name: name in ("2", "4"))
    to_dense_(model)
    assert not any(isinstance(p, rt.ResuTensor) for p in model.parameters())


def test_to_dense_dense_mode_filter_and_shared_weights():
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(16, 4))
    quantize_(model, rt.resu_config(sparsity=0.0))  # DENSE
    dense_before = model[3].weight.dequantize()
    with pytest.raises(ValueError, match="filter_fn matched none"):  # a filter choosing nothing is a mistake
        rt.enter_resu_(model, filter_fn=lambda m, name: False)
    to_dense_(model, filter_fn=lambda m, name: name == "3")
    assert torch.equal(model[3].weight, dense_before) and isinstance(model[0].weight, rt.ResuTensor)
    to_dense_(model)
    assert model[0].weight is model[2].weight and type(model[0].weight) is nn.Parameter


def test_to_semi_structured_errors_on_cpu():
    model = small_model(sparsity=0.5)  # element-wise mask: not 2:4
    with pytest.raises(ValueError, match="no 2:4 mask"):
        to_semi_structured_(model)
    rt.prune_(model, granularity="2:4")
    assert all(w.nm_pattern == (2, 4) for _, _, w in rt.resu_weights(model))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        to_semi_structured_(model)
    model.half()
    with pytest.raises(ValueError, match="CUDA"):
        to_semi_structured_(model)
    rt.enter_resu_(model)
    with pytest.raises(ValueError, match="commit"):
        to_semi_structured_(model)
    dense = small_model(sparsity=0.0).half()
    with pytest.raises(ValueError, match="no 2:4 mask"):
        to_semi_structured_(dense)
    assert all(isinstance(w, rt.ResuTensor) for _, _, w in rt.resu_weights(model))
    with pytest.raises(ValueError, match="no ResuTensor weights"):
        to_semi_structured_(nn.Sequential(nn.Linear(4, 4)))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_to_semi_structured_on_cuda(dtype):
    from torch.sparse import SparseSemiStructuredTensor

    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need compute capability >= 8.0")
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256)).to("cuda", dtype)
    quantize_(model, rt.resu_config(sparsity=0.0))
    rt.prune_(model, granularity="2:4")
    masked = [model[i].weight.values.masked_fill(~model[i].weight.mask(), 0) for i in (0, 2)]
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    with torch.inference_mode():
        y = model(x)
    to_semi_structured_(model)
    for i, w in zip((0, 2), masked):
        assert isinstance(model[i].weight.data, SparseSemiStructuredTensor) and not model[i].weight.requires_grad
        assert torch.equal(model[i].weight.to_dense(), w)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), y, rtol=2e-2, atol=2e-2)

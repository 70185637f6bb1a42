"""Bad input gets a clear ValueError/TypeError naming what was wrong and what is accepted."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        rt.ResuTensor.from_dense(torch.randn(4, 8), sparsity=sparsity)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        rt.resu_config(sparsity=sparsity)


def test_sparsity_wrong_type():
    with pytest.raises(TypeError, match="sparsity must be a float"):
        rt.ResuTensor.from_dense(torch.randn(4, 8), sparsity="0.5")


@pytest.mark.parametrize("shape", [(8,), ()])  # N-D (conv) weights are accepted: tests/test_layer_weights.py
def test_non_2d_weights(shape):
    with pytest.raises(ValueError, match="2-D"):
        rt.ResuTensor.from_dense(torch.randn(shape))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.uint8, torch.float64])
def test_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match="supports dtypes"):
        rt.ResuTensor.from_dense(torch.ones(4, 8, dtype=dtype))


def test_unknown_method_and_strategy_names():
    with pytest.raises(ValueError, match="unknown pruning method 'wandaa'; accepted: magnitude, random"):
        rt.ResuTensor.from_dense(torch.randn(4, 8), sparsity=0.5, method="wandaa")
    with pytest.raises(ValueError, match="unknown pruning method"):
        rt.resu_config(sparsity=0.5, method="topk")
    w = rt.ResuTensor.from_dense(torch.randn(4, 8), sparsity=0.5).enter_resu()
    with pytest.raises(ValueError, match="unknown commit strategy 'best'; accepted: amnesty, wanda_reprune, magnitude, simple"):
        w.commit("best")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_at_prune_time(bad):
    weight = torch.randn(4, 8)
    weight[1, 2] = bad
    with pytest.raises(ValueError, match="1 NaN/Inf values"):
        rt.ResuTensor.from_dense(weight, sparsity=0.5)
    w = rt.ResuTensor.from_dense(weight)  # DENSE wrapping does not score, so it is allowed
    with pytest.raises(ValueError, match="NaN/Inf"):
        w.prune(0.5)


def test_shape_mismatch_in_linear():
    w = rt.ResuTensor.from_dense(torch.randn(4, 8), sparsity=0.5)
    with pytest.raises(ValueError, match="input has 7 features .* expects 8"):
        F.linear(torch.randn(3, 7), w)
    with pytest.raises(ValueError, match="shape mismatch"):
        torch.randn(3, 8) @ w  # x @ W needs 4 features


def test_wrong_mode_transitions():
    w = rt.ResuTensor.from_dense(torch.randn(4, 8))
    with pytest.raises(ValueError, match="enter_resu needs 'sparse'"):
        w.enter_resu()
    with pytest.raises(ValueError, match="commit needs 'resu'"):
        w.commit()
    w.prune(0.5).enter_resu()
    with pytest.raises(ValueError, match="prune: the weight is in mode 'resu'"):
        w.prune(0.6)


def test_quantize_twice_and_copy_from_dense():
    model = nn.Sequential(nn.Linear(8, 4))
    quantize_(model, rt.resu_config(sparsity=0.5))
    with pytest.raises(ValueError, match="already a ResuTensor"):
        rt.training.config._resu_transform(model[0], rt.resu_config())
    # A plain tensor that disagrees with the weight at its frozen (pruned) coordinates cannot be
    # written into the trainable ones alone.
    with pytest.raises(ValueError, match="differs from this 'sparse' weight at 16 of its 16 frozen"):
        with torch.no_grad():
            model[0].weight.copy_(torch.randn(4, 8))


def test_mixing_plain_and_compact_tensors():
    w = nn.Parameter(rt.ResuTensor.from_dense(torch.randn(4, 8), sparsity=0.5))
    F.linear(torch.randn(2, 8), w).sum().backward()
    # A gradient reads as its dense expansion: a plain tensor of another shape fails as it would
    # with a dense gradient, one of its shape gives the dense sum (values outside the trainable set kept).
    with pytest.raises(RuntimeError, match="must match"):
        w.grad.add(torch.randn(3, 3))
    noise = torch.randn(4, 8)
    assert torch.equal(w.grad.add(noise), w.expand_trainable(w.grad) + noise)
    # Writing into it refuses a plain tensor it cannot place
    with pytest.raises(TypeError, match="gather_trainable"):
        w.grad.add_(noise)


def test_bad_model_and_optimizer_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        rt.prune_(torch.randn(3, 3), 0.5)
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        rt.reset_optimizer_state_({}, None)


def test_cuda_graph_step_needs_a_capturable_optimizer_and_a_cuda_model():
    model = nn.Linear(8, 4)
    quantize_(model, rt.resu_config(sparsity=0.5))
    with pytest.raises(ValueError, match="capturable=True"):
        rt.CudaGraphStep(lambda: None, model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="needs the model on a CUDA device; weight is on cpu"):
        rt.CudaGraphStep(lambda: None, model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="callable"):
        rt.CudaGraphStep(None, model, torch.optim.SGD(model.parameters(), lr=0.1))

"""The public API: quantize_, model-level lifecycle functions and their tensor methods."""
import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt


def make_model():
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))


def test_quantize_sparse_and_dense():
    model = make_model()
    originals = [m.weight.detach().clone() for m in model if isinstance(m, nn.Linear)]
    quantize_(model, rt.resu_config(sparsity=0.5, method="magnitude"))
    for m, original in zip([m for m in model if isinstance(m, nn.Linear)], originals):
        w = m.weight
        assert isinstance(w, rt.ResuTensor) and isinstance(w, nn.Parameter) and w.requires_grad
        assert w.mode == rt.Mode.SPARSE == "sparse" and w.sparsity == 0.5
        # magnitude: every kept |w| >= every pruned |w|, kept values unchanged, pruned exactly zero
        mask = w.mask()
        assert original.abs()[mask].min() >= original.abs()[~mask].max()
        assert torch.equal(w.dequantize()[mask], original[mask])
        assert torch.all(w.dequantize()[~mask] == 0)
    dense_model = make_model()
    quantize_(dense_model, rt.resu_config(sparsity=0.0))
    assert all(m.weight.mode == rt.Mode.DENSE and m.weight.sparsity == 0.0 for m in dense_model if isinstance(m, nn.Linear))


def test_filter_fn_selects_layers():
    model = make_model()
    quantize_(model, rt.resu_config(sparsity=0.0), filter_fn=lambda m, name: isinstance(m, nn.Linear) and name != "4")
    assert not isinstance(model[4].weight, rt.ResuTensor)
    rt.prune_(model, sparsity=0.7, filter_fn=lambda m, name: name == "0")
    assert model[0].weight.mode == rt.Mode.SPARSE and model[2].weight.mode == rt.Mode.DENSE
    assert [name for name, _, _ in rt.resu_weights(model)] == ["0", "2"]


def test_full_lifecycle_keeps_the_same_parameter_object():
    model = make_model()
    quantize_(model, rt.resu_config(sparsity=0.0))
    params = list(model.parameters())
    w = model[2].weight
    rt.prune_(model, sparsity=0.7, method="magnitude")
    assert w.mode == rt.Mode.SPARSE and abs(w.sparsity - 0.7) < 1e-3
    active_before = w.dequantize()[w.mask()]
    rt.enter_resu_(model, epsilon=0.1, freeze_active=True)
    assert w.mode == rt.Mode.RESU and w.trainable_side == "pruned"
    theta = w.dequantize()[~w.mask()]
    sigma_a = active_before.std()
    assert theta.abs().sum() > 0 and abs(theta.std() / (0.1 * sigma_a) - 1) < 0.1  # N(0, (ε σ_A)²)
    assert torch.equal(w.dequantize()[w.mask()], active_before)
    rt.commit_(model, strategy="magnitude")
    assert w.mode == rt.Mode.SPARSE and abs(w.sparsity - 0.7) < 1e-3
    rt.enter_resu_(model)
    rt.commit_(model, strategy="simple")
    assert w.sparsity == 0.0 and w.mode == rt.Mode.SPARSE
    assert list(model.parameters()) == params and model[2].weight is w


def test_commit_magnitude_can_resurrect():
    w = rt.ResuTensor.from_dense(torch.randn(16, 32), sparsity=0.5).enter_resu(epsilon=0.0)
    pruned = ~w.mask()
    idx = pruned.nonzero()[:5]
    w.values[idx[:, 0], idx[:, 1]] = 100.0  # five θ grew large: they must come back
    w.commit("magnitude")
    assert w.mask()[idx[:, 0], idx[:, 1]].all() and w.sparsity == 0.5


def test_methods_mirror_model_functions_and_random_is_reproducible():
    weight = torch.randn(16, 32)
    a = rt.ResuTensor.from_dense(weight, sparsity=0.5, method="random", generator=torch.Generator().manual_seed(3))
    b = rt.ResuTensor.from_dense(weight).prune(0.5, method="random", generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.mask(), b.mask()) and a.sparsity == 0.5


def test_unfrozen_resu_trains_everything():
    w = rt.ResuTensor.from_dense(torch.randn(8, 16), sparsity=0.5).enter_resu(freeze_active=False)
    assert w.trainable_count == w.numel() and w.trainable_mask().all()


def test_dequantize_returns_a_copy_and_repr_is_readable():
    w = rt.ResuTensor.from_dense(torch.randn(8, 16), sparsity=0.25)
    d = w.dequantize()
    d.fill_(1.0)
    assert not torch.equal(w.dequantize(), d)
    identity = ", mode=sparse, sparsity=0.2500, mask=bitmap, trainable=active)"
    body = repr(w.dequantize()).replace("\n", "\n" + " " * len("ResuTensor("))
    assert repr(w) == str(w) == "ResuTensor(" + body + identity
    assert str(rt.Mode.RESU) == "resu"


@pytest.mark.parametrize("freeze_active", [True, False])
def test_trainable_mask_matches_mode(freeze_active):
    w = rt.ResuTensor.from_dense(torch.randn(8, 16), sparsity=0.5)
    assert torch.equal(w.trainable_mask(), w.mask())
    w.enter_resu(freeze_active=freeze_active)
    expected = torch.ones_like(w.mask()) if not freeze_active else ~w.mask()
    assert torch.equal(w.trainable_mask(), expected)

"""Stock optimizers on ResuTensor parameters: trajectories equal the masked-dense reference
(a stock optimizer on the flat trainable vector) and frozen coordinates stay bit-identical."""
import pytest
import torch
import torch.nn.functional as F

import resu_tensor as rt
from masked_reference import MaskedDenseWeight

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, foreach=False),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "adamw_no_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5, foreach=False),
}


def make_pair(mode):
    w = rt.ResuTensor.from_dense(torch.randn(16, 48), sparsity=0.0 if mode == "dense" else 0.7)
    if mode.startswith("resu"):
        w.enter_resu(epsilon=0.3, freeze_active=(mode == "resu"))
    w = torch.nn.Parameter(w)
    return w, MaskedDenseWeight(w.dequantize(), w.trainable_mask())


@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "resu_unfrozen"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_twenty_steps_match_reference(mode, name):
    w, ref = make_pair(mode)
    bias = torch.nn.Parameter(torch.randn(16))
    bias_ref = torch.nn.Parameter(bias.detach().clone())
    opt = OPTIMIZERS[name]([w, bias])
    opt_ref = OPTIMIZERS[name]([ref.flat, bias_ref])
    frozen = ~w.trainable_mask()
    frozen_before = w.dequantize()[frozen]
    for _ in range(20):
        x, target = torch.randn(8, 48), torch.randn(8, 16)
        for model_w, b, o in ((w, bias, opt), (ref.weight(), bias_ref, opt_ref)):
            o.zero_grad()
            F.mse_loss(F.linear(x, model_w, b), target).backward()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(w.dequantize(), ref.weight().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias, bias_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.dequantize()[frozen], frozen_before)  # bit-identical, weight decay included
    assert w.dequantize()[~frozen].ne(ref.frozen[~frozen]).any()  # the trainable ones did move


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum_wd"])
def test_optimizer_state_is_compact(name):
    w, _ = make_pair("sparse")
    opt = OPTIMIZERS[name]([w])
    F.linear(torch.randn(4, 48), w).sum().backward()
    opt.step()
    tensors = [v for v in opt.state[w].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert tensors and all(isinstance(v, rt.CompactTensor) for v in tensors)
    assert all(v.flat.numel() == w.trainable_count < w.numel() for v in tensors)


def test_stale_state_raises_at_step_and_reset_fixes_it():
    w, _ = make_pair("sparse")
    model = torch.nn.Linear(48, 16, bias=False)
    model.weight = w
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x = torch.randn(4, 48)
    model(x).sum().backward()
    opt.step()
    rt.enter_resu_(model)
    model(x).sum().backward()
    before = w.dequantize()
    with pytest.raises(ValueError, match="earlier trainable set"):
        opt.step()
    assert torch.equal(w.dequantize(), before)  # refused before anything moved
    assert rt.reset_optimizer_state_(opt, model) == 1
    opt.step()
    assert opt.state[w]["exp_avg"].flat.numel() == w.trainable_count

"""Commit strategies through the tensor and model APIs."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt


def resu_weight(shape=(8, 16), sparsity=0.5, **options):
    return rt.ResuTensor.from_dense(torch.randn(shape), sparsity=sparsity).enter_resu(epsilon=1.0, **options)


def test_amnesty_reserves_slots_for_resurrected_coordinates():
    w = resu_weight()
    old = w.mask()
    merged = w.dequantize()
    stats = w.commit("amnesty", cycle=0, num_cycles=4)  # r(0) = 0.10 of n_keep = 64 → 6 slots
    new = w.mask()
    assert w.mode == rt.Mode.SPARSE and w.sparsity == 0.5
    assert stats.reserved_for_resurrected == 6 and stats.resurrected_kept == 6 and stats.active_kept == 58
    assert int((new & ~old).sum()) == 6
    # the six resurrected are the largest |θ|, the kept active ones the largest |W_A|
    theta = merged.abs().masked_fill(old, -1)
    assert set(torch.topk(theta.view(-1), 6).indices.tolist()) == set((new & ~old).view(-1).nonzero().view(-1).tolist())
    assert torch.equal(w.dequantize()[new], merged[new]) and torch.all(w.dequantize()[~new] == 0)


def test_gradient_score_needs_tracked_gradients():
    w = resu_weight()
    with pytest.raises(ValueError, match="grad"):
        w.commit("amnesty", score="gradient")
    w = nn.Parameter(resu_weight(track_gradients=True))
    opt = torch.optim.SGD([w], lr=0.0)  # lr 0: θ stays, only |g| is accumulated
    for _ in range(3):
        F.linear(torch.randn(4, 16), w).sum().backward()
        opt.step()
        opt.zero_grad()
    assert w.grad_abs_sum.abs().sum() > 0 and w.nbytes_breakdown()["grad_stats"] == 4 * w.trainable_count
    stats = w.commit("amnesty", score="gradient")
    assert stats.budget_used == 64


@pytest.mark.parametrize("strategy", ["amnesty", "magnitude"])
def test_nm_masks_stay_nm_through_commit(strategy):
    w = rt.ResuTensor.from_dense(torch.randn(8, 16)).prune(None, granularity="2:4").enter_resu(epsilon=2.0)
    w.commit(strategy)
    kept_per_group = w.mask().view(8, 4, 4).sum(-1)
    assert torch.all(kept_per_group == 2) and w.nm_pattern == (2, 4)


def test_wanda_reprune_through_the_model_api():
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_(model, rt.resu_config(sparsity=0.5))
    rt.enter_resu_(model, epsilon=1.0)
    with pytest.raises(ValueError, match="calibration"):
        rt.commit_(model, strategy="wanda_reprune")
    x = torch.randn(32, 16) * torch.linspace(0.1, 3.0, 16)  # features of very different scale
    merged = model[0].weight.dequantize()
    stats = rt.commit_(model, strategy="wanda_reprune", calibration=[x])
    norms = x.pow(2).sum(0).sqrt()
    expected = torch.topk((merged.abs() * norms).view(-1), 64).indices
    assert set(model[0].weight.mask().view(-1).nonzero().view(-1).tolist()) == set(expected.tolist())
    assert list(stats) == ["0"] and stats["0"].budget_used == 64
    assert "budget_used" in rt.format_stats_table(stats)


@pytest.mark.parametrize("strategy", ["amnesty", "magnitude", "wanda_reprune"])
def test_a_row_pruned_layer_keeps_the_same_count_in_every_row_through_commits(strategy):
    cols = 37  # 0.5 · 37 is not an integer: every row keeps 37 − round(18.5) = 19
    w = rt.ResuTensor.from_dense(torch.randn(6, cols), sparsity=0.5, method="magnitude")
    w.prune(0.5, granularity="row")
    norms = torch.rand(cols) + 0.5
    for cycle, sparsity in enumerate([None, 0.7]):  # then a different sparsity, as a schedule may ask
        w.enter_resu(epsilon=2.0, generator=torch.Generator().manual_seed(cycle))  # large θ: amnesty admits some
        old = w.mask()
        stats = w.commit(strategy, sparsity=sparsity, cycle=0, num_cycles=2, input_norms=norms)
        expected = cols - round((0.5 if sparsity is None else sparsity) * cols)
        assert w.mask().sum(1).tolist() == [expected] * 6, w.mask().sum(1).tolist()
        assert torch.all(w.dequantize()[~w.mask()] == 0)
        if strategy == "amnesty":
            assert stats.resurrected_kept == int((w.mask() & ~old).sum()) > 0

"""RESU-Selective: consistency filtering and the static subset."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resu_tensor as rt
from resu_tensor.method.selective import consistency_filter_, subset_mask


def reference_filter(g, m, v, beta=0.9, tau=0.5, screen=0.5, select=0.2, delta=1e-8):
    """Plain-Python reading of the consistency filter (docs/method.md), element by element."""
    m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g)]
    v = [beta * vi + (1 - beta) * abs(gi) for vi, gi in zip(v, g)]
    c = [abs(mi) / (vi + delta) for mi, vi in zip(m, v)]
    p = len(g)
    by_mag = sorted(range(p), key=lambda i: -abs(g[i]))[: max(1, round(screen * p))]
    candidates = [i for i in by_mag if c[i] > tau]
    chosen = sorted(candidates, key=lambda i: -c[i] * abs(g[i]))[: int(select * p)]
    return [c[i] * g[i] if i in chosen else 0.0 for i in range(p)], m, v


def topk_filter(grad, m, v, config):
    """The filter as it was before its two kernels (plain PyTorch, exact top-k counts, one host
    sync), kept as the end-to-end reference: without ties it selects the same coordinates."""
    beta, tau, screen, select, delta, _ = config
    g = grad.float()
    m.mul_(beta).add_((1 - beta) * g)
    v.mul_(beta).add_((1 - beta) * g.abs())
    consistency = m.float().abs() / (v.float() + delta)
    p = g.numel()
    screened = torch.zeros(p, dtype=torch.bool, device=g.device)
    screened[torch.topk(g.abs(), min(p, max(1, round(screen * p))), sorted=False).indices] = True
    candidates = screened & (consistency > tau)
    score = torch.where(candidates, consistency * g.abs(), -1.0)
    n_select = min(int(candidates.sum()), int(select * p))
    chosen = torch.zeros(p, dtype=torch.bool, device=g.device)
    if n_select:
        chosen[torch.topk(score, n_select, sorted=False).indices] = True
    return torch.where(chosen, consistency * g, 0.0).to(grad.dtype)


def test_filter_on_a_hand_made_example():
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.1, 0.2, 4.0, -5.0, 0.3, 0.05])
    m = torch.tensor([0.5, 1.0, 0.0, 0.2, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0])  # θ6's history oscillates: m≈0, v large
    v = torch.tensor([0.6, 1.0, 0.1, 0.3, 0.1, 0.1, 3.0, 1.0, 0.1, 0.1])
    expected, m_ref, v_ref = reference_filter(g.tolist(), m.tolist(), v.tolist())
    out = consistency_filter_(g, m, v, (0.9, 0.5, 0.5, 0.2, 1e-8, "float32"))
    torch.testing.assert_close(out, torch.tensor(expected))
    torch.testing.assert_close(m, torch.tensor(m_ref)), torch.testing.assert_close(v, torch.tensor(v_ref))
    assert out.ne(0).sum() == 2 and out[7] != 0 and out[3] != 0  # large, consistent, selected
    assert out[6] == 0  # second-largest |g| but no consistent direction


def test_filter_random_inputs_match_reference():
    for _ in range(5):
        g, m, v = torch.randn(50), torch.randn(50) * 0.3, torch.rand(50) + 0.2
        expected, _, _ = reference_filter(g.tolist(), m.tolist(), v.tolist(), tau=0.3, select=0.3)
        out = consistency_filter_(g, m.clone(), v.clone(), (0.9, 0.3, 0.5, 0.3, 1e-8, "float32"))
        torch.testing.assert_close(out, torch.tensor(expected))


@pytest.mark.parametrize("p", [1, 7, 50, 1237, 10_007])
@pytest.mark.parametrize("tau,screen,select", [(0.5, 0.5, 0.2), (0.3, 1.0, 0.3), (0.0, 0.1, 1.0), (0.5, 0.5, 0.01)])
def test_filter_matches_the_topk_reference_bit_for_bit(p, tau, screen, select):
    g, m = torch.randn(p), torch.randn(p)
    v = m.abs() + 0.5 * torch.rand(p)
    config = (0.9, tau, screen, select, 1e-8, "float32")
    ours_m, ours_v, theirs_m, theirs_v = m.clone(), v.clone(), m.clone(), v.clone()
    expected = topk_filter(g, theirs_m, theirs_v, config)
    out = g.clone()
    assert consistency_filter_(out, ours_m, ours_v, config) is out
    assert torch.equal(out, expected) and torch.equal(ours_m, theirs_m) and torch.equal(ours_v, theirs_v)
    if p > 1000:
        assert 0 < int(out.ne(0).sum()) <= int(select * p) and out.ne(0).sum() < p


def test_filter_includes_every_coordinate_tied_with_a_threshold():
    g = torch.tensor([3.0, -3.0, 3.0, 2.0, -2.0, 2.0, 1.0, 0.5, -0.25, 0.125])
    zeros = torch.zeros(10)
    consistency = (0.1 * g).abs() / ((0.1 * g).abs() + 1e-8)  # C after one step from m = v = 0
    # screen 0.5: the 5th largest |g| is 2, held by three θ: all six with |g| ≥ 2 pass
    out = consistency_filter_(g.clone(), zeros.clone(), zeros.clone(), (0.9, 0.5, 0.5, 1.0, 1e-8, "float32"))
    assert out.ne(0).nonzero().view(-1).tolist() == [0, 1, 2, 3, 4, 5]
    torch.testing.assert_close(out[:6], consistency[:6] * g[:6], rtol=0, atol=0)
    # select 0.2 = 2 θ: the largest score C·3 is held by three θ, all move (topk took two of them)
    out = consistency_filter_(g.clone(), zeros.clone(), zeros.clone(), (0.9, 0.5, 0.5, 0.2, 1e-8, "float32"))
    assert out.ne(0).nonzero().view(-1).tolist() == [0, 1, 2]
    assert topk_filter(g.clone(), zeros.clone(), zeros.clone(), (0.9, 0.5, 0.5, 0.2, 1e-8, "float32")).ne(0).sum() == 2


def test_filter_with_bfloat16_emas_rounds_them_once():
    g, m = torch.randn(301), torch.randn(301)
    v = m.abs() + 0.5 * torch.rand(301)
    m, v = m.bfloat16(), v.bfloat16()
    ours_m, ours_v = m.clone(), v.clone()
    out = consistency_filter_(g.clone(), ours_m, ours_v, (0.9, 0.5, 0.5, 0.2, 1e-8, "bfloat16"))
    assert torch.equal(ours_m, (0.9 * m.float() + (1 - 0.9) * g).bfloat16())
    assert torch.equal(ours_v, (0.9 * v.float() + (1 - 0.9) * g.abs()).bfloat16())
    consistency = ours_m.float().abs() / (ours_v.float() + 1e-8)
    moved = out.ne(0)
    assert 0 < int(moved.sum()) <= int(0.2 * 301) and (consistency[moved] > 0.5).all()
    assert torch.equal(out[moved], consistency[moved] * g[moved])


def test_filter_rejects_bad_operands():
    g, m, v = torch.randn(9), torch.randn(9), torch.rand(9)
    config = rt.SelectiveConfig()
    with pytest.raises(ValueError, match="same number of elements"):
        consistency_filter_(g, m[:8], v, config)
    with pytest.raises(ValueError, match="grad must be contiguous"):
        consistency_filter_(torch.randn(9, 2)[:, 0], m, v, config)


def test_sgd_with_selective_applies_the_method_update_rule():
    w = nn.Parameter(rt.ResuTensor.from_dense(torch.randn(8, 32), sparsity=0.5).enter_resu(
        epsilon=0.5, selective=rt.SelectiveConfig(tau=0.2)))
    opt = torch.optim.SGD([w], lr=0.1)
    p = w.trainable_count
    m, v = torch.zeros(p), torch.zeros(p)
    theta = w.trainable_values().clone()
    active = w.dequantize()[w.mask()]
    for _ in range(6):
        x = torch.randn(4, 32)
        F.linear(x, w).pow(2).sum().backward()
        g = w.grad.flat.clone()
        expected, m_list, v_list = reference_filter(g.tolist(), m.tolist(), v.tolist(), tau=0.2)
        m, v = torch.tensor(m_list), torch.tensor(v_list)
        opt.step()
        opt.zero_grad()
        theta = theta - 0.1 * torch.tensor(expected)
        torch.testing.assert_close(w.trainable_values(), theta)
    assert torch.equal(w.dequantize()[w.mask()], active)
    assert w.nbytes_breakdown()["selective"] == 2 * 4 * p


def test_bfloat16_ema_state():
    w = rt.ResuTensor.from_dense(torch.randn(8, 32), sparsity=0.5).enter_resu(
        selective=rt.SelectiveConfig(ema_dtype="bfloat16"))
    assert w.selective_m.dtype == torch.bfloat16 and w.nbytes_breakdown()["selective"] == 2 * 2 * w.trainable_count


@pytest.mark.parametrize("quantize_bits", [None, 4])
def test_static_subset_random(quantize_bits):
    w = rt.ResuTensor.from_dense(torch.randn(16, 64), sparsity=0.5)
    options = {"quantize_bits": quantize_bits, "group_size": 32} if quantize_bits else {}
    w = nn.Parameter(w.enter_resu(selective=rt.StaticSubsetConfig(alpha=0.25), generator=torch.Generator().manual_seed(0), **options))
    p = 16 * 64 // 2
    assert w.trainable_side == "subset" and w.trainable_count == int(0.25 * p)
    subset = w.trainable_mask()
    assert not (subset & w.mask()).any()  # S ⊂ P
    before = w.dequantize()
    opt = torch.optim.AdamW([w], lr=0.05)
    F.linear(torch.randn(3, 64), w).pow(2).sum().backward()
    opt.step()
    assert opt.state[w]["exp_avg"].flat.numel() == w.grad.flat.numel() == int(0.25 * p)
    after = w.dequantize()
    assert torch.equal(after[~subset], before[~subset]) and after[subset].ne(before[subset]).all()


def test_static_subset_by_gradient_picks_largest_probe_gradients():
    pruned = torch.zeros(4, 4, dtype=torch.bool)
    pruned[:, :2] = True
    scores = torch.arange(16.0).view(4, 4)
    chosen = subset_mask(pruned, 0.5, scores)
    assert chosen.nonzero().tolist() == [[2, 0], [2, 1], [3, 0], [3, 1]]

    model = nn.Sequential(nn.Linear(32, 8))
    from torchao.quantization import quantize_

    quantize_(model, rt.resu_config(sparsity=0.5))
    x = torch.randn(16, 32)
    rt.enter_resu_(model, selective=rt.StaticSubsetConfig(alpha=0.1, by="gradient"),
                   probe_fn=lambda m: m(x).pow(2).sum())
    w = model[0].weight
    assert w.trainable_count == int(0.1 * 128)
    # the chosen θ have the largest probe gradients among the pruned coordinates
    w_eff = w.dequantize().detach().requires_grad_()
    F.linear(x, w_eff, model[0].bias).pow(2).sum().backward()
    g = w_eff.grad.abs()[~w.mask()]
    chosen_g = w_eff.grad.abs()[w.trainable_mask()]
    assert chosen_g.min() >= torch.topk(g, int(0.1 * 128)).values.min() - 1e-6


def test_selective_errors():
    with pytest.raises(ValueError, match="tau must be"):
        rt.SelectiveConfig(tau=1.5)
    with pytest.raises(ValueError, match="by must be one of"):
        rt.StaticSubsetConfig(by="best")
    w = rt.ResuTensor.from_dense(torch.randn(8, 32), sparsity=0.5)
    with pytest.raises(ValueError, match="probe"):
        w.enter_resu(selective=rt.StaticSubsetConfig(by="gradient"))
    with pytest.raises(TypeError, match="SelectiveConfig"):
        w.enter_resu(selective={"tau": 0.5})


def test_subset_count_follows_in_place_changes_of_the_subset():
    w = rt.ResuTensor.from_dense(torch.randn(16, 64), sparsity=0.5)
    w.enter_resu(selective=rt.StaticSubsetConfig(alpha=0.25), generator=torch.Generator().manual_seed(0))
    assert w.subset_kind == "bitmap" and w.trainable_count == w.trainable_count == 128
    first_byte = int(w.subset_bitmap.nonzero()[0])
    lowest_bit = int(w.subset_bitmap[first_byte]) & -int(w.subset_bitmap[first_byte])
    w.subset_bitmap[first_byte] -= lowest_bit  # one member fewer, same tensor object
    assert w.trainable_count == 127

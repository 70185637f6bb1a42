"""RESU-Selective: consistency filtering and the static subset."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import resu_tensor as rt
from resu_tensor.selective import consistency_filter_, subset_mask


def reference_filter(g, m, v, beta=0.9, tau=0.5, screen=0.5, select=0.2, delta=1e-8):
    """Plain-Python reading of DESIGN.md §1, element by element."""
    m = [beta * mi + (1 - beta) * gi for mi, gi in zip(m, g)]
    v = [beta * vi + (1 - beta) * abs(gi) for vi, gi in zip(v, g)]
    c = [abs(mi) / (vi + delta) for mi, vi in zip(m, v)]
    p = len(g)
    by_mag = sorted(range(p), key=lambda i: -abs(g[i]))[: max(1, round(screen * p))]
    candidates = [i for i in by_mag if c[i] > tau]
    chosen = sorted(candidates, key=lambda i: -c[i] * abs(g[i]))[: int(select * p)]
    return [c[i] * g[i] if i in chosen else 0.0 for i in range(p)], m, v


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

"""QRESU: frozen active weights stored 4/8-bit, θ flat and trainable."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from masked_reference import MaskedDenseWeight
from resu_tensor.kernels import quant


def test_pack_unpack_round_trip():
    codes = torch.randint(0, 16, (7, 13), dtype=torch.uint8)
    packed = quant.pack_4bit(codes)
    assert packed.shape == (7, 7)
    assert torch.equal(quant.unpack_4bit(packed, 13), codes)
    assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


@pytest.mark.parametrize("bits,group_size", [(4, 16), (4, 128), (8, 32), (4, None)])
def test_quantization_error_is_at_most_half_a_step(bits, group_size):
    weight = torch.randn(12, 100)
    keep = torch.rand(12, 100) > 0.5
    gs = 100 if group_size is None else group_size
    codes, scale, offset = quant.quantize_groupwise(weight, keep, bits, gs)
    back = quant.dequantize_groupwise(codes, scale, offset, gs, torch.float32)
    # independent check of the step per element: (max - min) / levels of its group's kept values
    for row in range(12):
        for start in range(0, 100, gs):
            group_keep = keep[row, start:start + gs]
            if group_keep.sum() < 2:
                continue
            vals = weight[row, start:start + gs][group_keep]
            step = (vals.max() - vals.min()) / ((1 << bits) - 1)
            err = (back[row, start:start + gs][group_keep] - vals).abs().max()
            assert err <= step / 2 + 1e-6


def make_qresu(bits=4, group_size=128, theta_dtype=None, shape=(32, 256), **options):
    w = rt.ResuTensor.from_dense(torch.randn(shape), sparsity=0.5)
    original = w.dequantize()
    w.enter_resu(epsilon=0.1, quantize_bits=bits, group_size=group_size, theta_dtype=theta_dtype, **options)
    return nn.Parameter(w), original


def test_enter_qresu_stores_codes_and_flat_theta():
    w, original = make_qresu()
    assert w.mode == rt.Mode.QRESU and w.values is None
    assert w.qdata.dtype == torch.uint8 and w.qdata.shape == (32, 128) and w.theta.shape == (32 * 128,)
    mask = w.mask()
    dense = w.dequantize()
    half_step = (original[mask].max() - original[mask].min()) / 15 / 2  # 4-bit: no group has a wider range
    assert (dense[mask] - original[mask]).abs().max() <= half_step + 1e-6
    assert torch.equal(dense[~mask], w.theta)  # θ, row-major over the pruned coordinates
    assert w.theta.std() > 0


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
@pytest.mark.parametrize("theta_dtype", [None, torch.float32])
def test_qresu_training_matches_reference_and_keeps_w_a_bit_identical(theta_dtype, fused, monkeypatch):
    w, _ = make_qresu(theta_dtype=theta_dtype, shape=(16, 64), group_size=32)
    ref = MaskedDenseWeight(w.dequantize(), w.trainable_mask())
    assert torch.equal(w.trainable_mask(), ~w.mask())
    opt, opt_ref = torch.optim.AdamW([w], lr=1e-2, fused=fused), torch.optim.AdamW([ref.flat], lr=1e-2, fused=fused)
    flat_steps = []  # fused: θ takes the one-pass flat Adam (kernels.foreach_adam_flat_)
    flat_adam = rt.kernels.foreach_adam_flat_

    def counted(params, *args):
        flat_steps.append(params[0])
        return flat_adam(params, *args)

    monkeypatch.setattr(rt.kernels, "foreach_adam_flat_", counted)
    active_before = w.dequantize()[w.mask()]
    qdata_before = w.qdata.clone()
    for _ in range(20):
        x = torch.randn(5, 64)
        for weight, o in ((w, opt), (ref.weight(), opt_ref)):
            o.zero_grad()
            F.linear(x, weight).pow(2).mean().backward()
        opt.step(), opt_ref.step()
    torch.testing.assert_close(w.dequantize(), ref.weight().detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(w.qdata, qdata_before) and torch.equal(w.dequantize()[w.mask()], active_before)
    assert opt.state[w]["exp_avg"].flat.numel() == w.theta.numel()
    assert len(flat_steps) == (20 if fused else 0) and all(p is w.theta for p in flat_steps)


def test_qresu_memory_at_half_sparsity():
    """s=0.5, 4-bit, group 128, float32 θ: store ≤ 2.75 B/elem, + grad + AdamW ≤ 8.8 B/elem."""
    w, _ = make_qresu(shape=(256, 1024), group_size=128, theta_dtype=torch.float32)
    numel = w.numel()
    parts = w.nbytes_breakdown()
    assert parts["values"] == 4 * numel // 2  # θ: p float32 values
    assert parts["quantized"] == numel // 2 + 2 * 4 * 256 * (1024 // 128)  # codes + scale + offset
    store = sum(parts.values())
    assert store / numel <= 2.75
    opt = torch.optim.AdamW([w], lr=1e-3)
    F.linear(torch.randn(3, 1024), w).sum().backward()
    opt.step()
    state = sum(v.flat.nbytes for v in opt.state[w].values() if isinstance(v, rt.CompactTensor))
    total = store + w.grad.flat.nbytes + state
    assert total / numel <= 8.8, total / numel


@pytest.mark.parametrize("bits,group_size", [(8, 64), (4, None)])
def test_commit_from_qresu_dequantizes(bits, group_size):
    w, _ = make_qresu(bits=bits, group_size=group_size, shape=(8, 128))
    merged = w.dequantize()
    w.commit("simple")
    assert w.mode == rt.Mode.SPARSE and w.values is not None and w.qdata is None and w.theta is None
    assert torch.equal(w.dequantize(), merged)


def test_qresu_checkpoint_round_trip():
    model = nn.Sequential(nn.Linear(64, 16))
    quantize_(model, rt.resu_config(sparsity=0.5))
    rt.enter_resu_(model, quantize_bits=4, group_size=32)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = nn.Sequential(nn.Linear(64, 16))
    quantize_(fresh, rt.resu_config(sparsity=0.3))
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    a, b = model[0].weight, fresh[0].weight
    assert b.mode == rt.Mode.QRESU and torch.equal(a.qdata, b.qdata) and torch.equal(a.theta, b.theta)
    assert torch.equal(a.dequantize(), b.dequantize())


def test_qresu_errors():
    w = rt.ResuTensor.from_dense(torch.randn(8, 64), sparsity=0.5)
    with pytest.raises(ValueError, match="quantize_bits must be one of"):
        w.enter_resu(quantize_bits=3)
    with pytest.raises(ValueError, match="needs freeze_active=True"):
        w.enter_resu(quantize_bits=4, freeze_active=False)
    with pytest.raises(ValueError, match="group_size must be"):
        w.enter_resu(quantize_bits=4, group_size=7)


def test_resu_config_goes_straight_to_qresu():
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4))
    quantize_(model, rt.resu_config(sparsity=0.5, quantize_bits=4, group_size=32))
    assert all(m.weight.mode == rt.Mode.QRESU for m in (model[0], model[2]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(3, 64)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="needs sparsity > 0"):
        rt.resu_config(quantize_bits=4)
    with pytest.raises(ValueError, match="quantize_bits must be one of"):
        rt.resu_config(sparsity=0.5, quantize_bits=2)

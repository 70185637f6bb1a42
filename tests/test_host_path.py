"""The host-side fast paths of a training step give what the general paths give, to the bit:
the one-pass ``_foreach_`` handling (ops/foreach.py) against the general per-position path, the
grouped CPU Adam reference against one call per weight, and the cached CompactTensor layout
across shapes; plus the errors the general paths raise for mixes the fast paths do not serve."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.core.compact import CompactTensor, contiguous_strides
from resu_tensor.kernels import mask_ops, optim
from resu_tensor.ops import foreach

VARIANTS = ["sparse", "resu", "qresu4"]


def _model(variant: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(24, 32), nn.ReLU(), nn.Linear(32, 16))
    quantize_(model, rt.resu_config(sparsity=0.0))
    rt.prune_(model, 0.6)
    if variant != "sparse":
        rt.enter_resu_(model, **({"quantize_bits": 4} if variant == "qresu4" else {}))
    return model


def _train(model: nn.Module, path: str, steps: int, seed: int, change_mask_at: int = -1) -> list:
    """AdamW (foreach or fused) on random batches; at step ``change_mask_at`` the trainable sets
    change (SPARSE prunes further, RESU commits: mask and mode change) and the optimizer state is
    reset. Returns the weights and state after each step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1,
                                  **({"fused": True} if path == "fused" else {"foreach": True}))
    generator = torch.Generator().manual_seed(seed)
    snapshots = []
    for step in range(steps):
        if step == change_mask_at:
            if model[0].weight.mode.value == "sparse":
                rt.prune_(model, 0.8)
            else:
                rt.commit_(model)
            rt.reset_optimizer_state_(optimizer, model)
        x, y = torch.randn(8, 24, generator=generator), torch.randn(8, 16, generator=generator)
        F.mse_loss(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state = [{k: v.flat.clone() if isinstance(v, CompactTensor) else v.clone() for k, v in s.items()}
                 for s in optimizer.state.values()]
        snapshots.append(([p.dequantize() if isinstance(p, rt.ResuTensor) else p.detach().clone()
                           for p in model.parameters()], state))
    return snapshots


@pytest.mark.parametrize("path", ["foreach", "fused"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_paths_equal_general_paths_across_a_mask_change(variant, path, monkeypatch):
    fast_model = _model(variant)
    general_model = copy.deepcopy(fast_model)
    fast = _train(fast_model, path, steps=5, seed=1, change_mask_at=3)
    monkeypatch.setattr(foreach, "_flat_lists_call", lambda *args: foreach._GENERAL)
    monkeypatch.setattr(optim, "_adam_math_grouped_", _adam_math_per_weight_)
    general = _train(general_model, path, steps=5, seed=1, change_mask_at=3)
    for (fast_params, fast_state), (general_params, general_state) in zip(fast, general):
        for a, b in zip(fast_params, general_params):
            assert torch.equal(a, b)
        for a, b in zip(fast_state, general_state):
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(fast[0][0][0], fast[-1][0][0])  # the weights moved


def _adam_math_per_weight_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper):
    """The ungrouped form: one adam_math_ call per weight."""
    for p, g, m, v, step in zip(params, grads, exp_avgs, exp_avg_sqs, steps):
        optim.adam_math_(p, g, m, v, step, *hyper)
    return list(params)


@pytest.mark.parametrize("decoupled", [True, False])
def test_grouped_adam_reference_equals_one_call_per_weight(decoupled):
    generator = torch.Generator().manual_seed(3)
    sizes, step_values = [37, 5, 64, 64, 11], [4.0, 4.0, 9.0, 4.0, 9.0]  # two groups by step, and mixed dtypes
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.float32]

    params = [torch.randn(n, generator=generator).to(d) for n, d in zip(sizes, dtypes)]
    grads = [torch.randn(n, generator=generator) for n in sizes]
    exp_avgs = [torch.randn(n, generator=generator) * 0.1 for n in sizes]
    exp_avg_sqs = [torch.rand(n, generator=generator) * 0.01 for n in sizes]
    steps = [torch.tensor(s) for s in step_values]
    hyper = (1e-2, 0.9, 0.999, 0.1, 1e-8, decoupled, False)
    reference = [[t.clone() for t in ts] for ts in (params, exp_avgs, exp_avg_sqs)]
    for p, g, m, v, s in zip(*reference[:1], grads, *reference[1:], steps):
        optim.adam_math_(p, g, m, v, s, *hyper)
    new_params = optim._adam_math_grouped_(params, grads, exp_avgs, exp_avg_sqs, steps, hyper)
    for got, want in zip((new_params, exp_avgs, exp_avg_sqs), reference):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_foreach_adam_by_bitmap_moves_only_selected_elements():
    generator = torch.Generator().manual_seed(5)
    values = [torch.randn(12, 16, generator=generator) for _ in range(3)]
    masks = [torch.rand(192, generator=generator) < 0.4 for _ in range(3)]
    bitmaps = [mask_ops.pack_bitmap(m) for m in masks]
    prefixes = [mask_ops.block_prefix_counts(m, 64) for m in masks]
    counts = [int(m.sum()) for m in masks]
    grads = [torch.randn(c, generator=generator) for c in counts]
    exp_avgs = [torch.zeros(c) for c in counts]
    exp_avg_sqs = [torch.zeros(c) for c in counts]
    steps = [torch.tensor(1.0) for _ in counts]
    before = [v.clone() for v in values]
    optim.foreach_adam_by_bitmap_(values, bitmaps, prefixes, [64] * 3, [False] * 3, grads, exp_avgs, exp_avg_sqs,
                                  steps, 1e-2, 0.9, 0.999, 0.0, 1e-8, True, False)
    for v, b, m, g in zip(values, before, masks, grads):
        flat, flat_before = v.view(-1), b.view(-1)
        assert torch.equal(flat[~m], flat_before[~m])  # frozen coordinates bit-identical
        # first Adam step without weight decay: p - lr * sign(g) (up to eps)
        torch.testing.assert_close(flat[m], flat_before[m] - 1e-2 * torch.sign(g), rtol=0, atol=1e-6)


def _compact_pair():
    """A RESU weight and a random gradient of its trainable set."""
    model = _model("resu")
    w = model[0].weight
    g = w.compact(torch.randn(w.trainable_count))
    return w, g


def test_foreach_out_of_place_keeps_compact_results():
    _, g = _compact_pair()
    plain = torch.rand(5) + 0.5
    out = torch._foreach_sqrt([g.abs(), plain])
    assert type(out[0]) is CompactTensor and out[0].trainable_key == g.trainable_key
    assert torch.equal(out[0].flat, g.flat.abs().sqrt())
    assert type(out[1]) is torch.Tensor and torch.equal(out[1], plain.sqrt())


def test_foreach_stale_state_raises_as_before():
    model = _model("sparse")
    w = model[0].weight
    old = w.compact(torch.randn(w.trainable_count))
    rt.prune_(model, 0.8)
    new = w.compact(torch.randn(w.trainable_count))
    with pytest.raises(ValueError, match="earlier trainable set"):
        torch._foreach_add_([new], [old])
    with torch.no_grad(), pytest.raises(ValueError, match="earlier trainable set"):
        torch._foreach_addcdiv_([w], [old], [old], 0.1)


def test_foreach_plain_tensor_next_to_compact_raises_as_before():
    w, g = _compact_pair()
    with pytest.raises(TypeError, match="plain tensor"):
        torch._foreach_add_([g], [torch.randn(w.shape)])


@pytest.mark.parametrize("shape", [(7, 3), (4, 5, 3, 3), [6, 2], (1,), torch.Size([3, 8])])
def test_compact_wrapper_layout_per_shape(shape):
    flat = torch.randn(4)
    for _ in range(2):  # computed, then cached
        t = CompactTensor(flat, 1, shape)
        assert t.shape == torch.Size(shape) and t.stride() == contiguous_strides(shape)
        assert t.logical_shape == tuple(shape)

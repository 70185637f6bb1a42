"""The comparison's building blocks (benchmarks/quality/mnist1d_harness.py): im2col conv, RigL's mask update, GMP,
one-shot, and the summary, each against an independent plain-PyTorch computation."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from benchmarks.quality import mnist1d_harness as harness


def test_conv_as_linear_matches_conv1d():
    torch.manual_seed(11)
    conv = nn.Conv1d(6, 5, 3, stride=2, padding=1)
    ours = harness.Conv1dAsLinear(6, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        ours.linear.weight.copy_(conv.weight.reshape(5, -1))
        ours.linear.bias.copy_(conv.bias)
    x = torch.randn(4, 6, 19)
    torch.testing.assert_close(ours(x), conv(x))
    quantize_(ours, rt.resu_config(sparsity=0.5))  # and it takes a ResuTensor weight
    masked = (ours.linear.weight.dequantize()).reshape(5, 6, 3)
    torch.testing.assert_close(ours(x), F.conv1d(x, masked, conv.bias, stride=2, padding=1))


def test_rigl_update_drops_smallest_grows_largest_dense_gradient():
    torch.manual_seed(12)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    quantize_(model, rt.resu_config(sparsity=0.0))
    rt.prune_(model, 0.75, method="random", generator=torch.Generator().manual_seed(3))
    x, y = torch.randn(32, 12), torch.randint(0, 5, (32,))
    before = [(w.storage_mask().clone(), w.dequantize()) for _, _, w in rt.resu_weights(model)]
    # Reference dense gradient: a plain copy of the model with the same effective weights.
    plain = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5))
    with torch.no_grad():
        for i, (_, dense) in zip((0, 2), before):
            plain[i].weight.copy_(dense)
            plain[i].bias.copy_(model[i].bias)
    F.cross_entropy(plain(x), y).backward()

    swapped = harness.rigl_update_(model, x, y, fraction=0.25)

    expected_total = 0
    for i, (old_mask, old_values) in zip((0, 2), before):
        w = model[i].weight
        new_mask, n_swap = w.storage_mask(), int(0.25 * int(old_mask.sum()))
        expected_total += n_swap
        assert int(new_mask.sum()) == int(old_mask.sum())  # sparsity unchanged
        magnitude = torch.where(old_mask, old_values.abs(), math.inf).view(-1)
        dropped = set(torch.topk(magnitude, n_swap, largest=False).indices.tolist())
        survivors = old_mask.view(-1).clone()
        survivors[list(dropped)] = False
        growth = torch.where(survivors, -math.inf, plain[i].weight.grad.abs().view(-1))
        grown = set(torch.topk(growth, n_swap).indices.tolist())
        assert set(new_mask.view(-1).nonzero().view(-1).tolist()) == set(survivors.nonzero().view(-1).tolist()) | grown
        values = w.dequantize().view(-1)
        assert torch.all(values[list(grown)] == 0)  # grown at zero
        assert torch.equal(values[survivors], old_values.view(-1)[survivors])  # survivors untouched
        assert torch.all(values[~new_mask.view(-1)] == 0)
    assert swapped == expected_total > 0


def run(method: str, sparsity: float = 0.6, steps: int = 40) -> dict:
    return harness.run_one(dict(arch="mlp", method=method, sparsity=sparsity, seed=5, steps=steps))


@pytest.mark.parametrize("method", ["oneshot", "gmp", "rigl", "resu"])
def test_methods_end_at_the_requested_sparsity(method):
    result = run(method)
    assert result["final_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert result["final_bytes"] < run("dense", 0.0)["final_bytes"]


def test_rigl_swaps_a_decaying_number_of_weights():
    swapped = run("rigl", steps=100)["rigl_swapped"]
    assert len(swapped) == 14  # every 5 steps from 5 to 70 (< 0.75 of the run)
    assert swapped[0] > swapped[-1] > 0


def test_summary_mean_and_std_over_seeds():
    runs = [dict(arch="mlp", method="gmp", sparsity=0.5, seed=s, accuracy=a, sparse_peak_bytes=10 + s,
                 final_bytes=5, wall_s=1.0, cpu_s=0.5) for s, a in enumerate([0.5, 0.7, 0.6])]
    (row,) = harness.summarize(runs)
    assert row["accuracy_mean"] == pytest.approx(0.6) and row["accuracy_std"] == pytest.approx(0.1)
    assert row["sparse_peak_bytes"] == 12 and row["seeds"] == 3 and row["resurrected_mean"] is None
    assert "0.600 ± 0.100" in harness.format_table([row]) and harness.format_table([row], markdown=True).startswith("| arch")

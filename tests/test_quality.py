"""The comparison's building blocks (benchmarks/quality/mnist1d_harness.py): im2col conv, the methods (whose masks
tests/test_baselines.py checks against plain-PyTorch references), and the summary."""

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


def run(method: str, sparsity: float = 0.6, steps: int = 40) -> dict:
    return harness.run_one(dict(arch="mlp", method=method, sparsity=sparsity, seed=5, steps=steps))


@pytest.mark.parametrize("method", ["oneshot", "gmp", "rigl", "set", "resu"])
def test_methods_end_at_the_requested_sparsity(method):
    result = run(method)
    assert result["final_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert result["final_bytes"] < run("dense", 0.0)["final_bytes"]


def test_rigl_swaps_a_decaying_number_of_weights():
    swapped = run("rigl", steps=100)["rigl_swapped"]
    assert len(swapped) == 11  # every 5 steps from 5 to 55 (before the final 40% of fine-tuning)
    assert swapped[0] > swapped[-1] > 0


def test_summary_mean_and_std_over_seeds():
    runs = [dict(arch="mlp", method="gmp", sparsity=0.5, seed=s, accuracy=a, sparse_peak_bytes=10 + s,
                 final_bytes=5, wall_s=1.0, cpu_s=0.5) for s, a in enumerate([0.5, 0.7, 0.6])]
    (row,) = harness.summarize(runs)
    assert row["accuracy_mean"] == pytest.approx(0.6) and row["accuracy_std"] == pytest.approx(0.1)
    assert row["sparse_peak_bytes"] == 12 and row["seeds"] == 3 and row["resurrected_mean"] is None
    assert "0.600 ± 0.100" in harness.format_table([row]) and harness.format_table([row], markdown=True).startswith("| arch")


@pytest.mark.parametrize("name", harness.ABLATIONS)
def test_every_ablation_reaches_the_sparsity(name):
    cycles = harness.ABLATION_OPTIONS.get(name, {}).get("cycles", 0)
    result = run(name, steps=100 if cycles >= 20 else 60)  # 20 cycles need 2 steps each
    assert result["final_sparsity"] == pytest.approx(0.6, abs=1e-3)
    assert ("resurrected" in result) == (harness.ABLATION_BASE[name] == "resu_dev")
    assert name in harness.LABELS


def test_ablation_cli_merges_its_runs_into_the_json(tmp_path):
    from benchmarks.quality import mnist1d

    out = tmp_path / "ablation.json"
    argv = ["--ablation", "resu_constant", "--steps", "30", "--jobs", "1", "--out", str(out)]
    first = mnist1d.main(argv)
    assert {r["method"] for r in first["runs"]} == {"resu_dev", "resu_constant"} and len(first["runs"]) == 12
    second = mnist1d.main(["--ablation", "resu_epsilon_0.01", "--steps", "30", "--jobs", "1", "--out", str(out)])
    # the base, already there, is not run again; the new variant is added
    assert len(second["runs"]) == 18 and {r["method"] for r in second["runs"]} == {"resu_dev", "resu_constant",
                                                                                  "resu_epsilon_0.01"}
    resu = lambda runs: sorted((r["arch"], r["seed"], r["accuracy"]) for r in runs if r["method"] == "resu_dev")  # noqa: E731
    assert resu(first["runs"]) == resu(second["runs"])
    assert {r["method"] for r in second["summary"]} == {"resu_dev", "resu_constant", "resu_epsilon_0.01"}

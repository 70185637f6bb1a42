"""benchmarks/model.py end to end on the CPU with a tiny GPT (2 blocks, width 64, sequence 32,
batch 2, vocabulary 256), every variant: the GPU run must not die on a typo, and the figures it
writes must mean what they say (finite times and losses, frozen coordinates untouched, checked
both by the benchmark and here against a freshly built model). The ``--ddp`` path needs a
2-process launch (~20 s on CPU, over this test's budget); DDP correctness with ResuTensors is
tests/test_distributed.py's job."""
import json
import math

import pytest
import torch

import resu_tensor as rt
from benchmarks import model as bench
from resu_tensor.core.mode import Mode

TINY = ["--device", "cpu", "--preset", "tiny", "--layers", "2", "--width", "64", "--heads", "2", "--seq", "32",
        "--batch-size", "2", "--vocab", "256", "--warmup", "2", "--steps", "2"]
EXPECTED_MODES = {"dense": Mode.DENSE, "sparse": Mode.SPARSE, "resu": Mode.RESU, "qresu4": Mode.QRESU}


def test_model_benchmark_runs_every_variant_on_cpu(tmp_path, capsys):
    trained = {}

    def keep(variant, model, record):  # the trained model, before the benchmark frees it
        trained[variant] = {name: (w.dequantize(), w.mask().clone(), w.trainable_mask().clone(), w.mode)
                            for name, _, w in rt.resu_weights(model)}

    out = tmp_path / "model_cpu.json"
    results = bench.main(TINY + ["--out", str(out)], on_variant=keep)
    saved = json.loads(out.read_text())
    assert saved["config"]["layers"] == 2 and saved["config"]["width"] == 64 and saved["config"]["vocab"] == 256
    assert saved["config"]["batch"] == 2 and saved["config"]["seq"] == 32
    records = {r["variant"]: r for r in saved["variants"]}
    assert set(records) == set(bench.VARIANTS) and len(saved["variants"]) == len(bench.VARIANTS)
    for variant, r in records.items():
        assert "error" not in r, (variant, r.get("traceback"))
        for key in ("step_ms", "step_ms_min", "vs_plain", "tokens_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (variant, key, r[key])
        assert r["timed_steps"] == 2 and r["steps_taken"] == 2 + 2
        assert math.isfinite(r["loss_first"]) and math.isfinite(r["loss_last"]), r
        # random tokens over 256 classes: the loss starts near ln 256 and stays sane
        assert abs(r["loss_first"] - math.log(256)) < 1.0
        assert math.isclose(r["tokens_per_s"], 2 * 32 / (r["step_ms"] / 1e3))
    assert records["plain"]["vs_plain"] == 1.0 and records["plain"]["resu_weights"] == 0
    # 2 blocks × (qkv, proj, fc, fc2); embeddings and the untied head stay plain
    for variant in EXPECTED_MODES:
        assert records[variant]["resu_weights"] == 8
        assert records[variant]["resu_weight_elements"] == 2 * (64 * 192 + 64 * 64 + 2 * 64 * 256)
    assert records["plain"]["parameters"] == records["resu"]["parameters"]

    # The benchmark's own movement check: nothing frozen moved, the trainable side did.
    for variant in EXPECTED_MODES:
        r = records[variant]
        assert r["frozen_changed"] == 0 and r["frozen_max_abs_change"] == 0.0 and not r["masks_changed"], r
        assert r["trainable_moved_fraction"] > 0.9, (variant, r["trainable_moved_fraction"])
    assert records["dense"]["frozen_coordinates"] == 0
    half = records["resu"]["resu_weight_elements"] // 2
    for variant in ("sparse", "resu", "qresu4"):
        assert records[variant]["frozen_coordinates"] == half  # s=0.5 of every layer, exactly
        assert records[variant]["trainable_weight_elements"] == half

    # Independently of the benchmark's check: compare each trained model with a freshly built
    # one (the builder is deterministic, so this is the state the benchmark started from).
    config = bench.model_config(bench.parse_args(TINY))
    assert set(trained) == set(bench.VARIANTS)
    for variant, mode in EXPECTED_MODES.items():
        initial = {name: (w.dequantize(), w.mask()) for name, _, w in
                   rt.resu_weights(bench.build_variant(variant, config, 0.5, "cpu"))}
        assert initial.keys() == trained[variant].keys()
        for name, (after, mask, trainable, trained_mode) in trained[variant].items():
            before, mask_before = initial[name]
            assert trained_mode == mode and torch.equal(mask, mask_before), (variant, name)
            frozen = ~trainable
            # frozen coordinates bit-identical; the trainable ones moved
            assert torch.equal(after[frozen], before[frozen]), (variant, name)
            assert (after[trainable] != before[trainable]).float().mean() > 0.9, (variant, name)
            if variant == "sparse":
                assert torch.equal(trainable, mask) and not after[~mask].any()  # pruned stay exactly 0
            elif variant in ("resu", "qresu4"):
                assert torch.equal(trainable, ~mask)  # θ trains, the active set is frozen
            else:
                assert trainable.all()
    assert [r["variant"] for r in results["variants"]] == list(bench.VARIANTS)
    assert "wrote" in capsys.readouterr().out


def test_rounds_interleave_variants_and_ratio_each_round_to_its_own_plain(tmp_path, capsys):
    out = tmp_path / "rounds.json"
    bench.main(TINY + ["--variants", "plain", "sparse", "--rounds", "2", "--out", str(out)])
    saved = json.loads(out.read_text())
    rows = [(r["round"], r["variant"]) for r in saved["variants"]]
    assert rows == [(0, "plain"), (0, "sparse"), (1, "plain"), (1, "sparse")]
    for round_index in (0, 1):
        plain, sparse = [r for r in saved["variants"] if r["round"] == round_index]
        assert plain["vs_plain"] == 1.0
        assert math.isclose(sparse["vs_plain"], sparse["step_ms"] / plain["step_ms"])
    each = [r["vs_plain"] for r in saved["variants"] if r["variant"] == "sparse"]
    summary = saved["summary"]["sparse"]
    assert summary["vs_plain_each"] == [round(x, 4) for x in each]
    assert math.isclose(summary["vs_plain_median"], sum(each) / 2)
    assert "median" in capsys.readouterr().out


def test_rounds_must_be_positive():
    with pytest.raises(SystemExit):
        bench.parse_args(TINY + ["--rounds", "0"])


def test_cuda_graph_needs_one_gpu():
    with pytest.raises(SystemExit):
        bench.parse_args(TINY + ["--cuda-graph"])  # TINY runs on the CPU


@pytest.mark.cuda
@pytest.mark.parametrize("fused", [False, True])
def test_model_benchmark_replays_the_whole_step_as_one_cuda_graph(tmp_path, fused):
    gpu = [a if a != "cpu" else "cuda" for a in TINY] + ["--cuda-graph", "--steps", "50", "--profile-steps", "2"]
    saved = bench.main(gpu + (["--fused-adamw"] if fused else []) + ["--out", str(tmp_path / "graph.json")])
    assert saved["config"]["step"] == "one CUDA graph, replayed"
    for r in saved["variants"]:
        assert "error" not in r, (r["variant"], r.get("traceback"))
        # replays train: the same batch every step, so its loss falls; nothing frozen moves
        assert math.isfinite(r["loss_last"]) and r["loss_last"] < r["loss_first"], r
        assert r["frozen_changed"] == 0 and not r["masks_changed"], r
        if r["variant"] != "plain":
            assert r["trainable_moved_fraction"] > 0.9, r
        assert "host_ms" not in r and r["gpu_kernel_ms"] > 0


def test_host_profile_reports_each_variant(tmp_path):
    from benchmarks import host_profile

    out = tmp_path / "profile.txt"
    host_profile.main(["--device", "cpu", "--preset", "tiny", "--variants", "plain", "resu", "--out", str(out)])
    text = out.read_text()
    for variant in ("plain", "resu"):
        assert f"==== {variant}: " in text
    assert text.count("ops per step") == 2 and "ResuMatmul" in text and "Self CPU" in text

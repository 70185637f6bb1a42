"""benchmarks/layers.py end to end on the CPU with tiny shapes: the real run (an H100, later)
must not die on a typo. Timing is stubbed; the Triton-only kernel cases are expected to record
errors here (no GPU, no interpreter in this process), everything else must measure."""
import importlib.util
import json
from pathlib import Path

import torch

LAYERS = Path(__file__).resolve().parents[1] / "benchmarks" / "layers.py"


def load_layers():
    spec = importlib.util.spec_from_file_location("benchmark_layers_under_test", LAYERS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layers_benchmark_runs_end_to_end_on_cpu(monkeypatch, tmp_path, capsys):
    layers = load_layers()
    monkeypatch.setattr(layers, "DEVICE", "cpu")
    monkeypatch.setattr(layers, "TOKENS", 24)
    monkeypatch.setattr(layers, "SHAPES", [(128, 256)])
    monkeypatch.setattr(layers, "SPARSITIES", [0.5])
    monkeypatch.setattr(layers, "SMALL", (8, 64, 32))
    monkeypatch.setattr(layers, "GROUP_SIZE", 32)
    monkeypatch.setattr(layers, "MANY_THETA", [37, 96, 5])
    monkeypatch.setattr(layers, "DTYPE", torch.float32)
    monkeypatch.setattr(layers, "COMPILE_BACKEND", "aot_eager")
    calls = []

    def fake_time_ms(self, fn):
        fn()
        calls.append(fn)
        return 1.0 + 0.5 * (len(calls) % 3)

    monkeypatch.setattr(layers.Bench, "time_ms", fake_time_ms)
    out = tmp_path / "cpu.json"
    results = layers.main(["--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["records"] and saved["matmul_tflops"] > 0
    records = [r for r in saved["records"] if r["section"] != "matmul" or r["name"] != "rate"]
    triton_only = {"kernels"}
    for record in records:
        if record["section"] in triton_only and "reference" not in record["name"]:
            continue
        assert "error" not in record, record
        assert record["ms"] > 0, record
    sections = {r["section"] for r in records}
    assert {"matmul", "train", "small", "small_compiled", "small_graph", "decode", "nf4", "kernels"} <= sections
    compiled = [r for r in records if r["section"] == "small_compiled"]
    assert {r["mode"] for r in compiled} == {"dense", "sparse", "resu", "qresu"}
    assert all("vs_dense" in r and r["optimizer_step_compiled"] for r in compiled)
    assert {r["fused_adamw"] for r in compiled} == {True, False}
    graphed = [r for r in records if r["section"] == "small_graph"]
    assert {(r["mode"], r["fused_adamw"], r["compiled"]) for r in graphed} == {
        (m, f, c) for m in ("dense", "sparse", "resu", "qresu") for f in (True, False) for c in (True, False)}
    assert all("vs_dense" in r for r in graphed)
    train = [r for r in records if r["section"] == "train" and r.get("mode") in ("sparse", "resu", "qresu")]
    assert {r["mode"] for r in train} == {"sparse", "resu", "qresu"}
    assert all("vs_dense" in r and "vs_floor" in r for r in train)
    decode = [r for r in records if r["section"] == "decode" and r.get("mode") == "qresu"]
    assert {r["theta_dtype"] for r in decode} == {"bfloat16", "float32"}
    assert {r["tokens"] for r in decode} == {1, 16}
    assert {r["path"] for r in decode} == {"library F.linear", "fused small-M kernel"}
    assert {r["timing"] for r in decode} == {"eager", "graph"}
    floors = {(r["sparsity"], r["theta_dtype"]): r["weight_bytes_vs_dense"] for r in decode}
    assert all(floors[(s, "float32")] > floors[(s, "bfloat16")] > 0 for s, _ in floors)  # θ's bytes counted
    assert "wrote" in capsys.readouterr().out and results["total_s"] >= 0

"""Run a test module's ``SCENARIOS`` in 2 processes — CPU with gloo, or 2 GPUs with NCCL — and
collect what every rank measured (tests/test_distributed.py, tests/test_fsdp.py).

The module keeps a global ``DEVICE`` that each worker sets before running its scenarios; a
scenario's exception is recorded, so each test reports its own failure."""
import importlib
import os
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason="needs 2 CUDA GPUs")])]


def _worker(rank: int, module_name: str, init_file: str, out_dir: str, device: str) -> None:
    module = importlib.import_module(module_name)
    module.DEVICE = device
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    results = {}
    try:
        for name, scenario in module.SCENARIOS.items():
            try:
                results[name] = scenario(rank)
            except Exception:  # recorded, so each test reports its own failure
                results[name] = {"exception": traceback.format_exc()}
            dist.barrier()
    finally:
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def run(module_name: str, out_dir, device: str) -> dict:
    """{rank: {scenario: measurements}} from one 2-process run of ``module_name``'s SCENARIOS."""
    mp.spawn(_worker, args=(module_name, str(out_dir / "rendezvous"), str(out_dir), device), nprocs=WORLD, join=True)
    return {rank: torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)}


def results(ranks: dict, scenario: str) -> tuple:
    """Both ranks' measurements of ``scenario``, after checking neither raised."""
    for rank in range(WORLD):
        assert "exception" not in ranks[rank][scenario], f"rank {rank}:\n{ranks[rank][scenario]['exception']}"
    return ranks[0][scenario], ranks[1][scenario]

"""Run a test module's ``SCENARIOS`` in 2 processes — CPU with gloo, or 2 GPUs with NCCL — and
collect what every rank measured (tests/test_distributed.py, tests/test_fsdp.py).

The module keeps a global ``DEVICE`` that each worker sets before running its scenarios; a
scenario's exception is recorded, so each test reports its own failure."""
import importlib
import os
import traceback
import warnings
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
    """{rank: {scenario: measurements}} from one 2-process run of ``module_name``'s SCENARIOS.

    A worker killed by a signal is run once more, with a warning: a gloo worker can abort at
    start-up ("terminate called without an active exception") for reasons outside the code under
    test. A second death fails, so a crash that repeats still shows."""
    for attempt in (1, 2):
        run_dir = out_dir / f"attempt{attempt}"
        run_dir.mkdir()
        try:
            mp.spawn(_worker, args=(module_name, str(run_dir / "rendezvous"), str(run_dir), device), nprocs=WORLD,
                     join=True)
            break
        except mp.ProcessExitedException as exc:
            if attempt == 2 or exc.signal_name is None:
                raise
            warnings.warn(f"two_ranks: a {module_name} worker died ({exc}); running the 2 processes once more")
    return {rank: torch.load(run_dir / f"rank{rank}.pt", weights_only=False) for rank in range(WORLD)}


def results(ranks: dict, scenario: str) -> tuple:
    """Both ranks' measurements of ``scenario``, after checking neither raised."""
    for rank in range(WORLD):
        assert "exception" not in ranks[rank][scenario], f"rank {rank}:\n{ranks[rank][scenario]['exception']}"
    return ranks[0][scenario], ranks[1][scenario]

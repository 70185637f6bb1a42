"""DistributedDataParallel with ResuTensor weights: 2 CPU processes (gloo) against a single-process
run over the same global batch, in SPARSE, RESU and QRESU, with gradient accumulation under
no_sync, a layer used on one rank only, both sync schedules (overlapped on its own group, and at
the end of backward on DDP's), the ResuScheduler changing modes mid-run on every rank, Wanda
calibration over all ranks, and FSDP2 sharding everything but the (replicated) ResuTensor weights.

One spawn runs every scenario (process start-up dominates); each rank saves what it measured and
the tests below check it. Every model starts from a *different* random state on each rank, so
the runs also check that prepare_ddp broadcasts rank 0's state. The same scenarios run on 2 GPUs
with NCCL under ``-m cuda`` (models, batches and references on the GPU; compared on CPU copies).
"""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import two_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor import distributed as rtd

WORLD = two_ranks.WORLD
PER_RANK = 6  # samples per rank and step; the single-process reference sees WORLD * PER_RANK
IN, HIDDEN, OUT = 16, 32, 8
ATOL = 2e-6  # CPU/gloo and CUDA/NCCL alike (float32; torch keeps TF32 off for matmuls by default)
DEVICE = "cpu"  # set by each worker: "cpu" (gloo) or "cuda" (NCCL, one GPU per rank)


# ------------------------------------------------------------------------------ helpers (both sides)
def make_model(seed: int, sparsity: float = 0.0, **config) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT)).to(DEVICE)
    quantize_(model, rt.resu_config(sparsity=sparsity, **config))
    return model


def wrap(model: nn.Module, rank: int, **options) -> DistributedDataParallel:
    """DDP over this rank's device: ``device_ids=[rank]`` on CUDA, none (the default) on the CPU."""
    return DistributedDataParallel(model, device_ids=[rank] if DEVICE == "cuda" else None, **options)


def global_batch(step: int, scenario_seed: int):
    generator = torch.Generator().manual_seed(1000 * scenario_seed + step)
    x = torch.randn(WORLD * PER_RANK, IN, generator=generator)
    y = torch.randint(0, OUT, (WORLD * PER_RANK,), generator=generator)
    return x.to(DEVICE), y.to(DEVICE)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK:(rank + 1) * PER_RANK]


def effective(p: torch.Tensor) -> torch.Tensor:
    """The weight a forward uses, as a CPU copy (comparisons run on the CPU whatever DEVICE is)."""
    return p.dequantize().cpu() if isinstance(p, rt.ResuTensor) else p.detach().cpu().clone()


def compare(model: nn.Module, reference: nn.Module) -> dict:
    """Max |difference| per parameter, and whether every ResuTensor's mode and mask equal the reference's."""
    diffs, same_masks = {}, True
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        diffs[name] = (effective(a) - effective(b)).abs().max().item()
        if isinstance(a, rt.ResuTensor):
            same_masks &= a.mode == b.mode and torch.equal(a.mask().cpu(), b.mask().cpu())
            same_masks &= a.trainable_key == b.trainable_key
    return {"diffs": diffs, "same_masks": same_masks}


def replicas_identical(model: nn.Module) -> bool:
    try:
        rtd.check_replicas(model)
        return True
    except ValueError:
        return False


def all_equal_across_ranks(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def weight_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flat for _, p in rtd.resu_parameters(model)])


def train(model, ddp, optimizer, reference, reference_optimizer, rank, steps, scenario_seed, after_step=None):
    for step in range(steps):
        x, y = global_batch(step, scenario_seed)
        optimizer.zero_grad()
        loss = F.cross_entropy(ddp(shard(x, rank)), shard(y, rank))
        loss.backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        reference_loss = F.cross_entropy(reference(x), y)
        reference_loss.backward()
        reference_optimizer.step()
        if after_step is not None:
            after_step(loss, reference_loss)


def adamw(model, **options):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **options)


# ------------------------------------------------------------------------------ scenarios (each rank)
def scenario_sparse(rank, **options):
    model = make_model(seed=rank, sparsity=0.5)  # rank 1 starts from other weights and another mask
    differed = not replicas_identical(model)
    rtd.prepare_ddp(model, **options)
    ddp = wrap(model, rank)
    reference = make_model(seed=0, sparsity=0.5)
    train(model, ddp, adamw(model), reference, adamw(reference), rank, steps=6, scenario_seed=1)
    pruned_zero = all(bool((p.values[~p.storage_mask()] == 0).all()) for _, p in rtd.resu_parameters(model))
    return {**compare(model, reference), "differed_before": differed, "replicas": replicas_identical(model),
            "pruned_stay_zero": pruned_zero, "grads_equal": all_equal_across_ranks(weight_grads(model))}


def scenario_resu(rank):
    model = make_model(seed=rank, sparsity=0.5)
    rt.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(rank))  # θ differs per rank too
    rtd.prepare_ddp(model)
    ddp = wrap(model, rank, static_graph=True)
    reference = make_model(seed=0, sparsity=0.5)
    rt.enter_resu_(reference, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    frozen_before = [p.values[p.storage_mask()].clone() for _, p in rtd.resu_parameters(model)]
    train(model, ddp, adamw(model), reference, adamw(reference), rank, steps=6, scenario_seed=2)
    frozen_kept = all(torch.equal(p.values[p.storage_mask()], before)
                      for (_, p), before in zip(rtd.resu_parameters(model), frozen_before))
    modes = [p.mode.value for _, p in rtd.resu_parameters(model)]
    return {**compare(model, reference), "replicas": replicas_identical(model), "frozen_kept": frozen_kept,
            "modes": modes}


def scenario_qresu(rank):
    model = make_model(seed=rank, sparsity=0.5, quantize_bits=4, group_size=16)
    rtd.prepare_ddp(model)
    ddp = wrap(model, rank, gradient_as_bucket_view=True)
    reference = make_model(seed=0, sparsity=0.5, quantize_bits=4, group_size=16)
    train(model, ddp, adamw(model), reference, adamw(reference), rank, steps=4, scenario_seed=3)
    modes = [p.mode.value for _, p in rtd.resu_parameters(model)]
    return {**compare(model, reference), "replicas": replicas_identical(model), "modes": modes}


def scenario_no_sync(rank, **options):
    """Two micro-batches per step, the first under ddp.no_sync(): equals one step on the global batch."""
    model = make_model(seed=rank, sparsity=0.5)
    rtd.prepare_ddp(model, **options)
    ddp = wrap(model, rank)
    reference = make_model(seed=0, sparsity=0.5)
    optimizer, reference_optimizer = adamw(model), adamw(reference)
    local_after_no_sync, synced_after = [], []
    half = PER_RANK // 2
    for step in range(3):
        x, y = global_batch(step, scenario_seed=4)
        xs, ys = shard(x, rank), shard(y, rank)
        optimizer.zero_grad()
        with ddp.no_sync():
            (F.cross_entropy(ddp(xs[:half]), ys[:half]) / 2).backward()
        local_after_no_sync.append(all_equal_across_ranks(weight_grads(model)))
        (F.cross_entropy(ddp(xs[half:]), ys[half:]) / 2).backward()
        synced_after.append(all_equal_across_ranks(weight_grads(model)))
        optimizer.step()
        reference_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        reference_optimizer.step()
    return {**compare(model, reference), "equal_after_no_sync": local_after_no_sync, "equal_after_sync": synced_after,
            "replicas": replicas_identical(model)}


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(IN, OUT), nn.Linear(IN, OUT)

    def forward(self, x, use_b: bool):
        return self.a(x) + self.b(x) if use_b else self.a(x)


def scenario_unused_on_one_rank(rank, **options):
    """Layer b only runs on rank 0: rank 1 reduces zeros for it, in the same collective order."""
    def build(seed):
        torch.manual_seed(seed)
        model = TwoHeads().to(DEVICE)
        quantize_(model, rt.resu_config(sparsity=0.5))
        return model

    model, reference = build(seed=rank), build(seed=0)
    rtd.prepare_ddp(model, **options)
    ddp = wrap(model, rank, find_unused_parameters=True)  # b's bias is unused on rank 1
    optimizer, reference_optimizer = adamw(model), adamw(reference)
    for step in range(3):
        x, y = global_batch(step, scenario_seed=6)
        optimizer.zero_grad()
        F.cross_entropy(ddp(shard(x, rank), use_b=rank == 0), shard(y, rank)).backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        losses = [F.cross_entropy(reference(shard(x, r), use_b=r == 0), shard(y, r)) for r in range(WORLD)]
        (sum(losses) / WORLD).backward()
        reference_optimizer.step()
    return {**compare(model, reference), "replicas": replicas_identical(model)}


def scenario_fsdp2_with_replicated_resu_weights(rank):
    """FSDP2 shards the other parameters; the ResuTensor weights are its ignored_params, replicated
    and synced by the ResuGradSync (sync_outside_ddp); gradient accumulation on both sides."""
    from torch.distributed.fsdp import fully_shard

    model = make_model(seed=0, sparsity=0.5)  # fully_shard shards each rank's own copy: start equal
    sync = rtd.prepare_ddp(model, sync_outside_ddp=True)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(DEVICE, (dist.get_world_size(),))  # gloo on the CPU, NCCL on the GPUs
    fully_shard(model, mesh=mesh, ignored_params={p for _, p in rtd.resu_parameters(model)})
    reference = make_model(seed=0, sparsity=0.5)
    # foreach (CUDA's default): one list holds FSDP2's DTensors and the replicated ResuTensors
    optimizer, reference_optimizer = adamw(model, foreach=True), adamw(reference)
    half = PER_RANK // 2
    for step in range(3):
        x, y = global_batch(step, scenario_seed=7)
        xs, ys = shard(x, rank), shard(y, rank)
        optimizer.zero_grad()
        model.set_requires_gradient_sync(False)
        with sync.no_sync():
            (F.cross_entropy(model(xs[:half]), ys[:half]) / 2).backward()
        model.set_requires_gradient_sync(True)
        (F.cross_entropy(model(xs[half:]), ys[half:]) / 2).backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        reference_optimizer.step()
    diffs = {name: (effective(a) - effective(b)).abs().max().item()
             for (name, a), b in zip(model.named_parameters(), reference.parameters()) if isinstance(a, rt.ResuTensor)}
    diffs.update({name: (a.full_tensor().cpu() - b.detach().cpu()).abs().max().item()
                  for (name, a), b in zip(model.named_parameters(), reference.parameters())
                  if not isinstance(a, rt.ResuTensor)})
    kinds = sorted({type(p).__name__ for p in model.parameters()})
    same_masks = all(torch.equal(a.mask().cpu(), b.mask().cpu()) for (_, a), (_, b) in
                     zip(rtd.resu_parameters(model), rtd.resu_parameters(reference)))
    return {"diffs": diffs, "same_masks": same_masks, "kinds": kinds,
            "replicas": replicas_identical(model)}


SCHEDULE = dict(steps_per_cycle=10, num_cycles=2, sparsity=0.6, stabilize_fraction=0.2, resu_fraction=0.4,
                epsilon=0.5, r_start=0.3, r_end=0.1, commit_score="gradient", seed=0, progress=False)


def scenario_scheduler(rank):
    """ResuScheduler on every rank: DENSE → prune → STABILIZE → RESU → amnesty commit, twice."""
    model = make_model(seed=rank)
    rtd.prepare_ddp(model)
    ddp = wrap(model, rank)
    reference = make_model(seed=0)
    optimizer, reference_optimizer = adamw(model), adamw(reference)
    scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(**SCHEDULE))
    reference_scheduler = rt.ResuScheduler(reference, reference_optimizer, rt.ScheduleConfig(**SCHEDULE))
    trace = []

    def after_step(loss, reference_loss):
        scheduler.step(loss)
        reference_scheduler.step(reference_loss)
        same = replicas_identical(model)  # mode, mask and every stored bit, on every step
        trace.append(([p.mode.value for _, p in rtd.resu_parameters(model)], same,
                      [p.trainable_key == q.trainable_key
                       for (_, p), (_, q) in zip(rtd.resu_parameters(model), rtd.resu_parameters(reference))]))

    train(model, ddp, optimizer, reference, reference_optimizer, rank, steps=20, scenario_seed=5, after_step=after_step)
    return {**compare(model, reference), "trace": trace, "finished": scheduler.finished,
            "resurrected": [h.resurrected for h in scheduler.history],
            "reference_resurrected": [h.resurrected for h in reference_scheduler.history]}


def scenario_wanda(rank):
    """Wanda norms over every rank's calibration batches equal those of the whole set."""
    model = make_model(seed=0)
    batches = [torch.randn(5, IN, generator=torch.Generator().manual_seed(10 + i)).to(DEVICE) for i in range(WORLD * 2)]
    norms = rtd.calibrate(model, batches[rank * 2:(rank + 1) * 2])
    whole = rt.calibrate(model, batches)
    rt.prune_(model, 0.5, method="wanda", calibration=norms)
    return {"norm_diff": max((norms[k] - whole[k]).abs().max().item() for k in whole), "layers": sorted(norms),
            "replicas": replicas_identical(model)}


def scenario_mismatch(rank):
    """check_replicas sees a mask that differs on one rank (and says so on every rank)."""
    model = make_model(seed=0, sparsity=0.5)
    if rank == 1:
        model[2].weight.prune(0.7)
    try:
        rtd.check_replicas(model)
        return {"error": None}
    except ValueError as error:
        return {"error": str(error)}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in list(globals().items()) if name.startswith("scenario_")}
# overlap=False: everything reduced at the end of backward on DDP's own group, coalesced (one
# bucket with the default cap; one per weight with a 1 kB cap).
END_OF_BACKWARD = {"sparse": {}, "no_sync": {"bucket_cap_mb": 1e-3}, "unused_on_one_rank": {}}
SCENARIOS.update({f"{name}/end_of_backward": functools.partial(SCENARIOS[name], overlap=False, **options)
                  for name, options in END_OF_BACKWARD.items()})


@pytest.fixture(scope="module", params=two_ranks.DEVICES)
def ranks(request, tmp_path_factory):
    """{rank: {scenario: measurements}} from one 2-process run: CPU with gloo, or 2 GPUs with NCCL."""
    return two_ranks.run(__name__, tmp_path_factory.mktemp("ddp"), request.param)


results = two_ranks.results


def assert_matches_reference(result):
    assert result["same_masks"], "a ResuTensor's mode, mask or trainable set differs from the single-process run"
    assert max(result["diffs"].values()) < ATOL, result["diffs"]


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("schedule", ["", "/end_of_backward"])
def test_sparse_matches_single_process_over_global_batch(ranks, schedule):
    for result in results(ranks, "sparse" + schedule):
        assert result["differed_before"]  # prepare_ddp's broadcast is what made the ranks agree
        assert_matches_reference(result)
        assert result["replicas"] and result["grads_equal"] and result["pruned_stay_zero"]


def test_resu_matches_single_process_and_keeps_active_frozen(ranks):
    for result in results(ranks, "resu"):
        assert result["modes"] == ["resu", "resu"]
        assert_matches_reference(result)
        assert result["replicas"] and result["frozen_kept"]


def test_qresu_matches_single_process(ranks):
    for result in results(ranks, "qresu"):
        assert result["modes"] == ["qresu", "qresu"]
        assert_matches_reference(result)
        assert result["replicas"]


@pytest.mark.parametrize("schedule", ["", "/end_of_backward"])
def test_no_sync_accumulates_locally_then_averages(ranks, schedule):
    for result in results(ranks, "no_sync" + schedule):
        assert result["equal_after_no_sync"] == [False] * 3  # no communication under no_sync
        assert result["equal_after_sync"] == [True] * 3
        assert_matches_reference(result)
        assert result["replicas"]


@pytest.mark.parametrize("schedule", ["", "/end_of_backward"])
def test_weight_used_on_one_rank_only(ranks, schedule):
    for result in results(ranks, "unused_on_one_rank" + schedule):
        assert_matches_reference(result)
        assert result["replicas"]


def test_fsdp2_shards_the_rest_while_resu_weights_stay_replicated(ranks):
    for result in results(ranks, "fsdp2_with_replicated_resu_weights"):
        assert result["kinds"] == ["DTensor", "ResuTensor"]
        assert_matches_reference(result)
        assert result["replicas"]


def test_scheduler_mode_changes_keep_masks_identical_on_every_rank(ranks):
    for result in results(ranks, "scheduler"):
        modes = [step_modes for step_modes, _, _ in result["trace"]]
        assert {m for step_modes in modes for m in step_modes} == {"dense", "sparse", "resu"}
        assert modes[-1] == ["sparse", "sparse"] and result["finished"]
        assert all(same for _, same, _ in result["trace"]), "replicas differed after some step"
        assert all(all(keys) for _, _, keys in result["trace"]), "a mask differed from the single-process run"
        assert result["resurrected"] == result["reference_resurrected"] and all(r > 0 for r in result["resurrected"])
        assert_matches_reference(result)


def test_distributed_wanda_calibration_equals_whole_set(ranks):
    for result in results(ranks, "wanda"):
        assert result["layers"] == ["0", "2"]
        assert result["norm_diff"] < 1e-5
        assert result["replicas"]


def test_check_replicas_reports_a_differing_mask_on_every_rank(ranks):
    for result in results(ranks, "mismatch"):
        assert result["error"] is not None and "['2.weight']" in result["error"]


def test_prepare_ddp_errors(tmp_path):
    model = make_model(seed=0, sparsity=0.5)
    with pytest.raises(RuntimeError, match="init_process_group"):
        rtd.prepare_ddp(model)
    with pytest.raises(TypeError, match="nn.Module"):
        rtd.prepare_ddp("not a model")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="no ResuTensor parameters"):
            rtd.prepare_ddp(nn.Linear(4, 4))
        with pytest.raises(ValueError, match="sync_group must be a process group of its own"):
            rtd.prepare_ddp(model, sync_group=dist.group.WORLD)
        sync = rtd.prepare_ddp(model)
        assert sync.names == ["2.weight", "0.weight"]
        assert set(model._ddp_params_and_buffers_to_ignore) == {"0.weight", "2.weight"}
        with pytest.raises(ValueError, match="already prepared"):
            rtd.prepare_ddp(model)
        ddp = DistributedDataParallel(model)
        with pytest.raises(TypeError, match="before wrapping"):
            rtd.prepare_ddp(ddp)
        sync.remove()
        assert not hasattr(model, "_resu_grad_sync")
    finally:
        dist.destroy_process_group()

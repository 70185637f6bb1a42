"""FSDP2 (fully_shard) sharding ResuTensor weights by rows: 2 CPU processes (gloo) against a
single-process run over the same global batch, in SPARSE, RESU and QRESU, with gradient
accumulation (FSDP's no-sync micro-batches, and several synced backward passes), an uneven row
split, and mode changes mid-run (prune → RESU / QRESU → amnesty commit) through the same
model-level API as without FSDP (``rt.prune_`` / ``enter_resu_`` / ``commit_`` / ``calibrate`` /
``reset_optimizer_state_`` / ``ResuScheduler``), which gathers the layers itself.

One spawn runs every scenario (process start-up dominates); each rank saves what it measured and
the tests below check it. FSDP2 does not broadcast at construction, so both ranks build the model
from the same seed (as a user must). The same scenarios run on 2 GPUs with NCCL under ``-m cuda``.
"""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import two_ranks
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.core.row_blocks import slice_rows
from resu_tensor import fsdp as rtf

WORLD = two_ranks.WORLD
PER_RANK = 6  # samples per rank and step; the single-process reference sees WORLD * PER_RANK
IN, HIDDEN, OUT = 16, 32, 8
ATOL = 2e-6
DEVICE = "cpu"  # set by each worker: "cpu" (gloo) or "cuda" (NCCL, one GPU per rank)


# ------------------------------------------------------------------------------ helpers (both sides)
def make_model(sparsity: float = 0.0, out: int = OUT, **config) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, out)).to(DEVICE)
    quantize_(model, rt.resu_config(sparsity=sparsity, **config))
    return model


def shard_model(model: nn.Sequential) -> nn.Sequential:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(DEVICE, (WORLD,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model[2], mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def global_batch(step: int, scenario_seed: int, out: int = OUT):
    generator = torch.Generator().manual_seed(1000 * scenario_seed + step)
    x = torch.randn(WORLD * PER_RANK, IN, generator=generator)
    return x.to(DEVICE), torch.randint(0, out, (WORLD * PER_RANK,), generator=generator).to(DEVICE)


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[rank * PER_RANK:(rank + 1) * PER_RANK]


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def sgd(model):  # unlike Adam, sensitive to the gradient's scale (FSDP's averaging over ranks)
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)


def foreach_adamw(model):  # the multi-tensor path: _foreach_* ops on DTensors of ResuTensors
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)


def resu_layers(model):
    return [i for i, m in enumerate(model) if isinstance(m, nn.Linear)]


def compare(model, reference) -> dict:
    """Max |difference| of every weight and bias against the reference; whether every gathered
    mode and mask equal the reference's; whether every rank holds the same gathered masks."""
    diffs, same_masks, digests = {}, True, []
    for i in resu_layers(model):
        full, expected = rtf.full_tensor(model[i].weight), reference[i].weight
        diffs[f"{i}.weight"] = (full.dequantize() - expected.dequantize()).abs().max().item()
        diffs[f"{i}.bias"] = (model[i].bias.full_tensor() - reference[i].bias).abs().max().item()
        same_masks &= full.mode == expected.mode and torch.equal(full.mask(), expected.mask())
        digests.append(full.mask().cpu().numpy().tobytes())
    everyone = [None] * WORLD
    dist.all_gather_object(everyone, digests)
    return {"diffs": diffs, "same_masks": same_masks,
            "masks_equal_across_ranks": all(d == everyone[0] for d in everyone)}


def packed_decisions(model):
    """Whether each sharded weight is all-gathered packed (core/fsdp_extension.py)."""
    return [model[i].weight._local_tensor.packs_all_gather(model[i].weight.device_mesh, model[i].weight.shape)
            for i in resu_layers(model)]


def shards(model):
    return [model[i].weight._local_tensor for i in resu_layers(model)]


def frozen_state(model):
    """What must never move: pruned zeros (SPARSE), active values (RESU), codes and scales (QRESU)."""
    state = []
    for t in shards(model):
        if t.values is not None:
            frozen = ~t.trainable_mask()
            state.append(t.values[frozen].clone())
        else:
            state.extend([t.qdata.clone(), t.qscale.clone(), t.qoffset.clone()])
    return state


def train(model, optimizer, reference, reference_optimizer, rank, steps, scenario_seed, after_step=None,
          out: int = OUT, clip: float = 0.0):
    for step in range(steps):
        x, y = global_batch(step, scenario_seed, out)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(shard(x, rank)), shard(y, rank))
        loss.backward()
        if clip:  # the norm over every rank's compact shards must equal the single-process norm
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        reference_optimizer.zero_grad()
        reference_loss = F.cross_entropy(reference(x), y)
        reference_loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
        reference_optimizer.step()
        if after_step is not None:
            after_step(loss, reference_loss)


# ------------------------------------------------------------------------------ scenarios (each rank)
def run_mode(rank, scenario_seed, prepare, make_optimizer=adamw, clip: float = 0.0):
    """``prepare`` puts model and reference into the mode before sharding; 4 optimizer steps."""
    model, reference = make_model(sparsity=0.5), make_model(sparsity=0.5)
    prepare(model)
    prepare(reference)
    shard_model(model)
    kinds = sorted({f"{type(p).__name__}({type(p._local_tensor).__name__})" for p in model.parameters()})
    rows = [t.shape[0] for t in shards(model)]
    frozen_before = frozen_state(model)
    optimizer = make_optimizer(model)
    grad_kinds = []

    def after_step(loss, reference_loss):
        grad_kinds.append(sorted({type(model[i].weight.grad._local_tensor).__name__ for i in resu_layers(model)}))

    train(model, optimizer, reference, make_optimizer(reference), rank, steps=4, scenario_seed=scenario_seed,
          after_step=after_step, clip=clip)
    frozen_kept = all(torch.equal(a, b) for a, b in zip(frozen_before, frozen_state(model)))
    state_name = "momentum_buffer" if isinstance(optimizer, torch.optim.SGD) else "exp_avg"
    state_numel = sum(optimizer.state[model[i].weight][state_name]._local_tensor.flat.numel()
                      for i in resu_layers(model))
    return {**compare(model, reference), "kinds": kinds, "rows": rows, "frozen_kept": frozen_kept,
            "packed": packed_decisions(model),
            "grad_kinds": grad_kinds, "modes": [t.mode.value for t in shards(model)],
            "state_numel": state_numel, "trainable": sum(t.trainable_count for t in shards(model))}


def scenario_sparse(rank):
    return run_mode(rank, 1, lambda model: None)


def scenario_resu(rank):
    return run_mode(rank, 2, lambda model: rt.enter_resu_(model, epsilon=0.5,
                                                         generator=torch.Generator().manual_seed(0)))


def scenario_qresu(rank):
    return run_mode(rank, 3, lambda model: rt.enter_resu_(model, epsilon=0.5, quantize_bits=4, group_size=8,
                                                         generator=torch.Generator().manual_seed(0)),
                    make_optimizer=foreach_adamw)


def scenario_sgd(rank):
    return run_mode(rank, 11, lambda model: rt.enter_resu_(model, epsilon=0.5,
                                                          generator=torch.Generator().manual_seed(0)),
                    make_optimizer=sgd, clip=0.05)


def scenario_accumulation(rank):
    """Step 0: two micro-batches, the first without gradient sync; step 1: two synced backward
    passes into one gradient (FSDP adds the second reduce-scatter to the first)."""
    model, reference = shard_model(make_model(sparsity=0.5)), make_model(sparsity=0.5)
    optimizer, reference_optimizer = adamw(model), adamw(reference)
    half = PER_RANK // 2
    for step in range(2):
        x, y = global_batch(step, scenario_seed=4)
        xs, ys = shard(x, rank), shard(y, rank)
        optimizer.zero_grad()
        model.set_requires_gradient_sync(step == 1)
        (F.cross_entropy(model(xs[:half]), ys[:half]) / 2).backward()
        model.set_requires_gradient_sync(True)
        (F.cross_entropy(model(xs[half:]), ys[half:]) / 2).backward()
        optimizer.step()
        reference_optimizer.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        reference_optimizer.step()
    return compare(model, reference)


def scenario_manual_mode_changes(rank):
    """rt.prune_ / enter_resu_ (QRESU) / commit_ (amnesty) mid-run with optimizer=, on the sharded
    model as on the reference; uneven rows (7 over 2 ranks)."""
    model, reference = shard_model(make_model(out=7)), make_model(out=7)
    optimizer, reference_optimizer = adamw(model), adamw(reference)
    rows = [t.shape[0] for t in shards(model)]

    def steps(n, seed):
        train(model, optimizer, reference, reference_optimizer, rank, steps=n, scenario_seed=seed, out=7)

    steps(2, 5)
    rt.prune_(model, 0.5, optimizer=optimizer)
    rt.prune_(reference, 0.5, optimizer=reference_optimizer)
    # the state of the weights that stay active is remapped onto each shard's new trainable set
    state_remapped = all(optimizer.state[model[i].weight]["exp_avg"]._local_tensor.trainable_key
                         == model[i].weight._local_tensor.trainable_key for i in resu_layers(model))
    steps(2, 6)
    options = dict(epsilon=0.5, quantize_bits=4, group_size=8, track_gradients=True)
    rt.enter_resu_(model, generator=torch.Generator().manual_seed(3), optimizer=optimizer, **options)
    rt.enter_resu_(reference, generator=torch.Generator().manual_seed(3), optimizer=reference_optimizer, **options)
    modes = [t.mode.value for t in shards(model)]
    packed = packed_decisions(model)
    steps(3, 7)
    commit = dict(strategy="amnesty", sparsity=0.5, score="gradient", r_start=0.5, r_end=0.5)
    stats = rt.commit_(model, optimizer=optimizer, **commit)
    reference_stats = rt.commit_(reference, optimizer=reference_optimizer, **commit)
    steps(2, 8)
    return {**compare(model, reference), "rows": rows, "state_remapped": state_remapped, "modes": modes,
            "packed": packed,
            "stats": {k: v.resurrected_kept for k, v in stats.items()},
            "reference_stats": {k: v.resurrected_kept for k, v in reference_stats.items()}}


def scenario_stale_state(rank):
    """A mode change without optimizer=: the next step refuses the stale sharded state (naming
    rt.reset_optimizer_state_) before any coordinate moves; rt.reset_optimizer_state_ drops it."""
    model, reference = shard_model(make_model(sparsity=0.5)), make_model(sparsity=0.5)
    optimizer, reference_optimizer = adamw(model), adamw(reference)

    def steps(n, seed):
        train(model, optimizer, reference, reference_optimizer, rank, steps=n, scenario_seed=seed)

    steps(2, 13)
    options = dict(epsilon=0.5, generator=torch.Generator().manual_seed(4))
    rt.enter_resu_(model, **options)
    rt.enter_resu_(reference, **dict(options, generator=torch.Generator().manual_seed(4)))
    before = [t.dequantize().clone() for t in shards(model)]
    x, y = global_batch(0, scenario_seed=14)
    optimizer.zero_grad()
    F.cross_entropy(model(shard(x, rank)), shard(y, rank)).backward()
    try:
        optimizer.step()
        error = None
    except ValueError as exc:
        error = str(exc)
    unmoved = all(torch.equal(a, t.dequantize()) for a, t in zip(before, shards(model)))
    dropped = rt.reset_optimizer_state_(optimizer, model)
    reference_dropped = rt.reset_optimizer_state_(reference_optimizer, reference)
    steps(2, 15)
    return {**compare(model, reference), "error": error, "unmoved": unmoved, "dropped": dropped,
            "reference_dropped": reference_dropped, "dropped_again": rt.reset_optimizer_state_(optimizer, model)}


def scenario_wanda(rank):
    """rt.calibrate of the sharded model over every rank's batches equals rt.calibrate over all of
    them; Wanda pruning of the sharded model then picks the single-process masks, whether it gets
    those norms or this rank's batches."""
    model, reference = shard_model(make_model()), make_model()
    batches = [global_batch(step, scenario_seed=12)[0] for step in range(2)]
    my_batches = [shard(x, rank) for x in batches]
    norms = rt.calibrate(model, my_batches)
    ddp_norms = rt.distributed.calibrate(model, my_batches)  # the sharded layers are reduced once, not twice
    reference_norms = rt.calibrate(reference, batches)
    rt.prune_(model, 0.5, method="wanda", calibration=norms)
    rt.prune_(reference, 0.5, method="wanda", calibration=reference_norms)
    from_batches = shard_model(make_model())
    rt.prune_(from_batches, 0.5, method="wanda", calibration=my_batches)
    return {**compare(model, reference), "layers": sorted(norms),
            "norm_diff": max((norms[k] - reference_norms[k]).abs().max().item() for k in reference_norms),
            "ddp_norm_diff": max((ddp_norms[k] - reference_norms[k]).abs().max().item() for k in reference_norms),
            "from_batches": compare(from_batches, reference)}


SCHEDULE = dict(steps_per_cycle=10, num_cycles=2, sparsity=0.6, stabilize_fraction=0.2, resu_fraction=0.4,
                epsilon=0.5, r_start=0.3, r_end=0.1, commit_score="gradient", seed=0, progress=False)


def run_scheduler(rank, scenario_seed, steps, calibration=None, **options):
    """rt.ResuScheduler on every rank: DENSE → prune → STABILIZE → RESU (or QRESU) → amnesty
    commit; ``calibration``: the global batches (each rank gets its part)."""
    model, reference = shard_model(make_model()), make_model()
    optimizer, reference_optimizer = adamw(model), adamw(reference)
    config = dict(SCHEDULE, **options)
    scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(**config),
                                 calibration=[shard(x, rank) for x in calibration] if calibration else None)
    reference_scheduler = rt.ResuScheduler(reference, reference_optimizer, rt.ScheduleConfig(**config),
                                           calibration=calibration)
    trace = []

    def after_step(loss, reference_loss):
        scheduler.step(loss)
        reference_scheduler.step(reference_loss)
        result = compare(model, reference)
        trace.append(([t.mode.value for t in shards(model)], result["same_masks"], result["masks_equal_across_ranks"]))

    train(model, optimizer, reference, reference_optimizer, rank, steps=steps, scenario_seed=scenario_seed,
          after_step=after_step)
    return {**compare(model, reference), "trace": trace, "finished": scheduler.finished,
            "resurrected": [h.resurrected for h in scheduler.history],
            "reference_resurrected": [h.resurrected for h in reference_scheduler.history]}


def scenario_scheduler(rank):
    return run_scheduler(rank, 9, steps=20)


def scenario_scheduler_carry(rank):
    """The active weights training through RESU with their optimizer state kept across phase changes."""
    return run_scheduler(rank, 18, steps=20, freeze_active=False, optimizer_state="carry")


def scenario_scheduler_qresu(rank):
    """One cycle into QRESU with a static random subset of θ, picked again every 2 steps."""
    return run_scheduler(rank, 10, steps=10, num_cycles=1, quantize_bits=4, group_size=8,
                         selective=rt.StaticSubsetConfig(alpha=0.5, refresh_every=2))


def scenario_scheduler_wanda(rank):
    """Wanda pruning and Wanda-scored amnesty, each rank calibrating on its part of the batches."""
    calibration = [global_batch(step, scenario_seed=16)[0] for step in range(2)]
    return run_scheduler(rank, 17, steps=10, num_cycles=1, calibration=calibration, prune_method="wanda",
                         commit_score="wanda")


def packed_bytes(rows: int, cols: int, bits: int, group_size: int, theta_capacity: int, theta_bytes: int) -> int:
    """Bytes one rank sends per all-gather of a packed QRESU shard of ``rows`` × ``cols``: codes,
    float32 scales and offsets per row and group, the mask bitmap, θ padded to ``theta_capacity``."""
    groups = -(-cols // group_size)
    codes = rows * (-(-cols // 2) if bits == 4 else cols)
    return codes + 2 * 4 * rows * groups + -(-rows * cols // 8) + theta_capacity * theta_bytes


def scenario_packed_gather(rank):
    """Each QRESU shard's packed all-gather inputs against the dense path's: their bytes, and the
    weight fsdp_post_all_gather rebuilds against the dense gathered W_eff (bit for bit)."""
    model = make_model(sparsity=0.5)
    rt.enter_resu_(model, epsilon=0.5, quantize_bits=4, group_size=8, generator=torch.Generator().manual_seed(0))
    shard_model(model)
    mesh = model[0].weight.device_mesh
    measured = []
    for i in resu_layers(model):
        t, full_shape = model[i].weight._local_tensor, model[i].weight.shape
        packed, metadata = t.fsdp_pre_all_gather(mesh, full_shape, None, None, None)
        t.packs_all_gather = lambda *args: False  # the dense path, for comparison
        try:
            dense, dense_metadata = t.fsdp_pre_all_gather(mesh, full_shape, None, None, None)
        finally:
            del t.packs_all_gather

        def gathered(inputs):
            outputs = []
            for x in inputs:
                parts = [torch.empty_like(x) for _ in range(WORLD)]
                dist.all_gather(parts, x.contiguous())
                outputs.append(torch.cat(parts))
            return outputs

        rebuilt, _ = t.fsdp_post_all_gather(gathered(packed), metadata, t.compute_dtype)
        dense_weight, _ = t.fsdp_post_all_gather(gathered(dense), dense_metadata, t.compute_dtype)
        lengths = metadata[1]
        measured.append({
            "packed_bytes": sum(x.numel() * x.element_size() for x in packed),
            "dense_bytes": sum(x.numel() * x.element_size() for x in dense),
            "formula": packed_bytes(t.shape[0], t.shape[1], 4, 8, max(lengths), t.theta.element_size()),
            "dense_formula": t.shape[0] * t.shape[1] * torch.empty(0, dtype=t.compute_dtype).element_size(),
            "lengths": lengths, "theta": t.theta.numel(),
            "bit_identical": torch.equal(rebuilt, dense_weight),
            "equals_reference": torch.equal(rebuilt, rtf.full_tensor(model[i].weight).dequantize()),
        })
    return measured


def scenario_errors(rank):
    model = shard_model(make_model(sparsity=0.5))
    optimizer = adamw(model)
    errors = {}
    for name, call in {
        "selective": lambda: rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(**SCHEDULE,
                                                                                  selective=rt.SelectiveConfig())),
        "selective_enter": lambda: rt.enter_resu_(model, selective=rt.SelectiveConfig()),
        "probe": lambda: rt.enter_resu_(model, selective=rt.StaticSubsetConfig(by="gradient"), probe_fn=lambda m: 0),
        "replaced": lambda: _replace_inside(model),
    }.items():
        try:
            call()
            errors[name] = None
        except (NotImplementedError, TypeError, ValueError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
    errors["modes_after"] = [t.mode.value for t in shards(model)]
    return errors


def _replace_inside(model):
    with rtf.full_weights(model):
        model[0].weight = nn.Parameter(torch.zeros(HIDDEN, IN))


def scenario_load_state_dict(rank):
    """``model.load_state_dict`` of a sharded checkpoint of another mode, into a sharded model that
    never ran and into one that ran (FSDP sized its all-gather buffers for the old layout): a
    QRESU checkpoint into DENSE and SPARSE models, then a SPARSE checkpoint back into the one that
    ran. Each loaded model then trains a step, as a copy of the single-process model does."""
    sparse_checkpoint = shard_model(make_model(sparsity=0.5)).state_dict()
    source, reference = shard_model(make_model(sparsity=0.5)), make_model(sparsity=0.5)
    for model in (source, reference):
        rt.enter_resu_(model, epsilon=0.5, quantize_bits=4, group_size=8, generator=torch.Generator().manual_seed(3))
    train(source, adamw(source), reference, adamw(reference), rank, steps=2, scenario_seed=11)
    fresh, ran = shard_model(make_model()), shard_model(make_model(sparsity=0.5))
    x, _ = global_batch(0, 12)
    ran(shard(x, rank)).sum().backward()
    result = {}

    def loads(name, model, checkpoint, expected):
        model.zero_grad(set_to_none=True)
        model.load_state_dict(checkpoint)
        expected = copy.deepcopy(expected)
        loaded = compare(model, expected)
        train(model, adamw(model), expected, adamw(expected), rank, steps=1, scenario_seed=13)
        result[name] = {"loaded": loaded, "trained": compare(model, expected),
                        "modes": [rtf.full_tensor(model[i].weight).mode.value for i in resu_layers(model)]}

    loads("qresu_into_fresh", fresh, source.state_dict(), reference)
    loads("qresu_into_ran", ran, source.state_dict(), reference)
    loads("sparse_into_ran_qresu", ran, sparse_checkpoint, make_model(sparsity=0.5))
    return result


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in list(globals().items()) if name.startswith("scenario_")}


@pytest.fixture(scope="module", params=two_ranks.DEVICES)
def ranks(request, tmp_path_factory):
    """{rank: {scenario: measurements}} from one 2-process run: CPU with gloo, or 2 GPUs with NCCL."""
    return two_ranks.run(__name__, tmp_path_factory.mktemp("fsdp"), request.param)


results = two_ranks.results


def assert_matches_reference(result):
    assert result["same_masks"], "a gathered mode or mask differs from the single-process run"
    assert result["masks_equal_across_ranks"], "the ranks gathered different masks"
    assert max(result["diffs"].values()) < ATOL, result["diffs"]


# ------------------------------------------------------------------------------ tests
@pytest.mark.parametrize("scenario, mode", [("sparse", "sparse"), ("resu", "resu"), ("qresu", "qresu"),
                                            ("sgd", "resu")])
def test_sharded_training_matches_single_process(ranks, scenario, mode):
    for result in results(ranks, scenario):
        assert result["kinds"] == ["DTensor(ResuTensor)", "DTensor(Tensor)"]
        assert result["rows"] == [HIDDEN // WORLD, OUT // WORLD]  # row shards, not replicas
        assert result["modes"] == [mode, mode]
        assert_matches_reference(result)
        assert result["frozen_kept"], "a frozen coordinate moved"
        assert result["grad_kinds"] == [["CompactTensor"]] * 4
        assert result["state_numel"] == result["trainable"]  # optimizer state is compact too


def test_gradient_accumulation_with_and_without_sync(ranks):
    for result in results(ranks, "accumulation"):
        assert_matches_reference(result)


def test_wanda_calibration_over_every_rank(ranks):
    for result in results(ranks, "wanda"):
        assert result["layers"] == ["0", "2"] and result["norm_diff"] < 1e-5 and result["ddp_norm_diff"] < 1e-5
        assert_matches_reference(result)


def test_wanda_from_each_ranks_batches(ranks):
    for result in results(ranks, "wanda"):
        assert_matches_reference(result["from_batches"])


def test_stale_sharded_state_is_refused_then_reset(ranks):
    for result in results(ranks, "stale_state"):
        assert result["error"] is not None and "rt.reset_optimizer_state_(optimizer, model)" in result["error"]
        assert result["unmoved"], "a coordinate moved in the refused step"
        assert result["dropped"] == 2 and result["reference_dropped"] == 2 and result["dropped_again"] == 0
        assert_matches_reference(result)


def test_load_state_dict_of_another_mode(ranks):
    expected_modes = {"qresu_into_fresh": "qresu", "qresu_into_ran": "qresu", "sparse_into_ran_qresu": "sparse"}
    for result in results(ranks, "load_state_dict"):
        for name, mode in expected_modes.items():
            assert result[name]["modes"] == [mode, mode], name
            assert_matches_reference(result[name]["loaded"])
            assert_matches_reference(result[name]["trained"])


def test_manual_mode_changes_on_uneven_shards(ranks):
    rank0, rank1 = results(ranks, "manual_mode_changes")
    assert rank0["rows"] == [HIDDEN // WORLD, 4] and rank1["rows"] == [HIDDEN // WORLD, 3]
    for result in (rank0, rank1):
        assert result["state_remapped"]
        assert result["modes"] == ["qresu", "qresu"]
        assert result["stats"] == result["reference_stats"] and all(v > 0 for v in result["stats"].values())
        assert_matches_reference(result)


@pytest.mark.parametrize("scenario, modes_seen", [("scheduler", {"dense", "sparse", "resu"}),
                                                  ("scheduler_carry", {"dense", "sparse", "resu"}),
                                                  ("scheduler_qresu", {"dense", "sparse", "qresu"}),
                                                  ("scheduler_wanda", {"dense", "sparse", "resu"})])
def test_scheduler_mode_changes_keep_masks_identical_on_every_rank(ranks, scenario, modes_seen):
    for result in results(ranks, scenario):
        modes = [step_modes for step_modes, _, _ in result["trace"]]
        assert {m for step_modes in modes for m in step_modes} == modes_seen
        assert modes[-1] == ["sparse", "sparse"] and result["finished"]
        assert all(same for _, same, _ in result["trace"]), "a mask differed from the single-process run"
        assert all(equal for _, _, equal in result["trace"]), "the ranks gathered different masks"
        assert result["resurrected"] == result["reference_resurrected"] and all(r > 0 for r in result["resurrected"])
        assert_matches_reference(result)


def test_qresu_all_gathers_packed_and_rebuilds_the_dense_weight(ranks):
    for rank, measured in enumerate(results(ranks, "packed_gather")):
        for layer in measured:
            assert layer["bit_identical"] and layer["equals_reference"]
            assert layer["theta"] == layer["lengths"][rank] and len(layer["lengths"]) == WORLD
            assert layer["packed_bytes"] == layer["formula"]
            assert layer["dense_bytes"] == layer["dense_formula"]
            assert layer["packed_bytes"] < layer["dense_bytes"]


def test_packed_path_is_the_one_fsdp_takes_in_qresu(ranks):
    """scenario_qresu's shards (even splits) were gathered packed, those of the 7-row layer (uneven)
    dense; the manual mode changes went from dense to packed inputs and back."""
    for result in results(ranks, "qresu"):
        assert result["packed"] == [True, True]
    for result in results(ranks, "manual_mode_changes"):
        assert result["packed"] == [True, False]


def test_unsupported_features_raise_and_change_nothing(ranks):
    for result in results(ranks, "errors"):
        assert "NotImplementedError" in result["selective"] and "SelectiveConfig" in result["selective"]
        assert "NotImplementedError" in result["selective_enter"] and "SelectiveConfig" in result["selective_enter"]
        assert "NotImplementedError" in result["probe"]
        assert "TypeError" in result["replaced"] and "replaced inside the block" in result["replaced"]
        assert result["modes_after"] == ["sparse", "sparse"]


# ------------------------------------------------------------------------------ single process
def test_fsdp_module_names_are_the_model_level_api():
    """resu_tensor.fsdp keeps its names; the mode-change ones are the rt functions themselves."""
    for name in ("prune_", "enter_resu_", "commit_", "calibrate", "reset_optimizer_state_", "ResuScheduler"):
        assert getattr(rtf, name) is getattr(rt, name), name
    assert rtf.slice_rows is slice_rows


def _states(rng):
    dense = rt.ResuTensor.from_dense(torch.randn(10, 24, generator=rng))
    sparse = rt.ResuTensor.from_dense(torch.randn(10, 24, generator=rng), sparsity=0.6)
    resu = rt.ResuTensor.from_dense(torch.randn(10, 24, generator=rng), sparsity=0.5).enter_resu(
        epsilon=0.5, generator=rng, track_gradients=True)
    qresu = rt.ResuTensor.from_dense(torch.randn(10, 24, generator=rng), sparsity=0.5).enter_resu(
        epsilon=0.5, generator=rng, quantize_bits=4, group_size=6, selective=rt.StaticSubsetConfig(alpha=0.5))
    very_sparse = rt.ResuTensor.from_dense(torch.randn(10, 24, generator=rng), sparsity=0.99)  # index-encoded mask
    return {"dense": dense, "sparse": sparse, "resu": resu, "qresu": qresu, "very_sparse": very_sparse}


@pytest.mark.parametrize("name", ["dense", "sparse", "resu", "qresu", "very_sparse"])
def test_row_chunks_are_complete_resu_tensors(name):
    rng = torch.Generator().manual_seed(7)
    w = _states(rng)[name]
    chunks = torch.chunk(w, 3, dim=0)  # 4, 4, 2 rows: uneven
    assert [c.shape[0] for c in chunks] == [4, 4, 2] and all(isinstance(c, rt.ResuTensor) for c in chunks)
    assert torch.equal(torch.cat([c.dequantize() for c in chunks]), w.dequantize())
    assert torch.equal(torch.cat([c.mask() for c in chunks]), w.mask())
    assert torch.equal(torch.cat([c.trainable_mask() for c in chunks]), w.trainable_mask())
    assert all(c.mode == w.mode and c.trainable_count == int(c.trainable_mask().sum()) for c in chunks)
    if w.theta is not None:
        assert torch.equal(torch.cat([c.theta for c in chunks]), w.theta)
    if w.grad_abs_sum is not None:
        w.grad_abs_sum.copy_(torch.rand(w.grad_abs_sum.shape, generator=rng))
        chunks = torch.chunk(w, 3, dim=0)
        assert torch.equal(torch.cat([c.expand_trainable(c.grad_abs_sum) for c in chunks]),
                           w.expand_trainable(w.grad_abs_sum))
    # A row slice is a view of the data: an in-place update of its trainable coordinates reaches w.
    before = w.dequantize()
    w[4:8].mul_(2.0)
    rows = torch.zeros(10, 1, dtype=torch.bool)
    rows[4:8] = True
    changed = w.trainable_mask() & rows
    assert torch.equal(w.dequantize()[changed], before[changed] * 2)
    assert torch.equal(w.dequantize()[~changed], before[~changed])


def test_fsdp_padding_ops_keep_the_shard():
    """What FSDPParam._init_sharded_param does on the last (short) rank of an uneven split."""
    rng = torch.Generator().manual_seed(8)
    w = _states(rng)["resu"]
    chunk = torch.chunk(w, 3, dim=0)[2]
    padded = w.new_zeros((4, 24))
    padded.narrow(0, 0, 2).copy_(chunk)
    local = padded.narrow(0, 0, 2)
    assert torch.equal(local.dequantize(), chunk.dequantize()) and torch.equal(local.mask(), chunk.mask())
    assert local.trainable_key == chunk.trainable_key
    assert padded.view(-1).device.type == "meta" and padded.view(-1).numel() == 4 * 24
    with pytest.raises(ValueError, match="every rank needs at least one row"):
        w.new_empty(0)
    with pytest.raises(NotImplementedError, match="dim 0"):
        torch.chunk(w, 2, dim=1)
    with pytest.raises(NotImplementedError, match="writes through only"):
        w.narrow(0, 0, 2).copy_(chunk)
    whole = w.new_zeros((10, 24))
    whole.narrow(0, 0, 10).copy_(w)  # all rows: FSDP's even split
    assert torch.equal(whole.dequantize(), w.dequantize()) and whole.trainable_key == w.trainable_key

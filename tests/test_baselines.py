"""Sparse-training baselines as ResuScheduler methods (one_shot, gmp, rigl, set) and optimizer
state that survives mask changes, each checked against an independent plain-PyTorch reference."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt


TOTAL, EVERY, SPARSITY = 60, 10, 0.8
FINETUNE = 0.1  # a short final fine-tuning in the mask tests: five mask updates fit before it


def make_model(seed: int = 0, sparsity: float = 0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_(model, rt.resu_config(sparsity=sparsity))
    return model


def data(seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(64, 16, generator=generator), torch.randint(0, 4, (64,), generator=generator)


def weights(model):
    return [w for _, _, w in rt.resu_weights(model)]


def run(method: str, before_step=None, after_step=None, **options):
    """Train a small model under ``method``; ``before_step(scheduler, model)`` runs after the
    optimizer step and before ``scheduler.step`` (the weights the mask update sees),
    ``after_step(scheduler, model, seen)`` after it."""
    model = make_model()
    x, y = data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    options = {"total_steps": TOTAL, "sparsity": SPARSITY, "update_every": EVERY, "progress": False, **options}
    if method != "resu":
        options["method"] = method
    config = rt.ScheduleConfig(**options)
    scheduler = rt.ResuScheduler(model, optimizer, config, probe_fn=lambda m: F.cross_entropy(m(x), y))
    while not scheduler.finished:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen = before_step(scheduler, model) if before_step else None
        scheduler.step(loss)
        if after_step:
            after_step(scheduler, model, seen)
    return model, scheduler


def snapshot(model):
    return [(w.storage_mask().clone(), w.values.detach().clone()) for w in weights(model)]


def events(scheduler):
    return [(e["step"], e["event"]) for e in scheduler.phase_changes]


# ---------------------------------------------------------------------------- the methods' masks
def test_gmp_sparsity_per_step_is_the_cubic():
    end = TOTAL - round(FINETUNE * TOTAL)  # the final fine-tuning starts at step 54
    updates = [10, 20, 30, 40, 50, end]

    def cubic(t):  # Zhu & Gupta, initial sparsity 0, window [0, end]
        return SPARSITY * (1 - (1 - t / end) ** 3)

    def check(scheduler, model, _):
        done = [u for u in updates if u <= scheduler.global_step]
        expected = cubic(done[-1]) if done else 0.0
        for w in weights(model):
            assert w.storage_numel - w.n_active == round(expected * w.storage_numel), scheduler.global_step

    model, scheduler = run("gmp", after_step=check, final_finetune_fraction=FINETUNE)
    assert events(scheduler) == [(u, "prune") for u in updates] + [(TOTAL, "finished")]


def test_gmp_masks_are_magnitude_and_only_shrink():
    def before(scheduler, model):
        return snapshot(model)

    def check(scheduler, model, seen):
        for (old_mask, old_values), w in zip(seen, weights(model)):
            new_mask = w.storage_mask()
            assert not (new_mask & ~old_mask).any()  # nothing grows back
            dropped = old_mask & ~new_mask
            if dropped.any():
                assert old_values[dropped].abs().max() <= old_values[new_mask].abs().min()
                assert torch.equal(w.values[new_mask], old_values[new_mask])  # survivors untouched

    run("gmp", before_step=before, after_step=check)


def test_rigl_grows_the_top_dense_gradient_pruned_coordinates():
    x, y = data()
    end = TOTAL - round(FINETUNE * TOTAL)
    checked = []

    def before(scheduler, model):
        # independent reference: the same network on plain dense copies of the weights
        plain = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        with torch.no_grad():
            for p_layer, layer in zip((plain[0], plain[2]), (model[0], model[2])):
                p_layer.weight.copy_(layer.weight.dequantize())
                p_layer.bias.copy_(layer.bias)
        F.cross_entropy(plain(x), y).backward()
        return snapshot(model), [plain[0].weight.grad, plain[2].weight.grad]

    def check(scheduler, model, seen):
        t = scheduler.global_step
        if t % EVERY or t >= end:
            return
        fraction = 0.3 / 2 * (1 + math.cos(math.pi * t / end))
        for (old_mask, old_values), grad, w in zip(seen[0], seen[1], weights(model)):
            new_mask = w.storage_mask()
            count = round(fraction * int(old_mask.sum()))
            dropped, grown = old_mask & ~new_mask, new_mask & ~old_mask
            assert int(dropped.sum()) == int(grown.sum()) == count
            if t == EVERY:
                assert count > 0
            drop_ref = torch.topk(old_values.abs().masked_fill(~old_mask, math.inf).view(-1), count, largest=False)
            grow_ref = torch.topk(grad.abs().masked_fill(old_mask, -1).view(-1), count)
            assert set(torch.nonzero(dropped.view(-1)).view(-1).tolist()) == set(drop_ref.indices.tolist())
            assert set(torch.nonzero(grown.view(-1)).view(-1).tolist()) == set(grow_ref.indices.tolist())
            assert torch.all(w.values[grown] == 0)  # grown weights start at zero
            kept = old_mask & new_mask
            assert torch.equal(w.values[kept], old_values[kept])
            assert torch.all(w.values[~new_mask] == 0)
        checked.append(t)

    model, scheduler = run("rigl", before_step=before, after_step=check, final_finetune_fraction=FINETUNE)
    assert checked == [10, 20, 30, 40, 50]
    assert all(w.mode == rt.Mode.SPARSE for w in weights(model))


def test_set_drops_the_smallest_actives_and_regrows_at_random():
    def before(scheduler, model):
        return snapshot(model)

    grown_sets = []

    def check(scheduler, model, seen):
        if scheduler.steps[-1].event != "regrow":
            return
        for (old_mask, old_values), w in zip(seen, weights(model)):
            new_mask = w.storage_mask()
            count = round(0.3 * int(old_mask.sum()))  # SET: constant fraction
            dropped, grown = old_mask & ~new_mask, new_mask & ~old_mask
            assert int(dropped.sum()) == int(grown.sum()) == count
            drop_ref = torch.topk(old_values.abs().masked_fill(~old_mask, math.inf).view(-1), count, largest=False)
            assert set(torch.nonzero(dropped.view(-1)).view(-1).tolist()) == set(drop_ref.indices.tolist())
            assert torch.all(w.values[grown] == 0)
            grown_sets.append(grown)

    run("set", before_step=before, after_step=check, final_finetune_fraction=FINETUNE)
    assert len(grown_sets) == 10  # 5 updates × 2 layers
    # random regrowth is not the magnitude order: the grown sets differ between updates of a layer
    assert not torch.equal(grown_sets[0], grown_sets[2])


@pytest.mark.parametrize("warmup", [0.0, 0.25])
def test_one_shot_prunes_once(warmup):
    model, scheduler = run("one_shot", prune_start_fraction=warmup)
    prune_step = round(warmup * TOTAL)
    assert events(scheduler) == [(prune_step, "prune"), (TOTAL, "finished")]
    for record in scheduler.steps:
        assert record.sparsity == pytest.approx(SPARSITY if record.step >= prune_step else 0.0, abs=1e-3)


# ---------------------------------------------------------------------------- shared layout
@pytest.mark.parametrize("method", ["one_shot", "gmp", "rigl", "set", "resu"])
def test_final_finetune_keeps_the_mask_and_reaches_the_target(method):
    finetune = round(0.4 * TOTAL)  # the default, the same for every method
    options = {"num_cycles": 2} if method == "resu" else {}
    masks = {}

    def check(scheduler, model, _):
        if scheduler.global_step >= TOTAL - finetune:
            masks.setdefault(scheduler.global_step, snapshot(model))

    model, scheduler = run(method, after_step=check, **options)
    assert scheduler.config.finetune_steps == finetune
    assert [r.phase for r in scheduler.steps[-finetune:]] == ["finetune"] * finetune
    assert all(r.event is None for r in scheduler.steps[-finetune:-1])
    first = masks[TOTAL - finetune]
    for later in masks.values():
        for (mask_a, _), (mask_b, values_b) in zip(first, later):
            assert torch.equal(mask_a, mask_b)
            assert torch.all(values_b[~mask_b] == 0)  # pruned coordinates stay exactly zero
    for w in weights(model):
        assert w.mode == rt.Mode.SPARSE
        assert w.storage_numel - w.n_active == round(SPARSITY * w.storage_numel)


def test_config_picks_the_method_by_one_value():
    for method in ("one_shot", "gmp", "rigl", "set"):
        config = rt.ScheduleConfig(method=method, total_steps=1000, sparsity=0.9)
        assert (config.finetune_steps, config.mask_steps) == (400, 600)
    resu = rt.ScheduleConfig(total_steps=1000, num_cycles=4, sparsity=0.9)  # the same default fine-tuning: 0.4
    assert (resu.steps_per_cycle, resu.finetune_steps) == (150, 400)
    with pytest.raises(ValueError, match="unknown method 'lth'"):
        rt.ScheduleConfig(method="lth", total_steps=10)
    with pytest.raises(ValueError, match="needs total_steps"):
        rt.ScheduleConfig(method="gmp")
    with pytest.raises(ValueError, match="steps_per_cycle/num_cycles lay out RESU cycles"):
        rt.ScheduleConfig(10, 2, method="gmp", total_steps=100)
    with pytest.raises(ValueError, match="final_finetune_fraction must be in"):
        rt.ScheduleConfig(method="gmp", total_steps=100, final_finetune_fraction=1.0)
    model = make_model()
    with pytest.raises(ValueError, match="probe_fn"):
        rt.ResuScheduler(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         rt.ScheduleConfig(method="rigl", total_steps=10))


# ---------------------------------------------------------------------------- optimizer state
def masked_dense_pair(seed: int = 3):
    """A ResuTensor model (SPARSE at 0.5) and a plain dense twin whose AdamW sees the gradient
    masked to the active set: the reference for the compact optimizer state."""
    model = make_model(seed, sparsity=0.5)
    reference = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for r_layer, layer in zip((reference[0], reference[2]), (model[0], model[2])):
            r_layer.weight.copy_(layer.weight.dequantize())
            r_layer.bias.copy_(layer.bias)
    options = dict(lr=1e-2, weight_decay=0.1, foreach=False)
    return model, torch.optim.AdamW(model.parameters(), **options), reference, \
        torch.optim.AdamW(reference.parameters(), **options)


def train_both(model, optimizer, reference, reference_optimizer, steps: int, x, y):
    for _ in range(steps):
        for net, opt in ((model, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
        for r_layer, layer in zip((reference[0], reference[2]), (model[0], model[2])):
            r_layer.weight.grad.mul_(layer.weight.storage_mask())
        optimizer.step()
        reference_optimizer.step()


def dense_state(optimizer, reference):
    return [{k: v.clone() for k, v in optimizer.state[layer.weight].items()} for layer in (reference[0], reference[2])]


def test_state_survives_gmp_prune_like_a_masked_dense_adamw():
    x, y = data()
    model, optimizer, reference, reference_optimizer = masked_dense_pair()
    train_both(model, optimizer, reference, reference_optimizer, 5, x, y)
    before = dense_state(reference_optimizer, reference)
    rt.prune_(model, 0.75, optimizer=optimizer)
    for r_layer, layer, state in zip((reference[0], reference[2]), (model[0], model[2]), before):
        w, mask = layer.weight, layer.weight.storage_mask()
        compact = optimizer.state[w]
        for name in ("exp_avg", "exp_avg_sq"):
            # the compact state equals the dense state restricted to the new active set
            assert torch.equal(w.expand_trainable(compact[name]), state[name] * mask)
            reference_optimizer.state[r_layer.weight][name].mul_(mask)
        assert torch.equal(compact["step"], state["step"])  # the per-parameter step is kept
        with torch.no_grad():
            r_layer.weight.mul_(mask)
    train_both(model, optimizer, reference, reference_optimizer, 5, x, y)
    for r_layer, layer in zip((reference[0], reference[2]), (model[0], model[2])):
        torch.testing.assert_close(layer.weight.dequantize(), r_layer.weight.detach(), rtol=0, atol=1e-6)
        assert torch.all(layer.weight.values[~layer.weight.storage_mask()] == 0)


def test_joiners_start_at_zero_state_and_stayers_keep_theirs():
    x, y = data()
    model, optimizer, reference, reference_optimizer = masked_dense_pair()
    train_both(model, optimizer, reference, reference_optimizer, 4, x, y)
    old = [(layer.weight.storage_mask(), {k: layer.weight.expand_trainable(v) if k != "step" else v.clone()
                                          for k, v in optimizer.state[layer.weight].items()})
           for layer in (model[0], model[2])]
    values = [layer.weight.values.detach().clone() for layer in (model[0], model[2])]
    grads = {name: torch.rand(w.storage_shape, generator=torch.Generator().manual_seed(5))
             for name, _, w in rt.resu_weights(model)}
    rt.drop_and_grow_(model, 0.25, grads, optimizer=optimizer)
    for (old_mask, state), old_values, layer in zip(old, values, (model[0], model[2])):
        w = layer.weight
        new_mask = w.storage_mask()
        joiners, stayers = new_mask & ~old_mask, new_mask & old_mask
        assert joiners.any()
        for name in ("exp_avg", "exp_avg_sq"):
            expected = torch.where(stayers, state[name], torch.zeros_like(state[name]))
            assert torch.equal(w.expand_trainable(optimizer.state[w][name]), expected)
        assert torch.equal(optimizer.state[w]["step"], state["step"])
        assert torch.equal(w.values[stayers], old_values[stayers]) and torch.all(w.values[joiners] == 0)
    # the state stays usable: a step runs on the new trainable set
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()


def test_sgd_momentum_is_remapped_generically():
    x, y = data()
    model = make_model(4, sparsity=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    w = model[0].weight
    old_mask, old_buffer = w.storage_mask(), w.expand_trainable(optimizer.state[w]["momentum_buffer"])
    rt.prune_(model, 0.7, optimizer=optimizer)
    new_buffer = optimizer.state[w]["momentum_buffer"]
    assert new_buffer.trainable_key == w.trainable_key
    assert torch.equal(w.expand_trainable(new_buffer), old_buffer * w.storage_mask())
    assert old_mask.sum() > w.storage_mask().sum()


def test_remap_rejects_a_mask_of_the_wrong_size():
    model = make_model(5, sparsity=0.5)
    optimizer = torch.optim.AdamW(model.parameters())
    x, y = data()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    w = model[0].weight
    w.prune(0.7)
    with pytest.raises(ValueError, match="bool mask of 512 elements"):
        rt.remap_optimizer_state_(optimizer, w, torch.ones(10, dtype=torch.bool))
    with pytest.raises(TypeError, match="ResuTensor parameter"):
        rt.remap_optimizer_state_(optimizer, model[0].bias, None)


def test_resu_over_a_step_budget_defaults_to_the_recipe():
    """Over a step budget the active weights stay frozen through the RESU phase, in 5 cycles;
    with freeze_active=False they train alongside θ, in 20 cycles; the cycle form keeps them frozen."""
    config = rt.ScheduleConfig(total_steps=1000, sparsity=0.9)
    assert config.method == "resu" and config.num_cycles == 5 and config.freeze_active is True
    assert config.steps_per_cycle * 5 + config.finetune_steps == 1000
    for frozen in (dict(quantize_bits=4), dict(selective=rt.SelectiveConfig()), dict(freeze_active=True)):
        config = rt.ScheduleConfig(total_steps=1000, sparsity=0.9, **frozen)
        assert config.freeze_active is True and config.num_cycles == 5, frozen
    training = rt.ScheduleConfig(total_steps=1000, sparsity=0.9, freeze_active=False)
    assert training.freeze_active is False and training.num_cycles == 20
    assert training.steps_per_cycle * 20 + training.finetune_steps == 1000
    assert rt.ScheduleConfig(total_steps=1000, num_cycles=4, freeze_active=False).num_cycles == 4
    assert rt.ScheduleConfig(steps_per_cycle=100, num_cycles=3).freeze_active is True
    with pytest.raises(ValueError, match="quantize_bits needs freeze_active=True"):
        rt.ScheduleConfig(total_steps=1000, quantize_bits=4, freeze_active=False)
    for bad in ("no", None):
        with pytest.raises(TypeError, match=f"freeze_active must be a bool, got {bad!r}"):
            rt.ScheduleConfig(total_steps=1000, freeze_active=bad)
    with pytest.raises(ValueError, match="needs total_steps"):
        rt.ScheduleConfig(steps_per_cycle=100, sparsity=0.9)

"""ResuScheduler: phase order, sparsity per cycle, state resets, stats, pause, resume."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt


def make_run(config_overrides=None, seed=0, filter_fn=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_(model, rt.resu_config(sparsity=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    options = dict(steps_per_cycle=20, num_cycles=3, sparsity=0.6, stabilize_fraction=0.2, resu_fraction=0.3,
                   progress=False)
    options.update(config_overrides or {})
    scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(**options), filter_fn=filter_fn)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, generator):
    x = torch.randn(8, 16, generator=generator)
    y = torch.randint(0, 4, (8,), generator=generator)
    loss = F.cross_entropy(model(x), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    scheduler.step(loss)


def test_sparsity_schedules():
    config = rt.ScheduleConfig(steps_per_cycle=10, num_cycles=5, sparsity=0.8, initial_sparsity=0.2,
                               sparsity_schedule="linear", resu_fraction=0.4)
    # each cycle prunes to the schedule's value at its prune step (steps 5, 15, 25, 35, 45 of a
    # window that ends at the last prune): t = 1/9, 3/9, 5/9, 7/9, 1
    assert [round(s, 4) for s in config.cycle_sparsities()] == [0.2667, 0.4, 0.5333, 0.6667, 0.8]
    config.sparsity_schedule = "cubic"  # 0.8 − 0.6·(1 − t)³
    assert [round(s, 4) for s in config.cycle_sparsities()] == [0.3786, 0.6222, 0.7473, 0.7934, 0.8]
    config.sparsity_schedule = "cosine"  # 0.8 − 0.3·(1 + cos(πt))
    assert [round(s, 4) for s in config.cycle_sparsities()] == [0.2181, 0.35, 0.5521, 0.7298, 0.8]
    one_cycle = rt.ScheduleConfig(steps_per_cycle=10, num_cycles=1, sparsity=0.8, sparsity_schedule="cubic")
    assert one_cycle.cycle_sparsities() == [0.8]
    # the cycle form keeps the constant target; the step-budget form defaults to the cubic
    assert rt.ScheduleConfig(10, 3, sparsity=0.5).cycle_sparsities() == [0.5, 0.5, 0.5]
    budget = rt.ScheduleConfig(total_steps=100, num_cycles=3, sparsity=0.5)
    assert budget.sparsity_schedule == "cubic" and budget.cycle_sparsities()[0] < 0.5
    assert budget.cycle_sparsities()[-1] == 0.5
    dense_again = rt.ScheduleConfig(10, 3, sparsity_schedule=[0.9, 0.7, 0.5])  # densification
    assert dense_again.cycle_sparsities() == [0.9, 0.7, 0.5]
    assert (config.train_steps, config.stabilize_steps, config.resu_steps) == (5, 1, 4)


def test_resu_phase_share_defaults_to_the_recipe_of_its_mode():
    """The RESU phase takes 20% of a cycle with the active weights frozen (the default), 40% where
    they train alongside θ, a given fraction as given, and at least one step of a short cycle."""
    frozen = rt.ScheduleConfig(steps_per_cycle=10, num_cycles=2)
    assert (frozen.resu_fraction, frozen.train_steps, frozen.stabilize_steps, frozen.resu_steps) == (0.2, 7, 1, 2)
    training = rt.ScheduleConfig(steps_per_cycle=10, num_cycles=2, freeze_active=False)
    assert (training.resu_fraction, training.resu_steps) == (0.4, 4)
    assert rt.ScheduleConfig(steps_per_cycle=10, num_cycles=2, resu_fraction=0.3).resu_steps == 3
    assert rt.ScheduleConfig(steps_per_cycle=2, num_cycles=2).resu_steps == 1
    budget = rt.ScheduleConfig(total_steps=2000, sparsity=0.9)
    assert (budget.num_cycles, budget.steps_per_cycle, budget.resu_steps) == (5, 240, 48)


def test_config_errors():
    with pytest.raises(ValueError, match="unknown sparsity_schedule"):
        rt.ScheduleConfig(10, 2, sparsity_schedule="exp")
    with pytest.raises(ValueError, match="one value per cycle"):
        rt.ScheduleConfig(10, 2, sparsity_schedule=[0.5])
    with pytest.raises(ValueError, match="steps_per_cycle"):
        rt.ScheduleConfig(0, 2)
    with pytest.raises(ValueError, match="on_pause"):
        rt.ScheduleConfig(10, 2, pause_at=[0])
    with pytest.raises(ValueError, match="calibration"):
        make_run({"prune_method": "wanda"})


def test_phase_order_modes_and_sparsity_per_cycle():
    model, optimizer, scheduler = make_run({"sparsity_schedule": [0.4, 0.5, 0.6]})
    w = model[0].weight
    generator = torch.Generator().manual_seed(1)
    seen = []
    while not scheduler.finished:
        phase = scheduler.phase
        train_step(model, optimizer, scheduler, generator)
        seen.append((phase, w.mode.value))
    # cycle 0: dense TRAIN, then the prune makes it sparse for STABILIZE, RESU, commit → sparse
    c = scheduler.config
    assert [p for p, _ in seen[:20]] == ["train"] * c.train_steps + ["stabilize"] * c.stabilize_steps + ["resu"] * c.resu_steps
    assert seen[0] == ("train", "dense")
    assert seen[c.train_steps - 1] == ("train", "sparse")  # pruned right after the last TRAIN step
    assert seen[c.train_steps + c.stabilize_steps - 1] == ("stabilize", "resu")
    assert seen[19] == ("resu", "sparse")  # committed at the end of the cycle
    assert [round(h.sparsity, 3) for h in scheduler.history] == [0.4, 0.5, 0.6]
    assert [h.cycle for h in scheduler.history] == [0, 1, 2]
    assert all(h.loss is not None and h.loss > 0 for h in scheduler.history)
    assert scheduler.phase == "done"


def has_fresh_state(optimizer, w) -> bool:
    """Whether ``w``'s optimizer state is what a fresh one would be: none, or (reset in place)
    zero moments of its current trainable set and a zero step."""
    state = optimizer.state.get(w)
    return not state or all(
        (v.trainable_key == w.trainable_key and v.flat.numel() == w.trainable_count and not v.flat.any())
        if isinstance(v, rt.CompactTensor) else not v.any() for v in state.values())


def test_optimizer_state_reset_only_for_changed_layers():
    model, optimizer, scheduler = make_run({"optimizer_state": "reset"}, filter_fn=lambda m, name: name == "0")
    generator = torch.Generator().manual_seed(2)
    for _ in range(scheduler.config.train_steps):
        train_step(model, optimizer, scheduler, generator)
    # the prune happened at the last step: layer 0 changed, layer 2 (not scheduled) did not
    assert has_fresh_state(optimizer, model[0].weight)
    assert not has_fresh_state(optimizer, model[2].weight) and model[2].weight.mode == rt.Mode.DENSE
    train_step(model, optimizer, scheduler, generator)
    assert optimizer.state[model[0].weight]["exp_avg"].flat.numel() == model[0].weight.trainable_count


def test_amnesty_resurrects_and_stats_track_survivors():
    model, optimizer, scheduler = make_run({"num_cycles": 3, "epsilon": 2.0, "r_start": 0.3, "r_end": 0.1})
    generator = torch.Generator().manual_seed(3)
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)
    h = scheduler.history
    kept = sum(round(0.4 * w.numel()) for _, _, w in rt.resu_weights(model))
    assert all(0 < s.resurrected <= kept for s in h)
    assert h[0].survivors == 0 and h[2].survivors <= h[0].resurrected + h[1].resurrected
    assert h[1].resurrected >= round((0.3 - 0.2 / 3) * kept) - 2  # r(c)·n_keep slots reserved, r(1) = 0.233
    text = scheduler.summary()
    assert text.splitlines()[0].split() == ["cycle", "sparsity", "resurrected", "survivors", "consistency", "loss"]


def test_selective_and_qresu_in_the_schedule():
    model, optimizer, scheduler = make_run({"quantize_bits": 4, "group_size": 16, "selective": rt.SelectiveConfig(),
                                            "commit_score": "gradient"})
    generator = torch.Generator().manual_seed(4)
    modes = set()
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)
        modes.add(model[0].weight.mode)
    assert rt.Mode.QRESU in modes and model[0].weight.mode == rt.Mode.SPARSE
    assert all(0 <= h.mean_consistency <= 1 for h in scheduler.history)


def test_pause_callback_at_chosen_cycle_ends():
    paused = []
    model, optimizer, scheduler = make_run({"pause_at": [0, 2], "on_pause": lambda s, c: paused.append((c, s.global_step))})
    generator = torch.Generator().manual_seed(5)
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)
    assert paused == [(0, 20), (2, 60)]


def test_checkpoint_mid_cycle_resumes_identically():
    generator = torch.Generator().manual_seed(6)
    model, optimizer, scheduler = make_run({"selective": rt.SelectiveConfig()}, seed=7)
    for _ in range(56):  # cycle 2 is steps 40..59: train 10, stabilize 4, RESU 6 → mid-RESU
        train_step(model, optimizer, scheduler, generator)
    reference_rest = torch.Generator()
    reference_rest.set_state(generator.get_state())
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data_rng": generator.get_state()}, buffer)
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)

    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh_model, fresh_optimizer, fresh_scheduler = make_run({"selective": rt.SelectiveConfig()}, seed=99)
    fresh_model.load_state_dict(checkpoint["model"])
    fresh_optimizer.load_state_dict(checkpoint["optimizer"])
    fresh_scheduler.load_state_dict(checkpoint["scheduler"])
    resumed_rng = torch.Generator()
    resumed_rng.set_state(checkpoint["data_rng"])
    while not fresh_scheduler.finished:
        train_step(fresh_model, fresh_optimizer, fresh_scheduler, resumed_rng)
    for a, b in zip(model.parameters(), fresh_model.parameters()):
        if isinstance(a, rt.ResuTensor):
            assert a.mode == b.mode and torch.equal(a.mask(), b.mask())
            assert torch.equal(a.dequantize(), b.dequantize())
        else:
            assert torch.equal(a, b)
    assert [vars(h) for h in scheduler.history] == [vars(h) for h in fresh_scheduler.history]
    assert scheduler.steps == fresh_scheduler.steps and len(scheduler.steps) == 60


def test_plot_history_draws_the_per_step_history_headless(tmp_path):
    import matplotlib

    matplotlib.use("Agg")  # no display here; plot_history itself uses no pyplot state
    model, optimizer, scheduler = make_run({"num_cycles": 2})
    generator = torch.Generator().manual_seed(8)
    with pytest.raises(ValueError, match="no recorded step"):
        rt.plot_history(scheduler)
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)
    fig = rt.plot_history(scheduler)
    assert [ax.get_title() for ax in fig.axes] == ["training loss", "sparsity", "resurrected share of the active set"]
    loss_line = fig.axes[0].get_lines()[0]
    assert list(loss_line.get_xdata()) == list(range(1, 41))
    assert list(loss_line.get_ydata()) == [r.loss for r in scheduler.steps]
    assert list(fig.axes[1].get_lines()[0].get_ydata()) == [r.sparsity for r in scheduler.steps]
    # one vertical line per prune and per commit (2 cycles), after the data line
    boundaries = [line.get_xdata()[0] for line in fig.axes[1].get_lines()[1:]]
    assert sorted(boundaries) == [10, 20, 30, 40]
    assert len(fig.axes[2].patches) == 2  # the two RESU phases, shaded
    path = tmp_path / "history.png"
    rt.plot_history(scheduler, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_end_to_end_on_mnist1d_with_resume():
    """Three cycles on real MNIST-1D data: phase order, sparsity per cycle, learning, and resume."""
    from benchmarks.quality.mnist1d_harness import load_mnist1d

    x, y, x_test, y_test = load_mnist1d()

    def run(stop_at=None, state=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(40, 128), nn.ReLU(), nn.Linear(128, 10))
        quantize_(model, rt.resu_config(sparsity=0.0))
        optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
        config = rt.ScheduleConfig(steps_per_cycle=60, num_cycles=3, sparsity=0.8, initial_sparsity=0.5,
                                   sparsity_schedule=[0.5, 0.7625, 0.8], progress=False)
        scheduler = rt.ResuScheduler(model, optimizer, config)
        batches = torch.Generator().manual_seed(1)
        if state is not None:
            model.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"]), batches.set_state(state["batches"])
        phases = []
        while not scheduler.finished:
            if scheduler.global_step == stop_at:
                return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "batches": batches.get_state()}
            idx = torch.randint(0, len(x), (64,), generator=batches)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            phases.append(scheduler.phase)
            scheduler.step(loss)
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        return model, scheduler, phases, accuracy

    model, scheduler, phases, accuracy = run()
    assert phases[:60] == ["train"] * 42 + ["stabilize"] * 6 + ["resu"] * 12
    # each layer rounds its pruned count to whole coordinates
    assert [h.sparsity for h in scheduler.history] == pytest.approx(scheduler.config.cycle_sparsities(), abs=2e-3)
    assert accuracy > 0.3  # 10 classes; 180 small steps
    assert scheduler.history[-1].loss < scheduler.history[0].loss
    state = run(stop_at=113)  # cycle 1, mid-RESU
    resumed, resumed_scheduler, _, resumed_accuracy = run(state=state)
    for a, b in zip(model.parameters(), resumed.parameters()):
        da = a.dequantize() if isinstance(a, rt.ResuTensor) else a
        db = b.dequantize() if isinstance(b, rt.ResuTensor) else b
        assert torch.equal(da, db)
    assert resumed_accuracy == accuracy


def test_static_subset_is_refreshed_every_n_steps():
    model, optimizer, scheduler = make_run({"num_cycles": 1, "selective": rt.StaticSubsetConfig(alpha=0.3, refresh_every=2)})
    generator = torch.Generator().manual_seed(9)
    subsets = []
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)
        w = model[0].weight
        if w.mode == rt.Mode.RESU:
            subsets.append(w.trainable_mask().clone())
            assert w.trainable_count == int(0.3 * (w.numel() - w.n_active))
    changes = [not torch.equal(a, b) for a, b in zip(subsets, subsets[1:])]
    assert changes == [False, True, False, True, False]  # RESU steps 14..19: refreshed at 2 and 4


def test_progress_bar_shows_cycle_and_phase(capsys):
    model, optimizer, scheduler = make_run({"num_cycles": 1, "progress": True})
    generator = torch.Generator().manual_seed(10)
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)
    err = capsys.readouterr().err
    assert "RESU" in err and "20/20" in err and "cycle=1" in err


def test_resurrected_share_counts_a_coordinate_resurrected_twice_once():
    """'simple' commits make every θ active, so the next prune cuts mostly the same small
    coordinates again: many are pruned and resurrected twice. Reference: the masks seen from
    outside after every step."""
    model, optimizer, scheduler = make_run({"commit_strategy": "simple", "num_cycles": 3, "epsilon": 0.01})
    generator = torch.Generator().manual_seed(11)
    weights = [w for _, _, w in rt.resu_weights(model)]
    ever_pruned = [torch.zeros(w.shape, dtype=torch.bool) for w in weights]
    resurrections = [torch.zeros(w.shape, dtype=torch.int64) for w in weights]
    while not scheduler.finished:
        before = [w.mask().clone() for w in weights]
        train_step(model, optimizer, scheduler, generator)
        for i, w in enumerate(weights):
            mask = w.mask()
            ever_pruned[i] |= ~mask
            resurrections[i] += (mask & ~before[i]).long()
            if scheduler.steps[-1].event == "commit":
                assert (mask & ~before[i]).any()  # the commit brought coordinates back
        active = sum(int(w.mask().sum()) for w in weights)
        expected = sum(int((p & w.mask()).sum()) for p, w in zip(ever_pruned, weights)) / active
        assert scheduler.steps[-1].resurrected_share == expected
    twice = sum(int((r >= 2).sum()) for r in resurrections)
    assert twice > 0  # the case this test is about
    final = scheduler.history[-1]
    once = sum(int((p & w.mask()).sum()) for p, w in zip(ever_pruned, weights))
    assert final.resurrected_share == once / final.active and final.active == sum(w.numel() for w in weights)
    # this cycle's resurrections plus earlier ones still active: each coordinate once
    assert final.resurrected + final.survivors == once
    assert sum(h.resurrected for h in scheduler.history) - once >= twice  # what summing per cycle overcounts


def test_step_records_loss_phase_sparsity_and_metrics():
    model, optimizer, scheduler = make_run({"num_cycles": 1})
    generator = torch.Generator().manual_seed(12)
    with pytest.raises(TypeError, match="metrics must be a dict"):
        scheduler.step(1.0, metrics=[0.5])
    with pytest.raises(TypeError, match=r"metrics\['acc'\] must be a number"):
        scheduler.step(1.0, metrics={"acc": "high"})
    with pytest.raises(ValueError, match="one-element tensor"):
        scheduler.step(torch.ones(2))
    assert scheduler.global_step == 0 and not scheduler.steps  # a rejected step changes nothing
    phases = []
    while not scheduler.finished:
        phases.append(scheduler.phase)
        x = torch.randn(8, 16, generator=generator)
        loss = F.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        metrics = {"val_acc": torch.tensor(0.5 + scheduler.global_step / 100), "n": 3} \
            if scheduler.global_step % 5 == 4 else None
        scheduler.step(loss if scheduler.global_step != 0 else None, metrics=metrics)
    records = scheduler.steps
    assert [r.step for r in records] == list(range(1, 21)) and [r.phase for r in records] == phases
    assert records[0].loss is None and all(isinstance(r.loss, float) for r in records[1:])
    assert [r.step for r in records if r.metrics] == [5, 10, 15, 20]
    assert records[4].metrics == {"val_acc": pytest.approx(0.54), "n": 3.0}
    assert [(r.step, r.event) for r in records if r.event] == [(10, "prune"), (14, "enter_resu"), (20, "commit")]
    sparsity = sum(int((~w.mask()).sum()) for _, _, w in rt.resu_weights(model)) / \
        sum(w.numel() for _, _, w in rt.resu_weights(model))
    assert [r.sparsity for r in records[:9]] == [0.0] * 9 and records[-1].sparsity == sparsity
    assert scheduler.history[0].loss == pytest.approx(sum(r.loss for r in records[1:]) / 19)
    import matplotlib

    matplotlib.use("Agg")
    fig = rt.plot_history(scheduler)
    assert fig.axes[-1].get_title() == "metrics" and len(fig.axes) == 4
    lines = {line.get_label(): line for line in fig.axes[-1].get_lines() if not line.get_label().startswith("_")}
    assert sorted(lines) == ["n", "val_acc"]
    assert list(lines["val_acc"].get_xdata()) == [5, 10, 15, 20]
    assert list(lines["val_acc"].get_ydata()) == [r.metrics["val_acc"] for r in records if r.metrics]
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == list(range(2, 21))  # step 1 had no loss


def test_tensor_losses_are_read_together_and_kept_per_step(monkeypatch):
    """A tensor loss is not read at its step (on a GPU that would wait for the device every step):
    the losses are read together at a commit, when the history or state is asked for, or every
    UNREAD_LOSSES_LIMIT steps. Each step keeps its own value even when the caller overwrites its
    loss tensor in place, as a CUDA graph's output is rewritten by every replay."""
    import resu_tensor.training.scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "UNREAD_LOSSES_LIMIT", 4)
    model, optimizer, scheduler = make_run({"num_cycles": 2})
    reused = torch.zeros(())
    values = [0.25 * k for k in range(1, 41)]
    unread = []
    for value in values:
        reused.fill_(value)
        scheduler.step(reused)
        unread.append(len(scheduler._unread_losses))
    assert unread[:3] == [1, 2, 3] and unread[3] == 0  # read at the limit
    assert unread[19] == 0 and unread[20] == 1  # the commit at step 20 read the cycle's losses
    assert [r.loss for r in scheduler.steps] == values
    assert [h.loss for h in scheduler.history] == [pytest.approx(sum(values[:20]) / 20),
                                                   pytest.approx(sum(values[20:]) / 20)]
    resumed = make_run({"num_cycles": 2})[2]
    resumed.load_state_dict(scheduler.state_dict())
    assert [r.loss for r in resumed.steps] == values


def test_no_stabilize_budget_prunes_and_enters_resu_in_one_step():
    model, optimizer, scheduler = make_run({"num_cycles": 1, "stabilize_fraction": 0.0})
    generator = torch.Generator().manual_seed(13)
    while not scheduler.finished:
        train_step(model, optimizer, scheduler, generator)
    assert [(r.step, r.event) for r in scheduler.steps if r.event] == [(14, "prune+enter_resu"), (20, "commit")]


def record_commits(monkeypatch):
    """Wrap the scheduler's commit_: each call's options, and each layer's merged weight, mask and
    AdamW state just before it, are appended to the returned list."""
    import resu_tensor.training.scheduler as scheduler_module

    calls, real = [], scheduler_module.commit_

    def recording(model, **options):
        before = {name: (w.storage_weight().clone(), w.storage_mask().clone(), w.trainable_flat().clone())
                  for name, _, w in rt.resu_weights(model, options.get("filter_fn"))}
        optimizer = options.get("optimizer")
        state = {name: optimizer.state[w]["exp_avg"].flat.clone() for name, _, w in rt.resu_weights(model)
                 if optimizer is not None and w in optimizer.state}
        calls.append({"options": options, "before": before, "state": state})
        return real(model, **options)

    monkeypatch.setattr(scheduler_module, "commit_", recording)
    return calls


@pytest.mark.parametrize("admit", ["quota", "beats_weakest"])
def test_commit_admit_picks_the_mask_amnesty_mask_picks(monkeypatch, admit):
    from resu_tensor.method.amnesty import amnesty_mask

    calls = record_commits(monkeypatch)
    model, optimizer, scheduler = make_run({"commit_admit": admit, "epsilon": 0.5, "r_start": 0.4, "r_end": 0.2})
    generator = torch.Generator().manual_seed(4)
    for _ in range(scheduler.config.steps_per_cycle):
        train_step(model, optimizer, scheduler, generator)
    (call,) = calls
    assert call["options"]["admit"] == admit
    ratio = rt.resurrection_ratio(0, 3, 0.4, 0.2)
    other = {"quota": "beats_weakest", "beats_weakest": "quota"}[admit]
    differs = False
    for name, _, w in rt.resu_weights(model):
        merged, old_mask, _ = call["before"][name]
        expected, _ = amnesty_mask(merged.abs().float(), old_mask, 0.6, ratio, admit=admit)
        assert torch.equal(w.storage_mask(), expected)
        differs |= not torch.equal(amnesty_mask(merged.abs().float(), old_mask, 0.6, ratio, admit=other)[0], expected)
    assert differs  # the two rules pick different masks here, so the option is what chose this one
    assert scheduler.phase_changes[-1]["amnesty"]["resurrected_kept"] > 0


def test_optimizer_state_carry_at_commit_keeps_theta_state_for_resurrected_coordinates(monkeypatch):
    calls = record_commits(monkeypatch)
    model, optimizer, scheduler = make_run({"optimizer_state": "carry_at_commit", "epsilon": 0.5, "r_start": 0.4})
    generator = torch.Generator().manual_seed(5)
    for _ in range(scheduler.config.steps_per_cycle):
        train_step(model, optimizer, scheduler, generator)
    (call,) = calls
    assert call["options"]["optimizer"] is optimizer
    resurrected_somewhere = False
    for name, _, w in rt.resu_weights(model):
        _, old_mask, theta_flat = call["before"][name]
        theta_state = torch.zeros(w.storage_numel)
        theta_state[theta_flat] = call["state"][name]  # θ's exp_avg over the pruned coordinates
        new_state = torch.zeros(w.storage_numel)
        new_state[w.trainable_flat()] = optimizer.state[w]["exp_avg"].flat
        mask = w.storage_mask().view(-1)
        resurrected = mask & ~old_mask.view(-1)
        resurrected_somewhere |= bool(resurrected.any())
        assert torch.equal(new_state[resurrected], theta_state[resurrected])  # carried bit for bit
        assert (new_state[mask & old_mask.view(-1)] == 0).all()  # the frozen weights had none
        assert theta_state[resurrected].abs().sum() > 0
    assert resurrected_somewhere
    # reset drops it
    model, optimizer, scheduler = make_run({"epsilon": 0.5, "optimizer_state": "reset"})
    for _ in range(scheduler.config.steps_per_cycle):
        train_step(model, optimizer, scheduler, generator)
    assert calls[-1]["options"]["optimizer"] is None
    assert all(has_fresh_state(optimizer, w) for _, _, w in rt.resu_weights(model))


def test_optimizer_state_carry_keeps_the_state_of_coordinates_that_stay_trainable(monkeypatch):
    """``optimizer_state="carry"``: at the prune, the RESU entry and the commit, every coordinate
    trainable before and after keeps its AdamW moments bit for bit, joiners start at zero, and the
    step count runs on (the default); ``reset`` starts every phase afresh."""
    import resu_tensor.training.scheduler as scheduler_module

    changes = []

    def snapshot(model, optimizer):
        out = {}
        for name, _, w in rt.resu_weights(model):
            state = optimizer.state.get(w, {})
            flat = w.trainable_flat()
            flat = torch.ones(w.storage_numel, dtype=torch.bool) if flat is None else flat.clone()
            moments = torch.zeros(w.storage_numel)
            if "exp_avg" in state:
                exp_avg = state["exp_avg"]
                moments[flat] = exp_avg.flat if isinstance(exp_avg, rt.CompactTensor) else exp_avg.reshape(-1)
            out[name] = (flat, moments, float(state["step"]) if "step" in state else None)
        return out

    for method in ("_prune", "_enter_resu", "_commit"):
        real = getattr(scheduler_module.ResuScheduler, method)

        def recording(self, cycle, real=real, method=method):
            before = snapshot(self.model, self.optimizer)
            real(self, cycle)
            changes.append((method, before, snapshot(self.model, self.optimizer)))
        monkeypatch.setattr(scheduler_module.ResuScheduler, method, recording)

    model, optimizer, scheduler = make_run({"optimizer_state": "carry", "freeze_active": False, "epsilon": 0.5,
                                            "r_start": 0.4, "initial_sparsity": 0.3})
    generator = torch.Generator().manual_seed(3)
    for _ in range(2 * scheduler.config.steps_per_cycle):
        train_step(model, optimizer, scheduler, generator)
    assert [m for m, _, _ in changes] == ["_prune", "_enter_resu", "_commit"] * 2
    for method, before, after in changes:
        for name, (old_flat, old_moments, old_step) in before.items():
            new_flat, new_moments, new_step = after[name]
            kept, joined = old_flat & new_flat, new_flat & ~old_flat
            assert kept.any() and old_moments[kept].abs().sum() > 0, (method, name)
            assert torch.equal(new_moments[kept], old_moments[kept]), (method, name)
            assert not new_moments[joined].any(), (method, name)
            assert new_step == old_step > 0, (method, name)
    # reset starts each phase afresh
    model, optimizer, scheduler = make_run({"freeze_active": False, "initial_sparsity": 0.3, "optimizer_state": "reset"})
    changes.clear()
    for _ in range(scheduler.config.steps_per_cycle):
        train_step(model, optimizer, scheduler, generator)
    assert all(all(step is None or step == 0 for _, _, step in after.values()) for _, _, after in changes)


def test_optimizer_state_default_carries_for_every_method_and_mode():
    for config in (rt.ScheduleConfig(total_steps=1000, sparsity=0.9),
                   rt.ScheduleConfig(total_steps=1000, sparsity=0.9, freeze_active=True),
                   rt.ScheduleConfig(total_steps=1000, sparsity=0.9, quantize_bits=4),
                   rt.ScheduleConfig(20, 3), rt.ScheduleConfig(method="gmp", total_steps=1000)):
        assert config.optimizer_state == "carry", config
    with pytest.raises(ValueError, match="unknown optimizer_state None; accepted: reset, carry, carry_at_commit"):
        rt.ScheduleConfig(20, 3, optimizer_state=None)


def test_commit_option_errors():
    with pytest.raises(ValueError, match="unknown commit_admit 'all'; accepted: quota, beats_weakest"):
        rt.ScheduleConfig(10, 2, commit_admit="all")
    with pytest.raises(ValueError, match="unknown optimizer_state 'keep'; accepted: reset, carry, carry_at_commit"):
        rt.ScheduleConfig(10, 2, optimizer_state="keep")

"""The ``resu_tensor`` logger: every phase change of a ResuScheduler run is announced at the step
it happens, with figures equal to the scheduler's own history and to the masks seen from outside."""
import logging

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.training.scheduler import logger


def run_logged(caplog, level=logging.INFO, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_(model, rt.resu_config(sparsity=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    options = dict(steps_per_cycle=20, num_cycles=2, sparsity=0.6, stabilize_fraction=0.2, resu_fraction=0.3,
                   progress=False, epsilon=1.0)
    options.update(overrides)
    scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(**options))
    weights = [w for _, _, w in rt.resu_weights(model)]
    generator = torch.Generator().manual_seed(1)
    seen = {}  # step -> what the masks and trainable sets are after it, from outside
    caplog.set_level(level, logger="resu_tensor")
    while not scheduler.finished:
        x = torch.randn(8, 16, generator=generator)
        loss = F.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step(loss)
        masks = [w.mask() for w in weights]
        seen[scheduler.global_step] = {
            "sparsity": sum(int((~m).sum()) for m in masks) / sum(m.numel() for m in masks),
            "active": sum(int(m.sum()) for m in masks),
            "trainable": sum(w.trainable_count for w in weights),
            "modes": {w.mode for w in weights},
        }
    records = [r for r in caplog.records if r.name == "resu_tensor"]
    return scheduler, records, seen


def test_phase_changes_are_logged_at_their_steps_with_the_schedulers_figures(caplog):
    scheduler, records, seen = run_logged(caplog)
    info = [r for r in records if r.levelno == logging.INFO]
    assert [(r.resu["step"], r.resu["event"]) for r in info] == [
        (10, "prune"), (14, "enter_resu"), (20, "commit"), (30, "prune"), (34, "enter_resu"), (40, "commit"),
        (40, "finished")]
    assert [r.resu for r in info] == scheduler.phase_changes
    assert not [r for r in records if r.levelno == logging.DEBUG]  # details only at DEBUG
    numel = sum(w.numel() for _, _, w in rt.resu_weights(scheduler.model))
    commits = iter(scheduler.history)
    for record in info:
        figures, step = record.resu, record.resu["step"]
        message = record.getMessage()
        assert message.startswith(f"step {step}: ")
        if figures["event"] == "prune":
            assert figures["target_sparsity"] == 0.6 and figures["layers"] == 2
            assert figures["sparsity"] == seen[step]["sparsity"] and seen[step]["modes"] == {rt.Mode.SPARSE}
            assert f"cycle {figures['cycle']}: pruned 2 layers (magnitude) to target sparsity 0.6000" in message
            assert f"actual sparsity {seen[step]['sparsity']:.4f}" in message
        elif figures["event"] == "enter_resu":
            assert seen[step]["modes"] == {rt.Mode.RESU} and figures["mode"] == "resu" and figures["bits"] is None
            assert figures["theta"] == numel - seen[step]["active"] == figures["trainable"] == seen[step]["trainable"]
            assert f"entered RESU on 2 layers: {figures['theta']} θ, {figures['trainable']} trainable" in message
        elif figures["event"] == "commit":
            stats = next(commits)
            assert figures["cycle"] == stats.cycle and figures["resurrected"] == stats.resurrected > 0
            assert figures["survivors"] == stats.survivors and figures["active"] == stats.active == seen[step]["active"]
            assert figures["sparsity"] == stats.sparsity == seen[step]["sparsity"]
            assert figures["resurrected_share"] == stats.resurrected_share
            assert figures["resurrected_of_active"] == stats.resurrected / stats.active
            amnesty = figures["amnesty"]
            assert amnesty["resurrected_kept"] == stats.resurrected
            assert amnesty["active_kept"] + amnesty["resurrected_kept"] == stats.active
            assert (f"committed (amnesty): {stats.resurrected} resurrected "
                    f"({100 * stats.resurrected / stats.active:.2f}% of the new active set of {stats.active}), "
                    f"{stats.survivors} survivors, resurrected share {stats.resurrected_share:.4f}") in message
            assert f"resurrected_kept={stats.resurrected}" in message
        else:
            assert figures["sparsity"] == scheduler.history[-1].sparsity
            assert "RESU schedule finished after 2 cycles" in message
    assert next(commits, None) is None


def test_qresu_entry_names_the_bits_and_debug_gives_per_layer_details(caplog):
    scheduler, records, seen = run_logged(caplog, level=logging.DEBUG, num_cycles=1, quantize_bits=4, group_size=16)
    enter = [r for r in records if getattr(r, "resu", {}).get("event") == "enter_resu"]
    assert len(enter) == 1 and enter[0].resu["bits"] == 4 and enter[0].resu["mode"] == "qresu"
    assert seen[14]["modes"] == {rt.Mode.QRESU}
    assert "entered QRESU (4-bit) on 2 layers" in enter[0].getMessage()
    debug = [r.getMessage() for r in records if r.levelno == logging.DEBUG]
    names = [name for name, _, _ in rt.resu_weights(scheduler.model)]
    assert [m.split(":")[2].strip() for m in debug if "pruned layer" in m] == [f"pruned layer {n!r}" for n in names]
    assert sum("entered RESU layer" in m for m in debug) == 2
    table = [m for m in debug if "commit per layer" in m]
    assert len(table) == 1 and table[0].splitlines()[1].split()[0] == "layer"


def test_logger_is_silent_unless_configured():
    assert logger is logging.getLogger("resu_tensor")
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert logger.level == logging.NOTSET  # the application's configuration decides


def test_prune_and_enter_in_one_step_logs_both(caplog):
    scheduler, records, _ = run_logged(caplog, num_cycles=1, stabilize_fraction=0.0)
    events = [(r.resu["step"], r.resu["event"]) for r in records if r.levelno == logging.INFO]
    assert events == [(14, "prune"), (14, "enter_resu"), (20, "commit"), (20, "finished")]
    assert [(r.step, r.event) for r in scheduler.steps if r.event] == [(14, "prune+enter_resu"), (20, "commit")]

"""torch.compile with ResuTensor weights, on CPU.

Compiled code runs on the "aot_eager" backend: Dynamo and AOTAutograd are the layers that see the
subclass, Inductor only lowers the plain graph they produce, and compiling its C++ on 2 cores
costs ~30 s per graph set. ``test_inductor_training_step`` and the RESU case of
``test_compiled_step_under_cpu_bf16_autocast_matches_eager`` are the Inductor tests.

What is compiled:
* the model, ``torch.compile(model, fullgraph=True)``: forward, and backward through AOTAutograd;
  no graph break in any mode;
* the optimizer, ``torch.compile(optimizer.step)``: torch.optim itself calls
  ``torch._dynamo.graph_break()`` around every step (``_use_grad_for_differentiable``), so
  ``fullgraph=True`` fails for any parameter type; the step body, hooks included, is one graph
  (on torch 2.11 through ``resu_tensor.torch_compat``, a backport of pytorch#176864);
* forward, ``loss.backward()`` and ``optimizer.step()`` in one compiled function
  (``test_whole_training_step_in_one_compiled_function``): Dynamo breaks at ``.backward()``
  unless ``trace_autograd_ops`` (torch 2.13) is on.
"""
import copy
import functools
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._subclasses import meta_utils
from torchao.quantization import quantize_
from torchao.testing import utils as ao_testing

import resu_tensor as rt
from resu_tensor.core.mask_encoding import encode_mask
from resu_tensor import torch_compat

MODES = ["dense", "sparse", "resu", "qresu"]
BACKEND = "aot_eager"
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Tests compile the same nn.Module / optimizer code objects: start from empty caches so that
    # entries of one test neither serve another nor count towards its recompile limit.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_model(mode: str) -> nn.Module:
    generator = torch.Generator().manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    quantize_(model, rt.resu_config(sparsity=0.0 if mode == "dense" else 0.5))
    if mode == "resu":
        rt.enter_resu_(model, epsilon=0.2, generator=generator)
    elif mode == "qresu":
        rt.enter_resu_(model, epsilon=0.2, quantize_bits=4, group_size=16, generator=generator)
    assert [w.mode.value for w in resu_params(model)] == [mode, mode]
    return model


def resu_params(model) -> list:
    return [w for _, _, w in rt.resu_weights(model)]


def frozen_values(w: rt.ResuTensor) -> torch.Tensor:
    return w.dequantize()[~w.trainable_mask()]


def dense_params(model) -> list:
    return [p.dequantize() if isinstance(p, rt.ResuTensor) else p.detach().clone() for p in model.parameters()]


@functools.lru_cache(maxsize=None)
def compiled_sgd_is_exact(device: str = "cpu") -> bool:
    """Whether this torch's compiled momentum-SGD step is bit-identical to eager on a plain
    nn.Linear (torch 2.13: yes; torch 2.11: no, ~1e-7 apart after a step): ResuTensor steps are
    held to bit-identity wherever plain tensors get it."""
    torch.manual_seed(0)
    plain = nn.Linear(32, 8, device=device)
    twin = copy.deepcopy(plain)
    opt, twin_opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01) for m in (plain, twin))
    step = torch.compile(opt.step, backend=BACKEND)
    for _ in range(2):
        x = torch.randn(6, 32, device=device)
        plain(x).square().sum().backward()
        twin(x).square().sum().backward()
        step()
        twin_opt.step()
    torch._dynamo.reset()
    return all(torch.equal(a, b) for a, b in zip(plain.parameters(), twin.parameters()))


def assert_params_match(model, reference, exact: bool) -> None:
    for (name, _), a, b in zip(model.named_parameters(), dense_params(model), dense_params(reference)):
        if exact:
            assert torch.equal(a, b), name
        else:
            # AdamW: Dynamo rewrites addcmul_/addcdiv_(value=...) into fma (one rounding fewer).
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def break_reasons_outside_torch_optim(explanation) -> list:
    return [r.reason for r in explanation.break_reasons
            if not (r.reason.startswith("Call to `torch._dynamo.graph_break()`")
                    and r.user_stack[-1].filename.endswith("torch/optim/optimizer.py"))]


# ---------------------------------------------------------------------------------------- item 1
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])  # foreach: CUDA's default
@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_matches_eager(mode, foreach):
    """fullgraph model (torch._dynamo.explain: one graph, no break) and compiled AdamW step:
    loss, compact grads and parameters match eager; frozen coordinates stay bit-identical and
    optimizer state stays compact."""
    model = make_model(mode)
    eager = copy.deepcopy(model)
    explanation = torch._dynamo.explain(model)(torch.randn(6, 32))
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    torch._dynamo.reset()

    initial = [w.dequantize() for w in resu_params(model)]
    frozen = [frozen_values(w) for w in resu_params(model)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-2, weight_decay=0.1, foreach=foreach)
    compiled_model = torch.compile(model, backend=BACKEND, fullgraph=True)
    compiled_step = torch.compile(opt.step, backend=BACKEND)
    for _ in range(3):
        x, y = torch.randn(6, 32), torch.randint(0, 8, (6,))
        loss, eager_loss = F.cross_entropy(compiled_model(x), y), F.cross_entropy(eager(x), y)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        loss.backward()
        eager_loss.backward()
        for w, v in zip(resu_params(model), resu_params(eager)):
            assert isinstance(w.grad, rt.CompactTensor) and w.grad.flat.numel() == w.trainable_count
            torch.testing.assert_close(w.grad.flat, v.grad.flat, rtol=1e-5, atol=1e-6)
        compiled_step()
        eager_opt.step()
        opt.zero_grad()
        eager_opt.zero_grad()

    assert_params_match(model, eager, exact=False)
    for w, before, start in zip(resu_params(model), frozen, initial):
        assert torch.equal(frozen_values(w), before)
        assert not torch.equal(w.dequantize(), start)
        assert isinstance(opt.state[w]["exp_avg"], rt.CompactTensor)
        assert opt.state[w]["exp_avg"].flat.numel() == w.trainable_count

    F.cross_entropy(model(torch.randn(6, 32)), torch.randint(0, 8, (6,))).backward()
    explanation = torch._dynamo.explain(opt.step)()
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
    assert break_reasons_outside_torch_optim(explanation) == []



def plain_twin(model: nn.Module) -> nn.Module:
    """``model`` with every weight a plain tensor holding its dense effective weight."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.dequantize())
    return twin


@pytest.mark.parametrize(("mode", "backend"), [(mode, BACKEND) for mode in MODES] + [("resu", "inductor")])
def test_compiled_step_under_cpu_bf16_autocast_matches_eager(mode, backend):
    """Forward under CPU bf16 autocast (the way benchmarks.model trains), fullgraph model and
    compiled AdamW step: the first step's logits and compact grads equal eager's bit for bit
    (aot_eager) and the logits equal a plain nn.Linear model's on W_eff; later steps, whose
    weights differ by the compiled AdamW's fma rounding, and Inductor, which computes bf16 chains
    in float32, match within bf16 tolerance. Stored values stay float32, frozen coordinates
    bit-identical, optimizer state compact."""
    model = make_model(mode)
    eager = copy.deepcopy(model)
    plain = plain_twin(model)
    frozen = [frozen_values(w) for w in resu_params(model)]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    eager_opt = torch.optim.AdamW(eager.parameters(), lr=1e-2, weight_decay=0.1)
    compiled_model = torch.compile(model, backend=backend, fullgraph=True)
    compiled_step = torch.compile(opt.step, backend=backend)
    exact = backend == BACKEND
    generator = torch.Generator().manual_seed(2)
    for step in range(3):
        x, y = torch.randn(6, 32, generator=generator), torch.randint(0, 8, (6,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, eager_logits = compiled_model(x), eager(x)
            plain_logits = plain(x) if step == 0 else None
        assert logits.dtype == eager_logits.dtype == torch.bfloat16
        first_and_exact = step == 0 and exact
        if first_and_exact:
            assert torch.equal(logits, eager_logits)
            assert torch.equal(logits, plain_logits)
        else:
            # logits are O(1): a bf16 rounding of a summand (~4e-3) may land on a logit near 0
            torch.testing.assert_close(logits, eager_logits, rtol=1.6e-2, atol=1e-2)
        loss, eager_loss = F.cross_entropy(logits.float(), y), F.cross_entropy(eager_logits.float(), y)
        loss.backward()
        eager_loss.backward()
        for w, v in zip(resu_params(model), resu_params(eager)):
            assert isinstance(w.grad, rt.CompactTensor) and w.grad.flat.numel() == w.trainable_count
            assert w.grad.flat.dtype == v.grad.flat.dtype == torch.float32
            if first_and_exact:
                assert torch.equal(w.grad.flat, v.grad.flat)
            else:
                torch.testing.assert_close(w.grad.flat, v.grad.flat, rtol=1.6e-2, atol=1e-3)
        compiled_step()
        eager_opt.step()
        opt.zero_grad()
        eager_opt.zero_grad()

    for (name, _), a, b in zip(model.named_parameters(), dense_params(model), dense_params(eager)):
        # AdamW moves a coordinate by about lr = 1e-2 per step whatever its gradient's size, so a
        # bf16-rounding difference in a small gradient shows up here amplified; a tenth of a step
        # still tells a wrong or missing update apart
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3, msg=lambda m, name=name: f"{name}: {m}")
    for w, before in zip(resu_params(model), frozen):
        assert w.dtype == torch.float32 and w.dequantize().dtype == torch.float32
        assert torch.equal(frozen_values(w), before)
        assert isinstance(opt.state[w]["exp_avg"], rt.CompactTensor)
        assert opt.state[w]["exp_avg"].flat.numel() == w.trainable_count

def test_whole_training_step_in_one_compiled_function():
    """Forward, backward and SGD step in one compiled function (RESU): matches eager; the only
    graph breaks are Dynamo's at loss.backward() and torch.optim's own."""
    model = make_model("resu")
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)

    def train_step(net, optimizer, x, y):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return loss

    compiled = torch.compile(train_step, backend=BACKEND)
    torch._dynamo.utils.counters.clear()
    for _ in range(3):
        x, y = torch.randn(6, 32), torch.randint(0, 8, (6,))
        torch.testing.assert_close(compiled(model, opt, x, y), train_step(eager, eager_opt, x, y))
    assert_params_match(model, eager, exact=compiled_sgd_is_exact())
    # Tensor.backward(), torch.optim's graph_break() calls, Optimizer.zero_grad (never traced),
    # and the step pre-hook's stale-state check (run eagerly: traced, it would guard every key).
    expected = ("Unsupported Tensor.backward() call", "Call to `torch._dynamo.graph_break()`",
                "Attempted to inline function marked as skipped", "Skip calling `torch.compiler.disable()`d")
    reasons = list(torch._dynamo.utils.counters["graph_break"])
    assert reasons and all(r.startswith(expected) for r in reasons), [r[:80] for r in reasons]


def test_step_compiles_with_torch_2_11s_grad_context():
    """torch 2.11 fakifies a parameter's .grad with the parameter's own symbolic context, which
    does not name the CompactTensor grad's inner tensor, so torch.compile(optimizer.step) failed
    (pytorch#176864). Replaying that behaviour on this torch: the step fails without
    resu_tensor.torch_compat's wrapper and matches eager with it."""
    converter = meta_utils.MetaConverter
    unwrapped = getattr(converter.meta_tensor, "__wrapped__", converter.meta_tensor)

    def train(meta_tensor):
        torch._dynamo.reset()
        model = make_model("resu")
        eager = copy.deepcopy(model)
        opt, eager_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, eager))
        with mock.patch.object(meta_utils, "_grad_context_compatible", lambda *args: True, create=True), \
                mock.patch.object(converter, "meta_tensor", meta_tensor):
            step = torch.compile(opt.step, backend=BACKEND)
            for _ in range(2):
                x = torch.randn(6, 32)
                model(x).square().sum().backward()
                eager(x).square().sum().backward()
                step()
                eager_opt.step()
                opt.zero_grad()
                eager_opt.zero_grad()
        assert_params_match(model, eager, exact=False)

    with pytest.raises(Exception, match="flat"):
        train(unwrapped)
    train(torch_compat.with_own_grad_context(unwrapped))


@pytest.mark.skipif(TORCH_VERSION < (2, 13), reason="trace_autograd_ops traces loss.backward() from torch 2.13")
@pytest.mark.parametrize("mode", ["sparse", "qresu"])
def test_forward_and_backward_in_one_fullgraph_function(mode):
    """With torch._dynamo.config.trace_autograd_ops (torch >= 2.13), loss.backward() is traced too:
    forward + backward in one graph, no break, same compact gradients as eager."""
    model = make_model(mode)
    eager = copy.deepcopy(model)

    def forward_backward(net, x, y):
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss.detach()

    x, y = torch.randn(6, 32), torch.randint(0, 8, (6,))
    with torch._dynamo.config.patch(trace_autograd_ops=True):
        explanation = torch._dynamo.explain(forward_backward)(copy.deepcopy(model), x, y)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        loss = torch.compile(forward_backward, backend=BACKEND, fullgraph=True)(model, x, y)
    torch.testing.assert_close(loss, forward_backward(eager, x, y))
    for w, v in zip(resu_params(model), resu_params(eager)):
        torch.testing.assert_close(w.grad.flat, v.grad.flat)


class CountingBackend(CompileCounterWithBackend):
    """Counts compiled frames (``frame_count``) and runs of the compiled graphs (``runs``): a
    frame that fell back to eager would run no graph."""

    def __init__(self, backend: str):
        super().__init__(backend)
        self.runs = 0

    def __call__(self, gm, example_inputs, **kwargs):
        compiled = super().__call__(gm, example_inputs, **kwargs)

        def run(*args):
            self.runs += 1
            return compiled(*args)
        return run


def run_compiled_schedule(config, device: str = "cpu", in_features: int = 16, compile_step: bool = True):
    """A ResuScheduler run of a small MLP compiled (fullgraph model; SGD step compiled or eager)
    next to an eager twin. Returns (compiled model, eager twin, per-step records of (modes,
    trainable keys, new model frames, new step frames)). Every step runs the compiled model graph
    (no eager fallback), and the compiled step's graph where the step is compiled."""
    model = nn.Sequential(nn.Linear(in_features, 32), nn.ReLU(), nn.Linear(32, 4)).to(device)
    quantize_(model, rt.resu_config(sparsity=0.0))
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.05, momentum=0.9)
    scheduler, eager_scheduler = rt.ResuScheduler(model, opt, config), rt.ResuScheduler(eager, eager_opt, config)
    model_compiles, step_compiles = CountingBackend(BACKEND), CountingBackend(BACKEND)
    compiled_model = torch.compile(model, backend=model_compiles, fullgraph=True)
    compiled_step = torch.compile(opt.step, backend=step_compiles) if compile_step else opt.step
    records = []
    for step in range(config.steps_per_cycle * config.num_cycles):
        state = (tuple(w.mode_name for w in resu_params(model)), tuple(w.trainable_key for w in resu_params(model)))
        before = (model_compiles.frame_count, step_compiles.frame_count, model_compiles.runs, step_compiles.runs)
        x, y = torch.randn(8, in_features, device=device), torch.randint(0, 4, (8,), device=device)
        F.cross_entropy(compiled_model(x), y).backward()
        compiled_step()
        opt.zero_grad()
        F.cross_entropy(eager(x), y).backward()
        eager_opt.step()
        eager_opt.zero_grad()
        # the model's graph and the step's graph(s) ran
        assert model_compiles.runs - before[2] == 1, step
        assert step_compiles.runs > before[3] or not compile_step, step
        records.append((*state, model_compiles.frame_count - before[0], step_compiles.frame_count - before[1]))
        scheduler.step()
        eager_scheduler.step()
    return model, eager, records


def assert_schedule_matches(model, eager, device: str = "cpu") -> None:
    assert_params_match(model, eager, exact=compiled_sgd_is_exact(device))
    for w, v in zip(resu_params(model), resu_params(eager)):
        assert torch.equal(w.mask(), v.mask()) and w.trainable_key == v.trainable_key
        assert torch.equal(frozen_values(w), frozen_values(v))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU")])])
def test_recompiles_only_when_mode_changes(device):
    """Two ResuScheduler cycles (DENSE → prune → RESU → commit → new mask → RESU → commit),
    compiled next to an eager twin, under the default recompile_limit: the model compiles once
    per mode of its layers (a new mask is data: the trainable set is an inner tensor and the key
    a live cell, not a guarded constant); the optimizer step compiles only in the first cycle
    (a compiled step guards its state tensors by identity, and the scheduler resets and remaps
    state in place where the trainable count stays the same); the two runs agree (SGD:
    bit-exact where a plain model's is)."""
    assert torch._dynamo.config.recompile_limit == 8
    config = rt.ScheduleConfig(steps_per_cycle=10, num_cycles=2, sparsity=0.5, stabilize_fraction=0.2,
                               resu_fraction=0.4, commit_strategy="amnesty", progress=False)
    model, eager, records = run_compiled_schedule(config, device)
    seen_modes, seen_keys = set(), set()
    for step, (modes, keys, model_frames, step_frames) in enumerate(records):
        assert model_frames == (modes not in seen_modes), (step, modes)
        if step > config.steps_per_cycle:
            # the first step of the second cycle is the first SPARSE step with a state (the first
            # cycle's came fresh from DENSE, of another size): one graph; none after it
            assert step_frames == 0, (step, modes)
        seen_modes.add(modes)
        seen_keys.add(keys)
    assert {"dense", "sparse", "resu"} == {m[0] for m in seen_modes}
    assert len(seen_keys) == 5  # dense, sparse, resu, sparse (new mask), resu: 5 sets, 3 graphs
    assert_schedule_matches(model, eager, device)


@pytest.mark.parametrize("schedule,quantize_bits", [("constant", None), ("cubic", None), ("cubic", 4)])
def test_ten_cycle_schedule_compiles_a_handful_of_graphs(schedule, quantize_bits):
    """Ten ResuScheduler cycles of a fullgraph model and a compiled SGD step under the default
    recompile_limit (8): no FailOnRecompileLimitHit, no eager fallback, the same weights as
    eager. Constant sparsity: one model graph per mode and no graph at all after the second
    cycle's first step (the step's state is reset in place). Cubic (how many coordinates train
    changes every cycle): the same, the count being a symbolic size of the weight's count carrier
    and of the gradients' and state's flat vectors rather than a constant of the graph; with
    QRESU phases (4-bit) also of θ's length."""
    assert torch._dynamo.config.recompile_limit == 8
    quantized = {} if quantize_bits is None else {"quantize_bits": quantize_bits, "group_size": 8}
    config = rt.ScheduleConfig(steps_per_cycle=6, num_cycles=10, sparsity=0.5, stabilize_fraction=0.2,
                               resu_fraction=0.5, commit_strategy="amnesty", sparsity_schedule=schedule,
                               progress=False, **quantized)
    model, eager, records = run_compiled_schedule(config)
    keys = {keys for _, keys, _, _ in records}
    model_frames = sum(r[2] for r in records)
    assert len(keys) >= 10, len(keys)  # a new trainable set (almost) every phase
    assert model_frames == len({modes for modes, *_ in records}) == 3
    assert sum(r[2] + r[3] for r in records[config.steps_per_cycle + 1:]) == 0
    assert_schedule_matches(model, eager)


def test_ten_cycle_selective_schedule_stops_compiling_after_two_cycles():
    """RESU-Selective's consistency filter inside a compiled optimizer step, over ten cubic cycles
    (a new count of θ in every RESU phase): its top-k sizes follow the symbolic count, so the
    filter compiles for the first counts it sees and never again, within recompile_limit (a graph
    per count would exhaust it and run the filter eagerly), with the same weights as eager."""
    config = rt.ScheduleConfig(steps_per_cycle=6, num_cycles=10, sparsity=0.5, stabilize_fraction=0.2,
                               resu_fraction=0.5, commit_strategy="amnesty", sparsity_schedule="cubic",
                               selective=rt.SelectiveConfig(), progress=False)
    model, eager, records = run_compiled_schedule(config)
    assert len({keys for _, keys, _, _ in records}) >= 10
    assert sum(r[2] for r in records) == 3
    assert sum(r[3] for r in records[2 * config.steps_per_cycle:]) == 0
    assert_schedule_matches(model, eager)


def change_trainable_count_(w: rt.ResuTensor, seed: int, drop: int) -> None:
    """A random new mask of ``drop`` fewer active weights for the SPARSE or RESU weight ``w``, in
    its mode (RESU: new θ drawn from ``seed`` at the pruned coordinates)."""
    generator = torch.Generator().manual_seed(seed)
    mask = w.storage_mask().view(-1)
    new = mask[torch.randperm(mask.numel(), generator=generator)]
    new[new.nonzero().view(-1)[:drop]] = False
    new = new.view(w.storage_shape)
    pruned = torch.zeros_like(w.values) if w.mode == rt.Mode.SPARSE else \
        0.05 * torch.randn(w.storage_shape, generator=generator)
    with torch.no_grad():
        w.set_state_(mode=w.mode, mask=encode_mask(new), trainable_side=w.trainable_side,
                     values=torch.where(new, w.values + 0.5, pruned))


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["sparse", "resu"])
def test_graph_traced_at_one_count_gives_eager_numbers_at_another(mode, optimizer):
    """A fullgraph model and a compiled optimizer step traced at one trainable count, then run
    (no new graph) after every weight got another count (a new mask with fewer active weights,
    state reset in place): each step's loss, compact gradients, optimizer state and weights
    match an eager twin (SGD bit for bit where a plain model's compiled step is), frozen
    coordinates bit-identical: no count of the first trace is baked into the reused graphs."""
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.01),
            "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1)}[optimizer]
    model = make_model(mode)
    eager = copy.deepcopy(model)
    opt, eager_opt = make(model.parameters()), make(eager.parameters())
    model_compiles, step_compiles = CountingBackend(BACKEND), CountingBackend(BACKEND)
    compiled_model = torch.compile(model, backend=model_compiles, fullgraph=True)
    compiled_step = torch.compile(opt.step, backend=step_compiles)
    exact = optimizer == "sgd" and compiled_sgd_is_exact()
    # AdamW: Dynamo's fma rewrite rounds once less per update; over nine steps its drift reaches
    # a few 1e-6 (a stale count would put values at wrong coordinates: differences of order 1)
    tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-4, "atol": 1e-5}
    torch.manual_seed(0)

    def train(steps):
        for _ in range(steps):
            x, y = torch.randn(6, 32), torch.randint(0, 8, (6,))
            loss, eager_loss = F.cross_entropy(compiled_model(x), y), F.cross_entropy(eager(x), y)
            torch.testing.assert_close(loss, eager_loss, **tolerance)
            loss.backward()
            eager_loss.backward()
            for w, v in zip(resu_params(model), resu_params(eager)):
                assert w.grad.flat.numel() == w.trainable_count == v.trainable_count
                torch.testing.assert_close(w.grad.flat, v.grad.flat, **tolerance)
            compiled_step()
            eager_opt.step()
            opt.zero_grad()
            eager_opt.zero_grad()
        for w, v in zip(resu_params(model), resu_params(eager)):
            for name, state in opt.state[w].items():
                other = eager_opt.state[v][name]
                if isinstance(state, rt.CompactTensor):
                    assert state.flat.numel() == w.trainable_count and state.trainable_key == w.trainable_key
                    state, other = state.flat, other.flat
                torch.testing.assert_close(state, other, **tolerance)
        for a, b in zip(dense_params(model), dense_params(eager)):
            torch.testing.assert_close(a, b, **tolerance)

    train(3)
    frames = (model_compiles.frame_count, step_compiles.frame_count)
    for seed, drop in ((1, 7), (2, 3)):
        counts = [w.trainable_count for w in resu_params(model)]
        for net in (model, eager):
            for i, w in enumerate(resu_params(net)):
                change_trainable_count_(w, seed + i, drop)
        assert all(w.trainable_count != n for w, n in zip(resu_params(model), counts))
        assert all(w.trainable_key == v.trainable_key for w, v in zip(resu_params(model), resu_params(eager)))
        rt.reset_optimizer_state_(opt, model)
        rt.reset_optimizer_state_(eager_opt, eager)
        frozen = [frozen_values(w).clone() for w in resu_params(model)]
        runs = (model_compiles.runs, step_compiles.runs)
        train(3)
        assert (model_compiles.frame_count, step_compiles.frame_count) == frames  # the same graphs ...
        assert model_compiles.runs == runs[0] + 3 and step_compiles.runs >= runs[1] + 3  # ... ran
        assert all(torch.equal(frozen_values(w), f) for w, f in zip(resu_params(model), frozen))


@pytest.mark.parametrize("count", ["same_count", "new_count"])
@pytest.mark.parametrize("optimizer", ["sgd", "sgd_dampening", "adam", "adamw_amsgrad"])
def test_state_reset_in_place_matches_a_fresh_state(optimizer, count):
    """reset_optimizer_state_ after a mask change writes zero moments and step 0 into the
    existing state objects (a new trainable count: new zero vectors inside them; SGD with
    dampening: drops the state, a zero buffer would not equal a fresh one); the next steps match
    an optimizer whose state was dropped, bit for bit, and frozen coordinates stay bit-identical."""
    make = {"sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
            "sgd_dampening": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.3),
            "adam": lambda p: torch.optim.Adam(p, lr=0.01),
            "adamw_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, amsgrad=True)}[optimizer]
    model = make_model("sparse")
    twin = copy.deepcopy(model)
    opt, twin_opt = make(model.parameters()), make(twin.parameters())
    x, y = torch.randn(6, 32), torch.randint(0, 8, (6,))
    for net, o in ((model, opt), (twin, twin_opt)):
        F.cross_entropy(net(x), y).backward()
        o.step()
        o.zero_grad()
    before = {p: dict(opt.state[p]) for p in resu_params(model)}
    for net in (model, twin):
        for w in resu_params(net):
            shuffle_mask_(w, torch.Generator().manual_seed(1), drop=5 if count == "new_count" else 0)
    rt.reset_optimizer_state_(opt, model)
    for w in resu_params(twin):
        del twin_opt.state[w]
    for w in resu_params(model):
        kept = optimizer != "sgd_dampening"
        assert all((opt.state[w].get(k) is v) == kept for k, v in before[w].items()), optimizer
        if kept:
            assert all(v.trainable_key == w.trainable_key for v in opt.state[w].values() if isinstance(v, rt.CompactTensor))
    frozen = [frozen_values(w).clone() for w in resu_params(model)]
    for _ in range(3):
        x, y = torch.randn(6, 32), torch.randint(0, 8, (6,))
        for net, o in ((model, opt), (twin, twin_opt)):
            F.cross_entropy(net(x), y).backward()
            o.step()
            o.zero_grad()
    assert_params_match(model, twin, exact=True)
    assert all(torch.equal(frozen_values(w), f) for w, f in zip(resu_params(model), frozen))


def shuffle_mask_(w: rt.ResuTensor, generator: torch.Generator, drop: int = 0) -> None:
    """Give the SPARSE weight ``w`` a random new mask of the same active count less ``drop``
    (values zero at its pruned coordinates)."""
    mask = w.storage_mask().view(-1)
    new = mask[torch.randperm(mask.numel(), generator=generator)]
    new[new.nonzero().view(-1)[:drop]] = False
    new = new.view(w.storage_shape)
    with torch.no_grad():
        w.set_state_(mode=rt.Mode.SPARSE, mask=encode_mask(new), trainable_side="active",
                     values=torch.where(new, w.values + 0.5, torch.zeros_like(w.values)))


def test_stale_state_in_a_compiled_graph_raises_as_in_eager():
    """A CompactTensor of an earlier trainable set (optimizer state that was not remapped) used
    in a compiled graph that ran with it while it was live: the guard on its key fails (it no
    longer follows the weight's cell), the retrace meets the same mismatch as eager, and the call
    raises eager's ValueError (as Dynamo raises an error of a traced op: inside its
    TorchRuntimeError, message and all)."""
    w = resu_params(make_model("sparse"))[0]
    n = w.trainable_count
    state, grad = w.compact(torch.randn(n)), w.compact(torch.randn(n))

    def momentum(grad, state):
        return state * 0.9 + grad

    compiled = torch.compile(momentum, backend=BACKEND, fullgraph=True)
    assert torch.equal(compiled(grad, state).flat, momentum(grad, state).flat)
    shuffle_mask_(w, torch.Generator().manual_seed(0))
    assert w.trainable_count == n and state.trainable_key != w.trainable_key
    grad = w.compact(torch.randn(n))
    with pytest.raises(ValueError, match="earlier trainable set") as eager_error:
        momentum(grad, state)
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError) as compiled_error:
        compiled(grad, state)
    assert str(eager_error.value) in str(compiled_error.value)


def test_compiled_step_with_stale_state_raises_as_in_eager():
    """A compiled optimizer.step whose state belongs to an earlier trainable set (the mask
    changed, the state was neither reset nor remapped) raises the eager step's ValueError: the
    pre-hook's stale-state check runs eagerly inside the compiled step."""
    model = make_model("sparse")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = torch.compile(opt.step, backend=BACKEND)
    for _ in range(2):
        F.cross_entropy(model(torch.randn(6, 32)), torch.randint(0, 8, (6,))).backward()
        step()
        opt.zero_grad()
    for w in resu_params(model):
        shuffle_mask_(w, torch.Generator().manual_seed(0))
    F.cross_entropy(model(torch.randn(6, 32)), torch.randint(0, 8, (6,))).backward()
    before = [w.dequantize().clone() for w in resu_params(model)]
    with pytest.raises(ValueError, match="was created for an earlier trainable set"):
        step()
    assert all(torch.equal(w.dequantize(), b) for w, b in zip(resu_params(model), before))


def test_inductor_training_step():
    """Inductor (~30-45 s on 2 cores with a cold cache), float32: RESU layer, fullgraph
    forward/backward and momentum-SGD step, against eager."""
    model = nn.Sequential(nn.Linear(32, 16))
    quantize_(model, rt.resu_config(sparsity=0.5))
    rt.enter_resu_(model, epsilon=0.2)
    eager = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eager_opt = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    frozen = frozen_values(model[0].weight)
    compiled_model = torch.compile(model, backend="inductor", fullgraph=True)
    compiled_step = torch.compile(opt.step, backend="inductor")
    for _ in range(2):
        x = torch.randn(8, 32)
        out = compiled_model(x)
        torch.testing.assert_close(out, eager(x))
        out.square().mean().backward()
        compiled_step()
        opt.zero_grad()
        eager(x).square().mean().backward()
        eager_opt.step()
        eager_opt.zero_grad()
    assert_params_match(model, eager, exact=False)
    assert torch.equal(frozen_values(model[0].weight), frozen)


# ---------------------------------------------------------------------------------------- item 2
# torchao's own checks for tensor subclasses (torchao.testing.utils), on three kinds of ResuTensor.
# Its test classes are instantiated for device "cpu" (and "cuda" where present) at import.
def _dense(hp):
    return rt.ResuTensor.from_dense(hp)


def _sparse(hp):
    return rt.ResuTensor.from_dense(hp, sparsity=0.02)  # few pruned: linear stays close to hp


def _qresu(hp):
    return rt.ResuTensor.from_dense(hp, sparsity=0.02).enter_resu(epsilon=0.0, quantize_bits=8, group_size=32)


class _ResuTensorChecks:
    TENSOR_SUBCLASS = rt.ResuTensor
    kwargs = {}

    def setUp(self):
        super().setUp()
        # TorchAOCompileTestCase calls torch.compile(f) with the default backend (Inductor).
        patcher = mock.patch.object(torch, "compile", functools.partial(torch.compile, backend=BACKEND))
        patcher.start()
        self.addCleanup(patcher.stop)

    def test_device1_to_device2_device1_cpu_device2_cpu(self):
        # torchao's version also calls .cuda() unconditionally, which a CPU-only torch refuses.
        w = self.FACTORY_FN(torch.randn(4, 128, dtype=torch.bfloat16))
        for moved in (w.to(device="cpu"), w.to("cpu"), w.cpu()):
            assert isinstance(moved, rt.ResuTensor)
            self.assertEqual(moved.dequantize(), w.dequantize())


class TestDenseTorchAOBasic(_ResuTensorChecks, ao_testing.TorchAOBasicTestCase):
    FACTORY_FN = staticmethod(_dense)
    LINEAR_MIN_SQNR = 60


class TestSparseTorchAOBasic(_ResuTensorChecks, ao_testing.TorchAOBasicTestCase):
    FACTORY_FN = staticmethod(_sparse)
    LINEAR_MIN_SQNR = 15


class TestQresuTorchAOBasic(_ResuTensorChecks, ao_testing.TorchAOBasicTestCase):
    FACTORY_FN = staticmethod(_qresu)
    LINEAR_MIN_SQNR = 15


class TestDenseTorchAOCompile(_ResuTensorChecks, ao_testing.TorchAOCompileTestCase):
    FACTORY_FN = staticmethod(_dense)
    LINEAR_MIN_SQNR = 60


class TestSparseTorchAOCompile(_ResuTensorChecks, ao_testing.TorchAOCompileTestCase):
    FACTORY_FN = staticmethod(_sparse)
    LINEAR_MIN_SQNR = 15


class TestQresuTorchAOCompile(_ResuTensorChecks, ao_testing.TorchAOCompileTestCase):
    FACTORY_FN = staticmethod(_qresu)
    LINEAR_MIN_SQNR = 15


def test_compiled_function_takes_and_returns_resu_tensors():
    """A compiled (fullgraph) function taking two ResuTensors and returning a transposed view and
    a linear output; transpose, .to(device), flatten/unflatten and dequantize round trips."""
    w = rt.ResuTensor.from_dense(torch.randn(8, 32), sparsity=0.5)
    q = rt.ResuTensor.from_dense(torch.randn(8, 32), sparsity=0.5).enter_resu(quantize_bits=4, group_size=16)

    def f(a, b, x):
        return a.t(), F.linear(x, b) + x @ a.t()

    x = torch.randn(4, 32)
    compiled = torch.compile(f, backend=BACKEND, fullgraph=True)
    (wt, y), (wt_ref, y_ref) = compiled(w, q, x), f(w, q, x)
    assert isinstance(wt, rt.ResuTensor) and wt.transposed and wt.shape == (32, 8)
    assert torch.equal(wt.dequantize(), wt_ref.dequantize())
    torch.testing.assert_close(y, y_ref)
    for t in (w, q, wt):
        names, attributes = t.__tensor_flatten__()
        inner = {n: getattr(t, n) for n in names}
        rebuilt = rt.ResuTensor.__tensor_unflatten__(inner, attributes, t.size(), t.stride())
        assert rebuilt.mode == t.mode and torch.equal(rebuilt.dequantize(), t.dequantize())
        moved = t.to(torch.device("cpu"))
        assert isinstance(moved, rt.ResuTensor) and torch.equal(moved.dequantize(), t.dequantize())


# ------------------------------------------------------------------------------ CUDA (pytest -m cuda)
TRITON_OPS = {  # what the compiled graphs must call on CUDA: the Triton custom ops, not dense + gather
    "dense": set(),
    "sparse": {"resu_tensor.gather_by_bitmap.default"},
    "resu": {"resu_tensor.gather_by_bitmap.default"},
    "qresu": {"resu_tensor.gather_by_bitmap.default", "resu_tensor.qresu_linear_small_m.default",
              "resu_tensor.qresu_grad_input_small_m.default"},
}


# What the compiled foreach AdamW step must call on CUDA: the weight's in-place updates as the
# one-pass Triton kernel (QRESU trains a compact θ: plain element-wise ops, nothing to select).
STEP_TRITON_OPS = {"dense": set(), "sparse": {"resu_tensor.update_by_bitmap_.default"},
                   "resu": {"resu_tensor.update_by_bitmap_.default"}, "qresu": set()}


def train_side_by_side(compiled, model, eager, step, opt, eager_opt, steps, frozen):
    """``steps`` CUDA training steps of ``compiled`` (weights in ``model``, stepped by ``step``)
    beside ``eager``: outputs and compact grads match each step, the weights match at the end and
    the frozen coordinates stay bit-identical."""
    for _ in range(steps):
        x = torch.randn(6, 32, device="cuda")
        out, expected = compiled(x), eager(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        out.square().sum().backward()
        expected.square().sum().backward()
        for w, v in zip(resu_params(model), resu_params(eager)):
            torch.testing.assert_close(w.grad.flat, v.grad.flat, rtol=1e-4, atol=1e-5)
        step()
        eager_opt.step()
        opt.zero_grad()
        eager_opt.zero_grad()
    assert_params_match(model, eager, exact=False)
    for w, before in zip(resu_params(model), frozen):
        assert torch.equal(frozen_values(w), before)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("fused", [False, True], ids=["foreach", "fused"])
@pytest.mark.parametrize("mode", sorted(TRITON_OPS))
def test_compiled_training_step_on_cuda_runs_the_triton_ops(mode, fused):
    """fullgraph model and compiled AdamW step on CUDA: three steps match eager, frozen
    coordinates stay bit-identical, and the graphs call the Triton custom ops (TRITON_OPS,
    STEP_TRITON_OPS). CUDA's default foreach step compiles to one graph; torch never traces a
    fused optimizer (``_fused_adam`` is ``torch.compiler.disable``d for every tensor type), so
    with fused=True its kernel runs eagerly inside the compiled step."""
    from torch._dynamo.testing import AotEagerAndRecordGraphs

    model = make_model(mode).cuda()
    eager = copy.deepcopy(model)
    frozen = [frozen_values(w) for w in resu_params(model)]
    opt, eager_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
                      for m in (model, eager))
    model_graphs, step_graphs = AotEagerAndRecordGraphs(), AotEagerAndRecordGraphs()
    compiled = torch.compile(model, backend=model_graphs, fullgraph=True)
    compiled_step = torch.compile(opt.step, backend=step_graphs)
    train_side_by_side(compiled, model, eager, compiled_step, opt, eager_opt, steps=3, frozen=frozen)

    def called(backend):
        # An op that mutates its inputs is traced as auto_functionalized(op, ...).
        return {str(node.args[0] if "auto_functionalized" in str(node.target) else node.target)
                for graph in backend.fw_graphs + backend.bw_graphs for node in graph.graph.nodes
                if node.op == "call_function"}

    assert TRITON_OPS[mode] <= called(model_graphs), sorted(c for c in called(model_graphs) if "resu_tensor" in c)
    if not fused:
        assert len(step_graphs.graphs) == 1
        assert STEP_TRITON_OPS[mode] <= called(step_graphs), sorted(called(step_graphs))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_cuda_graphs_training_and_decode_match_eager(mode):
    """``torch.compile(model, mode="reduce-overhead")`` with the optimizer eager, the usual way to
    take a small model's host overhead away: forward and backward replay as CUDA graphs (no graph
    skipped, graphs recorded), five steps match eager, frozen coordinates stay bit-identical, and a
    no-grad one-token forward (decode) replays as well."""
    from torch._dynamo.utils import counters
    from torch._inductor import cudagraph_trees

    model = make_model(mode).cuda()
    eager = copy.deepcopy(model)
    frozen = [frozen_values(w) for w in resu_params(model)]
    opt, eager_opt = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (model, eager))
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    counters.clear()
    train_side_by_side(compiled, model, eager, opt.step, opt, eager_opt, steps=5, frozen=frozen)
    with torch.no_grad():
        token = torch.randn(1, 32, device="cuda")
        for _ in range(3):
            torch.testing.assert_close(compiled(token), eager(token), rtol=1e-5, atol=1e-5)
    assert counters["inductor"]["cudagraph_skips"] == 0
    manager = cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False)
    assert manager is not None and len(list(manager.get_roots())) >= 2  # the training forward and decode's

"""The plain-PyTorch path on a CUDA device (run on the GPU machine: pytest -m cuda)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from masked_reference import MaskedDenseWeight

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])  # fused: the one-pass Adam kernels
@pytest.mark.parametrize("tokens", [(2, 33), (1,)], ids=["66_tokens", "decode"])  # QRESU: W_eff / fused kernels
@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "qresu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_and_adamw_on_cuda(mode, dtype, tokens, fused):
    w = rt.ResuTensor.from_dense(torch.randn(96, 200, device="cuda", dtype=dtype), sparsity=0.0 if mode == "dense" else 0.6)
    if mode == "resu":
        w.enter_resu()
    if mode == "qresu":
        w.enter_resu(quantize_bits=4, group_size=64)
        assert w.values is None and w.mask_kind == "bitmap"
    w = nn.Parameter(w)
    assert w.device.type == "cuda" and w.device_of_storage.type == "cuda"
    ref = MaskedDenseWeight(w.dequantize(), w.trainable_mask())
    opt, opt_ref = torch.optim.AdamW([w], lr=1e-2, fused=fused), torch.optim.AdamW([ref.flat], lr=1e-2, fused=fused)
    frozen = ~w.trainable_mask()
    frozen_before = w.dequantize()[frozen]
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    if fused:  # our one-pass Adam and torch's fused op differ in the last bits; ten steps carry that into y and dX
        tol["atol"] *= 2.5 if dtype == torch.bfloat16 else 10
    for _ in range(10):
        x = torch.randn(*tokens, 200, device="cuda", dtype=dtype, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = F.linear(x, w), F.linear(x_ref, ref.weight())
        torch.testing.assert_close(y, y_ref, **tol)
        g = torch.randn_like(y)
        opt.zero_grad(), opt_ref.zero_grad()
        y.backward(g), y_ref.backward(g)
        torch.testing.assert_close(w.grad.flat, ref.flat.grad, **tol)
        torch.testing.assert_close(x.grad, x_ref.grad, **tol)
        opt.step(), opt_ref.step()
    torch.testing.assert_close(w.dequantize(), ref.weight().detach(), **tol)
    assert torch.equal(w.dequantize()[frozen], frozen_before)


def test_model_moves_to_cuda_and_trains_under_autocast():
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    quantize_(model, rt.resu_config(sparsity=0.5))
    model.cuda()
    w = model[0].weight
    assert isinstance(w, rt.ResuTensor) and w.values.is_cuda and w.mask_bitmap.is_cuda
    rt.enter_resu_(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(32, 64, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    active_before = w.dequantize()[w.mask()]
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert w.grad.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.equal(w.dequantize()[w.mask()], active_before)
    rt.commit_(model, strategy="magnitude")
    assert w.mode == rt.Mode.SPARSE and abs(w.sparsity - 0.5) < 1e-3


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
@pytest.mark.parametrize("tokens", [(2, 33), (1,)], ids=["66_tokens", "decode"])
@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_training_step_never_waits_for_the_gpu(mode, tokens, fused):
    """A warmed-up step (forward, backward, AdamW) makes no synchronizing call (``.item()``, a
    device-to-host copy, a data-dependent size): one would stall the host on the GPU every step.
    ``set_sync_debug_mode("error")`` raises on such a call."""
    w = rt.ResuTensor.from_dense(torch.randn(96, 256, device="cuda", dtype=torch.bfloat16), sparsity=0.6)
    if mode != "sparse":
        w.enter_resu(**({"quantize_bits": 4, "group_size": 64} if mode == "qresu" else {}))
    w = nn.Parameter(w)
    opt = torch.optim.AdamW([w], lr=1e-3, fused=fused)
    x = torch.randn(*tokens, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        F.linear(x, w).square().sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        x.grad = None

    step(), step()  # state, autotuning and cached tables exist now
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def assert_same_parameters(model: nn.Module, reference: nn.Module) -> None:
    """Every parameter bit-identical to the reference's (a ResuTensor by its effective weight)."""
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        a, b = (t.dequantize() if isinstance(t, rt.ResuTensor) else t for t in (a, b))
        assert torch.equal(a, b)


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
@pytest.mark.parametrize("quantize_bits", [None, 4], ids=["resu", "qresu"])
def test_cuda_graph_step_follows_the_scheduler_through_its_cycles(quantize_bits, fused):
    """rt.CudaGraphStep under a ResuScheduler (DENSE → SPARSE → RESU/QRESU → commit, twice): each
    call is one step, bit-identical to the same run eager, and every lifecycle change (which gives
    weights and optimizer state new tensors) makes the next call record again instead of replaying
    a graph that would write into freed memory."""
    def model():
        torch.manual_seed(5)
        layers = nn.Sequential(nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 64, bias=False)).to("cuda", torch.bfloat16)
        quantize_(layers, rt.resu_config(sparsity=0.0))
        return layers

    config = rt.ScheduleConfig(steps_per_cycle=10, num_cycles=2, sparsity=0.5, quantize_bits=quantize_bits,
                               group_size=32, progress=False)
    x = torch.empty(16, 128, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in ("graphed", "eager"):
        m = model()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused, foreach=not fused, capturable=True)

        def step(m=m, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss = m(x).float().square().mean()
            loss.backward()
            opt.step()
            return loss.detach()

        runs.append((m, rt.ResuScheduler(m, opt, config), step))
    (graphed_model, graphed_scheduler, step), (eager_model, eager_scheduler, eager_step) = runs
    graphed = rt.CudaGraphStep(step, graphed_model, graphed_scheduler.optimizer)
    modes, generator = set(), torch.Generator(device="cuda").manual_seed(0)
    for _ in range(config.steps_per_cycle * config.num_cycles):
        x.copy_(torch.randn(x.shape, device="cuda", generator=generator))
        loss, eager_loss = graphed(), eager_step()
        assert torch.equal(loss, eager_loss)
        graphed_scheduler.step(loss), eager_scheduler.step(eager_loss)
        assert_same_parameters(graphed_model, eager_model)
        modes.add(graphed_model[0].weight.mode)
    assert {rt.Mode.DENSE, rt.Mode.SPARSE, rt.Mode.QRESU if quantize_bits else rt.Mode.RESU} <= modes
    # recorded once, then once after each change of the trainable sets: prune, enter RESU, commit per cycle
    assert 4 <= graphed.recordings <= 1 + 3 * config.num_cycles, graphed.recordings
    assert len(graphed_scheduler.history) == config.num_cycles


def test_cuda_graph_step_records_again_without_holding_more_memory():
    """Each recording (one per mode change of a schedule) gives back the memory of the one before:
    after the second, what the process holds stays what it was (a new warm-up stream per recording
    would leave a cuBLAS workspace behind each time)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 64)).cuda()
    quantize_(model, rt.resu_config(sparsity=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)
    x = torch.randn(32, 256, device="cuda")

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        optimizer.step()

    graphed = rt.CudaGraphStep(step, model, optimizer)
    held = []
    for _ in range(5):
        graphed._record()
        torch.cuda.synchronize()
        held.append(torch.cuda.memory_allocated())
    assert graphed.recordings == 5
    assert held[1:] == [held[1]] * 4, held


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused_adamw"])
@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_whole_training_step_replays_as_one_cuda_graph(mode, fused):
    """zero_grad, forward, backward and AdamW(capturable=True) recorded once with torch.cuda.graph
    (PyTorch's whole-network capture), then replayed on fresh inputs: bit-identical to the same
    steps run eagerly, frozen coordinates untouched. Three weights, so the optimizer's one-launch
    kernels read a device table of addresses copied from pinned memory, which every replay copies
    again: the eager steps between replays build tables of the same size, which would take that
    buffer over if it were recycled (torch ≥ 2.11's host allocator keeps buffers allocated under
    capture)."""
    def model():
        torch.manual_seed(3)
        layers = nn.Sequential(nn.Linear(256, 96, bias=False), nn.ReLU(), nn.Linear(96, 160), nn.ReLU(),
                               nn.Linear(160, 64, bias=False)).to("cuda", torch.bfloat16)
        quantize_(layers, rt.resu_config(sparsity=0.6))
        if mode != "sparse":
            rt.enter_resu_(layers, **({"quantize_bits": 4, "group_size": 32} if mode == "qresu" else {}))
        return layers

    graphed, eager = model(), model()
    weights = [w for _, _, w in rt.resu_weights(graphed)]
    frozen = [w.dequantize()[~w.trainable_mask()] for w in weights]
    x = torch.randn(24, 256, device="cuda", dtype=torch.bfloat16)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=fused, foreach=not fused, capturable=True)
                  for m in (graphed, eager)]

    def step(m, opt):
        opt.zero_grad(set_to_none=True)
        m(x).float().square().mean().backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: autotuning, optimizer state
        for _ in range(2):
            step(graphed, optimizers[0]), step(eager, optimizers[1])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step(graphed, optimizers[0])
    for _ in range(4):
        x.copy_(torch.randn_like(x))
        graph.replay()
        step(eager, optimizers[1])
        assert_same_parameters(graphed, eager)
    for w, before in zip(weights, frozen):
        assert torch.equal(w.dequantize()[~w.trainable_mask()], before)
    assert not torch.equal(weights[0].dequantize(), model()[0].weight.dequantize())  # the replays trained

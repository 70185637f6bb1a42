"""CPU training steps select trainable coordinates through the C loops, which walk the bitmap
itself, or, where those were not built, through positions the plain-PyTorch kernels decode once
per step (kernels.mask_ops.selected_positions). These tests check both paths against plain
PyTorch, across mask changes between steps, and that whatever they keep (positions, work
vectors) is released after each optimizer step."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor import kernels
from resu_tensor.kernels import mask_ops
from resu_asserts import bits

MODES = ["sparse", "resu"]


def _use_reference_kernels(monkeypatch) -> None:
    for op in kernels.OPS.values():
        if "cpu" in op.implementations:
            monkeypatch.delitem(op.implementations, "cpu")


@pytest.fixture(params=["c_loops", "reference"])
def cpu_kernels(request, monkeypatch) -> str:
    """Runs the test on the C loops (where built), then on the plain-PyTorch kernels."""
    if request.param == "c_loops" and not kernels.HAS_CPU_KERNELS:
        pytest.skip("the C loops were not built (no compiler)")
    if request.param == "reference":
        _use_reference_kernels(monkeypatch)
    return request.param


@pytest.fixture
def reference_kernels(monkeypatch) -> None:
    """The plain-PyTorch kernels only: the path that keeps positions per step."""
    _use_reference_kernels(monkeypatch)


def _layer(mode: str, seed: int = 0, sparsity: float = 0.7) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(48, 40)
    quantize_(layer, rt.resu_config(sparsity=sparsity))
    if mode == "resu":
        layer.weight.enter_resu()
    assert layer.weight.mask_kind == "bitmap"
    return layer


def _held_nbytes(weight: rt.ResuTensor) -> int:
    """Bytes of positions and work vectors held for ``weight``'s own bitmaps. Not the global
    mask_ops.holds_selections(): another live weight (a step that raised between backward and
    optimizer.step, kept alive by its traceback) rightly holds its own until its next step."""
    return mask_ops.held_selection_nbytes(weight.mask_bitmap) + mask_ops.held_selection_nbytes(weight.subset_bitmap)


def _bystander_holding_positions(cpu_kernels: str) -> nn.Linear:
    """A layer whose backward ran and whose optimizer step did not (as after a training step that
    raised in between): on the plain-PyTorch kernels it holds positions of its own bitmap while it
    lives (the C loops keep none)."""
    layer = _layer("sparse", seed=5)
    layer(torch.randn(4, 48)).sum().backward()
    assert (_held_nbytes(layer.weight) > 0) == (cpu_kernels == "reference")
    return layer


def _reference_step(weight_before: torch.Tensor, trainable: torch.Tensor, bias: torch.Tensor, x, y, state):
    """One AdamW step of plain PyTorch on the trainable coordinates of a dense weight: the gradient
    of the dense forward, read at those coordinates; ``state``: the flat parameter carried over."""
    dense = weight_before.clone().requires_grad_(True)
    F.mse_loss(F.linear(x, dense, bias), y).backward()
    positions = trainable.view(-1).nonzero().view(-1)
    if state.get("param") is None or state["param"].numel() != positions.numel():
        state["param"] = nn.Parameter(weight_before.view(-1)[positions].clone())
        state["optimizer"] = torch.optim.AdamW([state["param"]], lr=1e-2, weight_decay=0.1, foreach=False)
        adopted = state.get("adopt")  # the library optimizer's state, remapped to a new trainable set
        if adopted:
            state["optimizer"].state[state["param"]] = {
                name: value.flat.clone() if hasattr(value, "flat") else value.clone() for name, value in adopted.items()}
    with torch.no_grad():  # the weight as it is now, also where something outside the optimizer wrote it
        state["param"].copy_(weight_before.view(-1)[positions])
    state["param"].grad = dense.grad.view(-1)[positions].clone()
    state["optimizer"].step()
    expected = weight_before.clone()
    expected.view(-1)[positions] = state["param"].detach()
    return expected


def _step_against_reference(layer: nn.Linear, optimizer, bias: torch.Tensor, state: dict, generator):
    """One training step of ``layer`` on a fresh random batch next to ``_reference_step``:
    (weight before, weight after, trainable mask, the reference's weight after)."""
    x, y = torch.randn(16, 48, generator=generator), torch.randn(16, 40, generator=generator)
    before = layer.weight.dequantize()
    trainable = layer.weight.trainable_mask()
    expected = _reference_step(before, trainable, bias, x, y, state)
    optimizer.zero_grad(set_to_none=True)
    F.mse_loss(layer(x), y).backward()
    optimizer.step()
    return before, layer.weight.dequantize(), trainable, expected


@pytest.mark.parametrize("mode", MODES)
def test_steps_match_plain_adamw_across_mask_changes(mode, cpu_kernels):
    """Three steps, the mask rewritten in place (whole-state copy_) after the first: each step's
    weight equals plain AdamW on the trainable coordinates, frozen coordinates bit-identical."""
    layer = _layer(mode)
    bias = layer.bias.detach()
    layer.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([layer.weight], lr=1e-2, weight_decay=0.1, foreach=False)
    generator = torch.Generator().manual_seed(1)
    state = {}
    for step in range(3):
        if step == 1:
            other = _layer(mode, seed=5)
            bitmap = layer.weight.mask_bitmap
            with torch.no_grad():
                layer.weight.copy_(other.weight)
            assert layer.weight.mask_bitmap is bitmap  # written in place: only its version tells
            assert not torch.equal(layer.weight.mask(), _layer(mode).weight.mask())
            rt.reset_optimizer_state_(optimizer, layer)
            optimizer = torch.optim.AdamW([layer.weight], lr=1e-2, weight_decay=0.1, foreach=False)
            state = {}
        before, after, trainable, expected = _step_against_reference(layer, optimizer, bias, state, generator)
        assert torch.equal(after[~trainable], before[~trainable])
        assert not torch.equal(after[trainable], before[trainable])
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)


def _train(mode: str, cache: bool, monkeypatch) -> torch.Tensor:
    with monkeypatch.context() as patch:
        if not cache:
            patch.setattr(mask_ops, "_cacheable", lambda bitmap: False)
        layer = _layer(mode)
        optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
        generator = torch.Generator().manual_seed(2)
        for step in range(3):
            if step == 2:  # new mask, new bitmap tensors
                bitmap = layer.weight.mask_bitmap
                if mode == "sparse":
                    layer.weight.prune(0.8)
                else:
                    layer.weight.commit("magnitude")
                    layer.weight.enter_resu()
                assert layer.weight.mask_bitmap is not bitmap
                rt.reset_optimizer_state_(optimizer, layer)
            optimizer.zero_grad()
            x, y = torch.randn(8, 48, generator=generator), torch.randn(8, 40, generator=generator)
            F.mse_loss(layer(x), y).backward()
            optimizer.step()
        return layer.weight.dequantize()


@pytest.mark.parametrize("mode", MODES)
def test_kept_positions_give_the_bits_of_the_unkept_path(mode, monkeypatch, reference_kernels):
    """Training with positions kept per step is bit-identical to decoding the bitmap at every op."""
    assert torch.equal(_train(mode, True, monkeypatch), _train(mode, False, monkeypatch))


@pytest.mark.parametrize("invert", [False, True])
def test_positions_follow_an_in_place_bitmap_change(invert, cpu_kernels):
    """A bitmap written in place (same object, new version) is decoded again; the kernels read the
    new selection, as a boolean-mask reference does."""
    mask = torch.rand(300) < 0.4
    bitmap = kernels.pack_bitmap(mask)
    values = torch.randn(300)
    selected = ~mask if invert else mask
    assert torch.equal(kernels.gather_by_bitmap(values, bitmap, None, 1024, invert, int(selected.sum())),
                       values[selected])
    new_mask = torch.rand(300) < 0.6
    bitmap.copy_(kernels.pack_bitmap(new_mask))
    selected = ~new_mask if invert else new_mask
    assert torch.equal(mask_ops.selected_positions(bitmap, 300, invert), selected.nonzero().view(-1))
    compact = torch.randn(int(selected.sum()))
    out = values.clone()
    kernels.scatter_by_bitmap_(out, bitmap, None, 1024, invert, compact)
    expected = values.clone()
    expected[selected] = compact
    assert torch.equal(out, expected)
    with pytest.raises(ValueError, match="selects"):
        kernels.gather_by_bitmap(values, bitmap, None, 1024, invert, int(selected.sum()) + 1)


def test_positions_are_released_by_the_optimizer_step_and_counted_until_then(reference_kernels):
    """Between backward and the optimizer step the kept positions show in memory_report's mask
    bytes; after the step they are gone and the report equals the one before backward."""
    layer = _layer("sparse")
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(4, 48)
    layer(x).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    settled = rt.memory_report(layer, optimizer).total.mask
    layer(x).sum().backward()
    held = mask_ops.held_selection_nbytes(layer.weight.mask_bitmap)
    assert held == 8 * layer.weight.trainable_count  # int64 positions
    assert rt.memory_report(layer, optimizer).total.mask == settled + held
    optimizer.step()
    assert mask_ops.held_selection_nbytes(layer.weight.mask_bitmap) == 0
    assert rt.memory_report(layer, optimizer).total.mask == settled


UPDATES = [("mul_scalar", 0.999), ("mul_scalar", -1.7), ("mul", 1.0), ("add", 1.0), ("add", -0.3),
           ("addcdiv", -1e-3), ("addcdiv", 0.7), ("addcmul", 0.01), ("lerp", 0.1), ("copy", 1.0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("op,scalar", UPDATES)
def test_updates_at_positions_give_the_bits_of_gather_op_scatter(op, scalar, invert, dtype, reference_kernels):
    """Every update_by_bitmap_ op through kept positions (the read-modify-write forms included)
    equals the aten op on the gathered vector written back with a boolean mask, bit for bit;
    unselected elements keep their bits."""
    generator = torch.Generator().manual_seed(hash((op, scalar, invert)) % 1000)
    n = 3001  # not a multiple of 8: the bitmap's last byte is partly padding
    mask = torch.rand(n, generator=generator) < 0.35
    bitmap = kernels.pack_bitmap(mask)
    selected = ~mask if invert else mask
    count = int(selected.sum())
    values = (torch.randn(n, generator=generator) * 3).to(dtype)
    t1 = torch.randn(count, generator=generator).to(dtype)
    t2 = torch.rand(count, generator=generator).add_(1e-3).to(dtype)
    n_tensors = mask_ops.UPDATE_OPS[op][0]
    tensor1, tensor2 = (t1 if n_tensors >= 1 else None), (t2 if n_tensors == 2 else None)
    expected = values.clone()
    gathered = expected[selected]
    mask_ops.UPDATE_OPS[op][1](gathered, tensor1, tensor2, scalar)
    expected[selected] = gathered
    try:
        out = kernels.update_by_bitmap_(values.clone(), bitmap, None, 1024, invert, op, tensor1, tensor2, scalar)
        assert mask_ops.held_selection_nbytes(bitmap) > 0  # the positions form ran
    finally:
        mask_ops.release_selections(bitmap)
    assert torch.equal(bits(out)[~selected], bits(values)[~selected])
    assert torch.equal(bits(out), bits(expected))


def _between_steps(mode: str, step: int, layer: nn.Linear, optimizer) -> bool:
    """What changes the weight between two optimizer steps, by step: a write outside the
    optimizer (an in-place scale, nn.init), then a new mask through the model-level API (a
    prune_, or in RESU a commit_ and enter_resu_). Whether the mask changed (new optimizer state)."""
    with torch.no_grad():
        if step == 1:
            layer.weight.mul_(0.5)
        elif step == 2:
            nn.init.normal_(layer.weight, std=0.05)
    if step == 3:
        if mode == "sparse":
            rt.prune_(layer, 0.8, optimizer=optimizer)
        else:
            rt.commit_(layer, "magnitude", optimizer=optimizer)
            rt.enter_resu_(layer, optimizer=optimizer)
        return True
    return False


@pytest.mark.parametrize("bystander", [False, True], ids=["alone", "bystander"])
@pytest.mark.parametrize("mode", MODES)
def test_steps_match_plain_adamw_after_outside_writes_and_api_mask_changes(mode, bystander, cpu_kernels):
    """Steps interleaved with writes outside the optimizer (w.mul_ under no_grad, nn.init) and a
    mask change through rt.prune_ / rt.commit_ + rt.enter_resu_: every step equals plain AdamW on
    the trainable coordinates of the weight as it stood before the step (kept positions must
    never outlive either kind of change), frozen coordinates bit-identical. ``bystander``: another
    live layer holds positions of its own throughout (a step of it that never reached the
    optimizer); they are neither released nor counted by this layer's steps."""
    other = _bystander_holding_positions(cpu_kernels) if bystander else None
    held_by_other = _held_nbytes(other.weight) if bystander else 0
    layer = _layer(mode)
    bias = layer.bias.detach()
    layer.bias.requires_grad_(False)
    optimizer = torch.optim.AdamW([layer.weight], lr=1e-2, weight_decay=0.1, foreach=False)
    generator = torch.Generator().manual_seed(3)
    state = {}
    for step in range(5):
        before_change = layer.weight.dequantize()
        if _between_steps(mode, step, layer, optimizer):
            state = {"adopt": optimizer.state.get(layer.weight)}
            assert not torch.equal(layer.weight.dequantize() == 0, before_change == 0) or mode == "resu"
        elif step in (1, 2):
            assert not torch.equal(layer.weight.dequantize(), before_change)
        before, after, trainable, expected = _step_against_reference(layer, optimizer, bias, state, generator)
        assert torch.equal(bits(after)[~trainable], bits(before)[~trainable])
        torch.testing.assert_close(after, expected, rtol=1e-6, atol=1e-7)
        assert _held_nbytes(layer.weight) == 0
    if bystander:
        assert _held_nbytes(other.weight) == held_by_other


@pytest.mark.parametrize("invert", [False, True])
def test_updates_sharing_the_work_vector_give_the_bits_of_gather_op_scatter(invert, cpu_kernels):
    """The in-place updates at kept positions write their operand into one work vector per
    selection (selection_scratch): a sequence of them on one bitmap (weight decay, then Adam's
    addcdiv, then another decay, as optimizer steps run them), on two weights sharing that bitmap,
    and after an in-place change of the bitmap (a new selection size), each equals the aten op on
    the gathered vector, bit for bit; unselected elements keep their bits; the vector is counted in
    the held bytes and released with the positions."""
    generator = torch.Generator().manual_seed(7)
    n = 2051
    mask = torch.rand(n, generator=generator) < 0.4
    bitmap = kernels.pack_bitmap(mask)
    values = [torch.randn(n, generator=generator) * 2 for _ in range(2)]
    expected = [v.clone() for v in values]
    try:
        for change in range(2):
            if change:  # a new mask written into the same bitmap tensor: another selection size
                mask = torch.rand(n, generator=generator) < 0.25
                bitmap.copy_(kernels.pack_bitmap(mask))
            selected = ~mask if invert else mask
            count = int(selected.sum())
            for op, scalar in [("mul_scalar", 0.999), ("addcdiv", -1e-2), ("mul_scalar", 1.3), ("addcdiv", 0.5)]:
                for v, e in zip(values, expected):
                    before = v.clone()
                    t1 = torch.randn(count, generator=generator)
                    t2 = torch.rand(count, generator=generator).add_(0.1)
                    tensors = (t1, t2) if op == "addcdiv" else (None, None)
                    kernels.update_by_bitmap_(v, bitmap, None, 1024, invert, op, *tensors, scalar)
                    gathered = e[selected]
                    mask_ops.UPDATE_OPS[op][1](gathered, *tensors, scalar)
                    e[selected] = gathered
                    assert torch.equal(bits(v), bits(e))
                    assert torch.equal(bits(v)[~selected], bits(before)[~selected])
            # the float32 work vector, and on the plain-PyTorch kernels the int64 positions
            assert mask_ops.held_selection_nbytes(bitmap) == (4 if cpu_kernels == "c_loops" else 12) * count
    finally:
        mask_ops.release_selections(bitmap)
    assert mask_ops.held_selection_nbytes(bitmap) == 0


@pytest.mark.parametrize("mode", MODES)
def test_work_vector_is_released_by_the_optimizer_step(mode, cpu_kernels):
    """A training step whose optimizer writes through the work vector (AdamW with weight decay)
    leaves neither positions nor work vector held after the step, so memory_report after a step
    is what it was before it."""
    layer = _layer(mode)
    optimizer = torch.optim.AdamW([layer.weight], lr=1e-2, weight_decay=0.1, foreach=False)
    x = torch.randn(8, 48)
    layer(x).sum().backward()
    optimizer.step()
    settled = rt.memory_report(layer, optimizer).total.total
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        layer(x).sum().backward()
        with torch.no_grad():  # an in-place write outside the optimizer, through the same path
            layer.weight.mul_(0.999)
        # the plain-PyTorch kernels' int64 positions and float32 work vector of v·s (the C loops
        # keep neither; their work vector is for addcdiv)
        per_entry = 0 if cpu_kernels == "c_loops" else 12
        assert mask_ops.held_selection_nbytes(layer.weight.mask_bitmap) == per_entry * layer.weight.trainable_count
        optimizer.step()
        assert _held_nbytes(layer.weight) == 0
        assert rt.memory_report(layer, optimizer).total.total == settled

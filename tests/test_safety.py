"""Safety of model-level calls and weight assignment: a call changes every layer or none, refuses
a sparsity that empties a row or layer, refuses a model without ResuTensor weights; ``.data =``,
``vector_to_parameters`` and meta-device ``to_empty`` give correct ResuTensors or clear errors."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.core import transitions
from resu_tensor.core.state import check_state


def _model(last_sparsity: float = 0.5, sizes=((16, 32), (16, 16), (8, 16))) -> nn.Sequential:
    """Linear layers of (out, in) ``sizes``, all pruned to 0.5 but the last, pruned to ``last_sparsity``."""
    layers = [nn.Linear(i, o) for o, i in sizes]
    for layer in layers[:-1]:
        layer.weight = nn.Parameter(rt.ResuTensor.from_dense(torch.randn(layer.weight.shape), 0.5))
    last = layers[-1]
    last.weight = nn.Parameter(rt.ResuTensor.from_dense(torch.randn(last.weight.shape), last_sparsity))
    return nn.Sequential(*layers)


def _snapshot(model: nn.Module) -> dict:
    """Every ResuTensor field of every layer, tensors copied as raw bytes (bit-identity, -0.0 too)."""
    def frozen(value):
        return (value.dtype, tuple(value.shape), value.detach().clone().view(torch.uint8).reshape(-1)) \
            if isinstance(value, torch.Tensor) else value
    return {name: {k: frozen(v) for k, v in w.fields().items()} for name, _, w in rt.resu_weights(model)}


def _assert_unchanged(model: nn.Module, before: dict) -> None:
    after = _snapshot(model)
    assert after.keys() == before.keys()
    for name in before:
        for field, value in before[name].items():
            other = after[name][field]
            if isinstance(value, tuple) and len(value) == 3 and isinstance(value[2], torch.Tensor):
                assert value[:2] == other[:2] and torch.equal(value[2], other[2]), (name, field)
            else:
                assert value == other, (name, field)


# ---------------------------------------------------------------- 1. every layer or none
def test_enter_resu_with_only_the_last_layer_in_the_wrong_mode_changes_no_layer():
    model = _model(last_sparsity=0.0)  # the last layer is DENSE: enter_resu needs SPARSE
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"enter_resu_: layer '2'.*'dense'"):
        rt.enter_resu_(model, quantize_bits=4, group_size=8)
    _assert_unchanged(model, before)


def test_enter_resu_bad_options_are_refused_before_any_layer_changes():
    model = _model()
    before = _snapshot(model)
    with pytest.raises(TypeError, match=r"enter_resu_: layer '0'.*theta_dtype"):
        rt.enter_resu_(model, quantize_bits=4, theta_dtype=torch.int8)
    with pytest.raises(ValueError, match=r"enter_resu_: layer '0'.*group_size"):
        rt.enter_resu_(model, quantize_bits=4, group_size=3)
    with pytest.raises(TypeError, match="bogus"):
        rt.enter_resu_(model, bogus=True)
    _assert_unchanged(model, before)


def test_commit_with_only_the_last_layer_still_sparse_changes_no_layer():
    model = _model()
    rt.enter_resu_(model, filter_fn=lambda module, name: name != "2")
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"commit_: layer '2'.*'sparse'"):
        rt.commit_(model, strategy="magnitude")
    _assert_unchanged(model, before)


def test_commit_unknown_option_is_refused_before_any_layer_changes():
    model = _model()
    rt.enter_resu_(model)
    before = _snapshot(model)
    with pytest.raises(TypeError, match="bogus"):
        rt.commit_(model, strategy="amnesty", bogus=1)
    with pytest.raises(ValueError, match="cycle"):
        rt.commit_(model, strategy="amnesty", cycle=5, num_cycles=4)
    _assert_unchanged(model, before)


@pytest.mark.parametrize("quantize_bits", [None, 8])
def test_enter_resu_failing_in_the_last_layer_restores_the_earlier_ones(monkeypatch, quantize_bits):
    """An unforeseen failure after two layers have changed (θ already written into their values)."""
    model = _model()
    before = _snapshot(model)
    target = "scatter_trainable_" if quantize_bits is None else "quantize_active"
    module = transitions.kernels if quantize_bits is None else transitions
    real, calls = getattr(module, target), []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, target, fail_on_third)
    options = {} if quantize_bits is None else {"quantize_bits": quantize_bits, "group_size": 8}
    with pytest.raises(RuntimeError, match="injected"):
        rt.enter_resu_(model, epsilon=0.5, **options)
    assert len(calls) == 3
    _assert_unchanged(model, before)
    monkeypatch.undo()
    rt.enter_resu_(model, **options)  # and the model still works
    assert {w.mode for _, _, w in rt.resu_weights(model)} == {rt.Mode.RESU if quantize_bits is None else rt.Mode.QRESU}


def test_commit_failing_in_the_last_layer_restores_the_earlier_ones(monkeypatch):
    model = _model()
    rt.enter_resu_(model, quantize_bits=8, group_size=8, filter_fn=lambda module, name: name == "0")
    rt.enter_resu_(model, filter_fn=lambda module, name: name != "0")
    before = _snapshot(model)
    real, calls = transitions.commit_stats, []

    def fail_on_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(transitions, "commit_stats", fail_on_third)
    with pytest.raises(RuntimeError, match="injected"):
        rt.commit_(model, strategy="amnesty")
    _assert_unchanged(model, before)


# ---------------------------------------------------------------- 2. no empty row or layer
def test_row_prune_that_keeps_nothing_per_row_is_refused_naming_layer_and_largest_sparsity():
    model = _model()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '1'.*0\.97.*'row'.*0\.9375"):
        rt.prune_(model, 0.97, granularity="row")  # round(0.03 * 16) = 0 per row of 16 inputs
    _assert_unchanged(model, before)
    rt.prune_(model, 0.9375, granularity="row")
    for _, _, w in rt.resu_weights(model):
        assert (w.mask().sum(1) >= 1).all()


def test_element_prune_that_empties_a_layer_is_refused_and_changes_no_layer():
    model = _model(sizes=((16, 32), (2, 2)))
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"layer '1'.*0\.9\b.*0\.75"):
        rt.prune_(model, 0.9)  # round(0.9 * 4) = 4 of the 4 weights of layer '1'
    _assert_unchanged(model, before)
    with pytest.raises(ValueError, match="keeps no weight"):
        rt.ResuTensor.from_dense(torch.randn(2, 2), sparsity=0.9)
    with pytest.raises(ValueError, match="structured_column"):
        rt.prune_(model, 0.9, granularity="structured_column")  # round(0.9 * 2) = 2 of 2 columns
    with pytest.raises(ValueError, match="'0:4'"):
        rt.prune_(model, None, granularity="0:4")


def test_commit_reprune_that_empties_rows_or_the_layer_is_refused():
    model = _model()
    rt.prune_(model, 0.5, granularity="row")
    rt.enter_resu_(model)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"commit_: layer '0'.*0\.99.*0\.96875"):
        rt.commit_(model, strategy="magnitude", sparsity=0.99)
    _assert_unchanged(model, before)
    small = _model(sizes=((2, 2),))
    rt.enter_resu_(small)
    with pytest.raises(ValueError, match=r"commit_: layer '0'.*0\.75"):
        rt.commit_(small, strategy="amnesty", sparsity=0.9)
    rt.commit_(small, strategy="amnesty", sparsity=0.75)
    assert small[0].weight.mask().sum() == 1


# ---------------------------------------------------------------- 3. no ResuTensor
def _plain_model() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("call", ["prune_", "enter_resu_", "commit_", "calibrate", "reset_optimizer_state_",
                                  "ResuScheduler"])
def test_model_level_call_on_a_model_without_resu_weights_raises(call):
    model = _plain_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    calls = {
        "prune_": lambda m, f: rt.prune_(m, 0.5, filter_fn=f),
        "enter_resu_": lambda m, f: rt.enter_resu_(m, filter_fn=f),
        "commit_": lambda m, f: rt.commit_(m, filter_fn=f),
        "calibrate": lambda m, f: rt.calibrate(m, [torch.randn(2, 8)], filter_fn=f),
        "reset_optimizer_state_": lambda m, f: rt.reset_optimizer_state_(optimizer, m),
        "ResuScheduler": lambda m, f: rt.ResuScheduler(m, optimizer, rt.ScheduleConfig(
            steps_per_cycle=10, num_cycles=1, sparsity=0.5), filter_fn=f),
    }
    with pytest.raises(ValueError, match=r"no ResuTensor weight.*quantize_\(model, rt\.resu_config"):
        calls[call](model, None)
    quantize_(model, rt.resu_config(sparsity=0.5))
    if call == "reset_optimizer_state_":
        assert rt.reset_optimizer_state_(optimizer, model) == 0  # nothing stale is fine
        return
    with pytest.raises(ValueError, match=r"filter_fn matched none.*'0', '2'"):
        calls[call](model, lambda module, name: name == "nothing")


# ---------------------------------------------------------------- 4. .data = and vector_to_parameters
def test_data_assignment_reencodes_under_the_same_mask_per_mode():
    sparse = nn.Parameter(rt.ResuTensor.from_dense(torch.randn(8, 16), 0.5))
    mask = sparse.mask()
    new = torch.randn(8, 16) * mask
    sparse.data = new
    assert isinstance(sparse, rt.ResuTensor) and sparse.mode == rt.Mode.SPARSE
    assert torch.equal(sparse.dequantize(), new) and torch.equal(sparse.mask(), mask)

    before = sparse.values.clone()
    with pytest.raises(ValueError, match=r"`\.data =` on a SPARSE weight.*pruned"):
        sparse.data = torch.randn(8, 16)
    assert torch.equal(sparse.values, before)
    with pytest.raises(ValueError, match="shape"):
        sparse.data = torch.randn(16, 8)

    resu = rt.ResuTensor.from_dense(torch.randn(8, 16), 0.5).enter_resu()
    new = torch.randn(8, 16)
    resu.data = new
    assert resu.mode == rt.Mode.RESU and torch.equal(resu.dequantize(), new)  # pruned slots become θ

    qresu = rt.ResuTensor.from_dense(torch.randn(8, 16), 0.5).enter_resu(quantize_bits=8, group_size=8)
    new = torch.randn(8, 16)
    qresu.data = new
    check_state(qresu.fields(), "test")
    pruned = ~qresu.mask()
    assert torch.equal(qresu.dequantize()[pruned], new[pruned])  # θ exactly
    error = (qresu.dequantize() - new)[~pruned].abs().max()
    assert error <= (new.max() - new.min()) / 255  # the 8-bit codes of the new active values

    other = rt.ResuTensor.from_dense(torch.randn(8, 16), 0.25)
    resu.data = other  # a ResuTensor replaces the whole state, as copy_
    assert resu.mode == rt.Mode.SPARSE and torch.equal(resu.dequantize(), other.dequantize())


def test_data_assignment_on_compact_grad_and_state_shares_or_raises():
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_(model, rt.resu_config(sparsity=0.5))
    weight = model[0].weight
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 16)).pow(2).sum().backward()
    optimizer.step()
    grad, exp_avg, exp_avg_sq = weight.grad, optimizer.state[weight]["exp_avg"], optimizer.state[weight]["exp_avg_sq"]

    exp_avg.data = exp_avg_sq  # same trainable set: shares its values, as `.data =` shares storage
    assert exp_avg.flat is exp_avg_sq.flat and exp_avg.trainable_key == weight.trainable_key

    before = grad.flat.clone()
    with pytest.raises(TypeError, match=r"`\.data =` on a CompactTensor.*got Tensor.*gather_trainable"):
        grad.data = torch.randn(8, 16)
    with pytest.raises(ValueError, match=r"another layout: dtype torch\.float64"):
        grad.data = grad.with_flat(grad.flat.double())
    other = rt.ResuTensor.from_dense(torch.randn(8, 16), 0.25)
    with pytest.raises(ValueError, match="another layout: trainable_key"):
        grad.data = other.compact(torch.randn(other.trainable_count))
    assert torch.equal(grad.flat, before)  # refused assignments leave the values as they were

    dense = torch.randn(8, 16)
    grad.copy_(weight.compact(weight.gather_trainable(dense)))  # the dense route the error names
    assert torch.equal(weight.expand_trainable(grad), dense * weight.mask())


def test_vector_to_parameters_writes_resu_weights():
    model = nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 3))
    quantize_(model, rt.resu_config(sparsity=0.0))
    vector = torch.randn(sum(p.numel() for p in model.parameters()))
    torch.nn.utils.vector_to_parameters(vector, model.parameters())
    expected = iter(torch.split(vector, [p.numel() for p in model.parameters()]))
    for p in model.parameters():
        values = p.dequantize() if isinstance(p, rt.ResuTensor) else p.detach()
        assert torch.equal(values.reshape(-1), next(expected))
    assert torch.equal(torch.nn.utils.parameters_to_vector(
        [p.dequantize() if isinstance(p, rt.ResuTensor) else p for p in model.parameters()]), vector)


# ---------------------------------------------------------------- 5. meta device, to_empty
def test_meta_init_then_to_empty_gives_dense_resu_weights_that_initialise_and_train():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        quantize_(model, rt.resu_config(sparsity=0.0))
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for layer in (model[0], model[2]):
        assert isinstance(layer.weight, rt.ResuTensor) and layer.weight.device.type == "cpu"
        layer.reset_parameters()  # nn.init.kaiming_uniform_ → uniform_ on the weight
        check_state(layer.weight.fields(), "test")
        bound = 1 / layer.weight.shape[1] ** 0.5
        assert layer.weight.dequantize().abs().max() <= bound and layer.weight.dequantize().std() > bound / 4
    x = torch.randn(5, 16)
    reference = F.linear(F.relu(F.linear(x, model[0].weight.dequantize(), model[0].bias)),
                         model[2].weight.dequantize(), model[2].bias)
    torch.testing.assert_close(model(x), reference)
    rt.prune_(model, 0.5)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(x).sum().backward()
    optimizer.step()
    assert isinstance(optimizer.state[model[0].weight]["exp_avg"], rt.CompactTensor)  # state stays compact


def test_pruning_on_the_meta_device_is_refused_and_names_what_works():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(16, 8))
    with pytest.raises(ValueError, match=r"meta device and has no values.*sparsity=0\.0.*to_empty"):
        quantize_(model, rt.resu_config(sparsity=0.5))
    assert type(model[0].weight) is nn.Parameter and model[0].weight.is_meta  # the layer is left as it was
    quantize_(model, rt.resu_config(sparsity=0.0))
    with pytest.raises(ValueError, match=r"meta device and has no values"):
        rt.prune_(model, 0.5)
    assert model[0].weight.mode == rt.Mode.DENSE


def test_to_empty_of_a_pruned_weight_on_meta_is_refused_and_off_meta_keeps_the_state():
    model = nn.Sequential(nn.Linear(16, 8))
    quantize_(model, rt.resu_config(sparsity=0.5))
    reference = model[0].weight.dequantize()
    moved = torch.empty_like(model[0].weight, device="cpu")
    assert isinstance(moved, rt.ResuTensor) and moved.mode == rt.Mode.SPARSE
    assert torch.equal(moved.dequantize(), reference)
    assert isinstance(torch.empty_like(model[0].weight), rt.CompactTensor)  # optimizer state
    model.to("meta")
    with pytest.raises(ValueError, match=r"'sparse' ResuTensor on the meta device.*sparsity=0\.0"):
        model.to_empty(device="cpu")

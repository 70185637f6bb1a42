"""Existing training code runs unchanged on a model whose Linear weights are ResuTensors."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.checkpoint import checkpoint
from torchao.quantization import quantize_

import resu_tensor as rt
from masked_reference import MaskedDenseWeight


def make_model(sparsity=0.5, resu=False):
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5))
    quantize_(model, rt.resu_config(sparsity=sparsity))
    if resu:
        rt.enter_resu_(model, epsilon=0.2)
    return model


def loss_fn(model, x, y):
    return F.cross_entropy(model(x), y)


def batch(n=16):
    return torch.randn(n, 20), torch.randint(0, 5, (n,))


def test_autocast_bfloat16_on_cpu():
    model = make_model(resu=True)
    w = model[0].weight
    ref = MaskedDenseWeight(w.dequantize(), w.trainable_mask())
    x = torch.randn(6, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.linear(x, w, model[0].bias)
        y_ref = F.linear(x, ref.weight(), model[0].bias)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad.flat, ref.flat.grad)


@pytest.mark.parametrize("clip", ["norm", "value"])
def test_grad_clipping(clip):
    model = make_model(resu=True)
    w = model[0].weight
    ref = MaskedDenseWeight(w.dequantize(), w.trainable_mask())
    x, y = batch()
    F.cross_entropy(model(x), y).mul(50).backward()
    h = F.relu(F.linear(x, ref.weight(), model[0].bias))
    F.cross_entropy(F.linear(h, model[2].weight.dequantize(), model[2].bias), y).mul(50).backward()
    dense_grad = ref.dense_grad()
    if clip == "norm":
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters()]))
        returned = nn.utils.clip_grad_norm_(model.parameters(), max_norm=0.5)
        torch.testing.assert_close(returned, total)
        expected = dense_grad * (0.5 / (total + 1e-6))
    else:
        nn.utils.clip_grad_value_(model.parameters(), clip_value=0.01)
        expected = dense_grad.clamp(-0.01, 0.01)
    torch.testing.assert_close(w.expand_trainable(w.grad), expected)


def test_gradient_accumulation_and_zero_grad_modes():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [batch() for _ in range(3)]
    w = model[0].weight
    for set_to_none in (True, False):
        opt.zero_grad(set_to_none=set_to_none)
        for x, y in batches:
            loss_fn(model, x, y).backward()
        accumulated = w.grad.flat.clone()
        opt.zero_grad(set_to_none=set_to_none)
        if set_to_none:
            assert w.grad is None
        else:
            assert isinstance(w.grad, rt.CompactTensor) and w.grad.flat.abs().sum() == 0
        x = torch.cat([b[0] for b in batches])
        y = torch.cat([b[1] for b in batches])
        (loss_fn(model, x, y) * 3).backward()
        torch.testing.assert_close(w.grad.flat, accumulated)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_model_to_dtype(dtype):
    model = make_model(resu=True)
    w = model[0].weight
    before = w.dequantize()
    if dtype == torch.float64:
        with pytest.raises(TypeError, match="supports dtypes"):
            model.to(dtype)
        return
    model.to(dtype)
    assert model[0].weight is w and w.dtype == dtype and w.values.dtype == dtype
    assert w.mode == rt.Mode.RESU
    torch.testing.assert_close(w.dequantize(), before.to(dtype))
    out = model(torch.randn(3, 20, dtype=dtype))
    out.float().sum().backward()
    assert w.grad.dtype == dtype


def test_deepcopy_is_independent():
    model = make_model(resu=True)
    clone = copy.deepcopy(model)
    w, w2 = model[0].weight, clone[0].weight
    assert isinstance(w2, rt.ResuTensor) and w2 is not w and isinstance(w2, nn.Parameter)
    assert torch.equal(w2.dequantize(), w.dequantize()) and w2.mode == w.mode
    assert w2.values.data_ptr() != w.values.data_ptr()
    opt = torch.optim.SGD(clone.parameters(), lr=1.0)
    loss_fn(clone, *batch()).backward()
    opt.step()
    assert not torch.equal(w2.dequantize(), w.dequantize())


def test_eval_inference_mode():
    model = make_model(resu=True).eval()
    x = torch.randn(4, 20)
    with torch.inference_mode():
        y = model(x)
    assert not y.requires_grad
    h = F.relu(F.linear(x, model[0].weight.dequantize(), model[0].bias))
    torch.testing.assert_close(y, F.linear(h, model[2].weight.dequantize(), model[2].bias))


def test_save_and_load_weights_only_into_fresh_model():
    model = make_model(resu=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model, *batch()).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)

    fresh = make_model(sparsity=0.2)  # different mask and mode: the checkpoint must win
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.01)
    w_fresh = fresh[0].weight
    fresh.load_state_dict(checkpoint["model"])
    fresh_opt.load_state_dict(checkpoint["optim"])
    assert fresh[0].weight is w_fresh
    for a, b in zip(model.parameters(), fresh.parameters()):
        if isinstance(a, rt.ResuTensor):
            assert b.mode == a.mode and torch.equal(b.mask(), a.mask()) and b.trainable_key == a.trainable_key
            assert torch.equal(b.dequantize(), a.dequantize())
        else:
            assert torch.equal(a, b)
    # Training continues identically from the restored state.
    x, y = batch()
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        loss_fn(m, x, y).backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        da = a.dequantize() if isinstance(a, rt.ResuTensor) else a
        db = b.dequantize() if isinstance(b, rt.ResuTensor) else b
        assert torch.equal(da, db)


# ----------------------------------------------------------------------------------------------
# What training code does with weights and grads, per mode, against a plain dense reference: a
# copy of the layer holding W_eff in a plain nn.Parameter, its gradient masked to the trainable set.
MODES = ["sparse", "resu", "qresu"]


def resu_weight(mode, shape=(6, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = rt.ResuTensor.from_dense(torch.randn(shape, generator=g) * 0.5, sparsity=0.5)
    if mode == "resu":
        w.enter_resu(epsilon=0.2, generator=g)
    elif mode == "qresu":
        w.enter_resu(epsilon=0.2, generator=g, quantize_bits=4, group_size=4)
    return w


def resu_layer(mode, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(8, 6)
    layer.weight = nn.Parameter(resu_weight(mode, seed=seed))
    return layer


def dense_copy(layer):
    ref = nn.Linear(8, 6)
    ref.weight = nn.Parameter(layer.weight.dequantize())
    ref.bias = nn.Parameter(layer.bias.detach().clone())
    return ref


def train_step(model, lr=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    model.zero_grad()
    model(torch.randn(5, 8, generator=g)).pow(2).sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(p.grad, alpha=lr)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_buffers", [False, True])
@pytest.mark.parametrize("average", ["swa", "ema"])
def test_averaged_model_is_the_dense_average(mode, use_buffers, average):
    model = nn.Sequential(resu_layer(mode))
    kw = {"multi_avg_fn": get_ema_multi_avg_fn(0.9)} if average == "ema" else {}
    averaged = AveragedModel(model, use_buffers=use_buffers, **kw)
    w, a = model[0].weight, averaged.module[0].weight
    expected = None
    for step in range(4):
        train_step(model, seed=step)
        averaged.update_parameters(model)
        live = w.dequantize()
        if expected is None:
            expected = live
        elif average == "swa":
            expected = expected + (live - expected) / (step + 1)
        else:
            expected = expected.lerp(live, 0.1)
        assert isinstance(a, rt.ResuTensor) and a.mode == w.mode
        torch.testing.assert_close(a.dequantize(), expected)
    frozen = ~w.trainable_mask()
    assert torch.equal(a.dequantize()[frozen], w.dequantize()[frozen])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("form", ["lerp", "mul_add"])
def test_hand_written_ema_is_the_dense_ema(mode, form):
    layer = resu_layer(mode)
    w = layer.weight
    ema = copy.deepcopy(w)
    expected = w.dequantize()
    for step in range(3):
        train_step(layer, seed=step)
        with torch.no_grad():
            if form == "lerp":
                ema.lerp_(w, 1 - 0.9)
            else:
                ema.mul_(0.9).add_(w, alpha=1 - 0.9)
        expected = expected * 0.9 + w.dequantize() * (1 - 0.9)
        torch.testing.assert_close(ema.dequantize(), expected)
    frozen = ~w.trainable_mask()
    assert torch.equal(ema.dequantize()[frozen], w.dequantize()[frozen])


@pytest.mark.parametrize("mode", ["resu", "qresu"])
def test_averaged_copy_after_commit_raises_then_averages_every_coordinate_in_dense_mode(mode):
    model = nn.Sequential(resu_layer(mode))
    averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    averaged.update_parameters(model)
    train_step(model, lr=2.0)
    averaged.update_parameters(model)
    a = averaged.module[0].weight
    rt.commit_(model, strategy="magnitude")  # θ and W_A compete: the mask changes
    live = model[0].weight.dequantize()
    before = a.dequantize()
    assert not torch.equal(live[~a.trainable_mask()], before[~a.trainable_mask()])
    with pytest.raises(ValueError, match="frozen coordinates.*DENSE mode"):
        averaged.update_parameters(model)
    assert torch.equal(a.dequantize(), before)  # nothing moved
    with torch.no_grad():
        a.copy_(rt.ResuTensor.from_dense(a.dequantize()))
    assert a.mode == rt.Mode.DENSE
    for step in range(2):
        train_step(model, seed=step)
        averaged.update_parameters(model)
        before = before.lerp(model[0].weight.dequantize(), 0.1)
        torch.testing.assert_close(a.dequantize(), before)


@pytest.mark.parametrize("mode", MODES)
def test_copy_of_a_plain_tensor_writes_trainable_coordinates_if_frozen_agree(mode):
    w = resu_weight(mode)
    target = w.dequantize()
    trainable = w.trainable_mask()
    target[trainable] = torch.randn(int(trainable.sum()))
    with torch.no_grad():
        w.copy_(target)
    assert torch.equal(w.dequantize(), target)
    target[~trainable] += 1.0
    with pytest.raises(ValueError, match="differs from this .* weight at 24 of its 24 frozen"):
        with torch.no_grad():
            w.copy_(target)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("params", ["own", "dense", "other_resu"])
def test_functional_call_matches_dense_reference(mode, params):
    layer = resu_layer(mode)
    replacement = {"own": dict(layer.named_parameters()),
                   "dense": {"weight": nn.Parameter(torch.randn(6, 8)), "bias": nn.Parameter(torch.randn(6))},
                   "other_resu": {"weight": nn.Parameter(resu_weight(mode, seed=1)),
                                  "bias": nn.Parameter(torch.randn(6))}}[params]
    x = torch.randn(4, 8)
    out = torch.func.functional_call(layer, replacement, (x,))
    weight = replacement["weight"]
    dense_w = weight.dequantize() if isinstance(weight, rt.ResuTensor) else weight.detach()
    ref_w = dense_w.clone().requires_grad_()
    ref = F.linear(x, ref_w, replacement["bias"].detach())
    torch.testing.assert_close(out, ref)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), [weight])
    (ref_grad,) = torch.autograd.grad(ref.pow(2).sum(), [ref_w])
    if isinstance(weight, rt.ResuTensor):
        assert isinstance(grad, rt.CompactTensor)
        torch.testing.assert_close(grad.dequantize(), ref_grad * weight.trainable_mask())
    else:
        torch.testing.assert_close(grad, ref_grad)
        g = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).pow(2).sum())(replacement)
        torch.testing.assert_close(g["weight"], ref_grad)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_matches_plain_run(mode, use_reentrant):
    block = nn.Sequential(resu_layer(mode), nn.GELU())
    ref = nn.Sequential(dense_copy(block[0]), nn.GELU())
    x = torch.randn(5, 8, requires_grad=True)
    loss = checkpoint(block, x, use_reentrant=use_reentrant).pow(2).sum()
    loss.backward()
    ref_loss = ref(x).pow(2).sum()
    ref_loss.backward()
    w = block[0].weight
    torch.testing.assert_close(loss, ref_loss)
    assert isinstance(w.grad, rt.CompactTensor)
    torch.testing.assert_close(w.expand_trainable(w.grad), ref[0].weight.grad * w.trainable_mask())


class Symmetric(nn.Module):
    def forward(self, X):
        return 0.5 * (X + X.t()) * 1.5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("leave_parametrized", [True, False])
def test_parametrization_of_a_resu_weight(mode, leave_parametrized):
    layer = nn.Linear(8, 8)
    layer.weight = nn.Parameter(resu_weight(mode, shape=(8, 8)))
    w = layer.weight
    ref_w = w.dequantize().requires_grad_()
    parametrize.register_parametrization(layer, "weight", Symmetric())
    assert layer.parametrizations.weight.original is w
    torch.testing.assert_close(layer.weight, Symmetric()(ref_w).detach())
    x = torch.randn(3, 8)
    layer(x).pow(2).sum().backward()
    F.linear(x, Symmetric()(ref_w), layer.bias.detach()).pow(2).sum().backward()
    assert isinstance(w.grad, rt.CompactTensor)
    torch.testing.assert_close(w.expand_trainable(w.grad), ref_w.grad * w.trainable_mask())
    if leave_parametrized:
        expected = layer.weight.detach().clone()
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        # a ResuTensor cannot take a dense-symmetric value in place: the layer gets a plain parameter holding it
        assert type(layer.weight) is nn.Parameter and torch.equal(layer.weight.detach(), expected)
    else:
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
        assert layer.weight is w and torch.equal(w.dequantize(), ref_w.detach())


INITS = {
    "uniform_": lambda w: nn.init.uniform_(w, -0.1, 0.1),
    "normal_": lambda w: nn.init.normal_(w, 0.0, 0.1),
    # bounds wider than every frozen value: trunc_normal_ resamples out-of-range values, frozen ones
    # included, which copy_ then refuses (test_trunc_normal_with_frozen_values_outside_bounds_raises)
    "trunc_normal_": lambda w: nn.init.trunc_normal_(w, std=0.1, a=-3.0, b=3.0),
    "kaiming_uniform_": lambda w: nn.init.kaiming_uniform_(w, a=5 ** 0.5),
    "kaiming_normal_": nn.init.kaiming_normal_,
    "xavier_uniform_": nn.init.xavier_uniform_,
    "xavier_normal_": nn.init.xavier_normal_,
    "zeros_": nn.init.zeros_,
    "ones_": nn.init.ones_,
    "constant_": lambda w: nn.init.constant_(w, 0.3),
    "sparse_": lambda w: nn.init.sparse_(w, 0.5),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("init", sorted(INITS))
def test_nn_init_fills_trainable_coordinates_only(mode, init):
    w = nn.Parameter(resu_weight(mode, shape=(32, 48)))
    before = w.dequantize()
    trainable = w.trainable_mask()
    torch.manual_seed(1)
    with torch.no_grad():
        INITS[init](w)
    after = w.dequantize()
    assert torch.equal(after[~trainable], before[~trainable])
    torch.manual_seed(1)
    reference = INITS[init](torch.empty(32, 48))  # the same init on a plain tensor: the same fan and bounds
    values = after[trainable]
    if init in ("zeros_", "ones_", "constant_"):
        assert torch.equal(values, reference[trainable])
    else:
        assert not torch.equal(values, before[trainable])
        assert values.abs().max() <= reference.abs().max() * 1.5 + 1e-6 and values.std() > 0.2 * reference.std()


@pytest.mark.parametrize("init", ["orthogonal_", "eye_"])
def test_structure_defining_inits_raise(init):
    w = nn.Parameter(resu_weight("resu", shape=(8, 8)))
    before = w.dequantize()
    with pytest.raises((TypeError, ValueError), match="cannot write into a ResuTensor|frozen coordinates"):
        with torch.no_grad():
            getattr(nn.init, init)(w)
    assert torch.equal(w.dequantize(), before)


def test_trunc_normal_with_frozen_values_outside_bounds_raises():
    weight = resu_weight("resu", shape=(32, 48))
    w = nn.Parameter(weight)
    frozen = w.dequantize()[~w.trainable_mask()]
    bound = float(frozen.abs().max()) * 0.9
    with pytest.raises(ValueError, match="frozen coordinates"):
        with torch.no_grad():
            nn.init.trunc_normal_(w, std=0.1, a=-bound, b=bound)
    assert torch.equal(w.dequantize()[~w.trainable_mask()], frozen)


@pytest.mark.parametrize("mode", MODES)
def test_logging_reads_dense_weight_and_masked_grad(mode):
    layer = resu_layer(mode)
    ref = dense_copy(layer)
    x = torch.randn(5, 8)
    layer(x).pow(2).sum().backward()
    ref(x).pow(2).sum().backward()
    w, dense_w = layer.weight, ref.weight.detach()
    grad = ref.weight.grad * w.trainable_mask()
    torch.testing.assert_close(w.norm(), dense_w.norm())
    torch.testing.assert_close(w.grad.norm(), grad.norm())
    torch.testing.assert_close(torch.histc(w.grad, bins=10), torch.histc(grad, bins=10))
    torch.testing.assert_close(w.grad.float().mean(), grad.mean())
    assert np.array_equal(w.detach().cpu().numpy(), dense_w.numpy())
    np.testing.assert_allclose(w.grad.numpy(), grad.numpy(), rtol=1e-5, atol=1e-6)
    assert w.tolist() == dense_w.tolist() and np.allclose(w.grad.tolist(), grad.tolist(), atol=1e-6)
    vector = nn.utils.parameters_to_vector(layer.parameters())
    torch.testing.assert_close(vector, torch.cat([dense_w.reshape(-1), ref.bias.detach()]))


@pytest.mark.parametrize("mode", MODES)
def test_print_shows_dense_values_and_identity(mode):
    layer = resu_layer(mode)
    layer(torch.randn(2, 8)).sum().backward()
    w = layer.weight
    text = repr(w)
    assert text == str(w)
    assert text.startswith("ResuTensor(" + repr(w.dequantize()).split("\n")[0])
    mask = w.mask_kind
    side = w.trainable_side
    assert text.endswith(f", mode={mode}, sparsity=0.5000, mask={mask}, trainable={side})")
    grad_text = repr(w.grad)
    assert grad_text.startswith("CompactTensor(" + repr(w.grad.dequantize()).split("\n")[0])
    assert grad_text.endswith(f", trainable={w.trainable_count}, key={w.trainable_key:#x})")
    big = rt.ResuTensor.from_dense(torch.randn(500, 600), sparsity=0.5)
    assert "..." in repr(big) and len(repr(big)) < 2000
    assert "Linear(in_features=8, out_features=6" in str(nn.Sequential(layer))


def test_gradient_expands_after_the_tensor_the_parameter_was_made_from_is_freed():
    import gc

    source = rt.ResuTensor.from_dense(torch.randn(8, 16), sparsity=0.5)
    weight = nn.Parameter(source)
    F.linear(torch.randn(4, 16), weight).sum().backward()
    del source
    gc.collect()
    torch.testing.assert_close(weight.grad.dequantize(), weight.expand_trainable(weight.grad), rtol=0, atol=0)


def test_ema_of_a_conv_weight_equals_the_dense_average():
    live = rt.ResuTensor.from_dense(torch.randn(6, 3, 3, 3), sparsity=0.5)
    ema = copy.deepcopy(live)
    reference = live.dequantize()
    with torch.no_grad():
        live.values.add_(torch.randn_like(live.values) * live.storage_mask())  # the active weights train
        ema.lerp_(live, 0.25)
    torch.testing.assert_close(ema.dequantize(), reference.lerp(live.dequantize(), 0.25), rtol=0, atol=1e-6)
    assert torch.equal(ema.mask(), live.mask())

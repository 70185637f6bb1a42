"""Stock optimizers on ResuTensor parameters: trajectories equal the masked-dense reference
(a stock optimizer on the flat trainable vector) and frozen coordinates stay bit-identical."""
import pytest
import torch
import torch.nn.functional as F

import resu_tensor as rt
from masked_reference import MaskedDenseWeight

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.05),
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam_wd": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, foreach=False),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01),
    "adamw_no_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5, foreach=False),
    # On CPU the default is the per-parameter loop; these force the _foreach_* path (CUDA's default).
    "adamw_foreach": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5, foreach=True),
    "adam_wd_foreach": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, foreach=True),
    "sgd_nesterov_foreach": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01,
                                                      foreach=True),
    # fused: one kernel pass per bitmap-masked weight (kernels.foreach_adam_by_bitmap_), torch's fused op elsewhere
    "adamw_fused": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.5, fused=True),
    "adam_fused_wd_maximize": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, maximize=True, fused=True),
    "adamw_fused_amsgrad": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, amsgrad=True, fused=True),
    "adamw_fused_tensor_lr": lambda p: torch.optim.AdamW(p, lr=torch.tensor(0.01), weight_decay=0.1, fused=True),
}


def make_pair(mode):
    w = rt.ResuTensor.from_dense(torch.randn(16, 48), sparsity=0.0 if mode == "dense" else 0.7)
    if mode.startswith("resu"):
        w.enter_resu(epsilon=0.3, freeze_active=(mode == "resu"))
    w = torch.nn.Parameter(w)
    return w, MaskedDenseWeight(w.dequantize(), w.trainable_mask())


@pytest.mark.parametrize("mode", ["dense", "sparse", "resu", "resu_unfrozen"])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_twenty_steps_match_reference(mode, name):
    w, ref = make_pair(mode)
    bias = torch.nn.Parameter(torch.randn(16))
    bias_ref = torch.nn.Parameter(bias.detach().clone())
    opt = OPTIMIZERS[name]([w, bias])
    opt_ref = OPTIMIZERS[name]([ref.flat, bias_ref])
    frozen = ~w.trainable_mask()
    frozen_before = w.dequantize()[frozen]
    for _ in range(20):
        x, target = torch.randn(8, 48), torch.randn(8, 16)
        for model_w, b, o in ((w, bias, opt), (ref.weight(), bias_ref, opt_ref)):
            o.zero_grad()
            F.mse_loss(F.linear(x, model_w, b), target).backward()
        opt.step()
        opt_ref.step()
    torch.testing.assert_close(w.dequantize(), ref.weight().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias, bias_ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(w.dequantize()[frozen], frozen_before)  # bit-identical, weight decay included
    assert w.dequantize()[~frozen].ne(ref.frozen[~frozen]).any()  # the trainable ones did move


@pytest.mark.parametrize("name", ["adamw", "sgd_momentum_wd"])
def test_optimizer_state_is_compact(name):
    w, _ = make_pair("sparse")
    opt = OPTIMIZERS[name]([w])
    F.linear(torch.randn(4, 48), w).sum().backward()
    opt.step()
    tensors = [v for v in opt.state[w].values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    assert tensors and all(isinstance(v, rt.CompactTensor) for v in tensors)
    assert all(v.flat.numel() == w.trainable_count < w.numel() for v in tensors)


def test_stale_state_raises_at_step_and_reset_fixes_it():
    w, _ = make_pair("sparse")
    model = torch.nn.Linear(48, 16, bias=False)
    model.weight = w
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    x = torch.randn(4, 48)
    model(x).sum().backward()
    opt.step()
    rt.enter_resu_(model)
    model(x).sum().backward()
    before = w.dequantize()
    with pytest.raises(ValueError, match="earlier trainable set"):
        opt.step()
    assert torch.equal(w.dequantize(), before)  # refused before anything moved
    assert rt.reset_optimizer_state_(opt, model) == 1
    opt.step()
    assert opt.state[w]["exp_avg"].flat.numel() == w.trainable_count


def test_foreach_adamw_updates_all_parameters_in_one_foreach_op_each():
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpLog(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    weights = [make_pair("resu")[0], make_pair("sparse")[0]]
    bias = torch.nn.Parameter(torch.randn(16))
    from torch.optim.optimizer import _foreach_supported_types

    assert all(type(w) in _foreach_supported_types for w in weights)  # so foreach is the default on CUDA
    opt = torch.optim.AdamW([*weights, bias], lr=0.01, weight_decay=0.1, foreach=True)
    x = torch.randn(4, 48)
    sum(F.linear(x, w, bias).square().sum() for w in weights).backward()
    with OpLog() as log:
        opt.step()
    assert log.names.count("aten._foreach_addcdiv_.ScalarList") == 1
    assert not [n for n in log.names if n.startswith(("aten.addcdiv", "aten.mul_", "aten.lerp"))]


def test_clip_grad_norm_foreach_equals_the_dense_gradient_norm():
    w, _ = make_pair("resu")
    F.linear(torch.randn(4, 48), w).square().sum().backward()
    dense_grad = w.expand_trainable(w.grad)
    total = torch.nn.utils.clip_grad_norm_([w], max_norm=0.5, foreach=True)
    torch.testing.assert_close(total, dense_grad.norm())
    torch.testing.assert_close(w.expand_trainable(w.grad), dense_grad * (0.5 / (dense_grad.norm() + 1e-6)))


ONE_PASS = {  # name → (optimizer, kernels.update_by_bitmap_ calls per step per bitmap weight, its gathers)
    "adamw_foreach": (OPTIMIZERS["adamw_foreach"], 2, 0),  # _foreach_mul_ (decay), _foreach_addcdiv_
    "sgd_momentum_wd": (OPTIMIZERS["sgd_momentum_wd"], 1, 1),  # add_; the decay term grad + wd·w reads w
    "sgd_momentum_wd_foreach": (lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1, foreach=True),
                                1, 1),
}


def _cpu_key(implementations: dict) -> str:
    """The key of a kernel op's implementation that runs for CPU tensors (the C loops' where built)."""
    return "cpu" if "cpu" in implementations else "reference"


@pytest.mark.parametrize("mode", ["sparse", "resu"])
@pytest.mark.parametrize("name", list(ONE_PASS))
def test_in_place_updates_of_bitmap_weights_take_one_kernel_pass(mode, name, monkeypatch):
    """The optimizer's in-place ops on a bitmap-selected weight run as kernels.update_by_bitmap_
    (foreach ops: foreach_update_by_bitmap_), with no gather and scatter around them, next to a
    DENSE weight and a plain bias that keep the generic path, with results bit-identical to that
    path (gather → op → scatter) on CPU."""
    import collections
    import copy

    from resu_tensor import kernels
    from resu_tensor.ops import trainable

    make_optimizer, updates_per_step, gathers_per_step = ONE_PASS[name]
    weight, _ = make_pair(mode)
    assert weight.trainable_bitmap() is not None
    dense = torch.nn.Parameter(rt.ResuTensor.from_dense(torch.randn(16, 48)))  # all train: no bitmap
    start = [weight, dense, torch.nn.Parameter(torch.randn(16))]
    batches = [(torch.randn(8, 48), torch.randn(8, 16)) for _ in range(3)]

    def train(one_pass):
        calls = collections.Counter()

        def counted(name, fn):
            def call(*args):
                calls[name] += 1
                return fn(*args)
            return call

        with monkeypatch.context() as patch:
            for op in ("update_by_bitmap_", "foreach_update_by_bitmap_", "gather_by_bitmap", "scatter_by_bitmap_"):
                implementations = kernels.OPS[op].implementations
                key = _cpu_key(implementations)
                patch.setitem(implementations, key, counted(op, implementations[key]))
            if not one_pass:
                patch.setattr(trainable, "BITMAP_UPDATES", {})
            w, dense, bias = params = copy.deepcopy(start)
            opt = make_optimizer(params)
            for x, target in batches:
                opt.zero_grad()
                F.mse_loss(F.linear(x, w, bias) + F.linear(x, dense), target).backward()
                calls.clear()  # count the last step only (the first also creates the state)
                opt.step()
        return params, opt, calls

    params, opt, calls = train(one_pass=True)
    launches = ("gather_by_bitmap", "scatter_by_bitmap_")
    one_pass = "foreach_update_by_bitmap_" if "foreach" in name else "update_by_bitmap_"
    assert [calls[op] for op in (one_pass, *launches)] == [updates_per_step, gathers_per_step, 0]
    old_params, old_opt, old_calls = train(one_pass=False)
    assert [old_calls[op] for op in (one_pass, *launches)] == [0, gathers_per_step + updates_per_step,
                                                              updates_per_step]
    for p, q in zip(params, old_params):
        assert torch.equal(_dense(p), _dense(q))
        for key, value in opt.state[p].items():
            assert torch.equal(_dense(value), _dense(old_opt.state[q][key])), key


def test_foreach_ops_update_every_bitmap_weight_in_one_kernel_call(monkeypatch):
    """Default (foreach) AdamW on three bitmap-selected weights: each in-place foreach op on the
    weights is one foreach_update_by_bitmap_ call holding all three, not a call per weight."""
    from resu_tensor import kernels

    weights = [make_pair(mode)[0] for mode in ("resu", "sparse", "resu")]
    opt = torch.optim.AdamW(weights, lr=0.01, weight_decay=0.1, foreach=True)
    calls = []
    foreach = kernels.OPS["foreach_update_by_bitmap_"].implementations
    runs = foreach[_cpu_key(foreach)]

    def counted(values, *args):
        calls.append(len(values))
        return runs(values, *args)

    monkeypatch.setitem(foreach, _cpu_key(foreach), counted)
    single = kernels.OPS["update_by_bitmap_"].implementations
    monkeypatch.setitem(single, _cpu_key(single), None)  # a per-weight call would fail
    before = [w.dequantize() for w in weights]
    sum(F.linear(torch.randn(4, 48), w).square().sum() for w in weights).backward()
    opt.step()
    assert calls == [3, 3]  # the decay's _foreach_mul_ and the step's _foreach_addcdiv_
    for w, old in zip(weights, before):
        frozen = ~w.trainable_mask()
        assert torch.equal(w.dequantize()[frozen], old[frozen]) and not torch.equal(w.dequantize(), old)


def _dense(t):
    return t.dequantize() if isinstance(t, rt.ResuTensor) else t.flat if isinstance(t, rt.CompactTensor) else t.detach()


IN_PLACE = {  # name → (the op on weight w with compact operands a, b; kernels.(foreach_)update_by_bitmap_ calls)
    "mul_scalar": (lambda w, a, b: w.mul_(0.9), 1),
    "mul": (lambda w, a, b: w.mul_(a), 1),
    "add_alpha": (lambda w, a, b: w.add_(a, alpha=-0.3), 1),
    "addcmul": (lambda w, a, b: w.addcmul_(a, b, value=0.2), 1),
    "addcdiv": (lambda w, a, b: w.addcdiv_(a, b, value=-0.1), 1),
    "lerp": (lambda w, a, b: w.lerp_(a, 0.3), 1),
    "lerp_far_end": (lambda w, a, b: w.lerp_(a, 0.8), 1),
    "foreach_mul_scalar": (lambda w, a, b: torch._foreach_mul_([w], 0.9), 1),
    "foreach_mul_scalar_list": (lambda w, a, b: torch._foreach_mul_([w], [0.9]), 1),
    "foreach_mul_list": (lambda w, a, b: torch._foreach_mul_([w], [a]), 1),
    "foreach_add_alpha": (lambda w, a, b: torch._foreach_add_([w], [a], alpha=0.5), 1),
    "foreach_addcmul": (lambda w, a, b: torch._foreach_addcmul_([w], [a], [b], 0.3), 1),
    "foreach_addcmul_scalar_list": (lambda w, a, b: torch._foreach_addcmul_([w], [a], [b], [0.3]), 1),
    "foreach_addcdiv": (lambda w, a, b: torch._foreach_addcdiv_([w], [a], [b], -0.2), 1),
    "foreach_addcdiv_scalar_list": (lambda w, a, b: torch._foreach_addcdiv_([w], [a], [b], [-0.2]), 1),
    "foreach_lerp": (lambda w, a, b: torch._foreach_lerp_([w], [a], 0.3), 1),
    "foreach_lerp_scalar_list": (lambda w, a, b: torch._foreach_lerp_([w], [a], [0.7]), 1),
    "foreach_copy": (lambda w, a, b: torch._foreach_copy_([w], [a]), 1),
    # tensor scalars keep gather → op → scatter
    "mul_tensor_scalar": (lambda w, a, b: w.mul_(torch.tensor(0.9)), 0),
    "foreach_addcdiv_tensor_scalars": (lambda w, a, b: torch._foreach_addcdiv_([w], [a], [b], torch.tensor([0.1])), 0),
}


@pytest.mark.parametrize("name", list(IN_PLACE))
def test_each_in_place_form_equals_gather_op_scatter(name, monkeypatch):
    import copy

    from resu_tensor import kernels
    from resu_tensor.ops import trainable

    op, expected_calls = IN_PLACE[name]
    weight, _ = make_pair("resu")
    a = weight.compact(torch.randn(weight.trainable_count))
    b = weight.compact(torch.rand(weight.trainable_count) + 0.5)
    calls = []
    kernel = "foreach_update_by_bitmap_" if name.startswith("foreach") else "update_by_bitmap_"
    implementations = kernels.OPS[kernel].implementations
    key = _cpu_key(implementations)
    runs = implementations[key]

    def counted(*args):
        calls.append(args)
        return runs(*args)

    monkeypatch.setitem(implementations, key, counted)
    frozen = ~weight.trainable_mask()
    ours, theirs = copy.deepcopy(weight).detach(), copy.deepcopy(weight).detach()
    with torch.no_grad():
        op(ours, a, b)
        assert len(calls) == expected_calls
        monkeypatch.setattr(trainable, "BITMAP_UPDATES", {})
        op(theirs, a, b)
    assert len(calls) == expected_calls
    assert torch.equal(ours.dequantize(), theirs.dequantize())
    assert torch.equal(ours.dequantize()[frozen], weight.dequantize()[frozen])
    assert not torch.equal(ours.dequantize(), weight.dequantize())


def test_detached_compact_grad_shares_its_values():
    """Autograd detaches each gradient it accumulates: the eager fast path must keep the trainable
    set, the shape and the very same values (an alias, not a copy)."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 6, bias=False)
    from torchao.quantization import quantize_

    quantize_(layer, rt.resu_config(sparsity=0.5))
    F.linear(torch.randn(3, 12), layer.weight).sum().backward()
    grad = layer.weight.grad
    detached = grad.detach()
    assert type(detached) is type(grad) and detached is not grad
    assert detached.trainable_key == grad.trainable_key and detached.shape == grad.shape
    assert detached.flat.data_ptr() == grad.flat.data_ptr() and not detached.requires_grad
    grad.flat.add_(1.0)
    assert torch.equal(detached.flat, grad.flat)


def test_foreach_state_ops_refuse_state_of_another_trainable_set():
    """A _foreach_ op over optimizer state alone (no weight in the call) still checks that every
    list position holds one trainable set, and changes nothing when one does not."""
    w, _ = make_pair("sparse")
    grads = [w.compact(torch.randn(w.trainable_count)) for _ in range(2)]
    moments = [w.compact(torch.zeros(w.trainable_count)) for _ in range(2)]
    wrong = rt.ResuTensor.from_dense(torch.randn(16, 48), sparsity=0.25)
    stale = wrong.compact(torch.zeros(wrong.trainable_count))
    with pytest.raises(ValueError, match="does not match this weight's trainable coordinates"):
        torch._foreach_lerp_([moments[0], stale], grads, 0.1)
    assert not moments[0].flat.any() and not stale.flat.any()
    torch._foreach_lerp_(moments, grads, 0.1)  # one set per position: fine
    assert torch.equal(moments[1].flat, grads[1].flat * 0.1)


def test_fused_adamw_op_refuses_state_of_another_trainable_set():
    """Below the optimizer's pre-step check: torch._fused_adamw_ itself refuses moments that belong
    to another trainable set of the weight, and moves nothing."""
    w, _ = make_pair("sparse")
    grad = w.compact(torch.randn(w.trainable_count))
    moments = [w.compact(torch.zeros(w.trainable_count)) for _ in range(2)]
    wrong = rt.ResuTensor.from_dense(torch.randn(16, 48), sparsity=0.25)
    stale = wrong.compact(torch.zeros(wrong.trainable_count))
    before = w.dequantize()
    for exp_avg, exp_avg_sq in [(stale, moments[1]), (moments[0], stale)]:
        with pytest.raises(ValueError, match="does not match this weight's trainable coordinates"):
            torch._fused_adamw_([w], [grad], [exp_avg], [exp_avg_sq], [], [torch.tensor(1.0)], lr=0.01, beta1=0.9,
                                beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
    assert torch.equal(w.dequantize(), before)

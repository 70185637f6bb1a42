"""Every ``torch.optim`` optimizer, on each of its implementation paths and main options, plus a
custom Lion written with plain tensor ops, trains only a ResuTensor's trainable coordinates.

The reference is the same optimizer on a plain 1-D Parameter holding ``w.trainable_values()``
whose gradient is the dense gradient at those coordinates (an optimizer on the trainable
coordinates alone: weight decay and momentum never reach frozen ones). Two optimizers see the
whole matrix, so their reference is a plain matrix Parameter whose gradient is zero at frozen
coordinates, reset there after each step: Adafactor factors the second moment over rows and
columns, and LBFGS flattens every gradient with ``view(-1)`` (both see the CompactTensor
gradient's dense expansion, zero at frozen coordinates).

A QRESU θ stored in another dtype than the weight's: the optimizer computes in the weight's dtype
(its gradient and state have it) and each write into θ rounds to θ's dtype. The reference rounds
once per step, so the two may differ by the rounding of the intermediate writes (a few ulps of
θ's dtype); with θ in the weight's dtype the comparison is tight.
"""
import pytest
import torch
import torch.nn.functional as F
from torch.optim import Optimizer

import resu_tensor as rt


class Lion(Optimizer):
    """Lion (Chen et al., 2023) written with plain in-place tensor ops, as user code would."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                exp_avg = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                update = exp_avg.clone().lerp_(p.grad, 1 - beta1).sign_()
                p.add_(update, alpha=-group["lr"])
                exp_avg.mul_(beta2).add_(p.grad, alpha=1 - beta2)


# name → (optimizer class, options, implementation paths). Paths: "for_loop" (foreach=False),
# "foreach" (foreach=True), "fused" (fused=True, where torch has a CPU kernel), "default" (the
# optimizer has no such switch).
TABLE = {
    "Adadelta": (torch.optim.Adadelta, dict(lr=0.5), ("for_loop", "foreach")),
    "Adadelta_wd_maximize": (torch.optim.Adadelta, dict(lr=0.5, weight_decay=0.1, maximize=True),
                             ("for_loop", "foreach")),
    "Adafactor": (torch.optim.Adafactor, dict(lr=0.05), ("for_loop", "foreach")),
    "Adafactor_wd_maximize": (torch.optim.Adafactor, dict(lr=0.05, weight_decay=0.1, maximize=True),
                              ("for_loop", "foreach")),
    "Adagrad": (torch.optim.Adagrad, dict(lr=0.05), ("for_loop", "foreach", "fused")),
    "Adagrad_wd_decay_maximize": (torch.optim.Adagrad, dict(lr=0.05, weight_decay=0.1, lr_decay=0.01,
                                                              initial_accumulator_value=0.1, maximize=True),
                                  ("for_loop", "foreach", "fused")),
    "Adam": (torch.optim.Adam, dict(lr=0.01), ("for_loop", "foreach", "fused")),
    "Adam_amsgrad_wd": (torch.optim.Adam, dict(lr=0.01, amsgrad=True, weight_decay=0.1), ("for_loop", "foreach", "fused")),
    "Adam_maximize_decoupled": (torch.optim.Adam, dict(lr=0.01, maximize=True, weight_decay=0.1,
                                                       decoupled_weight_decay=True), ("for_loop", "foreach", "fused")),
    "Adamax": (torch.optim.Adamax, dict(lr=0.02), ("for_loop", "foreach")),
    "Adamax_wd_maximize": (torch.optim.Adamax, dict(lr=0.02, weight_decay=0.1, maximize=True), ("for_loop", "foreach")),
    "AdamW": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.5), ("for_loop", "foreach", "fused")),
    "AdamW_amsgrad_maximize": (torch.optim.AdamW, dict(lr=0.01, weight_decay=0.5, amsgrad=True, maximize=True),
                               ("for_loop", "foreach", "fused")),
    "ASGD": (torch.optim.ASGD, dict(lr=0.05, t0=1), ("for_loop", "foreach")),
    "ASGD_wd_maximize": (torch.optim.ASGD, dict(lr=0.05, t0=1, weight_decay=0.1, maximize=True),
                         ("for_loop", "foreach")),
    "NAdam": (torch.optim.NAdam, dict(lr=0.02), ("for_loop", "foreach")),
    "NAdam_decoupled_maximize": (torch.optim.NAdam, dict(lr=0.02, weight_decay=0.1, decoupled_weight_decay=True,
                                                         maximize=True), ("for_loop", "foreach")),
    "RAdam": (torch.optim.RAdam, dict(lr=0.02), ("for_loop", "foreach")),
    "RAdam_wd_maximize": (torch.optim.RAdam, dict(lr=0.02, weight_decay=0.1, maximize=True), ("for_loop", "foreach")),
    "RMSprop": (torch.optim.RMSprop, dict(lr=0.01), ("for_loop", "foreach")),
    "RMSprop_centered_momentum_wd": (torch.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.9, weight_decay=0.1,
                                                               maximize=True), ("for_loop", "foreach")),
    "Rprop": (torch.optim.Rprop, dict(lr=0.01), ("for_loop", "foreach")),
    "Rprop_maximize": (torch.optim.Rprop, dict(lr=0.01, maximize=True), ("for_loop", "foreach")),
    "SGD": (torch.optim.SGD, dict(lr=0.05), ("for_loop", "foreach", "fused")),
    "SGD_momentum_wd_dampening": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.1),
                                  ("for_loop", "foreach", "fused")),
    "SGD_nesterov_maximize": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1,
                                                    maximize=True), ("for_loop", "foreach", "fused")),
    "LBFGS": (torch.optim.LBFGS, dict(lr=0.5, max_iter=4, history_size=3), ("default",)),
    "LBFGS_strong_wolfe": (torch.optim.LBFGS, dict(lr=1.0, max_iter=4, history_size=3, line_search_fn="strong_wolfe"),
                           ("default",)),
    "Lion": (Lion, dict(lr=0.01, weight_decay=0.1), ("default",)),
}
MODES = ("sparse", "resu", "qresu", "qresu_theta_bfloat16", "qresu_theta_float16")
# (optimizer entry or "*", path or "*", mode or "*") → why that combination is not run.
_LBFGS_ROUNDING = ("LBFGS writes the weight at every inner iteration and line-search evaluation; rounding θ to "
                   "its stored dtype at each write changes the curvature pairs, which no per-step reference models")
SKIPS = {(name, "*", mode): _LBFGS_ROUNDING for name in ("LBFGS", "LBFGS_strong_wolfe")
         for mode in ("qresu_theta_bfloat16", "qresu_theta_float16")}

PATH_OPTIONS = {"for_loop": dict(foreach=False), "foreach": dict(foreach=True), "fused": dict(fused=True), "default": {}}


def _cases():
    for name, (_, _, paths) in TABLE.items():
        for path in paths:
            for mode in MODES:
                yield name, path, mode


def _skip_reason(name, path, mode):
    for key in ((name, path, mode), (name, path, "*"), (name, "*", mode), ("*", "*", mode), (name, "*", "*")):
        if key in SKIPS:
            return SKIPS[key]
    return None


def make_weight(mode, generator):
    w = rt.ResuTensor.from_dense(torch.randn(8, 32, generator=generator), sparsity=0.6)
    if mode == "resu":
        w.enter_resu(epsilon=0.3, generator=generator)
    elif mode.startswith("qresu"):
        theta_dtype = getattr(torch, mode.removeprefix("qresu_theta_")) if "theta" in mode else None
        w.enter_resu(epsilon=0.3, generator=generator, quantize_bits=8, group_size=None, theta_dtype=theta_dtype)
    return torch.nn.Parameter(w)


def _loss(weight, x, target):
    return F.mse_loss(F.linear(x, weight), target)


def _tolerance(mode):
    """Tight for θ in the weight's dtype; else two ulps of θ's dtype at |θ| ≈ 1 per step."""
    if mode.endswith("float16"):
        eps = torch.finfo(getattr(torch, mode.removeprefix("qresu_theta_"))).eps
        return dict(rtol=2 * 3 * eps, atol=2 * 3 * eps)
    return dict(rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, path, mode", list(_cases()), ids=["-".join(c) for c in _cases()])
def test_optimizer_trains_only_trainable_coordinates(name, path, mode):
    reason = _skip_reason(name, path, mode)
    if reason:
        pytest.skip(reason)
    cls, options, _ = TABLE[name]
    options = {**options, **PATH_OPTIONS[path]}
    generator = torch.Generator().manual_seed(0)
    w = make_weight(mode, generator)
    trainable = w.trainable_mask()
    start = w.dequantize()
    stored_dtype = w.trainable_values().dtype  # a QRESU θ dtype, else the weight's
    factored = cls in (torch.optim.Adafactor, torch.optim.LBFGS)
    if factored:  # a matrix whose frozen coordinates are reset after each step
        ref = torch.nn.Parameter(start.clone())
    else:
        ref = torch.nn.Parameter(start[trainable].clone())

    def ref_weight():
        return torch.where(trainable, ref, start) if factored else start.masked_scatter(trainable, ref)

    opt, opt_ref = cls([w], **options), cls([ref], **options)
    for _ in range(3):
        x, target = torch.randn(6, 32, generator=generator), torch.randn(6, 8, generator=generator)

        def closure():
            opt.zero_grad()
            loss = _loss(w, x, target)
            loss.backward()
            return loss

        def closure_ref():
            opt_ref.zero_grad()
            loss = _loss(ref_weight(), x, target)
            loss.backward()
            return loss

        opt.step(closure)
        opt_ref.step(closure_ref)
        with torch.no_grad():
            # θ stored in another dtype: the optimizer computes in the weight's, each write rounds
            ref.copy_(ref.to(stored_dtype))
            if factored:
                ref.copy_(torch.where(trainable, ref, start))
    got = w.dequantize()
    assert torch.equal(got[~trainable], start[~trainable])  # frozen: bit-identical
    assert not torch.equal(got[trainable], start[trainable])  # the trainable ones did move
    torch.testing.assert_close(got, ref_weight().detach(), **_tolerance(mode))
    for key, value in opt.state[w].items():  # state of the trainable coordinates only
        if isinstance(value, rt.CompactTensor):
            assert value.flat.numel() == w.trainable_count, key


def test_sparse_adam_refuses_a_resu_tensor_by_name():
    w = make_weight("sparse", torch.Generator().manual_seed(0))
    opt = torch.optim.SparseAdam([w])
    _loss(w, torch.randn(4, 32), torch.randn(4, 8)).backward()
    before = w.dequantize()
    with pytest.raises((TypeError, RuntimeError), match="SparseAdam"):
        opt.step()
    assert torch.equal(w.dequantize(), before)


IN_PLACE_RULE = {  # name → (the op on weight or state t with a compact operand g, the same op on plain tensors)
    "sign_": (lambda t, g: t.sign_(), lambda t, g: t.sign_()),
    "maximum_out": (lambda t, g: torch.maximum(t, g, out=t), lambda t, g: torch.maximum(t, g, out=t)),
    "clamp_tensor_min": (lambda t, g: t.clamp_(min=g), lambda t, g: t.clamp_(min=g)),
    "exp_": (lambda t, g: t.exp_(), lambda t, g: t.exp_()),
    "mask_write": (lambda t, g: t.__setitem__(g.gt(0), 2.0), lambda t, g: t.__setitem__(g.gt(0), 2.0)),
    "masked_fill_": (lambda t, g: t.masked_fill_(g.lt(0), -1.0), lambda t, g: t.masked_fill_(g.lt(0), -1.0)),
}


@pytest.mark.parametrize("target", ["weight", "state"])
@pytest.mark.parametrize("name", list(IN_PLACE_RULE))
def test_in_place_pointwise_ops_write_trainable_coordinates_only(name, target):
    """Any in-place / out= pointwise op (and a write under a compact boolean mask) on a weight or
    its compact state changes the trainable coordinates as the op on plain tensors does, and
    nothing else."""
    op, plain_op = IN_PLACE_RULE[name]
    w = make_weight("resu", torch.Generator().manual_seed(1)).detach()
    trainable = w.trainable_mask()
    g = w.compact(torch.randn(w.trainable_count, generator=torch.Generator().manual_seed(2)))
    t = w if target == "weight" else w.compact(torch.randn(w.trainable_count))
    before = w.dequantize() if target == "weight" else t.flat.clone()
    with torch.no_grad():
        op(t, g)
    expected = (before[trainable] if target == "weight" else before).clone()
    plain_op(expected, g.flat)
    got = w.dequantize() if target == "weight" else t.flat
    if target == "weight":
        assert torch.equal(got[~trainable], before[~trainable])
        got = got[trainable]
    assert isinstance(t, (rt.ResuTensor, rt.CompactTensor))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.equal(got, before[trainable] if target == "weight" else before)


def test_indexed_write_with_a_plain_mask_raises_and_changes_nothing():
    w = make_weight("sparse", torch.Generator().manual_seed(1)).detach()
    state = w.compact(torch.randn(w.trainable_count))
    before = state.flat.clone()
    with pytest.raises(TypeError, match="boolean CompactTensor mask"):
        state[torch.ones(8, 32, dtype=torch.bool)] = 0.0
    assert torch.equal(state.flat, before)

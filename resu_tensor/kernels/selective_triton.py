"""Triton version of :mod:`selective`: each of the consistency filter's two elementwise passes in
one kernel (the reference takes ~10 launches), reading its thresholds from device tensors so that
the filter never waits for the host. Bit-identical to the reference: no FMA contraction, IEEE division,
and (1 − β) computed on the host in double precision as the reference's Python scalar is.

Import only where triton imports (``kernels/__init__.py`` checks).
"""
import torch

from . import selective
from ._triton_support import Variant, cast_to, cuda_op, tl, triton

BLOCK = 1024


@triton.jit
def _consistency(m, v, delta):
    # div_rn: ``/`` lowers to the approximate div.full.f32 on the GPU, torch divides exactly
    return tl.div_rn(tl.abs(m), v + delta)


@triton.jit
def _scores_kernel(grad_ptr, m_ptr, v_ptr, score_ptr, screen_ptr, numel, beta, one_minus_beta, tau, delta,
                   BLOCK: tl.constexpr):
    element = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = element < numel
    g = tl.load(grad_ptr + element, mask=inside).to(tl.float32)
    m = tl.load(m_ptr + element, mask=inside).to(tl.float32)
    v = tl.load(v_ptr + element, mask=inside).to(tl.float32)
    m = cast_to(beta * m + one_minus_beta * g, m_ptr.dtype.element_ty)
    v = cast_to(beta * v + one_minus_beta * tl.abs(g), v_ptr.dtype.element_ty)
    tl.store(m_ptr + element, m, mask=inside)
    tl.store(v_ptr + element, v, mask=inside)
    c = _consistency(m.to(tl.float32), v.to(tl.float32), delta)  # from the stored values, as selective_apply_
    candidate = (tl.abs(g) >= tl.load(screen_ptr)) & (c > tau)
    tl.store(score_ptr + element, tl.where(candidate, c * tl.abs(g), -1.0), mask=inside)


@triton.jit
def _apply_kernel(grad_ptr, m_ptr, v_ptr, score_ptr, select_ptr, numel, delta, BLOCK: tl.constexpr):
    element = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = element < numel
    score = tl.load(score_ptr + element, mask=inside, other=-1.0)
    chosen = (score >= tl.load(select_ptr)) & (score >= 0)
    g = tl.load(grad_ptr + element, mask=inside).to(tl.float32)
    m = tl.load(m_ptr + element, mask=inside).to(tl.float32)
    v = tl.load(v_ptr + element, mask=inside).to(tl.float32)
    update = tl.where(chosen, _consistency(m, v, delta) * g, 0.0)
    tl.store(grad_ptr + element, cast_to(update, grad_ptr.dtype.element_ty), mask=inside)


def _selective_scores(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, beta: float, tau: float, delta: float,
                      screen_threshold: torch.Tensor) -> torch.Tensor:
    selective.check_scores_args(grad, m, v, screen_threshold)
    score = torch.empty(grad.shape, dtype=torch.float32, device=grad.device)
    if grad.numel():
        _scores_kernel[(triton.cdiv(grad.numel(), BLOCK),)](
            grad, m, v, score, screen_threshold, grad.numel(), float(beta), 1.0 - float(beta), float(tau),
            float(delta), BLOCK=BLOCK, enable_fp_fusion=False)
    return score


def _selective_apply(grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, score: torch.Tensor, delta: float,
                     select_threshold: torch.Tensor) -> None:
    selective.check_apply_args(grad, m, v, score, select_threshold)
    if grad.numel():
        _apply_kernel[(triton.cdiv(grad.numel(), BLOCK),)](grad, m, v, score, select_threshold, grad.numel(),
                                                           float(delta), BLOCK=BLOCK, enable_fp_fusion=False)


def _fake_scores(grad, m, v, beta, tau, delta, screen_threshold):
    return torch.empty(grad.shape, dtype=torch.float32, device=grad.device)


def _fake_apply(grad, m, v, score, delta, select_threshold):
    return None


def _variants(kernel, **operands):
    def variants(quick: bool):
        for grad, ema in [("*bf16", "*bf16"), ("*fp32", "*fp32")]:
            types = dict(grad_ptr=grad, m_ptr=ema, v_ptr=ema, score_ptr="*fp32", numel="i32", delta="fp32", **operands)
            yield Variant(kernel, types, {"BLOCK": BLOCK}, {"enable_fp_fusion": False})
    return variants


# The ops (selective's signatures)
selective_scores_ = cuda_op(selective.selective_scores_, _selective_scores, _fake_scores, mutates_args=["m", "v"],
                            variants=_variants(_scores_kernel, screen_ptr="*fp32", beta="fp32",
                                               one_minus_beta="fp32", tau="fp32"))
selective_apply_ = cuda_op(selective.selective_apply_, _selective_apply, _fake_apply, mutates_args=["grad"],
                           returns_first_arg=True, variants=_variants(_apply_kernel, select_ptr="*fp32"))

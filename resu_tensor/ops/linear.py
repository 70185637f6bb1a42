"""Linear and matmul with a ResuTensor weight.

``F.linear``/``@``/``matmul``/``mm``/``addmm`` are caught in ``__torch_function__`` and run one
autograd.Function whose backward hands the weight a CompactTensor holding only its trainable
coordinates' gradient. The aten ``mm``/``addmm`` entries in ``__torch_dispatch__`` serve code
below autograd (forward only).
"""
from typing import Optional

import torch
import torch.nn.functional as F

from resu_tensor import kernels
from resu_tensor.core.qresu import kernel_operands, tile_prefix
from resu_tensor.core.tensor import ResuTensor, is_traced
from resu_tensor.ops.fallback import dense_fallback, enter_autograd

aten = torch.ops.aten


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _right_operand(weight: ResuTensor, transpose_weight: bool) -> torch.Tensor:
    w = weight.effective_weight()
    return w.t() if transpose_weight else w


def _cast(t: Optional[torch.Tensor], dtype: Optional[torch.dtype]):
    return t if t is None or dtype is None or t.dtype == dtype or not t.is_floating_point() else t.to(dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (tokens, features); 2-D tensors as they are (every skipped call counts: this runs
    twice per linear per step)."""
    return t if t.dim() == 2 else t.reshape(-1, t.shape[-1])


def _fused_qresu(x2: torch.Tensor, weight: ResuTensor, transpose_weight: bool) -> bool:
    """Whether x @ W_effᵀ and its dX = g @ W_eff of a QRESU weight go through the QRESU kernels
    table (on the GPU). The kernels route by token count (kernels/quant.py FUSED_*_TOKENS): one token
    dequantizes W_A and reads θ inside the reduction loop, so W_eff is never written out; more
    build W_eff in one kernel for cuBLAS."""
    return x2.is_cuda and weight.values is None and weight.mask_kind == "bitmap" and transpose_weight != weight.transposed


class ResuMatmul(torch.autograd.Function):
    """y = x @ B (+ bias) with B = Lᵀ if ``transpose_weight`` else L, L the weight's logical
    effective weight (``F.linear`` is the ``transpose_weight=True`` case)."""

    @staticmethod
    def forward(ctx, x, weight, bias, transpose_weight):
        compute_dtype = _autocast_dtype(x.device.type)
        x2 = _rows(_cast(x, compute_dtype))
        bias_c = _cast(bias, compute_dtype)
        b = None
        if _fused_qresu(x2, weight, transpose_weight):
            quantized, mask = kernel_operands(weight)
            y2 = kernels.qresu_linear_small_m(x2, *quantized, *mask, tile_prefix(weight, x2.shape[0], False))
            y2 = y2 if bias_c is None else y2 + bias_c
        else:
            b = _cast(_right_operand(weight, transpose_weight), compute_dtype)
            y2 = x2 @ b if bias_c is None else torch.addmm(bias_c, x2, b)
        # Backward reuses x and W as cast here, as autocast's own mm does (no second cast per
        # step). W only as a cast copy: the stored values themselves are read again in backward
        # (FSDP frees and re-gathers them in between), and a QRESU W_eff is rebuilt, not kept.
        cast_copy = b is not None and weight.values is not None and b.dtype != weight.values.dtype
        ctx.save_for_backward(x2, weight, bias, b if cast_copy else None)
        ctx.transpose_weight = transpose_weight
        ctx.compute_dtype = compute_dtype
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        return y2.reshape(*x.shape[:-1], y2.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        # Host time matters here (one call per linear per step, on autograd's device thread):
        # each reshape, cast or reduction below runs only when it changes something.
        x2, weight, bias, b = ctx.saved_tensors
        dtype = ctx.compute_dtype
        gy2 = _rows(_cast(grad_out, dtype or weight.compute_dtype))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if _fused_qresu(gy2, weight, ctx.transpose_weight):
                quantized, mask = kernel_operands(weight)
                grad_x = kernels.qresu_grad_input_small_m(gy2, *quantized, *mask,
                                                          tile_prefix(weight, gy2.shape[0], True))
            else:
                b = _cast(_right_operand(weight, ctx.transpose_weight), dtype) if b is None else b
                grad_x = gy2 @ b.t()
            grad_x = _cast(grad_x if len(ctx.x_shape) == 2 else grad_x.reshape(ctx.x_shape), ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            # Storage-oriented dW: (gy2ᵀ·x2) when exactly one of the two transposes applies.
            flip = ctx.transpose_weight != weight.transposed
            a_op, b_op = (gy2, x2) if flip else (x2, gy2)
            if is_traced(gy2):
                # Dense product + fixed-size gather: the kernel table's mask gather has a
                # data-dependent length (nonzero), which torch.compile cannot always trace.
                flat = weight.gather_trainable((a_op.t() @ b_op).to(weight.compute_dtype))
            elif (bits := weight.trainable_bitmap()) is not None:
                flat = kernels.compact_weight_grad_bitmap(a_op, b_op, *bits, weight.compute_dtype)
            else:
                flat = kernels.compact_weight_grad(a_op, b_op, weight.trainable_flat(), weight.compute_dtype)
            grad_weight = weight.compact(flat)
        if bias is not None and ctx.needs_input_grad[2]:
            # A bias of one value per output (nn.Linear's) takes a plain column sum.
            summed = gy2.sum(0) if bias.shape == gy2.shape[1:] else gy2.sum_to_size(bias.shape)
            grad_bias = _cast(summed, bias.dtype)
        return grad_x, grad_weight, grad_bias, None


def _check_input(op: str, x, weight: ResuTensor, transpose_weight: bool) -> None:
    if isinstance(x, ResuTensor):
        raise TypeError(f"{op}: a ResuTensor can only be the weight (right-hand) operand")
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        raise ValueError(f"{op}: input must be a tensor with at least 1 dimension, got {x!r}")
    expected = weight.logical_shape[1 if transpose_weight else 0]
    if x.shape[-1] != expected:
        raise ValueError(
            f"{op}: shape mismatch, input has {x.shape[-1]} features (shape {tuple(x.shape)}) but the "
            f"ResuTensor weight of shape {tuple(weight.shape)} expects {expected}"
        )


def resu_matmul(x, weight: ResuTensor, bias=None, transpose_weight: bool = False, op: str = "matmul"):
    _check_input(op, x, weight, transpose_weight)
    with torch._C.DisableTorchFunctionSubclass():
        return ResuMatmul.apply(x, weight, bias, transpose_weight)


def _fast_path_fits(x, weight) -> bool:
    """Whether the fast path serves this call: a ResuTensor right-hand operand, a plain input.
    Anything else (w @ x, w @ w.t()) computes on W_eff through the generic autograd entry."""
    return isinstance(weight, ResuTensor) and not isinstance(x, ResuTensor)


def _linear(func, types, args, kwargs):
    x, weight = args[0], args[1]
    if not _fast_path_fits(x, weight):
        return enter_autograd(func, types, args, kwargs)
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return resu_matmul(x, weight, bias, transpose_weight=True, op="linear")


def _matmul(func, types, args, kwargs):
    x, weight = args[0], args[1]
    if not _fast_path_fits(x, weight):
        return enter_autograd(func, types, args, kwargs)
    return resu_matmul(x, weight, op="matmul")


def _addmm(func, types, args, kwargs):
    bias, x, weight = args[0], args[1], args[2]
    if (kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3 or isinstance(bias, ResuTensor)
            or not _fast_path_fits(x, weight)):
        return enter_autograd(func, types, args, kwargs)
    if x.dim() != 2:
        raise ValueError(f"addmm: input must be 2-D, got shape {tuple(x.shape)}")
    return resu_matmul(x, weight, bias, op="addmm")


def _mm(func, types, args, kwargs):
    if not _fast_path_fits(args[0], args[1]):
        return enter_autograd(func, types, args, kwargs)
    if args[0].dim() != 2:
        raise ValueError(f"mm: input must be 2-D, got shape {tuple(args[0].shape)}")
    return _matmul(func, types, args, kwargs)


ResuTensor.implements_torch_function([F.linear, aten.linear, aten.linear.default])(_linear)
ResuTensor.implements_torch_function(
    [torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, aten.matmul, aten.matmul.default]
)(_matmul)
ResuTensor.implements_torch_function([torch.mm, torch.Tensor.mm, aten.mm, aten.mm.default])(_mm)
ResuTensor.implements_torch_function([torch.addmm, torch.Tensor.addmm, aten.addmm, aten.addmm.default])(_addmm)


# Below autograd (e.g. traced graphs): plain forward math on the effective weight.
@ResuTensor.implements([aten.mm.default, aten.addmm.default])
def _dispatch_mm(func, types, args, kwargs):
    weight = args[-1]
    if any(isinstance(a, ResuTensor) for a in args[:-1]) or not isinstance(weight, ResuTensor):
        return dense_fallback(func, types, args, kwargs)
    return func(*args[:-1], weight.effective_weight(), **kwargs)

"""``torch._fused_adam_`` / ``torch._fused_adamw_`` (``Adam(fused=True)``, ``AdamW(fused=True)``),
``torch._fused_sgd_`` and ``torch._fused_adagrad_`` over lists that hold ResuTensor weights.

A weight whose trainable set is a bitmap (SPARSE: set bits, RESU: clear bits) takes the whole
step in one kernel pass over its mask, weights, compact grad and moments, and all such weights of
the call share one launch (:func:`resu_tensor.kernels.foreach_adam_by_bitmap_`). QRESU weights
whose whole θ trains share another (:func:`resu_tensor.kernels.foreach_adam_flat_`). Everything
else (plain tensors, DENSE weights, index-encoded masks, a QRESU subset, and the amsgrad /
grad-scaler / tensor-lr variants) runs torch's own fused op on the flattened trainable
coordinates, as :mod:`resu_tensor.ops.foreach` does.
"""
import torch

from resu_tensor import kernels
from resu_tensor.core.compact import CompactTensor
from resu_tensor.ops.foreach import foreach_op
from resu_tensor.ops.trainable import _Operands
from resu_tensor.core.tensor import ResuTensor

aten = torch.ops.aten
FUSED_ADAM_OPS = [getattr(op, overload) for op in (aten._fused_adam_, aten._fused_adamw_) for overload in op.overloads()]
# the AdamW overloads (decoupled weight decay), found once: a schema is rebuilt on every access
_FUSED_ADAMW_OPS = frozenset(getattr(aten._fused_adamw_, overload) for overload in aten._fused_adamw_.overloads())


def _one_pass_variant(kwargs) -> bool:
    """Whether the call is plain Adam/AdamW, the variant the one-pass kernel implements."""
    return not (kwargs.get("amsgrad") or kwargs.get("grad_scale") is not None or kwargs.get("found_inf") is not None
                or isinstance(kwargs.get("lr"), torch.Tensor))


def _compact_state(func, param, tensors) -> tuple:
    """The flat vectors of a weight's grad and moments. Compact ones of the weight's own trainable
    set are read directly; anything else goes through _Operands (which refuses stale state)."""
    key, transposed = param.trainable_key, param.transposed
    if all(type(t) is CompactTensor and t.trainable_key == key and t.transposed == transposed for t in tensors):
        return tuple(t.flat for t in tensors)
    operands = _Operands(func, [param, *tensors], {})
    return tuple(operands.flat(t) for t in tensors)


def fused_adam(func, types, args, kwargs):
    kwargs = dict(kwargs or {})
    params, grads, exp_avgs, exp_avg_sqs, _, state_steps = args[:6]
    one_pass = _one_pass_variant(kwargs)
    decoupled = func in _FUSED_ADAMW_OPS
    hyper = (kwargs["lr"], kwargs["beta1"], kwargs["beta2"], kwargs["weight_decay"], kwargs["eps"], decoupled,
             kwargs.get("maximize", False))
    rest, bitmap_weights, flat_weights = [], [], []
    for j, param in enumerate(params):
        if not (one_pass and isinstance(param, ResuTensor)):
            rest.append(j)
            continue
        state = (grads[j], exp_avgs[j], exp_avg_sqs[j])
        if param.values is None and param.trainable_values_are_storage and param.theta.dtype == param.dtype:
            # QRESU, all of θ trains, stored in the weight's dtype
            flat_weights.append((param.theta, *_compact_state(func, param, state), state_steps[j]))
        elif param.values is not None and (bits := param.bitmap_kernels_for(param.values)) is not None:
            bitmap_weights.append((param.values, *bits[:4], *_compact_state(func, param, state), state_steps[j]))
        else:
            rest.append(j)
    # one launch for each kind (per dtype group), not one per weight
    if bitmap_weights:
        kernels.foreach_adam_by_bitmap_(*map(list, zip(*bitmap_weights)), *hyper)
    if flat_weights:
        kernels.foreach_adam_flat_(*map(list, zip(*flat_weights)), *hyper)
    if rest:
        sub = [[a[j] for j in rest] if isinstance(a, (list, tuple)) and len(a) else a for a in args]
        foreach_op(func, types, tuple(sub), kwargs)


# Fused SGD and Adagrad (torch's CPU kernels) run on the flat trainable coordinates of each list
# position, as the foreach ops do.
FUSED_FLAT_OPS = [getattr(op, overload) for op in (aten._fused_sgd_, aten._fused_adagrad_) for overload in op.overloads()]

for _cls in (ResuTensor, CompactTensor):
    _cls.implements(FUSED_ADAM_OPS)(fused_adam)
    _cls.implements(FUSED_FLAT_OPS)(foreach_op)

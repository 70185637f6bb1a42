"""In-place ops on a ResuTensor whose other operand is a whole weight: another ResuTensor (an EMA or
SWA copy moving toward the live weight: ``ema.lerp_(w, 0.01)``, ``ema.mul_(d).add_(w, alpha=1 - d)``,
``torch._foreach_lerp_``; ``copy_`` of a ResuTensor copies its whole state instead) or, for
``copy_``, a plain tensor of the weight's shape (AveragedModel's
``avg.copy_(avg + (w - avg) / (n + 1))``, ``nn.init.trunc_normal_``).

An in-place op writes the target's trainable coordinates only. That equals the dense result exactly
when the other weight agrees with the target at the target's frozen coordinates (any average of
two equal values is that value), so this is checked, bit for bit, and the other weight then enters
the op as its values at the target's trainable coordinates. Where they disagree (the averaged copy
was made before ``rt.commit_`` or ``enter_resu_`` changed the live weight's mask or values), the op
raises ``ValueError`` instead of leaving the frozen coordinates silently behind: re-sync the copy
(``avg.copy_(w)`` copies the whole state), or keep it in DENSE mode, where every coordinate trains
and averages: ``avg.copy_(rt.ResuTensor.from_dense(avg.dequantize()))``.

Example::

    ema = copy.deepcopy(w)                   # same state: exact
    with torch.no_grad():
        ema.lerp_(w, 1 - 0.99)               # trainable coordinates move; frozen ones are equal
"""
import torch

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.tensor import ResuTensor, is_traced

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_COPY_OPS = frozenset([torch.ops.aten.copy_.default, torch.ops.aten._foreach_copy_.default])
_MISMATCH_HELP = (
    "in-place ops write a ResuTensor's trainable coordinates only, so the other operand must equal it at its "
    "frozen coordinates. The two hold different states (e.g. an averaged copy made before rt.commit_ / "
    "rt.enter_resu_ changed the live weight): re-sync the copy with avg.copy_(w) (copies the whole state), or keep "
    "the averaged copy in DENSE mode so every coordinate averages: "
    "avg.copy_(rt.ResuTensor.from_dense(avg.dequantize()))"
)


def _is_whole_weight(func, operand, target: ResuTensor) -> bool:
    """Whether ``operand`` of an in-place op on ``target`` is a whole weight this module resolves."""
    if operand is target:
        return False
    if isinstance(operand, ResuTensor):
        return func not in _COPY_OPS  # copy_ of a ResuTensor copies the whole state (load_state_dict)
    return (func in _COPY_OPS and type(operand) in _PLAIN and tuple(operand.shape) == target.logical_shape
            and not is_traced(operand))


def _dense(operand) -> torch.Tensor:
    return operand.effective_weight() if isinstance(operand, ResuTensor) else operand


def as_target_compact(func, operand, target: ResuTensor) -> CompactTensor:
    """``operand`` (a ResuTensor or a plain tensor of ``target``'s shape) as a CompactTensor of
    ``target``'s trainable coordinates, after checking it equals ``target`` at the frozen ones."""
    dense = _dense(operand).to(target.compute_dtype)
    if target.trainable_side != "all":
        frozen = ~target.trainable_mask()
        with torch.no_grad():
            differ = int((dense[frozen] != target.effective_weight()[frozen]).sum())
        if differ:
            raise ValueError(f"{func}: the other operand differs from this {target.mode.value!r} weight at {differ} "
                             f"of its {int(frozen.sum())} frozen coordinates; {_MISMATCH_HELP}")
    return target.compact(target.gather_trainable(target.to_storage(dense).contiguous()))


def resolve_weight_operands(func, args, kwargs):
    """``args``/``kwargs`` of in-place op ``func`` with each whole-weight operand of a ResuTensor
    target replaced by :func:`as_target_compact` (per list position for a ``_foreach_`` op)."""
    target = args[0]
    if isinstance(target, (list, tuple)):
        n = len(target)
        weights = [j for j, t in enumerate(target) if isinstance(t, ResuTensor)]
        if not weights:
            return args, kwargs
        resolved = list(args)
        for i, column in enumerate(args[1:], start=1):
            if isinstance(column, (list, tuple)) and len(column) == n and any(
                    _is_whole_weight(func, column[j], target[j]) for j in weights):
                resolved[i] = [as_target_compact(func, a, t) if isinstance(t, ResuTensor) and _is_whole_weight(func, a, t)
                               else a for t, a in zip(target, column)]
        return tuple(resolved), kwargs
    if not isinstance(target, ResuTensor):
        return args, kwargs
    resolve = lambda a: as_target_compact(func, a, target) if _is_whole_weight(func, a, target) else a  # noqa: E731
    return (target, *map(resolve, args[1:])), {k: resolve(v) for k, v in kwargs.items()}


def _with_weight_operands(handler):
    def handle(func, types, args, kwargs):
        args, kwargs = resolve_weight_operands(func, args, kwargs or {})
        return handler(func, types, args, kwargs)
    handle.__doc__ = handler.__doc__
    return handle


# Every in-place op ResuTensor's table holds (the element-wise, foreach and copy_ handlers of the
# modules imported before this one) first resolves whole-weight operands.
_TABLE = ResuTensor._ATEN_OP_TABLE[ResuTensor]
for _op, _handler in list(_TABLE.items()):
    if _op._schema.name.endswith("_") and _op is not torch.ops.aten.detach_.default:
        _TABLE[_op] = _with_weight_operands(_handler)

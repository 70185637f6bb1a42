"""``torch._foreach_*`` ops over lists that hold ResuTensor weights or their CompactTensor grads
and optimizer state: what the default (foreach) optimizers and ``clip_grad_norm_`` call.

Each list position is flattened as :mod:`resu_tensor.ops.trainable` flattens one op's arguments
(its trainable coordinates), then the foreach op runs once over the whole flat lists, so plain
and ResuTensor parameters share one multi-tensor launch per op instead of a Python loop of
per-parameter ops. In-place results are written back to the weights that need it.
"""
import torch
from torch.optim import optimizer as _optimizer
from torch.utils import _foreach_utils

from resu_tensor.compact import CompactTensor
from resu_tensor.ops.trainable import _Operands, _is_inplace, write_back
from resu_tensor.tensor import ResuTensor

aten = torch.ops.aten
_SUBCLASSES = (ResuTensor, CompactTensor)


def _is_tensor_list(a) -> bool:
    return isinstance(a, (list, tuple)) and len(a) > 0 and isinstance(a[0], torch.Tensor)


def foreach_op(func, types, args, kwargs):
    kwargs = kwargs or {}
    list_positions = [i for i, a in enumerate(args) if _is_tensor_list(a)]
    flat_args = [list(a) if i in list_positions else a for i, a in enumerate(args)]
    operands = []
    for j in range(len(args[list_positions[0]])):
        column = [args[i][j] for i in list_positions]
        ops = _Operands(func, column, {}) if any(isinstance(t, _SUBCLASSES) for t in column) else None
        operands.append(ops)
        if ops is not None:
            for i in list_positions:
                flat_args[i][j] = ops.flat(args[i][j])
    out = func(*flat_args, **kwargs)
    if _is_inplace(func):
        for target, flat in zip(args[0], flat_args[0]):
            write_back(func, target, flat)
        return out
    return [o if ops is None else ops.wrap(o) for o, ops in zip(out, operands)]


FOREACH_OPS = [
    getattr(getattr(aten, name), overload)
    for name in dir(aten) if name.startswith("_foreach_")
    for overload in getattr(aten, name).overloads()
]
for _cls in _SUBCLASSES:
    _cls.implements(FOREACH_OPS)(foreach_op)

# Let optimizers and clip_grad_norm_ pick their foreach paths by default for these parameters
# and grads, as torch.distributed.tensor does for DTensor.
for _types, _cls in [(_optimizer._foreach_supported_types, ResuTensor),
                     (_foreach_utils._foreach_supported_types, CompactTensor)]:
    if _cls not in _types:
        _types.append(_cls)

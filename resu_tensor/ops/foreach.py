"""``torch._foreach_*`` ops over lists that hold ResuTensor weights or their CompactTensor grads
and optimizer state: what the default (foreach) optimizers and ``clip_grad_norm_`` call.

Each list position is flattened as :mod:`resu_tensor.ops.trainable` flattens one op's arguments
(its trainable coordinates), then the foreach op runs once over the whole flat lists, so plain
and ResuTensor parameters share one multi-tensor launch per op instead of a Python loop of
per-parameter ops. In-place results are written back to the weights that need it, except on
bitmap-selected weights, which all take the op in one kernel launch
(:func:`resu_tensor.kernels.foreach_update_by_bitmap_`).
"""
import torch
from torch.optim import optimizer as _optimizer
from torch.utils import _foreach_utils

from resu_tensor import kernels
from resu_tensor.compact import CompactTensor
from resu_tensor.ops.trainable import _Operands, _is_inplace, bitmap_update_args, write_back
from resu_tensor.tensor import ResuTensor

aten = torch.ops.aten
_SUBCLASSES = (ResuTensor, CompactTensor)


def _is_tensor_list(a) -> bool:
    return isinstance(a, (list, tuple)) and len(a) > 0 and isinstance(a[0], torch.Tensor)


def _is_plain(t) -> bool:
    return not isinstance(t, torch.Tensor) or type(t) in (torch.Tensor, torch.nn.Parameter)


def foreach_op(func, types, args, kwargs):
    kwargs = kwargs or {}
    inplace = _is_inplace(func)
    n = len(next(a for a in args if _is_tensor_list(a)))
    per_position = {i for i, a in enumerate(args) if isinstance(a, (list, tuple)) and len(a) == n}  # incl. ScalarLists
    tensor_lists = {i for i in per_position if _is_tensor_list(args[i])}
    operands = [_Operands.of_column(func, [args[i][j] for i in tensor_lists]) for j in range(n)]
    # Flattened positions run together with plain tensors; other subclasses (e.g. the DTensors of
    # FSDP2-sharded neighbours) refuse plain tensors in their list, so they get their own call.
    own_call = {j for j in range(n) if operands[j] is None and not all(_is_plain(args[i][j]) for i in tensor_lists)}
    # Bitmap-selected weights: one kernel launch for all of them (per op and dtype group), only
    # once every position's operands were checked (stale state raises before anything moves).
    updates = {}
    if inplace:
        for j in range(n):
            if operands[j] is not None and isinstance(args[0][j], ResuTensor):
                update = bitmap_update_args(func, operands[j], [a[j] if i in per_position else a
                                                                for i, a in enumerate(args)], kwargs)
                if update is not None:
                    updates.setdefault(update[5], {})[j] = update  # by op: mul_ may hold mul and mul_scalar
    done = set()
    for op, by_position in updates.items():
        columns = [list(column) for column in zip(*by_position.values())]
        kernels.foreach_update_by_bitmap_(*columns[:5], op, *columns[6:])
        done |= set(by_position)
    results = [None] * n
    separate = own_call | done
    for positions in ([j for j in range(n) if j not in separate], sorted(own_call)):
        if not positions:
            continue
        call_args = [[args[i][j] if operands[j] is None or i not in tensor_lists else operands[j].flat(args[i][j])
                      for j in positions] if i in per_position else a for i, a in enumerate(args)]
        out = func(*call_args, **kwargs)
        for k, j in enumerate(positions):
            if inplace:
                write_back(func, args[0][j], call_args[0][k])
            else:
                results[j] = out[k] if operands[j] is None else operands[j].wrap(out[k])
    return None if inplace else results


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

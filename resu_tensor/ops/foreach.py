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
from resu_tensor.core.compact import CompactTensor
from resu_tensor.ops.fallback import dense_view
from resu_tensor.ops.trainable import (BITMAP_UPDATES, _named_arguments, _Operands, _is_inplace, bitmap_update_args,
                                       write_back)
from resu_tensor.core.tensor import ResuTensor

aten = torch.ops.aten
_SUBCLASSES = (ResuTensor, CompactTensor)


def _is_tensor_list(a) -> bool:
    return isinstance(a, (list, tuple)) and len(a) > 0 and isinstance(a[0], torch.Tensor)


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)
_OWN_CALL = object()
_DENSE = object()


def _column(func, column):
    """How one list position flattens: None (plain tensors: as they are, in the shared call); the
    first CompactTensor, when all are CompactTensors of one trainable set (the optimizer's state
    ops, most of a foreach step: their ``flat`` vectors, nothing else to check); an _Operands when
    a ResuTensor is among them; _OWN_CALL for other subclasses (e.g. the DTensors of
    FSDP2-sharded neighbours), which refuse plain tensors in their list."""
    first = column[0]
    if _is_inplace(func) and type(first) in _PLAIN_TYPES and any(isinstance(t, _SUBCLASSES) for t in column):
        return _DENSE  # a plain target (e.g. Adafactor's update ⊙ grad): its operands' dense views
    if type(first) is CompactTensor and all(
            type(t) is CompactTensor and t.trainable_key == first.trainable_key and t.transposed == first.transposed
            for t in column):
        return first
    for t in column:
        if type(t) not in _PLAIN_TYPES:
            return _Operands(func, column, {}) if any(isinstance(a, _SUBCLASSES) for a in column) else _OWN_CALL
    return None


def _flatten(how, column):
    if how is None or how is _OWN_CALL:
        return column
    if type(how) is CompactTensor:
        return [t.flat for t in column]
    if how is _DENSE:
        return [dense_view(t) for t in column]
    return [how.flat(t) for t in column]


def _wrap(how, out):
    if type(how) is CompactTensor:
        return how.with_flat(out) if out.dim() == 1 and out.numel() == how.flat.numel() else out
    return out if how is None or how is _OWN_CALL or how is _DENSE else how.wrap(out)


_GENERAL = object()
_UNSEEN = object()


def _flat_lists_call(func, args, kwargs, inplace: bool):
    """The common optimizer calls in one pass over the lists, or _GENERAL where the general path
    of :func:`foreach_op` is needed. Served: every list position holds plain tensors only, or
    CompactTensors of one trainable set only (their ``flat`` vectors go into the one shared call),
    or, for an in-place op with a one-pass bitmap form, a ResuTensor target with CompactTensors of
    its trainable set (all such weights take kernels.foreach_update_by_bitmap_ first, as in the
    general path). Any other mix (stale state, plain tensors next to a weight, other subclasses,
    a QRESU target) goes to the general path, which serves it or raises."""
    n, kinds = -1, None  # per position: None (plain), its first CompactTensor, or the ResuTensor target
    call_args = list(args)
    for i, a in enumerate(args):
        if not isinstance(a, (list, tuple)) or not a or not isinstance(a[0], torch.Tensor):
            continue
        if kinds is None:
            n, kinds = len(a), [_UNSEEN] * len(a)
        elif len(a) != n:
            return _GENERAL
        flat = []
        for j, t in enumerate(a):
            kind, cls = kinds[j], type(t)
            if cls is CompactTensor:
                if kind is _UNSEEN:
                    kinds[j] = t
                elif kind is None or t.trainable_key != kind.trainable_key or t.transposed != kind.transposed:
                    return _GENERAL
                flat.append(t.flat)
            elif cls is torch.Tensor or cls is torch.nn.Parameter:
                if kind is not _UNSEEN and kind is not None:
                    return _GENERAL
                kinds[j] = None
                flat.append(t)
            elif cls is ResuTensor and i == 0 and inplace and func in BITMAP_UPDATES:
                kinds[j] = t
                flat.append(t)
            else:
                return _GENERAL
        call_args[i] = flat
    if kinds is None:
        return _GENERAL
    targets = [j for j in range(n) if type(kinds[j]) is ResuTensor]
    if targets:
        named = _named_arguments(func, args, kwargs)
        updates = {}
        for j in targets:
            update = bitmap_update_args(func, _compact_flat, _position(named, j, n))
            if update is None:
                return _GENERAL
            updates.setdefault(update[5], {})[j] = update  # by op: mul_ may hold mul and mul_scalar
        _launch_bitmap_updates(updates)
        rest = [j for j in range(n) if kinds[j] is None or type(kinds[j]) is CompactTensor]
        if not rest:
            return None
        call_args = [[a[j] for j in rest] if isinstance(a, (list, tuple)) and len(a) == n else a for a in call_args]
    out = func(*call_args, **kwargs)
    if inplace:
        return None
    return [o if kind is None or o.dim() != 1 or o.numel() != kind.flat.numel() else kind.with_flat(o)
            for kind, o in zip(kinds, out)]


def _compact_flat(t: CompactTensor) -> torch.Tensor:
    return t.flat


def _launch_bitmap_updates(updates: dict) -> None:
    """One kernels.foreach_update_by_bitmap_ launch per op of ``updates`` ({op: {list position:
    the arguments bitmap_update_args gave for it}})."""
    for op, by_position in updates.items():
        columns = [list(c) for c in zip(*by_position.values())]
        kernels.foreach_update_by_bitmap_(*columns[:5], op, *columns[6:])


def foreach_op(func, types, args, kwargs):
    kwargs = kwargs or {}
    inplace = _is_inplace(func)
    fast = _flat_lists_call(func, args, kwargs, inplace)
    if fast is not _GENERAL:
        return fast
    n = len(next(a for a in args if _is_tensor_list(a)))
    per_position = [i for i, a in enumerate(args) if isinstance(a, (list, tuple)) and len(a) == n]  # incl. ScalarLists
    tensor_lists = [i for i in per_position if _is_tensor_list(args[i])]
    columns = list(zip(*(args[i] for i in tensor_lists)))
    flattening = [_column(func, column) for column in columns]
    # Bitmap-selected weights: one kernel launch for all of them (per op and dtype group), only
    # once every position was checked (stale state raises before anything moves).
    done = set()
    if inplace:
        updates = {}
        named = _named_arguments(func, args, kwargs)
        for j, target in enumerate(args[0]):
            if isinstance(target, ResuTensor) and isinstance(flattening[j], _Operands):
                update = bitmap_update_args(func, flattening[j].flat, _position(named, j, n))
                if update is not None:
                    updates.setdefault(update[5], {})[j] = update  # by op: mul_ may hold mul and mul_scalar
        _launch_bitmap_updates(updates)
        done = {j for by_position in updates.values() for j in by_position}
    results = [None] * n
    own = [j for j in range(n) if flattening[j] is _OWN_CALL]
    for positions in ([j for j in range(n) if flattening[j] is not _OWN_CALL and j not in done], own):
        if not positions:
            continue
        flat = [_flatten(flattening[j], columns[j]) for j in positions]
        upcast = _upcast_stored_targets(args[0], positions, flat) if inplace else set()
        call_args = list(args)
        for k, i in enumerate(tensor_lists):
            call_args[i] = [column[k] for column in flat]
        for i in per_position:
            if i not in tensor_lists:
                call_args[i] = [args[i][j] for j in positions]
        out = func(*call_args, **kwargs)
        for k, j in enumerate(positions):
            if not inplace:
                results[j] = _wrap(flattening[j], out[k])
            elif j in upcast:
                args[0][j].write_trainable_(flat[k][0])
            elif isinstance(flattening[j], _Operands):
                write_back(func, args[0][j], flat[k][0])
    return None if inplace else results


def _upcast_stored_targets(targets, positions, flat) -> set:
    """Weights whose trainable values are stored in another dtype than the weight's (a QRESU θ
    dtype) take the op in the weight's dtype, as their grads and state have it (foreach and
    fused kernels want one dtype per list position); the result is rounded into storage by
    write_trainable_. Replaces those targets in ``flat``; returns their positions."""
    upcast = set()
    for k, j in enumerate(positions):
        target = targets[j]
        if isinstance(target, ResuTensor) and flat[k][0].dtype != target.dtype:
            flat[k] = [flat[k][0].to(target.dtype), *flat[k][1:]]
            upcast.add(j)
    return upcast


def _position(named: dict, j: int, n: int) -> dict:
    """One list position's named arguments of a _foreach_ op (lists of length n give their j-th
    element; scalars and lists of another length are shared)."""
    return {name: a[j] if isinstance(a, (list, tuple)) and len(a) == n else a for name, a in named.items()}


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

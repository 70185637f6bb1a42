"""Optimizer state of ResuTensor parameters: find and drop what belongs to an earlier trainable set, or
remap it onto the new one.

Covers plain ResuTensor parameters and FSDP2-sharded ones (a DTensor whose local tensor is this
rank's ResuTensor row block, with DTensor optimizer state of CompactTensors)."""
import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.fsdp_extension import is_sharded_resu
from resu_tensor.core.tensor import ResuTensor


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None) -> int:
    """Drop the optimizer state of every ResuTensor parameter (of ``model``, if given; plain or
    FSDP2-sharded) whose state belongs to another trainable set than the parameter's current
    one. Returns how many (on this rank). Returning 0 is normal (nothing was stale); a ``model``
    with no ResuTensor parameter at all raises ``ValueError`` (the call could never do anything:
    the weights were not converted, or the wrong model was passed).

    Example::

        rt.enter_resu_(model); rt.reset_optimizer_state_(optimizer, model)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module (or None for every parameter), got {type(model).__name__}")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if model is not None:
        model_params = list(model.parameters())
        if not any(isinstance(p, ResuTensor) or is_sharded_resu(p) for p in model_params):
            raise ValueError("reset_optimizer_state_: the model has no ResuTensor weight; convert its Linear weights "
                             "first: quantize_(model, rt.resu_config(...))")
        allowed = {id(p) for p in model_params}
        params = [p for p in params if id(p) in allowed]
    plain = [p for p in params if isinstance(p, ResuTensor)]
    sharded = [p for p in params if is_sharded_resu(p)]
    stale = stale_parameters(optimizer, plain) + stale_sharded_parameters(optimizer, sharded)
    for param in stale:
        if not (isinstance(param, ResuTensor) and reset_in_place_(optimizer, param)):
            del optimizer.state[param]
    return len(stale)


# Optimizers whose fresh per-parameter state is zero moments and a zero ``step`` tensor, so that
# zeroing the existing state in place is the same as dropping it. SGD's first momentum step
# without a buffer is ``buf = grad.clone()``; with a zero buffer it is ``0 * momentum + (1 -
# dampening) * grad``: the same (bit for bit) only without dampening. Exact types: a subclass
# may initialise its state otherwise.
_ZERO_INIT_OPTIMIZERS = (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


def reset_in_place_(optimizer: torch.optim.Optimizer, param: ResuTensor) -> bool:
    """Reset ``param``'s optimizer state to what a fresh state would be (zero moments, ``step``
    0) by writing into the existing tensors, relabelled to ``param``'s current trainable set.
    Returns False, changing nothing, where that cannot equal a fresh state: another optimizer
    type, SGD with dampening, an entry that is neither a CompactTensor nor a 0-d ``step``
    tensor, or a state of another logical shape (the caller then drops the state). A new
    trainable count gets new zero vectors inside the same CompactTensor objects.

    A compiled ``optimizer.step`` guards its state tensors by identity: the same objects reset
    in place reuse its graph across the scheduler's phase changes.

    Example::

        rt.enter_resu_(model)
        if not reset_in_place_(optimizer, w): del optimizer.state[w]
    """
    if type(optimizer) not in _ZERO_INIT_OPTIMIZERS:
        return False
    state = optimizer.state.get(param)
    group = next((g for g in optimizer.param_groups if any(p is param for p in g["params"])), None)
    if not state or group is None or (type(optimizer) is torch.optim.SGD and group.get("dampening", 0) != 0):
        return False
    count = param.trainable_count
    label = param.compact(torch.empty(count, device="meta"))
    for key, value in state.items():
        if isinstance(value, CompactTensor):
            if tuple(value.logical_shape) != tuple(label.logical_shape) or value.transposed != label.transposed:
                return False
        elif not (key == "step" and isinstance(value, torch.Tensor) and value.dim() == 0):
            return False
    for value in state.values():
        if isinstance(value, CompactTensor):
            if value.flat.numel() == count:
                value.flat.zero_()
                value.relabel_(label)
            else:
                # another count (SPARSE ↔ RESU at a sparsity other than 0.5, a new sparsity): a
                # new vector inside the same object, so the step's identity guard still holds
                value.relabel_(label, torch.zeros(count, dtype=value.flat.dtype, device=value.flat.device))
        else:
            value.zero_()
    return True


def same_layout(value: CompactTensor, label: CompactTensor) -> bool:
    """Whether ``value`` can hold ``label``'s trainable set in place: as many values, the same
    logical shape and orientation."""
    return (value.flat.numel() == label.flat.numel() and tuple(value.logical_shape) == tuple(label.logical_shape)
            and value.transposed == label.transposed)


# Run, not traced, inside a compiled optimizer.step (its pre-hook checks for stale state): traced,
# each state tensor's key would be a guarded constant, and every relabelled state a recompile.
@torch._dynamo.disable
def stale_parameters(optimizer: torch.optim.Optimizer, params: Optional[list] = None) -> list[ResuTensor]:
    """ResuTensor parameters (of ``params``, default: all of ``optimizer``'s) whose optimizer
    state belongs to another trainable set."""
    if params is None:
        params = [p for group in optimizer.param_groups for p in group["params"] if isinstance(p, ResuTensor)]
    state = optimizer.state
    return [param for param in params if any(_is_stale(v, param) for v in state.get(param, {}).values())]


def stale_sharded_parameters(optimizer: torch.optim.Optimizer, params: list) -> list:
    """FSDP2-sharded ResuTensor parameters of ``params`` whose optimizer state belongs to another
    trainable set than their shard's."""
    state = optimizer.state
    return [param for param in params
            if any(is_stale_for_shard(v, param._local_tensor) for v in state.get(param, {}).values())]


def is_stale_for_shard(value, shard: ResuTensor) -> bool:
    """Whether one optimizer state entry of a sharded parameter (a DTensor of a CompactTensor)
    was made for another trainable set than ``shard``'s."""
    local = getattr(value, "_local_tensor", value)
    return isinstance(local, CompactTensor) and local.trainable_key != shard.trainable_key


def _is_stale(value, param: ResuTensor) -> bool:
    if isinstance(value, CompactTensor):
        return value.trainable_key != param.trainable_key
    # dim() first: the step counters are 0-d, and param.shape costs a __torch_function__ call
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == param.shape


def remap_optimizer_state_(optimizer: torch.optim.Optimizer, param: ResuTensor,
                           old_trainable_flat: Optional[torch.Tensor]) -> int:
    """Carry ``param``'s optimizer state over a change of its trainable set.

    ``old_trainable_flat`` is the row-major bool mask of the trainable coordinates the state was
    made for (``param.trainable_flat()`` taken before the change; None = every coordinate). Every
    state entry that is a CompactTensor of that old set (Adam/AdamW ``exp_avg``/``exp_avg_sq``/
    ``max_exp_avg_sq``, SGD ``momentum_buffer``, any optimizer that keeps per-coordinate state
    like its parameter) becomes a CompactTensor of the new set: coordinates trainable before and
    after keep their values, coordinates that join start at zero, coordinates that leave are
    dropped. Scalar entries (the per-parameter ``step``) are kept as they are, so the bias
    correction of the kept coordinates stays consistent with their moments; joiners get zero
    moments under that same step, so late in training their first Adam updates are larger than a
    fresh state's would be (no bias correction left). Returns how many entries were remapped.

    Example::

        old = w.trainable_flat(); w.prune(0.8)
        rt.remap_optimizer_state_(optimizer, w, old)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(param, ResuTensor):
        raise TypeError(f"remap_optimizer_state_ needs a ResuTensor parameter, got {type(param).__name__}")
    state = optimizer.state.get(param)
    if not state:
        return 0
    numel = param.storage_numel
    if old_trainable_flat is not None and (old_trainable_flat.dtype != torch.bool or old_trainable_flat.numel() != numel):
        raise ValueError(f"old_trainable_flat must be a bool mask of {numel} elements (or None), got "
                         f"{old_trainable_flat.dtype} with {old_trainable_flat.numel()} elements")
    new_flat = param.trainable_flat()
    old_count = _count(old_trainable_flat, numel)
    remapped = 0
    for key, value in list(state.items()):
        if not isinstance(value, CompactTensor) or value.trainable_key == param.trainable_key:
            continue
        if value.flat.numel() != old_count:
            raise ValueError(f"remap_optimizer_state_: state {key!r} holds {value.flat.numel()} values but the old "
                             f"trainable set has {old_count}; pass the trainable_flat() taken before the change")
        remapped_value = remapped_compact(value, param, old_trainable_flat, new_flat)
        # the same object (a compiled optimizer step guards its state by identity)
        if same_layout(value, remapped_value):
            value.flat.copy_(remapped_value.flat)
            value.relabel_(remapped_value)
        elif value.logical_shape == remapped_value.logical_shape and value.transposed == remapped_value.transposed:
            value.relabel_(remapped_value, remapped_value.flat)
        else:
            state[key] = remapped_value
        remapped += 1
    return remapped


def _count(trainable_flat: Optional[torch.Tensor], numel: int) -> int:
    """Size of a trainable set given as a bool mask (None: all ``numel`` coordinates)."""
    return numel if trainable_flat is None else int(trainable_flat.sum())


def remapped_compact(value: CompactTensor, param: ResuTensor, old_trainable_flat: Optional[torch.Tensor],
                     new_trainable_flat: Optional[torch.Tensor]) -> CompactTensor:
    """``value`` (a CompactTensor over ``old_trainable_flat``) as a CompactTensor of ``param``'s
    current trainable set ``new_trainable_flat``: kept coordinates keep their values, joiners 0."""
    numel = param.storage_numel
    dense = torch.zeros(numel, dtype=value.flat.dtype, device=value.flat.device)
    if old_trainable_flat is None:
        dense.copy_(value.flat)
    else:
        dense[old_trainable_flat.to(dense.device)] = value.flat
    kept = dense if new_trainable_flat is None else dense[new_trainable_flat.to(dense.device)]
    return param.compact(kept)


def remap_sharded_state_(optimizer: torch.optim.Optimizer, param, shard: ResuTensor,
                         old_trainable_flat: Optional[torch.Tensor]) -> None:
    """:func:`remap_optimizer_state_` for an FSDP2-sharded parameter: each state DTensor keeps its
    global metadata and gets its local CompactTensor remapped to ``shard``'s new trainable set
    (``old_trainable_flat``: the shard's before the change)."""
    new_flat = shard.trainable_flat()
    old_count = _count(old_trainable_flat, shard.storage_numel)
    for value in optimizer.state.get(param, {}).values():
        if is_stale_for_shard(value, shard) and value._local_tensor.flat.numel() == old_count:
            value._local_tensor = remapped_compact(value._local_tensor, shard, old_trainable_flat, new_flat)


@contextlib.contextmanager
def optimizer_state_kept(optimizer, params: list) -> Iterator[None]:
    """Inside the block the ResuTensor ``params`` may change their trainable sets; on exit the
    state that ``optimizer`` (None, one, or a list) holds for them is remapped to the new sets
    (:func:`remap_optimizer_state_`). Nothing is remapped if the block raises.

    Example::

        with optimizer_state_kept(optimizer, [w]):
            w.prune(0.8)
    """
    optimizers = [] if optimizer is None else list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    before = [(p, p.trainable_key, p.trainable_flat()) for p in params
              if isinstance(p, ResuTensor) and any(p in o.state for o in optimizers)]
    yield
    for param, key, flat in before:
        if param.trainable_key != key:
            for o in optimizers:
                remap_optimizer_state_(o, param, flat)

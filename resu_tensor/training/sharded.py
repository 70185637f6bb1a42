"""FSDP2-sharded ResuTensor weights at model level: find them, gather whole layers, write rows back.

``fully_shard`` keeps on each rank a ResuTensor of its block of storage rows (an N-D conv
weight's out-channels; a transposed (in, out) weight's columns, sharded with ``shard_placement``),
wrapped in FSDP's DTensor (core/fsdp_extension.py). Mode changes (prune, enter RESU/QRESU, commit/amnesty, subsets) are
whole-layer decisions, so the model-level functions (``rt.prune_``, ``rt.enter_resu_``,
``rt.commit_``, the ResuScheduler's phase changes) run inside :func:`full_weights`: every sharded
ResuTensor is all-gathered into its full layer on every rank, presented as the module's weight,
changed by the unchanged single-process code identically on every rank, and each rank's rows are
written back. Masks are therefore identical on every rank and equal to a single-process run's.
"""
from __future__ import annotations  # annotations name dist.ProcessGroup, absent where distributed is not built

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from resu_tensor.core.fsdp_extension import (clear_gather_buffers, fsdp_param_of, is_sharded_resu, reset_gather_layout_,
                                             rows_per_rank)
from resu_tensor.core.row_blocks import assign_state_, from_row_fields, row_attributes, row_fields, slice_rows
from resu_tensor.core.tensor import ResuTensor
from resu_tensor.method.selective import SelectiveConfig, StaticSubsetConfig
from resu_tensor.training.modules import resu_param_names
from resu_tensor.training.optimizer_state import remap_sharded_state_, reset_optimizer_state_

SELECTIVE_UNSUPPORTED_SHARDED = (
    "RESU-Selective's consistency filter (SelectiveConfig) ranks θ over the whole layer at every step; it is not "
    "implemented for FSDP2-sharded weights. Use StaticSubsetConfig(by='random'), or prepare_ddp (replicated weights)"
)


class ShardedWeight:
    """One FSDP-sharded ResuTensor parameter, the module that holds it and this rank's rows."""

    def __init__(self, module_name: str, module: Optional[nn.Module], param_name: str, param: DTensor):
        self.module_name, self.module, self.param_name, self.param = module_name, module, param_name, param
        placements = param.placements
        shard_dims = [i for i, p in enumerate(placements) if p.is_shard()]
        row_dim = 1 if param._local_tensor.transposed else 0  # the logical dim over storage rows
        if len(shard_dims) != 1 or placements[shard_dims[0]].dim != row_dim:
            raise NotImplementedError(f"sharded ResuTensor {self.fqn!r}: only FSDP's Shard({row_dim}) (its storage "
                                      f"rows) over one mesh dimension (FSDP or HSDP) is supported, got placements "
                                      f"{placements}")
        mesh_dim = shard_dims[0]
        mesh = param.device_mesh
        self.group = mesh.get_group(mesh_dim)
        self.world = mesh.size(mesh_dim)
        self.rank = mesh.get_local_rank(mesh_dim)
        self.total_rows = param.shape[row_dim]
        self.padded_rows, self.rows = rows_per_rank(self.total_rows, self.world)
        self.start = self.rank * self.padded_rows

    @property
    def fqn(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def shard(self) -> ResuTensor:
        return self.param._local_tensor


def _check_fsdp_states_sharded(model: nn.Module) -> None:
    """Refuse to work while FSDP holds a ResuTensor unsharded (its module then has the dense
    all-gathered weight, not the shard, and the weight would look absent). Reads FSDP internals;
    skipped where they differ."""
    try:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState
    except ImportError:
        return

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = getattr(module, "_get_fsdp_state", lambda: None)()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fsdp_param in getattr(group, "fsdp_params", []):
                if isinstance(getattr(fsdp_param.sharded_param, "_local_tensor", None), ResuTensor) and \
                        getattr(fsdp_param, "sharded_state", ShardedState.SHARDED) != ShardedState.SHARDED:
                    raise RuntimeError(
                        f"sharded ResuTensor {fsdp_param._param_fqn or ''}: FSDP holds it unsharded now; change modes "
                        "between optimizer steps (after backward), not between forward and backward; after a forward "
                        "without backward (evaluation) call model.reshard() first"
                    )


def sharded_weights(model: nn.Module, filter_fn=None) -> list[ShardedWeight]:
    """Every FSDP-sharded ResuTensor parameter of ``model`` that the module table
    (training/modules.py) lists for its module, of modules ``filter_fn(module, name)`` accepts; a
    tied weight once. Empty for a model FSDP does not shard.

    Example::

        from resu_tensor import fsdp as rtf
        [w.fqn for w in rtf.sharded_weights(model)]      # ["0.weight", "2.weight"]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    _check_fsdp_states_sharded(model)
    found, seen = [], set()
    for name, module in model.named_modules():
        params = [(n, module._parameters.get(n)) for n in resu_param_names(module)]
        params = [(n, p) for n, p in params if is_sharded_resu(p) and id(p) not in seen]
        if not params or (filter_fn is not None and not filter_fn(module, name)):
            continue
        for param_name, param in params:  # a tied weight once, under its first owner
            seen.add(id(param))
            found.append(ShardedWeight(name, module, param_name, param))
    return found


def full_tensor(param: DTensor) -> ResuTensor:
    """The whole ResuTensor of an FSDP-sharded parameter, identical on every rank of its shard
    group (every state field is all-gathered by rows). Collective over that group.

    Example::

        from resu_tensor import fsdp as rtf
        w = rtf.full_tensor(model[0].weight)      # on every rank
        w.mask(), w.dequantize()
    """
    if not is_sharded_resu(param):
        raise TypeError(f"full_tensor expects an FSDP-sharded ResuTensor parameter (a DTensor of a ResuTensor), "
                        f"got {type(param).__name__}")
    return _gather(ShardedWeight("", None, "weight", param))


def _gather(entry: ShardedWeight) -> ResuTensor:
    shard = entry.shard
    fields = row_fields(shard)
    gathered = {}
    for name, f in fields.items():  # same names in the same order on every rank: the mode is global
        padded = f
        if f.shape[0] < entry.padded_rows:
            padded = torch.cat([f, f.new_zeros(entry.padded_rows - f.shape[0], *f.shape[1:])])
        as_bytes = padded.contiguous().view(torch.uint8)  # any dtype travels (bf16 over gloo, too)
        parts = [torch.empty_like(as_bytes) for _ in range(entry.world)]
        dist.all_gather(parts, as_bytes, group=entry.group)
        gathered[name] = torch.cat([part[:n].view(f.dtype) for part, n in zip(parts, entry.rows)])
    return from_row_fields(type(shard), row_attributes(shard), gathered, (entry.total_rows, shard.storage_shape[1]))


def optimizers_of(optimizer) -> list:
    """``optimizer`` (None, one, or a list/tuple of them) as a list, each checked."""
    if optimizer is None:
        return []
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in optimizers:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer (or a list of them), got {type(o).__name__}")
    return optimizers


@contextlib.contextmanager
def full_weights(model: nn.Module, optimizer=None, filter_fn=None, keep_state: bool = False) -> Iterator[list[str]]:
    """Inside the block, every FSDP-sharded ResuTensor weight of ``model`` is its full layer (the
    same on every rank), registered as the module's ``weight`` (and under every other module a
    tied weight is shared with, so it stays one weight): single-process code such as
    ``w.prune(...)`` works on them unchanged. On exit each rank keeps its rows of the result;
    parameters whose trainable set changed lose their ``.grad``, and ``optimizer`` (one or a
    list) loses the state of every ResuTensor parameter of ``model`` made for an earlier
    trainable set. Collective: every rank enters it and does the same inside (the same calls,
    the same generator seeds). If the block raises, no shard changes. Do not run the model
    inside. Yields the gathered weights' names; on a model without sharded weights it gathers
    nothing. ``rt.prune_`` / ``enter_resu_`` / ``commit_`` use it themselves.

    Example::

        from resu_tensor import fsdp as rtf
        with rtf.full_weights(model, optimizer):
            for w in (model[0].weight, model[2].weight):
                w.prune(0.5)
    """
    optimizers = optimizers_of(optimizer)
    entries = sharded_weights(model, filter_fn)
    # every (module, name) that holds each parameter: a tied weight stays one weight in the block
    slots_of = {id(entry.param): [] for entry in entries}
    for module in model.modules():
        for name, param in module._parameters.items():
            if id(param) in slots_of:
                slots_of[id(param)].append((module, name))
    holders = [slots_of[id(entry.param)] for entry in entries]
    gathered = [_gather(entry) for entry in entries]
    try:
        full_params = [nn.Parameter(full, requires_grad=entry.param.requires_grad)
                       for entry, full in zip(entries, gathered)]
        del gathered  # the modules hold them now (nn.Parameter of a subclass is a new object)
        for full, slots in zip(full_params, holders):
            for module, name in slots:
                module._parameters[name] = full
        del full_params
        yield [entry.fqn for entry in entries]
        changed = []
        for entry in entries:
            full = entry.module._parameters[entry.param_name]
            if not isinstance(full, ResuTensor) or tuple(full.shape) != tuple(entry.param.shape) or \
                    full.transposed != entry.shard.transposed:
                raise TypeError(f"full_weights: {entry.fqn!r} was replaced inside the block by "
                                f"{type(full).__name__}; change the ResuTensor in place (prune, enter_resu, commit)")
            if full.selective is not None:
                raise NotImplementedError(SELECTIVE_UNSUPPORTED_SHARDED)
            rows = entry.rows[entry.rank]
            changed.append(slice_rows(full, entry.start, entry.start + rows))
    finally:
        for entry, slots in zip(entries, holders):
            for module, name in slots:
                module._parameters[name] = entry.param
    for entry, new_shard in zip(entries, changed):
        shard = entry.shard
        old_key, old_flat = shard.trainable_key, shard.trainable_flat() if optimizers else None
        assign_state_(shard, new_shard)
        reset_gather_layout_(model, entry.param)  # the all-gather inputs follow the new mode
        if shard.trainable_key != old_key:
            entry.param.grad = None
            for o in optimizers if keep_state else ():  # state of coordinates that stay trainable
                remap_sharded_state_(o, entry.param, shard, old_flat)
    for o in optimizers:  # sharded and unsharded (e.g. FSDP's ignored_params) ResuTensors alike
        reset_optimizer_state_(o, model)


def _fsdp_param_of(model: nn.Module, param: DTensor):
    """FSDP's record (``FSDPParam``) of the sharded parameter ``param`` (FSDP internals)."""
    record = fsdp_param_of(model, param)
    if record is not None:
        return record
    raise RuntimeError("to_dense_: found no FSDP record of a sharded ResuTensor parameter (is the model fully_shard-ed "
                       "by this torch version's FSDP2?)")


def replace_shards_with_plain_(model: nn.Module, entries: list[ShardedWeight], local_of) -> None:
    """Make each sharded ResuTensor of ``entries`` a plain FSDP2 parameter: the same DTensor (FSDP,
    ties and the module keep referring to it) whose local tensor becomes ``local_of(shard)``, a
    plain tensor of the shard's logical shape; FSDP then all-gathers it like any parameter. Its
    ``.grad`` is dropped (optimizer state made for the ResuTensor is stale: build a new optimizer).

    Example::

        replace_shards_with_plain_(model, sharded_weights(model), lambda t: t.dequantize())
    """
    records = [_fsdp_param_of(model, entry.param) for entry in entries]
    locals_ = [local_of(entry.shard) for entry in entries]  # all computed before any change
    for entry, record, local in zip(entries, records, locals_):
        if tuple(local.shape) != tuple(entry.shard.shape):
            raise ValueError(f"replace_shards_with_plain_: {entry.fqn!r} got a local tensor of shape "
                             f"{tuple(local.shape)} for a shard of shape {tuple(entry.shard.shape)}")
        entry.param.grad = None
        entry.param._local_tensor = local.contiguous()
        record.reset_sharded_param()  # FSDP re-pads the shard and keeps its flat data, as after load_state_dict
        clear_gather_buffers(record)  # a plain all-gather from now on


def check_gatherable_options(options: dict, probe_fn=None) -> None:
    """Refuse, before any layer is gathered, mode-change options that FSDP2-sharded weights do
    not support: RESU-Selective's consistency filter and subsets ranked by a probe backward."""
    selective = options.get("selective")
    if isinstance(selective, SelectiveConfig):
        raise NotImplementedError(SELECTIVE_UNSUPPORTED_SHARDED)
    if isinstance(selective, StaticSubsetConfig) and selective.by == "gradient" or probe_fn is not None:
        raise NotImplementedError("StaticSubsetConfig(by='gradient') runs a probe forward/backward (probe_fn) while "
                                  "the weights are gathered; not supported under FSDP2. Use by='random'")


__all__ = ["ShardedWeight", "sharded_weights", "full_tensor", "full_weights", "optimizers_of",
           "check_gatherable_options", "SELECTIVE_UNSUPPORTED_SHARDED", "slice_rows", "replace_shards_with_plain_"]

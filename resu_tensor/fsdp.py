"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with ResuTensor weights sharded by rows.

``fully_shard`` splits every ResuTensor parameter along dim 0 (ops/sharding.py): each rank keeps a
ResuTensor of its row block — values (or QRESU's codes and scales) of those rows, the mask
re-encoded from them, θ / subset / EMA slices, its own trainable set — wrapped in FSDP's DTensor.

* **Forward/backward.** ``ResuTensor.fsdp_pre_all_gather`` hands FSDP the shard's effective weight
  W_eff = M⊙W + (1−M)⊙Φ(θ) (dequantized in QRESU) in the parameter dtype; the all-gather output
  *is* the unsharded weight, a plain dense tensor, so forward and backward run dense
  ``F.linear``, exactly like a plain FSDP2 weight, and FSDP reduce-scatters a dense gradient.
* **Gradients.** A post-accumulate-grad hook (FSDP calls it right after the reduce-scatter)
  replaces the shard's dense gradient by its CompactTensor over the shard's trainable coordinates,
  so optimizer state stays compact and frozen coordinates never move (weight decay included),
  as without FSDP. Registered by the first all-gather; nothing to call.
* **Mode changes** (prune, enter RESU/QRESU, commit/amnesty, subsets) are whole-layer decisions.
  :func:`full_weights` all-gathers every sharded ResuTensor into the full layer on every rank,
  presents them as the modules' weights, runs the unchanged single-process code (``rt.prune_``,
  ``rt.commit_``, the ResuScheduler's phase changes) identically on every rank, and writes each
  rank's rows back. Masks are therefore identical on every rank and equal to a single-process
  run's; the amnesty tournament is the global one. :class:`ResuScheduler` (a subclass of
  ``rt.ResuScheduler``) does this at its phase boundaries only.

Example::

    from torch.distributed.fsdp import fully_shard
    from resu_tensor import fsdp as rtf

    quantize_(model, rt.resu_config(sparsity=0.0))      # same seed on every rank
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = rtf.ResuScheduler(model, optimizer, rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4))
    for x, y in loader:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        scheduler.step()
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_pre_hook

from resu_tensor import kernels
from resu_tensor.compact import CompactTensor
from resu_tensor.mask_encoding import EncodedMask, decode_mask, encode_mask
from resu_tensor.scheduler import ResuScheduler as _ResuScheduler
from resu_tensor.tensor import ResuTensor, _trainable_key

_HOOKED = "_resu_fsdp_grad_hook"
_EMA_NAMES = ("selective_m", "selective_v", "grad_abs_sum")


# ---------------------------------------------------------------------------------------- row blocks
def _row_fields(t: ResuTensor) -> dict[str, torch.Tensor]:
    """Every part of ``t``'s state as a tensor whose dim 0 is ``t``'s rows (storage orientation),
    so that rows [r0, r1) of each are the state of rows [r0, r1) of the weight."""
    if t.transposed:
        raise NotImplementedError("row blocks of a transposed ResuTensor view: use the weight itself")
    rows, cols = t.storage_shape
    device = t.device_of_storage
    fields: dict[str, torch.Tensor] = {}
    mask = None
    if t.mask_kind != "none":
        mask = t.storage_mask()
        fields["mask"] = mask.to(torch.uint8)
    if t.values is not None:
        fields["values"] = t.values
    if t.qdata is not None:
        fields.update(qdata=t.qdata, qscale=t.qscale, qoffset=t.qoffset)
    if t.theta is not None:
        theta = torch.zeros(rows, cols, dtype=t.theta.dtype, device=device)
        kernels.scatter_trainable_(theta, ~mask.view(-1), t.theta)
        fields["theta"] = theta
    if t.subset_kind != "none":
        fields["subset"] = decode_mask(t.encoded_subset(), t.storage_shape, device).to(torch.uint8)
    for name in _EMA_NAMES:
        vector = getattr(t, name)
        if vector is not None:
            fields[name] = t.expand_trainable(vector)  # zero outside the trainable set
    return fields


def _attributes(t: ResuTensor) -> dict:
    """The Python attributes a row block shares with its weight."""
    names = ("compute_dtype", "mode_name", "trainable_side", "target_sparsity", "quant_bits", "group_size",
             "selective", "nm")
    return {name: getattr(t, name) for name in names}


def _from_row_fields(attributes: dict, fields: dict[str, torch.Tensor], shape: tuple[int, int]) -> ResuTensor:
    """The ResuTensor of ``shape`` whose state is ``fields`` (see :func:`_row_fields`)."""
    rows, cols = shape
    mask = fields["mask"].bool() if "mask" in fields else None
    encoded = encode_mask(mask) if mask is not None else EncodedMask("none")
    subset = encode_mask(fields["subset"].bool()) if "subset" in fields else EncodedMask("none")
    side = attributes["trainable_side"]
    tensors = {name: fields[name].contiguous() for name in ("values", "qdata", "qscale", "qoffset") if name in fields}
    if "theta" in fields:
        tensors["theta"] = kernels.gather_trainable(fields["theta"].contiguous(), ~mask.reshape(-1))
    n_active = rows * cols if mask is None else int(mask.sum())
    t = ResuTensor(
        (rows, cols), attributes["compute_dtype"], attributes["mode_name"], encoded.kind, side, n_active,
        attributes["target_sparsity"], _trainable_key(side, encoded, subset, (rows, cols)),
        mask_bitmap=encoded.bitmap, mask_block_prefix=encoded.block_prefix, mask_indices=encoded.indices,
        subset_kind=subset.kind, subset_bitmap=subset.bitmap, subset_block_prefix=subset.block_prefix,
        subset_indices=subset.indices, quant_bits=attributes["quant_bits"], group_size=attributes["group_size"],
        selective=attributes["selective"], nm=attributes["nm"], **tensors,
    )
    present = [name for name in _EMA_NAMES if name in fields]
    if present:
        trainable = t.trainable_flat()
        for name in present:
            dense = fields[name].contiguous()
            flat = dense.reshape(-1).clone() if trainable is None else kernels.gather_trainable(dense, trainable)
            setattr(t, name, flat)
    return t


def slice_rows(t: ResuTensor, start: int, end: int, share: bool = False) -> ResuTensor:
    """Rows [start, end) of ``t`` as a ResuTensor of their own: the mask (and subset) re-encoded
    from those rows, the θ, EMA and Σ|g| entries of those rows (contiguous: they are row-major),
    its own trainable set. With ``share`` the data (values, codes, scales, θ, EMAs) are views of
    ``t``'s, so in-place updates of the block's trainable coordinates reach ``t`` (``w[a:b]``,
    ``torch.chunk``); otherwise they are copies.

    Example::

        top = slice_rows(w, 0, w.shape[0] // 2)
        torch.equal(top.mask(), w.mask()[: w.shape[0] // 2])   # True
    """
    if t.transposed:
        raise NotImplementedError("row blocks of a transposed ResuTensor view: use the weight itself")
    rows, cols = t.storage_shape
    if not 0 <= start < end <= rows:
        raise ValueError(f"slice_rows: rows [{start}, {end}) are not a non-empty range of the weight's {rows} rows")
    take = (lambda x: x) if share else (lambda x: x.clone())
    lo, hi = start * cols, end * cols
    device = t.device_of_storage

    def flat_range(selected: Optional[torch.Tensor]) -> tuple[int, int]:
        """Where rows [start, end) begin and end in a vector over ``selected`` (row-major)."""
        if selected is None:
            return lo, hi
        first = int(selected[:lo].sum())
        return first, first + int(selected[lo:hi].sum())

    mask = t.storage_mask().reshape(-1) if t.mask_kind != "none" else None
    encoded = encode_mask(mask[lo:hi].view(end - start, cols)) if mask is not None else EncodedMask("none")
    subset = EncodedMask("none")
    if t.subset_kind != "none":
        subset = encode_mask(decode_mask(t.encoded_subset(), t.storage_shape, device)[start:end])
    tensors = {name: take(getattr(t, name)[start:end]) for name in ("values", "qdata", "qscale", "qoffset")
               if getattr(t, name) is not None}
    if t.theta is not None:
        p0, p1 = flat_range(~mask)
        tensors["theta"] = take(t.theta[p0:p1])
    if any(getattr(t, name) is not None for name in _EMA_NAMES):
        k0, k1 = flat_range(t.trainable_flat())
        tensors.update({name: take(getattr(t, name)[k0:k1]) for name in _EMA_NAMES if getattr(t, name) is not None})
    side, shape = t.trainable_side, (end - start, cols)
    attributes = _attributes(t)
    return ResuTensor(
        shape, attributes.pop("compute_dtype"), attributes.pop("mode_name"), encoded.kind, side,
        shape[0] * cols if mask is None else int(mask[lo:hi].sum()), attributes.pop("target_sparsity"),
        _trainable_key(side, encoded, subset, shape),
        mask_bitmap=encoded.bitmap, mask_block_prefix=encoded.block_prefix, mask_indices=encoded.indices,
        subset_kind=subset.kind, subset_bitmap=subset.bitmap, subset_block_prefix=subset.block_prefix,
        subset_indices=subset.indices, **{k: v for k, v in attributes.items() if k != "trainable_side"}, **tensors,
    )


def assign_state_(dest: ResuTensor, src: ResuTensor) -> None:
    """Give ``dest`` (same Python object: a DTensor, Parameter and optimizer keep referring to it)
    ``src``'s whole state, without copying."""
    for name, value in src.fields().items():
        setattr(dest, name, value)


def write_rows_into_zero_base_(base: ResuTensor, rows: ResuTensor, start: int, end: int) -> None:
    """FSDP2's padded shard (``new_zeros`` then ``narrow(0, 0, L).copy_(shard)``): ``base`` takes
    ``rows``' mode, with their state at rows [start, end) and zero rows elsewhere. The zero rows are
    active and zero, i.e. frozen in RESU/QRESU; FSDP only keeps rows [0, L) of this tensor."""
    n_rows, cols = base.storage_shape
    fields = {}
    for name, f in _row_fields(rows).items():
        fill = 1 if name in ("mask", "qscale") else 0
        full = torch.full((n_rows, *f.shape[1:]), fill, dtype=f.dtype, device=f.device)
        full[start:end] = f
        fields[name] = full
    assign_state_(base, _from_row_fields(_attributes(rows), fields, (n_rows, cols)))


# ---------------------------------------------------------------------------------------- all-gather
def _rows_per_rank(total_rows: int, world: int) -> tuple[int, list[int]]:
    """torch.chunk's split of ``total_rows`` over ``world`` ranks: (padded rows, rows of each rank)."""
    padded = -(-total_rows // world)
    return padded, [max(0, min(padded, total_rows - r * padded)) for r in range(world)]


def fsdp_pre_all_gather(t: ResuTensor, mesh, outer_size, outer_stride, module, mp_policy):
    """The shard's effective weight in the parameter dtype, padded to FSDP's padded shard rows."""
    if t.transposed:
        raise NotImplementedError("FSDP2 shards the weight itself, not a transposed ResuTensor view")
    _register_grad_hook(t, module)
    weight = t.storage_weight()
    dtype = getattr(mp_policy, "param_dtype", None) or t.compute_dtype
    weight = weight.to(dtype)
    padded, _ = _rows_per_rank(outer_size[0], mesh.size())
    if weight.shape[0] < padded:
        weight = torch.cat([weight, weight.new_zeros(padded - weight.shape[0], weight.shape[1])])
    return (weight.contiguous(),), None


def fsdp_post_all_gather(t: ResuTensor, all_gather_outputs, metadata, param_dtype, *, out=None):
    """The all-gather output is the unsharded dense W_eff (FSDP cuts the padding rows off)."""
    (weight,) = all_gather_outputs
    if out is not None:
        # Later iterations: FSDP re-allocated the all-gather output that `out` is a view of.
        return None
    return weight, ()


# ---------------------------------------------------------------------------------------- gradients
def _is_sharded_resu(p) -> bool:
    return isinstance(p, DTensor) and isinstance(p._local_tensor, ResuTensor)


def _compact_grad_(param: torch.Tensor) -> None:
    """Replace a sharded ResuTensor parameter's dense gradient shard by its CompactTensor."""
    grad = param.grad
    if grad is None or not isinstance(grad, DTensor):
        return
    local_grad, shard = grad._local_tensor, param._local_tensor
    if isinstance(local_grad, CompactTensor):
        return
    if tuple(local_grad.shape) != tuple(shard.shape):
        raise ValueError(f"FSDP gradient shard of shape {tuple(local_grad.shape)} does not match the ResuTensor "
                         f"shard {tuple(shard.shape)}")
    flat = shard.gather_trainable(local_grad.contiguous())
    _keep_until_done(local_grad)
    grad._local_tensor = shard.compact(flat.to(shard.dtype))


def _keep_until_done(t: torch.Tensor) -> None:
    """``t`` was made on another CUDA stream than the one reading it now (FSDP runs this hook on
    its post-reduce stream; the grads of a second synced backward come from the default stream)
    and is dropped right after: without ``record_stream`` the caching allocator may hand its
    memory to the other stream while this read is still queued."""
    if t.is_cuda:
        t.record_stream(torch.cuda.current_stream(t.device))


def _densify_grad_(sharded_param: torch.Tensor) -> None:
    """Before FSDP adds a new gradient shard to an existing one (several synced backward passes
    without zero_grad), turn the existing compact gradient back into its dense shard: FSDP adds
    with ``grad._local_tensor += dense``. :func:`_compact_grad_` compacts the sum again."""
    grad = sharded_param.grad
    if isinstance(grad, DTensor) and isinstance(grad._local_tensor, CompactTensor):
        shard = sharded_param._local_tensor
        if grad._local_tensor.trainable_key == shard.trainable_key:
            compact = grad._local_tensor
            grad._local_tensor = shard.expand_trainable(compact)
            _keep_until_done(compact.flat)


def _register_grad_hook(t: ResuTensor, module) -> None:
    """Once per sharded parameter: compact its gradient after each reduce-scatter, and (through
    the unsharded weight FSDP registers on the module during forward) densify it before the next."""
    if module is None:
        return
    # Every sharded ResuTensor of the module, not only the one whose local tensor is ``t``: with
    # CPU offload FSDP hands this method a device copy of the shard.
    for name, param in module._parameters.items():
        if _is_sharded_resu(param) and not hasattr(param, _HOOKED):
            sharded = weakref.ref(param)

            def densify(_unsharded, sharded=sharded) -> None:
                if sharded() is not None:
                    _densify_grad_(sharded())

            def before_forward(module, args, name=name, densify=densify):
                unsharded = module._parameters.get(name)
                if isinstance(unsharded, torch.Tensor) and not isinstance(unsharded, DTensor) and \
                        unsharded.requires_grad and not hasattr(unsharded, _HOOKED):
                    setattr(unsharded, _HOOKED, unsharded.register_post_accumulate_grad_hook(densify))

            setattr(param, _HOOKED, (param.register_post_accumulate_grad_hook(_compact_grad_),
                                     module.register_forward_pre_hook(before_forward)))


def _before_optimizer_step(optimizer, args, kwargs) -> None:
    """For sharded ResuTensor parameters, what ``resu_tensor.selective`` and ``model_api`` do for
    plain ones: refuse stale optimizer state, compact a gradient FSDP's hook did not see, and
    accumulate Σ|g| for gradient-scored commits."""
    for group in optimizer.param_groups:
        for param in group["params"]:
            if not _is_sharded_resu(param):
                continue
            shard = param._local_tensor
            for value in optimizer.state.get(param, {}).values():
                local = value._local_tensor if isinstance(value, DTensor) else value
                if isinstance(local, CompactTensor) and local.trainable_key != shard.trainable_key:
                    raise ValueError(
                        f"{type(optimizer).__name__}.step(): the optimizer state of a sharded ResuTensor was created "
                        "for an earlier trainable set. Change modes through rtf.full_weights(model, optimizer) / "
                        "rtf.ResuScheduler, or call rtf.reset_optimizer_state_(optimizer, model)"
                    )
            if param.grad is None:
                continue
            _compact_grad_(param)
            local_grad = getattr(param.grad, "_local_tensor", None)
            if not isinstance(local_grad, CompactTensor) or local_grad.trainable_key != shard.trainable_key:
                continue
            if shard.selective is not None:
                raise NotImplementedError(_SELECTIVE_UNSUPPORTED)
            if shard.grad_abs_sum is not None:
                shard.grad_abs_sum.add_(local_grad.flat.abs().float())


register_optimizer_step_pre_hook(_before_optimizer_step)

_SELECTIVE_UNSUPPORTED = (
    "RESU-Selective's consistency filter (SelectiveConfig) ranks θ over the whole layer at every step; it is not "
    "implemented for FSDP2-sharded weights. Use StaticSubsetConfig(by='random'), or prepare_ddp (replicated weights)"
)


# ---------------------------------------------------------------------------------------- model level
class _ShardedWeight:
    """One FSDP-sharded ResuTensor parameter and where it lives."""

    def __init__(self, module_name: str, module: nn.Module, param_name: str, param: DTensor):
        self.module_name, self.module, self.param_name, self.param = module_name, module, param_name, param
        placements = param.placements
        shard_dims = [i for i, p in enumerate(placements) if p.is_shard()]
        if len(shard_dims) != 1 or placements[shard_dims[0]].dim != 0:
            raise NotImplementedError(f"sharded ResuTensor {self.fqn!r}: only FSDP's Shard(0) over one mesh dimension "
                                      f"(FSDP or HSDP) is supported, got placements {placements}")
        self.mesh_dim = shard_dims[0]
        mesh = param.device_mesh
        self.group = mesh.get_group(self.mesh_dim)
        self.world = mesh.size(self.mesh_dim)
        self.rank = mesh.get_local_rank(self.mesh_dim)
        self.padded_rows, self.rows = _rows_per_rank(param.shape[0], self.world)
        self.start = self.rank * self.padded_rows

    @property
    def fqn(self) -> str:
        return f"{self.module_name}.{self.param_name}" if self.module_name else self.param_name

    @property
    def shard(self) -> ResuTensor:
        return self.param._local_tensor


def _fsdp_states_sharded(model: nn.Module) -> None:
    """Refuse to gather while FSDP holds a ResuTensor unsharded (its module then has the dense
    all-gathered weight, not the shard). Uses FSDP internals; skipped where they differ."""
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
                        "between optimizer steps (after backward), not between forward and backward"
                    )


def sharded_weights(model: nn.Module, filter_fn=None) -> list[_ShardedWeight]:
    """Every FSDP-sharded ResuTensor weight of ``model`` (modules whose ``weight`` is one and that
    ``filter_fn(module, name)`` accepts)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    _fsdp_states_sharded(model)
    found = []
    for name, module in model.named_modules():
        param = module._parameters.get("weight")
        if _is_sharded_resu(param) and (filter_fn is None or filter_fn(module, name)):
            found.append(_ShardedWeight(name, module, "weight", param))
    return found


def full_tensor(param: DTensor) -> ResuTensor:
    """The whole ResuTensor of an FSDP-sharded parameter, identical on every rank of its shard
    group (every state field is all-gathered by rows). Collective over that group.

    Example::

        w = rtf.full_tensor(model[0].weight)      # on every rank
        w.mask(), w.dequantize()
    """
    if not _is_sharded_resu(param):
        raise TypeError(f"full_tensor expects an FSDP-sharded ResuTensor parameter (a DTensor of a ResuTensor), "
                        f"got {type(param).__name__}")
    return _gather(_ShardedWeight("", None, "weight", param))


def _gather(entry: _ShardedWeight) -> ResuTensor:
    shard = entry.shard
    fields = _row_fields(shard)
    gathered = {}
    for name, f in fields.items():  # same names in the same order on every rank: the mode is global
        padded = f
        if f.shape[0] < entry.padded_rows:
            padded = torch.cat([f, f.new_zeros(entry.padded_rows - f.shape[0], *f.shape[1:])])
        as_bytes = padded.contiguous().view(torch.uint8)  # any dtype travels (bf16 over gloo, too)
        parts = [torch.empty_like(as_bytes) for _ in range(entry.world)]
        dist.all_gather(parts, as_bytes, group=entry.group)
        gathered[name] = torch.cat([part[:n].view(f.dtype) for part, n in zip(parts, entry.rows)])
    return _from_row_fields(_attributes(shard), gathered, tuple(entry.param.shape))


def _drop_optimizer_state(optimizers, param) -> None:
    for optimizer in optimizers:
        optimizer.state.pop(param, None)


def _as_list(optimizer) -> list:
    if optimizer is None:
        return []
    optimizers = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    for o in optimizers:
        if not isinstance(o, torch.optim.Optimizer):
            raise TypeError(f"expected a torch.optim.Optimizer (or a list of them), got {type(o).__name__}")
    return optimizers


@contextlib.contextmanager
def full_weights(model: nn.Module, optimizer=None, filter_fn=None) -> Iterator[list[str]]:
    """Inside the block, every FSDP-sharded ResuTensor weight of ``model`` is its full layer (the
    same on every rank), registered as the module's ``weight``: ``rt.prune_``, ``rt.enter_resu_``,
    ``rt.commit_``, ``w.prune(...)``, ... work on them unchanged. On exit each rank keeps its rows
    of the result; parameters whose trainable set changed lose their ``.grad`` and their state in
    ``optimizer`` (one or a list). Collective: every rank enters it and does the same inside (the
    same calls, the same generator seeds). If the block raises, no shard changes. Do not run the
    model inside. Yields the weights' names.

    Example::

        with rtf.full_weights(model, optimizer):
            rt.prune_(model, 0.5)
            rt.enter_resu_(model, generator=torch.Generator().manual_seed(0))
    """
    optimizers = _as_list(optimizer)
    entries = sharded_weights(model, filter_fn)
    gathered = [_gather(entry) for entry in entries]
    try:
        for entry, full in zip(entries, gathered):
            entry.module._parameters[entry.param_name] = nn.Parameter(full, requires_grad=entry.param.requires_grad)
        del gathered  # the modules hold them now (nn.Parameter of a subclass is a new object)
        yield [entry.fqn for entry in entries]
        changed = []
        for entry in entries:
            full = entry.module._parameters[entry.param_name]
            if not isinstance(full, ResuTensor) or tuple(full.shape) != tuple(entry.param.shape) or full.transposed:
                raise TypeError(f"full_weights: {entry.fqn!r} was replaced inside the block by "
                                f"{type(full).__name__}; change the ResuTensor in place (prune, enter_resu, commit)")
            if full.selective is not None:
                raise NotImplementedError(_SELECTIVE_UNSUPPORTED)
            rows = entry.rows[entry.rank]
            changed.append(slice_rows(full, entry.start, entry.start + rows))
    finally:
        for entry in entries:
            entry.module._parameters[entry.param_name] = entry.param
    for entry, new_shard in zip(entries, changed):
        shard = entry.shard
        old_key = shard.trainable_key
        assign_state_(shard, new_shard)
        if shard.trainable_key != old_key:
            entry.param.grad = None
            _drop_optimizer_state(optimizers, entry.param)
    if optimizers:
        from resu_tensor.model_api import reset_optimizer_state_ as reset_plain

        for o in optimizers:  # unsharded ResuTensors of the model (e.g. FSDP's ignored_params) changed too
            reset_plain(o, model)


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None) -> int:
    """Drop the optimizer state of every sharded ResuTensor parameter (of ``model``, if given) whose
    state belongs to another trainable set than its shard's. Returns how many (on this rank).

    Example::

        rtf.reset_optimizer_state_(optimizer, model)
    """
    from resu_tensor.model_api import reset_optimizer_state_ as reset_plain

    allowed = None if model is None else {id(p) for _, p in model.named_parameters()}
    dropped = 0
    for param, state in list(optimizer.state.items()):
        if not _is_sharded_resu(param) or (allowed is not None and id(param) not in allowed):
            continue
        for value in state.values():
            local = value._local_tensor if isinstance(value, DTensor) else value
            if isinstance(local, CompactTensor) and local.trainable_key != param._local_tensor.trainable_key:
                del optimizer.state[param]
                dropped += 1
                break
    return dropped + reset_plain(optimizer, model)


def _check_no_probe(options: dict) -> None:
    from resu_tensor.selective import SelectiveConfig, StaticSubsetConfig

    selective = options.get("selective")
    if isinstance(selective, SelectiveConfig):
        raise NotImplementedError(_SELECTIVE_UNSUPPORTED)
    if isinstance(selective, StaticSubsetConfig) and selective.by == "gradient":
        raise NotImplementedError("StaticSubsetConfig(by='gradient') runs a probe forward/backward while the weights "
                                  "are gathered; not supported under FSDP2. Use by='random'")


def prune_(model: nn.Module, sparsity: Optional[float] = None, method: str = "magnitude", filter_fn=None,
           generator: Optional[torch.Generator] = None, *, optimizer=None, calibration=None, **options) -> nn.Module:
    """``rt.prune_`` on FSDP-sharded weights (global decisions on the gathered layers, see
    :func:`full_weights`). Wanda needs ``calibration`` as the dict of :func:`calibrate`. Collective.

    Example::

        rtf.prune_(model, 0.5, optimizer=optimizer)
    """
    from resu_tensor.model_api import prune_ as prune_plain

    if calibration is not None and not isinstance(calibration, dict):
        raise TypeError("under FSDP2 pass Wanda calibration as the dict of rtf.calibrate(model, batches)")
    with full_weights(model, optimizer, filter_fn):
        prune_plain(model, sparsity, method, filter_fn, generator, calibration=calibration, **options)
    return model


def enter_resu_(model: nn.Module, epsilon: float = 0.1, freeze_active: bool = True, filter_fn=None,
                generator: Optional[torch.Generator] = None, *, optimizer=None, **options) -> nn.Module:
    """``rt.enter_resu_`` on FSDP-sharded weights (θ drawn for the whole layer from ``generator``,
    identical on every rank). Collective.

    Example::

        rtf.enter_resu_(model, epsilon=0.1, quantize_bits=4, optimizer=optimizer,
                        generator=torch.Generator().manual_seed(0))
    """
    from resu_tensor.model_api import enter_resu_ as enter_plain

    if options.get("probe_fn") is not None:
        raise NotImplementedError("probe_fn runs the model while the weights are gathered: not supported under FSDP2")
    _check_no_probe(options)
    with full_weights(model, optimizer, filter_fn):
        enter_plain(model, epsilon, freeze_active, filter_fn, generator, **options)
    return model


def commit_(model: nn.Module, strategy: str = "simple", filter_fn=None, *, optimizer=None, calibration=None,
            **options) -> dict:
    """``rt.commit_`` on FSDP-sharded weights: the amnesty tournament over the whole layer, identical on
    every rank and to a single-process run. Returns {layer: AmnestyStats}. Collective.

    Example::

        stats = rtf.commit_(model, "amnesty", cycle=0, num_cycles=4, optimizer=optimizer)
    """
    from resu_tensor.model_api import commit_ as commit_plain

    if calibration is not None and not isinstance(calibration, dict):
        raise TypeError("under FSDP2 pass Wanda calibration as the dict of rtf.calibrate(model, batches)")
    with full_weights(model, optimizer, filter_fn):
        return commit_plain(model, strategy, filter_fn, calibration=calibration, **options)


def calibrate(model: nn.Module, batches, filter_fn=None) -> dict[str, torch.Tensor]:
    """Wanda input norms {module name: ‖X_j‖₂} of every FSDP-sharded ResuTensor layer over every
    rank's ``batches`` (identical on every rank): run the model (through FSDP) on this rank's
    batches under ``no_grad``, then all-reduce Σx². Collective (the default process group).

    Example::

        norms = rtf.calibrate(model, my_batches)
        rtf.prune_(model, 0.5, method="wanda", calibration=norms)
    """
    from resu_tensor.calibration import _run_batch
    from resu_tensor.distributed import all_reduce_input_norms

    entries = sharded_weights(model, filter_fn)
    sums: dict[str, torch.Tensor] = {}

    def make_hook(name: str, in_features: int):
        def accumulate(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            squares = x.detach().reshape(-1, in_features).float().pow(2).sum(0)
            sums[name] = sums[name] + squares if name in sums else squares
        return accumulate

    handles = [e.module.register_forward_pre_hook(make_hook(e.module_name, e.param.shape[1]), with_kwargs=True)
               for e in entries]
    training = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                _run_batch(model, batch)
    finally:
        for handle in handles:
            handle.remove()
        for m, flag in training.items():
            m.training = flag
    return all_reduce_input_norms({name: s.sqrt() for name, s in sums.items()})


class ResuScheduler(_ResuScheduler):
    """``rt.ResuScheduler`` for a model whose ResuTensor weights FSDP2 shards: the same schedule, with
    every phase change (prune, enter RESU, commit, subset refresh) run on the gathered layers by
    :func:`full_weights` — masks identical on every rank and to a single-process run. Call
    :meth:`step` on every rank after every optimizer step. Wanda needs ``calibration`` as the
    dict of :func:`calibrate`; RESU-Selective's consistency filter and gradient-probed subsets are
    not supported.

    Example::

        scheduler = rtf.ResuScheduler(model, optimizer, rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4))
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config, calibration=None, filter_fn=None):
        _check_no_probe({"selective": getattr(config, "selective", None)})
        if calibration is not None and not isinstance(calibration, dict):
            raise TypeError("under FSDP2 pass Wanda calibration as the dict of rtf.calibrate(model, batches)")
        if not sharded_weights(model, filter_fn):
            raise ValueError("the model has no FSDP-sharded ResuTensor weights: quantize_(model, rt.resu_config(...)) "
                             "then fully_shard(...) (or use rt.ResuScheduler for an unsharded model)")
        with _presenting_shards(model, filter_fn):  # the base class checks that ResuTensor weights exist
            super().__init__(model, optimizer, config, calibration, filter_fn)

    @contextlib.contextmanager
    def _gathered(self):
        with full_weights(self.model, self.optimizer, self.filter_fn):
            yield

    def _prune(self, cycle: int) -> None:
        with self._gathered():
            super()._prune(cycle)

    def _enter_resu(self) -> None:
        with self._gathered():
            super()._enter_resu()

    def _commit(self, cycle: int) -> None:
        with self._gathered():
            super()._commit(cycle)

    def _maybe_refresh_subset(self) -> None:
        every = getattr(self.config.selective, "refresh_every", None)
        if not every or self.phase != "resu":
            return
        in_resu = self.global_step % self.config.steps_per_cycle - self.config.train_steps - self.config.stabilize_steps
        if in_resu > 0 and in_resu % every == 0:
            with self._gathered():
                super()._maybe_refresh_subset()


@contextlib.contextmanager
def _presenting_shards(model: nn.Module, filter_fn=None):
    """The local shards as the modules' weights (no communication), for code that only looks."""
    entries = sharded_weights(model, filter_fn)
    for entry in entries:
        entry.module._parameters[entry.param_name] = nn.Parameter(entry.shard, requires_grad=False)
    try:
        yield
    finally:
        for entry in entries:
            entry.module._parameters[entry.param_name] = entry.param


__all__ = ["full_weights", "full_tensor", "sharded_weights", "prune_", "enter_resu_", "commit_", "calibrate",
           "reset_optimizer_state_", "ResuScheduler", "slice_rows"]

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
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.fsdp_extension import is_sharded_resu, rows_per_rank
from resu_tensor.core.row_blocks import assign_state_, from_row_fields, row_attributes, row_fields, slice_rows
from resu_tensor.core.tensor import ResuTensor
from resu_tensor.method.selective import SelectiveConfig, StaticSubsetConfig
from resu_tensor.parallel.ddp import all_reduce_input_norms
from resu_tensor.training.calibration import run_batch
from resu_tensor.training.lifecycle import commit_ as commit_plain, enter_resu_ as enter_plain, prune_ as prune_plain
from resu_tensor.training.optimizer_hook import SELECTIVE_UNSUPPORTED_SHARDED
from resu_tensor.training.optimizer_state import reset_optimizer_state_ as reset_plain
from resu_tensor.training.scheduler import ResuScheduler as _ResuScheduler

_EMA_NAMES = ("selective_m", "selective_v", "grad_abs_sum")


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
        self.padded_rows, self.rows = rows_per_rank(param.shape[0], self.world)
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
        if is_sharded_resu(param) and (filter_fn is None or filter_fn(module, name)):
            found.append(_ShardedWeight(name, module, "weight", param))
    return found


def full_tensor(param: DTensor) -> ResuTensor:
    """The whole ResuTensor of an FSDP-sharded parameter, identical on every rank of its shard
    group (every state field is all-gathered by rows). Collective over that group.

    Example::

        w = rtf.full_tensor(model[0].weight)      # on every rank
        w.mask(), w.dequantize()
    """
    if not is_sharded_resu(param):
        raise TypeError(f"full_tensor expects an FSDP-sharded ResuTensor parameter (a DTensor of a ResuTensor), "
                        f"got {type(param).__name__}")
    return _gather(_ShardedWeight("", None, "weight", param))


def _gather(entry: _ShardedWeight) -> ResuTensor:
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
    return from_row_fields(type(shard), row_attributes(shard), gathered, tuple(entry.param.shape))


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
                raise NotImplementedError(SELECTIVE_UNSUPPORTED_SHARDED)
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

        for o in optimizers:  # unsharded ResuTensors of the model (e.g. FSDP's ignored_params) changed too
            reset_plain(o, model)


def reset_optimizer_state_(optimizer: torch.optim.Optimizer, model: Optional[nn.Module] = None) -> int:
    """Drop the optimizer state of every sharded ResuTensor parameter (of ``model``, if given) whose
    state belongs to another trainable set than its shard's. Returns how many (on this rank).

    Example::

        rtf.reset_optimizer_state_(optimizer, model)
    """

    allowed = None if model is None else {id(p) for _, p in model.named_parameters()}
    dropped = 0
    for param, state in list(optimizer.state.items()):
        if not is_sharded_resu(param) or (allowed is not None and id(param) not in allowed):
            continue
        for value in state.values():
            local = value._local_tensor if isinstance(value, DTensor) else value
            if isinstance(local, CompactTensor) and local.trainable_key != param._local_tensor.trainable_key:
                del optimizer.state[param]
                dropped += 1
                break
    return dropped + reset_plain(optimizer, model)


def _check_no_probe(options: dict) -> None:

    selective = options.get("selective")
    if isinstance(selective, SelectiveConfig):
        raise NotImplementedError(SELECTIVE_UNSUPPORTED_SHARDED)
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
                run_batch(model, batch)
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

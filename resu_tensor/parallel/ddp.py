"""Data-parallel training with ResuTensor weights: DistributedDataParallel, replica checks and
Wanda calibration over every rank's batches (docs/distributed.md).

Plain ``DistributedDataParallel`` cannot take ResuTensor parameters: they have no storage of their
own (DDP's start-up broadcast fails on ``aten.view``) and their gradients are CompactTensors whose
length is the trainable set's, which changes with the mode (the reducer's copy into its dense
buckets fails on ``aten.mul.out``). :func:`prepare_ddp` therefore marks them as parameters DDP
ignores and syncs them itself:

* at preparation, rank ``src``'s full state of every ResuTensor (mode, mask, values, θ, quantized
  W_A, selective EMAs, ...) is broadcast to the other ranks;
* after every backward that DDP syncs, each ResuTensor's compact gradient (its trainable
  coordinates only: sparse training all-reduces (1 − s)·numel values, not numel) is averaged over
  the ranks by an asynchronous all-reduce on a process group of its own, launched in one fixed
  order on every rank as soon as the gradients before it in that order are accumulated, and
  waited for at the end of backward (``overlap=False``: all at the end of backward, bucketed, on
  DDP's group). Backward passes under ``ddp.no_sync()`` (gradient accumulation) only accumulate.

Example::

    dist.init_process_group("nccl")                       # torchrun --nproc_per_node=2 train.py
    quantize_(model, rt.resu_config(sparsity=0.5))
    rt.distributed.prepare_ddp(model)                     # before wrapping
    ddp = DistributedDataParallel(model, device_ids=[local_rank])
    scheduler = rt.ResuScheduler(model, optimizer, config)  # same config and seed on every rank
"""
from __future__ import annotations  # annotations name dist.ProcessGroup, absent where distributed is not built

import contextlib
import hashlib
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resu_tensor.training.calibration import all_reduce_input_norms, calibrate as _calibrate
from resu_tensor.training.sharded import sharded_weights
from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.tensor import ResuTensor

_SYNC_ATTRIBUTE = "_resu_grad_sync"


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("resu_tensor.distributed needs an initialized default process group: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets the environment)")


def _check_module(model, action: str) -> None:
    if isinstance(model, DistributedDataParallel):
        raise TypeError(f"{action} takes the model itself, not its DistributedDataParallel wrapper: "
                        "call it before wrapping (or pass ddp.module)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{action}: expected an nn.Module, got {type(model).__name__}")


def resu_parameters(model: nn.Module) -> list[tuple[str, ResuTensor]]:
    """(fully qualified name, parameter) of every ResuTensor parameter, in ``named_parameters`` order."""
    return [(name, p) for name, p in model.named_parameters() if isinstance(p, ResuTensor)]


# ---------------------------------------------------------------------------------------- broadcast
def _tensor_fields(tensor: ResuTensor) -> dict:
    return {n: v for n, v in tensor.fields().items() if isinstance(v, torch.Tensor)}


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def broadcast_resu_state_(model: nn.Module, src: int = 0, group: Optional[dist.ProcessGroup] = None) -> int:
    """Give every ResuTensor parameter of ``model`` rank ``src``'s full state (mode, mask, values,
    θ, quantized W_A, subset, selective EMAs, ...), in place (Parameter objects are kept; a rank
    whose trainable set changes drops that parameter's ``.grad``). Collective: every rank of
    ``group`` calls it. Returns the number of ResuTensor parameters.

    Example::

        rt.distributed.broadcast_resu_state_(model)   # e.g. after loading a checkpoint on rank 0
    """
    _require_process_group()
    params = resu_parameters(model)
    layout = [(name, tuple(p.shape)) for name, p in params]
    layouts = [None] * dist.get_world_size(group)
    dist.all_gather_object(layouts, layout, group=group)
    if any(other != layouts[0] for other in layouts):
        raise ValueError(f"broadcast_resu_state_: the ranks hold different ResuTensor parameters: {layouts}")
    is_src = dist.get_rank() == src
    header = [None]
    if is_src:
        header = [[({n: v for n, v in p.fields().items() if not isinstance(v, torch.Tensor)},
                    [(n, tuple(t.shape), t.dtype) for n, t in _tensor_fields(p).items()]) for _, p in params]]
    dist.broadcast_object_list(header, src=src, group=group)
    for (name, param), (attributes, tensor_specs) in zip(params, header[0]):
        device = param.device_of_storage
        if is_src:
            payload = torch.cat([_as_bytes(t) for t in _tensor_fields(param).values()])
        else:
            n_bytes = sum(torch.Size(shape).numel() * dtype.itemsize for _, shape, dtype in tensor_specs)
            payload = torch.empty(n_bytes, dtype=torch.uint8, device=device)
        dist.broadcast(payload, src=src, group=group)
        if is_src:
            continue
        tensors, offset = {}, 0
        for field, shape, dtype in tensor_specs:
            n_bytes = torch.Size(shape).numel() * dtype.itemsize
            tensors[field] = payload[offset:offset + n_bytes].clone().view(dtype).reshape(shape)  # aligned copy
            offset += n_bytes
        received = ResuTensor.from_fields({**attributes, **tensors}, where=f"broadcast_resu_state_: {name}")
        with torch.no_grad():
            param.copy_(received)  # whole-state copy (ops/layout.py)
    return len(params)


# ------------------------------------------------------------------------------------ gradient sync
def _ranks(group: Optional[dist.ProcessGroup]) -> list:
    return list(range(dist.get_world_size())) if group is None else dist.get_process_group_ranks(group)


def _check_sync_group(group: Optional[dist.ProcessGroup], sync_group: Optional[dist.ProcessGroup]) -> None:
    if sync_group is None:
        return
    if sync_group is (group if group is not None else dist.group.WORLD) or sorted(_ranks(sync_group)) != sorted(_ranks(group)):
        raise ValueError(f"sync_group must be a process group of its own over the ranks {_ranks(group)} of group "
                         f"(DDP's), got one over {_ranks(sync_group)}")


class ResuGradSync:
    """Averages the compact gradients of a model's ResuTensor parameters over a process group
    after each backward that its DistributedDataParallel wrapper syncs. Made by :func:`prepare_ddp`;
    ``remove()`` takes its hooks off.

    Whether a backward syncs is decided, as DDP decides for its own parameters, at the forward:
    a grad-enabled forward through ``DistributedDataParallel`` syncs unless it runs under
    ``ddp.no_sync()``; a forward of the bare model syncs only with ``sync_outside_ddp=True`` (for
    models without any parameter left for DDP itself, which refuses to wrap them, or next to
    FSDP2: ``fully_shard(model, ignored_params=...)``); :meth:`no_sync` suspends it for either.

    Every synced backward all-reduces every ResuTensor parameter that requires grad, in one fixed
    order (reverse registration order), so all ranks issue the same collectives: a parameter left
    without a gradient on a rank contributes zeros there (and gets a zero gradient if no rank
    used it). Two schedules:

    * ``overlap=True``: a dedicated process group over the ranks of ``group`` (DDP's own
      collectives on the other group can then never interleave differently with these on
      different ranks); each gradient's all-reduce starts as soon as it and every gradient before
      it in the fixed order are accumulated, overlapping the rest of backward. Pass it as
      ``sync_group``, or it is made by ``dist.new_group``, a collective call that every process
      of the default group must make in the same order.
    * ``overlap=False``: ``group`` itself; everything is reduced at the end of backward, after
      every collective DDP issues during backward, coalesced into buckets of ``bucket_cap_mb``.
    """

    def __init__(self, model: nn.Module, group: Optional[dist.ProcessGroup] = None, sync_outside_ddp: bool = False,
                 overlap: bool = True, bucket_cap_mb: float = 25.0, sync_group: Optional[dist.ProcessGroup] = None):
        _require_process_group()
        if not hasattr(DistributedDataParallel, "_get_active_ddp_module"):  # torch < 2.0
            raise RuntimeError("ResuGradSync needs DistributedDataParallel._get_active_ddp_module (torch >= 2.0) "
                               "to tell synced forwards from no_sync() ones")
        if not bucket_cap_mb > 0:
            raise ValueError(f"bucket_cap_mb must be > 0, got {bucket_cap_mb!r}")
        self.overlap = overlap
        self.bucket_bytes = int(bucket_cap_mb * 2**20)
        self.world_size = dist.get_world_size(group)
        self.sync_outside_ddp = sync_outside_ddp
        # Reverse registration order: backward usually reaches the last layers first, so the
        # in-order launches start while the earlier layers are still being differentiated.
        named = [(n, p) for n, p in resu_parameters(model) if p.requires_grad][::-1]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.group = group
        if overlap:
            _check_sync_group(group, sync_group)
            self.group = sync_group if sync_group is not None else dist.new_group(_ranks(group))
            if self.params:  # create the communicator now, not inside the first backward
                dist.all_reduce(torch.zeros(1, device=self.params[0].device_of_storage), group=self.group)
        self._position = {id(p): i for i, p in enumerate(self.params)}
        self._sync_backward = False
        self._suspended = False
        self._reset()
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self.params]
        self._handles.append(model.register_forward_pre_hook(self._on_forward))
        self._model = model

    def _reset(self) -> None:
        self._ready = [False] * len(self.params)
        self._next = 0
        self._pending: list = []
        self._callback_queued = False

    def _on_forward(self, module, args) -> None:
        if not torch.is_grad_enabled():
            return  # evaluation forwards leave the pending training backward's decision alone
        if self._pending:  # an earlier backward failed before its end-of-backward callback ran
            self._wait_all()
        self._reset()
        ddp = DistributedDataParallel._get_active_ddp_module()
        sync = ddp.require_backward_grad_sync if ddp is not None else self.sync_outside_ddp
        self._sync_backward = sync and not self._suspended

    @contextlib.contextmanager
    def no_sync(self):
        """Forwards inside (and their backward) accumulate ResuTensor gradients locally, like
        ``ddp.no_sync()``; for use without DDP (``sync_outside_ddp=True``, e.g. next to FSDP2's
        ``set_requires_gradient_sync(False)``)."""
        previous, self._suspended = self._suspended, True
        try:
            yield
        finally:
            self._suspended = previous

    def _on_gradient(self, param) -> None:
        if not self._sync_backward:
            return
        if not self._callback_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_backward)
            self._callback_queued = True
        self._ready[self._position[id(param)]] = True
        if not self.overlap:
            return
        while self._next < len(self.params) and self._ready[self._next]:
            self._launch([self._next])
            self._next += 1

    def _flat_grad(self, index: int) -> torch.Tensor:
        param = self.params[index]
        if param.grad is None:  # not used on this rank in this backward: every rank still reduces it
            param.grad = param.compact(torch.zeros(param.trainable_count, dtype=param.dtype,
                                                   device=param.device_of_storage))
        grad = param.grad
        return grad.flat if isinstance(grad, CompactTensor) else grad

    def _launch(self, indices: list) -> None:
        flats = [self._flat_grad(i) for i in indices]
        if len(flats) == 1:
            buffer = flats[0] if flats[0].is_contiguous() else flats[0].contiguous()
        else:
            buffer = torch.cat([f.reshape(-1) for f in flats])
        buffer.div_(self.world_size)
        work = dist.all_reduce(buffer, group=self.group, async_op=True)
        self._pending.append((work, buffer, flats))

    def _wait_all(self) -> None:
        for work, buffer, flats in self._pending:
            work.wait()
            if len(flats) == 1:
                if buffer is not flats[0]:
                    flats[0].copy_(buffer)
                continue
            for flat, part in zip(flats, torch.split(buffer, [f.numel() for f in flats])):
                flat.copy_(part.view_as(flat))
        self._pending = []

    def _finish_backward(self) -> None:
        for bucket in self._remaining_buckets():
            self._launch(bucket)
        self._next = len(self.params)
        self._wait_all()
        self._reset()

    def _remaining_buckets(self) -> list:
        """The all-reduces still to launch. They must be the same on every rank: with ``overlap``
        other ranks may have launched some of them one by one during backward, so one per weight;
        without, buckets that depend only on the trainable counts, which every rank shares."""
        remaining = range(self._next, len(self.params))
        if self.overlap:
            return [[index] for index in remaining]
        buckets, bucket_bytes, bucket_dtype = [], 0, None
        for index in remaining:
            flat = self._flat_grad(index)
            if not buckets or bucket_bytes + flat.nbytes > self.bucket_bytes or flat.dtype != bucket_dtype:
                buckets.append([])
                bucket_bytes, bucket_dtype = 0, flat.dtype
            buckets[-1].append(index)
            bucket_bytes += flat.nbytes
        return buckets

    def remove(self) -> None:
        """Take the hooks off (the DDP ignore list stays; a DDP built before keeps ignoring them)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if getattr(self._model, _SYNC_ATTRIBUTE, None) is self:
            delattr(self._model, _SYNC_ATTRIBUTE)


def prepare_ddp(model: nn.Module, group: Optional[dist.ProcessGroup] = None, src: int = 0,
                sync_outside_ddp: bool = False, overlap: bool = True, bucket_cap_mb: float = 25.0,
                sync_group: Optional[dist.ProcessGroup] = None) -> ResuGradSync:
    """Make ``model`` ready for ``DistributedDataParallel``: DDP is told to ignore its ResuTensor
    parameters, their state is broadcast from rank ``src`` and their compact gradients are
    averaged over ``group`` (pass DDP the same ``process_group``) after every synced backward.
    Call on every rank of ``group``, after ``quantize_`` and ``model.to(device)``, before
    wrapping. ``overlap``, ``bucket_cap_mb``, ``sync_outside_ddp``, ``sync_group``: see
    :class:`ResuGradSync` (``overlap=True`` without ``sync_group`` creates a process group: every
    process of the default group must call prepare_ddp then). Returns the ResuGradSync.

    Example::

        quantize_(model, rt.resu_config(sparsity=0.5))
        rt.distributed.prepare_ddp(model)
        ddp = DistributedDataParallel(model, device_ids=[local_rank])
        with ddp.no_sync():                  # gradient accumulation works as with plain DDP
            loss_fn(ddp(x0), y0).backward()
        loss_fn(ddp(x1), y1).backward()      # ResuTensor and other grads are averaged here
    """
    _check_module(model, "prepare_ddp")
    _require_process_group()
    if getattr(model, _SYNC_ATTRIBUTE, None) is not None:
        raise ValueError("prepare_ddp: this model is already prepared (its ResuGradSync is model._resu_grad_sync)")
    if overlap:
        _check_sync_group(group, sync_group)
    names = [name for name, _ in resu_parameters(model)]
    if not names:
        raise ValueError("prepare_ddp: the model has no ResuTensor parameters; run quantize_(model, "
                         "rt.resu_config(...)) first, or use DistributedDataParallel directly")
    # Every name of a tied ResuTensor: DDP matches the ignore list against each of them.
    all_names = [name for name, p in model.named_parameters(remove_duplicate=False) if isinstance(p, ResuTensor)]
    ignored = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, ignored + [name for name in all_names if name not in ignored])
    broadcast_resu_state_(model, src=src, group=group)
    sync = ResuGradSync(model, group=group, sync_outside_ddp=sync_outside_ddp, overlap=overlap,
                        bucket_cap_mb=bucket_cap_mb, sync_group=sync_group)
    setattr(model, _SYNC_ATTRIBUTE, sync)
    return sync


# ------------------------------------------------------------------------------------ replica checks
def _digest(param: ResuTensor, include_values: bool) -> str:
    digest = hashlib.blake2b(digest_size=16)
    names = param.optional_tensor_data_names if include_values else [
        "mask_bitmap", "mask_indices", "subset_bitmap", "subset_indices"]
    for name in names:
        t = getattr(param, name)
        if t is not None:
            digest.update(name.encode())
            digest.update(_as_bytes(t).cpu().numpy().tobytes())
    return digest.hexdigest()


def check_replicas(model: nn.Module, group: Optional[dist.ProcessGroup] = None, values: bool = True) -> None:
    """Raise ValueError on every rank if any ResuTensor parameter differs across the ranks of
    ``group``: mode, trainable set, mask, and with ``values`` every stored tensor bit for bit
    (under DDP replicas stay bit-identical). Collective; copies each tensor to the CPU to hash
    it, so call it in tests or after mode changes, not every step.

    Example::

        scheduler.step(loss)
        rt.distributed.check_replicas(model)   # masks and weights identical on every rank
    """
    _require_process_group()
    if isinstance(model, DistributedDataParallel):
        model = model.module
    summary = [(name, p.mode_name, p.trainable_key, _digest(p, values)) for name, p in resu_parameters(model)]
    summaries = [None] * dist.get_world_size(group)
    dist.all_gather_object(summaries, summary, group=group)
    if any(len(s) != len(summaries[0]) for s in summaries):
        raise ValueError(f"check_replicas: the ranks hold different numbers of ResuTensor parameters: "
                         f"{[len(s) for s in summaries]}")
    differing = [entry[0] for i, entry in enumerate(summaries[0]) if any(s[i] != entry for s in summaries)]
    if differing:
        raise ValueError(f"check_replicas: ResuTensor parameter(s) {differing} differ across ranks (mode, mask or "
                         "values). Every rank must run the same mode changes with the same generator seed and "
                         "calibration (see docs/distributed.md)")


# ------------------------------------------------------------------------------------ Wanda calibration
def calibrate(model: nn.Module, batches, filter_fn=None, group: Optional[dist.ProcessGroup] = None) -> dict:
    """:func:`resu_tensor.calibrate` over every rank's ``batches``: identical Wanda input norms on
    all ranks, so Wanda pruning and commits choose the same mask everywhere. Collective. Layer
    names follow ``model``: pass the model you give ``prune_`` or the ResuScheduler.

    Example::

        norms = rt.distributed.calibrate(model, my_shard_of_batches)
        rt.prune_(model, 0.5, method="wanda", calibration=norms)
    """
    norms = _calibrate(model, batches, filter_fn)
    if sharded_weights(model, filter_fn):
        return norms  # rt.calibrate already reduced the norms of FSDP2-sharded layers over the ranks
    return all_reduce_input_norms(norms, group)


__all__ = ["prepare_ddp", "ResuGradSync", "broadcast_resu_state_", "check_replicas", "all_reduce_input_norms",
           "calibrate", "resu_parameters"]

"""The FSDP2 tensor extension of ResuTensor (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``).

* **Forward/backward.** The pre-all-gather hook hands FSDP the shard's effective weight
  W_eff = M⊙W + (1−M)⊙Φ(θ) (dequantized in QRESU) in the parameter dtype; the all-gather output
  *is* the unsharded weight, a plain dense tensor, so forward and backward run dense
  ``F.linear``, exactly like a plain FSDP2 weight, and FSDP reduce-scatters a dense gradient.
* **QRESU all-gathers packed.** A QRESU weight whose rows split evenly over the ranks (not
  transposed, one mesh dimension) sends its shard's codes, group scales and offsets, mask bitmap
  and θ instead; ``fsdp_post_all_gather`` rebuilds W_eff from them with the kernel the unsharded
  weight uses, so the gathered weight is bit-identical to the dense path's. FSDP2 gathers equal
  chunks per rank, so θ is zero-padded to the longest shard θ. The ranks agree on every shard's θ
  length by one all-gather of lengths the first time a shard's θ is seen (a new θ tensor arrives
  with every mode change or state load, on every rank together), never per step; the bound
  rows × cols would gather as many θ entries as dense values. Uneven splits stay dense: FSDP2
  requires every input of the short rank's padded shard to have the padded shard's shape.
* **Layout changes.** FSDP2 sizes its all-gather buffers at the first all-gather; a mode change
  changes the inputs (packed or dense, another θ length), so ``rt.prune_`` / ``enter_resu_`` /
  ``commit_`` (training/sharded.py's ``full_weights``) call :func:`reset_gather_layout_`; a state
  loaded into a shard (``load_state_dict``) is followed at its next all-gather.
* **Gradients.** A post-accumulate-grad hook (FSDP calls it right after the reduce-scatter)
  replaces the shard's dense gradient by its CompactTensor over the shard's trainable coordinates,
  so optimizer state stays compact and frozen coordinates never move (weight decay included).
  Registered by the first all-gather; nothing to call.
"""
import sys
import weakref

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard
from torch.utils.weak import WeakIdKeyDictionary

from resu_tensor.core import qresu
from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.mode import Mode

# shard -> (packed or dense, shapes and dtypes) of its last all-gather inputs (_follow_layout_change)
_GATHER_LAYOUTS = WeakIdKeyDictionary()
# shard -> (weak reference to the θ tensor the lengths were agreed for, every rank's θ length)
_THETA_LENGTHS = WeakIdKeyDictionary()

_HOOKED = "_resu_fsdp_grad_hook"

def rows_per_rank(total_rows: int, world: int) -> tuple[int, list[int]]:
    """torch.chunk's split of ``total_rows`` over ``world`` ranks: (padded rows, rows of each rank)."""
    padded = -(-total_rows // world)
    return padded, [max(0, min(padded, total_rows - r * padded)) for r in range(world)]


class FsdpRowSharding:
    """Mixin of ResuTensor: FSDP2's all-gather extension for a weight sharded by storage rows."""

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """The shard's all-gather inputs: packed (codes, scales, offsets, mask bitmap, padded θ) for
        a QRESU weight split evenly over the ranks, else its effective weight in the parameter dtype
        and its logical layout, padded to FSDP's padded shard rows (an N-D conv weight:
        out-channels; a transposed (in, out) weight is sharded on dim 1, its storage rows, which FSDP
        requires even: no padding)."""
        _register_grad_hook(module)
        inputs, metadata = self._all_gather_inputs(mesh, outer_size, mp_policy)
        _follow_layout_change(self, inputs, metadata)
        return inputs, metadata

    def _all_gather_inputs(self, mesh, outer_size, mp_policy):
        dtype = getattr(mp_policy, "param_dtype", None) or self.compute_dtype
        if self.packs_all_gather(mesh, outer_size):
            lengths = _agreed_theta_lengths(self, mesh)
            rows, cols = self.storage_shape
            return qresu.gather_inputs(self, max(lengths)), (
                "packed", lengths, rows, cols, self.quant_bits, self.group_size, self.compute_dtype, dtype)
        weight = self.storage_weight().to(dtype)
        if self.transposed:
            return (weight.t().contiguous(),), None
        padded, _ = rows_per_rank(outer_size[0], mesh.size())
        if weight.shape[0] < padded:
            weight = torch.cat([weight, weight.new_zeros(padded - weight.shape[0], weight.shape[1])])
        if self.view_shape is not None:
            weight = weight.view(padded, *self.view_shape[1:])
        return (weight.contiguous(),), None

    def packs_all_gather(self, mesh, outer_size) -> bool:
        """Whether FSDP all-gathers this shard packed: QRESU, rows split evenly over a 1-D shard
        mesh, storage rows on dim 0. Every input is global (the mode is the layer's), so every rank
        decides alike."""
        return (self.mode_name == Mode.QRESU.value and not self.transposed and mesh.ndim == 1
                and outer_size[0] % mesh.size() == 0)

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The unsharded dense W_eff. Dense path: the all-gather output itself (FSDP cuts the padding
        rows off; for a transposed weight it has already concatenated the shards along dim 1).
        Packed path: rebuilt from the gathered codes, scales, mask and θ, written into ``out``
        (the unsharded weight of the first all-gather) on later iterations."""
        if metadata is None:
            (weight,) = all_gather_outputs
            if out is not None:
                # Later iterations: FSDP re-allocated the all-gather output that `out` is a view of.
                return None
            return weight, ()
        _, lengths, rows, cols, bits, group_size, compute_dtype, dtype = metadata
        weight = qresu.effective_weight_from_gathered(all_gather_outputs, lengths, rows, cols, bits, group_size,
                                                      compute_dtype).to(dtype)
        if self.view_shape is not None:
            weight = weight.view(-1, *self.view_shape[1:])
        if out is not None:
            # FSDP re-allocated `out`'s storage (the inner tensor returned below); the forward graph
            # may hold `out` for backward, so the refill must not bump its version.
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                out.copy_(weight.view(out.shape))
            return None
        return weight, (weight,)


def _follow_layout_change(shard, inputs, metadata) -> None:
    """Re-size FSDP's all-gather buffers when ``shard``'s all-gather inputs changed shape since its
    last all-gather without a mode change of the library's (which resets them itself): a state
    written into the shard by ``load_state_dict`` or ``copy_`` after the model ran, e.g. a QRESU
    checkpoint into a SPARSE model. FSDP would copy the new inputs into buffers sized for the old
    ones. FSDP hands the extension no handle to its record of the parameter; the caller,
    ``FSDPParam.all_gather_inputs``, is that record (a direct call of the hook records nothing)."""
    caller = sys._getframe(2).f_locals.get("self")  # frame 1: fsdp_pre_all_gather
    if type(caller).__name__ != "FSDPParam" or getattr(caller, "_sharded_local_tensor", None) is not shard:
        return
    layout = (None if metadata is None else metadata[0], tuple((tuple(t.shape), t.dtype) for t in inputs))
    previous = _GATHER_LAYOUTS.get(shard)
    if previous is not None and previous != layout:
        clear_gather_buffers(caller)
    _GATHER_LAYOUTS[shard] = layout


def _agreed_theta_lengths(shard, mesh) -> list[int]:
    """Every rank's θ length for this shard's layer, all-gathered once per θ tensor (mode changes
    and state loads replace θ on every rank together; optimizer steps update it in place)."""
    record = _THETA_LENGTHS.get(shard)
    if record is not None and record[0]() is shard.theta:
        return record[1]
    length = torch.tensor([shard.theta.numel()], dtype=torch.int64, device=shard.theta.device)
    parts = [torch.empty_like(length) for _ in range(mesh.size())]
    dist.all_gather(parts, length, group=mesh.get_group())
    lengths = [int(p.item()) for p in parts]
    _THETA_LENGTHS[shard] = (weakref.ref(shard.theta), lengths)
    return lengths


def reset_gather_layout_(model, param) -> None:
    """Make FSDP2 size its all-gather buffers and unsharded weight of the sharded ResuTensor
    ``param`` again at its next all-gather, after a state change that may change the inputs
    (dense or packed, θ length). FSDP internals; a no-op where FSDP holds no record of ``param``.

    Example::

        reset_gather_layout_(model, model[0].weight)      # after writing a new mode into the shard
    """
    fsdp_param = fsdp_param_of(model, param)
    if fsdp_param is not None:
        clear_gather_buffers(fsdp_param)


def clear_gather_buffers(fsdp_param) -> None:
    """:func:`reset_gather_layout_` on FSDP's record (``FSDPParam``) of the parameter."""
    _GATHER_LAYOUTS.pop(getattr(fsdp_param, "_sharded_local_tensor", None), None)
    fsdp_param.all_gather_outputs = []
    fsdp_param._unsharded_inner_tensors = []
    if hasattr(fsdp_param, "_unsharded_param"):
        del fsdp_param._unsharded_param


def fsdp_param_of(model, param):
    """FSDP's record (``FSDPParam``) of the sharded parameter ``param``, None where FSDP holds
    none (FSDP internals: the per-module state's parameter group(s), named differently across
    torch versions).

    Example::

        record = fsdp_param_of(model, model[0].weight)   # record.sharded_param is model[0].weight
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        state = module._get_fsdp_state()
        groups = getattr(state, "_fsdp_param_groups", None)
        if groups is None:
            group = getattr(state, "_fsdp_param_group", None)
            groups = [group] if group is not None else []
        for group in groups:
            for fsdp_param in group.fsdp_params:
                if fsdp_param.sharded_param is param:
                    return fsdp_param
    return None


# ---------------------------------------------------------------------------------------- gradients
def shard_placement(param: torch.Tensor):
    """``fully_shard``'s ``shard_placement_fn`` for models with transposed (in, out) ResuTensor
    weights (transformers' Conv1D): ``Shard(1)`` for those, so that FSDP2 splits their storage rows
    (out-features; FSDP2 needs them divisible by the shard world size), None (FSDP's default
    ``Shard(0)``) for every other parameter. FSDP2's default dim 0 would cut a transposed weight's
    storage columns, i.e. its quantization groups and row-major θ/EMA vectors: refused.

    Example::

        fully_shard(model, shard_placement_fn=resu_tensor.fsdp.shard_placement)
    """
    return Shard(1) if isinstance(param, FsdpRowSharding) and param.transposed else None


def is_sharded_resu(p) -> bool:
    """Whether ``p`` is an FSDP-sharded ResuTensor parameter (a DTensor of a row shard)."""
    return isinstance(p, DTensor) and isinstance(p._local_tensor, FsdpRowSharding)


def compact_grad_(param: torch.Tensor) -> None:
    """Replace a sharded ResuTensor parameter's dense gradient shard by its CompactTensor."""
    grad = param.grad
    if grad is None or not isinstance(grad, DTensor):
        return
    local_grad, shard = grad._local_tensor, param._local_tensor
    if isinstance(local_grad, CompactTensor) or not isinstance(shard, FsdpRowSharding):
        return  # already compact, or the weight became a plain tensor (export.to_dense_)
    if tuple(local_grad.shape) != tuple(shard.shape):
        raise ValueError(f"FSDP gradient shard of shape {tuple(local_grad.shape)} does not match the ResuTensor "
                         f"shard {tuple(shard.shape)}")
    flat = shard.gather_trainable(shard.to_storage(local_grad.contiguous()))
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
    with ``grad._local_tensor += dense``. :func:`compact_grad_` compacts the sum again."""
    grad = sharded_param.grad
    if isinstance(grad, DTensor) and isinstance(grad._local_tensor, CompactTensor):
        shard = sharded_param._local_tensor
        if grad._local_tensor.trainable_key == shard.trainable_key:
            compact = grad._local_tensor
            grad._local_tensor = shard.expand_trainable(compact)
            _keep_until_done(compact.flat)


def _register_grad_hook(module) -> None:
    """Once per sharded parameter: compact its gradient after each reduce-scatter, and (through
    the unsharded weight FSDP registers on the module during forward) densify it before the next."""
    if module is None:
        return
    # Every sharded ResuTensor of the module, not only the one whose local tensor is this shard: with
    # CPU offload FSDP hands this method a device copy of the shard.
    for name, param in module._parameters.items():
        if is_sharded_resu(param) and not hasattr(param, _HOOKED):
            sharded = weakref.ref(param)

            def densify(_unsharded, sharded=sharded) -> None:
                if sharded() is not None:
                    _densify_grad_(sharded())

            def before_forward(module, args, name=name, densify=densify):
                unsharded = module._parameters.get(name)
                if isinstance(unsharded, torch.Tensor) and not isinstance(unsharded, DTensor) and \
                        unsharded.requires_grad and not hasattr(unsharded, _HOOKED):
                    setattr(unsharded, _HOOKED, unsharded.register_post_accumulate_grad_hook(densify))

            setattr(param, _HOOKED, (param.register_post_accumulate_grad_hook(compact_grad_),
                                     module.register_forward_pre_hook(before_forward)))



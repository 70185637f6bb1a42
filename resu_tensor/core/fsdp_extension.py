"""The FSDP2 tensor extension of ResuTensor (``fsdp_pre_all_gather`` / ``fsdp_post_all_gather``).

* **Forward/backward.** The pre-all-gather hook hands FSDP the shard's effective weight
  W_eff = M⊙W + (1−M)⊙Φ(θ) (dequantized in QRESU) in the parameter dtype; the all-gather output
  *is* the unsharded weight, a plain dense tensor, so forward and backward run dense
  ``F.linear``, exactly like a plain FSDP2 weight, and FSDP reduce-scatters a dense gradient.
* **Gradients.** A post-accumulate-grad hook (FSDP calls it right after the reduce-scatter)
  replaces the shard's dense gradient by its CompactTensor over the shard's trainable coordinates,
  so optimizer state stays compact and frozen coordinates never move (weight decay included).
  Registered by the first all-gather; nothing to call.
"""
import weakref

import torch
from torch.distributed.tensor import DTensor, Shard

from resu_tensor.core.compact import CompactTensor

_HOOKED = "_resu_fsdp_grad_hook"

def rows_per_rank(total_rows: int, world: int) -> tuple[int, list[int]]:
    """torch.chunk's split of ``total_rows`` over ``world`` ranks: (padded rows, rows of each rank)."""
    padded = -(-total_rows // world)
    return padded, [max(0, min(padded, total_rows - r * padded)) for r in range(world)]


class FsdpRowSharding:
    """Mixin of ResuTensor: FSDP2's all-gather extension for a weight sharded by storage rows."""

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        """The shard's effective weight in the parameter dtype and its logical layout, padded to
        FSDP's padded shard rows (an N-D conv weight: out-channels; a transposed (in, out) weight
        is sharded on dim 1, its storage rows, which FSDP requires even: no padding)."""
        _register_grad_hook(module)
        weight = self.storage_weight()
        dtype = getattr(mp_policy, "param_dtype", None) or self.compute_dtype
        weight = weight.to(dtype)
        if self.transposed:
            return (weight.t().contiguous(),), None
        padded, _ = rows_per_rank(outer_size[0], mesh.size())
        if weight.shape[0] < padded:
            weight = torch.cat([weight, weight.new_zeros(padded - weight.shape[0], weight.shape[1])])
        if self.view_shape is not None:
            weight = weight.view(padded, *self.view_shape[1:])
        return (weight.contiguous(),), None

    def fsdp_post_all_gather(self, all_gather_outputs, metadata, param_dtype, *, out=None):
        """The all-gather output is the unsharded dense W_eff (FSDP cuts the padding rows off; for a
        transposed weight it has already concatenated the shards along dim 1)."""
        (weight,) = all_gather_outputs
        if out is not None:
            # Later iterations: FSDP re-allocated the all-gather output that `out` is a view of.
            return None
        return weight, ()


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



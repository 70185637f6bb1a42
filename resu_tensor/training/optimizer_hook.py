"""The library's one optimizer step pre-hook, installed once for the process.

Before every ``optimizer.step()`` of an optimizer that holds ResuTensor parameters it
* refuses optimizer state made for an earlier trainable set (before any coordinate moves);
* for FSDP2-sharded weights, compacts a gradient FSDP's own hook did not see;
* accumulates Σ|g| for gradient-scored commits and applies RESU-Selective's consistency filter,
  so both see the gradient the step will apply (after accumulation and clipping).

After the step, it releases the bitmap positions and work vectors the CPU kernels kept for this
step's selections (:func:`resu_tensor.kernels.mask_ops.selected_positions`), so they never outlive
a step.

An optimizer without ResuTensors pays one comparison of its parameter groups' identities: the
ResuTensor parameters of each optimizer are found once and kept while its groups are unchanged.
"""
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.fsdp_extension import compact_grad_, is_sharded_resu
from resu_tensor.core.tensor import ResuTensor
from resu_tensor.kernels.mask_ops import holds_selections, release_selections
from resu_tensor.method.selective import consistency_filter_
from resu_tensor.training.optimizer_state import is_stale_for_shard, stale_parameters
from resu_tensor.training.sharded import SELECTIVE_UNSUPPORTED_SHARDED

_CACHE = "_resu_tensor_parameters"

_STALE_ADVICE = ("Call rt.reset_optimizer_state_(optimizer, model) after mode changes, or pass optimizer= to "
                 "rt.prune_ / rt.enter_resu_ / rt.commit_; the ResuScheduler does it for you.")


def resu_parameters(optimizer: torch.optim.Optimizer) -> tuple[list, list]:
    """(plain ResuTensor parameters, FSDP-sharded ones) of ``optimizer``, found again only when
    its parameter groups change (a group added, a params list replaced or resized)."""
    groups = optimizer.param_groups
    signature = tuple((id(group["params"]), len(group["params"])) for group in groups)
    cached = optimizer.__dict__.get(_CACHE)
    if cached is not None and cached[0] == signature:
        return cached[1], cached[2]
    params = [p for group in groups for p in group["params"]]
    plain = [p for p in params if isinstance(p, ResuTensor)]
    sharded = [p for p in params if is_sharded_resu(p)]
    optimizer.__dict__[_CACHE] = (signature, plain, sharded)
    return plain, sharded


def _refuse_stale_state(optimizer, plain: list) -> None:
    stale = stale_parameters(optimizer, plain)
    if stale:
        raise ValueError(
            f"{type(optimizer).__name__}.step(): optimizer state of {len(stale)} ResuTensor parameter(s) was "
            f"created for an earlier trainable set (their mode or mask changed since). {_STALE_ADVICE}"
        )


def _prepare_gradients(plain: list) -> None:
    for param in plain:
        # plain attributes first: reading .grad costs a __torch_function__ call per parameter
        if param.grad_abs_sum is None and param.selective is None:
            continue
        grad = param.grad
        if not isinstance(grad, CompactTensor) or grad.trainable_key != param.trainable_key:
            continue  # no gradient
        flat = grad.flat
        if param.grad_abs_sum is not None:
            param.grad_abs_sum.add_(flat.abs().float())
        if param.selective is not None:
            consistency_filter_(flat, param.selective_m, param.selective_v, param.selective)


def _prepare_sharded(optimizer, sharded: list) -> None:
    for param in sharded:
        shard = param._local_tensor
        if any(is_stale_for_shard(value, shard) for value in optimizer.state.get(param, {}).values()):
            raise ValueError(
                f"{type(optimizer).__name__}.step(): the optimizer state of an FSDP2-sharded ResuTensor parameter "
                f"was created for an earlier trainable set (its mode or mask changed since). {_STALE_ADVICE}"
            )
        if param.grad is None:
            continue
        compact_grad_(param)
        local_grad = getattr(param.grad, "_local_tensor", None)
        if not isinstance(local_grad, CompactTensor) or local_grad.trainable_key != shard.trainable_key:
            continue
        if shard.selective is not None:
            raise NotImplementedError(SELECTIVE_UNSUPPORTED_SHARDED)
        if shard.grad_abs_sum is not None:
            shard.grad_abs_sum.add_(local_grad.flat.abs().float())


def _before_step(optimizer, args, kwargs) -> None:
    plain, sharded = resu_parameters(optimizer)
    if plain:
        _refuse_stale_state(optimizer, plain)
        _prepare_gradients(plain)
    if sharded:
        _prepare_sharded(optimizer, sharded)


def _after_step(optimizer, args, kwargs) -> None:
    if torch.compiler.is_compiling() or not holds_selections():
        # A traced step selects without the CPU positions (they key on real tensors); tracing
        # this loop would only add graph breaks. Nothing held (a CUDA run): nothing to release.
        return
    plain, sharded = resu_parameters(optimizer)
    for param in [*plain, *(p._local_tensor for p in sharded)]:
        release_selections(param.mask_bitmap)
        release_selections(param.subset_bitmap)


register_optimizer_step_pre_hook(_before_step)
register_optimizer_step_post_hook(_after_step)

"""Wanda calibration: the L2 norm of every input feature of each ResuTensor layer, over the
tokens of a few calibration batches, collected by forward pre-hooks. On a model whose ResuTensor
weights FSDP2 shards, each rank runs its own batches and the norms are combined over the ranks."""
from __future__ import annotations  # annotations name dist.ProcessGroup, absent where distributed is not built

from collections.abc import Iterable, Mapping
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from resu_tensor.training.filters import FilterFn, require_chosen, resu_weights
from resu_tensor.training.sharded import sharded_weights


def run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def calibrate(model: nn.Module, batches: Iterable, filter_fn: Optional[FilterFn] = None) -> dict[str, torch.Tensor]:
    """Run ``model`` on each batch (``torch.no_grad``, eval mode, restored afterwards) and return
    {module name: ‖X_j‖₂ for every input feature j}, a float32 (in_features,) tensor per module
    whose ``weight`` is a ResuTensor (and that ``filter_fn`` accepts), over all tokens (every
    leading dim) of every batch. No chosen layer (no ResuTensor weight, or ``filter_fn`` matching
    none) is a ``ValueError``. A batch is passed as ``model(batch)``, ``model(*batch)`` for a
    tuple/list, ``model(**batch)`` for a dict. Modules that saw no input are left out.

    Under FSDP2 (ResuTensor weights sharded by ``fully_shard``) ``batches`` are this rank's, the
    model runs through FSDP, and the norms are over every rank's tokens, identical on every rank
    (:func:`all_reduce_input_norms` on the default process group). Collective then.

    Example::

        norms = rt.calibrate(model, [x1, x2])          # {"0": tensor([...]), "2": tensor([...])}
        rt.prune_(model, 0.5, method="wanda", calibration=norms)
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError("calibrate needs an iterable of batches; wrap a single batch tensor in a list: [x]")
    if not isinstance(batches, Iterable):
        raise TypeError(f"calibrate needs an iterable of batches, got {type(batches).__name__}")
    sharded = sharded_weights(model, filter_fn)
    layers = [(name, module, weight.shape[1]) for name, module, weight in resu_weights(model, filter_fn)]
    layers += [(entry.module_name, entry.module, entry.param.shape[1]) for entry in sharded]
    require_chosen(layers, model, filter_fn, "calibrate")  # norms of no layer would be an empty dict
    sums_of_squares: dict[str, torch.Tensor] = {}

    def make_hook(name: str, in_features: int):
        def accumulate(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or x.shape[-1:] != (in_features,):
                raise ValueError(f"calibrate: module {name!r} expects inputs with {in_features} features, "
                                 f"got {getattr(x, 'shape', type(x).__name__)}")
            squares = x.detach().reshape(-1, in_features).float().pow(2).sum(0)
            if name in sums_of_squares:
                sums_of_squares[name] += squares
            else:
                sums_of_squares[name] = squares
        return accumulate

    training_flags = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(make_hook(name, in_features), with_kwargs=True)
               for name, module, in_features in layers]
    n_batches = 0
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                run_batch(model, batch)
                n_batches += 1
    finally:
        for handle in handles:
            handle.remove()
        for module, training in training_flags.items():
            module.training = training
    norms = {name: sums.sqrt() for name, sums in sums_of_squares.items()}
    if sharded:  # a rank without batches is caught by the ranks' differing layer names, on every rank
        return all_reduce_input_norms(norms)
    if n_batches == 0:
        raise ValueError("calibrate got no batches; pass at least one input batch")
    return norms


def all_reduce_input_norms(norms: dict, group: Optional[dist.ProcessGroup] = None) -> dict:
    """Combine per-rank Wanda input norms {layer: ‖X_j‖₂ over this rank's tokens} into the norms
    over every rank's tokens, sqrt(Σ_ranks ‖X_j‖₂²), identical on every rank. Collective.

    Example::

        norms = rt.distributed.all_reduce_input_norms(rt.calibrate(model, my_batches))
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("all_reduce_input_norms needs an initialized default process group: call "
                           "torch.distributed.init_process_group(...) first (torchrun sets the environment)")
    names = sorted(norms)
    all_names = [None] * dist.get_world_size(group)
    dist.all_gather_object(all_names, names, group=group)
    if any(n != names for n in all_names):
        raise ValueError(f"all_reduce_input_norms: the ranks calibrated different layers: {all_names}")
    if not names:
        return {}
    squares = torch.cat([norms[n].float().reshape(-1).pow(2) for n in names])
    dist.all_reduce(squares, group=group)
    sizes = [norms[n].numel() for n in names]
    return {n: part.sqrt() for n, part in zip(names, torch.split(squares, sizes))}


def input_norms_for(model: nn.Module, layer_names: list[str], calibration,
                    filter_fn: Optional[FilterFn] = None) -> dict[str, torch.Tensor]:
    """Wanda's {layer name: (in,) input L2 norms} for ``layer_names``, from ``calibration``: batches
    (run through :func:`calibrate`) or a ready dict. Every layer must have norms: an all-zero
    score would prune it arbitrarily.

    Example::

        norms = input_norms_for(model, ["0", "2"], [x])
    """
    if calibration is None:
        raise ValueError("method='wanda' needs calibration=: an iterable of input batches, or the dict of input "
                         "norms returned by rt.calibrate(model, batches)")
    norms = dict(calibration) if isinstance(calibration, Mapping) else calibrate(model, calibration, filter_fn)
    missing = [name for name in layer_names if name not in norms]
    if missing:
        raise ValueError(f"wanda: no calibration input norms for layer(s) {missing} (they saw no input during "
                         f"calibration, or the dict lacks them); have {sorted(norms)}. Exclude them with filter_fn.")
    return norms


__all__ = ["calibrate", "input_norms_for", "all_reduce_input_norms"]

"""Wanda calibration: the L2 norm of every input column of each ResuTensor layer's (out, in)
weight matrix, over the tokens of a few calibration batches, collected by forward pre-hooks. On a
model whose ResuTensor weights FSDP2 shards, each rank runs its own batches and the norms are
combined over the ranks.

What a column's input is depends on the layer (:func:`input_column_sums_of_squares`): a Linear's or
transformers Conv1D's input feature j; for a Conv, column (c, k...) of the (out, in/groups·k...)
matrix sees input channel c at kernel offset k of every patch the conv reads (``F.unfold``'s
columns), and with ``groups > 1`` each group of output rows reads its own channels, so the norms
are per (row, column). Embeddings, attention in-projections and recurrent weights: see
training/wanda_inputs.py (per-(row, column) norms where rows read different inputs)."""
from __future__ import annotations  # annotations name dist.ProcessGroup, absent where distributed is not built

import itertools
from collections.abc import Iterable, Mapping
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from resu_tensor.core.tensor import ResuTensor

from resu_tensor.training.modules import is_hf_conv1d
from resu_tensor.training.filters import FilterFn, layer_name, require_chosen, resu_parameters
from resu_tensor.training.sharded import sharded_weights
from resu_tensor.training.wanda_inputs import (attention_sums_of_squares, embedding_sums_of_squares,
                                               recurrent_sums_of_squares)


def run_batch(model: nn.Module, batch) -> None:
    if isinstance(batch, Mapping):
        model(**batch)
    elif isinstance(batch, (tuple, list)):
        model(*batch)
    else:
        model(batch)


def _linear_columns(module: nn.Module) -> int:
    weight = module.weight
    if isinstance(weight, ResuTensor):
        return weight.storage_shape[1]
    return weight.shape[0] if is_hf_conv1d(module) else weight.shape[1]


def _conv_sums_of_squares(conv: nn.modules.conv._ConvNd, x: torch.Tensor) -> torch.Tensor:
    """Σ x² over every patch the conv reads, per column (c, k...) of its (out, in/groups·k...)
    weight matrix: for each kernel offset, the strided slice of the padded input that offset meets."""
    d = len(conv.kernel_size)
    if x.dim() == d + 1:  # unbatched
        x = x.unsqueeze(0)
    if x.dim() != d + 2 or x.shape[1] != conv.in_channels:
        raise ValueError(f"input_column_norms: {type(conv).__name__} expects inputs (batch, {conv.in_channels}, "
                         f"{d} spatial dims), got shape {tuple(x.shape)}")
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    squares = F.pad(x.detach().float(), conv._reversed_padding_repeated_twice, mode=mode).pow(2)
    spatial = squares.shape[2:]
    out_size = [(spatial[i] - conv.dilation[i] * (conv.kernel_size[i] - 1) - 1) // conv.stride[i] + 1 for i in range(d)]
    if min(out_size) < 1:
        raise ValueError(f"input_column_norms: input of spatial size {tuple(spatial)} (padded) is smaller than "
                         f"{type(conv).__name__}'s kernel {conv.kernel_size} at dilation {conv.dilation}")
    sums = squares.new_zeros(conv.in_channels, *conv.kernel_size)
    for offset in itertools.product(*(range(k) for k in conv.kernel_size)):
        window = tuple(slice(o * dil, o * dil + stride * (n - 1) + 1, stride)
                       for o, dil, stride, n in zip(offset, conv.dilation, conv.stride, out_size))
        sums[(slice(None), *offset)] = squares[(slice(None), slice(None), *window)].sum(dim=[0, *range(2, d + 2)])
    per_group = sums.reshape(conv.groups, -1)  # (groups, in/groups·k...): columns of each group's rows
    if conv.groups == 1:
        return per_group[0]
    return per_group.repeat_interleave(conv.out_channels // conv.groups, dim=0)


def input_column_sums_of_squares(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Σ x² over one batch ``x`` (the module's input) of what each column of ``module``'s
    (out, in) weight matrix multiplies, float32: (in,) for nn.Linear and transformers Conv1D
    (every leading dim is tokens); for nn.Conv1d/2d/3d (in/groups·prod(kernel),) over the unfolded
    input patches (padding, stride, dilation and padding_mode as the conv applies them), or
    (out, in/groups·prod(kernel)) when ``groups > 1`` (each group of rows reads its own channels).
    Sums add over batches; :func:`input_column_norms` takes the square root.

    nn.Embedding (``x``: token ids): (num_embeddings, embedding_dim), the count of token i in every
    column of row i (the Σ x² of the one-hot feature row i multiplies; see training/wanda_inputs.py).
    nn.MultiheadAttention and nn.RNN/LSTM/GRU read several inputs: :func:`parameter_sums_of_squares`.

    Example::

        sq = input_column_sums_of_squares(conv, x) + input_column_sums_of_squares(conv, x2)
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input_column_norms: expected a tensor input for {type(module).__name__}, "
                        f"got {type(x).__name__}")
    if isinstance(module, nn.Embedding):
        return embedding_sums_of_squares(module, x)
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        raise TypeError(f"input_column_norms: a {type(module).__name__}'s weights multiply several inputs (query, key "
                        "and value; hidden states); use parameter_sums_of_squares(module, args, kwargs) or "
                        "rt.calibrate")
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise ValueError(f"input_column_norms: {type(module).__name__} is not supported (a transposed conv's weight "
                         "is (in, out/groups, k...)); use method='magnitude' for it or leave it out with filter_fn")
    if isinstance(module, nn.modules.conv._ConvNd):
        return _conv_sums_of_squares(module, x)
    weight = getattr(module, "weight", None)
    if (isinstance(module, nn.Linear) or is_hf_conv1d(module)
            or (isinstance(weight, ResuTensor) and weight.view_shape is None)):  # a layer computing x @ Wᵀ
        features = _linear_columns(module)
        if x.dim() == 0 or x.shape[-1] != features:
            raise ValueError(f"input_column_norms: {type(module).__name__} expects inputs with {features} features, "
                             f"got {tuple(x.shape)}")
        return x.detach().reshape(-1, features).float().pow(2).sum(0)
    raise TypeError(f"input_column_norms: no input columns known for a {type(module).__name__}; accepted: "
                    "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, a module with an (out, in) ResuTensor weight")


def parameter_sums_of_squares(module: nn.Module, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """{parameter name: Σ x² per column of its (out, in) matrix} for each weight of ``module`` that
    the module table lists, over one call ``module(*args, **kwargs)`` (what a forward pre-hook
    with kwargs sees): ``{"weight": input_column_sums_of_squares(module, input)}`` for
    single-input layers; per parameter for nn.MultiheadAttention and nn.RNN/LSTM/GRU
    (training/wanda_inputs.py).

    Example::

        parameter_sums_of_squares(lstm, (x,), {})   # {"weight_ih_l0": ..., "weight_hh_l0": ...}
    """
    if isinstance(module, nn.MultiheadAttention):
        return attention_sums_of_squares(module, args, kwargs)
    if isinstance(module, nn.RNNBase):
        return recurrent_sums_of_squares(module, args, kwargs)
    return {"weight": input_column_sums_of_squares(module, args[0] if args else kwargs.get("input"))}


def input_column_norms(module: nn.Module, inputs) -> torch.Tensor:
    """Wanda's ‖X_j‖₂ per column j of ``module``'s (out, in) weight matrix over ``inputs`` (one
    input tensor or an iterable of them): see :func:`input_column_sums_of_squares` for the shape
    and what a column's input is per module type.

    Example::

        norms = input_column_norms(conv, [x1, x2])
        w.prune(0.5, scores=w.values.abs() * norms)   # what prune_(method="wanda") does
    """
    batches = [inputs] if isinstance(inputs, torch.Tensor) else list(inputs)
    if not batches:
        raise ValueError("input_column_norms needs at least one input tensor")
    total = None
    for x in batches:
        squares = input_column_sums_of_squares(module, x)
        total = squares if total is None else total + squares
    return total.sqrt()


def calibrate(model: nn.Module, batches: Iterable, filter_fn: Optional[FilterFn] = None) -> dict[str, torch.Tensor]:
    """Run ``model`` on each batch (``torch.no_grad``, eval mode, restored afterwards) and return
    {layer name: ‖X_j‖₂ for every column j of its (out, in) weight matrix}, a float32 (in,) tensor
    (or (out, in) where rows read different inputs: a grouped conv, an embedding, an attention
    in-projection; see :func:`parameter_sums_of_squares`) per ResuTensor parameter of a module
    that ``filter_fn`` accepts, over all tokens (every leading dim) of every batch. The layer name
    is the module's name for ``weight``, else ``module.param`` (``"lstm.weight_hh_l0"``), as in
    :func:`resu_weights`; a tied weight is calibrated at its first owner only. No chosen layer (no ResuTensor weight, or ``filter_fn`` matching
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
    chosen = [(entry.module_name, entry.module, entry.param_name) for entry in resu_parameters(model, filter_fn)]
    chosen += [(entry.module_name, entry.module, entry.param_name) for entry in sharded]
    require_chosen(chosen, model, filter_fn, "calibrate")  # norms of no layer would be an empty dict
    # An attention's out_proj is called functionally (no hook of its own fires): its attention computes it.
    attention_of = {f"{name}.out_proj" if name else "out_proj": (name, m) for name, m in model.named_modules()
                    if isinstance(m, nn.MultiheadAttention)}
    layers: dict[str, tuple[nn.Module, dict[str, str]]] = {}  # hooked module name: (module, {param name: layer name})
    for module_name, module, param_name in chosen:
        layer = layer_name(module_name, param_name)
        if module_name in attention_of and param_name == "weight":
            module_name, module = attention_of[module_name]
            param_name = "out_proj.weight"
        layers.setdefault(module_name, (module, {}))[1][param_name] = layer
    sums_of_squares: dict[str, torch.Tensor] = {}

    def make_hook(name: str, names: dict[str, str]):
        def accumulate(module, args, kwargs):
            try:
                squares = parameter_sums_of_squares(module, args, kwargs)
            except (TypeError, ValueError) as error:
                reason = str(error).removeprefix("input_column_norms: ").removeprefix(f"{type(module).__name__} ")
                raise ValueError(f"calibrate: module {name!r} {reason}") from None
            for param_name, layer in names.items():
                if layer in sums_of_squares:
                    sums_of_squares[layer] += squares[param_name]
                else:
                    sums_of_squares[layer] = squares[param_name]
        return accumulate

    training_flags = {module: module.training for module in model.modules()}
    handles = [module.register_forward_pre_hook(make_hook(name, names), with_kwargs=True)
               for name, (module, names) in layers.items()]
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
    if sharded:
        _reshard(model)
    norms = {name: sums.sqrt() for name, sums in sums_of_squares.items()}
    if sharded:  # a rank without batches is caught by the ranks' differing layer names, on every rank
        return all_reduce_input_norms(norms)
    if n_batches == 0:
        raise ValueError("calibrate got no batches; pass at least one input batch")
    return norms


def _reshard(model: nn.Module) -> None:
    """FSDP2 leaves the root module's parameters unsharded after a forward (a backward usually
    follows); calibration runs no backward, so shard them again for the mode changes that follow."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


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
    return {n: part.sqrt().view(norms[n].shape) for n, part in zip(names, torch.split(squares, sizes))}


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


__all__ = ["calibrate", "input_norms_for", "all_reduce_input_norms", "input_column_norms",
           "input_column_sums_of_squares", "parameter_sums_of_squares"]

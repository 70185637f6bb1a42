"""Export a trained model for inference: plain dense weights, or 2:4 semi-structured sparse ones.

Both export the *committed* weights M⊙W of layers in DENSE or SPARSE mode. A layer still in
RESU or QRESU carries uncommitted θ (and in QRESU a 4/8-bit W_A): export refuses it and asks
for ``rt.commit_(model, ...)`` first, so what is served is exactly one chosen mask. Every layer
is checked before any changes, so a refused export leaves the model untouched.

Example::

    rt.commit_(model, strategy="amnesty")           # if a RESU phase is open
    to_dense_(model)                                # every weight a plain nn.Parameter
    # or, on CUDA after rt.prune_(model, granularity="2:4"):
    to_semi_structured_(model)                      # torch.sparse semi-structured weights
"""
from typing import Callable, Optional

import torch
from torch import nn

from resu_tensor.core.mode import Mode
from resu_tensor.training.filters import replace_parameter_everywhere, resu_weights
from resu_tensor.training.sharded import replace_shards_with_plain_, sharded_weights
from resu_tensor.core.tensor import ResuTensor

FilterFn = Callable[[nn.Module, str], bool]
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
SEMI_STRUCTURED_BACKENDS = (None, "cusparselt", "cutlass")


def _committed_layers(model: nn.Module, filter_fn: Optional[FilterFn], action: str) -> list:
    layers = list(resu_weights(model, filter_fn))
    _check_committed([(name, w) for name, _, w in layers], action)
    return layers


def _check_committed(layers: list, action: str) -> None:
    open_phase = [f"{name or '<root>'} ({w.mode.value})" for name, w in layers
                  if w.mode not in (Mode.DENSE, Mode.SPARSE)]
    if open_phase:
        raise ValueError(
            f"{action}: layer(s) {open_phase} hold uncommitted θ; export takes committed weights only. "
            "Call rt.commit_(model, strategy=...) first (or let the ResuScheduler finish its cycle)")


def committed_weight(weight: ResuTensor) -> torch.Tensor:
    """M⊙W of a DENSE or SPARSE ResuTensor as a new plain tensor (storage orientation, its dtype)."""
    if weight.mode not in (Mode.DENSE, Mode.SPARSE):
        raise ValueError(f"committed_weight needs a 'dense' or 'sparse' weight, got mode {weight.mode.value!r}; "
                         "call commit first")
    values = weight.values.detach()
    if weight.mode == Mode.DENSE:
        return values.clone()
    return values.masked_fill(~weight.storage_mask(), 0)


def to_dense_(model: nn.Module, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Replace every ResuTensor parameter (of modules chosen by ``filter_fn(module, name)``, default
    all) by a plain ``nn.Parameter`` holding M⊙W (a tied weight: one Parameter, every owner keeps it), keeping dtype, device and ``requires_grad``; the model
    then holds no tensor subclass and runs, saves and compiles like any other. Raises
    ``ValueError`` (changing nothing) if a layer is in RESU/QRESU: commit first. Returns the model.
    Under FSDP2 each rank's shard becomes a plain tensor of its committed rows, in the same sharded
    parameter (FSDP keeps sharding it); build a new optimizer afterwards.

    Example::

        rt.export.to_dense_(model)
        torch.save(model.state_dict(), "dense.pt")
    """
    layers = _committed_layers(model, filter_fn, "to_dense_")
    sharded = sharded_weights(model, filter_fn)  # FSDP2: each rank's shard becomes plain, still sharded
    _check_committed([(entry.fqn, entry.shard) for entry in sharded], "to_dense_")
    replace_shards_with_plain_(model, sharded, lambda w: w.to_logical(committed_weight(w)))
    replacements = [(w, nn.Parameter(w.to_logical(committed_weight(w)).contiguous(), requires_grad=w.requires_grad))
                    for _, _, w in layers]  # in the module's layout: conv N-D, Conv1D (in, out)
    for weight, dense in replacements:  # every owner of a tied weight gets the one new Parameter
        replace_parameter_everywhere(model, weight, dense)
    return model


def _semi_structured_24(weight: ResuTensor) -> bool:
    """Every group of 4 consecutive inputs of every row holds at most 2 active weights."""
    rows, cols = weight.storage_shape
    if cols % 4:
        return False
    return bool((weight.storage_mask().view(rows, cols // 4, 4).sum(dim=2) <= 2).all())


def _convert_24(dense: torch.Tensor, backend: Optional[str]) -> torch.Tensor:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if backend is None:
        backend = "cusparselt" if torch.backends.cusparselt.is_available() else "cutlass"
    forced = SparseSemiStructuredTensor._FORCE_CUTLASS  # torch's own switch between the two subclasses
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"
    try:
        return to_sparse_semi_structured(dense)
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = forced


def to_semi_structured_(model: nn.Module, filter_fn: Optional[FilterFn] = None,
                        backend: Optional[str] = None) -> nn.Module:
    """Replace every ResuTensor weight with a 2:4 mask by ``torch.sparse.to_sparse_semi_structured``
    of M⊙W, for sparse tensor-core inference (``F.linear`` on it runs the 2:4 kernels; frozen:
    ``requires_grad=False``). Needs CUDA (an Ampere or newer GPU), float16 or bfloat16 weights,
    SPARSE layers whose mask is 2:4 along the inputs (``rt.prune_(model, granularity="2:4")``;
    amnesty commits keep it) and the shapes torch's kernels accept (rows a multiple of 32,
    inputs a multiple of 64 for float16/bfloat16). Raises ``ValueError``, before any layer
    changes, otherwise. ``backend``: ``"cusparselt"`` or ``"cutlass"``; None takes cuSPARSELt
    when torch has it, else CUTLASS. Returns the model.

    Example::

        rt.prune_(model, granularity="2:4"); model.half().cuda()
        rt.export.to_semi_structured_(model)
    """
    if backend not in SEMI_STRUCTURED_BACKENDS:
        raise ValueError(f"backend must be one of {SEMI_STRUCTURED_BACKENDS}, got {backend!r}")
    layers = _committed_layers(model, filter_fn, "to_semi_structured_")
    if not layers:
        raise ValueError("to_semi_structured_: the model has no ResuTensor weights (chosen by filter_fn)")
    converted = {}
    for name, _, weight in layers:
        where = f"to_semi_structured_: layer {name!r}"
        if id(weight) in converted:
            continue
        if weight.transposed or weight.view_shape is not None:
            raise ValueError(f"{where}: semi-structured export takes (out, in) Linear weights, got a weight of shape "
                             f"{list(weight.shape)}; leave it out with filter_fn (or use to_dense_)")
        if weight.mode != Mode.SPARSE or not _semi_structured_24(weight):
            raise ValueError(f"{where} has no 2:4 mask (mode {weight.mode.value!r}, nm_pattern={weight.nm_pattern}); prune it with "
                             "rt.prune_(model, granularity='2:4')")
        if weight.dtype not in SEMI_STRUCTURED_DTYPES:
            raise ValueError(f"{where} has dtype {weight.dtype}; semi-structured export takes "
                             f"{[str(d) for d in SEMI_STRUCTURED_DTYPES]}: convert with model.half() or "
                             "model.to(torch.bfloat16)")
        if weight.device.type != "cuda":
            raise ValueError(f"{where} is on {weight.device}; 2:4 semi-structured kernels run on CUDA only: "
                             "move the model with model.cuda() first")
        try:
            converted[id(weight)] = _convert_24(committed_weight(weight), backend)
        except (RuntimeError, ValueError, NotImplementedError) as error:
            raise ValueError(f"{where}: torch cannot convert its {list(weight.shape)} {weight.dtype} weight to "
                             f"semi-structured form: {error}") from None
    for _, _, weight in layers:
        replace_parameter_everywhere(model, weight, nn.Parameter(converted[id(weight)], requires_grad=False))
    return model


__all__ = ["to_dense_", "to_semi_structured_", "committed_weight"]

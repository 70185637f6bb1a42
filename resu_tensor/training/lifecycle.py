"""Model-level lifecycle functions: apply a ResuTensor method to every chosen weight.

Each works on plain ResuTensor weights and on FSDP2-sharded ones alike: the latter are gathered
into whole layers for the change and each rank keeps its rows (training/sharded.py), so masks are
identical on every rank and equal to a single-process run's. ``optimizer=`` (one or a list)
keeps (prune_, commit_: remaps) the state of coordinates that stay trainable on plain weights and
drops the rest of what the change made stale, sharded or not.

Every call changes all chosen layers or none: each layer's mode and options are checked before
any changes, and a layer that still fails part-way restores the layers changed before it. A call
that chooses no layer raises (the model has no ResuTensor weight, or ``filter_fn`` matched none)."""
import contextlib
from collections.abc import Mapping
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from resu_tensor.core.mask_encoding import decode_mask
from resu_tensor.core.mode import Mode
from resu_tensor.core.subset import restrict_to_subset_
from resu_tensor.core.tensor import ResuTensor
from resu_tensor.core.transitions import check_commit, check_enter_resu
from resu_tensor.method.pruning import (check_finite, check_input_norms, check_keeps_weights, check_method,
                                        check_scope, erk_densities, global_sparsities, parse_granularity,
                                        resolve_sparsity, score)
from resu_tensor.method.selective import StaticSubsetConfig
from resu_tensor.training.calibration import calibrate, input_norms_for
from resu_tensor.training.filters import FilterFn, require_chosen, resu_weights
from resu_tensor.training.optimizer_state import optimizer_state_kept
from resu_tensor.training.sharded import check_gatherable_options, full_weights, sharded_weights


def _chosen_layers(model: nn.Module, filter_fn, call: str) -> list[tuple[str, nn.Module, ResuTensor]]:
    return require_chosen(list(resu_weights(model, filter_fn)), model, filter_fn, call)


def _checked(where: str, check: Callable[[], object]):
    """``check()``, its ValueError/TypeError prefixed with ``where`` (the call and the layer)."""
    try:
        return check()
    except (ValueError, TypeError) as error:
        raise type(error)(f"{where}: {error}") from error


@contextlib.contextmanager
def all_or_none(weights: list[ResuTensor]) -> Iterator[None]:
    """If the block raises, every weight of ``weights`` gets back the state (and ``.grad``) it had
    on entry. The saved state holds the same inner tensors, not copies: the transitions build new
    tensors, and the one thing they change in place is θ written into the pruned slots of a
    SPARSE weight's values (``enter_resu``), which were exactly zero and are zeroed again.

    Example::

        with all_or_none([w1, w2]):
            w1.enter_resu(); w2.enter_resu()
    """
    saved = [(w, w.fields(), w.grad, w.values._version if w.values is not None else None) for w in weights]
    try:
        yield
    except BaseException:
        for weight, fields, grad, version in saved:
            for name, value in fields.items():
                setattr(weight, name, value)
            values = fields["values"]
            if values is not None and values._version != version and fields["mode_name"] == Mode.SPARSE.value:
                keep = decode_mask(weight.encoded_mask(), weight.storage_shape, values.device)
                with torch.no_grad():
                    values.masked_fill_(~keep, 0)
            weight.grad = grad
        raise


def _state_kept(model: nn.Module, optimizer, filter_fn):
    """Optimizer state of coordinates that stay trainable survives the change (unsharded weights;
    sharded ones lose it in ``full_weights``)."""
    return optimizer_state_kept(optimizer, [w for _, _, w in resu_weights(model, filter_fn)])


@contextlib.contextmanager
def full_weights_keeping_state(model: nn.Module, optimizer, filter_fn=None) -> Iterator[None]:
    """:func:`full_weights` whose exit keeps ``optimizer``'s state of every coordinate that stays
    trainable, sharded weights and unsharded alike (coordinates that join start at zero)."""
    with full_weights(model, optimizer, filter_fn, keep_state=True), _state_kept(model, optimizer, filter_fn):
        yield


def _norms_before_gathering(model: nn.Module, calibration, filter_fn, needed: bool):
    """Calibration batches become input norms while the model can still run (never inside
    :func:`full_weights`); on a sharded model ``calibrate`` combines every rank's batches."""
    if not needed or calibration is None or isinstance(calibration, Mapping) or not sharded_weights(model, filter_fn):
        return calibration
    return calibrate(model, calibration, filter_fn)


def prune_(model: nn.Module, sparsity: Optional[float] = None, method: str = "magnitude",
           filter_fn: Optional[FilterFn] = None, generator: Optional[torch.Generator] = None, *,
           granularity: str = "element", scope: str = "layer", calibration=None, optimizer=None) -> nn.Module:
    """Prune every chosen ResuTensor weight (→ SPARSE), FSDP2-sharded ones included (collective
    then: every rank calls it with the same arguments and generator seed).

    * ``method``: ``magnitude`` |W|, ``random``, or ``wanda`` |W_ij|·‖X_j‖₂, which needs
      ``calibration``: an iterable of input batches (run through :func:`resu_tensor.calibrate`) or
      the dict {module name: (in_features,) input L2 norms} that ``calibrate`` returns.
    * ``granularity``: ``element`` (default), ``row`` (same count pruned in every output row),
      ``structured_row`` / ``structured_column`` (whole rows / input columns), or ``"N:M"`` such as
      ``"2:4"`` (N kept in every M consecutive inputs; ``sparsity`` None means the implied 1 − N/M).
    * ``scope``: ``layer`` (every layer to ``sparsity``), ``global`` (one score threshold over all
      chosen layers; element granularity only) or ``erk`` (Erdős–Rényi-Kernel per-layer
      densities whose kept total is (1 − sparsity)·total).
    * ``optimizer`` (one or a list): its state of the weights whose trainable set changed is
      remapped to the new set (coordinates that stay keep it, joiners start at zero).

    Every layer is checked (mode, calibration) and every score computed before any layer changes.

    Example::

        rt.prune_(model, sparsity=0.7, method="magnitude")
        rt.prune_(model, method="wanda", granularity="2:4", calibration=[x1, x2])
        rt.prune_(model, 0.9, scope="erk", optimizer=optimizer)
    """
    calibration = _norms_before_gathering(model, calibration, filter_fn, needed=method == "wanda")
    with full_weights_keeping_state(model, optimizer, filter_fn):
        _prune_layers(model, sparsity, method, filter_fn, generator, granularity, scope, calibration)
    return model


def _prune_layers(model: nn.Module, sparsity, method: str, filter_fn, generator, granularity: str, scope: str,
                  calibration) -> None:
    check_method(method)
    check_scope(scope)
    layer_sparsity = resolve_sparsity(sparsity, granularity)
    if scope == "global" and granularity != "element":
        raise ValueError(f"scope='global' prunes by one threshold over all elements: it needs granularity='element', "
                         f"got {granularity!r}")
    n_m = parse_granularity(granularity)
    if scope == "erk" and n_m is not None:
        raise ValueError(f"scope='erk' gives every layer its own sparsity, but granularity {granularity!r} fixes it at "
                         f"{layer_sparsity:g}; use scope='layer'")
    layers = [(name, weight) for name, _, weight in _chosen_layers(model, filter_fn, "prune_")]
    for name, weight in layers:
        if weight.mode not in (Mode.DENSE, Mode.SPARSE):
            raise ValueError(f"prune_: layer {name!r} is in mode {weight.mode.value!r}; "
                             "prune needs 'dense' or 'sparse'")
        if n_m is not None and weight.values.shape[1] % n_m[1]:
            raise ValueError(f"prune_: layer {name!r}: granularity {granularity!r} needs in_features divisible by "
                             f"{n_m[1]}, got {weight.values.shape[1]}")
        check_finite(weight.values, f"prune_: layer {name!r}")
        if scope == "layer":
            check_keeps_weights(layer_sparsity, granularity, weight.storage_shape, f"prune_: layer {name!r}")
    input_norms = {}
    if method == "wanda":
        input_norms = input_norms_for(model, [name for name, _ in layers], calibration, filter_fn)
        for name, weight in layers:
            check_input_norms(input_norms[name], weight.values.shape[1])

    def layer_scores(name: str, weight: ResuTensor) -> torch.Tensor:
        return score(weight.values, method, input_norms.get(name), generator)

    if scope == "layer":
        with all_or_none([weight for _, weight in layers]):
            for name, weight in layers:
                weight.prune(sparsity, method=method, granularity=granularity, scores=layer_scores(name, weight))
        return
    if scope == "global":
        scores = {name: layer_scores(name, weight) for name, weight in layers}
        sparsities = global_sparsities(scores, layer_sparsity)
        collapsed = [name for name, value in sparsities.items() if value >= 1.0]
        if collapsed:
            raise ValueError(f"scope='global' at sparsity {sparsity} would prune every weight of layer(s) {collapsed} "
                             "(all their scores fall below the global threshold); lower the sparsity, leave them out "
                             "with filter_fn, or use scope='erk' or 'layer'")
    else:
        scores = {}
        densities = erk_densities({name: tuple(weight.values.shape) for name, weight in layers}, layer_sparsity)
        sparsities = {name: max(0.0, 1.0 - density) for name, density in densities.items()}
        for name, weight in layers:
            check_keeps_weights(sparsities[name], granularity, weight.storage_shape,
                                f"prune_(scope='erk', sparsity={sparsity}): layer {name!r}")
    with all_or_none([weight for _, weight in layers]):
        for name, weight in layers:
            layer_score = scores.pop(name) if name in scores else layer_scores(name, weight)
            weight.prune(sparsities[name], method=method, granularity=granularity, scores=layer_score)


def enter_resu_(model: nn.Module, epsilon: float = 0.1, freeze_active: bool = True,
                filter_fn: Optional[FilterFn] = None, generator: Optional[torch.Generator] = None,
                probe_fn: Optional[Callable[[nn.Module], torch.Tensor]] = None, *, optimizer=None,
                **options) -> nn.Module:
    """Move every chosen SPARSE weight into RESU (θ in the pruned slots), or QRESU with
    ``quantize_bits=4`` (or 8) and ``group_size``. ``selective`` takes a SelectiveConfig or a
    StaticSubsetConfig; one with ``by="gradient"`` needs ``probe_fn(model) -> loss``, whose
    gradient ranks the pruned coordinates. ``optimizer`` (one or a list): its state of the
    weights whose trainable set changed is dropped. Other options: see ``ResuTensor.enter_resu``.

    FSDP2-sharded weights get θ drawn for the whole layer from ``generator``, identical on every
    rank (collective); SelectiveConfig and gradient-probed subsets are not supported there
    (``NotImplementedError``).

    Example::

        rt.enter_resu_(model, epsilon=0.1, freeze_active=True, optimizer=optimizer)
        rt.enter_resu_(model, quantize_bits=4, group_size=128, selective=rt.SelectiveConfig())
    """
    if sharded_weights(model, filter_fn):
        check_gatherable_options(options, probe_fn)
    with full_weights(model, optimizer, filter_fn):
        _enter_resu_layers(model, epsilon, freeze_active, filter_fn, generator, probe_fn, options)
    return model


def _enter_resu_layers(model: nn.Module, epsilon: float, freeze_active: bool, filter_fn, generator, probe_fn,
                       options: dict) -> None:
    selective = options.get("selective")
    layers = _chosen_layers(model, filter_fn, "enter_resu_")
    by_gradient = isinstance(selective, StaticSubsetConfig) and selective.by == "gradient"
    if by_gradient and probe_fn is None:
        raise ValueError('enter_resu_: StaticSubsetConfig(by="gradient") needs probe_fn(model) -> loss')
    for name, _, weight in layers:
        _checked(f"enter_resu_: layer {name!r}", lambda: check_enter_resu(
            weight, epsilon, freeze_active, generator, probed=by_gradient, **options))
    weights = [w for _, _, w in layers]
    with all_or_none(weights):
        if by_gradient:
            probe_options = {k: v for k, v in options.items() if k != "selective"}
            for weight in weights:
                weight.enter_resu(epsilon=epsilon, freeze_active=freeze_active, generator=generator, **probe_options)
            scores = _probe_gradients(model, weights, probe_fn)
            for weight in weights:
                restrict_to_subset_(weight, selective, scores[id(weight)], generator)
            return
        for weight in weights:
            weight.enter_resu(epsilon=epsilon, freeze_active=freeze_active, generator=generator, **options)


def _probe_gradients(model: nn.Module, weights: list, probe_fn) -> dict:
    """|dense gradient| of each weight (storage orientation) from one probe loss."""
    for weight in weights:
        weight.grad = None
    probe_fn(model).backward()
    scores = {id(w): w.expand_trainable(w.grad).abs() if w.grad is not None else torch.zeros(w.storage_shape)
              for w in weights}
    for weight in weights:
        weight.grad = None
    return scores


def commit_(model: nn.Module, strategy: str = "simple", filter_fn: Optional[FilterFn] = None, *,
            calibration=None, optimizer=None, **options) -> dict:
    """Merge θ into every chosen RESU/QRESU weight and pick its new mask (→ SPARSE). Returns
    {layer name: AmnestyStats}. Strategies and ``options`` (sparsity, cycle, num_cycles, score,
    r_start, r_end): see ``ResuTensor.commit``; Wanda scores need ``calibration`` (batches or
    the dict of ``rt.calibrate``). ``optimizer`` (one or a list): its state of the weights whose
    trainable set changed is dropped. On FSDP2-sharded weights the amnesty tournament runs over
    the whole layer, identical on every rank and to a single-process run (collective).

    Example::

        stats = rt.commit_(model, strategy="amnesty", cycle=1, num_cycles=4, optimizer=optimizer)
        print(rt.format_stats_table(stats))
    """
    wanda = (strategy == "amnesty" and options.get("score") == "wanda") or strategy == "wanda_reprune"
    calibration = _norms_before_gathering(model, calibration, filter_fn, needed=wanda)
    with full_weights(model, optimizer, filter_fn, keep_state=True):
        layers = _chosen_layers(model, filter_fn, "commit_")
        for name, _, weight in layers:  # strategy and options first: they need no calibration run
            _checked(f"commit_: layer {name!r}", lambda: check_commit(weight, strategy, norms_later=wanda, **options))
        input_norms = {}
        if wanda:
            input_norms = input_norms_for(model, [name for name, _, _ in layers], calibration, filter_fn)
            for name, _, weight in layers:
                _checked(f"commit_: layer {name!r}", lambda: check_commit(
                    weight, strategy, input_norms=input_norms[name], **options))
        with all_or_none([weight for _, _, weight in layers]), _state_kept(model, optimizer, filter_fn):
            return {name: weight.commit(strategy, input_norms=input_norms.get(name), **options)
                    for name, _, weight in layers}

"""ResuTensor: one weight's values, mask and mode packed into a tensor subclass."""
import weakref
from typing import Optional

import torch
from torchao.utils import TorchAOBaseTensor, _torchao_base_tensor__setstate__

from resu_tensor import kernels
from resu_tensor.core.compact import (CompactTensor, FastPropertyAccess, LiveKey, NoDynamoFrames, contiguous_strides,
                                      key_value, register_cell, stable_hash)
from resu_tensor.core.mask_encoding import EncodedMask, active_count, decode_mask, encoded_nbytes, prefix_block_size
from resu_tensor.core import transitions
from resu_tensor.core.fsdp_extension import FsdpRowSharding
from resu_tensor.core.mode import Mode
from resu_tensor.core.qresu import effective_weight as qresu_effective_weight
from resu_tensor.core.state import (SUPPORTED_DTYPES, TRAINABLE_SIDES, QuantizedActive, build_state, check_state,
                                    upgrade_legacy_fields)
from resu_tensor.core.tracing import is_trace_value, is_traced
from resu_tensor.kernels.mask_ops import held_selection_nbytes
from resu_tensor.method.pruning import check_sparsity
from resu_tensor.method.selective import SelectiveConfig


def check_weight(weight: torch.Tensor, transposed: bool = False) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(weight).__name__}")
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed must be a bool, got {transposed!r}")
    if transposed and weight.dim() != 2:
        raise ValueError(f"transposed=True takes a 2-D (in_features, out_features) weight, got shape "
                         f"{tuple(weight.shape)}")
    if weight.dim() < 2:
        raise ValueError(f"ResuTensor needs a 2-D (out_features, in_features) or N-D conv (out, in/groups, k...) "
                         f"weight, got shape {tuple(weight.shape)}")
    if weight.numel() == 0:
        raise ValueError(f"ResuTensor needs a non-empty weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ResuTensor supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {weight.dtype}")


def trainable_flat_of(side: str, mask: EncodedMask, subset: EncodedMask, storage_shape, device) -> Optional[torch.Tensor]:
    """Row-major bool mask of the trainable coordinates over storage, or None if all train."""
    if side == "all":
        return None
    if side == "subset":
        return decode_mask(subset, storage_shape, device).view(-1)
    flat = decode_mask(mask, storage_shape, device).view(-1)
    return flat if side == "active" else ~flat


_MASK_PARTS = ("bitmap", "block_prefix", "indices")

# The inner-tensor names under which a weight's trainable count reaches compiled graphs: the count
# carrier's length, and the vectors of one value per pruned or trainable coordinate (QRESU's θ,
# RESU-Selective's EMAs, gradient-score sums) under names of their own.
_COUNT_CARRIER = "trainable_count_carrier"
_COUNT_SIZED_PREFIX = "trainable_count_sized_"
_COUNT_SIZED = {name: _COUNT_SIZED_PREFIX + name for name in ("theta", "selective_m", "selective_v", "grad_abs_sum")}
_FIELD_OF_COUNT_SIZED = {inner: name for name, inner in _COUNT_SIZED.items()}
# The fields that define the trainable set, hence its count.
_TRAINABLE_FIELDS = frozenset(["trainable_side", "n_active", "mask_kind", "subset_kind",
                               *(f"{prefix}_{part}" for prefix in ("mask", "subset") for part in _MASK_PARTS)])


class _TrainableSet:
    """What defines one trainable set (side, shape, mask and subset encodings), the encodings held
    weakly: enough to expand a CompactTensor, which holds only the set's key, without keeping a
    weight (or its masks) alive. Weak references to the encodings, not to the weight: a weight
    with a weak reference could no longer be swapped (``module.to()`` swaps parameters)."""

    def __init__(self, weight: "ResuTensor", on_release):
        self.side, self.storage_shape = weight.trainable_side, weight.storage_shape
        self.kinds = (weight.mask_kind, weight.subset_kind)
        self.refs, self.versions = {}, {}
        for prefix in ("mask", "subset"):
            for part in _MASK_PARTS:
                t = getattr(weight, f"{prefix}_{part}")
                if t is not None:
                    self.refs[f"{prefix}_{part}"] = weakref.ref(t, on_release)
                    self.versions[f"{prefix}_{part}"] = t._version

    def describes(self, weight: "ResuTensor") -> bool:
        """Whether this record holds ``weight``'s own encoding tensors (alive and unchanged)."""
        return self.alive() and all(ref() is getattr(weight, name) for name, ref in self.refs.items())

    def alive(self) -> bool:
        """Whether every encoding is still alive and unchanged (a whole-state ``copy_`` writes a
        new mask into the old tensors in place)."""
        return all((t := ref()) is not None and t._version == self.versions[name] for name, ref in self.refs.items())

    def trainable_flat(self, device) -> Optional[torch.Tensor]:
        """As :meth:`ResuTensor.trainable_flat`; raises LookupError unless :meth:`alive`."""
        if not self.alive():
            raise LookupError
        tensors = {name: ref() for name, ref in self.refs.items()}
        mask, subset = (EncodedMask(kind, *(tensors.get(f"{prefix}_{p}") for p in _MASK_PARTS))
                        for kind, prefix in zip(self.kinds, ("mask", "subset")))
        return trainable_flat_of(self.side, mask, subset, self.storage_shape, device)


# trainable_key → the _TrainableSet of each live weight with that set (the key is a content hash
# of the set, so any of them describes it). One record per weight whose encodings are distinct
# tensors, not one per key: ``nn.Parameter(w)`` and ``detach`` make new inner tensors, and the
# set must stay known while any of those weights lives, whichever is freed first.
_TRAINABLE_SETS: dict[int, list[_TrainableSet]] = {}


def remember_trainable_set(weight: "ResuTensor") -> None:
    """Record ``weight``'s trainable set so that :func:`expand_compact` can expand its gradients."""
    key = weight.trainable_key
    if key is None:
        return
    records = _TRAINABLE_SETS.get(key, [])
    if any(record.describes(weight) for record in records):
        return
    if is_traced(weight.first_inner_tensor()):
        return  # a trace value describes no real gradient

    def release(_ref, key=key):
        alive = [record for record in _TRAINABLE_SETS.get(key, []) if record.alive()]
        if alive:
            _TRAINABLE_SETS[key] = alive
        else:
            _TRAINABLE_SETS.pop(key, None)

    _TRAINABLE_SETS[key] = [*records, _TrainableSet(weight, release)]


def live_trainable_set(key: int) -> Optional[_TrainableSet]:
    """A live record of the trainable set ``key``, or None."""
    return next((record for record in _TRAINABLE_SETS.get(key, []) if record.alive()), None)


def expand_compact(compact: CompactTensor) -> torch.Tensor:
    """The dense tensor a CompactTensor stands for: its logical shape, its values at its trainable
    set's coordinates, zero elsewhere; the set taken from a live weight that has it.

    Example::

        loss.backward(); expand_compact(w.grad)   # same as w.expand_trainable(w.grad)
    """
    record = live_trainable_set(compact.trainable_key)
    if record is None:
        raise ValueError(
            f"cannot expand this CompactTensor (trainable_key={compact.trainable_key:#x}): no live ResuTensor has "
            "its trainable set any more; use weight.expand_trainable(compact) with the weight it belongs to")
    trainable = record.trainable_flat(compact.flat.device)
    dense = torch.zeros(record.storage_shape, dtype=compact.flat.dtype, device=compact.flat.device)
    if trainable is None:
        dense.view(-1).copy_(compact.flat)
    else:
        kernels.scatter_trainable_(dense, trainable, compact.flat)
    return dense.t() if compact.transposed else dense.view(compact.logical_shape)


def logical_shape_of(storage_shape, transposed: bool, view_shape) -> tuple:
    """The shape a weight shows: ``view_shape`` (N-D conv), the storage reversed (transposed), or
    the storage shape.

    Example::

        logical_shape_of((8, 36), False, (8, 4, 3, 3)), logical_shape_of((8, 12), True, None)   # N-D, (12, 8)
    """
    if view_shape is not None:
        return tuple(view_shape)
    return tuple(storage_shape[::-1]) if transposed else tuple(storage_shape)


class ResuTensor(FastPropertyAccess, NoDynamoFrames, FsdpRowSharding, TorchAOBaseTensor):
    """A weight that knows its mask, its mode and which coordinates train.

    Storage, mask, θ and QRESU groups are always an (out, in) matrix, N:M groups and QRESU groups
    along its rows (the reduction dimension). The logical shape over it is the matrix itself (a
    Linear weight), its transpose (``transposed``: an (in, out) weight such as transformers'
    Conv1D, or a ``w.t()`` view) or an N-D conv weight (``view_shape`` (out, in/groups, k...),
    the storage its row-major reshape (out, in·k...)).

    DENSE, SPARSE and RESU store ``values`` dense with θ in place at pruned slots, so the
    effective weight *is* the stored values. QRESU stores the frozen active weights as 4/8-bit
    codes (``qdata``, ``qscale``, ``qoffset``) and θ flat (``theta``, row-major over the pruned
    coordinates). The mask is an :mod:`~resu_tensor.core.mask_encoding` (indices or bitmap, whichever
    is smaller); a static RESU-Selective subset S ⊂ P is a second encoding (``subset_*``).

    Example::

        w = ResuTensor.from_dense(torch.randn(64, 128), sparsity=0.5)
        w.mode, w.sparsity          # (Mode.SPARSE, 0.5)
        w.dequantize()              # dense effective weight
    """

    tensor_data_names: list[str] = []
    tensor_attribute_names = [
        "storage_shape", "compute_dtype", "mode_name", "mask_kind", "trainable_side", "n_active",
        "target_sparsity", "trainable_key",
    ]
    optional_tensor_data_names = [
        "values", "mask_bitmap", "mask_block_prefix", "mask_indices",
        "qdata", "qscale", "qoffset", "theta",
        "subset_bitmap", "subset_block_prefix", "subset_indices",
        "selective_m", "selective_v", "grad_abs_sum",
    ]
    optional_tensor_attribute_names = ["transposed", "subset_kind", "quant_bits", "group_size", "selective", "nm_pattern",
                                       "row_keep", "view_shape"]

    def __new__(cls, storage_shape, compute_dtype, *args, **kwargs):
        shape = torch.Size(logical_shape_of(storage_shape, kwargs.get("transposed"), kwargs.get("view_shape")))
        device = next(t.device for t in kwargs.values() if isinstance(t, torch.Tensor))
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=contiguous_strides(shape), dtype=compute_dtype, device=device, requires_grad=False
        )

    def __init__(self, storage_shape, compute_dtype, mode_name, mask_kind, trainable_side, n_active,
                 target_sparsity, trainable_key, **optional):
        self.storage_shape = tuple(storage_shape)
        self.compute_dtype = compute_dtype
        self.mode_name = mode_name
        self.mask_kind = mask_kind
        self.trainable_side = trainable_side
        self.n_active = n_active
        self.target_sparsity = target_sparsity
        defaults = {"transposed": False, "subset_kind": "none", "quant_bits": None, "group_size": None,
                    "selective": None, "nm_pattern": None, "row_keep": None, "view_shape": None}
        for name in self.optional_tensor_data_names:
            setattr(self, name, optional.pop(name, None))
        for name, default in defaults.items():
            setattr(self, name, optional.pop(name, default))
        if optional:
            raise TypeError(f"unknown ResuTensor fields: {sorted(optional)}")
        self._key_cell = None
        self.trainable_key = trainable_key
        if self.view_shape is not None:
            self.view_shape = tuple(self.view_shape)
        # Set by layout ops on the views they make (w.t()): a view shares the weight's tensors, so
        # a mode change or in-place write on it would not reach the weight and is refused.
        self.layout_view = False
        remember_trainable_set(self)

    @property
    def trainable_key(self):
        """Content hash of the trainable set (None without one): an ``int`` in eager code, this
        weight's :class:`~resu_tensor.core.compact.LiveKey` while traced."""
        cell = self._key_cell
        return cell if self._key_traced else cell.value

    @trainable_key.setter
    def trainable_key(self, key) -> None:
        if isinstance(key, LiveKey) and is_traced(self.first_inner_tensor()):
            self._key_cell, self._key_traced = key, True  # a fake of the weight that owns the cell
            return
        if getattr(self, "_key_cell", None) is None or self._key_traced:
            self._key_cell, self._key_traced = LiveKey(key_value(key)), False
        else:
            # in place: graphs traced with this weight rebuild their outputs with the new key
            self._key_cell.value = key_value(key)
        self._key_cell.layout = self.graph_layout()
        if self._key_cell.value is not None:
            register_cell(self._key_cell)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in _LAYOUT_FIELDS:
            cell = self.__dict__.get("_key_cell")
            if cell is not None and not self.__dict__.get("_key_traced", True):
                cell.layout = self.graph_layout()  # see LiveKey.layout

    @torch._dynamo.disable
    def __tensor_flatten__(self):
        names, context = super().__tensor_flatten__()
        context["trainable_key"] = self._key_cell
        if self.trainable_side != "all":
            # The trainable count travels as the length of an inner tensor, not as a context int:
            # a compiled graph sees it as a size (a symbol, see _CARRIER_SOURCE) instead of a
            # constant it would have to guard on or, unguarded, bake in.
            names.append(_COUNT_CARRIER)
            if self.trainable_side in ("active", "pruned"):
                context["n_active"] = None  # follows from the count (__tensor_unflatten__)
        # inner tensors of one value per pruned or trainable coordinate go under names whose
        # lengths are symbols too (_COUNT_SIZED_SOURCE); every other one has the weight's shape
        return [_COUNT_SIZED.get(name, name) for name in names], context

    @classmethod
    @torch._dynamo.disable
    def __tensor_unflatten__(cls, tensor_data_dict, tensor_attributes, outer_size, outer_stride):
        carrier = tensor_data_dict.get(_COUNT_CARRIER)
        if carrier is not None:
            tensor_data_dict = {name: t for name, t in tensor_data_dict.items() if name != _COUNT_CARRIER}
            count, side = carrier.shape[0], tensor_attributes["trainable_side"]
            if side in ("active", "pruned"):
                rows, cols = tensor_attributes["storage_shape"]
                tensor_attributes = {**tensor_attributes, "n_active": count if side == "active" else rows * cols - count}
        tensor_data_dict = {_FIELD_OF_COUNT_SIZED.get(name, name): t for name, t in tensor_data_dict.items()}
        tensor = super().__tensor_unflatten__(tensor_data_dict, tensor_attributes, outer_size, outer_stride)
        if carrier is not None:
            tensor.__dict__["_carrier"] = carrier
        return tensor

    @property
    def trainable_count_carrier(self) -> torch.Tensor:
        """A tensor of length :attr:`trainable_count` over one byte of storage (stride 0): how the
        count enters a compiled graph (see ``__tensor_flatten__``).

        Example::

            w.trainable_count_carrier.shape[0] == w.trainable_count
        """
        carrier = self.__dict__.get("_carrier")
        if carrier is not None and (is_trace_value(carrier) or (carrier.shape[0] == self.trainable_count
                                                                and carrier.device == self.device_of_storage)):
            return carrier
        # from an inner tensor: a trace value's carrier (a weight made inside a compiled function) is one too
        carrier = self.first_inner_tensor().new_zeros((1,), dtype=torch.uint8).expand(self.trainable_count)
        self.__dict__["_carrier"] = carrier
        return carrier

    def graph_layout(self) -> tuple:
        """What a compiled graph over this weight depends on: its inner tensors' names and its
        flatten context but for the trainable key (a live cell) and ``target_sparsity``.

        Example::

            w.graph_layout() == v.graph_layout()  # one compiled graph serves both
        """
        # read off __dict__ (what __tensor_flatten__ reports), so that a weight being restored
        # field by field (unpickling) has a layout at every step
        fields = self.__dict__
        return (tuple(name for name in self.optional_tensor_data_names if fields.get(name) is not None),
                tuple((name, fields.get(name)) for name in _ATTRIBUTE_NAMES))

    def __deepcopy__(self, memo):
        copied = super().__deepcopy__(memo)
        if not self._key_traced and copied._key_cell is self._key_cell:
            # torch deep-copies __dict__, and a cell deep-copies to itself (Dynamo's guards rely on
            # that): the copy gets a cell of its own, else a new mask of one would relabel the other
            copied._key_cell = LiveKey(self._key_cell.value, copied.graph_layout())
            if copied._key_cell.value is not None:
                register_cell(copied._key_cell)
        return copied

    def __getstate__(self) -> dict:
        # the key as a number: a copy or a loaded weight gets a cell of its own
        state = {name: value for name, value in self.__dict__.items()
                 if name not in ("_key_cell", "_key_traced", "_carrier")}
        state["trainable_key"] = self._key_cell.value
        return state

    def fields(self) -> dict:
        """Every constructor argument, by name (see :meth:`replace`)."""
        names = [*self.tensor_attribute_names, *self.optional_tensor_data_names, *self.optional_tensor_attribute_names]
        return {name: getattr(self, name) for name in names}

    def replace(self, **changes) -> "ResuTensor":
        """A new ResuTensor with the same fields except ``changes`` (tensors are shared, not copied)."""
        replaced = ResuTensor(**{**self.fields(), **changes})
        carrier = self.__dict__.get("_carrier")
        if (carrier is not None and is_trace_value(carrier) and _TRAINABLE_FIELDS.isdisjoint(changes)
                and carrier.device == replaced.device_of_storage):
            # same trainable set: the trace's count symbol carries over (a carrier made later, at
            # flattening, would be made outside the trace's modes)
            replaced.__dict__["_carrier"] = carrier
        return replaced

    def _apply_fn_to_data(self, fn):
        applied = self.replace(**{n: fn(getattr(self, n)) for n in self.optional_tensor_data_names
                                  if getattr(self, n) is not None})
        carrier = self.__dict__.get("_carrier")
        if carrier is not None and is_trace_value(carrier):
            applied.__dict__["_carrier"] = fn(carrier)  # as in replace: made inside the trace
        return applied

    def first_inner_tensor(self) -> torch.Tensor:
        """One of the inner tensors (every mode has at least one): its device is the weight's, and
        it tells whether the weight is a trace value."""
        return next(getattr(self, n) for n in self.optional_tensor_data_names if getattr(self, n) is not None)

    def moved(self, device, dtype: torch.dtype) -> "ResuTensor":
        """This weight on ``device`` with compute dtype ``dtype``: the dense values follow ``dtype``;
        θ, codes and scales keep theirs (their precision is a choice).

        Example::

            w.moved("cuda", torch.bfloat16)   # what w.to("cuda", torch.bfloat16) gives
        """
        moved = {n: getattr(self, n).to(device) for n in self.optional_tensor_data_names if getattr(self, n) is not None}
        if self.values is not None:
            moved["values"] = self.values.to(device=device, dtype=dtype)
        return self.replace(compute_dtype=dtype, **moved)

    # ----------------------------------------------------------------- construction
    # Construction and mode changes are eager-only: data-dependent (masks, counts, hashes) and
    # mutating Python attributes. Inside a compiled function they graph-break and run as they are
    # (torch._dynamo.disable), instead of Dynamo compiling their frames with symbolic arguments.
    @classmethod
    @torch._dynamo.disable
    def from_dense(cls, weight: torch.Tensor, sparsity: float = 0.0, method: str = "magnitude",
                   generator: Optional[torch.Generator] = None, *, transposed: bool = False) -> "ResuTensor":
        """Wrap a dense weight: DENSE when ``sparsity == 0``, else pruned to SPARSE by ``method``.

        ``weight`` is a Linear weight (out, in), an N-D conv weight (out, in/groups, k...) (mask,
        N:M and QRESU groups over its (out, in·k...) reshape, N:M along in·k...), or with
        ``transposed=True`` an (in, out) weight (transformers' Conv1D) stored as its transpose, so
        mask, N:M groups and QRESU groups are those of the equivalent Linear.

        Example::

            w = ResuTensor.from_dense(linear.weight.detach(), sparsity=0.5, method="magnitude")
            linear.weight = torch.nn.Parameter(w)
            c = ResuTensor.from_dense(conv1d_hf.weight.detach(), 0.5, transposed=True)   # c.shape: (in, out)
        """
        check_weight(weight, transposed)
        check_sparsity(sparsity)
        dense = weight.detach()
        view_shape = tuple(dense.shape) if dense.dim() > 2 else None
        values = (dense.t() if transposed else dense.reshape(dense.shape[0], -1)).clone().contiguous()
        tensor = cls(**build_state(values.shape, values.dtype, mode=Mode.DENSE, mask=EncodedMask("none"),
                                   trainable_side="all", values=values, transposed=transposed, view_shape=view_shape,
                                   where="ResuTensor.from_dense"))
        if sparsity > 0:
            tensor.prune(sparsity, method=method, generator=generator)
        return tensor

    @classmethod
    @torch._dynamo.disable
    def from_fields(cls, fields: dict, where: str = "ResuTensor") -> "ResuTensor":
        """A ResuTensor of recorded ``fields`` (as :meth:`fields` returns them), after
        :func:`~resu_tensor.core.state.check_state` refused any that break an invariant
        (``ValueError`` naming the field, prefixed by ``where``).

        Example::

            same = ResuTensor.from_fields(w.fields())
        """
        check_state(fields, where)
        return cls(**fields)

    @torch._dynamo.disable
    def set_state_(self, *, mode: Mode, mask: EncodedMask, trainable_side: str, values: Optional[torch.Tensor] = None,
                   quantized: Optional[QuantizedActive] = None, subset: Optional[EncodedMask] = None,
                   target_sparsity: Optional[float] = None, **resu_state) -> None:
        """Replace this tensor's contents in place (same Python object, so a Parameter and the
        optimizer's reference to it stay valid), through :func:`~resu_tensor.core.state.build_state`:
        a state that breaks an invariant raises ``ValueError`` and leaves the tensor unchanged.
        Exactly one of ``values`` (dense storage) and ``quantized`` (a QuantizedActive) is given.
        ``resu_state`` may set ``selective``, ``selective_m``, ``selective_v``, ``grad_abs_sum``
        (the others reset), ``nm_pattern`` and ``row_keep`` (kept when not given). Drops ``.grad``
        when the trainable set changes.

        Example::

            w.set_state_(mode=Mode.SPARSE, mask=encode_mask(keep), trainable_side="active",
                         values=w.values.masked_fill(~keep, 0))
        """
        if self.layout_view:
            raise ValueError("lifecycle changes apply to the weight itself, not to a view of it (w.t())")
        if trainable_side not in TRAINABLE_SIDES:
            raise ValueError(f"trainable_side must be one of {TRAINABLE_SIDES}, got {trainable_side!r}")
        if values is not None and (tuple(values.shape) != self.storage_shape or values.dtype != self.compute_dtype):
            raise ValueError("set_state_ cannot change the weight's shape or dtype")
        unknown = set(resu_state) - {"selective", "selective_m", "selective_v", "grad_abs_sum", "nm_pattern", "row_keep"}
        if unknown:
            raise TypeError(f"unknown RESU state fields: {sorted(unknown)}")
        resu_state.setdefault("nm_pattern", self.nm_pattern)
        resu_state.setdefault("row_keep", self.row_keep)
        fields = build_state(
            self.storage_shape, self.compute_dtype, mode=mode, mask=mask, trainable_side=trainable_side,
            values=values, quantized=quantized, subset=subset,
            target_sparsity=self.target_sparsity if target_sparsity is None else target_sparsity,
            transposed=self.transposed, view_shape=self.view_shape, where="ResuTensor.set_state_", **resu_state)
        old_key = self.trainable_key
        for name, value in fields.items():
            setattr(self, name, value)
        if self.trainable_key != old_key:
            self.grad = None
            remember_trainable_set(self)

    # ----------------------------------------------------------------- queries
    @property
    def mode(self) -> Mode:
        return Mode(self.mode_name)

    @property
    def logical_shape(self) -> tuple:
        """``tuple(self.shape)`` from plain attributes: hot paths avoid tensor properties, which
        go through ``__torch_function__``."""
        if self.view_shape is not None:
            return self.view_shape
        return self.storage_shape[::-1] if self.transposed else self.storage_shape

    def to_logical(self, t: torch.Tensor) -> torch.Tensor:
        """A storage-oriented (out, in) tensor in this weight's logical shape (a view).

        Example::

            w = ResuTensor.from_dense(torch.randn(8, 4, 3, 3)); w.to_logical(w.values).shape   # (8, 4, 3, 3)
        """
        if self.view_shape is not None:
            return t.view(self.view_shape)
        return t.t() if self.transposed else t

    def to_storage(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor of this weight's logical shape in storage orientation (out, in) (a view where
        the layout allows; ``.contiguous()`` it for kernels).

        Example::

            w = ResuTensor.from_dense(torch.randn(12, 8), transposed=True); w.to_storage(w.mask()).shape   # (8, 12)
        """
        if self.view_shape is not None:
            return t.reshape(self.storage_shape)
        return t.t() if self.transposed else t

    @property
    def storage_numel(self) -> int:
        return self.storage_shape[0] * self.storage_shape[1]

    @property
    def sparsity(self) -> float:
        """Fraction of coordinates pruned (0.0 in DENSE)."""
        return 1.0 - self.n_active / self.storage_numel

    @property
    def trainable_count(self) -> int:
        carrier = self.__dict__.get("_carrier")
        if carrier is not None and is_trace_value(carrier):
            return carrier.shape[0]  # a symbol: never the count this graph was first traced with
        if self.trainable_side == "subset":
            return self._subset_count()
        numel = self.storage_numel
        return {"all": numel, "active": self.n_active, "pruned": numel - self.n_active}[self.trainable_side]

    def _subset_count(self) -> int:
        """Members of the static subset. Counting decodes the subset (and syncs a GPU), and every
        op on the weight asks, so the count is kept while the subset tensor is the same object at
        the same version (any in-place change bumps it)."""
        encoded = self.encoded_subset()
        subset = encoded.bitmap if encoded.bitmap is not None else encoded.indices
        if subset is None or is_traced(subset):
            return active_count(encoded, self.storage_numel)
        return self.kept_while_unchanged("_subset_count_cache", subset,
                                         lambda: active_count(encoded, self.storage_numel))

    def kept_while_unchanged(self, name: str, source: torch.Tensor, compute):
        """``compute()``, kept in attribute ``name`` while ``source`` is the same tensor object at
        the same version (any in-place change bumps it)."""
        cached = getattr(self, name, None)
        if cached is None or cached[0] is not source or cached[1] != source._version:
            cached = (source, source._version, compute())
            setattr(self, name, cached)
        return cached[2]

    @property
    def device_of_storage(self) -> torch.device:
        return self.first_inner_tensor().device

    def encoded_mask(self) -> EncodedMask:
        return EncodedMask(self.mask_kind, self.mask_bitmap, self.mask_block_prefix, self.mask_indices)

    def encoded_subset(self) -> EncodedMask:
        return EncodedMask(self.subset_kind, self.subset_bitmap, self.subset_block_prefix, self.subset_indices)

    def storage_mask(self) -> torch.Tensor:
        """Bool mask (True = active) in the weight's storage orientation (out, in)."""
        return decode_mask(self.encoded_mask(), self.storage_shape, self.device_of_storage)

    def mask(self) -> torch.Tensor:
        """Bool mask of this tensor's logical shape, True = active."""
        return self.to_logical(self.storage_mask())

    def trainable_flat(self) -> Optional[torch.Tensor]:
        """Row-major bool mask of the trainable coordinates over storage, or None if all train."""
        if self.trainable_side == "all":
            return None
        return trainable_flat_of(self.trainable_side, self.encoded_mask(), self.encoded_subset(), self.storage_shape,
                                 self.device_of_storage)

    def trainable_mask(self) -> torch.Tensor:
        """Bool mask of this tensor's logical shape, True = the optimizer may change it."""
        flat = self.trainable_flat()
        if flat is None:
            flat = torch.ones(self.storage_numel, dtype=torch.bool, device=self.device_of_storage)
        return self.to_logical(flat.view(self.storage_shape))

    def _theta_selection(self) -> Optional[torch.Tensor]:
        """QRESU with a subset: which θ entries (row-major over P) are trainable; None = all of θ."""
        if self.trainable_side != "subset":
            return None
        pruned = ~self.storage_mask().view(-1)
        return self.trainable_flat()[pruned]

    def storage_weight(self) -> torch.Tensor:
        """W_eff = M⊙W + (1−M)⊙Φ(θ) in storage orientation: the stored values themselves (no copy)
        except in QRESU, where W_A is dequantized and θ scattered into a new tensor."""
        if self.values is not None:
            return self.values
        return qresu_effective_weight(self)

    def effective_weight(self) -> torch.Tensor:
        """W_eff in this tensor's logical orientation (a view of the storage where possible)."""
        return self.to_logical(self.storage_weight())

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Dense effective weight W_eff = M⊙W + (1−M)⊙Φ(θ), a new plain tensor."""
        w = self.effective_weight()
        return w.to(output_dtype, copy=True) if output_dtype is not None else w.clone()

    def nbytes_breakdown(self) -> dict[str, int]:
        """Bytes actually held, by part: values (dense storage, or θ in QRESU), mask, and where
        present quantized (W_A codes, scales, offsets), subset, selective (EMAs), grad_stats and
        selection_cache (bitmap positions the CPU kernels keep during a training step)."""
        def nbytes(*names):
            return sum(getattr(self, n).nbytes for n in names if getattr(self, n) is not None)

        parts = {"values": nbytes("values", "theta"), "mask": encoded_nbytes(self.encoded_mask())}
        extra = {"quantized": nbytes("qdata", "qscale", "qoffset"), "subset": encoded_nbytes(self.encoded_subset()),
                 "selective": nbytes("selective_m", "selective_v"), "grad_stats": nbytes("grad_abs_sum"),
                 "selection_cache": held_selection_nbytes(self.mask_bitmap) + held_selection_nbytes(self.subset_bitmap)}
        return {**parts, **{k: v for k, v in extra.items() if v}}

    def trainable_bitmap(self) -> Optional[tuple]:
        """``(bitmap, block_prefix, block_size, invert, count)`` when the trainable set can be read
        straight off a packed bitmap (the mask's set bits, its clear bits, or a subset's set bits),
        the arguments of the ``*_by_bitmap`` kernels; None for other encodings or when all train."""
        if self.trainable_side in ("active", "pruned") and self.mask_kind == "bitmap":
            bitmap, prefix, invert = self.mask_bitmap, self.mask_block_prefix, self.trainable_side == "pruned"
        elif self.trainable_side == "subset" and self.subset_kind == "bitmap":
            bitmap, prefix, invert = self.subset_bitmap, self.subset_block_prefix, False
        else:
            return None
        return bitmap, prefix, prefix_block_size(self.storage_shape[1]), invert, self.trainable_count

    def bitmap_kernels_for(self, t: torch.Tensor) -> Optional[tuple]:
        """:meth:`trainable_bitmap` where the bitmap kernels can serve ``t``: always in eager mode,
        and under torch.compile on CUDA (the Triton ops have fixed-size fakes; the CPU references
        index by a decoded mask, a data-dependent size Dynamo cannot trace)."""
        if t.device.type != "cuda" and is_traced(t):
            return None
        return self.trainable_bitmap()

    # ----------------------------------------------------------------- trainable coordinates
    def gather_trainable(self, dense: torch.Tensor) -> torch.Tensor:
        """The trainable coordinates of a storage-oriented (out, in) tensor (or, for an N-D conv
        weight, one of its logical shape: the same row-major order), flat."""
        if dense.dim() != 2:
            dense = dense.reshape(self.storage_shape)
        bits = self.bitmap_kernels_for(dense)
        if bits is not None:
            return kernels.gather_by_bitmap(dense.contiguous(), *bits)
        flat = self.trainable_flat()
        if flat is None:
            return dense.reshape(-1)
        if is_traced(flat):
            # Bool-mask indexing has a data-dependent length, which Dynamo refuses to trace (graph
            # break); the count is known, so gather at that fixed size instead.
            indices = torch.nonzero_static(flat, size=self.trainable_count).view(-1)
            return dense.reshape(-1).index_select(0, indices)
        return kernels.gather_trainable(dense, flat)

    @property
    def trainable_values_are_storage(self) -> bool:
        """Whether :meth:`trainable_values` is a view of the storage (so in-place ops on it have
        already updated the weight and no write-back is needed)."""
        return self.trainable_side == "all" if self.values is not None else self.trainable_side != "subset"

    def trainable_values(self) -> torch.Tensor:
        """The trainable coordinates' current values, flat; a view (writes go straight to the
        weight) where the storage allows it, else a copy to hand back to write_trainable_."""
        if self.values is not None:
            return self.gather_trainable(self.values)
        selection = self._theta_selection()
        return self.theta if selection is None else self.theta[selection]

    def write_trainable_(self, flat: torch.Tensor) -> None:
        """Store ``flat`` (from :meth:`trainable_values`, updated) back into the weight."""
        if self.values is not None:
            bits = self.bitmap_kernels_for(flat)
            if bits is not None:
                kernels.scatter_by_bitmap_(self.values, *bits[:4], flat)
                return
            trainable = self.trainable_flat()
            if trainable is None:
                if flat.data_ptr() != self.values.data_ptr():
                    self.values.view(-1).copy_(flat)
                return
            kernels.scatter_trainable_(self.values, trainable, flat)
            return
        selection = self._theta_selection()
        if selection is None:
            if flat.data_ptr() != self.theta.data_ptr():
                self.theta.copy_(flat)
        else:
            self.theta.masked_scatter_(selection, flat.to(self.theta.dtype))

    def compact(self, flat: torch.Tensor) -> CompactTensor:
        if flat.numel() != self.trainable_count:
            raise ValueError(f"expected {self.trainable_count} trainable values, got {flat.numel()}")
        remember_trainable_set(self)
        # the cell, not just its value: the tensor belongs to this weight (see CompactTensor._cell)
        key = self._key_cell if self._key_cell.value is not None else None
        return CompactTensor(flat, key, self.logical_shape, self.transposed)

    def expand_trainable(self, compact: torch.Tensor) -> torch.Tensor:
        """A dense tensor of this tensor's logical shape: ``compact`` at trainable coordinates,
        zero elsewhere (e.g. to inspect ``w.grad``)."""
        if isinstance(compact, CompactTensor):
            if compact.trainable_key != self.trainable_key:
                raise ValueError("this CompactTensor belongs to another trainable set of the weight")
            compact = compact.flat
        dense = torch.zeros(self.storage_shape, dtype=compact.dtype, device=compact.device)
        flat = self.trainable_flat()
        if flat is None:
            dense.view(-1).copy_(compact)
        else:
            kernels.scatter_trainable_(dense, flat, compact)
        return self.to_logical(dense)

    # ----------------------------------------------------------------- lifecycle (see transitions.py)
    @torch._dynamo.disable
    def prune(self, sparsity: Optional[float], method: str = "magnitude", generator: Optional[torch.Generator] = None,
              granularity: str = "element", scores: Optional[torch.Tensor] = None) -> "ResuTensor":
        """Prune to ``sparsity`` by ``method`` at ``granularity`` (element, row, structured_row,
        structured_column or "N:M" with sparsity None) → SPARSE; ``scores`` (out, in) overrides the
        method's own (wanda needs them). Returns self.

        Example::

            w.prune(0.5, granularity="row"); w.prune(None, granularity="2:4")
        """
        transitions.prune(self, sparsity, method, generator, granularity, scores)
        return self

    @torch._dynamo.disable
    def enter_resu(self, epsilon: float = 0.1, freeze_active: bool = True,
                   generator: Optional[torch.Generator] = None, **options) -> "ResuTensor":
        """SPARSE → RESU: θ ~ N(0, (ε·σ_A)²) in the pruned slots; ``quantize_bits=4`` → QRESU.
        Options: see :func:`resu_tensor.core.transitions.enter_resu`. Returns self."""
        transitions.enter_resu(self, epsilon, freeze_active, generator, **options)
        return self

    @torch._dynamo.disable
    def commit(self, strategy: str = "simple", **options):
        """RESU/QRESU → SPARSE: merge θ and choose the new mask by ``strategy`` ("amnesty",
        "wanda_reprune", "magnitude", "simple"); options: see :func:`resu_tensor.core.transitions.commit`.
        Returns the commit's AmnestyStats."""
        return transitions.commit(self, strategy, **options)

    def _stable_hash_for_caching(self) -> str:
        """What AOT autograd's cache key records of this tensor: every non-tensor field (mode,
        mask kind, trainable side and set, quantization, ...) and each inner tensor's metadata
        (shape, stride, dtype, device), not its values."""
        return stable_hash(self.fields(), self.requires_grad)

    def __repr__(self) -> str:
        """``ResuTensor(tensor([[...]]), mode=..., ...)``: W_eff formatted as torch formats a plain
        tensor (summarised when large), then this weight's identity. Under torch.compile tracing
        there are no values to show: shape and dtype take their place."""
        storage = self.first_inner_tensor()
        # a trace value's sparsity is symbolic (see __tensor_flatten__): no number to show
        sparsity = "" if is_trace_value(storage) else f"sparsity={self.sparsity:.4f}, "
        identity = (f"mode={self.mode_name}, {sparsity}mask={self.mask_kind}, "
                    f"trainable={self.trainable_side}{', transposed' if self.transposed else ''}")
        if is_traced(storage) or storage.device.type == "meta":
            return f"ResuTensor(shape={tuple(self.shape)}, dtype={self.dtype}, {identity})"
        with torch.no_grad():
            values = repr(self.effective_weight())
        return "ResuTensor(" + values.replace("\n", "\n" + " " * len("ResuTensor(")) + f", {identity})"


def _restore_checked(self, state) -> None:
    """Unpickling (torch.load, weights_only or not; copy.deepcopy): the recorded fields, upgraded
    from the first layout (``nm``, a ``selective`` tuple), are checked before the tensor is usable,
    so a corrupted file fails at load with a ValueError naming the field."""
    if isinstance(state, dict):
        state = upgrade_legacy_fields(state)
    _torchao_base_tensor__setstate__(self, state)
    check_state(self.fields(), where="ResuTensor (unpickled by torch.load)")


# The fields a compiled graph over a weight depends on (what ResuTensor.graph_layout reads); the
# active count is a size (see ResuTensor.__tensor_flatten__), not part of the layout; where it is
# not (a subset's), the weight's own flatten context still holds and guards it.
_ATTRIBUTE_NAMES = tuple(name for name in (*ResuTensor.tensor_attribute_names, *ResuTensor.optional_tensor_attribute_names)
                         if name not in ("trainable_key", "target_sparsity", "n_active"))
_LAYOUT_FIELDS = frozenset([*_ATTRIBUTE_NAMES, *ResuTensor.optional_tensor_data_names])

# TorchAOBaseTensor.__init_subclass__ installs its own __setstate__ on each subclass: ours goes in after.
ResuTensor.__setstate__ = _restore_checked
# A ResuTensor's pickled state holds its SelectiveConfig; torch.load(weights_only=True) must accept it.
torch.serialization.add_safe_globals([SelectiveConfig])

for _name, _inner in _COUNT_SIZED.items():  # what a compiled graph reads under the inner names
    setattr(ResuTensor, _inner, property(lambda self, name=_name: getattr(self, name)))

# Dynamo keeps a parameter's sizes static (config.force_parameter_static_shapes), inner tensors
# included; the count carrier and the count-sized vectors (under their inner-tensor names) are
# exempt, so that a new count reuses a graph traced with a symbol for it. The patterns name no
# other tensor.
_CARRIER_SOURCE = rf".*\.{_COUNT_CARRIER}"
_COUNT_SIZED_SOURCE = rf".*\.{_COUNT_SIZED_PREFIX}\w+"
for _source in (_CARRIER_SOURCE, _COUNT_SIZED_SOURCE):
    if _source not in torch.compiler.config.dynamic_sources.split(","):
        torch.compiler.config.dynamic_sources = ",".join(filter(None, [torch.compiler.config.dynamic_sources, _source]))

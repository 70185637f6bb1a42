"""CompactTensor: a gradient or optimizer state holding only one trainable set's coordinates."""
import hashlib
import weakref
from typing import Callable, Optional

import torch
from torchao.utils import TorchAOBaseTensor

from resu_tensor.core.tracing import is_traced


# What runs an aten op that no op table of the operands' classes holds; set by resu_tensor.ops
# (the layer that knows how to compute on the dense view), None until that package is imported.
_unhandled_op: Optional[Callable] = None


# What runs a torch function on a ResuTensor that its torch-function table does not hold (the
# autograd entry of resu_tensor.ops.fallback); None: the function runs as it is.
_unhandled_function: Optional[Callable] = None


def set_unhandled_op_handler(handler: Callable) -> None:
    """Install ``handler(func, types, args, kwargs)`` for aten ops without a table entry."""
    global _unhandled_op
    _unhandled_op = handler


def set_unhandled_function_handler(handler: Callable) -> None:
    """Install ``handler(func, types, args, kwargs)`` for torch functions of a ResuTensor
    without a torch-function table entry."""
    global _unhandled_function
    _unhandled_function = handler


class NoDynamoFrames:
    """Keeps Dynamo from compiling the frames of a subclass's dispatch and (un)flattening.

    Dynamo never traces these (it runs them on fake tensors itself), but inside a compiled
    function they also run eagerly, after a graph break (e.g. at ``loss.backward()``) or in
    AOTAutograd's runtime wrappers, and Dynamo would compile those frames as user code: it
    recompiles per tensor and turns attributes such as ``trainable_key`` into SymInts.

    An op in no operand class's table goes to the handler installed by
    :func:`set_unhandled_op_handler` (the dense fallback of ``resu_tensor.ops``).
    """

    @classmethod
    @torch._dynamo.disable
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        tables = cls._ATEN_OP_TABLE
        if func in tables.get(cls, ()):
            return tables[cls][func](func, types, args, kwargs or {})
        if any(func in tables.get(t, ()) for t in types if t is not cls):
            return NotImplemented  # another operand's class handles it
        if _unhandled_op is None:
            return super().__torch_dispatch__(func, types, args, kwargs)
        return _unhandled_op(func, types, args, kwargs or {})

    @classmethod
    @torch._dynamo.disable
    def __tensor_unflatten__(cls, tensor_data_dict, tensor_attributes, outer_size, outer_stride):
        return super().__tensor_unflatten__(tensor_data_dict, tensor_attributes, outer_size, outer_stride)

    @torch._dynamo.disable
    def __tensor_flatten__(self):
        return super().__tensor_flatten__()

    @classmethod
    def __metadata_guard__(cls, recorded, now) -> bool:
        return same_metadata(recorded, now)


class LiveKey:
    """The trainable key of one ResuTensor object, shared with its compile-time fakes.

    A compiled graph rebuilds its subclass outputs from the flatten context recorded when it was
    traced, so a key written there as a number would label every later gradient with the mask of
    that first trace. The context holds this cell instead: a gradient (or optimizer state) rebuilt
    at run time reads the weight's key as it is then, and a new mask of the same weight reuses
    the graph (the guard compares cells by identity, see :func:`same_metadata`). Eager tensors
    keep a plain ``int`` key; only trace values carry the cell itself as ``trainable_key``.
    """

    __slots__ = ("value", "layout", "__weakref__")

    def __init__(self, value, layout=None):
        self.value = value
        # the owning weight's graph layout (``ResuTensor.graph_layout``), kept current by the
        # weight as its fields change; None: owned by no weight. A snapshot rather than a
        # reference to the weight: torch.utils.swap_tensors (module.to(), ...) refuses tensors
        # with weak references, and a strong one would keep the weight's storage alive until GC.
        self.layout = layout

    def __reduce__(self):
        # AOT autograd's cache pickles graph metadata: a loaded cell is the live one of a weight
        # that has this key now
        return live_cell, (self.value,)

    def __eq__(self, other):
        return key_value(self) == key_value(other)

    def __ne__(self, other):
        return not self == other

    def __hash__(self):
        return hash(self.value)

    def __deepcopy__(self, memo):
        return self  # Dynamo's guard keeps a deep copy of the context: the same cell, not a new one

    def __copy__(self):
        return self

    def __format__(self, spec):
        return format(self.value, spec)

    def __repr__(self):
        return f"LiveKey({self.value!r})"


# key value → weak references to the cells of the weights that have that key now: a CompactTensor
# (eager, plain int key) enters a graph with the cell of a weight of its own set.
_CELLS: dict[int, list] = {}


def register_cell(cell: LiveKey) -> None:
    """Record that ``cell``'s weight now has the key ``cell.value``."""
    records = [r for r in _CELLS.get(cell.value, []) if (c := r()) is not None and c is not cell and c.value == cell.value]
    _CELLS[cell.value] = [*records, weakref.ref(cell)]


def cell_for(key) -> Optional[LiveKey]:
    """The cell of a live weight whose key is ``key`` now, or None."""
    for record in reversed(_CELLS.get(key, ())):
        cell = record()
        if cell is not None and cell.value == key:
            return cell
    _CELLS.pop(key, None)
    return None


def live_cell(key) -> LiveKey:
    """The cell of a live weight whose key is ``key`` now, else a new cell owned by no weight."""
    return cell_for(key) or LiveKey(key)


def key_value(key):
    """The number a key stands for (a :class:`LiveKey`'s current value, else ``key``)."""
    return key.value if isinstance(key, LiveKey) else key


def traced_key(key, inner: torch.Tensor):
    """What a new tensor over ``inner`` keeps as ``trainable_key``: the cell itself while traced
    (so graph outputs follow the weight), its current value in eager code."""
    return key if is_traced(inner) else key_value(key)


# Context entries that only describe and never shape a traced graph: a compiled graph is reused
# across their values. The trainable key is a LiveKey (compared by identity, below).
_UNGUARDED = frozenset(["target_sparsity"])


def same_metadata(recorded: dict, now: dict) -> bool:
    """Dynamo's guard on a subclass's flatten context (``__metadata_guard__``): equal except for
    unguarded entries, keys compared as cells (same weight object) or, where one side is a plain
    number (a CompactTensor of an earlier set), by value, so a stale tensor never reuses a graph
    traced for a live one."""
    if recorded.keys() != now.keys():
        return False
    for name, value in recorded.items():
        other = now[name]
        if name in _UNGUARDED:
            continue
        if isinstance(value, LiveKey) or isinstance(other, LiveKey):
            if value is not other:
                return False
        elif value != other:
            return False
    return True


def contiguous_strides(shape) -> tuple:
    """Row-major strides of ``shape``.

    Example::

        contiguous_strides((8, 4, 3, 3))   # (36, 9, 3, 1)
    """
    strides, step = [], 1
    for size in reversed(tuple(shape)):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


def stable_hash(fields: dict, requires_grad: bool) -> str:
    """A process-independent digest of a subclass's fields for AOT autograd's cache key: inner
    tensors by their metadata, other values by their repr (stable for ints, floats, strings,
    tuples, dtypes and the frozen config dataclasses)."""
    parts = [f"requires_grad={requires_grad}"]
    for name, value in sorted(fields.items()):
        if isinstance(value, torch.Tensor):
            value = ("tensor", tuple(value.shape), value.stride(), str(value.dtype), value.device.type)
        parts.append(f"{name}={value!r}")
    return hashlib.blake2b("|".join(parts).encode(), digest_size=16).hexdigest()


_NO_FUNCTIONS: dict = {}
_PROPERTY_ACCESS = type(torch.Tensor.grad.__get__)  # what __torch_function__ gets for .grad, .shape, ...
_DATA_SETTER = torch.Tensor.data.__set__
# Functions that only read the wrapper's dtype (the optimizers' per-parameter checks call them).
_DTYPE_QUERIES = frozenset([torch.is_complex, torch.Tensor.is_complex, torch.is_floating_point,
                            torch.Tensor.is_floating_point])


class FastPropertyAccess:
    """Tensor properties (``.grad``, ``.shape``, ``.requires_grad``, ...) and dtype queries
    (``torch.is_complex``, ...) skip the op table: the optimizers and hooks read them about 15
    times per parameter per step and the table never holds them, so the lookup would only add
    host time to each read. Functions outside the table go to the handler installed by
    :func:`set_unhandled_function_handler` (autograd's entry to the dense view)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # the ``.data`` setter goes to the table (ops/layout.py): by default it would leave the values unchanged
        if (type(func) is _PROPERTY_ACCESS and func != _DATA_SETTER) or func in _DTYPE_QUERIES:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        handler = getattr(cls, "_TORCH_FN_TABLE", _NO_FUNCTIONS).get(cls, _NO_FUNCTIONS).get(func)
        if handler is not None:  # what torchao's __torch_function__ would call, after its own lookups
            return handler(func, types, args, kwargs or {})
        if _unhandled_function is not None:
            return _unhandled_function(func, types, args, kwargs or {})
        return super().__torch_function__(func, types, args, kwargs)


# logical shape (a tuple of ints) → (torch.Size, row-major strides) of the wrapper: a gradient and
# its optimizer state are wrapped several times per weight per step, always at the same few shapes.
# Bounded, should shapes be many (e.g. per-sample tensors): beyond it the layout is computed per call.
_WRAPPER_LAYOUTS: dict = {}
_MAX_WRAPPER_LAYOUTS = 4096


class CompactTensor(NoDynamoFrames, TorchAOBaseTensor):
    """Logical shape: its weight's ((out, in), (in, out) or N-D conv); stores only the trainable
    coordinates of one ResuTensor, flat, in row-major order of the weight's storage.

    ``trainable_key`` names the trainable set the values belong to: ops that mix a CompactTensor
    with a weight or state of another set raise instead of misapplying it. ``transposed`` marks
    the compact form of a transposed weight view (autograd's ``t()`` backward flips it back).
    """

    tensor_data_names = ["flat"]
    tensor_attribute_names = ["trainable_key", "logical_shape", "transposed"]
    # No torch functions of its own: ops go straight to __torch_dispatch__, and the properties
    # optimizers read per parameter per step (.grad, .shape, ...) stay in C (as DTensor does).
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __new__(cls, flat: torch.Tensor, trainable_key: int, logical_shape, transposed: bool = False):
        try:
            layout = _WRAPPER_LAYOUTS.get(logical_shape)
            cacheable = True
        except TypeError:  # a list, or traced sizes (SymInts do not hash)
            layout, cacheable = None, False
        if layout is None:
            shape = torch.Size(logical_shape)
            layout = (shape, contiguous_strides(shape))
            if cacheable and len(_WRAPPER_LAYOUTS) < _MAX_WRAPPER_LAYOUTS:
                _WRAPPER_LAYOUTS[logical_shape] = layout
        return torch.Tensor._make_wrapper_subclass(
            cls, layout[0], strides=layout[1], dtype=flat.dtype, device=flat.device, requires_grad=False
        )

    def __init__(self, flat: torch.Tensor, trainable_key: int, logical_shape, transposed: bool = False):
        if flat.dim() != 1:
            raise ValueError(f"CompactTensor holds a 1-D vector, got shape {tuple(flat.shape)}")
        self.flat = flat
        if isinstance(trainable_key, LiveKey):
            self._cell = trainable_key
        self.trainable_key = traced_key(trainable_key, flat)
        self.logical_shape = tuple(logical_shape)
        self.transposed = transposed

    # The cell of the weight this tensor was made for (None: made from a plain key, or unpickled).
    # Two weights with equal trainable sets (a model and its deep copy) share a key value, so the
    # cell says whose set it is; it is no constructor argument and never pickled.
    _cell: Optional[LiveKey] = None

    def live_key(self):
        """This tensor's key as the cell of its weight while that weight still has this set (see
        :class:`LiveKey`), else the plain key: what a new tensor of the same set should carry.

        Example::

            CompactTensor(flat, g.live_key(), g.logical_shape, g.transposed)
        """
        key = self.trainable_key
        if isinstance(key, LiveKey):
            return key
        cell = self._cell
        if cell is not None and cell.value == key:
            return cell
        return cell_for(key) or key

    def relabel_(self, label: "CompactTensor", flat: Optional[torch.Tensor] = None) -> None:
        """Mark this tensor (its values already written in place, or ``flat``: a new vector of
        ``label``'s length) as one of ``label``'s trainable set: optimizer state reset or
        remapped in place keeps its identity, which a compiled ``optimizer.step`` guards.

        Example::

            state.flat.zero_(); state.relabel_(w.compact(torch.empty(w.trainable_count)))
        """
        if flat is not None:
            if flat.dim() != 1 or flat.numel() != label.flat.numel():
                raise ValueError(f"relabel_: flat must be a 1-D vector of {label.flat.numel()} values, got shape "
                                 f"{tuple(flat.shape)}")
            self.flat = flat
        self.trainable_key = key_value(label.trainable_key)
        cell = label.live_key()
        self._cell = cell if isinstance(cell, LiveKey) else None

    @torch._dynamo.disable
    def __tensor_flatten__(self):
        names, context = super().__tensor_flatten__()
        # a live weight of this set: graph outputs made from this tensor follow that weight's
        # key; none (a tensor of an earlier set): the number itself, guarded by value
        key = context["trainable_key"] = self.live_key()
        if torch.compiler.is_compiling():
            # the trainable count is a size, a symbol rather than a constant of a compiled graph
            # (gradients and state reach a compiled step as parameter attributes, static unless marked)
            torch._dynamo.maybe_mark_dynamic(self.flat, 0)
        if isinstance(key, LiveKey):
            # A compiled optimizer.step guards its parameters by identity only, never by their
            # layout: a graph traced for a SPARSE weight would then update a RESU one. Its
            # gradients and state are guarded by this context, so it carries the weight's layout.
            context["weight_layout"] = getattr(key, "layout", None)  # None: a cell unpickled from an older layout
        return names, context

    def __getstate__(self) -> dict:
        # the key as a number, no cell: a loaded tensor finds its weight by key value
        state = {name: value for name, value in self.__dict__.items() if name != "_cell"}
        state["trainable_key"] = key_value(self.trainable_key)
        return state

    # ``.data =``: with torch functions disabled, torch's own setter would change only the
    # wrapper's metadata and leave ``flat`` as it was; a Python property takes the assignment.
    @property
    def data(self) -> torch.Tensor:
        return torch.Tensor.data.__get__(self)

    @data.setter
    def data(self, value) -> None:
        """``grad.data = other`` / ``state.data = other``: ``other`` must be a CompactTensor of
        the same trainable set, logical shape, orientation, dtype and device; this tensor then
        shares its values (as ``.data =`` shares storage). A dense tensor cannot say which
        coordinates it holds: ``t.copy_(weight.compact(weight.gather_trainable(dense)))`` writes one."""
        if not isinstance(value, CompactTensor):
            raise TypeError(f"`.data =` on a CompactTensor (a compact gradient or optimizer state) needs a "
                            f"CompactTensor of the same trainable set, got {type(value).__name__}; to write a dense "
                            f"tensor t of the weight's shape: compact.copy_(weight.compact(weight.gather_trainable(t)))")
        mismatch = [f"{name} {theirs!r} (this tensor: {ours!r})" for name, ours, theirs in (
            ("trainable_key", key_value(self.trainable_key), key_value(value.trainable_key)),
            ("logical_shape", self.logical_shape, value.logical_shape), ("transposed", self.transposed, value.transposed),
            ("dtype", self.dtype, value.dtype), ("device", self.device, value.device)) if ours != theirs]
        if mismatch:
            raise ValueError("`.data =` on a CompactTensor got one of another layout: " + ", ".join(mismatch))
        self.flat = value.flat

    def with_flat(self, flat: torch.Tensor) -> "CompactTensor":
        return CompactTensor(flat, self.live_key(), self.logical_shape, self.transposed)

    def _stable_hash_for_caching(self) -> str:
        """AOT autograd's cache key of this tensor: trainable set, logical shape, orientation and
        the flat vector's metadata (not its values)."""
        return stable_hash({"trainable_key": key_value(self.trainable_key), "logical_shape": self.logical_shape,
                            "transposed": self.transposed, "flat": self.flat}, self.requires_grad)

    def __repr__(self) -> str:
        """``CompactTensor(tensor([[...]]), trainable=n, key=...)``: the dense gradient (zero at
        frozen coordinates) formatted as torch formats a plain tensor, where a live weight has
        this trainable set; else (and under torch.compile tracing) shape and dtype instead."""
        identity = f"trainable={self.flat.numel()}, key={key_value(self.trainable_key):#x}"
        if _unhandled_op is not None and not is_traced(self.flat) and self.flat.device.type != "meta":
            try:
                # any op without a table entry reads the dense expansion (the dense fallback)
                dense = _unhandled_op(torch.ops.aten.alias.default, (CompactTensor,), (self,), {})
            except ValueError:  # no live weight has this trainable set any more
                dense = None
            if dense is not None:
                values = repr(dense)
                return "CompactTensor(" + values.replace("\n", "\n" + " " * len("CompactTensor(")) + f", {identity})"
        return f"CompactTensor(shape={self.logical_shape}, dtype={self.dtype}, {identity})"

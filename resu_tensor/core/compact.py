"""CompactTensor: a gradient or optimizer state holding only one trainable set's coordinates."""
import hashlib
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
        self.trainable_key = trainable_key
        self.logical_shape = tuple(logical_shape)
        self.transposed = transposed

    def with_flat(self, flat: torch.Tensor) -> "CompactTensor":
        return CompactTensor(flat, self.trainable_key, self.logical_shape, self.transposed)

    def _stable_hash_for_caching(self) -> str:
        """AOT autograd's cache key of this tensor: trainable set, logical shape, orientation and
        the flat vector's metadata (not its values)."""
        return stable_hash({"trainable_key": self.trainable_key, "logical_shape": self.logical_shape,
                            "transposed": self.transposed, "flat": self.flat}, self.requires_grad)

    def __repr__(self) -> str:
        """``CompactTensor(tensor([[...]]), trainable=n, key=...)``: the dense gradient (zero at
        frozen coordinates) formatted as torch formats a plain tensor, where a live weight has
        this trainable set; else (and under torch.compile tracing) shape and dtype instead."""
        identity = f"trainable={self.flat.numel()}, key={self.trainable_key:#x}"
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

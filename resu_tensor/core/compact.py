"""CompactTensor: a gradient or optimizer state holding only one trainable set's coordinates."""
import torch
from torchao.utils import TorchAOBaseTensor


class NoDynamoFrames:
    """Keeps Dynamo from compiling the frames of a subclass's dispatch and (un)flattening.

    Dynamo never traces these (it runs them on fake tensors itself), but inside a compiled
    function they also run eagerly, after a graph break (e.g. at ``loss.backward()``) or in
    AOTAutograd's runtime wrappers, and Dynamo would compile those frames as user code: it
    recompiles per tensor and turns attributes such as ``trainable_key`` into SymInts.
    """

    @classmethod
    @torch._dynamo.disable
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        return super().__torch_dispatch__(func, types, args, kwargs)

    @classmethod
    @torch._dynamo.disable
    def __tensor_unflatten__(cls, tensor_data_dict, tensor_attributes, outer_size, outer_stride):
        return super().__tensor_unflatten__(tensor_data_dict, tensor_attributes, outer_size, outer_stride)

    @torch._dynamo.disable
    def __tensor_flatten__(self):
        return super().__tensor_flatten__()


_PROPERTY_ACCESS = type(torch.Tensor.grad.__get__)  # what __torch_function__ gets for .grad, .shape, ...
# Functions that only read the wrapper's dtype (the optimizers' per-parameter checks call them).
_DTYPE_QUERIES = frozenset([torch.is_complex, torch.Tensor.is_complex, torch.is_floating_point,
                            torch.Tensor.is_floating_point])


class FastPropertyAccess:
    """Tensor properties (``.grad``, ``.shape``, ``.requires_grad``, ...) and dtype queries
    (``torch.is_complex``, ...) skip the op table: the optimizers and hooks read them about 15
    times per parameter per step, the table never holds them, and the table lookup nearly doubled
    the cost of each read (host time of small layers)."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if type(func) is _PROPERTY_ACCESS or func in _DTYPE_QUERIES:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


class CompactTensor(NoDynamoFrames, TorchAOBaseTensor):
    """Logical shape (out, in); stores only the trainable coordinates of one ResuTensor, flat,
    in row-major order of the weight's storage.

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
        shape = torch.Size(logical_shape)
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=(shape[1], 1), dtype=flat.dtype, device=flat.device, requires_grad=False
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

    def __repr__(self) -> str:
        return (
            f"CompactTensor(shape={self.logical_shape}, trainable={self.flat.numel()}, "
            f"dtype={self.dtype}, key={self.trainable_key:#x})"
        )

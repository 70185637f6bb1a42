"""CompactTensor: a gradient or optimizer state holding only one trainable set's coordinates."""
import torch
from torchao.utils import TorchAOBaseTensor


class CompactTensor(TorchAOBaseTensor):
    """Logical shape (out, in); stores only the trainable coordinates of one ResuTensor, flat,
    in row-major order of the weight's storage.

    ``trainable_key`` names the trainable set the values belong to: ops that mix a CompactTensor
    with a weight or state of another set raise instead of misapplying it. ``transposed`` marks
    the compact form of a transposed weight view (autograd's ``t()`` backward flips it back).
    """

    tensor_data_names = ["flat"]
    tensor_attribute_names = ["trainable_key", "logical_shape", "transposed"]

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

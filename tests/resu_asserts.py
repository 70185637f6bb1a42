"""Comparing two ResuTensors field by field."""
import torch


def assert_same_state(a, b) -> None:
    """Every field equal, every inner tensor bit-identical (dtype included)."""
    for name, value in a.fields().items():
        other = getattr(b, name)
        if isinstance(value, torch.Tensor):
            assert isinstance(other, torch.Tensor) and value.dtype == other.dtype, name
            assert torch.equal(value, other), name
        else:
            assert value == other, (name, value, other)

"""Comparing two ResuTensors field by field, and float tensors bit by bit."""
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


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (so -0.0 and 0.0 differ, as stored values do)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])

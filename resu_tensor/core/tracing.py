"""Telling a torch.compile trace value from data."""
import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor


def is_traced(t: torch.Tensor) -> bool:
    """Whether ``t`` is a torch.compile trace value rather than data: Dynamo's fake tensors, or
    AOTAutograd's functional ones (torch.compiler.is_compiling() is not set there on every
    supported torch). Traced code must avoid ops whose output size depends on the data."""
    return torch.compiler.is_compiling() or isinstance(t, (FakeTensor, FunctionalTensor))


def is_trace_value(t: torch.Tensor) -> bool:
    """Whether ``t`` itself is a trace value (a fake or functional tensor); unlike
    :func:`is_traced`, False for real tensors that Dynamo reads while it compiles.

    Example::

        is_trace_value(torch.zeros(2))   # False, also inside a compiled function's trace
    """
    return isinstance(t, (FakeTensor, FunctionalTensor))

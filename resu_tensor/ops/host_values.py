"""``grad.numpy()`` / ``grad.tolist()`` of a CompactTensor gradient or optimizer state: the values
of its dense expansion (zero at frozen coordinates), as for a plain tensor of its shape. Torch
refuses both for a tensor subclass, and CompactTensor has no torch functions of its own (its hot
properties stay in C), so they are methods here.

Example::

    loss.backward()
    np.histogram(w.grad.numpy())             # the dense gradient, zeros at frozen coordinates
"""
from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.tensor import expand_compact


def compact_numpy(self: CompactTensor, *, force: bool = False):
    """The dense expansion as a numpy array (``force`` as for a plain tensor)."""
    return expand_compact(self).numpy(force=force)


def compact_tolist(self: CompactTensor):
    """The dense expansion as nested Python lists."""
    return expand_compact(self).tolist()


CompactTensor.numpy = compact_numpy
CompactTensor.tolist = compact_tolist

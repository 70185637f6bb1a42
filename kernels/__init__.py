"""Kernel table: every op has a plain-PyTorch reference, and a device may register a faster one.

Callers use the functions exported here; they pick the implementation registered for the device
of their first tensor argument and fall back to the reference. A Triton kernel replaces a
reference by calling ``register(name, "cuda", fn)``; no caller changes.
"""
from typing import Callable

import torch

from . import mask_ops, weight_grad

_IMPLS: dict[str, dict[str, Callable]] = {}


def register(name: str, device_type: str, fn: Callable) -> None:
    """Register ``fn`` as the implementation of op ``name`` on ``device_type`` ("reference" = any)."""
    _IMPLS.setdefault(name, {})[device_type] = fn


def implementation(name: str, device_type: str) -> Callable:
    impls = _IMPLS[name]
    return impls.get(device_type, impls["reference"])


def _dispatched(name: str) -> Callable:
    def call(*args, **kwargs):
        device_type = next(a.device.type for a in args if isinstance(a, torch.Tensor))
        return implementation(name, device_type)(*args, **kwargs)

    call.__name__ = name
    call.__doc__ = _IMPLS[name]["reference"].__doc__
    return call


for _name, _fn in [
    ("pack_bitmap", mask_ops.pack_bitmap),
    ("unpack_bitmap", mask_ops.unpack_bitmap),
    ("block_prefix_counts", mask_ops.block_prefix_counts),
    ("gather_trainable", mask_ops.gather_trainable),
    ("scatter_trainable_", mask_ops.scatter_trainable_),
    ("compact_weight_grad", weight_grad.compact_weight_grad),
]:
    register(_name, "reference", _fn)

pack_bitmap = _dispatched("pack_bitmap")
unpack_bitmap = _dispatched("unpack_bitmap")
block_prefix_counts = _dispatched("block_prefix_counts")
gather_trainable = _dispatched("gather_trainable")
scatter_trainable_ = _dispatched("scatter_trainable_")
compact_weight_grad = _dispatched("compact_weight_grad")

__all__ = [
    "register",
    "implementation",
    "pack_bitmap",
    "unpack_bitmap",
    "block_prefix_counts",
    "gather_trainable",
    "scatter_trainable_",
    "compact_weight_grad",
]

"""Kernel table: every op has a plain-PyTorch reference, and a device may register a faster one.

Callers use the functions exported here; they pick the implementation registered for the device
of their first tensor argument and fall back to the reference. A Triton kernel replaces a
reference by calling ``register(name, "cuda", fn)``; no caller changes.

Where triton imports, the Triton kernels (``*_triton.py``, each a ``torch.library`` custom op
``resu_tensor::<name>``) are registered for "cuda" at import; elsewhere only the references exist.
``HAS_TRITON`` says which. ``PREFIX_TILE`` is the tile width of the ``bitmap_tile_prefix``
tables that the matmul kernels accept as an optional cache.
"""
from typing import Callable

import torch

from . import mask_ops, optim, quant, selective, weight_grad
from ._triton_support import HAS_TRITON, PREFIX_TILE

_IMPLS: dict[str, dict[str, Callable]] = {}


def register(name: str, device_type: str, fn: Callable) -> None:
    """Register ``fn`` as the implementation of op ``name`` on ``device_type`` ("reference" = any)."""
    _IMPLS.setdefault(name, {})[device_type] = fn


def implementation(name: str, device_type: str) -> Callable:
    impls = _IMPLS[name]
    return impls.get(device_type, impls["reference"])


def _first_tensor(args) -> torch.Tensor:
    """The first tensor argument, or the first tensor of the first list of them (foreach ops)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("a kernel call needs a tensor argument to pick its device")


def _dispatched(name: str) -> Callable:
    def call(*args, **kwargs):
        return implementation(name, _first_tensor(args).device.type)(*args, **kwargs)

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
    ("gather_by_bitmap", mask_ops.gather_by_bitmap),
    ("scatter_by_bitmap_", mask_ops.scatter_by_bitmap_),
    ("bitmap_tile_prefix", mask_ops.bitmap_tile_prefix),
    ("compact_weight_grad_bitmap", weight_grad.compact_weight_grad_bitmap),
    ("qresu_effective_weight", quant.qresu_effective_weight),
    ("qresu_linear_small_m", quant.qresu_linear_small_m),
    ("qresu_grad_input_small_m", quant.qresu_grad_input_small_m),
    ("adam_by_bitmap_", optim.adam_by_bitmap_),
    ("foreach_adam_by_bitmap_", optim.foreach_adam_by_bitmap_),
    ("foreach_adam_flat_", optim.foreach_adam_flat_),
    ("update_by_bitmap_", mask_ops.update_by_bitmap_),
    ("foreach_update_by_bitmap_", mask_ops.foreach_update_by_bitmap_),
    ("selective_scores_", selective.selective_scores_),
    ("selective_apply_", selective.selective_apply_),
]:
    register(_name, "reference", _fn)

if HAS_TRITON:
    from . import mask_ops_triton, optim_triton, quant_triton, selective_triton, update_triton, weight_grad_triton

    for _name, _fn in [
        ("pack_bitmap", mask_ops_triton.pack_bitmap),
        ("unpack_bitmap", mask_ops_triton.unpack_bitmap),
        ("gather_trainable", mask_ops_triton.gather_trainable),
        ("scatter_trainable_", mask_ops_triton.scatter_trainable_),
        ("gather_by_bitmap", mask_ops_triton.gather_by_bitmap),
        ("scatter_by_bitmap_", mask_ops_triton.scatter_by_bitmap_),
        ("bitmap_tile_prefix", mask_ops_triton.bitmap_tile_prefix),
        # dense cuBLAS product + Triton gather; the fused Triton matmul is
        # weight_grad_triton.compact_weight_grad_fused / compact_weight_grad_bitmap_fused.
        ("compact_weight_grad", weight_grad_triton.compact_weight_grad_dense_gather),
        ("compact_weight_grad_bitmap", weight_grad_triton.compact_weight_grad_bitmap_dense_gather),
        ("qresu_effective_weight", quant_triton.qresu_effective_weight),
        ("qresu_linear_small_m", quant_triton.qresu_linear_small_m),
        ("qresu_grad_input_small_m", quant_triton.qresu_grad_input_small_m),
        ("adam_by_bitmap_", optim_triton.adam_by_bitmap_),
        ("foreach_adam_by_bitmap_", optim_triton.foreach_adam_by_bitmap_),
        ("foreach_adam_flat_", optim_triton.foreach_adam_flat_),
        ("update_by_bitmap_", update_triton.update_by_bitmap_),
        ("foreach_update_by_bitmap_", update_triton.foreach_update_by_bitmap_),
        ("selective_scores_", selective_triton.selective_scores_),
        ("selective_apply_", selective_triton.selective_apply_),
    ]:
        register(_name, "cuda", _fn)

pack_bitmap = _dispatched("pack_bitmap")
unpack_bitmap = _dispatched("unpack_bitmap")
block_prefix_counts = _dispatched("block_prefix_counts")
gather_trainable = _dispatched("gather_trainable")
scatter_trainable_ = _dispatched("scatter_trainable_")
compact_weight_grad = _dispatched("compact_weight_grad")
gather_by_bitmap = _dispatched("gather_by_bitmap")
scatter_by_bitmap_ = _dispatched("scatter_by_bitmap_")
bitmap_tile_prefix = _dispatched("bitmap_tile_prefix")
compact_weight_grad_bitmap = _dispatched("compact_weight_grad_bitmap")
qresu_effective_weight = _dispatched("qresu_effective_weight")
qresu_linear_small_m = _dispatched("qresu_linear_small_m")
qresu_grad_input_small_m = _dispatched("qresu_grad_input_small_m")
adam_by_bitmap_ = _dispatched("adam_by_bitmap_")
foreach_adam_by_bitmap_ = _dispatched("foreach_adam_by_bitmap_")
foreach_adam_flat_ = _dispatched("foreach_adam_flat_")
update_by_bitmap_ = _dispatched("update_by_bitmap_")
foreach_update_by_bitmap_ = _dispatched("foreach_update_by_bitmap_")
selective_scores_ = _dispatched("selective_scores_")
selective_apply_ = _dispatched("selective_apply_")

__all__ = [
    "HAS_TRITON",
    "PREFIX_TILE",
    "register",
    "implementation",
    "pack_bitmap",
    "unpack_bitmap",
    "block_prefix_counts",
    "gather_trainable",
    "scatter_trainable_",
    "compact_weight_grad",
    "gather_by_bitmap",
    "scatter_by_bitmap_",
    "bitmap_tile_prefix",
    "compact_weight_grad_bitmap",
    "qresu_effective_weight",
    "qresu_linear_small_m",
    "qresu_grad_input_small_m",
    "adam_by_bitmap_",
    "foreach_adam_by_bitmap_",
    "foreach_adam_flat_",
    "update_by_bitmap_",
    "foreach_update_by_bitmap_",
    "selective_scores_",
    "selective_apply_",
]

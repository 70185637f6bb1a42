"""Kernel table: every op has a plain-PyTorch reference, and a device may register a faster one.

Callers use the functions exported here (``kernels.<op>``); each picks the implementation
registered for the device of its first tensor argument and falls back to the reference.

An op is declared once, where its code lives: its reference carries ``@kernel_op`` (in
``mask_ops``, ``optim``, ``quant``, ``selective``, ``weight_grad``), and where triton imports, the
``*_triton.py`` module declares its CUDA implementation (a ``torch.library`` custom op
``resu_tensor::<name>``) and compile variants beside the kernel (``_triton_support.cuda_op``).
``HAS_TRITON`` says whether the CUDA implementations exist; ``mask_ops_cpu`` registers CPU
implementations of the bitmap gathers and updates where the package's C loops were built
(``HAS_CPU_KERNELS``). ``PREFIX_TILE`` is the tile width of
the ``bitmap_tile_prefix`` tables that the QRESU forward kernels accept as an optional cache.

    >>> import torch
    >>> from resu_tensor import kernels
    >>> mask = torch.rand(100) < 0.5
    >>> bool((kernels.unpack_bitmap(kernels.pack_bitmap(mask), 100) == mask).all())
    True
"""
from typing import Callable

from . import mask_ops, optim, quant, selective, weight_grad  # noqa: F401  (their @kernel_op references)
from .mask_ops_cpu import HAS_CPU_KERNELS  # registers the C loops' CPU implementations, where they were built
from ._table import OPS, dispatcher
from ._triton_support import HAS_TRITON, PREFIX_TILE

if HAS_TRITON:  # each module declares the CUDA implementations of its kernels
    from . import mask_ops_triton, optim_triton, quant_triton, selective_triton, update_triton  # noqa: F401
    from . import weight_grad_triton  # noqa: F401


def register(name: str, device_type: str, fn: Callable) -> None:
    """Register ``fn`` as op ``name``'s implementation on ``device_type`` ("reference": any device
    without one), e.g. to try another kernel: ``kernels.register("compact_weight_grad", "cuda", my_kernel)``."""
    if name not in OPS:
        raise ValueError(f"unknown kernel op {name!r}; declared ops: {sorted(OPS)}")
    OPS[name].implementations[device_type] = fn


def implementation(name: str, device_type: str) -> Callable:
    """The function op ``name`` runs for tensors on ``device_type`` (its reference if none is
    registered), e.g. ``kernels.implementation("pack_bitmap", "cpu") is kernels.mask_ops.pack_bitmap``."""
    return OPS[name].implementation(device_type)


globals().update({name: dispatcher(op) for name, op in OPS.items()})

__all__ = ["HAS_TRITON", "HAS_CPU_KERNELS", "PREFIX_TILE", "register", "implementation", *OPS]

"""The kernel table: one :class:`KernelOp` per op, declared where its code lives.

A reference module declares an op by decorating its plain-PyTorch reference with
:func:`kernel_op` (the op takes the function's name); a Triton module adds the CUDA implementation
and its compile variants beside the kernel (``_triton_support.cuda_op``). ``kernels/__init__.py``
exposes one dispatching function per declared op; ``compile_check`` compiles every declared variant.
Nothing here imports triton.
"""
from dataclasses import dataclass
from typing import Callable, Iterable, NamedTuple, Optional

import torch


class Variant(NamedTuple):
    """One ahead-of-time compile of a Triton kernel (see ``compile_check``): the kernel (autotuned
    or not), its non-constexpr argument types ("*bf16", "i32", ...), its constexprs and the
    compile options (num_warps, num_stages, ...)."""

    kernel: object
    types: dict
    constexprs: dict
    options: dict = {}


@dataclass
class KernelOp:
    """An op of the kernel table: ``implementations`` maps "reference" to the plain-PyTorch
    reference, which runs anywhere, and a device type ("cuda") to a faster function of the same
    signature and results; ``variants(quick)`` yields the :class:`Variant` s its kernels compile to
    (None: it launches no kernel of its own)."""

    name: str
    implementations: dict
    variants: Optional[Callable[[bool], Iterable[Variant]]] = None

    @property
    def reference(self) -> Callable:
        return self.implementations["reference"]

    def implementation(self, device_type: str) -> Callable:
        return self.implementations.get(device_type, self.implementations["reference"])


OPS: dict[str, KernelOp] = {}


def kernel_op(reference: Callable) -> Callable:
    """Declare ``reference`` as the plain-PyTorch reference of the kernel op named after it, and
    return it unchanged::

        @kernel_op
        def pack_bitmap(mask_flat): ...   # kernels.pack_bitmap dispatches to it (or to a kernel)
    """
    name = reference.__name__
    known = OPS.get(name)
    if known is not None and known.reference.__module__ != reference.__module__:
        raise ValueError(f"kernel op {name!r} is declared twice: in {known.reference.__module__} and in "
                         f"{reference.__module__}")
    OPS[name] = KernelOp(name, {"reference": reference})
    return reference


def declared(reference: Callable) -> KernelOp:
    """The op declared by ``reference`` (ValueError if it is not a :func:`kernel_op` reference)."""
    op = OPS.get(getattr(reference, "__name__", None))
    if op is None or op.reference is not reference:
        raise ValueError(f"{reference!r} is not a reference declared with @kernel_op; declared ops: {sorted(OPS)}")
    return op


def _first_tensor(args) -> torch.Tensor:
    """The first tensor argument, or the first tensor of the first list of them (foreach ops)."""
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    raise TypeError("a kernel call needs a tensor argument to pick its device")


def dispatcher(op: KernelOp) -> Callable:
    """The function callers use: ``op``'s implementation for the device of the first tensor
    argument, its reference where that device has none (looked up per call: see ``register``)."""
    implementations = op.implementations

    def call(*args, **kwargs):
        device_type = _first_tensor(args).device.type
        return implementations.get(device_type, implementations["reference"])(*args, **kwargs)

    call.__name__ = call.__qualname__ = op.name
    call.__doc__ = op.reference.__doc__
    return call

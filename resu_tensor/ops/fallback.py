"""The dense fallback: every aten op without a table entry sees the tensors a user means.

A ResuTensor reads as its effective weight W_eff (logical orientation, compute dtype); a
CompactTensor (a gradient or optimizer state) reads as its dense expansion, zero outside its
trainable set. The op runs on those plain tensors and returns plain tensors. The op tables keep
what must stay compact (optimizer arithmetic, ``*_like(param)``, in-place updates of trainable
coordinates) and the fast paths (linear/matmul); everything else lands here, with no per-op list.

An in-place op without a handler whose target is a ResuTensor or CompactTensor raises: writing
W_eff's dense copy would be a silent no-op, and writing every coordinate would move frozen ones.

Example::

    w = ResuTensor.from_dense(torch.randn(8, 16), sparsity=0.5)
    w[0], w.mean(), torch.where(w > 0, w, 0.0), w.sum(1)   # all plain tensors of W_eff
"""
import inspect

import torch
import torch.nn.functional as F
from torch.utils._pytree import tree_flatten, tree_map

from resu_tensor.core.compact import CompactTensor, set_unhandled_function_handler, set_unhandled_op_handler
from resu_tensor.core.tensor import ResuTensor, expand_compact

_IN_PLACE_HELP = (
    "in-place ops on a ResuTensor or its CompactTensor gradient/state change trainable coordinates only and exist "
    "for the optimizer's arithmetic (add_, sub_, mul_, div_, addcmul_, addcdiv_, lerp_, clamp_, sqrt_, neg_, abs_, "
    "pow_, fill_, zero_, copy_ and their _foreach_ forms). For anything else compute on a dense copy "
    "(w.dequantize(), w.expand_trainable(w.grad)) and write back with w.copy_(ResuTensor.from_dense(...)) or a "
    "supported in-place op"
)


def _returns_alias(func) -> bool:
    return any(r.alias_info is not None for r in func._schema.returns)


def dense_view(t, copy: bool = False):
    """What user code sees of ``t``: W_eff for a ResuTensor, the dense expansion for a
    CompactTensor, ``t`` itself otherwise. ``copy`` gives a ResuTensor's W_eff as a new tensor
    (for ops whose result aliases their input: writes to it must not reach the weight)."""
    if isinstance(t, ResuTensor):
        return t.dequantize() if copy else t.effective_weight()
    if isinstance(t, CompactTensor):
        return expand_compact(t)
    return t


def written_arguments(func, args, kwargs) -> list[tuple[str, object]]:
    """(name, value) of each argument aten op ``func`` writes into (its ``self`` in place, its
    ``out=`` tensors), where given."""
    written = []
    for i, argument in enumerate(func._schema.arguments):
        if argument.alias_info is None or not argument.alias_info.is_write:
            continue
        value = args[i] if i < len(args) else kwargs.get(argument.name)
        if value is not None:
            written.append((argument.name, value))
    return written


def _written_subclass_argument(func, args, kwargs):
    """The name of an argument the op writes into that is a ResuTensor/CompactTensor, or None."""
    for name, value in written_arguments(func, args, kwargs):
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(isinstance(v, (ResuTensor, CompactTensor)) for v in values):
            return name
    return None


def dense_fallback(func, types, args, kwargs):
    """Run aten op ``func`` on the dense views of its ResuTensor/CompactTensor operands."""
    kwargs = kwargs or {}
    written = _written_subclass_argument(func, args, kwargs)
    if written is not None:
        raise TypeError(f"{func}: cannot write into a ResuTensor/CompactTensor argument {written!r}: {_IN_PLACE_HELP}")
    copy = _returns_alias(func)
    unwrap = lambda t: dense_view(t, copy)  # noqa: E731
    return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


class EffectiveWeight(torch.autograd.Function):
    """W_eff of a ResuTensor as a plain tensor, differentiably: the one autograd node through
    which a weight that requires grad enters an op without a fast path (an L2 penalty, einsum,
    conv, ...). Backward hands the weight its gradient's trainable coordinates, compact, as the
    linear fast path does."""

    @staticmethod
    def forward(ctx, weight):
        ctx.save_for_backward(weight)
        return weight.dequantize()

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        storage_grad = weight.to_storage(grad.to(weight.compute_dtype))
        return weight.compact(weight.gather_trainable(storage_grad.contiguous()))


def effective_weight(weight: ResuTensor) -> torch.Tensor:
    """W_eff of ``weight`` as a plain tensor; differentiable when ``weight`` requires grad.

    Example::

        penalty = effective_weight(w).pow(2).sum()   # what w.pow(2).sum() runs
    """
    with torch._C.DisableTorchFunctionSubclass():
        return EffectiveWeight.apply(weight)


# Layout views and row blocks that keep an (out, in) weight a ResuTensor but compute on an N-D conv
# weight (its permutations are not its storage or the storage's transpose; its blocks are W_eff's).
_LAYOUT_VIEWS = frozenset([torch.Tensor.t, torch.t, torch.Tensor.transpose, torch.transpose, torch.Tensor.permute,
                           torch.permute, torch.Tensor.split, torch.split, torch.Tensor.chunk, torch.chunk,
                           torch.Tensor.narrow, torch.narrow])
# Tensor methods and functions that keep a ResuTensor a ResuTensor under autograd: the layout views
# the fast paths understand, dtype/device moves, row blocks (FSDP), optimizer state (*_like).
_STRUCTURAL = _LAYOUT_VIEWS | frozenset([
    torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.float, torch.Tensor.half,
    torch.Tensor.bfloat16, torch.Tensor.double, torch.Tensor.type, torch.Tensor.clone, torch.clone,
    torch.Tensor.detach, torch.Tensor.new_zeros, torch.Tensor.new_empty,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
])
# Python operators that compute (w * 2, w[0], w == 0, -w, ...); other dunders (__hash__, __repr__,
# __reduce_ex__, __setitem__, in-place __iadd__, ...) keep the tensor as it is.
_COMPUTING_DUNDERS = frozenset(
    f"__{name}__" for name in (
        "add radd sub rsub mul rmul truediv rtruediv div rdiv floordiv rfloordiv mod rmod pow rpow matmul rmatmul "
        "neg pos abs invert and rand or ror xor rxor lshift rlshift rshift rrshift eq ne lt le gt ge getitem "
        "float int bool index array").split())


def _computes(func) -> bool:
    """Whether ``func`` computes values from its tensors (and so must see W_eff under autograd),
    as opposed to reading metadata (``size``, ``is_conj``, ``_is_view``, ...), registering hooks,
    serializing, updating in place, or a structural op of :data:`_STRUCTURAL`."""
    if func in _STRUCTURAL or (getattr(func, "__module__", None) or "").startswith(("torch.autograd", "torch.distributed")):
        return False  # autograd.grad/backward, collectives: not computations on the weight's values
    name = getattr(func, "__name__", "")
    if name.startswith("__"):
        return name in _COMPUTING_DUNDERS
    metadata = name.startswith(("_", "is_", "has_", "register_", "data_ptr", "storage", "untyped_storage")) or name in (
        "size", "dim", "ndimension", "numel", "nelement", "stride", "element_size", "get_device", "backward",
        "requires_grad_", "retain_grad", "detach_", "numpy", "tolist", "item")
    return not metadata and not name.endswith("_")


def enter_autograd(func, types, args, kwargs):
    """A torch function outside ResuTensor's table: with grad enabled, each ResuTensor that
    requires grad enters it through :class:`EffectiveWeight` (one node; the op itself then runs on
    plain tensors, its own backward included); otherwise it runs as it is and the aten ops it
    calls reach the op tables and the dense fallback."""
    if torch.is_grad_enabled() and (_computes(func) or (func in _LAYOUT_VIEWS and args
                                                        and getattr(args[0], "view_shape", None) is not None)):
        flat, _ = tree_flatten((args, kwargs))
        if any(isinstance(a, ResuTensor) and a.requires_grad for a in flat):
            enter = lambda a: effective_weight(a) if isinstance(a, ResuTensor) and a.requires_grad else a  # noqa: E731
            args, kwargs = tree_map(enter, args), tree_map(enter, kwargs)
    with torch._C.DisableTorchFunctionSubclass():
        return func(*args, **kwargs)


def _to_python(func, types, args, kwargs):
    """``w.numpy()`` / ``w.tolist()``: W_eff's values (numpy refuses a tensor that requires grad,
    as for any tensor, unless ``force=True``)."""
    t = args[0]
    if func is torch.Tensor.numpy and t.requires_grad and not (args[1:] or kwargs.get("force", False)):
        raise RuntimeError("Can't call numpy() on Tensor that requires grad. Use tensor.detach().numpy() instead.")
    dense = dense_view(t, copy=True)
    return dense.numpy(*args[1:], **kwargs) if func is torch.Tensor.numpy else dense.tolist()


set_unhandled_op_handler(dense_fallback)
set_unhandled_function_handler(enter_autograd)
ResuTensor.implements_torch_function([torch.Tensor.numpy, torch.Tensor.tolist])(_to_python)


def _embedding(func, types, args, kwargs):
    """``F.embedding(idx, w)`` with a ResuTensor weight: the lookup of W_eff rows through the
    autograd entry (gradient compact, zero at frozen coordinates). ``sparse=True`` would hand back
    a sparse gradient over every looked-up row, frozen coordinates included, and ``max_norm``
    renormalizes the weight in place, a write that would move frozen coordinates: both raise."""
    bound = _EMBEDDING_SIGNATURE.bind(*args, **kwargs)
    if bound.arguments.get("sparse", False):
        raise ValueError("F.embedding(..., sparse=True) with a ResuTensor weight is not supported (a sparse gradient "
                         "covers frozen coordinates); use nn.Embedding(..., sparse=False)")
    if bound.arguments.get("max_norm") is not None:
        raise ValueError("F.embedding(..., max_norm=...) with a ResuTensor weight is not supported (it renormalizes "
                         "the weight in place, frozen coordinates included); use max_norm=None")
    return enter_autograd(func, types, args, kwargs)


_EMBEDDING_SIGNATURE = inspect.signature(F.embedding)
ResuTensor.implements_torch_function([F.embedding])(_embedding)

"""Layout ops: transpose views, dtype/device moves and whole-state copies."""
import torch

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.state import check_state
from resu_tensor.ops.trainable import trainable_op
from resu_tensor.core.tensor import SUPPORTED_DTYPES, ResuTensor

aten = torch.ops.aten


def _transposed_view(t):
    if isinstance(t, CompactTensor):
        return CompactTensor(t.flat, t.trainable_key, t.logical_shape[::-1], not t.transposed)
    return t.replace(transposed=not t.transposed)


def transpose(func, types, args, kwargs):
    t = args[0]
    if func is aten.t.default:
        swap = True
    elif func is aten.transpose.int:
        swap = args[1] % 2 != args[2] % 2
    else:  # permute
        swap = [d % 2 for d in args[1]] == [1, 0]
    if swap:
        return _transposed_view(t)
    # a view op must return a new object (an identity permute included)
    return t.with_flat(t.flat) if isinstance(t, CompactTensor) else t.replace()


def _to_kwargs(t, args, kwargs):
    return t._get_to_kwargs(*args[1:], **kwargs)


def to_copy_resu(func, types, args, kwargs):
    t = args[0]
    to = _to_kwargs(t, args, kwargs)
    dtype, device = to["dtype"], to["device"]
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ResuTensor supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    # Values follow the new dtype; θ, codes and scales keep theirs (their precision is a choice).
    moved = {n: getattr(t, n).to(device) for n in t.optional_tensor_data_names if getattr(t, n) is not None}
    if t.values is not None:
        moved["values"] = t.values.to(device=device, dtype=dtype)
    return t.replace(compute_dtype=dtype, **moved)


def to_copy_compact(func, types, args, kwargs):
    t = args[0]
    to = _to_kwargs(t, args, kwargs)
    return t.with_flat(t.flat.to(device=to["device"], dtype=to["dtype"]))


def _same_layout(dest: ResuTensor, src: ResuTensor) -> bool:
    """Whether src's inner tensors can be copied into dest's in place: the same tensors present,
    of the same shapes (and dtypes, except ``values``, which takes dest's compute dtype)."""
    for name in dest.optional_tensor_data_names:
        d, s = getattr(dest, name), getattr(src, name)
        if (d is None) != (s is None):
            return False
        if d is not None and (d.shape != s.shape or (name != "values" and d.dtype != s.dtype)):
            return False
    return True


def copy_resu(func, types, args, kwargs):
    """``dest.copy_(src)`` between two ResuTensors copies the whole state (mode, mask, values,
    θ, quantized W_A): this is how ``load_state_dict`` restores a checkpoint into a freshly
    quantized model. The destination keeps its device and dtype. ``src``'s state is checked first
    (``core.state.check_state``): a state that breaks an invariant raises ``ValueError`` and
    ``dest`` is left unchanged. Registered for ``aten.copy_`` by ``ops/sharding.py``, which adds
    row-slice write-through."""
    dest, src = args[0], args[1]
    if isinstance(src, CompactTensor):
        # Trainable coordinates only, like every in-place op (Dynamo turns the optimizer's
        # param.addcdiv_(..., value=v) into param.copy_(fma(..., v, param))).
        return trainable_op(func, types, args, kwargs)
    if not isinstance(src, ResuTensor):
        raise TypeError(
            f"copy_ into a ResuTensor needs a ResuTensor source, got {type(src).__name__}; "
            "wrap a dense weight with ResuTensor.from_dense(...) first"
        )
    if dest.shape != src.shape or dest.transposed != src.transposed:
        raise ValueError(f"copy_: shape mismatch, destination {tuple(dest.shape)} vs source {tuple(src.shape)}")
    check_state(src.fields(), where="copy_ into a ResuTensor")
    old_key = dest.trainable_key
    device = dest.device_of_storage
    in_place = _same_layout(dest, src)
    for name, value in src.fields().items():
        if in_place and isinstance(value, torch.Tensor):
            # Into dest's own inner tensors: torch.compile writes a mutated ResuTensor input back
            # with dest.copy_(updated), and only in-place copies are visible to its graph.
            getattr(dest, name).copy_(value)
            continue
        if isinstance(value, torch.Tensor):
            value = value.to(device=device, dtype=dest.compute_dtype if name == "values" else value.dtype, copy=True)
        if name != "compute_dtype":
            setattr(dest, name, value)
    if dest.trainable_key != old_key:
        dest.grad = None
    return dest


ResuTensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])(transpose)
CompactTensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])(transpose)
ResuTensor.implements(aten._to_copy.default)(to_copy_resu)
CompactTensor.implements(aten._to_copy.default)(to_copy_compact)

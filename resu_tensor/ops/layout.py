"""Layout ops: transpose views, dtype/device moves and whole-state copies."""
import torch

from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.mode import Mode
from resu_tensor.core.qresu import quantize_active
from resu_tensor.core.state import QuantizedActive, check_state
from resu_tensor.ops.fallback import dense_fallback
from resu_tensor.ops.trainable import trainable_op
from resu_tensor.core.tensor import SUPPORTED_DTYPES, ResuTensor

aten = torch.ops.aten


def _transposed_view(t):
    if isinstance(t, CompactTensor):
        return CompactTensor(t.flat, t.trainable_key, t.logical_shape[::-1], not t.transposed)
    return _layout_view(t.replace(transposed=not t.transposed))


def _layout_view(view: ResuTensor) -> ResuTensor:
    view.layout_view = True
    return view


def transpose(func, types, args, kwargs):
    t = args[0]
    if len(t.logical_shape) != 2:
        # An N-D conv weight's permutations are not its (out, in·k...) storage or its transpose:
        # they read W_eff, as any other op.
        return dense_fallback(func, types, args, kwargs)
    if func is aten.t.default:
        swap = True
    elif func is aten.transpose.int:
        swap = args[1] % 2 != args[2] % 2
    else:  # permute
        swap = [d % 2 for d in args[1]] == [1, 0]
    if swap:
        return _transposed_view(t)
    # a view op must return a new object (an identity permute included)
    return t.with_flat(t.flat) if isinstance(t, CompactTensor) else _layout_view(t.replace())


def _to_kwargs(t, args, kwargs):
    return t._get_to_kwargs(*args[1:], **kwargs)


def to_copy_resu(func, types, args, kwargs):
    t = args[0]
    to = _to_kwargs(t, args, kwargs)
    dtype, device = to["dtype"], to["device"]
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ResuTensor supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    return t.moved(device, dtype)


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
    if dest.shape != src.shape or dest.transposed != src.transposed or dest.view_shape != src.view_shape:
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


def assign_data(func, types, args, kwargs):
    """``weight.data = t`` (``torch.nn.utils.vector_to_parameters`` does it too). A ResuTensor
    ``t`` replaces the whole state, as ``weight.copy_(t)``. A plain tensor of the weight's shape
    becomes the weight's values under its current mask and mode: DENSE and RESU take it whole
    (RESU's pruned coordinates become θ), SPARSE needs it zero at every pruned coordinate, QRESU
    re-quantizes the active coordinates (θ from the pruned ones). The weight keeps its dtype and
    device. Without this, the setter would change only the wrapper's metadata and leave the
    values as they were.

    Example::

        w.data = torch.randn(w.shape) * w.mask()      # a SPARSE weight: zero where pruned
    """
    dest, src = args[0], args[1]
    if isinstance(src, ResuTensor):
        with torch.no_grad():
            return copy_resu(aten.copy_.default, types, (dest, src), {})
    if not isinstance(src, torch.Tensor) or isinstance(src, CompactTensor) or type(src).__torch_dispatch__ is not \
            torch.Tensor.__torch_dispatch__:
        raise TypeError(f"`.data =` on a ResuTensor needs a plain tensor of shape {tuple(dest.shape)} or a ResuTensor, "
                        f"got {type(src).__name__}")
    if tuple(src.shape) != tuple(dest.shape):
        raise ValueError(f"`.data =` on a ResuTensor of shape {tuple(dest.shape)} got a tensor of shape "
                         f"{tuple(src.shape)}; the shape cannot change (build a new ResuTensor.from_dense instead)")
    if dest.layout_view:
        raise ValueError("`.data =` applies to the weight itself, not to a view of it (w.t())")
    src = dest.to_storage(src.detach().to(device=dest.device_of_storage, dtype=dest.compute_dtype)).contiguous()
    keep = dest.storage_mask() if dest.mode != Mode.DENSE else None
    if dest.mode == Mode.SPARSE and bool((src[~keep] != 0).any()):
        raise ValueError(
            f"`.data =` on a SPARSE weight: the new values are non-zero at {int((src[~keep] != 0).sum())} pruned "
            "coordinates; zero them (t * weight.mask()), or re-prune: weight.copy_(rt.ResuTensor.from_dense(t, sparsity))")
    with torch.no_grad():
        if dest.values is not None:
            dest.values.copy_(src)
            return None
        qdata, scale, offset = quantize_active(src, keep, dest.quant_bits, dest.group_size)
        theta = src.reshape(-1)[~keep.reshape(-1)].to(dest.theta.dtype)
        quantized = QuantizedActive(qdata, scale, offset, theta, dest.quant_bits, dest.group_size)
        subset = dest.encoded_subset() if dest.trainable_side == "subset" else None
        dest.set_state_(mode=Mode.QRESU, mask=dest.encoded_mask(), trainable_side=dest.trainable_side,
                        quantized=quantized, subset=subset, selective=dest.selective, selective_m=dest.selective_m,
                        selective_v=dest.selective_v, grad_abs_sum=dest.grad_abs_sum)
    return None


ResuTensor.implements_torch_function(torch.Tensor.data.__set__)(assign_data)


def no_storage(func, types, args, kwargs):
    """``w.untyped_storage()``: a ResuTensor keeps its state in several inner tensors and has no
    storage of its own, so this is an empty storage on its device, which no other tensor shares.
    Code that compares storages to tell whether two tensors alias (FSDP2's ``load_state_dict``
    hook does, for every shard) then sees that they do not, instead of an error."""
    return torch.UntypedStorage(0, device=args[0].device)


ResuTensor.implements_torch_function(torch.Tensor.untyped_storage)(no_storage)
ResuTensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])(transpose)
CompactTensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])(transpose)
ResuTensor.implements(aten._to_copy.default)(to_copy_resu)
CompactTensor.implements(aten._to_copy.default)(to_copy_compact)

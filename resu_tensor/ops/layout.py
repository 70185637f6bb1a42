"""Layout ops: transpose views, dtype/device moves and whole-state copies."""
import torch

from resu_tensor.compact import CompactTensor
from resu_tensor.mask_encoding import EncodedMask
from resu_tensor.tensor import SUPPORTED_DTYPES, ResuTensor

aten = torch.ops.aten


def _transposed_view(t):
    if isinstance(t, CompactTensor):
        return CompactTensor(t.flat, t.trainable_key, t.logical_shape[::-1], not t.transposed)
    return ResuTensor(t.values, t.mode_name, t.mask_kind, t.trainable_side, t.n_active, t.target_sparsity,
                      t.trainable_key, not t.transposed, t.mask_bitmap, t.mask_block_prefix, t.mask_indices)


def transpose(func, types, args, kwargs):
    t = args[0]
    if func is aten.t.default:
        swap = True
    elif func is aten.transpose.int:
        swap = args[1] % 2 != args[2] % 2
    else:  # permute
        swap = [d % 2 for d in args[1]] == [1, 0]
    return _transposed_view(t) if swap else t


def _to_kwargs(t, args, kwargs):
    return t._get_to_kwargs(*args[1:], **kwargs)


def to_copy_resu(func, types, args, kwargs):
    t = args[0]
    to = _to_kwargs(t, args, kwargs)
    dtype, device = to["dtype"], to["device"]
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ResuTensor supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    mask = [m.to(device) if m is not None else None for m in (t.mask_bitmap, t.mask_block_prefix, t.mask_indices)]
    return ResuTensor(t.values.to(device=device, dtype=dtype), t.mode_name, t.mask_kind, t.trainable_side,
                      t.n_active, t.target_sparsity, t.trainable_key, t.transposed, *mask)


def to_copy_compact(func, types, args, kwargs):
    t = args[0]
    to = _to_kwargs(t, args, kwargs)
    return t.with_flat(t.flat.to(device=to["device"], dtype=to["dtype"]))


def copy_resu(func, types, args, kwargs):
    """``dest.copy_(src)`` between two ResuTensors copies the whole state (mode, mask, values):
    this is how ``load_state_dict`` restores a checkpoint into a freshly quantized model."""
    dest, src = args[0], args[1]
    if not isinstance(src, ResuTensor):
        raise TypeError(
            f"copy_ into a ResuTensor needs a ResuTensor source, got {type(src).__name__}; "
            "wrap a dense weight with ResuTensor.from_dense(...) first"
        )
    if dest.shape != src.shape or dest.transposed != src.transposed:
        raise ValueError(f"copy_: shape mismatch, destination {tuple(dest.shape)} vs source {tuple(src.shape)}")
    device = dest.values.device
    mask = EncodedMask(src.mask_kind, *[m.to(device, copy=True) if m is not None else None
                                        for m in (src.mask_bitmap, src.mask_block_prefix, src.mask_indices)])
    dest.set_state_(values=dest.values.copy_(src.values), mode=src.mode, mask=mask,
                    trainable_side=src.trainable_side, target_sparsity=src.target_sparsity)
    return dest


ResuTensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])(transpose)
CompactTensor.implements([aten.t.default, aten.transpose.int, aten.permute.default])(transpose)
ResuTensor.implements(aten._to_copy.default)(to_copy_resu)
CompactTensor.implements(aten._to_copy.default)(to_copy_compact)
ResuTensor.implements(aten.copy_.default)(copy_resu)

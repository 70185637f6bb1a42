"""Dim-0 sharding ops: what FSDP2's ``fully_shard`` calls on a ResuTensor parameter.

``FSDPParam._init_sharded_param`` (and ``reset_sharded_param`` at lazy init / after
``load_state_dict``) does, with ``R`` the padded rows per rank and ``L`` this rank's rows::

    chunks = torch.chunk(param, world, dim=0)       # aten.split → row-block ResuTensors
    padded = param.new_zeros((R, in))                # a zero DENSE ResuTensor
    padded.narrow(0, 0, L).copy_(chunks[rank])       # aten.slice, then the whole-state copy_
    flat = padded.view(-1)                           # kept, but unused with the all-gather extension
    local = padded.narrow(0, 0, L)                   # this rank's shard

Each row block is a complete ResuTensor of its rows (``resu_tensor.core.row_blocks.slice_rows``): its own
mask encoding and trainable set, and views of its rows' data (values or codes and scales, θ, EMA
and Σ|g| entries: all row-major, so contiguous), so in-place updates of a block reach the weight.
A slice of all rows shares every inner tensor; a whole-state ``copy_`` into it replaces the base's
state too, as FSDP expects. A whole-state ``copy_`` into a partial row slice writes the rows through
only to a zero base made by ``new_zeros``: FSDP's uneven split, where the last ranks hold fewer
rows than ``R`` (anything else would leave the base's mask and data inconsistent, and raises).
``view(-1)`` of the padded shard returns a meta tensor of the right size: FSDP only keeps it (the
all-gather goes through ``ResuTensor.fsdp_pre_all_gather``), and any read of its data fails loudly.
Other flat views read a copy of W_eff (ops/fallback.py).
"""
import weakref

import torch

from resu_tensor.core.row_blocks import assign_state_, slice_rows, write_rows_into_zero_base_
from resu_tensor.ops.fallback import dense_fallback
from resu_tensor.ops.layout import copy_resu
from resu_tensor.core.tensor import ResuTensor

aten = torch.ops.aten

_ROW_VIEW = "_resu_row_view"  # (weakref to the base, start row, end row) on a partial row slice
_ZERO_BASE = "_resu_zero_base"  # marks a new_zeros result, the only base a row slice writes through to


def row_dim(t: ResuTensor) -> int:
    """The logical dim of ``t`` that runs over its storage rows: 1 for a transposed (in, out)
    weight, else 0 (an N-D conv weight's out-channels)."""
    return 1 if t.transposed else 0


def _check_row_dim(func, dim: int) -> None:
    if dim != 0:
        raise NotImplementedError(f"{func}: a ResuTensor is split along dim 0 (its rows) only, got dim={dim}")


CONV1D_PLACEMENT = ("Under FSDP2 pass fully_shard(..., shard_placement_fn=resu_tensor.fsdp.shard_placement): it shards "
                    "a transposed weight on dim 1, its storage rows")


def _split(func, types, args, kwargs):

    t, split_size = args[0], args[1]
    dim = (args[2] if len(args) > 2 else kwargs.get("dim", 0)) % t.dim()
    if t.transposed and dim == 0:
        # Blocks of a transposed weight's storage columns would cut its row-major state: plain blocks
        # of W_eff, as w[a:b] gives (FSDP2 reads only their sizes, for its post-forward metadata).
        return dense_fallback(func, types, args, kwargs)
    _check_row_dim(func, dim - row_dim(t))
    rows = t.storage_shape[0]
    if func is aten.split_with_sizes.default:
        sizes = list(split_size)
        if sum(sizes) != rows:
            raise ValueError(f"{func}: split sizes {sizes} do not add up to {rows} rows")
    else:
        if split_size < 1:
            raise ValueError(f"{func}: split size must be positive, got {split_size}")
        sizes = [min(split_size, rows - start) for start in range(0, rows, split_size)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [slice_rows(t, start, start + size, share=True) for start, size in zip(starts, sizes)]


def _new_rows(func, types, args, kwargs):
    t, size = args[0], tuple(args[1])
    if t.transposed and len(size) == 2 and size[0] != t.shape[0] and size[1] == t.shape[1]:
        raise NotImplementedError(f"{func}: a transposed (in, out) ResuTensor of shape {tuple(t.shape)} (transformers' "
                                  f"Conv1D) cannot be sharded on dim 0 (its storage columns). {CONV1D_PLACEMENT}")
    dim = row_dim(t)
    other = [n for i, n in enumerate(t.shape) if i != dim]
    if len(size) != t.dim() or [n for i, n in enumerate(size) if i != dim] != other:
        expected = tuple("rows" if i == dim else n for i, n in enumerate(t.shape))
        raise ValueError(
            f"{func}: a ResuTensor makes new tensors of shape {expected} only (its storage rows varying), got size "
            f"{size}. Under FSDP2 this means torch.chunk left a rank without rows of this weight: its out-features "
            "are too few for the number of ranks (every rank needs at least one row)"
        )
    dtype = kwargs.get("dtype") or t.dtype
    device = kwargs.get("device") or t.device
    zeros = ResuTensor.from_dense(torch.zeros(size, dtype=dtype, device=device), transposed=t.transposed)
    setattr(zeros, _ZERO_BASE, True)
    return zeros


def _slice(func, types, args, kwargs):

    t = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
    start = args[2] if len(args) > 2 else kwargs.get("start")
    end = args[3] if len(args) > 3 else kwargs.get("end")
    step = args[4] if len(args) > 4 else kwargs.get("step", 1)
    if dim % t.dim() != row_dim(t) or step != 1:
        return dense_fallback(func, types, args, kwargs)  # w[:, a:b], w[::2]: a slice of a copy of W_eff
    rows = t.storage_shape[0]
    start, end = (start or 0), (rows if end is None else end)
    start, end = start + rows if start < 0 else start, end + rows if end < 0 else end
    start, end = max(0, min(start, rows)), max(0, min(end, rows))
    if end <= start:
        raise ValueError(f"{func}: an empty row slice [{start}:{end}] of a ResuTensor is not supported")
    # A view op must return a new object: all rows share t's inner tensors; a part shares its data
    # (values, codes, θ, EMAs), with the mask re-encoded for its rows.
    view = t.replace() if start == 0 and end == rows else slice_rows(t, start, end, share=True)
    setattr(view, _ROW_VIEW, (weakref.ref(t), start, end))
    return view


def _copy(func, types, args, kwargs):
    """``aten.copy_`` of a ResuTensor (its one registration): layout.copy_resu (whole-state copy,
    checked), plus writing a row slice's new state through to its base: all rows, or
    a part of a zero base made by new_zeros (FSDP2's padded shard). A whole-state copy into a part
    of any other base would leave the base's mask and data inconsistent: refused."""
    dest, src = args[0], args[1]
    row_view = getattr(dest, _ROW_VIEW, None) if isinstance(src, ResuTensor) else None
    base = row_view[0]() if row_view is not None else None
    if base is None:
        return copy_resu(func, types, args, kwargs)
    start, end = row_view[1], row_view[2]
    whole = start == 0 and end == base.storage_shape[0]
    if not whole and not getattr(base, _ZERO_BASE, False):
        raise NotImplementedError(
            "copy_ of a ResuTensor into a row slice of another writes through only to a tensor made by new_zeros "
            "(FSDP2's padded shard); build the whole weight and copy_ it instead"
        )
    dest = copy_resu(func, types, args, kwargs)

    if whole:
        assign_state_(base, dest)
    else:
        write_rows_into_zero_base_(base, dest, start, end)
    return dest


def _view(func, types, args, kwargs):
    t, size = args[0], list(args[1])
    if size in ([-1], [t.numel()]) and getattr(t, _ZERO_BASE, False):
        return torch.empty(t.numel(), dtype=t.dtype, device="meta")  # FSDP's padded shard: kept, never read
    if size == list(t.shape) or (t.view_shape is None and size in ([-1, t.shape[1]], [t.shape[0], -1])):
        return t.replace()  # a view op must return a new object; this one shares t's inner tensors
    if t.transposed and size in ([-1], [t.numel()]):  # FSDP2's flat shard data (kept, unused with the extension)
        return t.to_logical(t.storage_weight()).contiguous().view(-1)  # a copy of W_eff, flattened
    return dense_fallback(func, types, args, kwargs)  # a copy of W_eff, viewed


def _is_pinned(func, types, args, kwargs):
    t = args[0]
    return all(getattr(t, n).is_pinned() for n in t.optional_tensor_data_names if getattr(t, n) is not None)


ResuTensor.implements([aten.split.Tensor, aten.split_with_sizes.default])(_split)
ResuTensor.implements([aten.new_zeros.default, aten.new_empty.default])(_new_rows)
ResuTensor.implements(aten.slice.Tensor)(_slice)
ResuTensor.implements(aten.copy_.default)(_copy)
ResuTensor.implements(aten.view.default)(_view)
ResuTensor.implements(aten.is_pinned.default)(_is_pinned)

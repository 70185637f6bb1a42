"""Row blocks of a ResuTensor: storage rows [start, end) as a ResuTensor of their own.

FSDP2 shards a ResuTensor parameter along its storage rows, and ``w[a:b]`` / ``torch.chunk`` slice
it the same way: each block carries the values (or QRESU's codes and scales) of its rows, the mask
re-encoded from them, its θ / subset / EMA entries and its own trainable set. Every layout has
storage rows: an (out, in) weight's rows; an N-D conv weight's out-channels (logical dim 0, so a
block is an N-D weight with fewer out-channels); a transposed (in, out) weight's (transformers'
Conv1D) logical columns (dim 1). Storage rows are the unit of every per-row structure (mask rows,
N:M groups, QRESU's quantization groups, the row-major θ and EMA vectors), so no other split is built.
"""
from typing import Optional

import torch

from resu_tensor import kernels
from resu_tensor.core.mask_encoding import EncodedMask, decode_mask, encode_mask
from resu_tensor.core.state import EMA_NAMES, QuantizedActive, build_state

# ---------------------------------------------------------------------------------------- row blocks
def row_fields(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every part of ``t``'s state as a tensor whose dim 0 is ``t``'s rows (storage orientation),
    so that rows [r0, r1) of each are the state of rows [r0, r1) of the weight."""
    rows, cols = t.storage_shape
    device = t.device_of_storage
    fields: dict[str, torch.Tensor] = {}
    mask = None
    if t.mask_kind != "none":
        mask = t.storage_mask()
        fields["mask"] = mask.to(torch.uint8)
    if t.values is not None:
        fields["values"] = t.values
    if t.qdata is not None:
        fields.update(qdata=t.qdata, qscale=t.qscale, qoffset=t.qoffset)
    if t.theta is not None:
        theta = torch.zeros(rows, cols, dtype=t.theta.dtype, device=device)
        kernels.scatter_trainable_(theta, ~mask.view(-1), t.theta)
        fields["theta"] = theta
    if t.subset_kind != "none":
        fields["subset"] = decode_mask(t.encoded_subset(), t.storage_shape, device).to(torch.uint8)
    for name in EMA_NAMES:
        vector = getattr(t, name)
        if vector is not None:
            fields[name] = t.to_storage(t.expand_trainable(vector))  # zero outside the trainable set
    return fields


def row_attributes(t: torch.Tensor) -> dict:
    """The Python attributes a row block shares with its weight (an N-D weight's ``view_shape``
    is the weight's; :func:`rows_view_shape` gives a block's)."""
    names = ("compute_dtype", "mode_name", "trainable_side", "target_sparsity", "quant_bits", "group_size",
             "selective", "nm_pattern", "row_keep", "transposed", "view_shape")
    return {name: getattr(t, name) for name in names}


def rows_view_shape(view_shape: Optional[tuple], n_rows: int) -> Optional[tuple]:
    """The N-D shape of ``n_rows`` out-channels of an N-D conv weight of ``view_shape`` (None for 2-D)."""
    return None if view_shape is None else (n_rows, *view_shape[1:])


def _trainable_flat(side: str, mask: Optional[torch.Tensor], subset: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Row-major bool vector of the trainable coordinates (None: all of them)."""
    if side == "subset":
        return subset.reshape(-1)
    if side == "all":
        return None
    return mask.reshape(-1) if side == "active" else ~mask.reshape(-1)


def _state(cls, attributes: dict, shape: tuple[int, int], mask: EncodedMask, subset: EncodedMask,
           tensors: dict, where: str) -> torch.Tensor:
    """The ``cls`` of ``shape`` built (and checked) by ``build_state`` from a row block's parts."""
    quantized = None
    if "qdata" in tensors:
        quantized = QuantizedActive(tensors.pop("qdata"), tensors.pop("qscale"), tensors.pop("qoffset"),
                                    tensors.pop("theta"), attributes["quant_bits"], attributes["group_size"])
    return cls(**build_state(
        shape, attributes["compute_dtype"], mode=attributes["mode_name"], mask=mask,
        trainable_side=attributes["trainable_side"], subset=subset, quantized=quantized,
        target_sparsity=attributes["target_sparsity"], selective=attributes["selective"],
        nm_pattern=attributes["nm_pattern"], row_keep=attributes["row_keep"],
        transposed=attributes.get("transposed", False),
        view_shape=rows_view_shape(attributes.get("view_shape"), shape[0]), where=where, **tensors))


def from_row_fields(cls, attributes: dict, fields: dict[str, torch.Tensor], shape: tuple[int, int]) -> torch.Tensor:
    """The ``cls`` (a ResuTensor class) of storage ``shape`` (rows, cols), in the layout of
    ``attributes`` (see :func:`row_attributes`), whose state is ``fields`` (see :func:`row_fields`),
    checked like every state that enters a ResuTensor (``core.state.build_state``)."""
    mask = fields["mask"].bool() if "mask" in fields else None
    encoded = encode_mask(mask) if mask is not None else EncodedMask("none")
    subset_mask = fields["subset"].bool() if "subset" in fields else None
    subset = encode_mask(subset_mask) if subset_mask is not None else EncodedMask("none")
    tensors = {name: fields[name].contiguous() for name in ("values", "qdata", "qscale", "qoffset") if name in fields}
    if "theta" in fields:
        tensors["theta"] = kernels.gather_trainable(fields["theta"].contiguous(), ~mask.reshape(-1))
    trainable = _trainable_flat(attributes["trainable_side"], mask, subset_mask)
    for name in EMA_NAMES:
        if name in fields:
            dense = fields[name].contiguous()
            tensors[name] = dense.reshape(-1).clone() if trainable is None else kernels.gather_trainable(dense, trainable)
    return _state(cls, attributes, tuple(shape), encoded, subset, tensors, "from_row_fields")


def slice_rows(t: torch.Tensor, start: int, end: int, share: bool = False) -> torch.Tensor:
    """Storage rows [start, end) of ``t`` as a ResuTensor of their own, in ``t``'s layout
    (out-channels [start, end) of an N-D conv weight; columns [start, end) of a transposed (in, out)
    weight): the mask (and subset) re-encoded
    from those rows, the θ, EMA and Σ|g| entries of those rows (contiguous: they are row-major),
    its own trainable set. With ``share`` the data (values, codes, scales, θ, EMAs) are views of
    ``t``'s, so in-place updates of the block's trainable coordinates reach ``t`` (``w[a:b]``,
    ``torch.chunk``); otherwise they are copies.

    Example::

        top = slice_rows(w, 0, w.shape[0] // 2)
        torch.equal(top.mask(), w.mask()[: w.shape[0] // 2])   # True
    """
    rows, cols = t.storage_shape
    if not 0 <= start < end <= rows:
        raise ValueError(f"slice_rows: rows [{start}, {end}) are not a non-empty range of the weight's {rows} rows")
    take = (lambda x: x) if share else (lambda x: x.clone())
    lo, hi = start * cols, end * cols
    device = t.device_of_storage

    def flat_range(selected: Optional[torch.Tensor]) -> tuple[int, int]:
        """Where rows [start, end) begin and end in a vector over ``selected`` (row-major)."""
        if selected is None:
            return lo, hi
        first = int(selected[:lo].sum())
        return first, first + int(selected[lo:hi].sum())

    mask = t.storage_mask().reshape(-1) if t.mask_kind != "none" else None
    encoded = encode_mask(mask[lo:hi].view(end - start, cols)) if mask is not None else EncodedMask("none")
    subset = EncodedMask("none")
    if t.subset_kind != "none":
        subset = encode_mask(decode_mask(t.encoded_subset(), t.storage_shape, device)[start:end])
    tensors = {name: take(getattr(t, name)[start:end]) for name in ("values", "qdata", "qscale", "qoffset")
               if getattr(t, name) is not None}
    if t.theta is not None:
        p0, p1 = flat_range(~mask)
        tensors["theta"] = take(t.theta[p0:p1])
    if any(getattr(t, name) is not None for name in EMA_NAMES):
        k0, k1 = flat_range(t.trainable_flat())
        tensors.update({name: take(getattr(t, name)[k0:k1]) for name in EMA_NAMES if getattr(t, name) is not None})
    return _state(type(t), row_attributes(t), (end - start, cols), encoded, subset, tensors, "slice_rows")


def assign_state_(dest: torch.Tensor, src: torch.Tensor) -> None:
    """Give ``dest`` (same Python object: a DTensor, Parameter and optimizer keep referring to it)
    ``src``'s whole state, without copying."""
    for name, value in src.fields().items():
        setattr(dest, name, value)


def write_rows_into_zero_base_(base: torch.Tensor, rows: torch.Tensor, start: int, end: int) -> None:
    """FSDP2's padded shard (``new_zeros`` then ``narrow(0, 0, L).copy_(shard)``): ``base`` takes
    ``rows``' mode, with their state at rows [start, end) and zero rows elsewhere. The zero rows are
    active and zero, i.e. frozen in RESU/QRESU; FSDP only keeps rows [0, L) of this tensor."""
    n_rows, cols = base.storage_shape
    fields = {}
    for name, f in row_fields(rows).items():
        fill = 1 if name in ("mask", "qscale") else 0
        full = torch.full((n_rows, *f.shape[1:]), fill, dtype=f.dtype, device=f.device)
        full[start:end] = f
        fields[name] = full
    assign_state_(base, from_row_fields(type(base), row_attributes(rows), fields, (n_rows, cols)))



"""Plain-PyTorch references for the mask utilities (bitmap packing, prefix counts, compaction).

Conventions shared with every kernel: a mask is flattened row-major; bit ``j`` of bitmap byte
``i`` is element ``8 * i + j``; compact vectors list the selected elements in row-major order.
"""
from typing import List, Optional

import numpy as np
import torch
from torch.utils.weak import WeakIdKeyDictionary

from ._table import kernel_op

_BIT_WEIGHTS = [1 << j for j in range(8)]


@kernel_op
def pack_bitmap(mask_flat: torch.Tensor) -> torch.Tensor:
    """Pack a 1-D bool mask into ``ceil(n / 8)`` uint8 bytes, little-endian bits."""
    n = mask_flat.numel()
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.uint8, device=mask_flat.device)
    padded[:n] = mask_flat.to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask_flat.device)
    return (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


@kernel_op
def unpack_bitmap(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_bitmap`: a 1-D bool mask of ``numel`` elements."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bitmap.device)
    bits = (bitmap.view(-1, 1) >> shifts) & 1
    return bits.view(-1)[:numel].bool()


@kernel_op
def block_prefix_counts(mask_flat: torch.Tensor, block_size: int) -> torch.Tensor:
    """Number of set elements before the start of blocks 1, 2, ... (block 0 starts at 0).

    int32, ``ceil(n / block_size) - 1`` entries: kernels find an element's compact position as
    the prefix of its block plus a popcount inside the block.
    """
    n = mask_flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.zeros(n_blocks * block_size, dtype=torch.int64, device=mask_flat.device)
    padded[:n] = mask_flat.to(torch.int64)
    per_block = padded.view(n_blocks, block_size).sum(dim=1)
    return per_block.cumsum(0)[:-1].to(torch.int32)


@kernel_op
def gather_trainable(values: torch.Tensor, trainable_flat: torch.Tensor) -> torch.Tensor:
    """The selected elements of ``values`` (any shape, read row-major) as a new 1-D tensor."""
    return values.reshape(-1)[trainable_flat]


@kernel_op
def scatter_trainable_(values: torch.Tensor, trainable_flat: torch.Tensor, compact: torch.Tensor) -> torch.Tensor:
    """Write ``compact`` into the selected elements of contiguous ``values``; others stay untouched."""
    values.view(-1).masked_scatter_(trainable_flat, compact.to(values.dtype))
    return values


# --------------------------------------------------------------------------- bitmap-direct ops
# A selection is given by the packed bitmap itself: the set bits, or with ``invert=True`` the
# clear bits (for a mask bitmap: the active set, or the pruned set). ``block_prefix`` (from
# :func:`block_prefix_counts` on the set bits, ``block_size`` elements per block) lets a kernel
# place each block's elements without a global scan; the references below do not need it.


def _bitmap_selection(bitmap: torch.Tensor, numel: int, invert: bool) -> torch.Tensor:
    selected = unpack_bitmap(bitmap, numel)
    return ~selected if invert else selected


def check_selected_count(op: str, found: int, count: int) -> None:
    """ValueError unless a bitmap's selection of ``found`` elements is the ``count`` a call expects."""
    if found != count:
        raise ValueError(f"{op}: the bitmap selects {found} elements but count={count}")


def _check_count(op: str, selected: torch.Tensor, count: int) -> None:
    check_selected_count(op, int(selected.sum()), count)


# --------------------------------------------------------------------------- CPU selection cache
# The plain-PyTorch kernels on the CPU (where the C loops of mask_ops_cpu, which walk the bitmap
# itself, were not built or do not apply): decoding a bitmap into positions (unpack, then nonzero)
# costs far more than the gather or scatter it serves, and one training step selects through the
# same bitmap several times (the weight-gradient compaction, then each in-place optimizer op). The
# positions are kept per bitmap tensor, valid while that tensor is the same object at the same
# version (any in-place write bumps it), until release_selections(bitmap): the optimizer step's
# post-hook releases them, so they last one step and never add to the state a model holds between
# steps. The float32 work vector of the in-place updates at those positions (selection_scratch)
# is kept and released with them (the C loops keep that vector alone, for addcdiv).
# bitmap → {(numel, invert): (bitmap._version, int64 positions),
#           ("scratch", numel, invert): (bitmap._version, float32 work vector)}
_SELECTIONS = WeakIdKeyDictionary()


def _decoded_positions(bitmap: torch.Tensor, numel: int, invert: bool) -> torch.Tensor:
    """int64 row-major positions of the selected elements of a CPU bitmap, in one pass over its
    bits. numpy's unpackbits and flatnonzero of a bool array take a fraction of the time of
    torch's unpack (a byte → bits table lookup) and nonzero on the CPU, which counts and writes
    (n, 1) indices in two scalar passes; int64 is what index_select and scatter_ take without a
    conversion."""
    packed = bitmap.numpy()
    if invert:
        packed = ~packed
    bits = np.unpackbits(packed, count=numel, bitorder="little").view(np.bool_)
    return torch.from_numpy(np.flatnonzero(bits))


def _host_float32(count: int) -> torch.Tensor:
    """An uninitialised float32 CPU vector of ``count`` elements, allocated by numpy. A work
    vector of a selection's size, made anew every training step, is tens of MB at large weights:
    torch's CPU allocation of such a block goes back to the system when freed and faults in
    again page by page on first write (several ms per 10 MB), while numpy's asks for transparent
    huge pages."""
    return torch.from_numpy(np.empty(count, dtype=np.float32))


def _cacheable(bitmap: torch.Tensor) -> bool:
    """A real CPU tensor with a version counter (not a trace value, not an inference tensor)."""
    return type(bitmap) is torch.Tensor and bitmap.device.type == "cpu" and not bitmap.is_inference()


def _entries(bitmap: torch.Tensor) -> dict:
    """What is kept for ``bitmap`` (a :func:`_cacheable` one), created empty on first use."""
    entries = _SELECTIONS.get(bitmap)
    if entries is None:
        entries = _SELECTIONS[bitmap] = {}
    return entries


def selected_positions(bitmap: torch.Tensor, numel: int, invert: bool) -> Optional[torch.Tensor]:
    """Row-major int64 positions of the elements whose bit is set (clear if ``invert``), kept
    until :func:`release_selections` or a change of ``bitmap``; None where ``bitmap`` cannot key
    the cache (not a plain CPU tensor), and the caller selects by the unpacked mask instead.

    Example::

        positions = selected_positions(bitmap, 4096, invert=False)   # values.view(-1).index_select(0, positions)
    """
    if not _cacheable(bitmap):
        return None
    entries = _entries(bitmap)
    cached = entries.get((numel, invert))
    if cached is None or cached[0] != bitmap._version:
        positions = _decoded_positions(bitmap, numel, invert)
        cached = entries[(numel, invert)] = (bitmap._version, positions)
    return cached[1]


def selection_scratch(bitmap: torch.Tensor, numel: int, invert: bool, count: int) -> torch.Tensor:
    """A float32 work vector of ``count`` elements, one per position of ``bitmap``'s selection,
    kept and released with its positions (:func:`release_selections`): the in-place updates of a
    selection write their operand into it instead of allocating (and faulting in) a new vector of
    the selection's size per op. Its contents are whatever the last user left; callers overwrite
    it. A new vector each call where ``bitmap`` cannot key the cache.

    Example::

        x = torch.mul(exp_avg, -lr, out=selection_scratch(bitmap, numel, True, exp_avg.numel()))
    """
    if not _cacheable(bitmap):
        return _host_float32(count)
    entries = _entries(bitmap)
    key = ("scratch", numel, invert)
    cached = entries.get(key)
    if cached is None or cached[0] != bitmap._version or cached[1].numel() != count:
        cached = entries[key] = (bitmap._version, _host_float32(count))
    return cached[1]


def holds_selections() -> bool:
    """Whether positions or work vectors of any bitmap are kept now (never on CUDA)."""
    return len(_SELECTIONS) > 0


def release_selections(bitmap: Optional[torch.Tensor]) -> None:
    """Drop the positions :func:`selected_positions` keeps for ``bitmap`` (None: nothing to do).

    Example::

        release_selections(weight.mask_bitmap)   # after the optimizer step that used them
    """
    if bitmap is not None and _cacheable(bitmap):
        _SELECTIONS.pop(bitmap, None)


def held_selection_nbytes(bitmap: Optional[torch.Tensor]) -> int:
    """Bytes of the positions and work vectors kept for ``bitmap`` now (0 once released).

    Example::

        held_selection_nbytes(weight.mask_bitmap)   # counted in rt.memory_report's mask bytes
    """
    if bitmap is None or not _cacheable(bitmap):
        return 0
    return sum(positions.nbytes for _, positions in _SELECTIONS.get(bitmap, {}).values())


def _check_positions(op: str, positions: torch.Tensor, count: int) -> None:
    check_selected_count(op, positions.numel(), count)


@kernel_op
def gather_by_bitmap(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                     invert: bool, count: int) -> torch.Tensor:
    """The ``count`` elements of ``values`` (any shape, read row-major) whose bitmap bit is set
    (clear if ``invert``), in row-major order, as a new 1-D tensor."""
    positions = selected_positions(bitmap, values.numel(), invert)
    if positions is not None:
        _check_positions("gather_by_bitmap", positions, count)
        return values.reshape(-1).index_select(0, positions)
    selected = _bitmap_selection(bitmap, values.numel(), invert)
    _check_count("gather_by_bitmap", selected, count)
    return values.reshape(-1)[selected]


@kernel_op
def scatter_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                       invert: bool, compact: torch.Tensor) -> torch.Tensor:
    """Write ``compact`` (row-major order) into the elements of contiguous ``values`` whose bit is
    set (clear if ``invert``); every other element stays untouched. Returns ``values``."""
    positions = selected_positions(bitmap, values.numel(), invert)
    if positions is not None:
        _check_positions("scatter_by_bitmap_", positions, compact.numel())
        values.view(-1).scatter_(0, positions, compact.to(values.dtype))
        return values
    selected = _bitmap_selection(bitmap, values.numel(), invert)
    _check_count("scatter_by_bitmap_", selected, compact.numel())
    values.view(-1).masked_scatter_(selected, compact.to(values.dtype))
    return values


@kernel_op
def bitmap_tile_prefix(bitmap: torch.Tensor, rows: int, cols: int, tile: int, invert: bool) -> torch.Tensor:
    """int32 (rows, ceil(cols / tile)): how many selected elements (set bits, or clear bits if
    ``invert``) come, row-major, before element (r, j·tile). Matmul kernels use it to place a
    tile's selected outputs (or find a tile's θ) without scanning; it depends only on the mask."""
    selected = _bitmap_selection(bitmap, rows * cols, invert).view(rows, cols)
    n_tiles = -(-cols // tile)
    padded = torch.zeros(rows, n_tiles * tile, dtype=torch.int64, device=bitmap.device)
    padded[:, :cols] = selected
    per_tile = padded.view(rows, n_tiles, tile).sum(dim=2).reshape(-1)
    return (per_tile.cumsum(0) - per_tile).to(torch.int32).view(rows, n_tiles)


# In-place updates of a bitmap-selected subset: op → (compact operands it takes, the update on the
# gathered vector ``v``). Each is the aten in-place op itself, so the reference is exactly what
# gather → op → scatter computed before.
UPDATE_OPS = {
    "mul_scalar": (0, lambda v, t1, t2, s: v.mul_(s)),
    "mul": (1, lambda v, t1, t2, s: v.mul_(t1)),
    "add": (1, lambda v, t1, t2, s: v.add_(t1, alpha=s)),
    "addcmul": (2, lambda v, t1, t2, s: v.addcmul_(t1, t2, value=s)),
    "addcdiv": (2, lambda v, t1, t2, s: v.addcdiv_(t1, t2, value=s)),
    "lerp": (1, lambda v, t1, t2, s: v.lerp_(t1, s)),
    "copy": (1, lambda v, t1, t2, s: v.copy_(t1)),
}


def check_update(op: str, values: torch.Tensor, tensor1, tensor2) -> None:
    """ValueError unless ``op`` is known and gets exactly its compact operands, of one length
    (and for lerp of ``values``' dtype, as torch.lerp requires)."""
    form = UPDATE_OPS.get(op)
    if form is None:
        raise ValueError(f"update_by_bitmap_: unknown op {op!r}, expected one of {sorted(UPDATE_OPS)}")
    if form[0] == 0 and tensor1 is None and tensor2 is None:
        return  # mul_scalar: nothing more to check
    given = [t for t in (tensor1, tensor2) if t is not None]
    if len(given) != form[0] or (tensor1 is None and tensor2 is not None):
        raise ValueError(f"update_by_bitmap_: op {op!r} takes {UPDATE_OPS[op][0]} compact tensor(s) "
                         f"(tensor1, tensor2), got {len(given)}")
    if any(t.numel() != given[0].numel() for t in given):  # pairwise: a set hashes (fixes) a traced length
        raise ValueError(f"update_by_bitmap_: tensor1 and tensor2 differ in length ({tensor1.numel()} vs "
                         f"{tensor2.numel()})")
    if op == "lerp" and tensor1.dtype != values.dtype:
        raise ValueError(f"update_by_bitmap_: lerp needs tensor1 of the values' dtype {values.dtype}, "
                         f"got {tensor1.dtype}")


def _update_at_positions_(values: torch.Tensor, positions: torch.Tensor, op: str, tensor1, tensor2,
                          scalar: float, scratch) -> bool:
    """Run ``op`` of :func:`update_by_bitmap_` on flat ``values`` as one read-modify-write at
    ``positions`` (scatter_reduce_ / scatter_add_ / scatter_), instead of gathering the selected
    values, updating them and scattering them back; whether this form serves ``op``. Only forms
    whose arithmetic is the aten op's own, to the bit: v·s and v·t1 are one product; addcdiv is
    v + (s·t1)/t2 as torch's CPU kernel rounds it in float32 (other dtypes compute in float32
    and round once, which an unfused form would not); add with alpha 1 is v + t1 (torch fuses
    v + s·t1 for other alphas into one rounding); lerp and addcmul keep the gathered form.
    ``scratch()`` gives the float32 work vector of the selection (:func:`selection_scratch`)."""
    if op == "copy":
        values.scatter_(0, positions, tensor1.to(values.dtype))
        return True
    if (values.dtype != torch.float32 or (tensor1 is not None and tensor1.dtype != torch.float32)
            or (tensor2 is not None and tensor2.dtype != torch.float32)):
        return False
    if op == "mul_scalar":
        # a filled vector, not a stride-0 view of one scalar: scatter_reduce_ reads a contiguous
        # source faster than the fill costs
        values.scatter_reduce_(0, positions, scratch().fill_(scalar), "prod")
    elif op == "mul":
        values.scatter_reduce_(0, positions, tensor1, "prod")
    elif op == "add" and scalar == 1:
        values.scatter_add_(0, positions, tensor1)
    elif op == "addcdiv":
        values.scatter_add_(0, positions, torch.mul(tensor1, scalar, out=scratch()).div_(tensor2))
    else:
        return False
    return True


@kernel_op
def update_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                      invert: bool, op: str, tensor1, tensor2, scalar: float) -> torch.Tensor:
    """An in-place update of the elements of contiguous ``values`` whose bit is set (clear if
    ``invert``), ``v`` below; ``tensor1``/``tensor2`` hold one entry per selected element (row-major
    order over the selection) or are None. ``op``: "mul_scalar" v·s, "mul" v·t1, "add" v + s·t1,
    "addcmul" v + s·t1·t2, "addcdiv" v + s·t1/t2, "lerp" v + s·(t1 − v) (torch.lerp with a
    scalar weight), "copy" t1. Every other element stays untouched. Returns ``values``."""
    check_update(op, values, tensor1, tensor2)
    numel = values.numel()
    positions = selected_positions(bitmap, numel, invert)
    if positions is not None:
        if tensor1 is not None:
            _check_positions("update_by_bitmap_", positions, tensor1.numel())
        def scratch():
            return selection_scratch(bitmap, numel, invert, positions.numel())

        flat_values = values.view(-1)
        if _update_at_positions_(flat_values, positions, op, tensor1, tensor2, scalar, scratch):
            return values
        flat = flat_values.index_select(0, positions)
        UPDATE_OPS[op][1](flat, tensor1, tensor2, scalar)
        flat_values.scatter_(0, positions, flat)
        return values
    selected = _bitmap_selection(bitmap, values.numel(), invert)
    flat = values.reshape(-1)[selected]
    if tensor1 is not None:
        _check_count("update_by_bitmap_", selected, tensor1.numel())
    UPDATE_OPS[op][1](flat, tensor1, tensor2, scalar)
    values.view(-1).masked_scatter_(selected, flat)
    return values


def check_foreach_lengths(name: str, lists) -> None:
    """ValueError unless the per-weight lists of a foreach kernel all have one length."""
    if len({len(a) for a in lists}) != 1:
        raise ValueError(f"{name}: every list must hold one entry per weight, got lengths {[len(a) for a in lists]}")


@kernel_op
def foreach_update_by_bitmap_(values: List[torch.Tensor], bitmaps: List[torch.Tensor],
                              block_prefixes: List[torch.Tensor], block_sizes: List[int], inverts: List[bool], op: str,
                              tensor1s: List[Optional[torch.Tensor]], tensor2s: List[Optional[torch.Tensor]],
                              scalars: List[float]) -> None:
    """:func:`update_by_bitmap_` with one ``op`` on each weight of equally long lists (entry j of
    every list belongs to weight j; a ``_foreach_`` op's list positions)."""
    update_each_weight_(update_by_bitmap_, values, bitmaps, block_prefixes, block_sizes, inverts, op, tensor1s,
                        tensor2s, scalars)


def update_each_weight_(update, values, bitmaps, block_prefixes, block_sizes, inverts, op, tensor1s, tensor2s,
                        scalars) -> None:
    """A foreach_update_by_bitmap_ as one ``update`` (an update_by_bitmap_ implementation) per weight."""
    lists = (values, bitmaps, block_prefixes, block_sizes, inverts, tensor1s, tensor2s, scalars)
    check_foreach_lengths("foreach_update_by_bitmap_", lists)
    for v, bitmap, prefix, block_size, invert, t1, t2, scalar in zip(*lists):
        update(v, bitmap, prefix, block_size, invert, op, t1, t2, scalar)

"""Triton versions of the mask utilities in :mod:`mask_ops` (same signatures, same results).

Compact positions: an element's place in a compact vector is the number of selected elements
before it. Bool-mask ops count per 1024-element block, take a cumulative sum of those counts and
then place each block's elements with an in-block scan. Bitmap ops need no counting pass: the
stored block prefix gives each block's start (``b·block_size − prefix`` for the clear bits).

Import only where triton imports (``kernels/__init__.py`` checks).
"""
from typing import Optional

import torch

from . import mask_ops
from ._triton_support import (PREFIX_TILE, Variant, block_walk, cast_to, chunk_elements, chunk_selection, cuda_op,
                              next_power_of_2, selected_before_block, tl, triton)

BLOCK = 1024  # elements per program of the bool-mask kernels
PACK_BYTES = 256  # bitmap bytes per program of pack_bitmap


# --------------------------------------------------------------------------- kernels
@triton.jit
def _pack_bitmap_kernel(mask_ptr, out_ptr, numel, n_bytes, BYTES: tl.constexpr):
    byte = tl.program_id(0) * BYTES + tl.arange(0, BYTES)
    bit = tl.arange(0, 8)
    element = byte[:, None] * 8 + bit[None, :]
    flags = tl.load(mask_ptr + element, mask=element < numel, other=0).to(tl.int32)
    packed = tl.sum((flags != 0).to(tl.int32) << bit[None, :], axis=1)
    tl.store(out_ptr + byte, packed.to(tl.uint8), mask=byte < n_bytes)


@triton.jit
def _unpack_bitmap_kernel(bitmap_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    element = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = element < numel
    byte = tl.load(bitmap_ptr + (element >> 3), mask=inside, other=0).to(tl.int32)
    tl.store(out_ptr + element, ((byte >> (element & 7)) & 1).to(tl.uint8), mask=inside)


@triton.jit
def _mask_block_counts_kernel(mask_ptr, counts_ptr, numel, BLOCK: tl.constexpr):
    element = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    flags = tl.load(mask_ptr + element, mask=element < numel, other=0)
    tl.store(counts_ptr + tl.program_id(0), tl.sum((flags != 0).to(tl.int32), axis=0))


@triton.jit
def _mask_positions(mask_ptr, block_start_ptr, numel, n_compact, BLOCK: tl.constexpr):
    """(element, position, selected) of this program's BLOCK elements of a bool mask: an element's
    compact position is the selected count before its block (``block_start``, inclusive cumsum of
    the block counts) plus its rank in the block; positions at or past ``n_compact`` (a count that
    does not match the mask) are never selected."""
    pid = tl.program_id(0)
    element = pid * BLOCK + tl.arange(0, BLOCK)
    flags = (tl.load(mask_ptr + element, mask=element < numel, other=0) != 0).to(tl.int32)
    start = tl.load(block_start_ptr + pid - 1, mask=pid > 0, other=0)
    position = start + tl.cumsum(flags, axis=0) - flags
    return element, position, (flags != 0) & (position < n_compact)


@triton.jit
def _gather_by_mask_kernel(values_ptr, mask_ptr, block_start_ptr, compact_ptr, numel, n_compact,
                           BLOCK: tl.constexpr):
    """compact[position(e)] = values[e] for every selected element e (cast to compact's dtype)."""
    element, position, selected = _mask_positions(mask_ptr, block_start_ptr, numel, n_compact, BLOCK)
    value = tl.load(values_ptr + element, mask=selected)
    tl.store(compact_ptr + position, cast_to(value, compact_ptr.dtype.element_ty), mask=selected)


@triton.jit
def _scatter_by_mask_kernel(values_ptr, mask_ptr, block_start_ptr, compact_ptr, numel, n_compact,
                            BLOCK: tl.constexpr):
    """values[e] = compact[position(e)] for every selected element e; the others stay untouched."""
    element, position, selected = _mask_positions(mask_ptr, block_start_ptr, numel, n_compact, BLOCK)
    value = tl.load(compact_ptr + position, mask=selected)
    tl.store(values_ptr + element, cast_to(value, values_ptr.dtype.element_ty), mask=selected)


@triton.jit
def _gather_by_bitmap_kernel(values_ptr, bitmap_ptr, block_prefix_ptr, compact_ptr, numel, block_size, n_compact,
                             INVERT: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """compact[position(e)] = values[e] for every element e whose bit is set (clear if INVERT);
    one program per prefix block, walking it in chunks."""
    block = tl.program_id(0)
    start = block.to(tl.int64) * block_size
    running = selected_before_block(block_prefix_ptr, block, start, INVERT)
    for offset in range(0, block_size, CHUNK):
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        value = tl.load(values_ptr + element, mask=inside)  # before the mask walk (see chunk_elements)
        flags, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel, n_compact,
                                                    INVERT, ALIGNED, CHUNK)
        tl.store(compact_ptr + position, cast_to(value, compact_ptr.dtype.element_ty), mask=selected)
        running += tl.sum(flags, axis=0).to(tl.int64)


@triton.jit
def _scatter_by_bitmap_kernel(values_ptr, bitmap_ptr, block_prefix_ptr, compact_ptr, numel, block_size, n_compact,
                              INVERT: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
    """values[e] = compact[position(e)] for every element e whose bit is set (clear if INVERT);
    the others stay untouched. One program per prefix block."""
    block = tl.program_id(0)
    start = block.to(tl.int64) * block_size
    running = selected_before_block(block_prefix_ptr, block, start, INVERT)
    for offset in range(0, block_size, CHUNK):
        element, inside = chunk_elements(start, offset, block_size, numel, CHUNK)
        flags, position, selected = chunk_selection(bitmap_ptr, start + offset, inside, running, numel, n_compact,
                                                    INVERT, ALIGNED, CHUNK)
        value = tl.load(compact_ptr + position, mask=selected)
        tl.store(values_ptr + element, cast_to(value, values_ptr.dtype.element_ty), mask=selected)
        running += tl.sum(flags, axis=0).to(tl.int64)


@triton.jit
def _bitmap_tile_counts_kernel(bitmap_ptr, counts_ptr, cols, n_tiles, INVERT: tl.constexpr, TILE: tl.constexpr,
                       TILES: tl.constexpr):
    """counts[r, j] = selected elements among (r, j·TILE … j·TILE+TILE−1); grid (rows, ⌈n_tiles/TILES⌉)."""
    row = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1) * TILES + tl.arange(0, TILES)
    col = tile[:, None] * TILE + tl.arange(0, TILE)[None, :]
    inside = (tile[:, None] < n_tiles) & (col < cols)
    element = row * cols + col
    byte = tl.load(bitmap_ptr + (element >> 3), mask=inside, other=0).to(tl.int32)
    bit = (byte >> (element & 7).to(tl.int32)) & 1
    if INVERT:
        bit = 1 - bit
    flags = tl.where(inside, bit, 0)
    tl.store(counts_ptr + row * n_tiles + tile, tl.sum(flags, axis=1), mask=tile < n_tiles)


# --------------------------------------------------------------------------- launchers
def _mask_bytes(mask_flat: torch.Tensor) -> torch.Tensor:
    """The bool mask as bytes (a view, no copy) so kernels load 0/1 uint8."""
    mask_flat = mask_flat.reshape(-1)
    return mask_flat.view(torch.uint8) if mask_flat.dtype == torch.bool else mask_flat


def _pack_bitmap(mask_flat: torch.Tensor) -> torch.Tensor:
    flags = _mask_bytes(mask_flat.contiguous())
    numel = flags.numel()
    n_bytes = -(-numel // 8)
    out = torch.empty(n_bytes, dtype=torch.uint8, device=flags.device)
    if n_bytes:
        _pack_bitmap_kernel[(triton.cdiv(n_bytes, PACK_BYTES),)](flags, out, numel, n_bytes, BYTES=PACK_BYTES)
    return out


def _unpack_bitmap(bitmap: torch.Tensor, numel: int) -> torch.Tensor:
    if numel > bitmap.numel() * 8:
        raise ValueError(f"unpack_bitmap: {bitmap.numel()} bytes hold at most {bitmap.numel() * 8} elements, "
                         f"asked for {numel}")
    out = torch.empty(numel, dtype=torch.uint8, device=bitmap.device)
    if numel:
        _unpack_bitmap_kernel[(triton.cdiv(numel, BLOCK),)](bitmap, out, numel, BLOCK=BLOCK)
    return out.view(torch.bool)


def _block_starts(flags: torch.Tensor) -> torch.Tensor:
    """Selected elements before the end of each BLOCK (int32 inclusive cumsum of block counts)."""
    n_blocks = triton.cdiv(flags.numel(), BLOCK)
    counts = torch.empty(n_blocks, dtype=torch.int32, device=flags.device)
    _mask_block_counts_kernel[(n_blocks,)](flags, counts, flags.numel(), BLOCK=BLOCK)
    return torch.cumsum(counts, 0, dtype=torch.int32)


def gather_by_mask_cast(values: torch.Tensor, trainable_flat: torch.Tensor,
                        out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``values.reshape(-1)[trainable_flat]`` (in ``out_dtype`` if given: the cast is fused)."""
    flat = values.reshape(-1)
    flags = _mask_bytes(trainable_flat)
    if flags.numel() != flat.numel():
        raise ValueError(f"gather_trainable: mask has {flags.numel()} elements, values {flat.numel()}")
    if flat.numel() == 0:
        return flat.new_empty(0, dtype=out_dtype or flat.dtype)
    starts = _block_starts(flags)
    out = torch.empty(int(starts[-1]), dtype=out_dtype or flat.dtype, device=flat.device)
    if out.numel():
        _gather_by_mask_kernel[(starts.numel(),)](flat, flags, starts, out, flat.numel(), out.numel(), BLOCK=BLOCK)
    return out


def _gather_trainable(values: torch.Tensor, trainable_flat: torch.Tensor) -> torch.Tensor:
    return gather_by_mask_cast(values, trainable_flat)


def _scatter_trainable_(values: torch.Tensor, trainable_flat: torch.Tensor, compact: torch.Tensor) -> None:
    if not values.is_contiguous():
        raise ValueError("scatter_trainable_: values must be contiguous")
    flags = _mask_bytes(trainable_flat)
    if flags.numel() != values.numel():
        raise ValueError(f"scatter_trainable_: mask has {flags.numel()} elements, values {values.numel()}")
    if values.numel() == 0 or compact.numel() == 0:
        return
    starts = _block_starts(flags)
    _scatter_by_mask_kernel[(starts.numel(),)](values, flags, starts, compact.contiguous(), values.numel(),
                                               compact.numel(), BLOCK=BLOCK)


def gather_by_bitmap_cast(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                          invert: bool, count: int, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """:func:`mask_ops.gather_by_bitmap` (``out_dtype``: fused cast). Trusts ``count`` (no
    device sync to check it): a wrong one leaves entries unwritten but never writes out of bounds."""
    flat = values.reshape(-1)
    out = torch.empty(count, dtype=out_dtype or flat.dtype, device=flat.device)
    if count and flat.numel():
        n_blocks = triton.cdiv(flat.numel(), block_size)
        _gather_by_bitmap_kernel[(n_blocks,)](flat, bitmap, block_prefix, out, flat.numel(), block_size, count,
                                              INVERT=bool(invert), **block_walk(block_size))
    return out


def _gather_by_bitmap(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                      invert: bool, count: int) -> torch.Tensor:
    return gather_by_bitmap_cast(values, bitmap, block_prefix, block_size, invert, count)


def _scatter_by_bitmap_(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, block_size: int,
                        invert: bool, compact: torch.Tensor) -> None:
    if not values.is_contiguous():
        raise ValueError("scatter_by_bitmap_: values must be contiguous")
    if values.numel() == 0 or compact.numel() == 0:
        return
    n_blocks = triton.cdiv(values.numel(), block_size)
    _scatter_by_bitmap_kernel[(n_blocks,)](values, bitmap, block_prefix, compact.contiguous(), values.numel(),
                                           block_size, compact.numel(), INVERT=bool(invert), **block_walk(block_size))


def tile_prefix_and_total(bitmap: torch.Tensor, rows: int, cols: int, tile: int, invert: bool):
    """(:func:`mask_ops.bitmap_tile_prefix`, total selected as a 0-d int32 tensor)."""
    if tile != next_power_of_2(tile):
        raise ValueError(f"bitmap_tile_prefix: tile must be a power of 2, got {tile}")
    n_tiles = -(-cols // tile)
    counts = torch.zeros(rows, n_tiles, dtype=torch.int32, device=bitmap.device)
    if rows * n_tiles == 0:
        return counts, counts.new_zeros(())
    tiles = max(1, min(next_power_of_2(n_tiles), 4096 // tile))
    _bitmap_tile_counts_kernel[(rows, triton.cdiv(n_tiles, tiles))](bitmap, counts, cols, n_tiles,
                                                                     INVERT=bool(invert), TILE=tile, TILES=tiles)
    flat = counts.view(-1)
    inclusive = torch.cumsum(flat, 0, dtype=torch.int32)
    return (inclusive - flat).view(rows, n_tiles), inclusive[-1]


def _bitmap_tile_prefix(bitmap: torch.Tensor, rows: int, cols: int, tile: int, invert: bool) -> torch.Tensor:
    return tile_prefix_and_total(bitmap, rows, cols, tile, invert)[0]


# --------------------------------------------------------------------------- fake (meta) implementations
def _fake_pack(mask_flat):
    return mask_flat.new_empty(-(-mask_flat.numel() // 8), dtype=torch.uint8)


def _fake_unpack(bitmap, numel):
    return bitmap.new_empty(numel, dtype=torch.bool)


def _fake_gather(values, trainable_flat):
    return values.new_empty(torch.library.get_ctx().new_dynamic_size())


def _fake_scatter(values, trainable_flat, compact):
    return None


def _fake_gather_bitmap(values, bitmap, block_prefix, block_size, invert, count):
    return values.new_empty(count)


def _fake_scatter_bitmap(values, bitmap, block_prefix, block_size, invert, compact):
    return None


def _fake_tile_prefix(bitmap, rows, cols, tile, invert):
    return bitmap.new_empty(rows, -(-cols // tile), dtype=torch.int32)


# --------------------------------------------------------------------------- compile variants
def _pack_variants(quick: bool):
    yield Variant(_pack_bitmap_kernel, dict(mask_ptr="*u8", out_ptr="*u8", numel="i32", n_bytes="i32"),
                  {"BYTES": PACK_BYTES})


def _unpack_variants(quick: bool):
    yield Variant(_unpack_bitmap_kernel, dict(bitmap_ptr="*u8", out_ptr="*u8", numel="i32"), {"BLOCK": BLOCK})


def _by_mask_variants(kernel):
    def variants(quick: bool):
        yield Variant(_mask_block_counts_kernel, dict(mask_ptr="*u8", counts_ptr="*i32", numel="i32"),
                      {"BLOCK": BLOCK})
        for values, compact in [("*bf16", "*bf16"), ("*bf16", "*fp32")]:
            yield Variant(kernel, dict(values_ptr=values, mask_ptr="*u8", block_start_ptr="*i32", compact_ptr=compact,
                                       numel="i32", n_compact="i32"), {"BLOCK": BLOCK})
    return variants


def _by_bitmap_variants(kernel):
    def variants(quick: bool):
        for invert in (True, False):
            yield Variant(kernel, dict(values_ptr="*bf16", bitmap_ptr="*u8", block_prefix_ptr="*i32",
                                       compact_ptr="*fp32", numel="i32", block_size="i32", n_compact="i32"),
                          {"INVERT": invert, "ALIGNED": True, "CHUNK": 1024})
    return variants


def _tile_prefix_variants(quick: bool):
    yield Variant(_bitmap_tile_counts_kernel, dict(bitmap_ptr="*u8", counts_ptr="*i32", cols="i32", n_tiles="i32"),
                  {"INVERT": True, "TILE": PREFIX_TILE, "TILES": 32})


# --------------------------------------------------------------------------- the ops (mask_ops' signatures)
pack_bitmap = cuda_op(mask_ops.pack_bitmap, _pack_bitmap, _fake_pack, variants=_pack_variants)
unpack_bitmap = cuda_op(mask_ops.unpack_bitmap, _unpack_bitmap, _fake_unpack, variants=_unpack_variants)
gather_trainable = cuda_op(mask_ops.gather_trainable, _gather_trainable, _fake_gather,
                           variants=_by_mask_variants(_gather_by_mask_kernel))
scatter_trainable_ = cuda_op(mask_ops.scatter_trainable_, _scatter_trainable_, _fake_scatter, mutates_args=["values"],
                             returns_first_arg=True, variants=_by_mask_variants(_scatter_by_mask_kernel))
gather_by_bitmap = cuda_op(mask_ops.gather_by_bitmap, _gather_by_bitmap, _fake_gather_bitmap,
                           variants=_by_bitmap_variants(_gather_by_bitmap_kernel))
scatter_by_bitmap_ = cuda_op(mask_ops.scatter_by_bitmap_, _scatter_by_bitmap_, _fake_scatter_bitmap,
                             mutates_args=["values"], returns_first_arg=True,
                             variants=_by_bitmap_variants(_scatter_by_bitmap_kernel))
bitmap_tile_prefix = cuda_op(mask_ops.bitmap_tile_prefix, _bitmap_tile_prefix, _fake_tile_prefix,
                             variants=_tile_prefix_variants)

"""What every Triton kernel module shares: the guarded import, the interpreter flag, the
torch.library custom-op wrapper, and :func:`cuda_op`, which declares an op's CUDA implementation
and compile variants in the kernel table (``_table``).

Importing this module never fails: without triton (or with a broken install) ``HAS_TRITON`` is
False and the kernel modules are simply not imported (see ``kernels/__init__.py``).

Each Triton op is a ``torch.library.custom_op`` named ``resu_tensor::<name>`` with a fake
(meta) implementation, so torch.compile traces it as one opaque node without graph breaks. In
eager mode the table calls the plain Python launcher directly (:func:`eager_or_op`): going
through the dispatcher costs several microseconds per call, which matters for M=1 decoding and
for the optimizer's many small gathers.
"""
import math
import os
import struct
import warnings
from typing import Callable, Iterable, Optional

import torch

from ._table import Variant, declared

try:  # pragma: no cover - depends on the machine
    import triton  # noqa: F401
    import triton.language as tl  # noqa: F401

    HAS_TRITON = True
except Exception:  # ImportError, or a triton that does not match this torch
    triton = None
    tl = None
    HAS_TRITON = False

NAMESPACE = "resu_tensor"


def interpreting() -> bool:
    """True when kernels run on the CPU interpreter (``TRITON_INTERPRET=1`` before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Column width of a ``bitmap_tile_prefix`` table that the matmul kernels accept (their column
# tiles are multiples of it). Small on the interpreter so tiny test shapes span several tiles.
PREFIX_TILE = 16 if interpreting() else 128

# The interpreter's tl.dot gives garbage for 16-bit floats (numpy has no bfloat16): kernels
# upcast dot operands to float32 there, which is also what the GPU's MMA computes exactly.
DOT_UPCAST = interpreting()


def define_op(name: str, impl: Callable, fake: Callable, mutates_args: Iterable[str] = ()):
    """``torch.library.custom_op("resu_tensor::<name>")`` around ``impl`` with ``fake`` as its
    meta implementation. Importing a kernel module twice (e.g. as ``kernels`` and as
    ``resu_tensor.kernels``) reuses the op already registered instead of failing."""
    namespace = getattr(torch.ops, NAMESPACE)
    if hasattr(namespace, name):
        return getattr(namespace, name)
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    return getattr(namespace, name)


def _compile_errors() -> tuple:
    """Exception types meaning "this kernel does not build on this machine" (not a wrong input)."""
    if not HAS_TRITON:
        return ()
    found = []
    for module, name in [("triton.compiler.errors", "CompilationError"), ("triton.runtime.errors", "OutOfResources"),
                         ("triton.runtime.errors", "PTXASError")]:
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(found)


_COMPILE_ERRORS = _compile_errors()
FALLEN_BACK: dict[str, str] = {}  # op name → why it runs its reference instead (see eager_or_op)


def _tracing() -> bool:
    """Dynamo, or AOTAutograd/export running on fake tensors (not flagged by is_compiling() on
    every supported torch): launching a kernel on fake tensors would fail, the op traces.
    What ``torch._guards.detect_fake_mode()`` checks, at a quarter of its cost (it runs before
    every kernel launch)."""
    if torch.compiler.is_compiling():
        return True
    context = torch._guards.TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return True
    return torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None


def eager_or_op(name: str, impl: Callable, op: Callable, fallback: Callable,
                returns_first_arg: bool = False) -> Callable:
    """The function to register in the kernel table: the custom op while torch.compile traces
    (so the graph holds one node with a fake implementation), the launcher itself in eager mode.
    If the kernel fails to *compile* on this machine (a triton/GPU combination it was never
    built on), warn once and run ``fallback`` (the reference) from then on; ``FALLEN_BACK``
    records it. ``returns_first_arg`` is for in-place ops, whose custom op returns nothing."""

    def call(*args, **kwargs):
        if _tracing():
            result = op(*args, **kwargs)
            return args[0] if returns_first_arg else result
        if name in FALLEN_BACK:
            return fallback(*args, **kwargs)
        try:
            return impl(*args, **kwargs)
        except _COMPILE_ERRORS as error:
            FALLEN_BACK[name] = f"{type(error).__name__}: {error}"
            warnings.warn(f"resu_tensor.kernels: the Triton kernel for {name} does not compile here "
                          f"({type(error).__name__}); using the plain-PyTorch reference instead", RuntimeWarning)
            return fallback(*args, **kwargs)

    call.__name__ = name
    call.__doc__ = impl.__doc__
    return call


def cuda_op(reference: Callable, launcher: Callable, fake: Callable, mutates_args: Iterable[str] = (),
            returns_first_arg: bool = False, variants: Optional[Callable[[bool], Iterable[Variant]]] = None
            ) -> Callable:
    """Declare the CUDA implementation of the kernel op whose reference is ``reference`` (declared
    with ``@kernel_op``): ``launcher`` (the Triton launch, same arguments as the reference) becomes
    the custom op ``resu_tensor::<name>`` with ``fake`` as its meta implementation, and the
    :func:`eager_or_op` around both is registered for "cuda" and returned. ``returns_first_arg``:
    an in-place op whose launcher returns nothing but whose reference returns its first argument.
    ``variants(quick)`` yields the :class:`Variant` s of the kernels it launches (compile_check)::

        pack_bitmap = cuda_op(mask_ops.pack_bitmap, _pack_bitmap, _fake_pack, variants=_pack_variants)
    """
    op = declared(reference)
    eager = launcher
    if returns_first_arg:
        def eager(*args, **kwargs):
            launcher(*args, **kwargs)
            return args[0]

        eager.__doc__ = launcher.__doc__
    call = eager_or_op(op.name, eager, define_op(op.name, launcher, fake, mutates_args), reference,
                       returns_first_arg=returns_first_arg)
    op.implementations["cuda"] = call
    op.variants = variants
    return call


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


BLOCK_CHUNK = 1024  # elements per chunk of the bitmap kernels (a step of a block walk, or one program's share)


def chunk_count(numel: int, block_size: int, chunk: int) -> int:
    """Programs of a kernel that runs one per ``chunk`` elements of each prefix block (see
    ``selected_before_chunk``) over a weight of ``numel`` elements."""
    return -(-numel // block_size) * -(-block_size // chunk)


def chunk_grid(rows: list, chunk: int) -> tuple:
    """Grid of a multi-tensor kernel with one program per CHUNK of a prefix block (a table's rows,
    :func:`table_row`): (most chunks of any weight, weights)."""
    return max(chunk_count(row[3], row[5], chunk) for row in rows), len(rows)


def block_walk(block_size: int) -> dict:
    """Launch constexprs of a kernel that walks prefix blocks of ``block_size`` elements in
    chunks (:func:`chunk_elements`): CHUNK, and ALIGNED where every chunk starts on a mask byte."""
    return {"CHUNK": min(BLOCK_CHUNK, next_power_of_2(block_size)), "ALIGNED": block_size % 8 == 0}


# Every masked-weight table row begins with these columns (see table_row / table_chunk).
TABLE_COLUMNS = ("values", "bitmap", "block_prefix", "numel", "n_compact", "block_size")


def table_row(values: torch.Tensor, bitmap: torch.Tensor, block_prefix: torch.Tensor, n_compact: int,
              block_size: int, *extra: int) -> list:
    """One weight's row of a multi-tensor kernel's table: ``TABLE_COLUMNS``, then ``extra``."""
    return [values.data_ptr(), bitmap.data_ptr(), block_prefix.data_ptr(), values.numel(), n_compact, block_size,
            *extra]


def address_table(rows: list, device: torch.device) -> torch.Tensor:
    """int64 rows (tensor addresses and sizes) of a multi-tensor kernel, on ``device``: copied from
    pinned memory without waiting for the GPU (the caching host allocator keeps the buffer until
    the copy is done, and never recycles one allocated while a CUDA graph captures: every replay
    copies from it again)."""
    table = torch.tensor(rows, dtype=torch.int64, pin_memory=device.type == "cuda")
    return table.to(device, non_blocking=True)


def table_group(op: str, j: int, block_size: int, **tensors: torch.Tensor) -> tuple:
    """The launch group of weight ``j`` of a multi-tensor kernel (weights of one group share one
    launch): the dtypes of ``tensors`` and the walk's CHUNK and ALIGNED. ValueError for a dtype
    the kernels do not read."""
    for name, t in tensors.items():
        if t.dtype not in TL_DTYPES:
            raise ValueError(f"{op}: {name} of weight {j} is {t.dtype}; accepted: {sorted(str(d) for d in TL_DTYPES)}")
    walk = block_walk(block_size)
    return (*(t.dtype for t in tensors.values()), walk["CHUNK"], walk["ALIGNED"])


def float32_bits(x: float) -> int:
    """The bits of ``x`` rounded to float32 (as Triton passes a float argument), as an int32."""
    try:
        packed = struct.pack("<f", x)
    except OverflowError:  # beyond float32: ±inf, as the rounding would give
        packed = struct.pack("<f", math.copysign(math.inf, x))
    return struct.unpack("<i", packed)[0]


# Multi-tensor kernels read each tensor's address from an int64 table (:func:`address_table`).
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if HAS_TRITON else {}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small fixed number on the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision matching what torch.matmul does for ``dtype`` right now."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


if HAS_TRITON:
    # The interpreter truncates float32 → bfloat16 where the GPU rounds to nearest even; kernels
    # cast through :func:`cast_to` so interpreter results match the GPU (and torch) bit for bit.
    _ROUND_BY_HAND = tl.constexpr(interpreting())

    @triton.jit
    def cast_to(value, dtype: tl.constexpr):
        """``value.to(dtype)``, rounding float32 → bfloat16 to nearest even on the interpreter too."""
        if _ROUND_BY_HAND and dtype == tl.bfloat16 and value.dtype != tl.bfloat16:
            bits = value.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return value.to(dtype)

    @triton.jit
    def repeat_each(t, LOG2_TIMES: tl.constexpr):
        """``t`` (1-D) with every entry repeated 2**LOG2_TIMES times in place, in registers."""
        for _ in tl.static_range(LOG2_TIMES):
            t = tl.interleave(t, t)
        return t

    @triton.jit
    def chunk_bits(bitmap_ptr, first, numel, ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
        """Mask bits of elements ``first`` … ``first + CHUNK − 1`` (bit j of byte i = element 8i+j;
        0 past ``numel``). ALIGNED (``first`` a multiple of 8, as in every prefix block of
        ``prefix_block_size``): one byte load per 8 elements, each byte repeated 8 times in
        registers by interleaving, instead of a byte load per element (the general path), which
        dominates the cost of a bitmap walk."""
        if ALIGNED:
            byte_index = first // 8 + tl.arange(0, CHUNK // 8)
            byte = tl.load(bitmap_ptr + byte_index, mask=byte_index < (numel + 7) // 8, other=0).to(tl.int32)
            return (repeat_each(byte, 3) >> (tl.arange(0, CHUNK) & 7)) & 1
        else:
            element = first + tl.arange(0, CHUNK)
            byte = tl.load(bitmap_ptr + (element >> 3), mask=element < numel, other=0).to(tl.int32)
            return (byte >> (element & 7).to(tl.int32)) & 1

    @triton.jit
    def selected_before_block(block_prefix_ptr, block, start, INVERT: tl.constexpr):
        """Selected elements (set bits, clear bits if INVERT) before prefix block ``block``, which
        begins at element ``start``: block 0's prefix is not stored (it is 0)."""
        set_before = tl.load(block_prefix_ptr + block - 1, mask=block > 0, other=0).to(tl.int64)
        return start - set_before if INVERT else set_before

    @triton.jit
    def selected_positions(bitmap_ptr, first, inside, running, numel, INVERT: tl.constexpr, ALIGNED: tl.constexpr,
                           CHUNK: tl.constexpr):
        """(flags, positions) of the chunk of CHUNK elements from ``first``: flags = 1 where
        selected and ``inside``; positions = compact index of each element, ``running`` being the
        selected count before the chunk."""
        bit = chunk_bits(bitmap_ptr, first, numel, ALIGNED, CHUNK)
        flags = tl.where(inside, 1 - bit if INVERT else bit, 0)
        return flags, running + (tl.cumsum(flags, axis=0) - flags).to(tl.int64)

    @triton.jit
    def program_chunk(chunk, block_size, CHUNK: tl.constexpr):
        """(block, start, offset) of program ``chunk`` of a kernel that runs one program per CHUNK
        of each prefix block (see :func:`selected_before_chunk`): its prefix block, the block's
        first element and the chunk's offset in the block."""
        per_block = (block_size + CHUNK - 1) // CHUNK
        block = chunk // per_block
        return block, block.to(tl.int64) * block_size, (chunk % per_block) * CHUNK

    @triton.jit
    def selected_before_chunk(bitmap_ptr, block_prefix_ptr, block, start, offset, numel, INVERT: tl.constexpr,
                              ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
        """Selected elements before the chunk at ``offset`` in prefix block ``block``: the block's
        prefix count plus the bits of the block's earlier chunks. A program per chunk then waits
        for no other chunk, where a program walking the block in order waits at every chunk for
        the previous chunk's mask bytes and scan before it can load the compact operands, which
        keeps too few loads in flight to fill the memory bus; the earlier chunks' mask bytes it
        re-reads are an eighth of a byte per element, mostly from L2."""
        running = selected_before_block(block_prefix_ptr, block, start, INVERT)
        for before in range(0, offset, CHUNK):
            ones = tl.sum(chunk_bits(bitmap_ptr, start + before, numel, ALIGNED, CHUNK), axis=0).to(tl.int64)
            running += (CHUNK - ones) if INVERT else ones
        return running

    @triton.jit
    def chunk_elements(start, offset, block_size, numel, CHUNK: tl.constexpr):
        """(element, inside) of the chunk at ``offset`` in the prefix block that begins at element
        ``start``: a step of the kernels that walk one prefix block per program (gather/scatter,
        W_eff) or the one chunk of a program of those that run one per chunk (Adam, in-place
        updates). Those kernels read the chunk's weights masked by ``inside`` before
        :func:`chunk_selection`, not by the selection after it: the read then does not wait for
        the mask bytes and the scan, costs no extra DRAM traffic (a random mask leaves almost no
        32-byte sector unselected) and writes nothing."""
        local = offset + tl.arange(0, CHUNK)
        element = start + local
        return element, (local < block_size) & (element < numel)

    @triton.jit
    def chunk_selection(bitmap_ptr, first, inside, running, numel, n_compact, INVERT: tl.constexpr,
                        ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
        """(flags, position, selected) of a :func:`chunk_elements` chunk starting at element
        ``first``: :func:`selected_positions`, and ``selected`` also bounds ``position`` by
        ``n_compact``."""
        flags, position = selected_positions(bitmap_ptr, first, inside, running, numel, INVERT, ALIGNED, CHUNK)
        return flags, position, (flags != 0) & (position < n_compact)

    @triton.jit
    def table_entry(table_ptr, row, column, WIDTH: tl.constexpr):
        return tl.load(table_ptr + row * WIDTH + column)

    @triton.jit
    def table_pointer(table_ptr, row, column, WIDTH: tl.constexpr, DTYPE: tl.constexpr):
        """The address in (row, column) as a pointer for DTYPE values, 16-bit floats as uint16 (the
        interpreter reads typed 16-bit pointers made from addresses wrongly); read and write
        through it with :func:`load_float` / :func:`store_float`."""
        storage: tl.constexpr = tl.uint16 if DTYPE.primitive_bitwidth == 16 else DTYPE
        return table_entry(table_ptr, row, column, WIDTH).to(tl.pointer_type(storage))

    @triton.jit
    def table_chunk(table_ptr, row, chunk, WIDTH: tl.constexpr, CHUNK: tl.constexpr):
        """(block, start, offset, numel, n_compact, block_size) of program ``chunk`` (see
        :func:`program_chunk`) on the weight in table row ``row`` (``TABLE_COLUMNS``); the chunk
        exists where start + offset < numel."""
        numel, n_compact = table_entry(table_ptr, row, 3, WIDTH), table_entry(table_ptr, row, 4, WIDTH)
        block_size = table_entry(table_ptr, row, 5, WIDTH)
        block, start, offset = program_chunk(chunk, block_size, CHUNK)
        return block, start, offset, numel, n_compact, block_size

    @triton.jit
    def table_chunk_start(table_ptr, row, block, start, offset, numel, WIDTH: tl.constexpr, INVERT: tl.constexpr,
                          ALIGNED: tl.constexpr, CHUNK: tl.constexpr):
        """(bitmap pointer, selected count before the chunk) of a :func:`table_chunk` chunk."""
        bitmap_ptr = table_pointer(table_ptr, row, 1, WIDTH, tl.uint8)
        block_prefix_ptr = table_pointer(table_ptr, row, 2, WIDTH, tl.int32)
        return bitmap_ptr, selected_before_chunk(bitmap_ptr, block_prefix_ptr, block, start, offset, numel, INVERT,
                                                 ALIGNED, CHUNK)

    @triton.jit
    def load_float(ptr, offset, mask, DTYPE: tl.constexpr):
        """DTYPE values at ``ptr + offset`` (a :func:`table_pointer`) as float32."""
        value = tl.load(ptr + offset, mask=mask)
        if DTYPE.primitive_bitwidth == 16:
            value = value.to(DTYPE, bitcast=True)
        return value.to(tl.float32)

    @triton.jit
    def store_float(ptr, offset, value, mask, DTYPE: tl.constexpr):
        value = cast_to(value, DTYPE)
        if DTYPE.primitive_bitwidth == 16:
            value = value.to(tl.uint16, bitcast=True)
        tl.store(ptr + offset, value, mask=mask)

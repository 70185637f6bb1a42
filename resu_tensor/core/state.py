"""What a ResuTensor's state must satisfy, derived and checked in one place.

Every way a state enters a ResuTensor (``from_dense``, the mode changes through ``set_state_``, row
blocks, torch.load, safetensors, DDP broadcast, ``copy_``) goes through :func:`build_state` (which
derives ``n_active`` and the trainable key) or :func:`check_state` (which checks recorded ones), so
a state that breaks an invariant is refused where it enters, with a ``ValueError`` naming the field
and what it should hold. The checks read the mask (a device sync on GPU): they belong to mode
changes and loading, never to the per-step ops. On tensors being traced (torch.compile's fake or
functional tensors) only the metadata (kinds, shapes, dtypes) is checked.
"""
import hashlib
import math
import numbers
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from resu_tensor import kernels
from resu_tensor.core.mask_encoding import KINDS, EncodedMask, active_count, prefix_block_size
from resu_tensor.core.mode import Mode
from resu_tensor.core.tracing import is_traced
from resu_tensor.method.selective import EMA_DTYPES, SelectiveConfig

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRAINABLE_SIDES = ("all", "active", "pruned", "subset")
QUANT_BITS = (4, 8)
# Which coordinates may train in each mode (QRESU stores the active set frozen).
MODE_SIDES = {Mode.DENSE: ("all",), Mode.SPARSE: ("active",), Mode.RESU: ("pruned", "all", "subset"),
              Mode.QRESU: ("pruned", "subset")}
STORAGE_NAMES = ("values", "qdata", "qscale", "qoffset", "theta")
EMA_NAMES = ("selective_m", "selective_v", "grad_abs_sum")


@dataclass(frozen=True)
class QuantizedActive:
    """QRESU storage: the frozen active weights as ``bits``-bit group-wise codes (``qdata``, one
    float32 ``qscale``/``qoffset`` per row and group of ``group_size`` columns) and θ, the pruned
    coordinates' values, flat in row-major order.

    Example::

        w.set_state_(mode=Mode.QRESU, mask=w.encoded_mask(), trainable_side="pruned",
                     quantized=QuantizedActive(qdata, qscale, qoffset, theta, bits=4, group_size=128))
    """

    qdata: torch.Tensor
    qscale: torch.Tensor
    qoffset: torch.Tensor
    theta: torch.Tensor
    bits: int
    group_size: int


def trainable_key(side: str, mask: EncodedMask, subset: Optional[EncodedMask], shape) -> int:
    """A content hash of the trainable set: equal across processes, so saved optimizer state
    restores onto the same set and is recognised as stale on any other."""
    encodings = [mask] + ([subset] if subset is not None and subset.kind != "none" else [])
    digest = hashlib.blake2b(f"{side}|{[e.kind for e in encodings]}|{tuple(shape)}".encode(), digest_size=8)
    for encoded in encodings:
        for t in (encoded.bitmap, encoded.indices):
            if t is not None:
                digest.update(t.detach().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2


def build_state(storage_shape, compute_dtype: torch.dtype, *, mode, mask: EncodedMask, trainable_side: str,
                values: Optional[torch.Tensor] = None, quantized: Optional[QuantizedActive] = None,
                subset: Optional[EncodedMask] = None, target_sparsity: float = 0.0,
                selective: Optional[SelectiveConfig] = None, selective_m: Optional[torch.Tensor] = None,
                selective_v: Optional[torch.Tensor] = None, grad_abs_sum: Optional[torch.Tensor] = None,
                nm_pattern: Optional[tuple] = None, row_keep: Optional[int] = None,
                transposed: bool = False, view_shape: Optional[tuple] = None,
                where: str = "ResuTensor") -> dict:
    """Every constructor field of a ResuTensor from the parts of its state, with ``n_active``
    (from the mask) and ``trainable_key`` derived, checked by :func:`check_state`. Exactly one of
    ``values`` (dense storage) and ``quantized`` (QRESU) is given. The logical layout over the
    (out, in) storage: ``transposed`` (an (in, out) weight, e.g. transformers' Conv1D) or
    ``view_shape`` (an N-D conv weight (out, in/groups, k...), the storage its row-major
    (out, in·k...) reshape); neither: the storage shape itself.

    Example::

        fields = build_state((4, 8), torch.float32, mode=Mode.DENSE, mask=EncodedMask("none"),
                             trainable_side="all", values=torch.randn(4, 8))
        ResuTensor(**fields)
    """
    if (values is None) == (quantized is None):
        raise ValueError(f"{where}: a state needs exactly one of values= (dense storage) and quantized= (QRESU)")
    if quantized is not None and not isinstance(quantized, QuantizedActive):
        raise TypeError(f"{where}: quantized= takes a QuantizedActive, got {type(quantized).__name__}")
    subset = subset if subset is not None else EncodedMask("none")
    if not isinstance(mask, EncodedMask) or not isinstance(subset, EncodedMask):
        raise TypeError(f"{where}: mask= and subset= take EncodedMask values, got "
                        f"{type(mask).__name__} and {type(subset).__name__}")
    fields = {
        "storage_shape": tuple(storage_shape), "compute_dtype": compute_dtype,
        "mode_name": mode.value if isinstance(mode, Mode) else mode, "mask_kind": mask.kind,
        "trainable_side": trainable_side, "n_active": None,
        "target_sparsity": float(target_sparsity) if isinstance(target_sparsity, numbers.Real) else target_sparsity,
        "trainable_key": None,
        "values": values.contiguous() if isinstance(values, torch.Tensor) else values,
        "mask_bitmap": mask.bitmap, "mask_block_prefix": mask.block_prefix, "mask_indices": mask.indices,
        "qdata": None, "qscale": None, "qoffset": None, "theta": None,
        "subset_bitmap": subset.bitmap, "subset_block_prefix": subset.block_prefix, "subset_indices": subset.indices,
        "selective_m": selective_m, "selective_v": selective_v, "grad_abs_sum": grad_abs_sum,
        "transposed": transposed, "view_shape": None if view_shape is None else tuple(view_shape),
        "subset_kind": subset.kind, "quant_bits": None, "group_size": None,
        "selective": selective, "nm_pattern": nm_pattern, "row_keep": row_keep,
    }
    if quantized is not None:
        fields.update(qdata=quantized.qdata, qscale=quantized.qscale, qoffset=quantized.qoffset,
                      theta=quantized.theta, quant_bits=quantized.bits, group_size=quantized.group_size)
    fields["n_active"], fields["trainable_key"] = _check(fields, where)
    return fields


def check_state(fields: Mapping, where: str = "ResuTensor") -> None:
    """Refuse (``ValueError`` naming the field) a complete ResuTensor state (``ResuTensor.fields()``)
    that breaks an invariant: the tensors each mode holds, their shapes and dtypes, consistent mask
    and subset encodings (bitmap length and block prefix counts, indices sorted, unique and in
    range, subset inside the pruned set), θ and EMA lengths, and the recorded ``n_active`` and
    ``trainable_key`` against the ones the mask and subset give.

    Example::

        check_state(w.fields(), where="my_loader")   # raises on a corrupt state, else returns None
    """
    n_active, key = _check(fields, where)
    if key is None:  # traced: nothing data-dependent to compare
        return
    recorded = fields.get("n_active")
    if recorded != n_active:
        raise ValueError(f"{where}: n_active is {recorded!r} but the mask holds {n_active} active elements")
    if fields.get("trainable_key") != key:
        raise ValueError(f"{where}: trainable_key {fields.get('trainable_key')!r} does not match the trainable-set "
                         f"hash of its mask (and subset), {key}: the mask or subset was changed")


def upgrade_legacy_fields(fields: dict) -> dict:
    """Fields of the first checkpoint layout in the current one: ``nm`` (an N:M pattern, or
    (kept per row, in_features) after a row prune) becomes ``nm_pattern`` / ``row_keep``, and a
    ``selective`` tuple (``SelectiveConfig.as_tuple()``) becomes the SelectiveConfig."""
    fields = dict(fields)
    if "nm" in fields:
        nm = fields.pop("nm")
        fields.setdefault("nm_pattern", None)
        fields.setdefault("row_keep", None)
        if nm is not None:
            cols = tuple(fields.get("storage_shape", (0, 0)))[1]
            if len(nm) != 2:
                raise ValueError(f"legacy field nm must be a pair (N, M), got {nm!r}")
            if int(nm[1]) == cols:
                fields["row_keep"] = int(nm[0])
            else:
                fields["nm_pattern"] = (int(nm[0]), int(nm[1]))
    if isinstance(fields.get("selective"), (tuple, list)):
        fields["selective"] = SelectiveConfig(*fields["selective"])
    return fields


# --------------------------------------------------------------------------------------- checks
def _fail(where: str, name: str, got, expected: str):
    raise ValueError(f"{where}: {name} is {got}, expected {expected}")


def _describe(t) -> str:
    if t is None:
        return "absent"
    if isinstance(t, torch.Tensor):
        return f"a {t.dtype} tensor of shape {list(t.shape)}"
    return repr(t)


def _check_tensor(where, fields, name, shape, dtypes) -> torch.Tensor:
    t = fields.get(name)
    if not isinstance(t, torch.Tensor):
        _fail(where, name, _describe(t), f"a tensor of shape {list(shape)}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {list(t.shape)}, expected {list(shape)}")
    if t.dtype not in dtypes:
        _fail(where, name, f"of dtype {t.dtype}", f"one of {[str(d) for d in dtypes]}")
    return t


def _require_absent(where, fields, names, why: str) -> None:
    held = [n for n in names if fields.get(n) is not None]
    if held:
        raise ValueError(f"{where}: {', '.join(held)} must be absent ({why})")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_encoding(where, fields, prefix: str, shape, traced: bool) -> tuple[EncodedMask, Optional[torch.Tensor]]:
    """The ``prefix`` (mask or subset) encoding, checked; with the decoded flat bool mask for
    encodings whose content was read (bitmaps), None for the others."""
    kind = fields.get(f"{prefix}_kind")
    if kind not in KINDS:
        _fail(where, f"{prefix}_kind", repr(kind), f"one of {KINDS}")
    numel = shape[0] * shape[1]
    names = {"none": (), "bitmap": ("bitmap", "block_prefix")}.get(kind, ("indices",))
    _require_absent(where, fields, [f"{prefix}_{n}" for n in ("bitmap", "block_prefix", "indices") if n not in names],
                    f"{prefix}_kind is {kind!r}")
    if kind == "none":
        return EncodedMask("none"), None
    if kind == "bitmap":
        bitmap = _check_tensor(where, fields, f"{prefix}_bitmap", (-(-numel // 8),), (torch.uint8,))
        block = prefix_block_size(shape[1])
        n_blocks = -(-numel // block)
        block_prefix = _check_tensor(where, fields, f"{prefix}_block_prefix", (n_blocks - 1,), (torch.int32,))
        encoded = EncodedMask("bitmap", bitmap=bitmap, block_prefix=block_prefix)
        if traced:
            return encoded, None
        flat = kernels.unpack_bitmap(bitmap, numel)
        if not torch.equal(block_prefix, kernels.block_prefix_counts(flat, block)):
            raise ValueError(f"{where}: {prefix}_block_prefix does not match {prefix}_bitmap (its per-block counts "
                             "of set bits)")
        return encoded, flat
    indices = fields.get(f"{prefix}_indices")
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype != torch.int32:
        _fail(where, f"{prefix}_indices", _describe(indices), "a 1-D int32 tensor")
    if indices.numel() > numel:
        _fail(where, f"{prefix}_indices", f"{indices.numel()} long", f"at most {numel} indices")
    if not traced and indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= numel:
            _fail(where, f"{prefix}_indices", f"out of range [{low}, {high}]", f"flat indices in [0, {numel})")
        if not bool((indices[1:] > indices[:-1]).all()):
            _fail(where, f"{prefix}_indices", "not strictly increasing", "sorted unique flat indices")
    return EncodedMask(kind, indices=indices), None


def _check_view_shape(where, view_shape, shape, transposed) -> None:
    """``view_shape``: None, or the N-D logical shape (3 or more positive ints) whose row-major
    (out, in·k...) reshape is the storage shape; never together with ``transposed``."""
    if view_shape is None:
        return
    if not (isinstance(view_shape, tuple) and len(view_shape) >= 3 and all(_is_int(s) and s > 0 for s in view_shape)):
        _fail(where, "view_shape", repr(view_shape), "None or a tuple of 3 or more positive ints (out, in/groups, k...)")
    if view_shape[0] != shape[0] or math.prod(view_shape[1:]) != shape[1]:
        _fail(where, "view_shape", repr(view_shape), f"a shape whose (out, in·k...) reshape is the storage shape {shape}")
    if transposed:
        raise ValueError(f"{where}: view_shape {view_shape!r} and transposed=True are both set; a weight has one layout")


def _decoded(encoded: EncodedMask, flat: Optional[torch.Tensor], numel: int, device) -> torch.Tensor:
    if flat is not None:
        return flat
    if encoded.kind == "none":
        return torch.ones(numel, dtype=torch.bool, device=device)
    fill = encoded.kind == "pruned_indices"
    out = torch.full((numel,), fill, dtype=torch.bool, device=device)
    out[encoded.indices.long()] = not fill
    return out


def _check(f: Mapping, where: str) -> tuple[Optional[int], Optional[int]]:
    """Check everything but the recorded n_active and trainable_key; return the (n_active,
    trainable_key) the state's mask and subset give, or (None, None) while traced."""
    shape = f.get("storage_shape")
    if not (isinstance(shape, (tuple, list)) and len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape)):
        _fail(where, "storage_shape", repr(shape), "two positive ints (out_features, in_features)")
    shape = (int(shape[0]), int(shape[1]))
    rows, cols = shape
    numel = rows * cols
    if f.get("compute_dtype") not in SUPPORTED_DTYPES:
        _fail(where, "compute_dtype", repr(f.get("compute_dtype")), f"one of {[str(d) for d in SUPPORTED_DTYPES]}")
    try:
        mode = Mode(f.get("mode_name"))
    except ValueError:
        _fail(where, "mode_name", repr(f.get("mode_name")), f"one of {[m.value for m in Mode]}")
    side = f.get("trainable_side")
    if side not in MODE_SIDES[mode]:
        _fail(where, "trainable_side", repr(side), f"one of {MODE_SIDES[mode]} in mode {mode.value!r}")
    sparsity = f.get("target_sparsity")
    if not isinstance(sparsity, numbers.Real) or isinstance(sparsity, bool) or not 0 <= sparsity <= 1:
        _fail(where, "target_sparsity", repr(sparsity), "a float in [0, 1]")
    if not isinstance(f.get("transposed", False), bool):
        _fail(where, "transposed", repr(f.get("transposed")), "a bool")
    _check_view_shape(where, f.get("view_shape"), shape, f.get("transposed", False))

    tensors = [f.get(n) for n in (*STORAGE_NAMES, *EMA_NAMES, "mask_bitmap", "mask_block_prefix", "mask_indices",
                                  "subset_bitmap", "subset_block_prefix", "subset_indices")]
    present = [t for t in tensors if t is not None]
    for t in present:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: inner tensors must be torch.Tensors, got {type(t).__name__}")
    devices = {t.device for t in present}
    if len(devices) > 1:
        _fail(where, "the inner tensors' devices", sorted(map(str, devices)), "one device")
    traced = any(is_traced(t) for t in present)
    device = present[0].device if present else torch.device("cpu")

    mask, mask_flat = _check_encoding(where, f, "mask", shape, traced)
    if (mode == Mode.DENSE) != (mask.kind == "none"):
        _fail(where, "mask_kind", repr(mask.kind), "'none' in mode 'dense' only" if mode == Mode.DENSE
              else f"a mask (bitmap or indices) in mode {mode.value!r}")
    n_active = None if traced else active_count(mask, numel, mask_flat)

    if mode == Mode.QRESU:
        _require_absent(where, f, ["values"], "QRESU stores the active weights quantized")
        bits, group_size = f.get("quant_bits"), f.get("group_size")
        if bits not in QUANT_BITS:
            _fail(where, "quant_bits", repr(bits), f"one of {QUANT_BITS}")
        if not _is_int(group_size) or group_size < 1:
            _fail(where, "group_size", repr(group_size), "a positive int")
        _check_tensor(where, f, "qdata", (rows, -(-cols // 2) if bits == 4 else cols), (torch.uint8,))
        n_groups = -(-cols // group_size)
        _check_tensor(where, f, "qscale", (rows, n_groups), (torch.float32,))
        _check_tensor(where, f, "qoffset", (rows, n_groups), (torch.float32,))
        theta = f.get("theta")
        if not isinstance(theta, torch.Tensor) or theta.dim() != 1:
            _fail(where, "theta", _describe(theta), "a 1-D tensor (one value per pruned coordinate)")
        if n_active is not None:
            _check_tensor(where, f, "theta", (numel - n_active,), SUPPORTED_DTYPES)
    else:
        _require_absent(where, f, ["qdata", "qscale", "qoffset", "theta"],
                        f"mode {mode.value!r} stores dense values")
        if f.get("quant_bits") is not None or f.get("group_size") is not None:
            raise ValueError(f"{where}: quant_bits and group_size must be None in mode {mode.value!r}")
        values = _check_tensor(where, f, "values", shape, (f["compute_dtype"],))
        if mode == Mode.SPARSE and not traced:
            pruned = ~_decoded(mask, mask_flat, numel, device)
            nonzero = int((values.reshape(-1)[pruned] != 0).sum())
            if nonzero:
                raise ValueError(f"{where}: values holds {nonzero} nonzero entries at pruned coordinates, "
                                 "expected exactly 0 there in mode 'sparse'")

    subset, subset_flat = _check_encoding(where, f, "subset", shape, traced)
    if (side == "subset") != (subset.kind != "none"):
        _fail(where, "subset_kind", repr(subset.kind), "a subset encoding exactly when trainable_side is 'subset'")
    trainable = None
    if not traced:
        if subset.kind != "none":
            members = _decoded(subset, subset_flat, numel, device)
            outside = int((members & _decoded(mask, mask_flat, numel, device)).sum())
            if outside:
                raise ValueError(f"{where}: the subset holds {outside} active coordinates, expected a subset of "
                                 "the pruned set")
            trainable = active_count(subset, numel, subset_flat)
        else:
            trainable = {"all": numel, "active": n_active, "pruned": numel - n_active}[side]

    selective = f.get("selective")
    resu_like = mode in (Mode.RESU, Mode.QRESU)
    if selective is not None:
        if not isinstance(selective, SelectiveConfig):
            _fail(where, "selective", repr(selective), "a SelectiveConfig or None")
        if not resu_like:
            _fail(where, "selective", repr(selective), f"None in mode {mode.value!r}")
        for name in ("selective_m", "selective_v"):
            t = f.get(name)
            if not isinstance(t, torch.Tensor) or t.dim() != 1:
                _fail(where, name, _describe(t), "a 1-D EMA vector over the trainable coordinates")
            if trainable is not None:
                _check_tensor(where, f, name, (trainable,), (EMA_DTYPES[selective.ema_dtype],))
    else:
        _require_absent(where, f, ["selective_m", "selective_v"], "selective is None")
    grad_abs_sum = f.get("grad_abs_sum")
    if grad_abs_sum is not None:
        if not resu_like:
            _fail(where, "grad_abs_sum", _describe(grad_abs_sum), f"absent in mode {mode.value!r}")
        if trainable is not None:
            _check_tensor(where, f, "grad_abs_sum", (trainable,), (torch.float32,))

    nm_pattern, row_keep = f.get("nm_pattern"), f.get("row_keep")
    if nm_pattern is not None and not (isinstance(nm_pattern, tuple) and len(nm_pattern) == 2
                                       and all(_is_int(v) for v in nm_pattern) and 1 <= nm_pattern[0] <= nm_pattern[1]):
        _fail(where, "nm_pattern", repr(nm_pattern), "None or a tuple (N, M) of ints with 1 <= N <= M")
    if row_keep is not None and not (_is_int(row_keep) and 0 <= row_keep <= cols):
        _fail(where, "row_keep", repr(row_keep), f"None or an int in [0, {cols}]")
    if nm_pattern is not None and row_keep is not None:
        raise ValueError(f"{where}: nm_pattern {nm_pattern!r} and row_keep {row_keep!r} are both set; a mask "
                         "follows at most one")
    if mode == Mode.DENSE and (nm_pattern is not None or row_keep is not None):
        raise ValueError(f"{where}: a 'dense' weight has no mask pattern, got nm_pattern={nm_pattern!r}, "
                         f"row_keep={row_keep!r}")
    if traced:
        return None, None
    return n_active, trainable_key(side, mask, subset, shape)


__all__ = ["QuantizedActive", "build_state", "check_state", "trainable_key", "upgrade_legacy_fields",
           "SUPPORTED_DTYPES", "TRAINABLE_SIDES", "QUANT_BITS"]

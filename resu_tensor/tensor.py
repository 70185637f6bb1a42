"""ResuTensor: one weight's values, mask and mode packed into a tensor subclass (DESIGN.md §2)."""
import hashlib
from typing import Optional

import torch
from torchao.utils import TorchAOBaseTensor

from resu_tensor import kernels
from resu_tensor.compact import CompactTensor
from resu_tensor.mask_encoding import EncodedMask, active_count, decode_mask, encode_mask, encoded_nbytes
from resu_tensor.mode import Mode

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TRAINABLE_SIDES = ("all", "active", "pruned")


def check_weight(weight: torch.Tensor) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"ResuTensor needs a 2-D (out_features, in_features) weight, got shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"ResuTensor supports dtypes {[str(d) for d in SUPPORTED_DTYPES]}, got {weight.dtype}")


def _trainable_key(side: str, encoded: EncodedMask, shape) -> int:
    """A content hash of the trainable set: equal across processes, so saved optimizer state
    restores onto the same set and is recognised as stale on any other."""
    digest = hashlib.blake2b(f"{side}|{encoded.kind}|{tuple(shape)}".encode(), digest_size=8)
    for t in (encoded.bitmap, encoded.indices):
        if t is not None:
            digest.update(t.detach().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2


class ResuTensor(TorchAOBaseTensor):
    """A weight (out, in) that knows its mask, its mode and which coordinates train.

    Values are stored dense in the weight's dtype with θ in place at pruned slots during RESU,
    so the effective weight is the stored values in DENSE, SPARSE and RESU alike. The mask is an
    :mod:`~resu_tensor.mask_encoding` (indices or bitmap, whichever is smaller).

    Example::

        w = ResuTensor.from_dense(torch.randn(64, 128), sparsity=0.5)
        w.mode, w.sparsity          # (Mode.SPARSE, 0.5)
        w.dequantize()              # dense effective weight
    """

    tensor_data_names = ["values"]
    tensor_attribute_names = ["mode_name", "mask_kind", "trainable_side", "n_active", "target_sparsity", "trainable_key", "transposed"]
    optional_tensor_data_names = ["mask_bitmap", "mask_block_prefix", "mask_indices"]

    def __new__(cls, values, mode_name, mask_kind, trainable_side, n_active, target_sparsity, trainable_key,
                transposed=False, mask_bitmap=None, mask_block_prefix=None, mask_indices=None):
        shape = values.shape[::-1] if transposed else values.shape
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, strides=(shape[1], 1), dtype=values.dtype, device=values.device, requires_grad=False
        )

    def __init__(self, values, mode_name, mask_kind, trainable_side, n_active, target_sparsity, trainable_key,
                 transposed=False, mask_bitmap=None, mask_block_prefix=None, mask_indices=None):
        self.values = values
        self.mode_name = mode_name
        self.mask_kind = mask_kind
        self.trainable_side = trainable_side
        self.n_active = n_active
        self.target_sparsity = target_sparsity
        self.trainable_key = trainable_key
        self.transposed = transposed
        self.mask_bitmap = mask_bitmap
        self.mask_block_prefix = mask_block_prefix
        self.mask_indices = mask_indices

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_dense(cls, weight: torch.Tensor, sparsity: float = 0.0, method: str = "magnitude",
                   generator: Optional[torch.Generator] = None) -> "ResuTensor":
        """Wrap a dense weight: DENSE when ``sparsity == 0``, else pruned to SPARSE by ``method``.

        Example::

            w = ResuTensor.from_dense(linear.weight.detach(), sparsity=0.5, method="magnitude")
            linear.weight = torch.nn.Parameter(w)
        """
        check_weight(weight)
        from resu_tensor.pruning import check_sparsity

        check_sparsity(sparsity)
        values = weight.detach().clone().contiguous()
        encoded = EncodedMask("none")
        tensor = cls(values, Mode.DENSE.value, "none", "all", values.numel(), 0.0,
                     _trainable_key("all", encoded, values.shape))
        if sparsity > 0:
            tensor.prune(sparsity, method=method, generator=generator)
        return tensor

    def set_state_(self, *, values: torch.Tensor, mode: Mode, mask: EncodedMask, trainable_side: str,
                   target_sparsity: Optional[float] = None) -> None:
        """Replace this tensor's contents in place (same Python object, so a Parameter and the
        optimizer's reference to it stay valid). Drops ``.grad`` when the trainable set changes."""
        if self.transposed:
            raise ValueError("lifecycle changes apply to the weight itself, not to a transposed view")
        if trainable_side not in TRAINABLE_SIDES:
            raise ValueError(f"trainable_side must be one of {TRAINABLE_SIDES}, got {trainable_side!r}")
        if values.shape != self.values.shape or values.dtype != self.values.dtype:
            raise ValueError("set_state_ cannot change the weight's shape or dtype")
        self.values = values.contiguous()
        self.mode_name = Mode(mode).value
        self.mask_kind = mask.kind
        self.mask_bitmap, self.mask_block_prefix, self.mask_indices = mask.bitmap, mask.block_prefix, mask.indices
        self.n_active = active_count(mask, values.numel())
        self.trainable_side = trainable_side
        if target_sparsity is not None:
            self.target_sparsity = float(target_sparsity)
        old_key, self.trainable_key = self.trainable_key, _trainable_key(trainable_side, mask, values.shape)
        if self.trainable_key != old_key:
            self.grad = None

    # ----------------------------------------------------------------- queries
    @property
    def mode(self) -> Mode:
        return Mode(self.mode_name)

    @property
    def sparsity(self) -> float:
        """Fraction of coordinates pruned (0.0 in DENSE)."""
        return 1.0 - self.n_active / self.values.numel()

    @property
    def trainable_count(self) -> int:
        numel = self.values.numel()
        return {"all": numel, "active": self.n_active, "pruned": numel - self.n_active}[self.trainable_side]

    def encoded_mask(self) -> EncodedMask:
        return EncodedMask(self.mask_kind, self.mask_bitmap, self.mask_block_prefix, self.mask_indices)

    def storage_mask(self) -> torch.Tensor:
        """Bool mask (True = active) in the weight's storage orientation (out, in)."""
        return decode_mask(self.encoded_mask(), tuple(self.values.shape), self.values.device)

    def mask(self) -> torch.Tensor:
        """Bool mask of this tensor's logical shape, True = active."""
        m = self.storage_mask()
        return m.t() if self.transposed else m

    def trainable_flat(self) -> Optional[torch.Tensor]:
        """Row-major bool mask of the trainable coordinates over storage, or None if all train."""
        if self.trainable_side == "all":
            return None
        flat = self.storage_mask().view(-1)
        return flat if self.trainable_side == "active" else ~flat

    def trainable_mask(self) -> torch.Tensor:
        """Bool mask of this tensor's logical shape, True = the optimizer may change it."""
        flat = self.trainable_flat()
        m = torch.ones_like(self.values, dtype=torch.bool) if flat is None else flat.view(self.values.shape)
        return m.t() if self.transposed else m

    def effective_weight(self) -> torch.Tensor:
        """W_eff = M⊙W + (1−M)⊙Φ(θ) as a view of the stored values (no copy), logical shape."""
        if self.mode is Mode.QRESU:
            raise NotImplementedError("QRESU storage is delivered by the method issue")
        return self.values.t() if self.transposed else self.values

    def dequantize(self, output_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """Dense effective weight W_eff = M⊙W + (1−M)⊙Φ(θ), a new plain tensor."""
        w = self.effective_weight()
        return w.to(output_dtype, copy=True) if output_dtype is not None else w.clone()

    def nbytes_breakdown(self) -> dict[str, int]:
        """Bytes actually held, by part: {"values": ..., "mask": ...}."""
        return {"values": self.values.nbytes, "mask": encoded_nbytes(self.encoded_mask())}

    # ----------------------------------------------------------------- trainable coordinates
    def gather_trainable(self, dense: torch.Tensor) -> torch.Tensor:
        """The trainable coordinates of a storage-oriented (out, in) tensor, flat."""
        flat = self.trainable_flat()
        return dense.reshape(-1) if flat is None else kernels.gather_trainable(dense, flat)

    def compact(self, flat: torch.Tensor) -> CompactTensor:
        if flat.numel() != self.trainable_count:
            raise ValueError(f"expected {self.trainable_count} trainable values, got {flat.numel()}")
        return CompactTensor(flat, self.trainable_key, tuple(self.shape), self.transposed)

    def expand_trainable(self, compact: torch.Tensor) -> torch.Tensor:
        """A dense tensor of this tensor's logical shape: ``compact`` at trainable coordinates,
        zero elsewhere (e.g. to inspect ``w.grad``)."""
        if isinstance(compact, CompactTensor):
            if compact.trainable_key != self.trainable_key:
                raise ValueError("this CompactTensor belongs to another trainable set of the weight")
            compact = compact.flat
        dense = torch.zeros_like(self.values, dtype=compact.dtype)
        flat = self.trainable_flat()
        if flat is None:
            dense.view(-1).copy_(compact)
        else:
            kernels.scatter_trainable_(dense, flat, compact)
        return dense.t() if self.transposed else dense

    # ----------------------------------------------------------------- lifecycle (see lifecycle.py)
    def prune(self, sparsity: float, method: str = "magnitude", generator: Optional[torch.Generator] = None) -> "ResuTensor":
        """Prune to ``sparsity`` by ``method`` → SPARSE. Returns self."""
        from resu_tensor import lifecycle

        lifecycle.prune(self, sparsity, method, generator)
        return self

    def enter_resu(self, epsilon: float = 0.1, freeze_active: bool = True,
                   generator: Optional[torch.Generator] = None) -> "ResuTensor":
        """SPARSE → RESU: θ ~ N(0, (ε·σ_A)²) in the pruned slots. Returns self."""
        from resu_tensor import lifecycle

        lifecycle.enter_resu(self, epsilon, freeze_active, generator)
        return self

    def commit(self, strategy: str = "simple") -> "ResuTensor":
        """RESU → SPARSE: merge θ and choose the new mask by ``strategy``. Returns self."""
        from resu_tensor import lifecycle

        lifecycle.commit(self, strategy)
        return self

    def __repr__(self) -> str:
        return (
            f"ResuTensor(shape={tuple(self.shape)}, mode={self.mode_name}, sparsity={self.sparsity:.4f}, "
            f"dtype={self.dtype}, mask={self.mask_kind}, trainable={self.trainable_side}"
            f"{', transposed' if self.transposed else ''})"
        )

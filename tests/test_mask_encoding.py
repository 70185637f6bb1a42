import pytest
import torch

from resu_tensor import kernels
from resu_tensor.core.mask_encoding import bitmap_nbytes, decode_mask, encode_mask, encoded_nbytes, prefix_block_size


def reference_bits(mask_flat):
    """Bit j of byte i is element 8i+j, computed with plain Python."""
    values = mask_flat.tolist()
    out = []
    for i in range(0, len(values), 8):
        out.append(sum(1 << j for j, v in enumerate(values[i:i + 8]) if v))
    return torch.tensor(out, dtype=torch.uint8)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1023, 1025, 3001])
def test_pack_bitmap_matches_python_reference(numel):
    mask = torch.rand(numel) < 0.4
    packed = kernels.pack_bitmap(mask)
    assert torch.equal(packed, reference_bits(mask))
    assert torch.equal(kernels.unpack_bitmap(packed, numel), mask)


def test_block_prefix_counts_are_exclusive_prefix_sums():
    mask = torch.rand(5000) < 0.3
    prefix = kernels.block_prefix_counts(mask, 1024)
    expected = [int(mask[: b * 1024].sum()) for b in range(1, 5)]
    assert prefix.dtype == torch.int32 and prefix.tolist() == expected


@pytest.mark.parametrize("shape", [(64, 256), (37, 300), (5, 1500), (128, 512)])
@pytest.mark.parametrize("sparsity", [0.0, 0.01, 0.05, 0.3, 0.5, 0.9, 0.95, 0.99, 1.0])
def test_round_trip_and_adaptive_choice(shape, sparsity):
    mask = torch.rand(shape) >= sparsity
    encoded = encode_mask(mask)
    assert torch.equal(decode_mask(encoded, shape, mask.device), mask)
    numel = mask.numel()
    n_small = min(int(mask.sum()), numel - int(mask.sum()))
    assert encoded_nbytes(encoded) == min(4 * n_small, bitmap_nbytes(numel, shape[1]))
    if encoded.kind == "bitmap":
        assert encoded.bitmap.dtype == torch.uint8 and encoded.block_prefix.dtype == torch.int32
    else:
        assert encoded.indices.dtype == torch.int32
        assert torch.all(encoded.indices[1:] > encoded.indices[:-1])  # sorted, row-major


@pytest.mark.parametrize("shape", [(64, 256), (37, 300), (5, 1500), (2, 4096), (128, 512), (3, 8)])
@pytest.mark.parametrize("sparsity", [0.05, 0.2, 0.5, 0.8, 0.95])
def test_mask_bytes_bound(shape, sparsity):
    """At most 1/8 byte per element plus 4 bytes per row, at every sparsity in [0.05, 0.95]."""
    rows, cols = shape
    encoded = encode_mask(torch.rand(shape) >= sparsity)
    assert encoded_nbytes(encoded) <= rows * cols / 8 + 4 * rows


def test_int32_indices_win_at_extremes():
    for sparsity, kind in [(0.01, "pruned_indices"), (0.99, "active_indices")]:
        mask = torch.ones(256, 512, dtype=torch.bool)
        n = round(sparsity * mask.numel())
        mask.view(-1)[torch.randperm(mask.numel())[:n]] = False
        encoded = encode_mask(mask)
        assert encoded.kind == kind
        assert encoded_nbytes(encoded) == 4 * min(n, mask.numel() - n)


def test_prefix_block_covers_a_row():
    assert prefix_block_size(256) == 1024 and prefix_block_size(1024) == 1024 and prefix_block_size(1025) == 2048

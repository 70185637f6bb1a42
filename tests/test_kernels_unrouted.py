"""The kernels the library does not route to (benchmarks/kernels_unrouted.py) against their
plain-PyTorch references, as tests/test_kernels_triton.py checks the routed ones: on CPU under the
Triton interpreter in child processes (this file run as a script), on the GPU compiled
(``pytest -m cuda``), on larger shapes. Fresh random data per check, masks with both sides non-empty."""
import kernel_checks
import pytest
import torch
from kernel_checks import grad_cases, matmul_tolerance, package, qresu_cases, qresu_weight, random_data, random_mask


def unrouted():
    from benchmarks import kernels_unrouted

    return kernels_unrouted


def check_compact_weight_grad_fused(device, big):
    k, fused = package(), unrouted()
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    for i, (tokens, rows, cols) in enumerate(grad_cases(big)):
        for in_dtype, out_dtype in dtypes if big or i == 0 else dtypes[1:2]:
            a, b = random_data((tokens, rows), in_dtype, device), random_data((tokens, cols), in_dtype, device)
            mask = random_mask(rows * cols, 0.45, device)
            ours = fused.compact_weight_grad_fused(a, b, mask, out_dtype)
            expected = k.weight_grad.compact_weight_grad(a.float(), b.float(), mask, out_dtype)
            assert ours.dtype == out_dtype and ours.shape == expected.shape
            dtype = torch.bfloat16 if torch.bfloat16 in (in_dtype, out_dtype) else torch.float32
            torch.testing.assert_close(ours.float(), expected.float(), **matmul_tolerance(dtype))
            everything = fused.compact_weight_grad_fused(a, b, None, out_dtype)
            assert torch.equal(everything, k.weight_grad.compact_weight_grad(a, b, None, out_dtype))


def check_compact_weight_grad_bitmap_fused(device, big):
    k, fused = package(), unrouted()
    masks = k.mask_ops
    for tokens, rows, cols in grad_cases(big):
        a, b = random_data((tokens, rows), torch.bfloat16, device), random_data((tokens, cols), torch.bfloat16, device)
        mask = random_mask(rows * cols, 0.6, device)
        bitmap = masks.pack_bitmap(mask)
        block_size = 1024 * max(1, -(-cols // 1024))
        prefix = masks.block_prefix_counts(mask, block_size)
        for invert in (False, True):
            count = int((~mask if invert else mask).sum())
            expected = k.weight_grad.compact_weight_grad_bitmap(a.float(), b.float(), bitmap, prefix, block_size,
                                                                invert, count, torch.float32)
            ours = fused.compact_weight_grad_bitmap_fused(a, b, bitmap, prefix, block_size, invert, count,
                                                          torch.float32)
            torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-3)
            cached = masks.bitmap_tile_prefix(bitmap, rows, cols, k.PREFIX_TILE, invert)
            again = fused.fused_matmul_bitmap(a, b, bitmap, invert, count, torch.float32, tile_prefix=cached)
            assert torch.equal(again, ours)


def check_qresu_fused_grad_input(device, big):
    k, fused = package(), unrouted()
    quant = k.quant
    combos = [(1, torch.bfloat16, torch.float32), (5, torch.float32, torch.float32),
              (33 if big else 17, torch.bfloat16, torch.bfloat16), (1, torch.float32, torch.bfloat16)]
    for i, (rows, cols, bits, group_size) in enumerate(qresu_cases(big)):
        for m, dtype, theta_dtype in combos if big else (combos[i:i + 1] or combos[1:3]) + combos[3:] * (i > 0):
            w, _ = qresu_weight(rows, cols, bits, group_size, 0.6, theta_dtype, device)
            g = random_data((m, rows), dtype, device)
            expected = quant.qresu_grad_input_small_m(g, **w)
            variants = [dict()] + [dict(split=split, config=config)
                                   for config in (dict(BLOCK_N=16), dict(BLOCK_N=32, num_warps=8))
                                   for split in ((1, 3) if big else (2,))]
            for variant in variants:
                ours = fused.fused_grad_input(g, **w, **variant)
                assert ours.dtype == dtype and ours.shape == expected.shape
                torch.testing.assert_close(ours, expected, **matmul_tolerance(dtype))
            if i == 0:
                cached = k.mask_ops.bitmap_tile_prefix(w["bitmap"], rows, cols, k.PREFIX_TILE, True)
                torch.testing.assert_close(fused.fused_grad_input(g, **w, tile_prefix=cached), expected,
                                           **matmul_tolerance(dtype))
    w, _ = qresu_weight(9, 21, 4, 8, 0.5, torch.float32, device)
    with pytest.raises(ValueError, match="at most"):
        fused.fused_grad_input(random_data((k.quant_triton.SMALL_M + 1, 9), torch.float32, device), **w)


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


if __name__ == "__main__":
    kernel_checks.child_main(CHECKS)


@pytest.fixture(scope="module")
def interpreted():
    return kernel_checks.run_interpreted(__file__)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_on_interpreter(name, interpreted):
    kernel_checks.assert_passed(name, interpreted)


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu(name):
    CHECKS[name]("cuda", big=True)

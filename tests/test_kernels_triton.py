"""Every Triton kernel against its plain-PyTorch reference (kernels/*_triton.py vs kernels/*.py).

CPU: the kernels run under the Triton interpreter. ``TRITON_INTERPRET=1`` must be set before
triton is imported, so the checks run in child processes (this file executed as a script); the
rest of the suite never sees the variable. Shapes are small and odd (never multiples of the
block sizes) because the interpreter executes every program in numpy. Each check is reported as
its own test. GPU (``pytest -m cuda``): the same checks on larger shapes, compiled, plus the
kernel table and torch.compile with inductor.

Every check uses fresh random data (seeded per check), masks with both sides non-empty, and
asserts that elements outside the selection are bit-identical to what they were.
"""
import kernel_checks
import pytest
import torch
from kernel_checks import grad_cases, matmul_tolerance, package, qresu_cases, qresu_weight, random_data, random_mask

SHARDS = 2  # child processes run concurrently (one per core on CI)


# --------------------------------------------------------------------------- checks
def check_pack_unpack(device, big):
    k = package()
    from_ref, triton_ops = k.mask_ops, k.mask_ops_triton
    for numel in ((1, 7, 1237, 2053) if not big else (1, 7, 1_000_003)):
        mask = torch.rand(numel, device=device) < 0.37
        packed = triton_ops.pack_bitmap(mask)
        assert torch.equal(packed, from_ref.pack_bitmap(mask)), numel
        assert torch.equal(triton_ops.unpack_bitmap(packed, numel), mask), numel


def check_gather_scatter_trainable(device, big):
    k = package()
    ref, tri = k.mask_ops, k.mask_ops_triton
    shapes = [(37, 41), (3, 5)] if not big else [(1001, 1537)]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            values = random_data(shape, dtype, device)
            mask = random_mask(values.numel(), 0.41, device)
            assert torch.equal(tri.gather_trainable(values, mask), ref.gather_trainable(values, mask))
            assert torch.equal(tri.gather_trainable(values.t(), mask), ref.gather_trainable(values.t(), mask))
            compact = random_data(int(mask.sum()), torch.float32, device)
            ours, theirs = values.clone(), values.clone()
            assert tri.scatter_trainable_(ours, mask, compact) is ours
            ref.scatter_trainable_(theirs, mask, compact)
            assert torch.equal(ours, theirs)
            flat = ours.view(-1)
            assert torch.equal(flat[~mask], values.view(-1)[~mask])  # unselected untouched
            assert torch.equal(flat[mask], compact.to(dtype))


def check_bitmap_gather_scatter(device, big):
    k = package()
    ref, tri = k.mask_ops, k.mask_ops_triton
    shape = (37, 41) if not big else (1003, 4099)
    values = random_data(shape, torch.bfloat16, device)
    mask = random_mask(values.numel(), 0.55, device)
    bitmap = ref.pack_bitmap(mask)
    for block_size in (1024, 300) if not big else (5120, 1000):
        prefix = ref.block_prefix_counts(mask, block_size)
        for invert in (False, True):
            selected = ~mask if invert else mask
            count = int(selected.sum())
            expected = ref.gather_by_bitmap(values, bitmap, prefix, block_size, invert, count)
            assert torch.equal(tri.gather_by_bitmap(values, bitmap, prefix, block_size, invert, count), expected)
            if invert:  # the fused cast to another dtype
                wide = tri.gather_by_bitmap_cast(values, bitmap, prefix, block_size, invert, count, torch.float32)
                assert torch.equal(wide, expected.float())
            compact = random_data(count, torch.float32, device)
            ours, theirs = values.clone(), values.clone()
            assert tri.scatter_by_bitmap_(ours, bitmap, prefix, block_size, invert, compact) is ours
            ref.scatter_by_bitmap_(theirs, bitmap, prefix, block_size, invert, compact)
            assert torch.equal(ours, theirs)
            assert torch.equal(ours.view(-1)[~selected], values.view(-1)[~selected])


def check_adam_by_bitmap(device, big):
    """One weight: the single-weight kernel (what foreach_adam_by_bitmap_ launches for a group of one)."""
    k = package()
    ref, tri, masks = k.optim, k.optim_triton, k.mask_ops
    shape = (37, 41) if not big else (1003, 4099)
    for dtype, block_size, invert, decoupled, maximize in [(torch.float32, 300, True, True, False),
                                                           (torch.bfloat16, 2048, False, False, True)]:
        values = random_data(shape, dtype, device)
        mask = random_mask(values.numel(), 0.55, device)
        bitmap, prefix = masks.pack_bitmap(mask), masks.block_prefix_counts(mask, block_size)
        selected = ~mask if invert else mask
        count = int(selected.sum())
        grad, step = random_data(count, dtype, device), torch.tensor(3.0, device=device)
        moments = [random_data(count, dtype, device), random_data(count, dtype, device).abs()]
        hyper = (step, 0.01, 0.9, 0.999, 0.1, 1e-8, decoupled, maximize)
        ours, theirs = values.clone(), values.clone()
        ours_m, theirs_m = [m.clone() for m in moments], [m.clone() for m in moments]
        tri.foreach_adam_by_bitmap_([ours], [bitmap], [prefix], [block_size], [invert], [grad], *([m] for m in ours_m),
                                    [hyper[0]], *hyper[1:])
        ref.adam_by_bitmap_(theirs, bitmap, prefix, block_size, invert, grad, *theirs_m, *hyper)
        tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(ours, theirs, **tolerance)
        for a, b in zip(ours_m, theirs_m):
            torch.testing.assert_close(a, b, **tolerance)
        assert torch.equal(ours.view(-1)[~selected], values.view(-1)[~selected])
        assert not torch.equal(ours.view(-1)[selected], values.view(-1)[selected])


def check_foreach_adam_by_bitmap(device, big):
    """Several weights in one call: two groups of three (bf16 and float32 weights, both sides, three
    prefix-block sizes that share one chunk walk) and a group of one; each must match the weight stepped alone (the
    single-weight kernel) bit for bit and the reference closely, and leave its unselected elements untouched."""
    k = package()
    ref, tri, masks = k.optim, k.optim_triton, k.mask_ops
    shapes = [(37, 41), (5, 300), (23, 17)] if not big else [(1003, 4099), (768, 3072), (301, 777)]
    weights = []
    for dtype, invert, decoupled in [(torch.bfloat16, True, True), (torch.float32, False, True),
                                     (torch.float32, True, True)]:
        for shape, block_size in zip(shapes if dtype != torch.float32 or not invert else shapes[:1],
                                     (1024, 2048, 3072) if not big else (5120, 3072, 1024)):
            values = random_data(shape, dtype, device)
            mask = random_mask(values.numel(), 0.55, device)
            selected = ~mask if invert else mask
            count = int(selected.sum())
            weights.append(dict(values=values, bitmap=masks.pack_bitmap(mask),
                                prefix=masks.block_prefix_counts(mask, block_size), block_size=block_size,
                                invert=invert, selected=selected, grad=random_data(count, dtype, device),
                                moments=[random_data(count, dtype, device), random_data(count, dtype, device).abs()],
                                step=torch.tensor(float(len(weights) + 1), device=device)))
    hyper = (0.01, 0.9, 0.999, 0.1, 1e-8, True, False)
    ours = [(w["values"].clone(), [m.clone() for m in w["moments"]]) for w in weights]
    tri.foreach_adam_by_bitmap_(*[[o[0] for o in ours], [w["bitmap"] for w in weights],
                                  [w["prefix"] for w in weights], [w["block_size"] for w in weights],
                                  [w["invert"] for w in weights], [w["grad"] for w in weights],
                                  [o[1][0] for o in ours], [o[1][1] for o in ours], [w["step"] for w in weights]],
                                *hyper)
    for w, (values, moments) in zip(weights, ours):
        single, single_m = w["values"].clone(), [m.clone() for m in w["moments"]]
        theirs, theirs_m = w["values"].clone(), [m.clone() for m in w["moments"]]
        operands = (w["bitmap"], w["prefix"], w["block_size"], w["invert"], w["grad"])
        tri.foreach_adam_by_bitmap_([single], *([o] for o in operands), *([m] for m in single_m), [w["step"]], *hyper)
        ref.adam_by_bitmap_(theirs, *operands, *theirs_m, w["step"], *hyper)
        assert torch.equal(values, single) and all(torch.equal(a, b) for a, b in zip(moments, single_m))
        # the kernels' exp2-based bias corrections differ from torch.pow's in the last bits
        tolerance = (dict(rtol=1e-4, atol=1e-5) if values.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2))
        torch.testing.assert_close(values, theirs, **tolerance)
        for a, b in zip(moments, theirs_m):
            torch.testing.assert_close(a, b, **tolerance)
        selected = w["selected"]
        assert torch.equal(values.view(-1)[~selected], w["values"].view(-1)[~selected])
        assert not torch.equal(values.view(-1)[selected], w["values"].view(-1)[selected])


def check_foreach_adam_flat(device, big):
    """Flat parameters that train whole (QRESU's θ), lengths not multiples of the kernels' blocks,
    one at a time and several in one call, aligned and not; each against the reference."""
    k = package()
    ref, tri = k.optim, k.optim_triton
    lengths = (2053, 7, 4099) if not big else (15_099_495, 1_003, 4_099_111)
    params = []
    for j, (numel, dtype) in enumerate(zip(lengths, (torch.bfloat16, torch.float32, torch.bfloat16))):
        params.append([random_data(numel, dtype, device), random_data(numel, dtype, device),
                       random_data(numel, dtype, device), random_data(numel, dtype, device).abs(),
                       torch.tensor(float(j + 2), device=device)])

    def copied(group, shifts):
        """Copies of each parameter's tensors starting ``shift`` elements into fresh buffers (1: an
        address not 16-byte aligned, which the kernels must not assume)."""
        def one(t, shift):
            return torch.empty(t.numel() + shift, dtype=t.dtype, device=t.device)[shift:].copy_(t)

        return [[one(t, shift) for t in p[:4]] + [p[4]] for p, shift in zip(group, shifts)]

    # all three in one call (a bf16 pair and a float32 one), one alone, then shifted: the pair with
    # only its second parameter shifted (an aligned table base, odd offsets), and one alone
    for group, shifts, decoupled, maximize in ((params, (0, 0, 0), True, False), (params[:1], (0,), False, True),
                                               (params[::2], (0, 1), True, False), (params[:1], (1,), True, False)):
        hyper = (0.01, 0.9, 0.999, 0.1, 1e-8, decoupled, maximize)
        ours, theirs = copied(group, shifts), copied(group, shifts)
        tri.foreach_adam_flat_(*map(list, zip(*ours)), *hyper)
        ref.foreach_adam_flat_(*map(list, zip(*theirs)), *hyper)
        for before, a, b in zip(group, ours, theirs):
            # the kernel's exp2-based bias corrections differ from torch.pow's in the last bits
            tolerance = dict(rtol=1e-4, atol=1e-5) if a[0].dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
            for got, expected in zip((a[0], a[2], a[3]), (b[0], b[2], b[3])):
                torch.testing.assert_close(got, expected, **tolerance)
            assert torch.equal(a[1], before[1])  # the grad is read only
            assert not torch.equal(a[0], before[0]) and not torch.equal(a[2], before[2])
    p = params[0]
    with pytest.raises(ValueError, match="exp_avg_sq of parameter 0 is on meta"):
        tri.foreach_adam_flat_([p[0]], [p[1]], [p[2]], [p[3].to("meta")], [p[4]], *hyper)
    for bad, match in (((p[0], p[1][:-1], *p[2:]), "must be the same length"),
                       ((*p[:2], p[2].double(), *p[3:]), "exp_avg of parameter 0 must be contiguous and one of"),
                       ((*p[:4], p[4].double()), "one-element float32 step")):
        with pytest.raises(ValueError, match=match):
            tri.foreach_adam_flat_(*[[t] for t in bad], *hyper)


def check_tile_prefix(device, big):
    k = package()
    ref, tri = k.mask_ops, k.mask_ops_triton
    rows, cols = (13, 45) if not big else (1001, 4099)
    bitmap = ref.pack_bitmap(random_mask(rows * cols, 0.3, device))
    for tile in (16, k.PREFIX_TILE) if not big else (128, 512):
        for invert in (False, True):
            expected = ref.bitmap_tile_prefix(bitmap, rows, cols, tile, invert)
            assert torch.equal(tri.bitmap_tile_prefix(bitmap, rows, cols, tile, invert), expected)


def check_compact_weight_grad(device, big):
    k = package()
    ref, tri = k.weight_grad, k.weight_grad_triton
    dtypes = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]
    for i, (tokens, rows, cols) in enumerate(grad_cases(big)):
        for in_dtype, out_dtype in dtypes if big or i == 0 else dtypes[1:2]:
            a, b = random_data((tokens, rows), in_dtype, device), random_data((tokens, cols), in_dtype, device)
            mask = random_mask(rows * cols, 0.45, device)
            # the reference's own matmul, then the gather with the cast fused: identical to the last bit
            ours = tri.compact_weight_grad(a, b, mask, out_dtype)
            assert ours.dtype == out_dtype
            assert torch.equal(ours, ref.compact_weight_grad(a, b, mask, out_dtype))
            assert torch.equal(tri.compact_weight_grad(a, b, None, out_dtype),
                               ref.compact_weight_grad(a, b, None, out_dtype))
    with pytest.raises(ValueError, match="one dtype"):
        tri.compact_weight_grad(a, b.double(), mask, torch.float32)


def check_compact_weight_grad_bitmap(device, big):
    k = package()
    ref, masks, tri = k.weight_grad, k.mask_ops, k.weight_grad_triton
    for tokens, rows, cols in grad_cases(big):
        a, b = random_data((tokens, rows), torch.bfloat16, device), random_data((tokens, cols), torch.bfloat16, device)
        mask = random_mask(rows * cols, 0.6, device)
        bitmap = masks.pack_bitmap(mask)
        block_size = 1024 * max(1, -(-cols // 1024))
        prefix = masks.block_prefix_counts(mask, block_size)
        for invert in (False, True):
            count = int((~mask if invert else mask).sum())
            expected = ref.compact_weight_grad_bitmap(a, b, bitmap, prefix, block_size, invert, count, torch.float32)
            ours = tri.compact_weight_grad_bitmap(a, b, bitmap, prefix, block_size, invert, count, torch.float32)
            assert torch.equal(ours, expected)


def check_qresu_effective_weight(device, big):
    k = package()
    quant, tri = k.quant, k.quant_triton
    for rows, cols, bits, group_size in qresu_cases(big):
        for theta_dtype, dtype in [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16),
                                   (torch.float32, torch.float32)]:
            w, keep = qresu_weight(rows, cols, bits, group_size, 0.6, theta_dtype, device)
            args = (w["qdata"], w["qscale"], w["qoffset"], bits, group_size, cols, dtype, w["bitmap"],
                    w["block_prefix"], w["block_size"], w["theta"])
            expected = quant.qresu_effective_weight(*args)
            ours = tri.qresu_effective_weight(*args)
            assert torch.equal(ours, expected), (rows, cols, bits, theta_dtype, dtype)
            assert torch.equal(ours[~keep], w["theta"].to(dtype))  # θ lands in row-major pruned order
            # the default takes the word-wise kernel where it applies; the element-wise one serves any layout
            flat = tri._flat_words(w["qdata"], w["bitmap"], bits, cols, group_size, w["block_size"])
            assert flat == (bits == 4 and cols % 32 == 0 and group_size % 32 == 0 and cols % group_size == 0)
            if flat:
                assert torch.equal(tri.effective_weight(*args, wordwise=False), expected), (rows, cols)
            else:
                with pytest.raises(ValueError, match="word-wise W_eff"):
                    tri.effective_weight(*args, wordwise=True)


def check_qresu_linear_small_m(device, big):
    """The fused forward (every kernel that applies, split or not, a cached prefix table) and the
    default routing (the fused kernel up to fused_forward_tokens, W_eff + matmul beyond)."""
    k = package()
    quant, tri = k.quant, k.quant_triton
    combos = [(1, torch.bfloat16, torch.float32), (5, torch.float32, torch.float32),
              (33 if big else 17, torch.bfloat16, torch.bfloat16), (1, torch.float32, torch.bfloat16)]
    for i, (rows, cols, bits, group_size) in enumerate(qresu_cases(big)):
        # (tokens, dtype, θ dtype): every combination on the GPU, one per weight on the interpreter
        for m, dtype, theta_dtype in combos if big else (combos[i:i + 1] or combos[1:3]) + combos[3:] * (i > 0):
            w, _ = qresu_weight(rows, cols, bits, group_size, 0.6, theta_dtype, device)
            x = random_data((m, cols), dtype, device)
            expected = quant.qresu_linear_small_m(x, **w)
            # the element-wise kernel (BLOCK_K) always, the bytewise one (BLOCK_G) on whole-byte rows
            configs = [dict(BLOCK_N=16, BLOCK_K=k.PREFIX_TILE)] + [dict(BLOCK_N=16, BLOCK_G=k.PREFIX_TILE // 8)] * (
                cols % 8 == 0 and group_size % 8 == 0)
            whole_words = bits == 4 and cols % 32 == 0 and group_size % 32 == 0
            configs += [dict(BLOCK_N=4 if m == 1 else 16, BLOCK_W=1)] * whole_words
            if big:
                configs += ([dict(BLOCK_N=2, BLOCK_W=16), dict(BLOCK_N=8, BLOCK_W=8)] if m == 1 else
                            [dict(BLOCK_N=32, BLOCK_W=4), dict(BLOCK_N=16, BLOCK_W=8)]) * whole_words
                configs += [dict(BLOCK_N=32, BLOCK_K=256, num_warps=8), dict(BLOCK_N=4, BLOCK_K=1024)] * (m == 1)
                configs += [dict(BLOCK_N=32, BLOCK_G=64, num_warps=8), dict(BLOCK_N=4, BLOCK_G=128)] * (
                    m == 1 and cols % 8 == 0 and group_size % 8 == 0)
            variants = [dict()] + [dict(split=split, config=config) for config in configs
                                   for split in ((1, 3) if big else (2,))]
            for variant in variants:
                ours = tri.fused_linear(x, **w, **variant)
                assert ours.dtype == dtype and ours.shape == expected.shape
                torch.testing.assert_close(ours, expected, **matmul_tolerance(dtype))
            routed = tri.linear_small_m(x, **w)
            assert routed.dtype == dtype and routed.shape == expected.shape
            torch.testing.assert_close(routed, expected, **matmul_tolerance(dtype))
            if i == 0:
                cached = k.mask_ops.bitmap_tile_prefix(w["bitmap"], rows, cols, k.PREFIX_TILE, True)
                torch.testing.assert_close(tri.linear_small_m(x, **w, tile_prefix=cached), expected,
                                           **matmul_tolerance(dtype))
    # more than SMALL_M tokens: W_eff kernel + matmul; the fused kernel refuses them
    w, _ = qresu_weight(9, 21, 4, 8, 0.5, torch.float32, device)
    x = random_data((tri.SMALL_M + 1, 21), torch.float32, device)
    torch.testing.assert_close(tri.linear_small_m(x, **w), quant.qresu_linear_small_m(x, **w), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at most"):
        tri.fused_linear(x, **w)
    fused_calls = []
    original = tri.fused_linear
    tri.fused_linear = lambda *args: fused_calls.append(args[0].shape[0]) or original(*args)
    try:
        for cols, bits, group_size, fused_up_to in [(64, 4, 32, quant.FUSED_FORWARD_TOKENS_WORDWISE),
                                                    (48, 4, 16, quant.FUSED_FORWARD_TOKENS),
                                                    (64, 8, 32, quant.FUSED_FORWARD_TOKENS)]:
            w, _ = qresu_weight(5, cols, bits, group_size, 0.5, torch.float32, device)
            fused_calls.clear()
            for tokens in (1, 2, 33):
                tri.linear_small_m(random_data((tokens, cols), torch.bfloat16, device), **w)
            assert fused_calls == [t for t in (1, 2, 33) if t <= fused_up_to], (cols, bits, fused_calls)
    finally:
        tri.fused_linear = original
    w, _ = qresu_weight(13, 48, 4, 32, 0.5, torch.float32, device)  # 48 columns: no whole 32-bit mask words
    with pytest.raises(ValueError, match="word-wise"):
        tri.fused_linear(random_data((1, 48), torch.float32, device), **w, config=dict(BLOCK_N=4, BLOCK_W=1))


def check_qresu_grad_input_small_m(device, big):
    """dX = g @ W_eff (the W_eff kernel and a matmul) at few and many tokens, with or without a
    prefix table (which it does not need)."""
    k = package()
    quant, tri = k.quant, k.quant_triton
    for i, (rows, cols, bits, group_size) in enumerate(qresu_cases(big)):
        for m, dtype, theta_dtype in [(1, torch.bfloat16, torch.float32), (17, torch.float32, torch.bfloat16),
                                      (tri.SMALL_M + 1, torch.bfloat16, torch.bfloat16)][: 3 if big or i == 0 else 1]:
            w, _ = qresu_weight(rows, cols, bits, group_size, 0.6, theta_dtype, device)
            g = random_data((m, rows), dtype, device)
            expected = quant.qresu_grad_input_small_m(g, **w)
            ours = tri.grad_input_small_m(g, **w)
            assert ours.dtype == dtype and ours.shape == expected.shape
            torch.testing.assert_close(ours, expected, **matmul_tolerance(dtype))
    with pytest.raises(ValueError, match="features"):
        tri.grad_input_small_m(random_data((2, rows + 1), torch.float32, device), **w)


def check_custom_ops_trace(device, big):
    """The custom ops' fake implementations agree with the real ones (torch.library.opcheck), and
    torch.compile traces the table functions into one graph (aot_eager: no codegen needed)."""
    k = package()
    ops = torch.ops.resu_tensor
    values = random_data((9, 13), torch.float32, device)
    mask = random_mask(values.numel(), 0.5, device)
    bitmap = k.mask_ops.pack_bitmap(mask)
    prefix = k.mask_ops.block_prefix_counts(mask, 64)
    count = int(mask.sum())
    a, b = random_data((7, 9), torch.float32, device), random_data((7, 13), torch.float32, device)
    w, _ = qresu_weight(9, 16, 4, 8, 0.5, torch.float32, device)
    qresu_args = (w["qdata"], w["qscale"], w["qoffset"], 4, 8, 16)
    tests = ("test_schema", "test_faketensor")
    for op, args in [
        (ops.pack_bitmap, (mask,)),
        (ops.unpack_bitmap, (bitmap, mask.numel())),
        (ops.gather_by_bitmap, (values, bitmap, prefix, 64, True, mask.numel() - count)),
        (ops.scatter_by_bitmap_, (values.clone(), bitmap, prefix, 64, False, random_data(count, torch.float32, device))),
        (ops.bitmap_tile_prefix, (bitmap, 9, 13, 16, True)),
        (ops.compact_weight_grad_bitmap, (a, b, bitmap, prefix, 64, False, count, torch.float32)),
        (ops.qresu_effective_weight, (*qresu_args, torch.float32, w["bitmap"], w["block_prefix"], w["block_size"],
                                      w["theta"])),
        (ops.qresu_linear_small_m, (random_data((3, 16), torch.float32, device), *qresu_args, w["bitmap"],
                                    w["block_prefix"], w["block_size"], w["theta"])),
        (ops.foreach_adam_by_bitmap_, ([values.clone(), values.clone()], [bitmap] * 2, [prefix] * 2, [64, 64],
                                       [False, False], [random_data(count, torch.float32, device)] * 2,
                                       [random_data(count, torch.float32, device) for _ in range(2)],
                                       [random_data(count, torch.float32, device).abs() for _ in range(2)],
                                       [torch.tensor(2.0, device=device)] * 2, 0.01, 0.9, 0.999, 0.1, 1e-8, True,
                                       False)),
        (ops.foreach_adam_flat_, ([values.view(-1).clone()], [random_data(values.numel(), torch.float32, device)],
                                  [random_data(values.numel(), torch.float32, device)],
                                  [random_data(values.numel(), torch.float32, device).abs()],
                                  [torch.tensor(2.0, device=device)], 0.01, 0.9, 0.999, 0.1, 1e-8, True, False)),
    ]:
        torch.library.opcheck(op, args, test_utils=tests)

    def step(values, a, b):
        compact = k.mask_ops_triton.gather_by_bitmap(values, bitmap, prefix, 64, False, count)
        grad = k.weight_grad_triton.compact_weight_grad_bitmap(a, b, bitmap, prefix, 64, False, count, torch.float32)
        return k.mask_ops_triton.scatter_by_bitmap_(values.clone(), bitmap, prefix, 64, False, compact - grad)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(values, a, b), step(values, a, b))


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


if __name__ == "__main__":
    kernel_checks.child_main(CHECKS)


@pytest.fixture(scope="module")
def interpreted():
    return kernel_checks.run_interpreted(__file__, SHARDS)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_on_interpreter(name, interpreted):
    kernel_checks.assert_passed(name, interpreted)


# --------------------------------------------------------------------------- GPU


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_kernel_on_gpu(name):
    CHECKS[name]("cuda", big=True)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_table_dispatches_cuda_tensors_to_triton():
    from resu_tensor import kernels

    assert kernels.HAS_TRITON
    for name in ("pack_bitmap", "unpack_bitmap", "gather_trainable", "scatter_trainable_", "gather_by_bitmap",
                 "scatter_by_bitmap_", "bitmap_tile_prefix", "compact_weight_grad", "compact_weight_grad_bitmap",
                 "qresu_effective_weight", "qresu_linear_small_m", "qresu_grad_input_small_m"):
        assert kernels.implementation(name, "cuda") is not kernels.implementation(name, "cpu"), name
    mask = random_mask(10_001, 0.3, "cuda")
    values = random_data(10_001, torch.bfloat16, "cuda")
    assert torch.equal(kernels.gather_trainable(values, mask), values[mask])
    from resu_tensor.kernels._triton_support import FALLEN_BACK

    assert not FALLEN_BACK, FALLEN_BACK


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_compiles_the_custom_ops():
    from resu_tensor import kernels

    rows, cols = 257, 515
    mask = random_mask(rows * cols, 0.5, "cuda")
    bitmap = kernels.pack_bitmap(mask)
    block_size = 1024
    prefix = kernels.block_prefix_counts(mask, block_size)
    count = int((~mask).sum())
    a, b = random_data((300, rows), torch.bfloat16, "cuda"), random_data((300, cols), torch.bfloat16, "cuda")
    values = random_data((rows, cols), torch.float32, "cuda")

    def step(values, a, b):
        grad = kernels.compact_weight_grad_bitmap(a, b, bitmap, prefix, block_size, True, count, torch.float32)
        theta = kernels.gather_by_bitmap(values, bitmap, prefix, block_size, True, count)
        return kernels.scatter_by_bitmap_(values.clone(), bitmap, prefix, block_size, True, theta - 0.1 * grad)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    torch.testing.assert_close(compiled(values, a, b), step(values, a, b))

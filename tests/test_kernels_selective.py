"""RESU-Selective's two Triton kernels (kernels/selective_triton.py) against their reference
(kernels/selective.py), the way tests/test_kernels_triton.py checks the others: on CPU under the
Triton interpreter in a child process (``TRITON_INTERPRET=1`` must precede the triton import),
small odd lengths; on the GPU (``pytest -m cuda``) compiled, on ~1M elements, plus the whole
filter (resu_tensor.method.selective.consistency_filter_) against its CPU run, without a host sync.

Fresh random non-zero data per check; float32 results must be bit-identical (the kernels avoid
FMA contraction and approximate division), bfloat16 ones too (round to nearest even both ways).
"""
import pytest
import torch

import kernel_checks
from kernel_checks import package, random_data

BETA, TAU, DELTA = 0.9, 0.5, 1e-8
DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)]


def _inputs(numel, grad_dtype, ema_dtype, device):
    """g, and EMAs whose consistency C spreads over [0, 1] so that every outcome occurs."""
    grad = random_data(numel, grad_dtype, device)
    m = random_data(numel, torch.float32, device)
    v = m.abs() + 0.5 * torch.rand(numel, device=device)
    return grad, m.to(ema_dtype), v.to(ema_dtype)


def _kth_largest(x, k):
    return x.float().sort(descending=True).values[min(k, x.numel()) - 1]


# --------------------------------------------------------------------------- checks
def check_selective_kernels(device, big):
    k = package()
    ref, tri = k.selective, k.selective_triton
    for numel in (1, 7, 1237) if not big else (1_000_003,):
        for ema_dtype, grad_dtype in DTYPES:
            grad, m, v = _inputs(numel, grad_dtype, ema_dtype, device)
            screen = _kth_largest(grad.abs(), -(-numel // 2))
            ours_m, ours_v, theirs_m, theirs_v = m.clone(), v.clone(), m.clone(), v.clone()
            score = tri.selective_scores_(grad, ours_m, ours_v, BETA, TAU, DELTA, screen)
            expected = ref.selective_scores_(grad, theirs_m, theirs_v, BETA, TAU, DELTA, screen)
            assert score.dtype == torch.float32 and score.shape == grad.shape
            assert torch.equal(ours_m, theirs_m) and torch.equal(ours_v, theirs_v), (numel, ema_dtype)
            assert torch.equal(score, expected), (numel, ema_dtype, grad_dtype)
            assert not torch.equal(ours_m, m) and not torch.equal(ours_v, v)
            if numel > 1000:  # every kind of coordinate occurs: screened out, inconsistent, candidate
                assert (grad.abs() < screen).any() and (score == -1).any() and (score > 0).sum() > numel // 10
            # a threshold inside the candidates, and −1 (fewer candidates than asked for)
            for select in (_kth_largest(expected, max(1, numel // 5)), torch.tensor(-1.0, device=device)):
                ours, theirs = grad.clone(), grad.clone()
                assert tri.selective_apply_(ours, ours_m, ours_v, score, DELTA, select) is ours
                ref.selective_apply_(theirs, theirs_m, theirs_v, expected, DELTA, select)
                assert torch.equal(ours, theirs), (numel, ema_dtype, grad_dtype, float(select))
                chosen = (expected >= select) & (expected >= 0)
                assert torch.equal(ours[~chosen], torch.zeros_like(ours[~chosen]))  # not selected: exactly 0
                assert ours[chosen].ne(0).all() and chosen.any() == (expected >= 0).any()
            assert torch.equal(ours_m, theirs_m) and torch.equal(ours_v, theirs_v)  # apply only reads them


def check_selective_errors(device, big):
    k = package()
    for impl in (k.selective, k.selective_triton):
        grad, m, v = _inputs(9, torch.float32, torch.float32, device)
        threshold = torch.tensor(0.5, device=device)
        cases = [
            ((grad, m[:8], v, BETA, TAU, DELTA, threshold), "same number of elements"),
            ((grad, m, torch.rand(9, 2, device=device)[:, 0], BETA, TAU, DELTA, threshold), "v must be contiguous"),
            ((grad, m, v, BETA, TAU, DELTA, threshold.double()), "one-element float32 tensor"),
        ]
        for args, message in cases:
            try:
                impl.selective_scores_(*args)
            except ValueError as error:
                assert message in str(error), (impl.__name__, error)
            else:
                raise AssertionError(f"{impl.__name__}: no ValueError for {message!r}")
        try:
            impl.selective_apply_(grad, m, v, torch.zeros(9, dtype=torch.bfloat16, device=device), DELTA, threshold)
        except ValueError as error:
            assert "score must be float32" in str(error)
        else:
            raise AssertionError(f"{impl.__name__}: a bfloat16 score passed")


def check_selective_custom_ops_trace(device, big):
    """Fake implementations agree with the real ones; torch.compile traces both ops in one graph."""
    k = package()
    tri, ops = k.selective_triton, torch.ops.resu_tensor
    grad, m, v = _inputs(37, torch.float32, torch.bfloat16, device)
    threshold = _kth_largest(grad.abs(), 19)
    score = k.selective.selective_scores_(grad, m.clone(), v.clone(), BETA, TAU, DELTA, threshold)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(ops.selective_scores_, (grad, m.clone(), v.clone(), BETA, TAU, DELTA, threshold),
                          test_utils=tests)
    torch.library.opcheck(ops.selective_apply_, (grad.clone(), m, v, score, DELTA, torch.tensor(0.0, device=device)),
                          test_utils=tests)

    def step(grad, m, v):
        score = tri.selective_scores_(grad, m, v, BETA, TAU, DELTA, threshold)
        return tri.selective_apply_(grad, m, v, score, DELTA, torch.topk(score, 7).values.min())

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    ours, theirs = [(grad.clone(), m.clone(), v.clone()) for _ in range(2)]
    compiled(*ours)
    step(*theirs)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


CHECKS = {name[len("check_"):]: fn for name, fn in sorted(globals().items()) if name.startswith("check_")}


if __name__ == "__main__":
    kernel_checks.child_main(CHECKS)


@pytest.fixture(scope="module")
def interpreted():
    return kernel_checks.run_interpreted(__file__)


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_kernel_on_interpreter(name, interpreted):
    kernel_checks.assert_passed(name, interpreted)


# --------------------------------------------------------------------------- GPU
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", sorted(CHECKS))
@pytest.mark.cuda
@needs_gpu
def test_kernel_on_gpu(name):
    CHECKS[name]("cuda", big=True)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("ema_dtype", [torch.float32, torch.bfloat16])
def test_filter_on_gpu_matches_cpu_without_a_host_sync(ema_dtype):
    from resu_tensor import kernels
    from resu_tensor.kernels._triton_support import FALLEN_BACK
    from resu_tensor.method.selective import SelectiveConfig, consistency_filter_

    for name in ("selective_scores_", "selective_apply_"):
        assert kernels.implementation(name, "cuda") is not kernels.implementation(name, "cpu"), name
    config = SelectiveConfig(ema_dtype="float32" if ema_dtype == torch.float32 else "bfloat16").as_tuple()
    grad, m, v = _inputs(1_000_003, torch.float32, ema_dtype, "cuda")
    on_cpu = [t.cpu() for t in (grad, m, v)]
    consistency_filter_(*on_cpu, config)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = consistency_filter_(grad, m, v, config)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert out is grad
    for ours, theirs in zip((grad, m, v), on_cpu):
        assert torch.equal(ours.cpu(), theirs)
    assert 0 < int(grad.ne(0).sum()) <= int(0.2 * grad.numel())
    assert not FALLEN_BACK, FALLEN_BACK

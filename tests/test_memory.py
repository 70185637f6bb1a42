"""Exact byte counts: mask, weight store, grads and optimizer state."""
import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt

SPARSITIES = [0.05, 0.1, 0.3, 0.5, 0.7, 0.9, 0.95]


@pytest.mark.parametrize("shape", [(64, 256), (96, 384), (33, 1000)])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_weight_store_bytes(shape, sparsity):
    rows, cols = shape
    w = rt.ResuTensor.from_dense(torch.randn(shape), sparsity=sparsity)
    parts = w.nbytes_breakdown()
    numel = rows * cols
    assert parts["values"] == 4 * numel
    assert parts["mask"] <= numel / 8 + 4 * rows
    assert sum(parts.values()) <= 1.035 * 4 * numel
    # exact: the bitmap (ceil(numel/8) bytes) plus one int32 prefix per extra block
    blocks = -(-numel // (1024 * -(-cols // 1024)))
    assert parts["mask"] == -(-numel // 8) + 4 * (blocks - 1)


@pytest.mark.parametrize("sparsity", [0.01, 0.99])
def test_int32_indices_at_extreme_sparsity(sparsity):
    w = rt.ResuTensor.from_dense(torch.randn(128, 256), sparsity=sparsity)
    n_pruned = round(sparsity * w.numel())
    assert w.nbytes_breakdown()["mask"] == 4 * min(n_pruned, w.numel() - n_pruned)


@pytest.mark.parametrize("mode", ["sparse", "resu"])
def test_grad_and_adamw_state_are_12_bytes_per_trainable(mode):
    w = rt.ResuTensor.from_dense(torch.randn(64, 256), sparsity=0.7)
    if mode == "resu":
        w.enter_resu()
    w = nn.Parameter(w)
    opt = torch.optim.AdamW([w], lr=1e-3)
    F.linear(torch.randn(8, 256), w).sum().backward()
    opt.step()
    state = opt.state[w]
    compact_bytes = w.grad.flat.nbytes + state["exp_avg"].flat.nbytes + state["exp_avg_sq"].flat.nbytes
    assert compact_bytes == 12 * w.trainable_count
    assert w.trainable_count == round((0.7 if mode == "resu" else 0.3) * w.numel())


class MemoryReportTest(expecttest.TestCase):
    def test_memory_report_table(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
        quantize_(model, rt.resu_config(sparsity=0.5))
        rt.enter_resu_(model, filter_fn=lambda module, name: name == "0")
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        F.cross_entropy(model(torch.randn(4, 256)), torch.tensor([1, 2, 3, 4])).backward()
        opt.step()
        self.assertExpectedInline(str(rt.memory_report(model, opt)), """\
parameter  shape    mode    sparsity  weights   mask   grads  optimizer    total
--------------------------------------------------------------------------------
0.weight   128x256  resu    0.500     131,072  4,220  65,536    131,076  331,904
0.bias     128      plain                 512      0     512      1,028    2,052
2.weight   10x128   sparse  0.500       5,120    164   2,560      5,124   12,968
2.bias     10       plain                  40      0      40         84      164
--------------------------------------------------------------------------------
total                                 136,744  4,384  68,648    137,312  347,088
(bytes)""")


def _held_bytes(t) -> int:
    """Bytes of every inner tensor a (plain / ResuTensor / CompactTensor) tensor holds, independently of memory_report."""
    if t is None or not isinstance(t, torch.Tensor):
        return 0
    if isinstance(t, rt.ResuTensor):
        return sum(getattr(t, n).nbytes for n in t.optional_tensor_data_names if getattr(t, n) is not None)
    if isinstance(t, rt.CompactTensor):
        return t.flat.nbytes
    return t.nbytes


@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_memory_report_equals_the_bytes_held_after_adamw_steps(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4))
    quantize_(model, rt.resu_config(sparsity=0.5))
    if mode != "sparse":
        rt.enter_resu_(model, **({"quantize_bits": 4, "group_size": 16} if mode == "qresu" else {}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(torch.randn(8, 64)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    report = rt.memory_report(model, opt)
    held = sum(_held_bytes(p) + _held_bytes(p.grad) + sum(_held_bytes(v) for v in opt.state[p].values())
               for p in model.parameters())
    assert report.total.total == held
    assert model[0].weight.mode.value == mode


def test_qresu_holds_less_than_resu_in_the_resu_phase():
    """QRESU stores the frozen active weights as 4-bit codes: at 50% sparsity its RESU phase holds
    fewer bytes (weights, grads, AdamW state) than RESU's, which keeps them in float32."""
    held = {}
    for bits in (None, 4):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
        quantize_(model, rt.resu_config(sparsity=0.5))
        rt.enter_resu_(model, **({"quantize_bits": bits} if bits else {}))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        F.cross_entropy(model(torch.randn(8, 256)), torch.randint(0, 10, (8,))).backward()
        opt.step()
        held[bits] = rt.memory_report(model, opt).total.total
    assert held[4] < held[None], held

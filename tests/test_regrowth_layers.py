"""The dense gradient RigL grows by, for weights that are not a Linear's ``weight``: tied
parameters, N-D convolutions, MultiheadAttention's in-projection."""
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.training.regrowth import dense_gradients


class TiedConvAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 11, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, idx):
        x = self.conv(self.embed(idx).transpose(1, 2)).transpose(1, 2)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.head(x)


def test_dense_gradients_equal_the_gradient_of_a_dense_copy():
    torch.manual_seed(0)
    model = TiedConvAttention()
    quantize_(model, rt.resu_config(sparsity=0.5), filter_fn=rt.is_supported_module)
    idx = torch.randint(0, 11, (3, 5))
    target = torch.randint(0, 11, (3, 5))
    loss_fn = lambda m: F.cross_entropy(m(idx).reshape(-1, 11), target.reshape(-1))  # noqa: E731
    grads = dense_gradients(model, loss_fn)

    dense = TiedConvAttention()
    with torch.no_grad():
        for (name, p), (_, q) in zip(model.named_parameters(), dense.named_parameters()):
            q.copy_(p.dequantize() if isinstance(p, rt.ResuTensor) else p)
    loss_fn(dense).backward()
    params = dict(dense.named_parameters())
    weights = {name: w for name, _, w in rt.resu_weights(model)}
    assert set(grads) == set(weights)
    for name, weight in weights.items():
        fqn = next(n for n, p in model.named_parameters() if p is weight)
        torch.testing.assert_close(grads[name], weight.to_storage(params[fqn].grad))
    assert all(p.grad is None for p in model.parameters())  # the probe leaves the model's gradients alone
    assert model.head.weight is model.embed.weight and isinstance(model.embed.weight, rt.ResuTensor)

"""ResuTensor weights of Conv1d/2d/3d (N-D logical shape over an (out, in·k...) storage),
transformers Conv1D ((in, out) weight stored transposed) and nn.Embedding, in every mode: forward,
input and weight gradients against the dense layer run on the effective weight, frozen
coordinates through optimizer steps, state round trips, Wanda input norms."""
import io
import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import resu_tensor as rt
from resu_tensor import CompactTensor, Mode, ResuTensor
from resu_tensor.core.state import check_state
from resu_tensor.core.tensor import expand_compact
from resu_tensor.integrations.safetensors_io import META, flatten_resu_tensor, rebuild_resu_tensor
from resu_tensor.method.pruning import score
from resu_tensor.training.calibration import input_column_norms
from resu_tensor.training.export import to_dense_

MODES = [Mode.DENSE, Mode.SPARSE, Mode.RESU, Mode.QRESU]


def in_mode(weight: torch.Tensor, mode: Mode, seed: int = 0, **from_dense) -> ResuTensor:
    """``weight`` as a ResuTensor in ``mode`` (half pruned by magnitude outside DENSE; θ random in RESU/QRESU)."""
    g = torch.Generator().manual_seed(seed)
    w = ResuTensor.from_dense(weight, 0.0 if mode == Mode.DENSE else 0.5, **from_dense)
    if mode == Mode.RESU:
        w.enter_resu(0.5, generator=g)
    elif mode == Mode.QRESU:
        w.enter_resu(0.5, generator=g, quantize_bits=4, group_size=4)
    assert w.mode == mode
    return w


def check_against_dense(w: ResuTensor, forward, inputs, forward_tol: float = 0.0, grad_tol: float = 1e-6):
    """``forward(inputs, weight)`` with the ResuTensor parameter and with its plain W_eff: same output,
    same input gradient, and the weight's compact gradient = the dense gradient ⊙ trainable mask."""
    p = nn.Parameter(w)
    reference = w.dequantize().requires_grad_()
    x = inputs.clone().requires_grad_(inputs.is_floating_point())
    x_ref = inputs.clone().requires_grad_(inputs.is_floating_point())
    y, y_ref = forward(x, p), forward(x_ref, reference)
    assert type(y) is torch.Tensor
    torch.testing.assert_close(y, y_ref, rtol=forward_tol, atol=forward_tol)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert isinstance(p.grad, CompactTensor) and tuple(p.grad.shape) == tuple(w.shape)
    assert p.grad.flat.numel() == w.trainable_count
    expected = reference.grad * w.trainable_mask()
    torch.testing.assert_close(p.expand_trainable(p.grad), expected, rtol=grad_tol, atol=grad_tol)
    torch.testing.assert_close(expand_compact(p.grad), expected, rtol=grad_tol, atol=grad_tol)
    if x.requires_grad:
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=grad_tol, atol=grad_tol)
    return p


# ------------------------------------------------------------------------------------------ conv
CONVS = {
    1: (F.conv1d, (2, 6, 11)),
    2: (F.conv2d, (2, 6, 9, 8)),
    3: (F.conv3d, (1, 6, 5, 6, 5)),
}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 0, 1), (2, 2, 1, 1), (3, 1, 2, 2)])
def test_conv_matches_dense_conv_of_effective_weight(mode, dims, groups, stride, padding, dilation):
    torch.manual_seed(dims * 10 + groups)
    conv, x_shape = CONVS[dims]
    weight = torch.randn(6, 6 // groups, *([3] * dims))
    bias = torch.randn(6)
    w = in_mode(weight, mode)
    assert tuple(w.shape) == tuple(weight.shape) and w.dim() == dims + 2 and w.storage_shape == (6, 6 // groups * 3 ** dims)
    assert tuple(w.mask().shape) == tuple(weight.shape) and tuple(w.dequantize().shape) == tuple(weight.shape)
    if mode != Mode.QRESU:  # the stored values are W_eff: the storage is the weight's (out, in·k...) reshape
        torch.testing.assert_close(w.dequantize().reshape(6, -1), w.values, rtol=0, atol=0)

    def forward(x, wt):
        return conv(x, wt, bias, stride=stride, padding=padding, dilation=dilation, groups=groups)

    check_against_dense(w, forward, torch.randn(x_shape))


def test_conv_module_with_resu_weight_and_bias_grad():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    reference = nn.Conv2d(4, 6, 3, padding=1, bias=True)
    w = in_mode(conv.weight.detach(), Mode.RESU)
    conv.weight = nn.Parameter(w)
    reference.weight = nn.Parameter(w.dequantize())
    reference.bias = nn.Parameter(conv.bias.detach().clone())
    x = torch.randn(2, 4, 5, 5)
    conv(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(conv.bias.grad, reference.bias.grad)
    torch.testing.assert_close(w.expand_trainable(conv.weight.grad), reference.weight.grad * w.trainable_mask())


def test_conv_nm_and_qresu_groups_run_along_the_reduction_dimension():
    torch.manual_seed(1)
    weight = torch.randn(8, 4, 3, 3)
    w = ResuTensor.from_dense(weight).prune(None, granularity="2:4")
    matrix_mask = w.mask().reshape(8, -1)
    assert matrix_mask.shape == (8, 36)
    assert (matrix_mask.view(8, 9, 4).sum(-1) == 2).all()  # 2 of every 4 consecutive in·k columns
    assert torch.equal(w.mask(), (weight.abs().reshape(8, 9, 4).argsort(-1, descending=True).argsort(-1) < 2)
                       .reshape(weight.shape))
    w.enter_resu(0.1, quantize_bits=8, group_size=12)
    assert w.qscale.shape == (8, 3)  # 36 columns / 12


def test_conv_wanda_prune_with_patch_norms():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 3, padding=1)
    x = torch.randn(4, 3, 6, 6)
    norms = input_column_norms(conv, x)
    w = ResuTensor.from_dense(conv.weight.detach())
    scores = w.values.abs() * norms
    w.prune(0.5, method="wanda", scores=scores)
    expected = scores.flatten().argsort(descending=True)[: scores.numel() // 2]
    keep = torch.zeros(scores.numel(), dtype=torch.bool)
    keep[expected] = True
    assert torch.equal(w.mask(), keep.view(conv.weight.shape))
    # the same scores given in the weight's logical (N-D) shape
    w2 = ResuTensor.from_dense(conv.weight.detach()).prune(0.5, method="wanda", scores=scores.view(conv.weight.shape))
    assert torch.equal(w2.mask(), w.mask())


@settings(max_examples=15, deadline=None)
@given(out_per_group=st.integers(1, 3), in_per_group=st.integers(1, 3), groups=st.integers(1, 2),
       dims=st.integers(1, 3), kernel=st.integers(1, 3), stride=st.integers(1, 2), padding=st.integers(0, 1),
       mode=st.sampled_from([Mode.SPARSE, Mode.RESU, Mode.QRESU]), seed=st.integers(0, 2 ** 16))
def test_conv_random_shapes(out_per_group, in_per_group, groups, dims, kernel, stride, padding, mode, seed):
    torch.manual_seed(seed)
    conv = CONVS[dims][0]
    weight = torch.randn(out_per_group * groups, in_per_group, *([kernel] * dims))
    if mode == Mode.QRESU and weight.numel() < 4:
        mode = Mode.RESU
    w = in_mode(weight, mode, seed)
    x = torch.randn(2, in_per_group * groups, *([kernel + 3] * dims))

    def forward(inp, wt):
        return conv(inp, wt, stride=stride, padding=padding, groups=groups)

    check_against_dense(w, forward, x)


# ------------------------------------------------------------------------------------------ Conv1D
class HFConv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D's forward: weight (in, out)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


Conv1D = type("Conv1D", (HFConv1D,), {})  # the name transformers gives it, which calibration recognises


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_transposed_conv1d_weight_takes_the_linear_path(mode):
    torch.manual_seed(3)
    weight = torch.randn(12, 8)  # (in, out)
    w = in_mode(weight, mode, transposed=True)
    linear = in_mode(weight.t().contiguous(), mode)  # the equivalent Linear
    assert tuple(w.shape) == (12, 8) and w.storage_shape == (8, 12) and w.transposed
    assert torch.equal(w.mask(), linear.mask().t()) and torch.equal(w.dequantize(), linear.dequantize().t())
    bias = torch.randn(8)

    def forward(x, wt):
        return torch.addmm(bias, x.view(-1, 12), wt).view(*x.shape[:-1], 8)

    x = torch.randn(2, 3, 12)
    p = nn.Parameter(w)
    node = torch.addmm(bias, x.view(-1, 12), p).grad_fn
    assert type(node).__name__ == "ResuMatmulBackward"  # the linear fast path, not the generic autograd entry
    check_against_dense(w, forward, x)


def test_transposed_weight_owns_its_lifecycle_and_views_do_not():
    torch.manual_seed(4)
    weight = torch.randn(16, 8)
    w = ResuTensor.from_dense(weight, transposed=True)
    w.prune(None, granularity="2:4")
    assert (w.storage_mask().view(8, 4, 4).sum(-1) == 2).all()  # N:M along the inputs, as for a Linear
    w.enter_resu(0.1, quantize_bits=4, group_size=8)
    assert w.qscale.shape == (8, 2)
    stats = w.commit("magnitude")
    assert w.mode == Mode.SPARSE and w.transposed and stats.budget == w.n_active
    view = w.t()
    assert tuple(view.shape) == (8, 16) and not view.transposed
    with pytest.raises(ValueError, match="view"):
        view.prune(0.5)
    with pytest.raises(ValueError, match="view"):
        ResuTensor.from_dense(torch.randn(8, 16), 0.5).t().enter_resu(0.1)
    with pytest.raises(ValueError, match="transposed=True takes a 2-D"):
        ResuTensor.from_dense(torch.randn(4, 4, 3), transposed=True)


def test_conv1d_wanda_norms_are_those_of_the_equivalent_linear():
    torch.manual_seed(5)
    hf = Conv1D(8, 12)
    linear = nn.Linear(12, 8)
    x = torch.randn(3, 5, 12)
    expected = x.reshape(-1, 12).pow(2).sum(0).sqrt()
    torch.testing.assert_close(input_column_norms(hf, x), expected)
    torch.testing.assert_close(input_column_norms(linear, [x[:1], x[1:]]), expected)
    hf.weight = nn.Parameter(ResuTensor.from_dense(hf.weight.detach(), transposed=True))
    torch.testing.assert_close(input_column_norms(hf, x), expected)


# ------------------------------------------------------------------------------------------ Embedding
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_matches_dense_lookup(mode, padding_idx):
    torch.manual_seed(6)
    w = in_mode(torch.randn(10, 8), mode)
    idx = torch.tensor([[0, 2, 5, 2], [9, 1, 2, 7]])

    def forward(i, wt):
        return F.embedding(i, wt, padding_idx=padding_idx)

    check_against_dense(w, forward, idx)


def test_embedding_module_and_refused_flags():
    torch.manual_seed(7)
    emb = nn.Embedding(10, 8, sparse=True)
    emb.weight = nn.Parameter(ResuTensor.from_dense(emb.weight.detach(), 0.5))
    with pytest.raises(ValueError, match="sparse=True"):
        emb(torch.tensor([1, 2]))
    emb.sparse = False
    assert torch.equal(emb(torch.tensor([1, 2])), emb.weight.dequantize()[[1, 2]])
    with pytest.raises(ValueError, match="max_norm"):
        F.embedding(torch.tensor([1]), emb.weight, max_norm=1.0)
    norms = input_column_norms(emb, torch.tensor([1, 2, 2]))  # sqrt(count of token i) along row i
    assert torch.equal(norms, torch.tensor([0.0, 1.0, 2 ** 0.5] + [0.0] * 7)[:, None].expand(10, 8))


# ------------------------------------------------------------------------------------------ optimizer
LAYERS = {
    "conv2d": (lambda: torch.randn(6, 3, 3, 3), {}, lambda x, w: F.conv2d(x, w, padding=1),
               lambda: torch.randn(2, 3, 5, 5)),
    "conv1d_hf": (lambda: torch.randn(12, 8), {"transposed": True}, lambda x, w: torch.addmm(torch.zeros(8), x, w),
                  lambda: torch.randn(4, 12)),
    "embedding": (lambda: torch.randn(10, 8), {}, lambda x, w: F.embedding(x, w),
                  lambda: torch.randint(0, 10, (3, 4))),
}


@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("optimizer", [torch.optim.SGD, torch.optim.Adam])
def test_optimizer_steps_keep_frozen_coordinates_bit_identical(layer, mode, optimizer):
    torch.manual_seed(8)
    make, options, forward, make_input = LAYERS[layer]
    w = in_mode(make(), mode, **options)
    p = nn.Parameter(w)
    opt = optimizer([p], lr=0.05)
    before = p.dequantize()
    frozen = ~p.trainable_mask()
    for _ in range(3):
        opt.zero_grad()
        forward(make_input(), p).square().sum().backward()
        opt.step()
    after = p.dequantize()
    assert tuple(after.shape) == tuple(before.shape)
    assert torch.equal(after[frozen], before[frozen])
    assert (after[~frozen] != before[~frozen]).any()


# ------------------------------------------------------------------------------------------ state
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
@pytest.mark.parametrize("layer", list(LAYERS))
def test_state_round_trips(layer, mode):
    torch.manual_seed(9)
    make, options, _, _ = LAYERS[layer]
    w = in_mode(make(), mode, **options)
    buffer = io.BytesIO()
    torch.save(w, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    entries = flatten_resu_tensor("w", w)
    assert tuple(entries["w"].shape) == tuple(w.shape)  # a dense loader gets the layer's own layout
    torch.testing.assert_close(entries["w"], w.dequantize(), rtol=0, atol=0)
    rebuilt = rebuild_resu_tensor("w", entries, tuple(w.shape))
    for copy in (loaded, rebuilt):
        assert copy.fields().keys() == w.fields().keys()
        assert copy.view_shape == w.view_shape and copy.transposed == w.transposed and tuple(copy.shape) == tuple(w.shape)
        assert torch.equal(copy.dequantize(), w.dequantize()) and torch.equal(copy.mask(), w.mask())
        assert copy.trainable_key == w.trainable_key


def test_format2_file_without_view_shape_still_loads():
    w = ResuTensor.from_dense(torch.randn(4, 8), 0.5)
    entries = flatten_resu_tensor("w", w)
    meta = json.loads(bytes(entries["w" + META].tolist()).decode())
    del meta["view_shape"]
    entries["w" + META] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)
    rebuilt = rebuild_resu_tensor("w", entries)
    assert rebuilt.view_shape is None and torch.equal(rebuilt.dequantize(), w.dequantize())


def test_view_shape_is_checked():
    w = ResuTensor.from_dense(torch.randn(4, 2, 3), 0.5)
    fields = w.fields()
    assert fields["view_shape"] == (4, 2, 3) and w.storage_shape == (4, 6)
    with pytest.raises(ValueError, match="view_shape"):
        check_state({**fields, "view_shape": (4, 3, 3)})
    with pytest.raises(ValueError, match="view_shape"):
        check_state({**fields, "view_shape": (4, 6)})
    with pytest.raises(ValueError, match="both set"):
        check_state({**fields, "transposed": True})


def test_nd_weight_layout_ops_read_the_effective_weight():
    torch.manual_seed(10)
    w = in_mode(torch.randn(4, 2, 3), Mode.RESU)
    dense = w.dequantize()
    assert torch.equal(w.transpose(0, 2), dense.transpose(0, 2)) and type(w.permute(2, 0, 1)) is torch.Tensor
    assert torch.equal(w[1:3], dense[1:3]) and torch.equal(w[:, 1], dense[:, 1])
    p = nn.Parameter(w)
    p.permute(2, 1, 0).sum().backward()
    torch.testing.assert_close(p.expand_trainable(p.grad), w.trainable_mask().to(dense.dtype))
    blocks = torch.chunk(w.detach(), 2)  # row blocks: N-D weights with fewer out-channels
    assert all(isinstance(b, ResuTensor) and b.mode == w.mode for b in blocks)
    assert torch.equal(torch.cat([b.dequantize() for b in blocks]), dense)
    with torch.no_grad():
        for size in [(4, -1), (-1, 2), (-1, 3), (4, 2, 3)]:
            viewed = w.view(*size)
            assert tuple(viewed.shape) == tuple(dense.view(*size).shape) and torch.equal(viewed, dense.view(*size))


@pytest.mark.parametrize("layer", list(LAYERS))
def test_whole_state_copy_and_data_assignment(layer):
    torch.manual_seed(15)
    make, options, _, _ = LAYERS[layer]
    source = in_mode(make(), Mode.QRESU, **options)
    dest = in_mode(make(), Mode.SPARSE, seed=1, **options)
    with torch.no_grad():
        dest.copy_(source)
    assert dest.mode == Mode.QRESU and tuple(dest.shape) == tuple(source.shape)
    assert torch.equal(dest.dequantize(), source.dequantize())
    sparse = in_mode(make(), Mode.SPARSE, **options)
    new_values = torch.randn(sparse.shape) * sparse.mask()
    sparse.data = new_values
    assert torch.equal(sparse.dequantize(), new_values)


# ------------------------------------------------------------------------------------------ Wanda norms
def unfold_reference(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Per-column ‖·‖₂ of the (out, in/groups·k·k) matrix's inputs from F.unfold's patches."""
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    per_channel_offset = patches.pow(2).sum(dim=(0, 2)).view(conv.in_channels, -1)  # (in, k·k)
    per_group = per_channel_offset.reshape(conv.groups, -1)
    return per_group.repeat_interleave(conv.out_channels // conv.groups, 0).sqrt()


def conv_reference(conv, x: torch.Tensor) -> torch.Tensor:
    """The same norms by a grouped conv of x² with one-hot kernels (any number of spatial dims)."""
    k = conv.kernel_size
    n_offsets = torch.Size(k).numel()
    one_hot = torch.eye(n_offsets).view(n_offsets, 1, *k).repeat(conv.in_channels, 1, *([1] * len(k)))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(k)]
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    padded = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode)
    out = fn(padded.pow(2), one_hot, stride=conv.stride, dilation=conv.dilation, groups=conv.in_channels)
    sums = out.sum(dim=[0, *range(2, out.dim())]).view(conv.groups, -1)
    return sums.repeat_interleave(conv.out_channels // conv.groups, 0).sqrt()


@pytest.mark.parametrize("groups,stride,padding,dilation", [(1, 1, 0, 1), (1, 2, 1, 1), (2, 1, 2, 2), (4, 3, 1, 1)])
def test_conv2d_norms_match_unfold(groups, stride, padding, dilation):
    torch.manual_seed(11)
    conv = nn.Conv2d(4, 8, (3, 2), stride=stride, padding=padding, dilation=dilation, groups=groups)
    batches = [torch.randn(2, 4, 9, 7), torch.randn(1, 4, 9, 7)]
    norms = input_column_norms(conv, batches)
    expected = unfold_reference(conv, torch.cat(batches))
    torch.testing.assert_close(norms, expected[0] if groups == 1 else expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(norms, conv_reference(conv, torch.cat(batches))[0] if groups == 1
                               else conv_reference(conv, torch.cat(batches)), rtol=1e-5, atol=1e-5)
    assert norms.shape == ((4 // groups * 6,) if groups == 1 else (8, 4 // groups * 6))


@pytest.mark.parametrize("dims", [1, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_conv1d_conv3d_norms_match_references(dims, padding_mode):
    torch.manual_seed(12)
    cls = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    conv = cls(4, 6, 3, stride=2, padding=1, dilation=1, groups=2, padding_mode=padding_mode)
    x = torch.randn(2, 4, *([7] * dims))
    norms = input_column_norms(conv, x)
    torch.testing.assert_close(norms, conv_reference(conv, x), rtol=1e-5, atol=1e-5)
    if dims == 1 and padding_mode == "zeros":  # a 1-D conv is a 2-D one of height 1: F.unfold applies
        conv2d = nn.Conv2d(4, 6, (1, 3), stride=(1, 2), padding=(0, 1), groups=2)
        torch.testing.assert_close(norms, unfold_reference(conv2d, x.unsqueeze(2)), rtol=1e-5, atol=1e-5)


def test_grouped_conv_wanda_prune_and_commit_take_per_row_norms():
    torch.manual_seed(13)
    conv = nn.Conv2d(4, 6, 3, groups=2)
    x = torch.randn(2, 4, 6, 6)
    norms = input_column_norms(conv, x)
    assert norms.shape == (6, 18)
    w = ResuTensor.from_dense(conv.weight.detach())
    w.prune(0.5, method="wanda", scores=score(w.values, "wanda", input_norms=norms))
    torch.testing.assert_close(score(w.values, "wanda", input_norms=norms), w.values.abs() * norms)
    w.enter_resu(0.1)
    w.commit("wanda_reprune", input_norms=norms)
    assert w.mode == Mode.SPARSE and w.n_active == w.storage_numel // 2


def test_to_dense_export_keeps_each_layer_shape():
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), Conv1D(5, 16), nn.ReLU())
    model[0].weight = nn.Parameter(in_mode(model[0].weight.detach(), Mode.RESU))
    model[2].weight = nn.Parameter(in_mode(model[2].weight.detach(), Mode.RESU, transposed=True))
    for layer in (model[0], model[2]):
        layer.weight.commit("magnitude")
    x = torch.randn(2, 3, 4, 4)
    expected = model(x)
    masked = [layer.weight.dequantize() for layer in (model[0], model[2])]
    to_dense_(model)
    assert all(type(layer.weight) is nn.Parameter for layer in (model[0], model[2]))
    assert torch.equal(model[0].weight, masked[0]) and torch.equal(model[2].weight, masked[1])
    torch.testing.assert_close(model(x), expected)  # the same math; Conv1D's addmm may round differently by layout


def test_model_level_wanda_prune_of_conv_and_conv1d_layers():
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, groups=2, padding=1), nn.Flatten(), Conv1D(5, 6 * 16))
    model[0].weight = nn.Parameter(ResuTensor.from_dense(model[0].weight.detach()))
    model[2].weight = nn.Parameter(ResuTensor.from_dense(model[2].weight.detach(), transposed=True))
    x = torch.randn(3, 4, 4, 4)
    expected = {}
    for name, layer, layer_input in (("0", model[0], x), ("2", model[2], model[1](model[0](x)).detach())):
        scores = layer.weight.values.abs() * input_column_norms(layer, layer_input)
        expected[name] = ResuTensor.from_dense(layer.weight.dequantize(), transposed=layer.weight.transposed) \
            .prune(0.5, method="wanda", scores=scores).mask()
    rt.prune_(model, 0.5, method="wanda", calibration=[x])
    assert torch.equal(model[0].weight.mask(), expected["0"]) and torch.equal(model[2].weight.mask(), expected["2"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("mode", MODES, ids=lambda m: m.value)
def test_layers_on_cuda(mode):
    """On the GPU (QRESU's fused kernels serve the Conv1D addmm with a bitmap mask): conv, Conv1D
    and embedding weights against the dense layer on W_eff."""
    torch.manual_seed(17)
    cases = [
        (torch.randn(32, 8, 4, 4), {}, lambda x, w: F.conv2d(x, w, padding=1), torch.randn(2, 8, 6, 6)),
        (torch.randn(128, 64), {"transposed": True}, lambda x, w: torch.addmm(torch.zeros(64, device="cuda"), x, w),
         torch.randn(3, 128)),
        (torch.randn(64, 128), {}, lambda x, w: F.embedding(x, w), torch.randint(0, 64, (3, 5))),
    ]
    for weight, options, forward, inputs in cases:
        g = torch.Generator().manual_seed(0)
        w = ResuTensor.from_dense(weight.cuda(), 0.0 if mode == Mode.DENSE else 0.5, **options)
        if mode == Mode.RESU:
            w.enter_resu(0.5, generator=g)
        elif mode == Mode.QRESU:
            w.enter_resu(0.5, generator=g, quantize_bits=4, group_size=64)
        check_against_dense(w, forward, inputs.cuda(), forward_tol=1e-3, grad_tol=1e-3)

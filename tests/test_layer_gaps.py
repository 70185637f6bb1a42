"""Layer types beyond (out, in) Linears: FSDP2 sharding of N-D conv and transformers Conv1D
weights (2 gloo ranks against a single-process run), and Wanda input norms of Embedding,
MultiheadAttention and RNN/LSTM/GRU weights against hand-written references."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import two_ranks
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor import fsdp as rtf
from resu_tensor.core.row_blocks import slice_rows

WORLD = two_ranks.WORLD
DEVICE = "cpu"  # set by each worker
VOCAB, WIDTH, CHANNELS, PER_RANK, TOKENS = 16, 8, 7, 3, 5  # CHANNELS: an uneven split of the conv's rows


# ------------------------------------------------------------------------------ model (both sides)
class Conv1D(nn.Module):
    """transformers' Conv1D (weight stored (in, out), ``nf`` its output width), without transformers."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.3)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class GapNet(nn.Module):
    """Embedding → Conv2d over (tokens, 1) → Conv1D → head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv2d(WIDTH, CHANNELS, (3, 1), padding=(1, 0))
        self.proj = Conv1D(WIDTH, CHANNELS)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        image = self.embed(ids).transpose(1, 2).unsqueeze(-1)  # (batch, width, tokens, 1)
        hidden = torch.tanh(self.conv(image)).squeeze(-1).transpose(1, 2)
        return self.head(torch.tanh(self.proj(hidden)))


def gap_net() -> GapNet:
    torch.manual_seed(0)
    model = GapNet().to(DEVICE)
    quantize_(model, rt.resu_config(sparsity=0.0), filter_fn=rt.is_supported_module)
    return model


def token_batch(step: int):
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (WORLD * PER_RANK, TOKENS + 1), generator=generator).to(DEVICE)
    return ids[:, :-1], ids[:, 1:]


def train(model, optimizer, reference, reference_optimizer, rank, steps, first_step=0, schedulers=()):
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for step in range(first_step, first_step + steps):
        ids, targets = token_batch(step)
        losses = []
        for m, o, (x, y) in ((model, optimizer, (ids[rows], targets[rows])),
                             (reference, reference_optimizer, (ids, targets))):
            o.zero_grad()
            loss = F.cross_entropy(m(x).flatten(0, 1), y.flatten())
            loss.backward()
            o.step()
            losses.append(loss)
        for scheduler, loss in zip(schedulers, losses):
            scheduler.step(loss)


def evaluate(model, reference, ids) -> float:
    """Max |output difference| on ``ids``. FSDP2's root keeps its weights unsharded after a forward
    (a backward usually follows); without one, reshard them, or the next optimizer step's forward
    reads the stale unsharded weights (plain FSDP2 parameters alike)."""
    with torch.no_grad():
        diff = (model(ids) - reference(ids)).abs().max().item()
    model.reshard()
    return diff


LAYERS = ("embed", "conv", "proj")


def compare(model, reference) -> dict:
    """Per layer: max |W_eff difference| and whether mode and mask equal the reference's (gathered)."""
    result = {}
    for name in LAYERS:
        full, expected = rtf.full_tensor(getattr(model, name).weight), getattr(reference, name).weight
        result[name] = ((full.dequantize() - expected.dequantize()).abs().max().item(),
                        full.mode == expected.mode and torch.equal(full.mask(), expected.mask()),
                        tuple(full.shape) == tuple(expected.shape))
    return result


def shard(model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(DEVICE, (WORLD,))
    fully_shard(model.conv, mesh=mesh, shard_placement_fn=rtf.shard_placement)
    fully_shard(model.proj, mesh=mesh, shard_placement_fn=rtf.shard_placement)
    fully_shard(model, mesh=mesh, shard_placement_fn=rtf.shard_placement)
    return model


# ------------------------------------------------------------------------------ scenarios (each rank)
def scenario_lifecycle(rank):
    """prune_ (Wanda, this rank's batches) → train → enter_resu_ → train → commit_ → to_dense_ → train."""
    model, reference = shard(gap_net()), gap_net()
    shapes = {name: (tuple(getattr(model, name).weight._local_tensor.shape),
                     str(getattr(model, name).weight.placements[0])) for name in LAYERS}
    optimizer, reference_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)
                                      for m in (model, reference))
    train(model, optimizer, reference, reference_optimizer, rank, steps=2)
    batches = [token_batch(100 + i)[0] for i in range(2)]
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    norms = rt.calibrate(model, [x[rows] for x in batches])
    reference_norms = rt.calibrate(reference, batches)
    rt.prune_(model, 0.5, method="wanda", calibration=[x[rows] for x in batches], optimizer=optimizer)
    rt.prune_(reference, 0.5, method="wanda", calibration=batches, optimizer=reference_optimizer)
    pruned = compare(model, reference)
    train(model, optimizer, reference, reference_optimizer, rank, steps=2, first_step=2)
    generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    rt.enter_resu_(model, epsilon=0.5, generator=generator(), optimizer=optimizer)
    rt.enter_resu_(reference, epsilon=0.5, generator=generator(), optimizer=reference_optimizer)
    train(model, optimizer, reference, reference_optimizer, rank, steps=2, first_step=4)
    resu = compare(model, reference)
    rt.commit_(model, optimizer=optimizer)
    rt.commit_(reference, optimizer=reference_optimizer)
    committed = compare(model, reference)
    ids = token_batch(200)[0]
    out_diff = evaluate(model, reference, ids[rows])
    rt.to_dense_(model)
    rt.to_dense_(reference)
    plain = sorted({type(p._local_tensor).__name__ for p in model.parameters()})
    dense_diff = evaluate(model, reference, ids[rows])
    optimizer, reference_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference))
    train(model, optimizer, reference, reference_optimizer, rank, steps=2, first_step=6)  # FSDP runs them plain
    reference_params = dict(reference.named_parameters())
    trained_diff = {n: (p.full_tensor() - reference_params[n]).abs().max().item() for n, p in model.named_parameters()}
    return {"shapes": shapes, "pruned": pruned, "resu": resu, "committed": committed, "out_diff": out_diff,
            "norm_diff": max((norms[k] - reference_norms[k]).abs().max().item() for k in reference_norms),
            "norm_layers": sorted(norms), "plain": plain, "dense_diff": dense_diff, "trained_diff": trained_diff,
            "tied": model.head.weight is model.embed.weight}


SCHEDULE = dict(steps_per_cycle=8, num_cycles=1, sparsity=0.5, stabilize_fraction=0.25, resu_fraction=0.5,
                epsilon=0.5, r_start=0.3, r_end=0.1, commit_score="gradient", seed=0, progress=False)


def scenario_scheduler(rank):
    model, reference = shard(gap_net()), gap_net()
    optimizer, reference_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference))
    schedulers = [rt.ResuScheduler(m, o, rt.ScheduleConfig(**SCHEDULE))
                  for m, o in ((model, optimizer), (reference, reference_optimizer))]
    train(model, optimizer, reference, reference_optimizer, rank, steps=8, schedulers=schedulers)
    everyone = [None] * WORLD
    masks = [rtf.full_tensor(getattr(model, n).weight).mask().numpy().tobytes() for n in LAYERS]
    dist.all_gather_object(everyone, masks)
    return {"compare": compare(model, reference), "finished": [s.finished for s in schedulers],
            "modes": [getattr(model, n).weight._local_tensor.mode.value for n in LAYERS],
            "same_across_ranks": all(m == everyone[0] for m in everyone)}


def scenario_qresu(rank):
    """Sharded QRESU shards (codes, scales, θ) of the conv and Conv1D train like the single-process run."""
    model, reference = shard(gap_net()), gap_net()
    for m in (model, reference):
        rt.prune_(m, 0.5)
        rt.enter_resu_(m, epsilon=0.5, quantize_bits=8, group_size=None, generator=torch.Generator().manual_seed(5))
    optimizer, reference_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference))
    frozen = {n: getattr(model, n).weight._local_tensor.qdata.clone() for n in LAYERS}
    train(model, optimizer, reference, reference_optimizer, rank, steps=3)
    return {"compare": compare(model, reference),
            "modes": [getattr(model, n).weight._local_tensor.mode.value for n in LAYERS],
            "codes_kept": all(torch.equal(frozen[n], getattr(model, n).weight._local_tensor.qdata) for n in LAYERS)}


def scenario_conv1d_default_placement_refused(rank):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    try:
        fully_shard(gap_net().proj, mesh=init_device_mesh(DEVICE, (WORLD,)))
    except NotImplementedError as error:
        return {"error": str(error)}
    return {"error": None}


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in list(globals().items()) if name.startswith("scenario_")}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_ranks.run(__name__, tmp_path_factory.mktemp("layer_gaps"), "cpu")


def _check_compare(result: dict, atol: float = 2e-6):
    for name, (diff, same_mask, same_shape) in result.items():
        assert same_mask and same_shape and diff < atol, (name, diff, same_mask, same_shape)


def test_fsdp2_shards_conv_and_conv1d_and_matches_single_process(ranks):
    for rank, result in enumerate(two_ranks.results(ranks, "lifecycle")):
        # conv: 7 out-channels split 4 + 3 (N-D shards); Conv1D (in 7, out 8): Shard(1), 4 columns each
        assert result["shapes"]["conv"] == ((4, WIDTH, 3, 1) if rank == 0 else (3, WIDTH, 3, 1), "S(0)")
        assert result["shapes"]["proj"] == ((CHANNELS, 4), "S(1)")
        assert result["shapes"]["embed"] == ((VOCAB // 2, WIDTH), "S(0)")
        assert result["norm_layers"] == ["conv", "embed", "proj"] and result["norm_diff"] < 1e-5
        for stage in ("pruned", "resu", "committed"):
            _check_compare(result[stage])
        assert result["out_diff"] < 2e-6 and result["tied"]
        assert result["plain"] == ["Tensor"] and result["dense_diff"] < 2e-6 and max(result["trained_diff"].values()) < 2e-6, result["trained_diff"]


def test_fsdp2_scheduler_on_conv_and_conv1d_matches_single_process(ranks):
    for result in two_ranks.results(ranks, "scheduler"):
        _check_compare(result["compare"])
        assert result["finished"] == [True, True] and result["same_across_ranks"]


def test_fsdp2_qresu_conv_and_conv1d_shards_match_single_process(ranks):
    for result in two_ranks.results(ranks, "qresu"):
        _check_compare(result["compare"])
        assert result["modes"] == ["qresu"] * 3 and result["codes_kept"]


def test_fsdp2_default_placement_of_a_conv1d_weight_is_refused(ranks):
    for result in two_ranks.results(ranks, "conv1d_default_placement_refused"):
        assert result["error"] is not None and "shard_placement" in result["error"]


# ------------------------------------------------------------------------------ row blocks (one process)
@pytest.mark.parametrize("mode", ["sparse", "resu", "qresu"])
def test_row_blocks_of_conv_and_transposed_weights(mode):
    torch.manual_seed(1)
    for dense, transposed, dim in ((torch.randn(6, 3, 3, 3), False, 0), (torch.randn(12, 6), True, 1)):
        w = rt.ResuTensor.from_dense(dense, 0.5, transposed=transposed)
        if mode != "sparse":
            w.enter_resu(epsilon=0.3, generator=torch.Generator().manual_seed(0),
                         **({"quantize_bits": 8, "group_size": None} if mode == "qresu" else {}))
        blocks = torch.chunk(w, 2, dim=dim)
        assert all(isinstance(b, rt.ResuTensor) and b.mode == w.mode for b in blocks)
        assert torch.equal(torch.cat([b.dequantize() for b in blocks], dim=dim), w.dequantize())
        assert torch.equal(torch.cat([b.mask() for b in blocks], dim=dim), w.mask())
        part = slice_rows(w, 1, 4)
        expected = w.dequantize()[1:4] if dim == 0 else w.dequantize()[:, 1:4]
        assert torch.equal(part.dequantize(), expected)


# ------------------------------------------------------------------------------ Wanda norms (one process)
def test_embedding_wanda_score_is_weight_times_sqrt_token_count():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3))
    quantize_(model, rt.resu_config(), filter_fn=rt.is_supported_module)
    batches = [torch.randint(0, 10, (3, 5)), torch.randint(0, 10, (2, 4))]
    norms = rt.calibrate(model, batches)
    counts = torch.bincount(torch.cat([b.reshape(-1) for b in batches]), minlength=10).float()
    assert torch.equal(norms["0"], counts.sqrt()[:, None].expand(10, 4))
    weight = model[0].weight.dequantize()
    rt.prune_(model, 0.5, method="wanda", calibration=norms)
    expected = rt.ResuTensor.from_dense(weight).prune(0.5, scores=weight.abs() * counts.sqrt()[:, None])
    assert torch.equal(model[0].weight.mask(), expected.mask())


def _heads_output(query, key, value, w_in, b_in, heads):
    """Reference multi-head attention before the output projection (seq-first inputs)."""
    e = query.shape[-1]
    q, k, v = (F.linear(x, w, b) for x, w, b in zip((query, key, value), w_in.split(e), b_in.split(e)))

    def split(t):  # (L, N, E) → (N, heads, L, E/heads)
        return t.reshape(t.shape[0], t.shape[1], heads, e // heads).permute(1, 2, 0, 3)

    attention = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(e // heads), dim=-1)
    return (attention @ split(v)).permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], e)


def test_attention_wanda_norms_per_query_key_value_block():
    torch.manual_seed(3)
    mha = nn.MultiheadAttention(8, 2)
    quantize_(nn.Sequential(mha), rt.resu_config(sparsity=0.3), filter_fn=rt.is_supported_module)

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, q, kv):
            return self.attn(q, kv, kv * 2, need_weights=False)[0]

    model = Cross()
    query, memory = torch.randn(5, 2, 8), torch.randn(4, 2, 8)
    norms = rt.calibrate(model, [(query, memory)])
    column = lambda x: x.reshape(-1, 8).pow(2).sum(0).sqrt()  # noqa: E731
    expected = torch.cat([column(x).expand(8, 8) for x in (query, memory, memory * 2)])
    torch.testing.assert_close(norms["attn.in_proj_weight"], expected)
    heads = _heads_output(query, memory, memory * 2, mha.in_proj_weight.dequantize(), mha.in_proj_bias.detach(), 2)
    torch.testing.assert_close(norms["attn.out_proj"], column(heads), rtol=1e-5, atol=1e-6)
    rt.prune_(model, 0.5, method="wanda", calibration=norms)
    assert abs(mha.in_proj_weight.sparsity - 0.5) < 0.05


def _cell(kind, x, h, c, w_ih, w_hh, b_ih, b_hh, w_hr=None):
    gates = F.linear(x, w_ih, b_ih) + F.linear(h, w_hh, b_hh)
    if kind == "rnn":
        return torch.tanh(gates), None
    if kind == "gru":
        r, z, _ = F.linear(x, w_ih, b_ih).chunk(3, -1)
        hr, hz, hn = F.linear(h, w_hh, b_hh).chunk(3, -1)
        r, z = torch.sigmoid(r + hr), torch.sigmoid(z + hz)
        n = torch.tanh(F.linear(x, w_ih, b_ih).chunk(3, -1)[2] + r * hn)
        return (1 - z) * n + z * h, None
    i, f, g, o = gates.chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c


def _reference_recurrent_norms(rnn, kind, x, h0, c0):
    """‖input‖ per column of every weight, by running each layer and direction step by step and
    recording what each weight multiplies (seq-first x)."""
    weights = {n: (p.dequantize() if isinstance(p, rt.ResuTensor) else p.detach()) for n, p in rnn.named_parameters()}
    directions = 2 if rnn.bidirectional else 1
    seen = {}
    layer_input = x
    for layer in range(rnn.num_layers):
        outputs = []
        for d, suffix in enumerate(["", "_reverse"][:directions]):
            w = {part: weights.get(f"{part}_l{layer}{suffix}") for part in ("weight_ih", "weight_hh", "bias_ih",
                                                                           "bias_hh", "weight_hr")}
            h = h0[layer * directions + d]
            c = c0[layer * directions + d] if c0 is not None else None
            steps = range(x.shape[0]) if d == 0 else reversed(range(x.shape[0]))
            out = [None] * x.shape[0]
            for t in steps:
                seen.setdefault(f"weight_ih_l{layer}{suffix}", []).append(layer_input[t])
                seen.setdefault(f"weight_hh_l{layer}{suffix}", []).append(h)
                h, c = _cell(kind, layer_input[t], h, c, w["weight_ih"], w["weight_hh"], w["bias_ih"], w["bias_hh"],
                             w["weight_hr"])
                out[t] = h
            outputs.append(torch.stack(out))
        layer_input = torch.cat(outputs, -1)
    return {n: torch.cat([v.reshape(-1, v.shape[-1]) for v in vs]).pow(2).sum(0).sqrt() for n, vs in seen.items()}


@pytest.mark.parametrize("kind,options", [("lstm", dict(bidirectional=True, batch_first=True)),
                                          ("lstm", dict(proj_size=3)), ("gru", dict(bidirectional=True)),
                                          ("rnn", dict())])
def test_recurrent_wanda_norms_match_a_step_by_step_reference(kind, options):
    torch.manual_seed(4)
    cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[kind]
    rnn = cls(5, 4, num_layers=2, **options)
    quantize_(nn.Sequential(rnn), rt.resu_config(sparsity=0.3), filter_fn=rt.is_supported_module)
    directions = 2 if rnn.bidirectional else 1
    h_size = options.get("proj_size") or 4
    x = torch.randn(6, 3, 5)
    h0 = torch.randn(2 * directions, 3, h_size)
    c0 = torch.randn(2 * directions, 3, 4) if kind == "lstm" else None

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = rnn

        def forward(self, x):
            inputs = x.transpose(0, 1) if rnn.batch_first else x
            return self.rnn(inputs, (h0, c0) if c0 is not None else h0)[0]

    model = Holder()
    norms = rt.calibrate(model, [x])
    expected = _reference_recurrent_norms(rnn, kind, x, h0, c0)
    assert sorted(norms) == sorted(f"rnn.{n}" for n in expected if not n.startswith("weight_hr"))
    for name, value in expected.items():
        torch.testing.assert_close(norms[f"rnn.{name}"], value, rtol=1e-5, atol=1e-6, msg=name)
    rt.prune_(model, 0.5, method="wanda", calibration=norms)
    assert all(abs(w.sparsity - 0.5) < 0.1 for _, _, w in rt.resu_weights(model))


def test_recurrent_wanda_refuses_packed_sequences():
    rnn = nn.GRU(3, 2)
    quantize_(nn.Sequential(rnn), rt.resu_config(), filter_fn=rt.is_supported_module)
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(4, 2, 3), torch.tensor([4, 2]))
    with pytest.raises(ValueError, match="PackedSequence"):
        rt.calibrate(nn.Sequential(rnn), [[packed]])  # a PackedSequence is a tuple: one argument

"""Layer types at the model level: every module type of the table (training/modules.py) converted
by ``quantize_(..., filter_fn=rt.is_supported_module)`` computes what the same model with dense
masked weights computes (output, input gradient, weight gradient at trainable coordinates), trains
only its trainable coordinates, goes through prune → RESU → commit and a ResuScheduler run,
exports to plain Parameters and survives torch.save/load. Tied weights stay one Parameter."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
import two_ranks
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.training.filters import resu_parameters

torch.set_num_threads(1)


class TiedLM(nn.Module):
    """Embedding → LSTM-free mixer → head whose weight is the embedding's (tie_word_embeddings)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(12, 6)
        self.mix = nn.Linear(6, 6)
        self.head = nn.Linear(6, 12, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


class Attention(nn.Module):
    def __init__(self, batch_first: bool, separate_kv: bool = False):
        super().__init__()
        extra = dict(kdim=5, vdim=3) if separate_kv else {}
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **extra)
        self.separate_kv = separate_kv

    def forward(self, q, k, v):
        out, weights = self.attn(q, k, v, need_weights=True)
        return out * 1.0 + weights.sum() * 0.1


class Recurrent(nn.Module):
    def __init__(self, cls, **options):
        super().__init__()
        self.rnn = cls(5, 6, **options)

    def forward(self, x):
        return self.rnn(x)[0]


def _floats(*shape):
    return torch.randn(*shape)


# name: (model builder, inputs builder, does the input take a gradient)
CASES = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4)), lambda: [_floats(3, 6)]),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv1d(4, 2, 2)),
               lambda: [_floats(2, 3, 7)]),
    "conv2d": (lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, groups=2)),
               lambda: [_floats(2, 4, 6, 6)]),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2), lambda: [_floats(1, 2, 4, 4, 4)]),
    "embedding": (lambda: nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 3)), lambda: [torch.randint(0, 10, (3, 4))]),
    "tied": (TiedLM, lambda: [torch.randint(0, 12, (3, 4))]),
    "mha_batch_first": (lambda: Attention(batch_first=True), lambda: [_floats(2, 5, 8), _floats(2, 4, 8), _floats(2, 4, 8)]),
    "mha_seq_first": (lambda: Attention(batch_first=False), lambda: [_floats(5, 2, 8), _floats(4, 2, 8), _floats(4, 2, 8)]),
    "mha_kdim": (lambda: Attention(batch_first=False, separate_kv=True),
                 lambda: [_floats(5, 2, 8), _floats(4, 2, 5), _floats(4, 2, 3)]),
    "lstm": (lambda: Recurrent(nn.LSTM, num_layers=2, bidirectional=True, batch_first=True), lambda: [_floats(2, 4, 5)]),
    "gru": (lambda: Recurrent(nn.GRU, num_layers=2, bidirectional=True), lambda: [_floats(4, 2, 5)]),
    "rnn": (lambda: Recurrent(nn.RNN, num_layers=2), lambda: [_floats(4, 2, 5)]),
}

# ResuTensor parameter names (named_parameters, ties once) each case must have.
EXPECTED = {
    "linear": ["0.weight", "2.weight"],
    "conv1d": ["0.weight", "2.weight"],
    "conv2d": ["0.weight", "2.weight"],
    "conv3d": ["weight"],
    "embedding": ["0.weight", "1.weight"],
    "tied": ["embed.weight", "mix.weight"],
    "mha_batch_first": ["attn.in_proj_weight", "attn.out_proj.weight"],
    "mha_seq_first": ["attn.in_proj_weight", "attn.out_proj.weight"],
    "mha_kdim": ["attn.q_proj_weight", "attn.k_proj_weight", "attn.v_proj_weight", "attn.out_proj.weight"],
    "lstm": [f"rnn.weight_{kind}_l{k}{suffix}" for k in range(2) for suffix in ("", "_reverse") for kind in ("ih", "hh")],
    "gru": [f"rnn.weight_{kind}_l{k}{suffix}" for k in range(2) for suffix in ("", "_reverse") for kind in ("ih", "hh")],
    "rnn": [f"rnn.weight_{kind}_l{k}" for k in range(2) for kind in ("ih", "hh")],
}


def build(case: str, sparsity: float = 0.5, seed: int = 0):
    """(converted model, dense reference holding the converted model's W_eff, inputs)."""
    make_model, make_inputs = CASES[case]
    torch.manual_seed(seed)
    model = make_model()
    inputs = make_inputs()
    quantize_(model, rt.resu_config(sparsity=sparsity), filter_fn=rt.is_supported_module)
    reference = dense_copy(model)
    return model, reference, inputs


def dense_copy(model: nn.Module) -> nn.Module:
    """The model with every ResuTensor replaced by a plain Parameter of its W_eff (ties kept)."""
    reference = copy.deepcopy(model)
    for name, param in list(reference.named_parameters()):
        if isinstance(param, rt.ResuTensor):
            owner_name, _, attr = name.rpartition(".")
            owner = reference.get_submodule(owner_name)
            plain = nn.Parameter(param.dequantize().detach().clone())
            for module in reference.modules():  # every owner of a tied weight
                for n, p in list(module._parameters.items()):
                    if p is param:
                        setattr(module, n, plain)
            assert getattr(owner, attr) is plain
    return reference


def resu_names(model):
    return [name for name, p in model.named_parameters() if isinstance(p, rt.ResuTensor)]


def run(model, inputs):
    inputs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out = model(*inputs)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    return out.detach(), [x.grad for x in inputs if x.is_floating_point()]


def test_is_supported_module_table():
    supported = [nn.Linear(2, 3), nn.Conv1d(2, 3, 1), nn.Conv2d(2, 3, 1), nn.Conv3d(2, 3, 1), nn.Embedding(4, 2),
                 nn.MultiheadAttention(4, 2), nn.LSTM(2, 3), nn.GRU(2, 3), nn.RNN(2, 3),
                 nn.MultiheadAttention(4, 2).out_proj]
    for module in supported:
        assert rt.is_supported_module(module, "x"), type(module).__name__
    for module in (nn.LayerNorm(3), nn.ConvTranspose2d(2, 3, 1), nn.Sequential(nn.Linear(2, 2)), nn.ReLU()):
        assert not rt.is_supported_module(module, "x"), type(module).__name__


@pytest.mark.parametrize("case", list(CASES))
def test_forward_and_gradients_equal_dense_masked_model(case):
    model, reference, inputs = build(case)
    assert resu_names(model) == EXPECTED[case]
    out, input_grads = run(model, inputs)
    ref_out, ref_input_grads = run(reference, inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for grad, ref_grad in zip(input_grads, ref_input_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    ref_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        ref_grad = ref_params[name].grad
        if isinstance(param, rt.ResuTensor):
            assert isinstance(param.grad, rt.CompactTensor), name
            expected = torch.where(param.mask(), ref_grad, torch.zeros_like(ref_grad))  # SPARSE: active coords train
            torch.testing.assert_close(param.grad.dequantize(), expected, rtol=1e-5, atol=1e-6)
        else:
            torch.testing.assert_close(param.grad, ref_grad, rtol=1e-5, atol=1e-6)


def _adamw_steps(model, inputs, steps: int = 3):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(steps):
        optimizer.zero_grad()
        out = model(*inputs)
        (out.float() ** 2).mean().backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("case", list(CASES))
def test_adamw_moves_only_trainable_coordinates(case):
    model, _, inputs = build(case)
    before = {name: p.dequantize().clone() for name, p in model.named_parameters() if isinstance(p, rt.ResuTensor)}
    _adamw_steps(model, inputs)
    for name, p in model.named_parameters():
        if isinstance(p, rt.ResuTensor):  # SPARSE: pruned coordinates stay exactly 0, active ones moved
            after = p.dequantize()
            assert torch.equal(after[~p.mask()], before[name][~p.mask()]), name
            assert not torch.equal(after[p.mask()], before[name][p.mask()]), name
    rt.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(1))
    frozen = {name: p.dequantize()[p.mask()].clone() for name, p in model.named_parameters()
              if isinstance(p, rt.ResuTensor)}
    _adamw_steps(model, inputs)
    for name, p in model.named_parameters():
        if isinstance(p, rt.ResuTensor):  # RESU: active coordinates frozen bit-identical, θ trained
            assert p.mode == rt.Mode.RESU
            assert torch.equal(p.dequantize()[p.mask()], frozen[name]), name


@pytest.mark.parametrize("case", list(CASES))
def test_prune_resu_commit_cycle_then_export_and_save(case, tmp_path):
    model, _, inputs = build(case, sparsity=0.0)
    rt.prune_(model, 0.5)
    layers = [name for name, _, _ in rt.resu_weights(model)]
    assert len(layers) == len(EXPECTED[case])  # a tied weight once
    for _, _, weight in rt.resu_weights(model):
        assert weight.mode == rt.Mode.SPARSE and abs(weight.sparsity - 0.5) < 0.05
    rt.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    _adamw_steps(model, inputs, steps=2)
    stats = rt.commit_(model, strategy="amnesty")
    assert sorted(stats) == sorted(layers)
    assert all(w.mode == rt.Mode.SPARSE for _, _, w in rt.resu_weights(model))

    buffer = io.BytesIO()
    torch.save(model, buffer)
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    for (name, a), (_, b) in zip(model.named_parameters(), loaded.named_parameters()):
        assert type(a) is type(b), name
        if isinstance(a, rt.ResuTensor):
            assert a.mode == b.mode and torch.equal(a.mask(), b.mask()), name
        assert torch.equal(a.dequantize() if isinstance(a, rt.ResuTensor) else a,
                           b.dequantize() if isinstance(b, rt.ResuTensor) else b), name
    model.eval()
    expected = model(*inputs).detach()
    assert torch.equal(loaded.eval()(*inputs), expected)

    rt.to_dense_(model)
    assert not any(isinstance(p, rt.ResuTensor) for p in model.parameters())
    assert all(type(p) is nn.Parameter for p in model.parameters())
    torch.testing.assert_close(model(*inputs), expected, rtol=1e-5, atol=1e-6)
    if case == "tied":
        assert model.head.weight is model.embed.weight


@pytest.mark.parametrize("case", ["conv2d", "tied", "mha_batch_first", "lstm"])
def test_resu_scheduler_short_run(case):
    model, _, inputs = build(case, sparsity=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    config = rt.ScheduleConfig(steps_per_cycle=10, num_cycles=2, sparsity=0.5, stabilize_fraction=0.2,
                               resu_fraction=0.3, progress=False)
    scheduler = rt.ResuScheduler(model, optimizer, config)
    modes = set()
    for _ in range(20):
        optimizer.zero_grad()
        loss = (model(*inputs).float() ** 2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step(loss)
        modes |= {w.mode for _, _, w in rt.resu_weights(model)}
    assert scheduler.finished
    assert {rt.Mode.SPARSE, rt.Mode.RESU} <= modes
    for _, _, weight in rt.resu_weights(model):
        assert weight.mode == rt.Mode.SPARSE and abs(weight.sparsity - 0.5) < 0.05


# ------------------------------------------------------------------------------ tied weights
def test_tied_weight_is_one_resu_parameter_visited_once():
    model, _, inputs = build("tied")
    assert model.head.weight is model.embed.weight and isinstance(model.head.weight, rt.ResuTensor)
    assert [p.name for p in resu_parameters(model)] == ["embed", "mix"]
    # chosen through either owner, still once
    assert [n for n, _, _ in rt.resu_weights(model, lambda m, n: n == "head")] == ["head"]
    sparsity = model.embed.weight.sparsity
    rt.prune_(model, 0.5)  # a tied weight pruned twice would reach 0.75
    assert abs(model.embed.weight.sparsity - sparsity) < 0.05
    report = rt.memory_report(model)
    assert [row.name for row in report.layers if row.mode != "plain"] == ["embed.weight", "mix.weight"]


def test_tie_across_quantize_calls_is_refused():
    model = TiedLM()
    quantize_(model, rt.resu_config(), filter_fn=lambda m, n: n == "embed")
    with pytest.raises(ValueError, match="tied to a parameter an earlier quantize_ call converted"):
        quantize_(model, rt.resu_config(), filter_fn=lambda m, n: n == "head")


def test_two_names_of_one_parameter_in_one_module():
    module = nn.Linear(4, 4)
    module.register_parameter("alias", module.weight)
    quantize_(module, rt.resu_config(sparsity=0.5), filter_fn=rt.is_supported_module)
    assert module.alias is module.weight and isinstance(module.weight, rt.ResuTensor)


def test_quantize_twice_and_unsupported_root_raise():
    model = nn.Sequential(nn.Linear(3, 3))
    quantize_(model, rt.resu_config(), filter_fn=rt.is_supported_module)
    with pytest.raises(ValueError, match="already a ResuTensor"):
        quantize_(model, rt.resu_config(), filter_fn=rt.is_supported_module)
    with pytest.raises(TypeError, match="holds no supported layer"):
        quantize_(nn.Sequential(nn.LayerNorm(3)), rt.resu_config(), filter_fn=lambda m, n: True)


def test_rnn_forward_reads_the_resu_parameters():
    """nn.LSTM runs over its cached _flat_weights: they must be the ResuTensors after conversion."""
    model, _, _ = build("lstm")
    lstm = model.rnn
    assert all(w is getattr(lstm, n) for w, n in zip(lstm._flat_weights, lstm._flat_weights_names))
    rt.prune_(model, 0.8)  # in place: the flat weights see the new mask
    x = torch.randn(2, 4, 5)
    torch.testing.assert_close(model(x), dense_copy(model)(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", list(CASES))
def test_wanda_prunes_every_layer_type(case):
    model, _, inputs = build(case, sparsity=0.0)
    norms = rt.calibrate(model, [inputs])
    assert sorted(norms) == sorted(name for name, _, _ in rt.resu_weights(model))
    rt.prune_(model, 0.5, method="wanda", calibration=norms)
    assert all(abs(w.sparsity - 0.5) < 0.05 for _, _, w in rt.resu_weights(model))


def test_wanda_on_convolutions_prunes():
    model, _, inputs = build("conv2d", sparsity=0.0)
    rt.prune_(model, 0.5, method="wanda", calibration=[inputs])
    assert all(abs(w.sparsity - 0.5) < 0.05 for _, _, w in rt.resu_weights(model))


# ------------------------------------------------------------------------------ transformers GPT-2
def test_gpt2_conv1d_projections_and_tied_head(tmp_path):
    transformers = pytest.importorskip("transformers")
    from resu_tensor.integrations import hf

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)
    model = transformers.GPT2LMHeadModel(config).eval()
    reference_dense = copy.deepcopy(model)
    hf.quantize_hf_(model, rt.resu_config(sparsity=0.5))
    assert model.lm_head.weight is model.transformer.wte.weight
    c_attn = model.transformer.h[0].attn.c_attn
    assert isinstance(c_attn.weight, rt.ResuTensor) and tuple(c_attn.weight.shape) == (32, 96)
    names = [n for n, _, _ in rt.resu_weights(model)]
    assert names == ["transformer.wte", "transformer.wpe"] + [
        f"transformer.h.{i}.{part}" for i in range(2) for part in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    ids = torch.randint(0, 100, (2, 7))
    reference = dense_copy(model)
    torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)
    # the dense masked weights are the original ones with zeros at the pruned coordinates
    original = reference_dense.transformer.h[0].attn.c_attn.weight
    assert torch.equal(c_attn.weight.dequantize(), torch.where(c_attn.weight.mask(), original, 0))
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    F.cross_entropy(model(ids).logits.flatten(0, 1), ids.flatten()).backward()
    optimizer.step()
    model.save_pretrained(tmp_path)
    loaded = hf.from_resu_pretrained(transformers.GPT2LMHeadModel, tmp_path).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    assert torch.equal(loaded(ids).logits, model.eval()(ids).logits)


# ------------------------------------------------------------------------------ DDP and FSDP2 (2 CPU ranks)
# Each scenario runs on both ranks (two_ranks.run spawns this module); the tests check what they measured.

WORLD = two_ranks.WORLD
DEVICE = "cpu"  # set by each worker
VOCAB, WIDTH, PER_RANK, TOKENS = 16, 8, 3, 5


class ConvTiedNet(nn.Module):
    """An Embedding, a Conv1d over the sequence and a head tied to the embedding."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.conv = nn.Conv1d(WIDTH, WIDTH, 3, padding=1)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        hidden = torch.tanh(self.conv(self.embed(ids).transpose(1, 2))).transpose(1, 2)
        return self.head(hidden)


def conv_tied_net(seed: int, filter_fn=rt.is_supported_module) -> ConvTiedNet:
    torch.manual_seed(seed)
    model = ConvTiedNet().to(DEVICE)
    quantize_(model, rt.resu_config(sparsity=0.5), filter_fn=filter_fn)
    return model


def token_batch(step: int):
    generator = torch.Generator().manual_seed(step)
    ids = torch.randint(0, VOCAB, (WORLD * PER_RANK, TOKENS + 1), generator=generator).to(DEVICE)
    return ids[:, :-1], ids[:, 1:]


def lm_loss(model, ids, targets):
    return F.cross_entropy(model(ids).flatten(0, 1), targets.flatten())


def train_against_reference(model, reference, rank, steps, first_step=0):
    optimizer, reference_optimizer = (torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, reference))
    rows = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for step in range(first_step, first_step + steps):
        ids, targets = token_batch(step)
        for m, o, (x, y) in ((model, optimizer, (ids[rows], targets[rows])), (reference, reference_optimizer, (ids, targets))):
            o.zero_grad()
            lm_loss(m, x, y).backward()
            o.step()


def effective(p) -> torch.Tensor:
    return p.dequantize() if isinstance(p, rt.ResuTensor) else p.detach()


def scenario_ddp_conv_embedding_tied(rank):
    from resu_tensor import distributed as rtd
    from torch.nn.parallel import DistributedDataParallel

    model = conv_tied_net(seed=rank)  # rank 1 starts elsewhere: prepare_ddp broadcasts rank 0's state
    rtd.prepare_ddp(model)
    ddp = DistributedDataParallel(model)
    reference = conv_tied_net(seed=0)
    train_against_reference(ddp, reference, rank, steps=3)
    rt.enter_resu_(model, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    rt.enter_resu_(reference, epsilon=0.5, generator=torch.Generator().manual_seed(0))
    train_against_reference(ddp, reference, rank, steps=3, first_step=3)
    rtd.check_replicas(model)
    reference_params = dict(reference.named_parameters())
    return {"diffs": {n: (effective(p) - effective(reference_params[n])).abs().max().item()
                      for n, p in model.named_parameters()},
            "tied": model.head.weight is model.embed.weight,
            "layers": [n for n, _, _ in rt.resu_weights(model)],
            "modes": [w.mode.value for _, _, w in rt.resu_weights(model)]}


def scenario_fsdp_conv_embedding_tied(rank):
    from resu_tensor import fsdp as rtf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = conv_tied_net(seed=0)  # the conv's N-D ResuTensor is sharded by out-channels
    reference = conv_tied_net(seed=0)
    fully_shard(model, mesh=init_device_mesh(DEVICE, (WORLD,)))
    sharded = [w.fqn for w in rtf.sharded_weights(model)]
    train_against_reference(model, reference, rank, steps=2)
    rt.prune_(model, 0.75)
    rt.prune_(reference, 0.75)
    train_against_reference(model, reference, rank, steps=2, first_step=2)
    result = {"sharded": sharded, "tied": model.head.weight is model.embed.weight}
    for name in ("embed", "conv"):
        full, expected = rtf.full_tensor(getattr(model, name).weight), getattr(reference, name).weight
        result[name] = {"diff": (full.dequantize() - expected.dequantize()).abs().max().item(),
                        "same_mask": torch.equal(full.mask(), expected.mask()), "sparsity": full.sparsity}
    return result


SCENARIOS = {name[len("scenario_"):]: fn for name, fn in list(globals().items()) if name.startswith("scenario_")}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return two_ranks.run(__name__, tmp_path_factory.mktemp("layer_modules"), "cpu")


def test_ddp_conv_embedding_and_tied_weight_match_single_process(ranks):
    for result in two_ranks.results(ranks, "ddp_conv_embedding_tied"):
        assert result["tied"] and result["layers"] == ["embed", "conv"]
        assert result["modes"] == ["resu", "resu"]
        assert max(result["diffs"].values()) < 2e-6, result["diffs"]


def test_fsdp2_conv_embedding_and_tied_weight_match_single_process(ranks):
    for result in two_ranks.results(ranks, "fsdp_conv_embedding_tied"):
        assert result["sharded"] == ["embed.weight", "conv.weight"] and result["tied"]
        for name in ("embed", "conv"):
            assert result[name]["same_mask"] and abs(result[name]["sparsity"] - 0.75) < 0.05, (name, result[name])
            assert result[name]["diff"] < 2e-6, (name, result[name])


def test_package_import_leaves_transformers_unimported():
    import subprocess
    import sys

    code = "import sys, resu_tensor as rt, torch.nn as nn; rt.is_supported_module(nn.Linear(2, 2)); " \
           "print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False"


@pytest.mark.parametrize("case", list(CASES))
def test_qresu_and_safetensors_round_trip(case, tmp_path):
    from resu_tensor.integrations import load_resu_safetensors, save_resu_safetensors

    model, _, inputs = build(case)
    rt.enter_resu_(model, quantize_bits=8, group_size=None, generator=torch.Generator().manual_seed(0))
    assert all(w.mode == rt.Mode.QRESU for _, _, w in rt.resu_weights(model))
    out, _ = run(model, inputs)
    torch.testing.assert_close(out, run(dense_copy(model), inputs)[0], rtol=1e-5, atol=1e-6)
    save_resu_safetensors(model, tmp_path / "m.safetensors")
    fresh, _, _ = build(case, seed=1)  # other weights and masks: the file replaces them all
    load_resu_safetensors(fresh, tmp_path / "m.safetensors")
    for (name, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        if isinstance(a, rt.ResuTensor):
            assert b.mode == a.mode and torch.equal(a.mask(), b.mask()) and torch.equal(a.dequantize(), b.dequantize())
        else:
            assert torch.equal(a, b), name
    if case == "tied":
        assert fresh.head.weight is fresh.embed.weight

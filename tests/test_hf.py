"""Checkpoints (safetensors, save_pretrained / from_pretrained) and transformers.Trainer training.

The safetensors tests need only ``safetensors``; the Hugging Face ones need the ``hf`` extra and
build tiny Llama models from a config (nothing is downloaded).
"""
import copy
import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt

pytest.importorskip("safetensors")
import safetensors.torch  # noqa: E402
from resu_tensor.integrations import (enable_flat_state_dict, load_resu_safetensors,  # noqa: E402
                                      save_resu_safetensors)
from resu_tensor.integrations.safetensors_io import META, flatten_state_dict  # noqa: E402
from resu_asserts import assert_same_state  # noqa: E402


def assert_same_resu_state(a: rt.ResuTensor, b: rt.ResuTensor) -> None:
    """:func:`assert_same_state`, and the same mode, mask and dense weight."""
    assert_same_state(a, b)
    assert a.mode == b.mode and torch.equal(a.mask(), b.mask()) and torch.equal(a.dequantize(), b.dequantize())


def assert_same_models(a: nn.Module, b: nn.Module) -> None:
    weights_a, weights_b = list(rt.resu_weights(a)), list(rt.resu_weights(b))
    assert [n for n, _, _ in weights_a] == [n for n, _, _ in weights_b] and weights_a
    for (_, _, wa), (_, _, wb) in zip(weights_a, weights_b):
        assert_same_resu_state(wa, wb)
    plain_a = {k: v for k, v in a.named_parameters() if not isinstance(v, rt.ResuTensor)}
    plain_b = {k: v for k, v in b.named_parameters() if not isinstance(v, rt.ResuTensor)}
    assert plain_a.keys() == plain_b.keys()
    assert all(torch.equal(plain_a[k], plain_b[k]) for k in plain_a)


# ------------------------------------------------------------------------------ safetensors files
def mixed_model(seed: int = 0, width: int = 48) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[nn.Linear(40 if i == 0 else width, width) for i in range(8)], nn.Linear(width, 5))


def put_every_mode(model: nn.Sequential) -> None:
    """One layer in each storage form: dense, sparse (bitmap / indices), RESU, RESU-Selective,
    static subset, QRESU 4-bit and 8-bit, 2:4."""
    quantize_(model, rt.resu_config(sparsity=0.0))
    w = [layer.weight for layer in model if isinstance(layer, nn.Linear)]
    w[1].prune(0.6)
    w[2].prune(0.995)  # active_indices
    w[3].prune(0.5)
    w[3].enter_resu()
    w[4].prune(0.7)
    w[4].enter_resu(selective=rt.SelectiveConfig())
    w[4].selective_m.normal_()
    w[4].selective_v.uniform_()
    w[5].prune(0.5)
    w[5].enter_resu(selective=rt.StaticSubsetConfig(alpha=0.3), generator=torch.Generator().manual_seed(1))
    w[6].prune(0.5)
    w[6].enter_resu(quantize_bits=4, group_size=16)
    w[7].prune(0.6)
    w[7].enter_resu(quantize_bits=8, group_size=None, track_gradients=True)
    w[7].grad_abs_sum.uniform_()
    w[8].prune(None, granularity="2:4")
    modes = [x.mode.value for x in w]
    assert modes == ["dense", "sparse", "sparse", "resu", "resu", "resu", "qresu", "qresu", "sparse"]
    assert w[2].mask_kind == "active_indices" and w[1].mask_kind == "bitmap" and w[8].nm_pattern == (2, 4)


def test_safetensors_round_trip_every_mode_exactly(tmp_path):
    model = mixed_model()
    put_every_mode(model)
    path = tmp_path / "model.safetensors"
    save_resu_safetensors(model, path)
    fresh = mixed_model(seed=1)
    quantize_(fresh, rt.resu_config(sparsity=0.3))  # any config: the whole state is replaced
    load_resu_safetensors(fresh, path)
    assert_same_models(model, fresh)
    x = torch.randn(3, 40)
    assert torch.equal(model(x), fresh(x))
    # the restored model keeps training like the original: same trainable sets, same updates
    for m in (model, fresh):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        F.mse_loss(m(x), torch.ones(3, 5)).backward()
        opt.step()
    assert_same_models(model, fresh)


def test_file_holds_only_plain_tensors_and_dense_loaders_see_effective_weights(tmp_path):
    model = mixed_model()
    put_every_mode(model)
    save_resu_safetensors(model, tmp_path / "m.safetensors")
    entries = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert all(type(t) is torch.Tensor for t in entries.values())
    for name, layer in model.named_children():
        if isinstance(layer, nn.Linear):
            assert torch.equal(entries[f"{name}.weight"], layer.weight.dequantize())  # W_eff under the usual key
            assert f"{name}.weight{META}" in entries
    plain = mixed_model(seed=3)
    plain.load_state_dict({k: v for k, v in entries.items() if ".resu." not in k})  # a dense model loads it
    x = torch.randn(2, 40)
    torch.testing.assert_close(plain(x), model(x))


def test_flat_state_dict_hooks_round_trip(tmp_path):
    model = mixed_model()
    put_every_mode(model)
    enable_flat_state_dict(model)
    enable_flat_state_dict(model)  # idempotent
    state = model.state_dict()
    assert all(type(t) is torch.Tensor for t in state.values())
    safetensors.torch.save_file(state, tmp_path / "s.safetensors")
    fresh = mixed_model(seed=2)
    quantize_(fresh, rt.resu_config())
    enable_flat_state_dict(fresh)
    fresh.load_state_dict(safetensors.torch.load_file(tmp_path / "s.safetensors"))
    assert_same_models(model, fresh)
    copy.deepcopy(fresh)  # hooks keep the model copyable


def test_tied_weights_are_stored_once(tmp_path):
    torch.manual_seed(0)
    shared = nn.Linear(16, 16)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Linear(16, 4))
    quantize_(model, rt.resu_config(sparsity=0.5))
    assert model[0].weight is model[2].weight
    save_resu_safetensors(model, tmp_path / "t.safetensors")
    keys = safetensors.safe_open(str(tmp_path / "t.safetensors"), "pt").keys()
    assert "0.weight" in keys and "2.weight" not in keys and "2.bias" not in keys
    fresh = nn.Sequential(shared2 := nn.Linear(16, 16), nn.ReLU(), shared2, nn.Linear(16, 4))
    quantize_(fresh, rt.resu_config())
    load_resu_safetensors(fresh, tmp_path / "t.safetensors")
    assert fresh[0].weight is fresh[2].weight
    assert_same_resu_state(model[0].weight, fresh[0].weight)


def _saved(tmp_path):
    model = mixed_model()
    put_every_mode(model)
    path = tmp_path / "model.safetensors"
    save_resu_safetensors(model, path)
    return model, path


def _fresh():
    fresh = mixed_model(seed=5)
    quantize_(fresh, rt.resu_config())
    return fresh


def _rewrite(path, change):
    entries = safetensors.torch.load_file(path)
    change(entries)
    safetensors.torch.save_file(entries, path)


def _json(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(text.encode()), dtype=torch.uint8)


@pytest.mark.parametrize("case, match", [
    ("wrong_shape", "shape mismatch"),
    ("not_quantized", "quantize_ the model"),
    ("extra_layer", "missing"),
    ("truncated", "cannot read"),
    ("garbage", "cannot read"),
    ("bad_json", "not valid JSON"),
    ("other_format", "unsupported ResuTensor checkpoint format"),
    ("flipped_mask_bit", "trainable-set hash|nonzero entries at pruned coordinates"),
    ("bad_prefix", "block_prefix does not match"),
    ("missing_part", "missing"),
    ("wrong_theta_length", "theta has shape"),
    ("bad_mode", "mode_name"),
])
def test_mismatched_or_corrupt_checkpoints_raise_value_error(tmp_path, case, match):
    model, path = _saved(tmp_path)
    fresh = _fresh()
    if case == "wrong_shape":
        fresh = mixed_model(width=32)
        quantize_(fresh, rt.resu_config())
    elif case == "not_quantized":
        fresh = mixed_model()
    elif case == "extra_layer":
        fresh.append(nn.Linear(5, 5))
    elif case == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        path.write_bytes(b"\x00" * 64)
    elif case == "bad_json":
        _rewrite(path, lambda e: e.__setitem__("1.weight" + META, _json("{not json")))
    elif case == "other_format":
        _rewrite(path, lambda e: e.__setitem__("1.weight" + META, _json('{"format": "resu_tensor.flat/99"}')))
    elif case == "flipped_mask_bit":
        def flip(e):  # move one active bit inside a byte: counts and prefixes stay, the mask changes
            bitmap = e["1.weight.resu.mask_bitmap"]
            i = next(i for i, b in enumerate(bitmap.tolist()) if 0 < b < 255)
            b = int(bitmap[i])
            bitmap[i] = b ^ ((b & -b) | (~b & (b + 1)))
        _rewrite(path, flip)
    elif case == "bad_prefix":
        def bump(e):  # 48x48 weight: blocks of 1024 elements, so two prefix counts
            e["1.weight.resu.mask_block_prefix"][0] += 1
        _rewrite(path, bump)
    elif case == "missing_part":
        _rewrite(path, lambda e: e.pop("6.weight.resu.qscale"))
    elif case == "wrong_theta_length":
        _rewrite(path, lambda e: e.__setitem__("6.weight.resu.theta", e["6.weight.resu.theta"][:-1].clone()))
    elif case == "bad_mode":
        def mode(e):
            import json
            meta = json.loads(bytes(e["3.weight" + META].tolist()).decode())
            meta["mode_name"] = "zombie"
            e["3.weight" + META] = _json(json.dumps(meta))
        _rewrite(path, mode)
    before = copy.deepcopy(fresh)
    with pytest.raises(ValueError, match=match):
        load_resu_safetensors(fresh, path)
    # nothing moved before the error
    for (_, a), (_, b) in zip(before.named_parameters(), fresh.named_parameters()):
        if isinstance(a, rt.ResuTensor):
            assert_same_resu_state(a, b)
        else:
            assert torch.equal(a, b)


def test_flatten_refuses_transposed_views():
    w = rt.ResuTensor.from_dense(torch.randn(8, 16), sparsity=0.5)
    with pytest.raises(ValueError, match="transposed"):
        flatten_state_dict({"w": w.t()})


# ------------------------------------------------------------------------------ Hugging Face
@pytest.fixture(scope="module")
def hf_modules():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from resu_tensor.integrations import hf

    return transformers, hf


def tiny_llama(transformers, seed=0, tie=True):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=32, max_position_embeddings=32,
                                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("tie", [True, False])
def test_linear_filter_skips_lm_head_and_tied_weights(hf_modules, tie):
    transformers, hf = hf_modules
    model = tiny_llama(transformers, tie=tie)
    hf.quantize_hf_(model, rt.resu_config(sparsity=0.5), filter_fn=hf.linear_filter(model))
    names = [n for n, _, _ in rt.resu_weights(model)]
    assert names == [f"model.layers.{i}.{part}.{proj}" for i in range(2)
                     for part, projs in (("self_attn", LINEARS[:4]), ("mlp", LINEARS[4:])) for proj in projs]
    assert type(model.lm_head.weight) is nn.Parameter and type(model.model.embed_tokens.weight) is nn.Parameter
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie
    keep = hf.linear_filter(model, skip_names=["o_proj"])
    assert not keep(model.model.layers[0].self_attn.o_proj, "model.layers.0.self_attn.o_proj")
    assert not keep(model.lm_head, "lm_head")


def test_save_pretrained_from_pretrained_round_trip(hf_modules, tmp_path):
    transformers, hf = hf_modules
    model = tiny_llama(transformers)
    hf.quantize_hf_(model, rt.resu_config(sparsity=0.5))
    rt.enter_resu_(model, quantize_bits=4, group_size=16, filter_fn=lambda m, name: "mlp" in name)
    rt.enter_resu_(model, filter_fn=lambda m, name: "q_proj" in name)
    model.save_pretrained(tmp_path / "hooked")                      # flat state-dict hooks
    plain = tiny_llama(transformers)
    quantize_(plain, rt.resu_config(sparsity=0.5), filter_fn=hf.linear_filter(plain))
    rt.enter_resu_(plain, quantize_bits=4, group_size=16, filter_fn=lambda m, name: "mlp" in name)
    rt.enter_resu_(plain, filter_fn=lambda m, name: "q_proj" in name)
    hf.save_resu_pretrained(plain, tmp_path / "helper")             # no hooks needed
    x = torch.randint(0, 32, (2, 12))
    for source, folder in ((model, "hooked"), (plain, "helper")):
        loaded = hf.from_resu_pretrained(transformers.LlamaForCausalLM, tmp_path / folder)
        assert_same_models(source, loaded)
        assert {w.mode.value for _, _, w in rt.resu_weights(loaded)} == {"qresu", "resu", "sparse"}
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert torch.equal(loaded(x).logits, source(x).logits)
    dense = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hooked")  # no resu-tensor needed
    assert not any(isinstance(p, rt.ResuTensor) for p in dense.parameters())
    torch.testing.assert_close(dense(x).logits, model(x).logits)
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="no ResuTensor weights"):
        hf.from_resu_pretrained(transformers.LlamaForCausalLM, tmp_path / "dense")


def test_use_single_tensor_path(hf_modules):
    _, hf = hf_modules
    model = mixed_model()
    quantize_(model, rt.resu_config(sparsity=0.5))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    assert hf.use_single_tensor_path_(opt) == ["fused"] and not opt.param_groups[0]["fused"]
    F.mse_loss(model(torch.randn(4, 40)), torch.zeros(4, 5)).backward()
    opt.step()


class _Data(torch.utils.data.Dataset):
    """Sequences counting up mod 32: a next-token rule a tiny model learns in a few steps."""

    def __len__(self):
        return 512

    def __getitem__(self, i):
        start = torch.randint(0, 32, (1,), generator=torch.Generator().manual_seed(i))
        ids = (start + torch.arange(12)) % 32
        return {"input_ids": ids, "labels": ids.clone()}


def _train(transformers, hf, out, resume=None, snapshot=None, **arg_overrides):
    model = tiny_llama(transformers)
    hf.quantize_hf_(model)  # DENSE; the scheduler prunes
    schedule = rt.ScheduleConfig(steps_per_cycle=8, num_cycles=2, sparsity=0.5, stabilize_fraction=0.25,
                                 resu_fraction=0.25, quantize_bits=4, group_size=16)  # progress=True by default
    callback = hf.ResuCallback(schedule)
    callbacks = [callback]
    if snapshot is not None:
        class Snapshot(transformers.TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step == 7:
                    snapshot.update({n: copy.deepcopy(w) for n, _, w in rt.resu_weights(model)})
        callbacks.append(Snapshot())
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=16, per_device_train_batch_size=8, learning_rate=1e-2, logging_steps=4,
        save_strategy="steps", save_steps=7, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_num_workers=0, **arg_overrides)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Data(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer, callback


def test_trainer_trains_logs_cycles_and_resumes_exactly(hf_modules, tmp_path, caplog, capsys):
    transformers, hf = hf_modules
    snapshot = {}
    caplog.set_level(logging.INFO, logger="resu_tensor")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="ResuCallback")
        model, trainer, callback = _train(transformers, hf, tmp_path, snapshot=snapshot, optim="adamw_torch_fused")
    assert all(group["fused"] for group in callback.scheduler.optimizer.param_groups)  # kept as configured
    # one progress bar, the Trainer's (disabled here): the scheduler's own is off although the config asked for it
    assert not callback.scheduler.config.progress and callback.scheduler._progress is None
    assert "RESU" not in capsys.readouterr().err
    # a log at every phase change: prune (4, 12), enter QRESU (6, 14), commit (8, 16), besides logging_steps=4
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in trainer.state.log_history if "loss" in e] == [4, 6, 8, 12, 14, 16]
    assert losses[-1] < 0.8 * losses[0]
    changes = callback.scheduler.phase_changes
    pruned = [e for e in trainer.state.log_history if "resu/prune_cycle" in e]
    assert [(e["step"], e["resu/prune_cycle"], e["resu/target_sparsity"], e["resu/pruned_sparsity"]) for e in pruned] == \
        [(c["step"], c["cycle"], c["target_sparsity"], c["sparsity"]) for c in changes if c["event"] == "prune"]
    assert [e["step"] for e in pruned] == [4, 12] and all(e["resu/pruned_sparsity"] == pytest.approx(0.5, abs=1e-3)
                                                         for e in pruned)
    entered = [e for e in trainer.state.log_history if "resu/enter_cycle" in e]
    n_resu = sum(w.numel() for _, _, w in rt.resu_weights(model))
    assert [(e["step"], e["resu/enter_cycle"], e["resu/bits"]) for e in entered] == [(6, 0, 4), (14, 1, 4)]
    assert all(e["resu/theta"] == e["resu/trainable"] == n_resu - round(0.5 * n_resu) for e in entered)
    cycles = [e for e in trainer.state.log_history if "resu/cycle" in e]
    assert [(e["step"], e["resu/cycle"]) for e in cycles] == [(8, 0), (16, 1)]
    for entry, stats in zip(cycles, callback.scheduler.history):
        assert entry["resu/sparsity"] == pytest.approx(0.5, abs=1e-3) and entry["resu/resurrected"] == stats.resurrected
        assert entry["resu/cycle_loss"] == pytest.approx(stats.loss) and "loss" in entry
        assert entry["resu/resurrected_share"] == stats.resurrected_share and entry["resu/active"] == stats.active
    assert cycles[0]["resu/resurrected"] > 0 and cycles[1]["resu/survivors"] > 0
    # the same phase changes on the resu_tensor logger, at the Trainer's steps
    logged = [(r.resu["step"], r.resu["event"]) for r in caplog.records if r.name == "resu_tensor" and hasattr(r, "resu")]
    assert logged == [(4, "prune"), (6, "enter_resu"), (8, "commit"), (12, "prune"), (14, "enter_resu"),
                      (16, "commit"), (16, "finished")]
    assert [r.step for r in callback.scheduler.steps] == list(range(1, 17))
    assert all(r.loss is not None for r in callback.scheduler.steps)
    assert {w.mode for _, _, w in rt.resu_weights(model)} == {rt.Mode.SPARSE}

    # the step-7 checkpoint was taken mid-RESU: QRESU layers, 4-bit W_A, θ, optimizer state
    assert {w.mode for w in snapshot.values()} == {rt.Mode.QRESU}
    restored = hf.from_resu_pretrained(transformers.LlamaForCausalLM, tmp_path / "checkpoint-7")
    for name, _, weight in rt.resu_weights(restored):
        assert_same_resu_state(snapshot[name], weight)

    resumed, trainer_2, callback_2 = _train(transformers, hf, tmp_path, resume=str(tmp_path / "checkpoint-7"),
                                            optim="adamw_torch_fused")
    assert_same_models(model, resumed)
    assert callback_2.scheduler.history == callback.scheduler.history
    assert callback_2.scheduler.steps == callback.scheduler.steps  # steps 1-7 from the checkpoint, 8-16 rerun

    def resu_logs(history):
        return [{k: v for k, v in e.items() if k.startswith("resu/") or k == "step"}
                for e in history if "resu/cycle" in e]

    assert resu_logs(trainer_2.state.log_history) == resu_logs(cycles)


def test_callback_turns_the_schedulers_own_progress_bar_off_unless_asked(hf_modules):
    _, hf = hf_modules
    config = rt.ScheduleConfig(steps_per_cycle=8, num_cycles=2)
    assert config.progress  # the default for a hand-written loop
    assert not hf.ResuCallback(config).config.progress
    assert config.progress  # the user's config object is left as it was
    assert hf.ResuCallback(config, progress=True).config is config
    with pytest.raises(TypeError, match="progress must be a bool"):
        hf.ResuCallback(config, progress="yes")

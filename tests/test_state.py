"""Every way a state enters a ResuTensor goes through core/state.py: valid states of every mode
round-trip bit-identically, and a state that breaks an invariant raises a ValueError naming the
field where it enters (build, set_state_, torch.load, load_state_dict / copy_, safetensors, row
blocks). Also: the checkpoint layouts before nm_pattern/row_keep still load, and the AOT
autograd cache hash of ResuTensor and CompactTensor."""
import dataclasses
import io
import json
import warnings
import zipfile
from unittest import mock

import pytest
import torch
from torch import nn
from torchao.quantization import quantize_

import resu_tensor as rt
from resu_tensor.core.mask_encoding import EncodedMask, encode_mask
from resu_tensor.core.row_blocks import from_row_fields, row_attributes, row_fields, slice_rows
from resu_tensor.core.state import QuantizedActive, build_state, check_state
from resu_tensor.integrations.safetensors_io import META, flatten_resu_tensor, rebuild_resu_tensor
from resu_asserts import assert_same_state




def make(kind: str, seed: int = 0, shape=(24, 40)) -> rt.ResuTensor:
    """A random weight in state ``kind``."""
    g = torch.Generator().manual_seed(seed)
    w = rt.ResuTensor.from_dense(torch.randn(*shape, generator=g))
    if kind == "dense":
        return w
    if kind == "sparse_indices":
        return w.prune(0.995, generator=g)
    if kind == "sparse_row":
        return w.prune(0.5, granularity="row")
    if kind == "sparse_nm":
        return w.prune(None, granularity="2:4")
    w.prune(0.6)
    if kind == "sparse":
        return w
    if kind == "resu":
        return w.enter_resu(0.3, generator=g)
    if kind == "resu_all_selective":
        return w.enter_resu(0.3, freeze_active=False, generator=g, selective=rt.SelectiveConfig(tau=0.4),
                            track_gradients=True)
    if kind == "resu_subset":
        return w.enter_resu(0.3, generator=g, selective=rt.StaticSubsetConfig(alpha=0.3))
    if kind == "qresu4":
        return w.enter_resu(0.3, generator=g, quantize_bits=4, group_size=8, track_gradients=True)
    if kind == "qresu8_subset":
        return w.enter_resu(0.3, generator=g, quantize_bits=8, group_size=None,
                            selective=rt.StaticSubsetConfig(alpha=0.5))
    raise AssertionError(kind)


KINDS = ["dense", "sparse", "sparse_indices", "sparse_row", "sparse_nm", "resu", "resu_all_selective",
         "resu_subset", "qresu4", "qresu8_subset"]


def _randomise_trainable(w: rt.ResuTensor, seed: int) -> None:
    """Random values in every trainable coordinate and EMA (never only zeros)."""
    g = torch.Generator().manual_seed(seed)
    flat = w.trainable_values()
    w.write_trainable_(torch.randn(flat.shape, generator=g).to(flat.dtype))
    for name in ("selective_m", "selective_v", "grad_abs_sum"):
        t = getattr(w, name)
        if t is not None:
            t.copy_(torch.rand(t.shape, generator=g).to(t.dtype))


def _saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _load(raw: bytes):
    return torch.load(io.BytesIO(raw), weights_only=True)


# ------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("kind", KINDS)
def test_valid_states_round_trip_bit_identically(kind):
    w = make(kind, seed=KINDS.index(kind))
    _randomise_trainable(w, seed=7)
    check_state(w.fields())
    assert_same_state(w, rt.ResuTensor.from_fields(w.fields()))
    assert_same_state(w, _load(_saved({"w": w}))["w"])
    key = "layer.weight"
    assert_same_state(w, rebuild_resu_tensor(key, flatten_resu_tensor(key, w)))
    fresh = rt.ResuTensor.from_dense(torch.zeros(w.storage_shape))
    fresh.copy_(w)
    assert_same_state(w, fresh)
    rebuilt = from_row_fields(rt.ResuTensor, row_attributes(w), row_fields(w), w.storage_shape)
    assert_same_state(w, rebuilt)
    top, bottom = slice_rows(w, 0, 10), slice_rows(w, 10, w.storage_shape[0])
    assert torch.equal(torch.cat([top.dequantize(), bottom.dequantize()]), w.dequantize())
    assert torch.equal(torch.cat([top.mask(), bottom.mask()]), w.mask())


def test_model_state_dict_round_trips_through_torch_load():
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(model, rt.resu_config(sparsity=0.5))
    rt.enter_resu_(model, epsilon=0.2, quantize_bits=4, group_size=8, filter_fn=lambda m, n: n == "2")
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    quantize_(fresh, rt.resu_config())
    fresh.load_state_dict(_load(_saved(model.state_dict())))
    for a, b in zip(model.parameters(), fresh.parameters()):
        if isinstance(a, rt.ResuTensor):
            assert_same_state(a, b)
        else:
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------- refused states
def _flip_byte_in_file(raw: bytes, original: torch.Tensor, index: int) -> bytes:
    """The torch.save archive ``raw`` with one byte of ``original``'s stored data flipped."""
    target = original.contiguous().view(torch.uint8).numpy().tobytes()
    source, out = zipfile.ZipFile(io.BytesIO(raw)), io.BytesIO()
    found = False
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dest:
        for info in source.infolist():
            data = source.read(info.filename)
            if data == target:
                data = bytearray(data)
                data[index] ^= 0x01
                data, found = bytes(data), True
            dest.writestr(info, data)
    assert found, "the tensor's storage is not in the archive"
    return out.getvalue()


def test_torch_load_refuses_a_flipped_mask_byte():
    w = make("resu")
    assert w.mask_kind == "bitmap"
    raw = _saved({"w": w})
    _load(raw)  # the intact file loads
    with pytest.raises(ValueError, match=r"torch.load\): n_active is 384 but the mask holds 38[35] active elements"):
        _load(_flip_byte_in_file(raw, w.mask_bitmap, 5))


def test_torch_load_refuses_a_flipped_index_byte_and_load_state_dict_changes_nothing():
    w = make("sparse_indices")
    assert w.mask_kind == "active_indices" and w.mask_indices.numel() >= 2
    raw = _saved({"weight": w})
    with pytest.raises(ValueError, match="mask_indices"):
        _load(_flip_byte_in_file(raw, w.mask_indices, 4 * (w.mask_indices.numel() - 1) + 3))


def test_copy_refuses_a_corrupt_source_and_leaves_the_destination_unchanged():
    dest = make("resu", seed=1)
    before = rt.ResuTensor.from_fields(dest.fields())
    before = before.replace(**{n: getattr(dest, n).clone() for n in dest.optional_tensor_data_names
                               if getattr(dest, n) is not None})
    src = make("resu", seed=2)
    bad = src.replace(n_active=src.n_active + 1)
    with pytest.raises(ValueError, match="n_active"):
        dest.copy_(bad)
    bitmap = src.mask_bitmap.clone()
    bitmap[0] ^= 0x01
    with pytest.raises(ValueError, match="copy_ into a ResuTensor: n_active is 384 but the mask holds 38[35]"):
        dest.copy_(src.replace(mask_bitmap=bitmap))
    big = make("resu", seed=3, shape=(40, 64))  # more than one 1024-element prefix block
    bitmap = big.mask_bitmap.clone()
    bitmap[0] ^= 0x01
    with pytest.raises(ValueError, match="mask_block_prefix does not match mask_bitmap"):
        rt.ResuTensor.from_dense(torch.zeros(40, 64)).copy_(big.replace(mask_bitmap=bitmap))
    assert_same_state(before, dest)
    module = nn.Linear(40, 24)
    quantize_(module, rt.resu_config())
    # load_state_dict re-raises errors of copy_ as a RuntimeError that carries their message
    with pytest.raises(RuntimeError, match="copy_ into a ResuTensor: trainable_key .* does not match"):
        module.load_state_dict({"weight": src.replace(trainable_key=src.trainable_key ^ 1), "bias": module.bias})


def test_set_state_refuses_theta_of_the_wrong_length_and_keeps_the_state():
    w = make("qresu4")
    before = w.fields()
    quantized = QuantizedActive(w.qdata, w.qscale, w.qoffset, w.theta[:-1], w.quant_bits, w.group_size)
    with pytest.raises(ValueError, match=rf"theta has shape \[{w.theta.numel() - 1}\], expected \[{w.theta.numel()}\]"):
        w.set_state_(mode=rt.Mode.QRESU, mask=w.encoded_mask(), trainable_side="pruned", quantized=quantized)
    assert all(getattr(w, n) is v for n, v in before.items() if isinstance(v, torch.Tensor))


def test_set_state_refuses_a_subset_outside_the_pruned_set():
    w = make("resu")
    subset = ~w.storage_mask()
    subset[tuple(w.storage_mask().nonzero()[0].tolist())] = True  # one active coordinate
    with pytest.raises(ValueError, match="the subset holds 1 active coordinates"):
        w.set_state_(mode=rt.Mode.RESU, mask=w.encoded_mask(), trainable_side="subset", values=w.values,
                     subset=encode_mask(subset))


@pytest.mark.parametrize("case, match", [
    ("out_of_range", r"mask_indices is out of range"),
    ("unsorted", r"mask_indices is not strictly increasing"),
    ("duplicate", r"mask_indices is not strictly increasing"),
    ("wrong_dtype", r"mask_indices is a torch.int64 tensor"),
])
def test_bad_indices_are_refused(case, match):
    w = make("sparse_indices")
    indices = w.mask_indices.clone()
    numel = w.storage_numel
    if case == "out_of_range":
        indices[-1] = numel
    elif case == "unsorted":
        indices[[0, 1]] = indices[[1, 0]]
    elif case == "duplicate":
        indices[1] = indices[0]
    else:
        indices = indices.long()
    with pytest.raises(ValueError, match=match):
        rt.ResuTensor.from_fields({**w.fields(), "mask_indices": indices})


@pytest.mark.parametrize("change, match", [
    (lambda w: {"values": w.values.masked_fill(~w.storage_mask(), 1.0)}, "nonzero entries at pruned coordinates"),
    (lambda w: {"mode_name": "dense"}, "trainable_side is 'active', expected one of"),
    (lambda w: {"mode_name": "qresu", "trainable_side": "pruned"}, "values must be absent"),
    (lambda w: {"target_sparsity": 1.5}, "target_sparsity"),
    (lambda w: {"nm_pattern": (4, 2)}, "nm_pattern"),
    (lambda w: {"nm_pattern": (2, 4), "row_keep": 3}, "both set"),
    (lambda w: {"row_keep": 41}, "row_keep"),
    (lambda w: {"mask_block_prefix": None}, "mask_block_prefix is absent"),
    (lambda w: {"values": w.values.double()}, "values is of dtype torch.float64"),
])
def test_sparse_state_invariants(change, match):
    w = make("sparse")
    with pytest.raises(ValueError, match=match):
        rt.ResuTensor.from_fields({**w.fields(), **change(w)})


@pytest.mark.parametrize("change, match", [
    (lambda w: {"selective_m": w.selective_m[:-1]}, "selective_m has shape"),
    (lambda w: {"grad_abs_sum": w.grad_abs_sum[:-2]}, "grad_abs_sum has shape"),
    (lambda w: {"selective_v": None}, "selective_v is absent"),
    (lambda w: {"selective": (0.9, 0.5, 0.5, 0.2, 1e-8, "float32")}, "selective is"),
    (lambda w: {"subset_kind": "bitmap"}, "subset_bitmap is absent"),
])
def test_resu_state_invariants(change, match):
    w = make("resu_all_selective")
    with pytest.raises(ValueError, match=match):
        rt.ResuTensor.from_fields({**w.fields(), **change(w)})


def test_qresu_state_invariants():
    w = make("qresu4")
    for change, match in [({"qdata": w.qdata[:, :-1]}, "qdata has shape"),
                          ({"qscale": w.qscale.half()}, "qscale is of dtype"),
                          ({"group_size": 16}, "qscale has shape"),
                          ({"quant_bits": 3}, "quant_bits is 3"),
                          ({"theta": None}, "theta is absent")]:
        with pytest.raises(ValueError, match=match):
            rt.ResuTensor.from_fields({**w.fields(), **change})


def test_build_state_refuses_both_or_neither_storage():
    with pytest.raises(ValueError, match="exactly one of values="):
        build_state((2, 4), torch.float32, mode=rt.Mode.DENSE, mask=EncodedMask("none"), trainable_side="all")


def test_row_blocks_refuse_a_subset_overlapping_the_mask():
    w = make("resu_subset")
    fields = row_fields(w)
    fields["subset"] = fields["subset"] | fields["mask"]
    with pytest.raises(ValueError, match="from_row_fields: the subset holds"):
        from_row_fields(rt.ResuTensor, row_attributes(w), fields, w.storage_shape)


def test_safetensors_rebuild_refuses_an_out_of_range_index():
    w = make("sparse_indices")
    entries = flatten_resu_tensor("k", w)
    entries["k.resu.mask_indices"] = entries["k.resu.mask_indices"].clone()
    entries["k.resu.mask_indices"][-1] = w.storage_numel + 3
    with pytest.raises(ValueError, match="k: corrupt or mismatched checkpoint: mask_indices is out of range"):
        rebuild_resu_tensor("k", entries)


# ------------------------------------------------------------------------------- old layouts
def _as_first_format(entries: dict, key: str) -> dict:
    """``entries`` rewritten as the first format wrote them: one ``nm`` field, selective a list."""
    meta = json.loads(bytes(entries[key + META].tolist()).decode())
    cols = meta["storage_shape"][1]
    nm = meta.pop("nm_pattern")
    row_keep = meta.pop("row_keep")
    meta["nm"] = [row_keep, cols] if row_keep is not None else nm
    if meta["selective"] is not None:
        meta["selective"] = [meta["selective"][f.name] for f in dataclasses.fields(rt.SelectiveConfig)]
    meta["format"] = "resu_tensor.flat/1"
    return {**entries, key + META: torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)}


@pytest.mark.parametrize("kind", ["sparse_row", "sparse_nm", "resu_all_selective", "qresu4"])
def test_first_safetensors_format_still_loads(kind):
    w = make(kind)
    old = _as_first_format(flatten_resu_tensor("k", w), "k")
    assert "nm" in json.loads(bytes(old["k" + META].tolist()).decode())
    assert_same_state(w, rebuild_resu_tensor("k", old))


@pytest.mark.parametrize("kind", ["sparse_row", "sparse_nm", "resu_all_selective", "dense"])
def test_torch_save_files_of_the_first_layout_still_load(kind):
    w = make(kind)
    old = w.replace()  # the first layout: nm = (N, M) or (kept per row, in_features); selective a tuple
    cols = w.storage_shape[1]
    old.nm = (w.row_keep, cols) if w.row_keep is not None else w.nm_pattern
    del old.nm_pattern, old.row_keep
    old.selective = None if w.selective is None else w.selective.as_tuple()
    raw = _saved({"w": old})
    loaded = _load(raw)["w"]
    assert not hasattr(loaded, "nm")
    assert_same_state(w, loaded)


def test_selective_is_the_config_and_survives_weights_only_load():
    w = make("resu_all_selective")
    assert w.selective == rt.SelectiveConfig(tau=0.4)
    assert _load(_saved({"w": w}))["w"].selective == w.selective
    assert dataclasses.is_dataclass(w.selective)


# ------------------------------------------------------------------------------- cache hashing
def test_stable_hash_tells_modes_masks_and_trainable_sets_apart():
    hashes = {kind: make(kind)._stable_hash_for_caching() for kind in KINDS}
    assert len(set(hashes.values())) == len(KINDS)
    assert make("resu")._stable_hash_for_caching() == hashes["resu"]  # deterministic
    w = make("sparse")
    other = rt.ResuTensor.from_dense(torch.randn(24, 40)).prune(0.6)  # same kind, other mask
    assert w.mask_kind == other.mask_kind and w._stable_hash_for_caching() != other._stable_hash_for_caching()
    g1 = w.compact(torch.randn(w.trainable_count))
    g2 = other.compact(torch.randn(other.trainable_count))
    assert g1._stable_hash_for_caching() != g2._stable_hash_for_caching()
    assert g1._stable_hash_for_caching() == w.compact(torch.zeros(w.trainable_count))._stable_hash_for_caching()


def _cache_key_bytes(obj) -> tuple[bytes, list[str]]:
    """What AOT autograd's cache key pickles for ``obj`` (as torch.compile with Inductor does for
    every subclass input), and the warnings raised meanwhile (warn_once's memory emptied)."""
    from torch._dynamo import utils as dynamo_utils
    from torch._functorch._aot_autograd.autograd_cache import AOTAutogradCachePickler

    pickler = AOTAutogradCachePickler(torch.fx.GraphModule(nn.Module(), torch.fx.Graph()))
    with mock.patch.object(dynamo_utils, "warn_once_cache", set()), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        key = pickler.dumps(obj)
    return key, [str(w.message) for w in caught]


def test_aot_autograd_cache_key_uses_our_hash_without_warning():
    w, other = make("resu"), make("qresu4")
    grad = w.compact(torch.randn(w.trainable_count))
    for obj in (w, grad, w.t()):
        key, messages = _cache_key_bytes(obj)
        assert not [m for m in messages if "_stable_hash_for_caching" in m], messages
    assert _cache_key_bytes(w)[0] == _cache_key_bytes(make("resu"))[0]
    assert _cache_key_bytes(w)[0] != _cache_key_bytes(other)[0]
    assert _cache_key_bytes(w)[0] != _cache_key_bytes(w.t())[0]
    method = rt.ResuTensor._stable_hash_for_caching
    del rt.ResuTensor._stable_hash_for_caching
    try:
        _, messages = _cache_key_bytes(w)  # without it, torch warns (what this test guards against)
    finally:
        rt.ResuTensor._stable_hash_for_caching = method
    assert any("ResuTensor does not implement _stable_hash_for_caching" in m for m in messages)

"""Safetensors checkpoints of models with ResuTensor weights.

Safetensors stores plain tensors only, so each ResuTensor weight ``K`` (e.g.
``"model.layers.0.mlp.up_proj.weight"``) is flattened into plain entries:

* ``K``: the effective dense weight W_eff = M⊙W + (1−M)⊙Φ(θ) in the compute dtype. In DENSE,
  SPARSE and RESU that *is* the stored ``values`` (no extra bytes); in QRESU it is W_A
  dequantized with θ scattered in (an extra copy, so any dense loader, e.g. a plain
  ``from_pretrained`` without resu-tensor, gets a usable dense model).
* ``K.resu.<name>``: every other inner tensor (``mask_bitmap``, ``mask_block_prefix``,
  ``mask_indices``, ``qdata``, ``qscale``, ``qoffset``, ``theta``, subset and selective state),
  bit for bit.
* ``K.resu.meta``: the non-tensor fields (mode, mask kind, trainable side, shape, dtype, bits,
  group size, N:M pattern or per-row count, the SelectiveConfig, the trainable set's content
  hash ...) as JSON in a uint8 tensor, so the format survives every writer that keeps tensors
  only (``save_pretrained``, the Trainer).

Loading rebuilds the ResuTensor and checks it (``core.state.check_state``): known format, fields
and tensors, shapes, mask and prefix counts, and the recorded hash of the trainable set. Any
mismatch raises a ``ValueError`` naming the weight; nothing in the model changes before every
entry has passed. Files of the first format (``resu_tensor.flat/1``: one ``nm`` field for both
the N:M pattern and the per-row count, ``selective`` as a list) still load.

Example::

    from resu_tensor.integrations import save_resu_safetensors, load_resu_safetensors

    save_resu_safetensors(model, "ckpt.safetensors")
    fresh = build_model(); quantize_(fresh, rt.resu_config())   # same layers quantized
    load_resu_safetensors(fresh, "ckpt.safetensors")            # exact: modes, masks, θ, codes
"""
import dataclasses
import json
import os
from typing import Optional

import torch
from torch import nn

from resu_tensor.core.mask_encoding import KINDS
from resu_tensor.core.mode import Mode
from resu_tensor.core.state import SUPPORTED_DTYPES, TRAINABLE_SIDES, upgrade_legacy_fields
from resu_tensor.core.tensor import ResuTensor, logical_shape_of
from resu_tensor.method.selective import SelectiveConfig

FORMAT = "resu_tensor.flat/2"
LEGACY_FORMATS = ("resu_tensor.flat/1",)  # one ``nm`` for N:M pattern and row count; selective as a list
PART = ".resu."
META = PART + "meta"
_DTYPES = {str(d).removeprefix("torch."): d for d in SUPPORTED_DTYPES}
_TUPLE_FIELDS = ("storage_shape", "nm_pattern", "view_shape")
# Fields added to format 2 after its first files: absent in those, they take these values.
_OPTIONAL_FIELDS = {"view_shape": None}


# --------------------------------------------------------------------------------- one tensor
def flatten_resu_tensor(key: str, tensor: ResuTensor) -> dict[str, torch.Tensor]:
    """The plain entries that stand for ``tensor`` saved under ``key`` (see the module doc)."""
    if tensor.layout_view:
        raise ValueError(f"{key}: cannot save a view of a ResuTensor (w.t(), a transposed view); save the weight itself")
    meta = {"format": FORMAT}
    for name in (*tensor.tensor_attribute_names, *tensor.optional_tensor_attribute_names):
        value = getattr(tensor, name)
        if name == "compute_dtype":
            value = str(value).removeprefix("torch.")
        elif isinstance(value, SelectiveConfig):
            value = dataclasses.asdict(value)
        elif isinstance(value, tuple):
            value = list(value)
        meta[name] = value
    meta["tensors"] = [n for n in tensor.optional_tensor_data_names if getattr(tensor, n) is not None]
    parts = {key + PART + n: _own_storage(getattr(tensor, n).detach()) for n in meta["tensors"] if n != "values"}
    # In the weight's logical shape (an N-D conv's, a Conv1D's (in, out)), as a dense loader expects.
    weight = tensor.to_logical(tensor.values if tensor.values is not None else tensor.storage_weight())
    encoded = json.dumps(meta, sort_keys=True).encode()
    return {key: _own_storage(weight.detach()), key + META: torch.frombuffer(bytearray(encoded), dtype=torch.uint8),
            **parts}


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    # safetensors refuses tensors that share or only partly cover a storage.
    t = t.contiguous()
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def _decode_meta(key: str, raw: torch.Tensor) -> dict:
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8 or raw.dim() != 1:
        raise ValueError(f"{key}: corrupt checkpoint: {key + META!r} must be a 1-D uint8 tensor of JSON")
    try:
        meta = json.loads(bytes(raw.cpu().tolist()).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{key}: corrupt checkpoint: {key + META!r} is not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, *LEGACY_FORMATS):
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"{key}: unsupported ResuTensor checkpoint format {found!r}; this version reads "
                         f"{[FORMAT, *LEGACY_FORMATS]}")
    if meta["format"] in LEGACY_FORMATS:
        if isinstance(meta.get("storage_shape"), list):
            meta["storage_shape"] = tuple(meta["storage_shape"])
        try:
            meta = upgrade_legacy_fields(meta)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{key}: corrupt checkpoint metadata: {error}") from None
        if isinstance(meta.get("selective"), SelectiveConfig):
            meta["selective"] = dataclasses.asdict(meta["selective"])
    return meta


def rebuild_resu_tensor(key: str, entries: dict[str, torch.Tensor],
                        expected_shape: Optional[tuple] = None) -> ResuTensor:
    """The ResuTensor that :func:`flatten_resu_tensor` wrote under ``key``, validated.

    ``entries`` holds at least ``key``, ``key + ".resu.meta"`` and the ``key + ".resu.*"`` parts.
    Raises ``ValueError`` on a missing or extra part, a wrong shape or dtype, an inconsistent
    mask, or (``expected_shape``) a weight of another shape than the model's.
    """
    if key + META not in entries:
        raise ValueError(f"{key}: missing {key + META!r}: not a ResuTensor entry")
    meta = _decode_meta(key, entries[key + META])
    names = [*ResuTensor.tensor_attribute_names, *ResuTensor.optional_tensor_attribute_names]
    meta = {**_OPTIONAL_FIELDS, **meta}
    missing = [n for n in names if n not in meta] + ([] if isinstance(meta.get("tensors"), list) else ["tensors"])
    unknown = sorted(set(meta) - {*names, "format", "tensors"})
    if missing or unknown:
        raise ValueError(f"{key}: corrupt checkpoint metadata: missing fields {missing}, unknown fields {unknown}")
    fields = {n: (tuple(meta[n]) if n in _TUPLE_FIELDS and isinstance(meta[n], list) else meta[n]) for n in names}
    _check_fields(key, fields, expected_shape)
    fields["compute_dtype"] = _DTYPES[fields["compute_dtype"]]
    if fields["selective"] is not None:
        try:
            fields["selective"] = SelectiveConfig(**fields["selective"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"{key}: corrupt checkpoint metadata: selective={fields['selective']!r} ({error})") from None
    tensor_names = meta["tensors"]
    if not set(tensor_names) <= set(ResuTensor.optional_tensor_data_names):
        raise ValueError(f"{key}: corrupt checkpoint metadata: unknown tensors "
                         f"{sorted(set(tensor_names) - set(ResuTensor.optional_tensor_data_names))}")
    present = {k[len(key + PART):] for k in entries if k.startswith(key + PART) and k != key + META}
    expected_parts = set(tensor_names) - {"values"}
    if present != expected_parts:
        raise ValueError(f"{key}: checkpoint parts do not match its metadata: missing "
                         f"{sorted(expected_parts - present)}, unexpected {sorted(present - expected_parts)}")
    if key not in entries:
        raise ValueError(f"{key}: missing the weight entry {key!r}")
    tensors = {n: entries[key + PART + n] for n in expected_parts}
    if "values" in tensor_names:
        tensors["values"] = _storage_values(key, entries[key], fields)
    return ResuTensor.from_fields({**fields, **{n: tensors.get(n) for n in ResuTensor.optional_tensor_data_names}},
                                  where=f"{key}: corrupt or mismatched checkpoint")


def _storage_values(key: str, weight: torch.Tensor, fields: dict) -> torch.Tensor:
    """The saved weight entry (logical shape) as storage values (out, in)."""
    logical = logical_shape_of(fields["storage_shape"], fields["transposed"], fields["view_shape"])
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != logical:
        raise ValueError(f"{key}: corrupt checkpoint: the weight entry has shape "
                         f"{list(getattr(weight, 'shape', []))}, its metadata says {list(logical)}")
    if fields["transposed"]:
        return weight.t().contiguous()
    return weight.reshape(fields["storage_shape"])


def _check_fields(key: str, f: dict, expected_shape) -> None:
    def bad(name, accepted):
        return ValueError(f"{key}: corrupt checkpoint metadata: {name}={f[name]!r}, accepted: {accepted}")

    shape = f["storage_shape"]
    if not (isinstance(shape, tuple) and len(shape) == 2 and all(isinstance(s, int) and s > 0 for s in shape)):
        raise bad("storage_shape", "two positive ints")
    if not isinstance(f["transposed"], bool):
        raise bad("transposed", "true or false")
    view_shape = f["view_shape"]
    if view_shape is not None and not (isinstance(view_shape, tuple) and len(view_shape) >= 3
                                       and all(isinstance(s, int) and s > 0 for s in view_shape)):
        raise bad("view_shape", "null or a list of 3 or more positive ints")
    shape = logical_shape_of(shape, f["transposed"], view_shape)
    if expected_shape is not None and shape != tuple(expected_shape):
        raise ValueError(f"{key}: shape mismatch: the checkpoint holds a {list(shape)} weight, the model a "
                         f"{list(expected_shape)} one")
    if f["compute_dtype"] not in _DTYPES:
        raise bad("compute_dtype", sorted(_DTYPES))
    if f["mode_name"] not in [m.value for m in Mode]:
        raise bad("mode_name", [m.value for m in Mode])
    if f["mask_kind"] not in KINDS:
        raise bad("mask_kind", KINDS)
    if f["subset_kind"] not in KINDS:
        raise bad("subset_kind", KINDS)
    if f["trainable_side"] not in TRAINABLE_SIDES:
        raise bad("trainable_side", TRAINABLE_SIDES)
    if f["selective"] is not None and not isinstance(f["selective"], dict):
        raise bad("selective", "null or an object of SelectiveConfig fields")
    for name in ("n_active", "trainable_key"):
        if not isinstance(f[name], int) or isinstance(f[name], bool) or f[name] < 0:
            raise bad(name, "a non-negative int")
    if not isinstance(f["target_sparsity"], (int, float)) or not 0 <= f["target_sparsity"] <= 1:
        raise bad("target_sparsity", "a float in [0, 1]")


# --------------------------------------------------------------------------------- state dicts
def flatten_state_dict(state_dict: dict) -> dict[str, torch.Tensor]:
    """A copy of ``state_dict`` with every ResuTensor replaced by its plain entries (others kept)."""
    flat = {}
    for key, value in state_dict.items():
        if isinstance(value, ResuTensor):
            flat.update(flatten_resu_tensor(key, value))
        else:
            flat[key] = value
    return flat


def resu_keys(entries) -> list[str]:
    """The weight keys that have ResuTensor entries (``K`` for every ``K.resu.meta``)."""
    return sorted(k[: -len(META)] for k in entries if k.endswith(META))


def unflatten_state_dict(entries: dict, expected_shapes: Optional[dict] = None) -> dict:
    """Inverse of :func:`flatten_state_dict`: ResuTensors rebuilt (and validated) in place of
    their plain entries. ``expected_shapes`` {key: shape} checks weights against a model."""
    out = dict(entries)
    for key in resu_keys(entries):
        parts = {k: v for k, v in entries.items() if k == key or k.startswith(key + PART)}
        shape = (expected_shapes or {}).get(key)
        out[key] = rebuild_resu_tensor(key, parts, shape)
        for k in parts:
            if k != key:
                del out[k]
    return out


# --------------------------------------------------------------------------------- state-dict hooks
def _resu_param_names(module: nn.Module) -> list[str]:
    return [name for name, param in module._parameters.items() if isinstance(param, ResuTensor)]


def _flatten_hook(module, state_dict, prefix, local_metadata) -> None:
    for name in _resu_param_names(module):
        key = prefix + name
        value = state_dict.get(key)
        if isinstance(value, ResuTensor):
            del state_dict[key]
            state_dict.update(flatten_resu_tensor(key, value))


def _has_all_parts(key: str, state_dict: dict) -> bool:
    """Whether ``state_dict`` holds ``key`` and every part its metadata lists."""
    tensors = _decode_meta(key, state_dict[key + META]).get("tensors")
    if key not in state_dict or not isinstance(tensors, list):
        return key in state_dict  # corrupt metadata: rebuild_resu_tensor names what is wrong
    return all(key + PART + name in state_dict for name in tensors if name != "values")


def _rebuild_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                  error_msgs) -> None:
    for name in {k[len(prefix):-len(META)] for k in state_dict if k.startswith(prefix) and k.endswith(META)}:
        if "." in name:
            continue  # a submodule's parameter: its own hook rebuilds it
        key = prefix + name
        if not _has_all_parts(key, state_dict):
            # A tied copy whose dense entry or parts (those sharing storage with its partner's)
            # the writer dropped, as save_pretrained does: the partner's entries load the one
            # shared Parameter; left out here, the key counts as missing like any tied weight.
            for k in [k for k in state_dict if k == key or k.startswith(key + PART)]:
                del state_dict[k]
            continue
        weight = module._parameters.get(name)
        if not isinstance(weight, ResuTensor):
            raise ValueError(f"{key}: the checkpoint holds a ResuTensor but the model's parameter is "
                             f"{type(weight).__name__}: quantize_ the model with the same layers first")
        parts = {k: state_dict[k] for k in list(state_dict) if k == key or k.startswith(key + PART)}
        state_dict[key] = rebuild_resu_tensor(key, parts, weight.logical_shape)
        for k in parts:
            if k != key:
                del state_dict[k]


def enable_flat_state_dict(model: nn.Module) -> nn.Module:
    """Make ``model.state_dict()`` flatten its ResuTensor weights into plain tensors and
    ``model.load_state_dict`` rebuild them, so every safetensors writer/reader works unchanged:
    Hugging Face ``save_pretrained`` and the ``Trainer``'s checkpoints and resume. Idempotent;
    hooks sit on each module that holds a ResuTensor parameter now (any name: ``weight``,
    ``in_proj_weight``, ``weight_ih_l0`` ...). ``ResuCallback`` calls it.

    Example::

        enable_flat_state_dict(model)
        safetensors.torch.save_file(model.state_dict(), "ckpt.safetensors")
        model.load_state_dict(safetensors.torch.load_file("ckpt.safetensors"))
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    for module in model.modules():
        hooked = getattr(module, "_resu_flat_state_dict", False)
        if _resu_param_names(module) and not hooked:
            module.register_state_dict_post_hook(_flatten_hook)
            module.register_load_state_dict_pre_hook(_rebuild_hook)
            module._resu_flat_state_dict = True  # a flag, not the handles: the model stays deepcopy-able
    return model


# --------------------------------------------------------------------------------- files
def state_targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """{state-dict key: the parameter or persistent buffer itself}, tied ones under every name;
    ResuTensor weights appear whole (unlike ``state_dict()`` with the flat hooks)."""
    targets = {}
    for name, module in model.named_modules(remove_duplicate=False):
        prefix = name + "." if name else ""
        for n, p in module._parameters.items():
            if p is not None:
                targets[prefix + n] = p
        for n, b in module._buffers.items():
            if b is not None and n not in module._non_persistent_buffers_set:
                targets[prefix + n] = b
    return targets


def save_resu_safetensors(model: nn.Module, path: str) -> None:
    """Write ``model``'s parameters and persistent buffers (plain tensors and flattened
    ResuTensors) to one safetensors file; tied weights are stored once. Needs ``safetensors``.

    Example::

        rt.integrations.save_resu_safetensors(model, "model.safetensors")
    """
    from safetensors.torch import save_file

    state, aliases, seen = {}, {}, {}
    for key, value in state_targets(model).items():
        if id(value) in seen:
            aliases[key] = seen[id(value)]
            continue
        seen[id(value)] = key
        state[key] = value.detach()
    flat = {k: _own_storage(v) for k, v in flatten_state_dict(state).items()}
    metadata = {"format": "pt", "resu_tensor": FORMAT, "resu_tensor.aliases": json.dumps(aliases, sort_keys=True)}
    save_file(flat, os.fspath(path), metadata=metadata)


def read_safetensors(path: str, keys=None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (all, or only those in ``keys``), on the CPU. A file that is
    not valid safetensors raises ``ValueError``."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no safetensors file at {path!r}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            names = [k for k in f.keys() if keys is None or k in keys]
            return {k: f.get_tensor(k) for k in names}
    except Exception as error:  # safetensors raises its own SafetensorError (and OSError) types
        raise ValueError(f"cannot read {path!r} as safetensors: {error}") from None


def _is_resu_part(key: str, resu: set) -> bool:
    return key in resu or key.endswith(META) or (PART in key and key.split(PART, 1)[0] in resu)


def load_resu_state_dict(model: nn.Module, entries: dict, *, strict: bool = True) -> nn.Module:
    """Load flat ``entries`` (as written by :func:`save_resu_safetensors`, or by ``state_dict()``
    of a model with :func:`enable_flat_state_dict`) into ``model``, whose ResuTensor layers must
    be the checkpoint's: ``quantize_`` it first with the same filter (any config: the whole state
    is replaced). Everything is validated before anything is copied; a mismatch raises
    ``ValueError``. ``strict=False`` tolerates missing and unexpected plain entries."""
    targets = state_targets(model)
    ckpt_resu = set(resu_keys(entries))
    model_resu = {k for k, v in targets.items() if isinstance(v, ResuTensor)}
    unsatisfied = {k for k in model_resu if not any(targets[c] is targets[k] for c in ckpt_resu if c in targets)}
    if not ckpt_resu <= model_resu or unsatisfied:
        raise ValueError(
            "the checkpoint's ResuTensor weights do not match the model's: only in the checkpoint "
            f"{sorted(ckpt_resu - model_resu)}, only in the model {sorted(unsatisfied)}; "
            "quantize_ the model with the same filter_fn before loading")
    plain = {k: v for k, v in entries.items() if not _is_resu_part(k, ckpt_resu)}
    missing = sorted(k for k, t in targets.items()
                     if k not in model_resu and k not in plain and not any(targets.get(p) is t for p in plain))
    unexpected = sorted(k for k in plain if k not in targets)
    if strict and (missing or unexpected):
        raise ValueError(f"the checkpoint's keys do not match the model's: missing {missing}, unexpected {unexpected}")
    for key, value in plain.items():
        if key in targets and tuple(value.shape) != tuple(targets[key].shape):
            raise ValueError(f"{key}: shape mismatch: the checkpoint holds {list(value.shape)}, the model "
                             f"{list(targets[key].shape)}")
    rebuilt = {}
    for key in sorted(ckpt_resu):
        parts = {k: v for k, v in entries.items() if k == key or k.startswith(key + PART)}
        rebuilt[key] = rebuild_resu_tensor(key, parts, targets[key].logical_shape)
    with torch.no_grad():
        for key, value in rebuilt.items():
            targets[key].copy_(value)
        for key, value in plain.items():
            if key in targets:
                targets[key].copy_(value)
    return model


def load_resu_safetensors(model: nn.Module, path: str, *, strict: bool = True) -> nn.Module:
    """Restore a :func:`save_resu_safetensors` file into ``model`` exactly (modes, masks, θ,
    quantized W_A, selective state). ``model`` must have the checkpoint's ResuTensor layers:
    build it and ``quantize_`` it with the same filter first. A corrupt file or a mismatched
    one (keys, shapes, layers) raises ``ValueError`` before anything changes.

    Example::

        model = build_model(); quantize_(model, rt.resu_config())
        rt.integrations.load_resu_safetensors(model, "model.safetensors")
    """
    return load_resu_state_dict(model, read_safetensors(path), strict=strict)


__all__ = [
    "FORMAT", "flatten_resu_tensor", "rebuild_resu_tensor", "flatten_state_dict", "unflatten_state_dict",
    "resu_keys", "enable_flat_state_dict", "save_resu_safetensors", "load_resu_safetensors",
    "load_resu_state_dict", "read_safetensors", "state_targets",
]

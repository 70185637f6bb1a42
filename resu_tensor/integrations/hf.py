"""Hugging Face ``transformers`` integration: quantize a model, train it with ``Trainer``, save
and load it with ``save_pretrained`` / ``from_pretrained`` (safetensors).

Needs the ``hf`` extra (``pip install "resu-tensor[hf]"``: transformers, accelerate, safetensors).

Example::

    import resu_tensor as rt
    from resu_tensor.integrations import hf

    model = LlamaForCausalLM(LlamaConfig(...))              # or .from_pretrained(...)
    hf.quantize_hf_(model, rt.resu_config(sparsity=0.0))     # every supported layer, ties kept
    callback = hf.ResuCallback(rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4, sparsity=0.5))
    trainer = Trainer(model=model, args=TrainingArguments(..., optim="adamw_torch"),
                      train_dataset=data, callbacks=[callback])
    trainer.train()                                          # cycle stats land in trainer.state.log_history
    hf.save_resu_pretrained(model, "out")                    # or model.save_pretrained("out")
    again = hf.from_resu_pretrained(LlamaForCausalLM, "out") # exact: modes, masks, θ, 4-bit W_A

Optimizers: ``ResuCallback`` keeps the Trainer's optimizer as configured. ResuTensor weights
train on every path of torch's optimizers: ``Trainer``'s default ``optim="adamw_torch_fused"``
takes the library's fused Triton AdamW on CUDA (torch's fused op per weight on CPU), and
``"adamw_torch"`` the foreach path; your own optimizer goes through ``optimizers=(opt, None)``.
"""
import dataclasses
import json
import os
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from resu_tensor.training.config import ResuConfig, resu_config
from resu_tensor.training.modules import is_supported_module, resu_param_names
from resu_tensor.integrations.safetensors_io import (META, PART, enable_flat_state_dict, flatten_state_dict,
                                                     read_safetensors, rebuild_resu_tensor, resu_keys, state_targets)
from resu_tensor.method.schedule import ScheduleConfig
from resu_tensor.training.scheduler import CycleStats, ResuScheduler
from resu_tensor.core.tensor import ResuTensor


SCHEDULER_STATE_NAME = "resu_scheduler.pt"
FilterFn = Callable[[nn.Module, str], bool]


# ------------------------------------------------------------------------------------ which layers
def linear_filter(model: nn.Module, *, skip_output_embeddings: bool = True, skip_names: Iterable[str] = ()) -> FilterFn:
    """A ``filter_fn`` for ``quantize_`` that picks the model's ``nn.Linear`` layers except

    * the output embedding (``model.get_output_embeddings()``, e.g. ``lm_head``), tied to the
      input embedding or not (sparse LM heads hurt most);
    * any layer whose weight is shared with another module (tied weights);
    * layers whose qualified name equals, or ends with ``.`` + , an entry of ``skip_names``.

    Example::

        quantize_(model, rt.resu_config(), filter_fn=hf.linear_filter(model, skip_names=["score"]))
    """
    skip_names = tuple(skip_names)
    excluded = set()
    if skip_output_embeddings and hasattr(model, "get_output_embeddings"):
        head = model.get_output_embeddings()
        if head is not None:
            excluded.add(id(head))
    owners: dict[int, int] = {}
    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                owners[id(param)] = owners.get(id(param), 0) + 1

    def keep(module: nn.Module, fqn: str) -> bool:
        return (isinstance(module, nn.Linear) and id(module) not in excluded
                and owners.get(id(module.weight), 0) <= 1
                and not any(fqn == name or fqn.endswith("." + name) for name in skip_names))

    return keep


def quantize_hf_(model: nn.Module, config: Optional[ResuConfig] = None,
                 filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """``quantize_(model, config, filter_fn or rt.is_supported_module)`` and
    :func:`~resu_tensor.integrations.safetensors_io.enable_flat_state_dict`, so ``save_pretrained``
    and the Trainer's checkpoints work. ``config`` defaults to ``rt.resu_config()`` (DENSE). The
    default converts every supported layer (Linear, GPT-2's Conv1D, embeddings, the LM head) and
    keeps tied weights tied; :func:`linear_filter` keeps the embeddings and the head dense.

    Example::

        hf.quantize_hf_(model, rt.resu_config(sparsity=0.5))
        hf.quantize_hf_(model, rt.resu_config(sparsity=0.5), filter_fn=hf.linear_filter(model))
    """
    from torchao.quantization import quantize_

    quantize_(model, config if config is not None else resu_config(), filter_fn=filter_fn or is_supported_module)
    return enable_flat_state_dict(model)


# ------------------------------------------------------------------------------------ the callback
def unwrap_optimizer(optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` (or similar wrappers)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    return optimizer


def use_single_tensor_path_(optimizer: torch.optim.Optimizer) -> list[str]:
    """Switch every parameter group holding a ResuTensor from the fused / foreach kernels to the
    single-tensor (for-loop) path. Returns the flags changed, e.g. ["fused"]. Not needed for
    training: ResuTensor runs on all three paths; use it to compare paths or to debug one.

    Example::

        hf.use_single_tensor_path_(trainer.optimizer)   # ["fused"] for Trainer's default optim
    """
    changed = set()
    for group in optimizer.param_groups:
        if any(isinstance(p, ResuTensor) for p in group["params"]):
            for flag in ("fused", "foreach"):
                if group.get(flag):
                    group[flag] = False
                    changed.add(flag)
    if "fused" in changed and not any(g.get("fused") for g in optimizer.param_groups):
        optimizer._step_supports_amp_scaling = False  # GradScaler must unscale grads itself again
    return sorted(changed)


class ResuCallback(TrainerCallback):
    """Drives a :class:`~resu_tensor.training.scheduler.ResuScheduler` from ``transformers.Trainer``.

    At ``on_train_begin`` it builds the scheduler on the Trainer's model and optimizer (the one
    inside accelerate's wrapper); after every optimizer step (``on_step_end``) it calls
    ``scheduler.step(loss)``, which prunes, enters RESU and commits at phase boundaries and drops
    the stale optimizer state of the layers whose trainable set changed. ``loss`` is the model's
    own ``outputs.loss`` of the step (summed over micro-batches when the Trainer passes
    ``num_items_in_batch``, else averaged), caught by a forward hook; None if the model returns none.

    At every phase change it asks the Trainer to log (the Trainer's ``loss`` then averages over
    the steps since its previous log) and adds the change's figures to that log: at a prune
    ``resu/prune_cycle``, ``resu/target_sparsity``, ``resu/pruned_sparsity``; on entering
    RESU/QRESU ``resu/enter_cycle``, ``resu/theta``, ``resu/trainable`` (and ``resu/bits``);
    at the step that ends a cycle the cycle's stats (``resu/cycle``, ``resu/sparsity``,
    ``resu/resurrected``, ``resu/survivors``, ``resu/active``, ``resu/resurrected_share``,
    ``resu/mean_consistency``, ``resu/cycle_loss``). They appear in ``trainer.state.log_history``
    and in the ``logs`` every callback after this one receives; the scheduler also announces each
    change on the ``resu_tensor`` logger (``logging.getLogger("resu_tensor").setLevel("INFO")``
    with a handler shows them), and ``callback.scheduler.steps`` holds the per-step history.
    Reporting integrations (``report_to``: TensorBoard, W&B ...) sit before user callbacks in
    the Trainer's list; to have them report the stats too, move this callback ahead of them:
    ``handler = trainer.callback_handler; handler.callbacks.remove(cb); handler.callbacks.insert(1, cb)``.

    One progress bar: the Trainer's. The scheduler's own (``ScheduleConfig.progress``) is turned
    off unless ``progress=True``.

    Checkpoints: the model's ResuTensors go into ``model.safetensors`` through
    :func:`enable_flat_state_dict` (installed at ``on_init_end``/``on_train_begin``), the
    scheduler's own state into ``resu_scheduler.pt`` in each checkpoint folder, and
    ``trainer.train(resume_from_checkpoint=...)`` restores both exactly (the checkpoint must be
    ``output_dir/checkpoint-N`` or ``args.resume_from_checkpoint``; otherwise the scheduler only
    realigns its step count and warns). Pass the callback in ``Trainer(callbacks=[...])`` so the
    hooks exist before a resume loads the weights.

    Example::

        callback = ResuCallback(rt.ScheduleConfig(steps_per_cycle=200, num_cycles=3, sparsity=0.5))
        Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
        print(callback.scheduler.summary())
    """

    def __init__(self, config: ScheduleConfig, *, calibration=None, filter_fn: Optional[FilterFn] = None,
                 log_prefix: str = "resu/", progress: bool = False):
        if not isinstance(config, ScheduleConfig):
            raise TypeError(f"config must be a ScheduleConfig, got {type(config).__name__}")
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {progress!r}")
        if config.progress and not progress:  # the Trainer shows its own bar; a copy leaves the user's config alone
            config = dataclasses.replace(config, progress=False)
        self.config, self.calibration, self.filter_fn, self.log_prefix = config, calibration, filter_fn, log_prefix
        self.scheduler: Optional[ResuScheduler] = None
        self._pending: list[tuple[int, dict]] = []  # (step, log entries) of phase changes not logged yet
        self._losses: list[tuple[torch.Tensor, bool]] = []
        self._hook = None

    # ---------------------------------------------------------------- set-up
    def on_init_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            enable_flat_state_dict(model)

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise ValueError("ResuCallback needs the Trainer's model and optimizer (on_train_begin got none)")
        enable_flat_state_dict(model)
        optimizer = unwrap_optimizer(optimizer)
        if self.scheduler is None:
            self.scheduler = ResuScheduler(model, optimizer, self.config, calibration=self.calibration,
                                           filter_fn=self.filter_fn)
        else:  # a second train() call: the Trainer may have built a new optimizer
            self.scheduler.model, self.scheduler.optimizer = model, optimizer
        if state.global_step != self.scheduler.global_step:
            self._restore_scheduler(args, state)
        if self._hook is None:
            self._hook = model.register_forward_hook(self._record_loss, with_kwargs=True)

    def _restore_scheduler(self, args, state) -> None:
        candidates = [os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")]
        if isinstance(getattr(args, "resume_from_checkpoint", None), str):
            candidates.insert(0, args.resume_from_checkpoint)
        for folder in candidates:
            path = os.path.join(folder, SCHEDULER_STATE_NAME)
            if os.path.isfile(path):
                saved = torch.load(path, map_location="cpu", weights_only=True)
                if saved["global_step"] == state.global_step:
                    self.scheduler.load_state_dict(saved)
                    return
        warnings.warn(f"ResuCallback: resuming at step {state.global_step} without {SCHEDULER_STATE_NAME} "
                      f"(looked in {candidates}); the scheduler continues from that step, but this cycle's "
                      "statistics start afresh", stacklevel=3)
        self.scheduler.global_step = state.global_step

    def _record_loss(self, module, args, kwargs, output) -> None:
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if module.training and isinstance(loss, torch.Tensor):
            self._losses.append((loss.detach(), kwargs.get("num_items_in_batch") is not None))

    # ---------------------------------------------------------------- every step
    def _step_loss(self) -> Optional[torch.Tensor]:
        """The step's loss as a 0-d tensor, not read (the scheduler reads its losses together)."""
        if not self._losses:
            return None
        values = torch.stack([loss.float().reshape(()) for loss, _ in self._losses])
        summed = all(scaled for _, scaled in self._losses)
        self._losses.clear()
        return values.sum() if summed else values.mean()

    def on_step_end(self, args, state, control, **kwargs):
        if self.scheduler is None:
            return
        cycles, changes = len(self.scheduler.history), len(self.scheduler.phase_changes)
        self.scheduler.step(self._step_loss())
        entry = {}
        for change in self.scheduler.phase_changes[changes:]:
            entry.update(self.phase_change_logs(change))
        for stats in self.scheduler.history[cycles:]:
            entry.update(self.cycle_logs(stats))
        if entry:
            self._pending.append((self.scheduler.global_step, entry))
            control.should_log = True

    def phase_change_logs(self, change: dict) -> dict:
        """A prune's or a RESU entry's figures (an item of ``scheduler.phase_changes``) as Trainer
        log entries; commits go through :meth:`cycle_logs`."""
        if change["event"] == "prune":
            values = {"prune_cycle": change["cycle"], "target_sparsity": change["target_sparsity"],
                      "pruned_sparsity": change["sparsity"]}
        elif change["event"] == "enter_resu":
            values = {"enter_cycle": change["cycle"], "theta": change["theta"], "trainable": change["trainable"],
                      "bits": change["bits"]}
        else:
            values = {}
        return {self.log_prefix + k: v for k, v in values.items() if v is not None}

    def cycle_logs(self, stats: CycleStats) -> dict:
        """One cycle's stats as Trainer log entries (None values left out)."""
        values = {"cycle": stats.cycle, "sparsity": stats.sparsity, "resurrected": stats.resurrected,
                  "survivors": stats.survivors, "active": stats.active, "resurrected_share": stats.resurrected_share,
                  "mean_consistency": stats.mean_consistency, "cycle_loss": stats.loss}
        return {self.log_prefix + k: v for k, v in values.items() if v is not None}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        last = state.log_history[-1] if state.log_history else None
        for step, entry in pending:
            if step == state.global_step and last is not None and last.get("step") == step:
                last.update(entry)  # the entry Trainer.log just appended for these logs
            else:
                state.log_history.append({**entry, "step": step})
            if logs is not None and step == state.global_step:
                logs.update(entry)

    # ---------------------------------------------------------------- checkpoints and end
    def on_save(self, args, state, control, **kwargs):
        if self.scheduler is None or not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            torch.save(self.scheduler.state_dict(), os.path.join(folder, SCHEDULER_STATE_NAME))

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._losses.clear()


# ------------------------------------------------------------------------------------ save / load
def save_resu_pretrained(model, save_directory: str, **kwargs) -> None:
    """``model.save_pretrained(save_directory, **kwargs)`` with every ResuTensor flattened into
    plain tensors (see :mod:`resu_tensor.integrations.safetensors_io`): the checkpoint is a
    normal safetensors one that :func:`from_resu_pretrained` restores exactly, and that a plain
    ``from_pretrained`` loads as a dense model with the effective weights (the extra
    ``*.resu.*`` entries are reported as unexpected keys).

    Example::

        hf.save_resu_pretrained(model, "out"); hf.from_resu_pretrained(LlamaForCausalLM, "out")
    """
    if "state_dict" not in kwargs:
        kwargs["state_dict"] = flatten_state_dict(model.state_dict())
    model.save_pretrained(save_directory, **kwargs)


def _weight_files(path: str) -> dict[str, str]:
    """{tensor name: safetensors file} of a checkpoint folder (single file or sharded)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {"": path}
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as error:
            raise ValueError(f"cannot read the shard index {index!r}: {error}") from None
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    if os.path.isfile(single):
        return {"": single}
    raise ValueError(f"no model.safetensors (or its index) in {path!r}")


def safetensors_keys(file: str) -> list[str]:
    """The tensor names of one safetensors file (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(file), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as error:  # safetensors raises its own SafetensorError types
        raise ValueError(f"cannot read {os.fspath(file)!r} as safetensors: {error}") from None


def read_checkpoint(path: str, keys=None) -> dict[str, torch.Tensor]:
    """Tensors of a ``save_pretrained`` folder (single or sharded safetensors) or of one file."""
    files = _weight_files(path)
    if "" in files:
        return read_safetensors(files[""], keys)
    by_file: dict[str, list[str]] = {}
    for name, file in files.items():
        if keys is None or name in keys:
            by_file.setdefault(file, []).append(name)
    entries = {}
    for file, names in by_file.items():
        entries.update(read_safetensors(file, set(names)))
    return entries


@contextmanager
def _ignore_resu_keys(model_cls):
    # Our *.resu.* entries are no weights of the dense model: keep them out of the load report.
    had = "_keys_to_ignore_on_load_unexpected" in model_cls.__dict__
    old = model_cls.__dict__.get("_keys_to_ignore_on_load_unexpected")
    patterns = list(getattr(model_cls, "_keys_to_ignore_on_load_unexpected", None) or [])
    model_cls._keys_to_ignore_on_load_unexpected = patterns + [r"\.resu\."]
    try:
        yield
    finally:
        if had:
            model_cls._keys_to_ignore_on_load_unexpected = old
        else:
            del model_cls._keys_to_ignore_on_load_unexpected


def _one_key_per_tie(keys: list[str], targets: dict, entries: dict) -> list[str]:
    """One key per ResuTensor Parameter: of tied names (``lm_head.weight`` and
    ``transformer.wte.weight``) the one whose entries are complete; ``save_pretrained`` drops the
    tied copies (and tensors sharing their storage) of all but one name."""
    by_param: dict[int, list[str]] = {}
    for key in keys:
        by_param.setdefault(id(targets[key]), []).append(key)
    return [max(names, key=lambda k: (k in entries, sum(n.startswith(k + PART) for n in entries)))
            for names in by_param.values()]


def from_resu_pretrained(model_cls, pretrained_model_name_or_path: str, **kwargs):
    """Load a checkpoint written by :func:`save_resu_pretrained` (or by ``save_pretrained`` /
    the Trainer on a model with :func:`enable_flat_state_dict`): ``model_cls.from_pretrained``
    (``kwargs`` pass through), then ``quantize_`` exactly the layers the checkpoint holds as
    ResuTensors and restore their state (mode, mask, values, θ, quantized W_A, selective state)
    bit for bit. The result has :func:`enable_flat_state_dict` on. A local folder is needed.
    Mismatched or corrupt checkpoints raise ``ValueError``.

    Example::

        model = hf.from_resu_pretrained(LlamaForCausalLM, "out", dtype=torch.float32)
    """
    from torchao.quantization import quantize_

    path = os.fspath(pretrained_model_name_or_path)
    names = list(_weight_files(path))
    if names == [""]:
        names = safetensors_keys(_weight_files(path)[""])
    keys = resu_keys(names)
    if not keys:
        raise ValueError(f"{path!r} holds no ResuTensor weights (no '*{META}' entries); load it with "
                         "from_pretrained and quantize_ it instead")
    with _ignore_resu_keys(model_cls):
        model = model_cls.from_pretrained(path, **kwargs)
    wanted = set(keys)
    targets = state_targets(model)
    missing = sorted(k for k in wanted if k not in targets)
    if missing:
        raise ValueError(f"the checkpoint's ResuTensor weights {missing} are no parameters of {model_cls.__name__}")
    def in_checkpoint(module: nn.Module, fqn: str) -> bool:
        prefix = fqn + "." if fqn else ""
        return any(prefix + name in wanted for name in resu_param_names(module))

    quantize_(model, resu_config(), filter_fn=in_checkpoint)
    targets = state_targets(model)
    not_quantized = sorted(k for k in wanted if not isinstance(targets[k], ResuTensor))
    if not_quantized:
        raise ValueError(f"cannot make {not_quantized} ResuTensors: no supported layer holds them "
                         "(see rt.is_supported_module)")
    entries = read_checkpoint(path, {n for n in names if any(n == k or n.startswith(k + PART) for k in wanted)})
    rebuilt = {}
    for key in _one_key_per_tie(keys, targets, entries):
        parts = {n: t for n, t in entries.items() if n == key or n.startswith(key + PART)}
        rebuilt[key] = rebuild_resu_tensor(key, parts, targets[key].logical_shape)
    with torch.no_grad():
        for key, value in rebuilt.items():
            targets[key].copy_(value)
    return enable_flat_state_dict(model)


__all__ = [
    "ResuCallback", "linear_filter", "quantize_hf_", "save_resu_pretrained", "from_resu_pretrained",
    "unwrap_optimizer", "use_single_tensor_path_", "read_checkpoint", "SCHEDULER_STATE_NAME",
]

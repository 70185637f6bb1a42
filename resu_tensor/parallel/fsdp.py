"""FSDP2 (``torch.distributed.fsdp.fully_shard``) with ResuTensor weights sharded by rows.

``fully_shard`` splits every ResuTensor parameter along dim 0 (ops/sharding.py): each rank keeps a
ResuTensor of its row block — values (or QRESU's codes and scales) of those rows, the mask
re-encoded from them, θ / subset / EMA slices, its own trainable set — wrapped in FSDP's DTensor.
Forward and backward run dense ``F.linear`` on the all-gathered effective weight, and gradients
become CompactTensors of each shard's trainable coordinates (core/fsdp_extension.py).

The model-level API is the one of an unsharded model: ``rt.prune_``, ``rt.enter_resu_``,
``rt.commit_``, ``rt.calibrate``, ``rt.reset_optimizer_state_`` and ``rt.ResuScheduler`` handle
sharded weights themselves. Mode changes gather the whole layers on every rank
(:func:`full_weights`), run the single-process code identically everywhere and write each rank's
rows back, so masks equal a single-process run's and the amnesty tournament is the global one.
N-D conv weights shard by out-channels (FSDP's default ``Shard(0)``). A transposed (in, out)
weight (transformers' Conv1D) shards by its storage rows, logical dim 1: pass
``fully_shard(..., shard_placement_fn=rtf.shard_placement)`` (FSDP2 then needs its out-features
divisible by the number of ranks); FSDP's default dim 0 would cut its storage columns, which is
refused. This module keeps the names it always offered: the functions above as aliases of the ``rt``
ones, and :func:`full_weights`, :func:`full_tensor`, :func:`sharded_weights`, ``slice_rows``
(training/sharded.py, core/row_blocks.py).

Example::

    from torch.distributed.fsdp import fully_shard
    from resu_tensor import fsdp as rtf

    quantize_(model, rt.resu_config(sparsity=0.0))      # same seed on every rank
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    scheduler = rt.ResuScheduler(model, optimizer, rt.ScheduleConfig(steps_per_cycle=500, num_cycles=4))
    for x, y in loader:
        loss_fn(model(x), y).backward(); optimizer.step(); optimizer.zero_grad()
        scheduler.step()
    w = rtf.full_tensor(model.blocks[0].fc.weight)      # the whole ResuTensor, on every rank
"""
from resu_tensor.core.fsdp_extension import shard_placement
from resu_tensor.core.row_blocks import slice_rows
from resu_tensor.training.calibration import calibrate
from resu_tensor.training.lifecycle import commit_, enter_resu_, prune_
from resu_tensor.training.optimizer_state import reset_optimizer_state_
from resu_tensor.training.scheduler import ResuScheduler
from resu_tensor.training.sharded import full_tensor, full_weights, sharded_weights

__all__ = ["full_weights", "full_tensor", "sharded_weights", "prune_", "enter_resu_", "commit_", "calibrate",
           "reset_optimizer_state_", "ResuScheduler", "slice_rows", "shard_placement"]

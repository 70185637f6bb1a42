"""A static RESU-Selective subset S ⊂ P as a weight's trainable set."""
from typing import Optional

import torch

from resu_tensor.core.mask_encoding import encode_mask
from resu_tensor.core.state import QuantizedActive
from resu_tensor.method.selective import EMA_DTYPES, StaticSubsetConfig, subset_mask


def restrict_to_subset_(tensor: torch.Tensor, config: StaticSubsetConfig, scores: Optional[torch.Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> None:
    """Make only a static subset S ⊂ P of a RESU/QRESU weight trainable (a new trainable set)."""
    if tensor.trainable_side not in ("pruned", "subset"):
        raise ValueError("a static subset needs a RESU weight whose active set is frozen (freeze_active=True)")
    subset = subset_mask(~tensor.storage_mask(), config.alpha, scores, generator)
    resu_state = {}
    if tensor.selective is not None:
        n = int(subset.sum())
        dtype = EMA_DTYPES[tensor.selective.ema_dtype]
        resu_state.update(selective=tensor.selective, selective_m=torch.zeros(n, dtype=dtype, device=subset.device),
                          selective_v=torch.zeros(n, dtype=dtype, device=subset.device))
    if tensor.grad_abs_sum is not None:
        resu_state["grad_abs_sum"] = torch.zeros(int(subset.sum()), device=subset.device)
    storage = {"values": tensor.values} if tensor.values is not None else {"quantized": QuantizedActive(
        tensor.qdata, tensor.qscale, tensor.qoffset, tensor.theta, tensor.quant_bits, tensor.group_size)}
    tensor.set_state_(mode=tensor.mode, mask=tensor.encoded_mask(), trainable_side="subset",
                      subset=encode_mask(subset), **storage, **resu_state)

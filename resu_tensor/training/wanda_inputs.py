"""What each column of an Embedding's, a MultiheadAttention's or an RNN/LSTM/GRU's weight matrix
multiplies, as Σ x² per column over one forward call: the Wanda input norms of layers whose
input is not simply the module's first argument.

* ``nn.Embedding``: ``weight[i]`` is ``one_hot(ids) @ weight``, i.e. row i of the (num_embeddings,
  dim) storage is multiplied by the one-hot input feature i, whose Σ x² over the tokens is the
  count of token i. The norms are per (row, column): row i holds sqrt(count of token i) in every
  column, so the Wanda score is |W_ij|·sqrt(count_i) (rows of unseen tokens score 0).
* ``nn.MultiheadAttention``: ``in_proj_weight`` (3E, E) multiplies ``query`` in its first E rows,
  ``key`` in the next E, ``value`` in the last E: per-(row, column) norms of those three blocks.
  ``q_proj_weight`` / ``k_proj_weight`` / ``v_proj_weight`` get the (cols,) norms of query, key,
  value. Its ``out_proj`` (a Linear that the attention calls functionally, so no hook of its own
  fires) multiplies the heads' concatenated outputs: those of a copy of the module whose output
  projection is the identity without bias (exact: a product with an identity matrix rounds nothing).
* ``nn.RNN/LSTM/GRU``: ``weight_ih_l0`` multiplies the module input at every step; ``weight_ih_lk``
  (k > 0) multiplies layer k−1's output sequence (both directions concatenated); ``weight_hh_lk``
  multiplies layer k's previous hidden state: h0 at the first step, then the layer's outputs but
  its last one (in the direction's processing order). Layer k's outputs are the output sequence
  of a copy of the module with ``num_layers=k+1`` and the same (effective, dense) weights, which is
  exactly what the fused op computes (dropout is off in calibration: eval mode).
"""
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from resu_tensor.core.tensor import ResuTensor


def _argument(args: tuple, kwargs: dict, position: int, name: str):
    return args[position] if len(args) > position else kwargs.get(name)


def _feature_squares(x: torch.Tensor) -> torch.Tensor:
    """Σ x² per feature (last dim) over every leading dim, float32."""
    return x.detach().float().reshape(-1, x.shape[-1]).pow(2).sum(0)


def embedding_sums_of_squares(embedding: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    """(num_embeddings, embedding_dim) float32: the count of token i in ``ids`` in every column of
    row i (the Σ x² of the one-hot input feature row i multiplies).

    Example::

        embedding_sums_of_squares(nn.Embedding(4, 2), torch.tensor([1, 1, 3]))[:, 0]   # [0., 2., 0., 1.]
    """
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"nn.Embedding expects integer token ids, got "
                         f"{ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    rows, cols = embedding.num_embeddings, embedding.embedding_dim
    counts = torch.bincount(ids.detach().reshape(-1).long(), minlength=rows).float()
    if counts.numel() != rows:
        raise ValueError(f"nn.Embedding got token ids up to {counts.numel() - 1}, but has {rows} embeddings")
    return counts[:, None].expand(rows, cols).contiguous()


def attention_sums_of_squares(attention: nn.MultiheadAttention, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """{parameter name: Σ x² per column} of ``attention``'s projections over one call
    ``attention(*args, **kwargs)``: ``in_proj_weight`` (3E, E) per row block (query, key, value),
    or ``q/k/v_proj_weight`` (cols,) each, and ``out_proj.weight`` (E,).

    Example::

        attention_sums_of_squares(mha, (x, x, x), {})["in_proj_weight"].shape   # (3E, E)
    """
    inputs = [_argument(args, kwargs, i, name) for i, name in enumerate(("query", "key", "value"))]
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ValueError("nn.MultiheadAttention expects query, key and value tensors")
    squares = [_feature_squares(x) for x in inputs]
    if attention._qkv_same_embed_dim:
        rows = attention.embed_dim
        result = {"in_proj_weight": torch.cat([s.expand(rows, -1) for s in squares])}
    else:
        result = dict(zip(("q_proj_weight", "k_proj_weight", "v_proj_weight"), squares))
    heads = _heads_output(attention, args, kwargs)
    result["out_proj.weight"] = _feature_squares(heads)
    return result


def _heads_output(attention: nn.MultiheadAttention, args: tuple, kwargs: dict) -> torch.Tensor:
    """What ``attention.out_proj`` multiplies in the call ``attention(*args, **kwargs)``."""
    embed = attention.embed_dim
    copy = nn.MultiheadAttention(embed, attention.num_heads, bias=attention.in_proj_bias is not None,
                                 add_bias_kv=attention.bias_k is not None, add_zero_attn=attention.add_zero_attn,
                                 kdim=attention.kdim, vdim=attention.vdim, batch_first=attention.batch_first)
    params = dict(attention.named_parameters())
    with torch.no_grad():
        for name, _ in list(copy.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            module = copy.get_submodule(owner) if owner else copy
            if name == "out_proj.weight":
                value = torch.eye(embed, dtype=params[name].dtype, device=params[name].device)
            elif name == "out_proj.bias":
                value = torch.zeros_like(params[name])
            else:
                value = _dense(params[name]).clone()
            setattr(module, leaf, nn.Parameter(value, requires_grad=False))
        return copy.eval()(*args, **kwargs)[0]


def _dense(p: torch.Tensor) -> torch.Tensor:
    return p.dequantize() if isinstance(p, ResuTensor) else p.detach()


def _first_layers(rnn: nn.RNNBase, n_layers: int) -> nn.RNNBase:
    """A plain copy of ``rnn``'s first ``n_layers`` layers, with its effective weights, no dropout."""
    options = dict(input_size=rnn.input_size, hidden_size=rnn.hidden_size, num_layers=n_layers, bias=rnn.bias,
                   batch_first=rnn.batch_first, bidirectional=rnn.bidirectional)
    if isinstance(rnn, nn.LSTM):
        options["proj_size"] = rnn.proj_size
    if isinstance(rnn, nn.RNN):
        options["nonlinearity"] = rnn.nonlinearity
    copy = type(rnn)(**options)
    params = dict(rnn.named_parameters())
    with torch.no_grad():
        for name in copy._flat_weights_names:
            setattr(copy, name, nn.Parameter(_dense(params[name]).clone(), requires_grad=False))
    return copy.eval()


def recurrent_sums_of_squares(rnn: nn.RNNBase, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
    """{parameter name: Σ x² per column} of every ``weight_ih_l*`` and ``weight_hh_l*`` of
    ``rnn`` over one call ``rnn(input, hx)`` (see the module docstring for what each multiplies).
    A PackedSequence input is refused (pass the padded tensor).

    Example::

        recurrent_sums_of_squares(lstm, (x,), {})["weight_hh_l1"].shape   # (hidden_size,)
    """
    x = _argument(args, kwargs, 0, "input")
    hx = _argument(args, kwargs, 1, "hx")
    if isinstance(x, PackedSequence):
        raise ValueError(f"{type(rnn).__name__} got a PackedSequence; Wanda calibration needs the padded input tensor")
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
        raise ValueError(f"{type(rnn).__name__} expects a 2-D or 3-D input tensor, got "
                         f"{getattr(x, 'shape', type(x).__name__)}")
    time_dim = 1 if x.dim() == 3 and rnn.batch_first else 0
    directions = 2 if rnn.bidirectional else 1
    h0 = hx[0] if isinstance(hx, tuple) else hx  # an LSTM's (h0, c0); None: zeros
    suffixes = ["", "_reverse"][:directions]
    squares = {"weight_ih_l0" + s: _feature_squares(x) for s in suffixes}
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            layer_hx = None
            if hx is not None:
                cut = (layer + 1) * directions
                layer_hx = tuple(h[:cut] for h in hx) if isinstance(hx, tuple) else hx[:cut]
            output, _ = _first_layers(rnn, layer + 1)(x, layer_hx)
            if layer + 1 < rnn.num_layers:
                for s in suffixes:
                    squares[f"weight_ih_l{layer + 1}{s}"] = _feature_squares(output)
            width = output.shape[-1] // directions
            for d, s in enumerate(suffixes):
                sequence = output[..., d * width:(d + 1) * width]
                steps = sequence.shape[time_dim]  # the direction's last output is no step's input
                total = _feature_squares(sequence.narrow(time_dim, 0 if d == 0 else 1, steps - 1))
                if h0 is not None:
                    total = total + _feature_squares(h0[layer * directions + d])
                squares[f"weight_hh_l{layer}{s}"] = total
    return squares


__all__ = ["embedding_sums_of_squares", "attention_sums_of_squares", "recurrent_sums_of_squares"]

"""Element-wise ops on trainable coordinates: what optimizers, grad clipping and gradient
accumulation call on a ResuTensor parameter and on its CompactTensor grads and state.

Every ResuTensor / CompactTensor argument is replaced by its flat trainable vector, the op runs
on those vectors, and the result is wrapped back. An in-place op on a ResuTensor writes only its
trainable coordinates, so frozen coordinates never move, weight decay included. Arguments of
different trainable sets (stale optimizer state) raise instead of being misapplied. The in-place
ops optimizers call on a bitmap-selected weight take one kernel pass instead (:func:`bitmap_update_`).

Beyond the explicit lists, one rule covers every aten op torch tags ``pointwise``: with a
CompactTensor operand it runs on the flat vectors, and its in-place / ``out=`` forms write the
trainable coordinates of a ResuTensor or CompactTensor target (:func:`pointwise_write`); writes
under a boolean CompactTensor mask (``g[g.gt(0)] = 1``) do the same (:func:`masked_write`).

Example::

    m = torch.zeros_like(w)                 # CompactTensor state of w's trainable coordinates
    m.lerp_(w.grad, 0.1); w.add_(m.sign(), alpha=-1e-3)   # Lion: frozen coordinates never move
"""
import math
from typing import Optional

import torch
import torch._inductor.inductor_prims  # defines prims.fma (torchao imports it already)
from torch.utils._pytree import tree_map

from resu_tensor import kernels
from resu_tensor.core.compact import CompactTensor
from resu_tensor.core.mode import Mode
from resu_tensor.core.tensor import ResuTensor, is_traced
from resu_tensor.ops.fallback import dense_fallback, written_arguments

aten = torch.ops.aten

_STALE_HINT = (
    "it was created for an earlier trainable set of this weight (its mode or mask changed since). "
    "Call rt.reset_optimizer_state_(optimizer, model) after mode changes; the ResuScheduler does it for you."
)


def _overload(packet, names):
    return [getattr(packet, n) for n in names if hasattr(packet, n)]


# Optimizer state of a parameter: compact even with the parameter as the only operand.
LIKE_OPS = frozenset([aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
                      aten.full_like.default, aten.rand_like.default, aten.randn_like.default])
ELEMENTWISE_OPS = [
    *_overload(aten.add, ["Tensor", "Scalar"]), *_overload(aten.add_, ["Tensor", "Scalar"]),
    *_overload(aten.sub, ["Tensor", "Scalar"]), *_overload(aten.sub_, ["Tensor", "Scalar"]),
    *_overload(aten.mul, ["Tensor", "Scalar"]), *_overload(aten.mul_, ["Tensor", "Scalar"]),
    *_overload(aten.div, ["Tensor", "Scalar"]), *_overload(aten.div_, ["Tensor", "Scalar"]),
    aten.addcdiv.default, aten.addcdiv_.default, aten.addcmul.default, aten.addcmul_.default,
    *_overload(aten.lerp, ["Scalar", "Tensor"]), *_overload(aten.lerp_, ["Scalar", "Tensor"]),
    aten.sqrt.default, aten.sqrt_.default, aten.rsqrt.default, aten.neg.default, aten.neg_.default,
    aten.abs.default, aten.abs_.default, aten.sign.default, aten.reciprocal.default,
    aten.clamp.default, aten.clamp_.default, aten.clamp_min.default, aten.clamp_min_.default,
    aten.clamp_max.default, aten.clamp_max_.default,
    aten.maximum.default, aten.minimum.default,
    *_overload(aten.pow, ["Tensor_Scalar"]), *_overload(aten.pow_, ["Scalar"]),
    aten.zero_.default, *_overload(aten.fill_, ["Scalar"]),
    *LIKE_OPS,
    aten.uniform_.default, aten.normal_.default,  # nn.init re-initialising a weight (trainable coordinates)
    aten.isnan.default, aten.isinf.default, aten.sgn.default,
    *_overload(aten.eq, ["Tensor", "Scalar"]), *_overload(aten.ne, ["Tensor", "Scalar"]),
    *_overload(aten.gt, ["Tensor", "Scalar"]), *_overload(aten.lt, ["Tensor", "Scalar"]),
    *_overload(aten.ge, ["Tensor", "Scalar"]), *_overload(aten.le, ["Tensor", "Scalar"]),
    aten.logical_not.default,
    # Dynamo rewrites add_(alpha=tensor), addcmul_(value=) and addcdiv_(value=) into
    # fma(a, value, self) followed by self.copy_(result) (config.enable_dynamo_decompositions).
    *_overload(torch.ops.prims.fma, ["default"]),
]
# Reductions over every element; trainable coordinates are the only non-zero gradient entries.
FULL_REDUCTIONS = [aten.linalg_vector_norm.default, aten.sum.default, aten.max.default, aten.min.default,
                   aten.any.default, aten.all.default, aten.amax.default, aten.amin.default,
                   aten._is_any_true.default]  # anomaly mode's NaN check of every gradient
# Ops that only make sense on grads / state, never on the weight (copy_ of weights: layout.py).
COMPACT_ONLY_OPS = [aten.copy_.default, aten.clone.default]
# Full reductions a flat trainable vector answers for its dense expansion (zeros elsewhere change
# neither a sum, a positive-order norm nor an any); max, min, all, ... need the zeros.
_ZERO_BLIND_REDUCTIONS = frozenset([aten.sum.default, aten.any.default, aten._is_any_true.default])


class _Operands:
    """The trainable set shared by an op's arguments, and how to flatten each argument."""

    def __init__(self, func, args, kwargs):
        subclass_args = [a for a in (*args, *kwargs.values()) if isinstance(a, (ResuTensor, CompactTensor))]
        self.func = func
        self.key = subclass_args[0].trainable_key
        self.transposed = subclass_args[0].transposed
        self.logical_shape = subclass_args[0].logical_shape
        self.weight = next((a for a in subclass_args if isinstance(a, ResuTensor)), None)
        first = subclass_args[0]
        self.n_trainable = first.flat.numel() if isinstance(first, CompactTensor) else first.trainable_count
        for a in subclass_args:
            if a.trainable_key != self.key:
                raise ValueError(f"{func}: an argument does not match this weight's trainable coordinates: {_STALE_HINT}")
            if a.transposed != self.transposed:
                raise ValueError(f"{func}: cannot mix a transposed weight view with an untransposed one")

    def flat(self, a):
        if isinstance(a, CompactTensor):
            return a.flat
        if isinstance(a, ResuTensor):
            return a.trainable_values()
        if isinstance(a, torch.Tensor) and a.numel() > 1:
            if tuple(a.shape) == self.logical_shape and self.weight is not None:
                return self.weight.gather_trainable(self.weight.to_storage(a).contiguous())
            raise TypeError(
                f"{self.func}: cannot combine a {tuple(a.shape)} plain tensor with a ResuTensor/CompactTensor "
                f"of shape {self.logical_shape}; convert it with weight.gather_trainable() / weight.expand_trainable()"
            )
        return a

    def wrap(self, out):
        if isinstance(out, (tuple, list)):  # ops with several results (frexp, ...)
            return type(out)(self.wrap(o) for o in out)
        if isinstance(out, torch.Tensor) and out.dim() == 1 and out.numel() == self.n_trainable:
            return CompactTensor(out, self.key, self.logical_shape, self.transposed)
        return out


_INPLACE = {}  # op → whether it writes its first argument (the schema is rebuilt per access)


def _is_inplace(func) -> bool:
    inplace = _INPLACE.get(func)
    if inplace is None:
        inplace = _INPLACE[func] = func._schema.name.endswith("_")
    return inplace


def _has_compact(args, kwargs) -> bool:
    return any(isinstance(a, CompactTensor) for a in (*args, *kwargs.values()))


def stays_compact(func, args, kwargs) -> bool:
    """Whether an element-wise op works on trainable coordinates: it writes into a parameter or
    its state (in place), makes state like a parameter (``*_like``), or has a CompactTensor
    operand. Anything else, e.g. ``w.abs()`` or ``w == 0`` on the parameter alone, reads W_eff."""
    if _is_inplace(func):
        return isinstance(args[0], (ResuTensor, CompactTensor))
    if func in LIKE_OPS:
        return True
    # A full plain tensor alongside a gradient (g + noise) has values outside the trainable set:
    # only the dense result keeps them.
    operands = (*args, *kwargs.values())
    return _has_compact(args, kwargs) and not any(
        type(a) is torch.Tensor and a.numel() > 1 and not is_traced(a) for a in operands)


def _on_flat_vectors(func, args, kwargs):
    """Run ``func`` straight on the flat vectors when its tensor operands are all CompactTensors
    of one trainable set (0-d tensors and numbers aside): an optimizer's state updates, most of
    its ops, need no weight, no gathering and no argument-by-argument flattening, only the
    wrapping of the result. None (nothing run) for any other mix, which the general path serves."""
    first = None
    flat_args = []
    for a in args:
        if type(a) is CompactTensor:
            if first is None:
                first = a
            elif a.trainable_key != first.trainable_key or a.transposed != first.transposed:
                return None  # the general path raises its error
            a = a.flat
        elif isinstance(a, (torch.Tensor, list, tuple)) and not (type(a) is torch.Tensor and a.dim() == 0):
            return None
        flat_args.append(a)
    if first is None or any(isinstance(v, (torch.Tensor, list, tuple)) for v in kwargs.values()):
        return None
    out = func(*flat_args, **kwargs)
    if _is_inplace(func):
        return args[0]
    n = first.flat.numel()
    if isinstance(out, (tuple, list)):
        return type(out)(first.with_flat(o) if isinstance(o, torch.Tensor) and o.dim() == 1 and o.numel() == n
                         else o for o in out)
    return first.with_flat(out) if isinstance(out, torch.Tensor) and out.dim() == 1 and out.numel() == n else out


def trainable_op(func, types, args, kwargs):
    kwargs = kwargs or {}
    if type(args[0]) is CompactTensor and func not in LIKE_OPS:
        out = _on_flat_vectors(func, args, kwargs)
        if out is not None:
            return out
    if not stays_compact(func, args, kwargs):
        return dense_fallback(func, types, args, kwargs)
    if func in LIKE_OPS and isinstance(args[0], ResuTensor) and kwargs.get("dtype") is None:
        # state like a parameter has the parameter's dtype (what optimizers check), also where
        # its trainable values are stored in another (a QRESU θ dtype)
        kwargs = {**kwargs, "dtype": args[0].dtype}
    operands = _Operands(func, args, kwargs)
    if bitmap_update_(func, operands, args, kwargs):
        return args[0]
    flat_args = tree_map(operands.flat, args)
    flat_kwargs = tree_map(operands.flat, kwargs)
    out = func(*flat_args, **flat_kwargs)
    if not _is_inplace(func):
        return operands.wrap(out)
    write_back(func, args[0], flat_args[0])
    return args[0]


# In-place ops with a one-pass kernels.update_by_bitmap_ form: op → (its update_by_bitmap_ op, the
# schema names of its compact operands, of its scalar). Tensor scalars and weights keep the generic path.
BITMAP_UPDATES = {
    aten.mul_.Scalar: ("mul_scalar", (), "other"),
    aten.mul_.Tensor: ("mul", ("other",), None),
    aten.add_.Tensor: ("add", ("other",), "alpha"),
    aten.addcmul_.default: ("addcmul", ("tensor1", "tensor2"), "value"),
    aten.addcdiv_.default: ("addcdiv", ("tensor1", "tensor2"), "value"),
    aten.lerp_.Scalar: ("lerp", ("end",), "weight"),
    # the _foreach_ forms, called per list position (a ScalarList gives that position's scalar)
    aten._foreach_mul_.Scalar: ("mul_scalar", (), "scalar"),
    aten._foreach_mul_.ScalarList: ("mul_scalar", (), "scalars"),
    aten._foreach_mul_.List: ("mul", ("other",), None),
    aten._foreach_add_.List: ("add", ("other",), "alpha"),
    aten._foreach_addcmul_.Scalar: ("addcmul", ("tensor1", "tensor2"), "value"),
    aten._foreach_addcmul_.ScalarList: ("addcmul", ("tensor1", "tensor2"), "scalars"),
    aten._foreach_addcdiv_.Scalar: ("addcdiv", ("tensor1", "tensor2"), "value"),
    aten._foreach_addcdiv_.ScalarList: ("addcdiv", ("tensor1", "tensor2"), "scalars"),
    aten._foreach_lerp_.Scalar: ("lerp", ("tensors1",), "weight"),
    **{op: ("lerp", ("tensors1",), "weight") for op in _overload(aten._foreach_lerp_, ["ScalarList"])},
    aten._foreach_copy_.default: ("copy", ("src",), None),
}
_OPMATH_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # operands the kernel reads into float32 exactly


_NO_DEFAULT = object()
# op → ((argument name, default or _NO_DEFAULT), ...): reading a schema builds its Python objects
# anew on every access, several times the cost of the op on a small weight.
_SCHEMA_ARGUMENTS = {}


def _schema_arguments(func) -> tuple:
    arguments = _SCHEMA_ARGUMENTS.get(func)
    if arguments is None:
        arguments = _SCHEMA_ARGUMENTS[func] = tuple(
            (a.name, a.default_value if a.has_default_value() else _NO_DEFAULT) for a in func._schema.arguments)
    return arguments


def _named_arguments(func, args, kwargs) -> dict:
    named = {}
    for i, (name, default) in enumerate(_schema_arguments(func)):
        if i < len(args):
            named[name] = args[i]
        elif name in kwargs:
            named[name] = kwargs[name]
        elif default is not _NO_DEFAULT:
            named[name] = default
    return named


def bitmap_update_args(func, flat_of, named: dict) -> Optional[tuple]:
    """The arguments of one kernels.update_by_bitmap_ pass that runs in-place op ``func`` (for a
    _foreach_ op: one list position's arguments; ``named``: by schema name), when its target is a dense-stored ResuTensor
    whose trainable set is a bitmap, its other tensors are CompactTensors (the caller has checked
    they share the target's trainable set; ``flat_of`` gives their flat vectors) and its scalar a
    number; else None, and the caller runs gather → op → scatter."""
    form = BITMAP_UPDATES.get(func)
    if form is None:
        return None
    op, tensor_names, scalar_name = form
    target = named["self"]
    if not isinstance(target, ResuTensor) or target.values is None or (target.transposed and target.layout_view):
        return None  # a transposed view (w.t()): the generic path raises its error
    if op == "mul" and isinstance(named["other"], (int, float)):  # p.mul_(0.9) dispatches as mul_.Tensor
        op, tensor_names, scalar_name = "mul_scalar", (), "other"
    tensors = [named[name] for name in tensor_names]
    scalar = named[scalar_name] if scalar_name else 1.0
    if (not all(isinstance(t, CompactTensor) and t.flat.dtype in _OPMATH_DTYPES for t in tensors)
            or not isinstance(scalar, (int, float))):
        return None
    bits = target.bitmap_kernels_for(target.values)
    if bits is None:
        return None
    flats = [flat_of(t) for t in tensors] + [None] * (2 - len(tensors))
    return (target.values, *bits[:4], op, *flats, float(scalar))


def bitmap_update_(func, operands: _Operands, args, kwargs) -> bool:
    """Run in-place op ``func`` as one kernels.update_by_bitmap_ pass if :func:`bitmap_update_args`
    allows; whether it did."""
    update = bitmap_update_args(func, operands.flat, _named_arguments(func, args, kwargs))
    if update is not None:
        kernels.update_by_bitmap_(*update)
    return update is not None


def write_back(func, target, flat: torch.Tensor) -> None:
    """After an in-place op ran on ``flat`` (the target's trainable values), store it into a
    ResuTensor target; CompactTensor targets were updated in place already."""
    if not isinstance(target, ResuTensor):
        return
    if target.transposed and target.layout_view:
        raise ValueError(f"{func}: in-place updates apply to the weight itself, not to a transposed view (w.t())")
    # Decided from the layout, not by comparing data_ptr(): traced (torch.compile) tensors have none.
    if not target.trainable_values_are_storage:
        target.write_trainable_(flat)


def _reads_flat(func, named: dict, operands: _Operands) -> bool:
    """Whether a full reduction of CompactTensors gives its dense expansion's answer on the flat
    trainable vector: always when every coordinate trains, else only for zero-blind reductions."""
    if operands.n_trainable == math.prod(operands.logical_shape):
        return True
    if func is aten.linalg_vector_norm.default:
        return named.get("ord", 2) > 0
    return func in _ZERO_BLIND_REDUCTIONS


def full_reduction(func, types, args, kwargs):
    """A reduction of a gradient or optimizer state reduces its dense expansion (on the flat
    trainable vector where that gives the same answer); of the parameter alone, W_eff."""
    kwargs = kwargs or {}
    named = _named_arguments(func, args, kwargs)
    if named.get("dim") not in (None, [], ()) or not _has_compact(args, kwargs):
        return dense_fallback(func, types, args, kwargs)
    operands = _Operands(func, args, kwargs)
    if not _reads_flat(func, named, operands):
        return dense_fallback(func, types, args, kwargs)
    return func(*tree_map(operands.flat, args), **tree_map(operands.flat, kwargs))


def pointwise_write(func, types, args, kwargs):
    """Any in-place or ``out=`` form of a pointwise aten op (torch's ``pointwise`` tag) that
    writes into a ResuTensor or CompactTensor: it runs on the flat trainable vectors of its
    operands (which must share one trainable set; plain tensors of the logical shape next to a
    weight are gathered at its trainable coordinates, 0-d tensors and numbers stay as they are),
    so a parameter changes at its trainable coordinates only and state stays compact. One rule
    for ``sign_``, ``maximum(out=)``, ``sqrt_``, ``clamp_(min=tensor)``, ... instead of a list.
    An op writing into plain tensors only runs on the dense views (the dense fallback)."""
    kwargs = kwargs or {}
    written = [value for _, value in written_arguments(func, args, kwargs)]
    subclass = [isinstance(t, (ResuTensor, CompactTensor)) for t in written]
    if not any(subclass):
        return dense_fallback(func, types, args, kwargs)
    if not all(subclass):
        raise TypeError(f"{func}: writes into a ResuTensor/CompactTensor and a plain tensor at once; write into "
                        "tensors of one kind (compute on w.expand_trainable(t) for a dense result)")
    if _is_inplace(func):
        return trainable_op(func, types, args, kwargs)
    operands = _Operands(func, args, kwargs)
    flat_args, flat_kwargs = tree_map(operands.flat, args), tree_map(operands.flat, kwargs)
    func(*flat_args, **flat_kwargs)
    for target, (_, flat) in zip(written, written_arguments(func, flat_args, flat_kwargs)):
        write_back(func, target, flat)
    return written[0] if len(written) == 1 else tuple(written)


def masked_write(func, types, args, kwargs):
    """``t[mask] = v`` (index_put_) and ``t.masked_fill_(mask, v)`` on a gradient, optimizer state
    or parameter, with a boolean mask that is a CompactTensor of the same trainable set (e.g.
    Rprop's ``sign[sign.gt(0)] = etaplus``): the write runs on the flat trainable vectors. Other
    indices (integer, or a plain mask) raise: they address dense coordinates the compact target
    does not hold."""
    kwargs = kwargs or {}
    named = _named_arguments(func, args, kwargs)
    masks = named["indices"] if func._overloadpacket is aten.index_put_ else [named["mask"]]
    if not isinstance(named["self"], (ResuTensor, CompactTensor)):
        return dense_fallback(func, types, args, kwargs)
    if not (len(masks) == 1 and isinstance(masks[0], CompactTensor) and masks[0].dtype == torch.bool):
        raise TypeError(
            f"{func}: indexed writes into a ResuTensor/CompactTensor take one boolean CompactTensor mask of the same "
            "trainable set (e.g. g[g.gt(0)] = 1.0); for other indices compute on a dense copy "
            "(w.expand_trainable(g)) and write back with a supported in-place op")
    return trainable_op(func, types, args, kwargs)


def detach_inplace(func, types, args, kwargs):
    return args[0]


def new_like_logical(func, types, args, kwargs):
    """new_empty/new_zeros/new_empty_strided at the logical shape → a compact tensor of that set
    (AccumulateGrad calls these when it clones a gradient); at any other shape, a plain tensor
    (e.g. Adafactor's row and column statistics, ``grad.new_zeros(out, 1)``)."""
    self, size = args[0], tuple(args[1])
    factory = torch.zeros if func is aten.new_zeros.default else torch.empty
    dtype = kwargs.get("dtype") or self.dtype
    device = kwargs.get("device") or self.device
    if size != tuple(self.shape):
        return factory(size, dtype=dtype, device=device)
    return self.with_flat(factory(self.flat.numel(), dtype=dtype, device=device))


def detach_compact(func, types, args, kwargs):
    """Autograd detaches every gradient it accumulates. Eagerly a new wrapper around the same
    flat vector is all detach means here; the generic path (torchao's, which re-aliases the
    wrapper's storage for traced graphs) cost ~10 µs a weight a step."""
    self = args[0]
    if is_traced(self.flat):
        return _GENERIC_DETACH(func, types, args, kwargs)
    return self.with_flat(self.flat.detach())


def empty_like_resu(func, types, args, kwargs):
    """``torch.empty_like(weight)`` is a CompactTensor of the trainable coordinates: optimizer
    state. ``torch.empty_like(weight, device=d)``, which ``nn.Module.to_empty(device=d)`` calls
    (optimizers never name a device), is a ResuTensor again: DENSE gets uninitialised values on
    ``d``; another mode keeps its state (mask, θ, codes), copied to ``d``, which a weight on the
    meta device does not have (``ValueError``: quantize on meta with sparsity 0, prune after
    initialising)."""
    kwargs = kwargs or {}
    weight, device = args[0], kwargs.get("device")
    if device is None:
        return trainable_op(func, types, args, kwargs)
    dtype = kwargs.get("dtype") or weight.compute_dtype
    if weight.mode == Mode.DENSE:
        values = torch.empty(weight.storage_shape, dtype=dtype, device=device)
        return weight.replace(values=values, compute_dtype=dtype)
    if weight.device_of_storage.type == "meta":
        raise ValueError(
            f"to_empty / empty_like(device=...): a {weight.mode.value!r} ResuTensor on the meta device has no mask or θ "
            "to move (they are data). Quantize on meta with rt.resu_config(sparsity=0.0) (DENSE), call "
            "model.to_empty(device=...), initialise the weights, then rt.prune_(model, sparsity)")
    return weight.moved(device, dtype)


def _register(cls, ops, handler):
    cls.implements(ops)(handler)


for _cls in (ResuTensor, CompactTensor):
    _register(_cls, ELEMENTWISE_OPS, trainable_op)
    _register(_cls, FULL_REDUCTIONS, full_reduction)
    _register(_cls, [aten.detach_.default], detach_inplace)
_register(CompactTensor, COMPACT_ONLY_OPS, trainable_op)
_register(ResuTensor, [aten.empty_like.default], empty_like_resu)
_GENERIC_DETACH = CompactTensor._ATEN_OP_TABLE[CompactTensor][aten.detach.default]
_register(CompactTensor, [aten.detach.default], detach_compact)
_register(CompactTensor, [aten.new_empty.default, aten.new_zeros.default, aten.new_empty_strided.default], new_like_logical)


def _pointwise_ops() -> tuple[list, list]:
    """(functional, in-place and out=) overloads torch tags pointwise, except those with a
    handler above."""
    handled = set(CompactTensor._ATEN_OP_TABLE[CompactTensor]) | set(ResuTensor._ATEN_OP_TABLE[ResuTensor])
    functional, writes = [], []
    for name in dir(aten):
        packet = getattr(aten, name)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        for overload in packet.overloads():
            op = getattr(packet, overload)
            tags = op.tags
            if torch.Tag.pointwise not in tags or op in handled:
                continue
            # a mutable schema is an in-place or out= form (torch < 2.13 has no Tag.inplace / Tag.out)
            (writes if op._schema.is_mutable else functional).append(op)
    return functional, writes


# Functional pointwise ops (torch.where(g.eq(0), 0, g), g.exp(), ...) stay compact with a
# CompactTensor operand (stays_compact) and read the dense views otherwise, as trainable_op decides.
POINTWISE_OPS, POINTWISE_WRITE_OPS = _pointwise_ops()
MASKED_WRITE_OPS = [aten.index_put_.default, *_overload(aten.masked_fill_, ["Scalar", "Tensor"])]
for _cls in (ResuTensor, CompactTensor):
    _register(_cls, POINTWISE_OPS, trainable_op)
    _register(_cls, POINTWISE_WRITE_OPS, pointwise_write)
    _register(_cls, MASKED_WRITE_OPS, masked_write)

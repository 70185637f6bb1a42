"""Backport of pytorch/pytorch#176864 for torch versions without it (torch 2.11).

``torch.compile(optimizer.step)`` fakifies each parameter together with its ``.grad``. Before
that fix, the grad reused the parameter's symbolic context; a ResuTensor's context names its own
inner tensors, the CompactTensor grad's inner tensor (``flat``) is not among them, and Dynamo
failed with ``InternalTorchDynamoError: KeyError: 'flat'``. Here, as upstream does, a grad whose
inner tensors the context does not cover gets a context of its own (None: its sizes are taken
as they are, i.e. static; a changed trainable set recompiles, as it does on newer torch).
Only that case changes: every call that worked before is passed through untouched.
"""
import functools
import inspect

from torch._subclasses import meta_utils

# Upstream's fix added this function; its presence means there is nothing to patch.
NEEDS_PATCH = not hasattr(meta_utils, "_grad_context_compatible")


def _context_covers(symbolic_context, grad_desc) -> bool:
    from torch.fx.experimental.symbolic_shapes import SubclassSymbolicContext

    if not isinstance(symbolic_context, SubclassSymbolicContext):
        return True
    attrs = getattr(grad_desc, "attrs", None) or {}
    return all(name in attrs for name in symbolic_context.inner_contexts)


def with_own_grad_context(meta_tensor):
    """``MetaConverter.meta_tensor`` that fakifies a ``.grad`` its parameter's context does not
    cover with a context of its own."""
    signature = inspect.signature(meta_tensor)

    @functools.wraps(meta_tensor)
    def wrapper(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        context, grad_desc = call.arguments.get("symbolic_context"), call.arguments.get("t")
        is_grad = getattr(call.arguments.get("source"), "member", None) == "grad"
        if is_grad and context is not None and grad_desc is not None and not _context_covers(context, grad_desc):
            call.arguments["symbolic_context"] = None
        return meta_tensor(*call.args, **call.kwargs)

    return wrapper


if NEEDS_PATCH:
    meta_utils.MetaConverter.meta_tensor = with_own_grad_context(meta_utils.MetaConverter.meta_tensor)

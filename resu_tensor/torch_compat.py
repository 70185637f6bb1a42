"""The torch backport; lives in :mod:`resu_tensor.core.torch_compat` (this path is kept for user code)."""
from resu_tensor.core.torch_compat import NEEDS_PATCH, with_own_grad_context  # noqa: F401

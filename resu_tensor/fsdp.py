"""FSDP2 support; lives in :mod:`resu_tensor.parallel.fsdp` (``resu_tensor.fsdp`` is kept for user code)."""
from resu_tensor.parallel.fsdp import *  # noqa: F401,F403
from resu_tensor.parallel.fsdp import __all__  # noqa: F401

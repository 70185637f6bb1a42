"""DDP support; lives in :mod:`resu_tensor.parallel.ddp` (``rt.distributed`` is kept for user code)."""
from resu_tensor.parallel.ddp import *  # noqa: F401,F403
from resu_tensor.parallel.ddp import __all__  # noqa: F401

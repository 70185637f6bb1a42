"""Export; lives in :mod:`resu_tensor.training.export` (``resu_tensor.export`` is kept for user code)."""
from resu_tensor.training.export import *  # noqa: F401,F403
from resu_tensor.training.export import __all__  # noqa: F401

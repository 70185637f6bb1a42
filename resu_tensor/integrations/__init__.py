"""Optional integrations. Importing this package needs nothing beyond the core; the pieces that
need an extra import it when first used.

* :mod:`~resu_tensor.integrations.safetensors_io` (``safetensors`` for files): flatten
  ResuTensor weights into plain tensors + JSON metadata and rebuild them exactly;
  ``save_resu_safetensors`` / ``load_resu_safetensors``; ``enable_flat_state_dict``.
* :mod:`~resu_tensor.integrations.hf` (``pip install "resu-tensor[hf]"``): ``ResuCallback``
  for ``transformers.Trainer``, ``quantize_hf_``, ``linear_filter``, ``save_resu_pretrained`` /
  ``from_resu_pretrained``. Imported lazily: ``resu_tensor.integrations.hf`` or
  ``from resu_tensor.integrations import ResuCallback`` loads transformers, nothing else does.

Example::

    from resu_tensor.integrations import save_resu_safetensors, load_resu_safetensors, ResuCallback
"""
import importlib

from resu_tensor.integrations.safetensors_io import (enable_flat_state_dict, flatten_state_dict,
                                                     load_resu_safetensors, load_resu_state_dict,
                                                     save_resu_safetensors, unflatten_state_dict)

_HF_NAMES = ("ResuCallback", "linear_filter", "quantize_hf_", "save_resu_pretrained", "from_resu_pretrained")


def __getattr__(name):
    if name in _HF_NAMES:
        return getattr(importlib.import_module("resu_tensor.integrations.hf"), name)
    if name == "hf":
        return importlib.import_module("resu_tensor.integrations.hf")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "save_resu_safetensors", "load_resu_safetensors", "load_resu_state_dict", "enable_flat_state_dict",
    "flatten_state_dict", "unflatten_state_dict", *_HF_NAMES,
]

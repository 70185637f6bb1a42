"""Op tables of ResuTensor and CompactTensor; importing this package registers them."""
from resu_tensor.ops import foreach, layout, linear, trainable  # noqa: F401

"""Op tables of ResuTensor and CompactTensor; importing this package registers them."""
from resu_tensor.ops import foreach, fused_optim, layout, linear, sharding, trainable  # noqa: F401

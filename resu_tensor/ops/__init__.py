"""Op tables of ResuTensor and CompactTensor; importing this package registers them. Ops in no
table run on the dense view (``fallback``)."""
from resu_tensor.ops import fallback, foreach, fused_optim, layout, linear, sharding, trainable  # noqa: F401
from resu_tensor.ops import host_values, weight_operands  # noqa: F401  (after the tables weight_operands wraps)

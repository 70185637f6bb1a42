"""The lifecycle modes of a ResuTensor."""
from enum import Enum


class Mode(str, Enum):
    """Which coordinates hold what, and which train.

    DENSE: every coordinate is a weight and trains. SPARSE: pruned coordinates are exactly zero,
    active ones train. RESU: θ lives in the pruned slots; θ trains (and the active set too when
    ``freeze_active=False``). QRESU: active set stored 4/8-bit, θ flat.
    """

    DENSE = "dense"
    SPARSE = "sparse"
    RESU = "resu"
    QRESU = "qresu"

    def __str__(self) -> str:
        return self.value

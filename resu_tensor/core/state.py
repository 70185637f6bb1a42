"""What a ResuTensor's state must satisfy, derived in one place."""
import hashlib
from typing import Optional

from resu_tensor.core.mask_encoding import EncodedMask


def trainable_key(side: str, mask: EncodedMask, subset: Optional[EncodedMask], shape) -> int:
    """A content hash of the trainable set: equal across processes, so saved optimizer state
    restores onto the same set and is recognised as stale on any other."""
    encodings = [mask] + ([subset] if subset is not None and subset.kind != "none" else [])
    digest = hashlib.blake2b(f"{side}|{[e.kind for e in encodings]}|{tuple(shape)}".encode(), digest_size=8)
    for encoded in encodings:
        for t in (encoded.bitmap, encoded.indices):
            if t is not None:
                digest.update(t.detach().cpu().numpy().tobytes())
    return int.from_bytes(digest.digest(), "little") >> 2

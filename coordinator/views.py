"""Zero-copy float32 views of an accepted update's tensors, straight from its safetensors bytes.

Used only after validation accepted the payload (so it is well-formed safetensors with exactly the
trainable names and shapes): when the tensors are all F32 and laid out in sorted-name order, the data
section is one contiguous float32 array, and the fold is one vectorized pass per update.
"""

from __future__ import annotations

import json

import numpy as np


def flat_order(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The canonical order of a flat model: names sorted (safetensors' own order for same-dtype tensors)."""
    return sorted(shapes)


def fp32_data_view(payload: bytes, shapes: dict[str, tuple[int, ...]]) -> np.ndarray | None:
    """All tensors as one read-only float32 array of length P in `flat_order`, or None if laid out otherwise."""
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + n])
    entries = sorted(
        ((k, v) for k, v in header.items() if k != "__metadata__"), key=lambda kv: kv[1]["data_offsets"][0]
    )
    if [k for k, _ in entries] != flat_order(shapes):
        return None
    offset = 0
    for name, e in entries:
        size = 4 * int(np.prod(shapes[name], dtype=np.int64))
        if e["dtype"] != "F32" or e["data_offsets"] != [offset, offset + size]:
            return None
        offset += size
    start = 8 + n
    if start % 4 or len(payload) < start + offset:
        return None
    return np.frombuffer(payload, np.float32, count=offset // 4, offset=start)

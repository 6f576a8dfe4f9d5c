"""Delta releases: the weights of release v+1 as an int8 difference from release v's (protocol v1.2, opt-in).

The coordinator encodes Δ = θ_new − θ_v per row r of each tensor (a 1-D tensor is one row):
s_r = max|Δ_r| / 127 (1 where Δ_r = 0), q = round(Δ / s_r) ∈ [−127, 127] (int8), and publishes as
release v+1 the weights a device rebuilds exactly, θ_{v+1} = θ_v + q · s_r (float32), so every
device and the coordinator hold the same bytes (checked by the manifest's sha256). The rounding
moves each weight by at most s_r / 2. The file is safetensors: `{name}` int8 q, `{name}::scale`
float32 s, metadata `base_sha256` (of release v's weights file) and `encoding`.
"""

from __future__ import annotations

import json

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edgelearn.bundle import DELTA
from edgelearn.datafile import Q8_MAX

DELTA_ENCODING = "int8-rowwise"
SCALE_SUFFIX = "::scale"


class DeltaError(ValueError):
    """A delta that does not fit the weights it claims to extend."""


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float32)
    return a.reshape(1, -1) if a.ndim <= 1 else a.reshape(a.shape[0], -1)


def quantize_rows(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(q int8, s float32 per row): s_r = max|d_r|/127 (1 if the row is 0), q = round(d / s_r)."""
    rows = _rows(d)
    s = (np.abs(rows).max(axis=1) / np.float32(Q8_MAX)).astype(np.float32)
    s[s == 0] = 1.0
    q = np.clip(np.round(rows / s[:, None]), -Q8_MAX, Q8_MAX).astype(np.int8)
    return q.reshape(np.shape(d)), s


def apply_rows(base: np.ndarray, q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """θ = base + q · s_r (float32), the same bytes on every machine."""
    rows = _rows(base) + _rows(q.astype(np.float32)) * s[:, None].astype(np.float32)
    return rows.astype(np.float32).reshape(np.shape(base))


def encode_delta(base: dict[str, np.ndarray], new: dict[str, np.ndarray], base_sha256: str) -> tuple[dict, bytes]:
    """(the weights devices rebuild, the delta file) for going from `base` (whose weights file has `base_sha256`)
    towards `new`."""
    if set(base) != set(new):
        raise DeltaError("a delta needs the same tensors in both releases")
    tensors: dict[str, np.ndarray] = {}
    rebuilt: dict[str, np.ndarray] = {}
    for name in sorted(new):
        q, s = quantize_rows(np.asarray(new[name], np.float32) - np.asarray(base[name], np.float32))
        tensors[name], tensors[name + SCALE_SUFFIX] = q, s
        rebuilt[name] = apply_rows(base[name], q, s)
    return rebuilt, st_save(tensors, metadata={"base_sha256": base_sha256, "encoding": DELTA_ENCODING})


def delta_base(blob: bytes) -> str:
    """The sha256 of the weights file a delta applies to (from the safetensors header's metadata); DeltaError if
    it is not a delta file."""
    header_bytes = int.from_bytes(blob[:8], "little")
    try:
        if not 2 <= header_bytes <= len(blob) - 8:
            raise ValueError("bad header length")
        header = json.loads(blob[8 : 8 + header_bytes])
        meta = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    except (ValueError, UnicodeDecodeError) as e:
        raise DeltaError(f"{DELTA} is not a safetensors file: {e}") from None
    if meta.get("encoding") != DELTA_ENCODING or not isinstance(meta.get("base_sha256"), str):
        raise DeltaError(f"{DELTA}: encoding {meta.get('encoding')!r} is not {DELTA_ENCODING!r}")
    return str(meta["base_sha256"])


def apply_delta(base: dict[str, np.ndarray], blob: bytes) -> dict[str, np.ndarray]:
    """The weights `blob` rebuilds on `base`."""
    try:
        t = st_load(blob)
    except (SafetensorError, ValueError) as e:
        raise DeltaError(f"{DELTA} is not a safetensors file: {e}") from None
    names = {n for n in t if not n.endswith(SCALE_SUFFIX)}
    if names != set(base):
        raise DeltaError(f"{DELTA} names other tensors than the weights it extends")
    out = {}
    for n in names:
        q, s = t[n], t.get(n + SCALE_SUFFIX)
        if q.dtype != np.int8 or q.shape != np.shape(base[n]) or s is None or s.shape != (_rows(base[n]).shape[0],):
            raise DeltaError(f"{DELTA}: {n} does not fit the weights it extends")
        out[n] = apply_rows(base[n], q, s)
    return out

"""The inference program's data file (`infer.ptd`): rebuilt from new weights in numpy, without lowering.

Since bundle format 1.1 the inference program `infer.pte` keeps every constant outside itself, in
`infer.ptd` (ExecuTorch's program–data separation: XNNPACK reads its packed weights by key from the
data file). Programs are lowered once, at export; a release only replaces the data. The exporter
records where each trainable parameter lives in the data file and how it is encoded (`data.json`:
a list of `Segment`s); a release is the previous data file with those byte ranges rewritten
(`patch_data`). The data file's own layout (keys, offsets, sizes) never changes between releases.

Encodings (what the XNNPACK delegate stores; PT2E symmetric per-channel int8, ExecuTorch 1.5):
- `f32`: the parameter as float32 bytes.
- `q8c`: int8 weights, per output channel c (axis 0): s_c = max(max|w_c|/127, 2⁻¹²),
  q = clamp(round(w · (1/s_c)), −127, 127).
- `q8c_scale`: the s_c above as float32.
- `q32b`: an int32 bias of a static int8 layer: s_c = a · s_c(weight) with `a` the layer's input
  activation scale (fixed at export), q = clamp(round(b · (1/s_c)), −2³¹, 2³¹−1).
- `q32b_scale`: that bias scale a · s_c(weight) as float32.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np

DATA_LAYOUT = "data.json"  # in a bundle: the segments of infer.ptd that a release rewrites
ENCODINGS = ("f32", "q8c", "q8c_scale", "q32b", "q32b_scale")
WEIGHT_EPS = np.float32(2.0**-12)  # the XNNPACK quantizer's observer eps (smallest scale)
Q8_MAX = 127.0
I32_MIN, I32_MAX = -(2.0**31), 2.0**31 - 1


class DataFileError(ValueError):
    """A data layout that does not fit the data file or the weights (a damaged or foreign bundle)."""


@dataclass(frozen=True)
class Segment:
    """Bytes [offset, offset + nbytes) of the data file hold parameter `param` in `encoding`; `weight`
    names the weight whose scales a bias uses (q32b*), `input_scale` that layer's activation scale."""

    offset: int
    nbytes: int
    param: str
    encoding: str
    weight: str = ""
    input_scale: float = 0.0


def channel_scales(w: np.ndarray) -> np.ndarray:
    """s_c = max(max|w_c| / 127, 2⁻¹²) per output channel (axis 0), float32 (the observer's computation)."""
    w = np.asarray(w, dtype=np.float32).reshape(len(w), -1)
    max_pos = np.maximum(-np.minimum(w.min(axis=1), 0), np.maximum(w.max(axis=1), 0)).astype(np.float32)
    return np.maximum(max_pos / np.float32(Q8_MAX), WEIGHT_EPS).astype(np.float32)


def quantize_channels(x: np.ndarray, scales: np.ndarray, lo: float, hi: float, dtype: type) -> np.ndarray:
    """q = clamp(round(x · (1/s_c)), lo, hi) per channel of axis 0, rounding half to even, as `dtype`."""
    x = np.asarray(x, dtype=np.float32)
    inv = (np.float32(1.0) / scales).astype(np.float32).reshape((-1,) + (1,) * (x.ndim - 1))
    return np.clip(np.round(x * inv), lo, hi).astype(dtype)


def bias_scales(weight: np.ndarray, input_scale: float) -> np.ndarray:
    """The int32 bias scale a · s_c(weight), float32."""
    return (np.float32(input_scale) * channel_scales(weight)).astype(np.float32)


def encode(seg: Segment, weights: dict[str, np.ndarray]) -> bytes:
    """The bytes segment `seg` holds for `weights` (see the module docstring for each encoding)."""
    w = np.asarray(weights[seg.param], dtype=np.float32)
    if seg.encoding == "f32":
        return np.ascontiguousarray(w).tobytes()
    if seg.encoding == "q8c":
        return quantize_channels(w, channel_scales(w), -Q8_MAX, Q8_MAX, np.int8).tobytes()
    if seg.encoding == "q8c_scale":
        return channel_scales(w).tobytes()
    scales = bias_scales(weights[seg.weight], seg.input_scale)
    if seg.encoding == "q32b_scale":
        return scales.tobytes()
    if seg.encoding == "q32b":
        return quantize_channels(w, scales, I32_MIN, I32_MAX, np.int32).tobytes()
    raise DataFileError(f"unknown data encoding {seg.encoding!r} (this edgelearn knows {', '.join(ENCODINGS)})")


def patch_data(data: bytes, layout: list[Segment], weights: dict[str, np.ndarray]) -> bytes:
    """The data file `data` with every segment of `layout` rewritten from `weights`; the rest unchanged."""
    out = bytearray(data)
    for seg in layout:
        try:
            blob = encode(seg, weights)
        except KeyError as e:
            raise DataFileError(f"weights lack {e.args[0]!r}, which infer.ptd holds") from None
        if len(blob) != seg.nbytes or seg.offset < 0 or seg.offset + seg.nbytes > len(out):
            raise DataFileError(f"{seg.param} ({seg.encoding}, {len(blob)} B) does not fit its segment of "
                                f"{seg.nbytes} B at {seg.offset} in a {len(out)}-byte data file")  # fmt: skip
        out[seg.offset : seg.offset + seg.nbytes] = blob
    return bytes(out)


def dump_layout(layout: list[Segment]) -> bytes:
    return json.dumps({"segments": [asdict(s) for s in layout]}, indent=1).encode()


def load_layout(data: bytes) -> list[Segment]:
    """Parse `data.json`; DataFileError names what is wrong."""
    try:
        layout = [Segment(**s) for s in json.loads(data)["segments"]]
    except (ValueError, KeyError, TypeError) as e:
        raise DataFileError(f"{DATA_LAYOUT} is not a data layout: {e}") from None
    for s in layout:
        if s.encoding not in ENCODINGS:
            raise DataFileError(f"{DATA_LAYOUT}: unknown encoding {s.encoding!r} for {s.param}")
    return layout

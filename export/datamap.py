"""Where the trainable parameters live in the inference program's data file (`infer.ptd`).

The exporter lowers `infer.pte` once, with its constants in `infer.ptd`, then finds every segment of
that file that holds a trainable parameter (in one of the encodings of edgelearn/datafile.py) by
comparing bytes. The result, `data.json`, lets the coordinator build each later release's data file
in numpy. `find_layout` checks itself: rebuilding the data file from the same weights must give the
lowered file byte for byte, and every trainable parameter must be found.
"""

from __future__ import annotations

import numpy as np

from edgelearn.datafile import Segment, bias_scales, channel_scales, encode, patch_data
from export import ExportError

SCALE_ULPS = 4  # how far (in float32 steps) the activation scale recovered from a bias scale may be off


def ptd_segments(ptd: bytes) -> list[tuple[int, int]]:
    """(offset, nbytes) of every data segment of an ExecuTorch data file (FlatTensor), absolute offsets."""
    from executorch.extension.flat_tensor.serialize.serialize import (
        _deserialize_to_flat_tensor,
        _get_extended_header,
    )

    header = _get_extended_header(ptd)
    if header is None:
        raise ExportError("the lowered data file is not a FlatTensor (.ptd) file")
    flat = _deserialize_to_flat_tensor(ptd[: header.flatbuffer_offset + header.flatbuffer_size])
    base = header.segment_base_offset
    return sorted({(base + s.offset, s.size) for s in flat.segments})


def _candidates(weights: dict[str, np.ndarray], trainable: list[str]) -> dict[bytes, list[Segment]]:
    """Bytes of each trainable parameter in each weight encoding → the segments they would be."""
    out: dict[bytes, list[Segment]] = {}
    for name in trainable:
        encodings = ("f32", "q8c", "q8c_scale") if np.ndim(weights[name]) >= 2 else ("f32",)
        for enc in encodings:
            blob = encode(Segment(0, 0, name, enc), weights)
            out.setdefault(blob, []).append(Segment(0, len(blob), name, enc))
    return out


def _bias_scale(blob: bytes, weights: dict[str, np.ndarray], trainable: list[str]) -> Segment | None:
    """The q32b_scale segment `blob` is, if it is a · s_c(weight) of a trainable bias's weight; else None."""
    got = np.frombuffer(blob, dtype=np.float32) if len(blob) % 4 == 0 else np.empty(0, np.float32)
    for bias in (n for n in trainable if n.endswith(".bias")):
        weight = bias[: -len("bias")] + "weight"
        if weight not in weights or np.ndim(weights[weight]) < 2 or len(weights[weight]) != len(got):
            continue
        ratio = got.astype(np.float64) / channel_scales(weights[weight])
        a = np.float32(np.median(ratio))
        for _ in range(SCALE_ULPS):  # walk down, then test a few steps up from there
            a = np.nextafter(a, np.float32(0))
        for _ in range(2 * SCALE_ULPS + 1):
            if bias_scales(weights[weight], float(a)).tobytes() == blob:
                return Segment(0, len(blob), bias, "q32b_scale", weight, float(a))
            a = np.nextafter(a, np.float32(np.inf))
    return None


def find_layout(ptd: bytes, weights: dict[str, np.ndarray], trainable: list[str]) -> list[Segment]:
    """The segments of `ptd` that hold trainable parameters; ExportError if the file cannot be rebuilt."""
    cands = _candidates(weights, trainable)
    layout: list[Segment] = []
    pending: list[tuple[int, int]] = []
    for off, n in ptd_segments(ptd):
        hits = cands.get(ptd[off : off + n], [])
        if len({h.param for h in hits}) > 1:
            names = " and ".join(sorted({h.param for h in hits}))
            raise ExportError(f"parameters {names} hold identical values, so the lowered program shares one data "
                              "segment between them; train the model (or break the tie) before export")  # fmt: skip
        seg = hits[0] if hits else _bias_scale(ptd[off : off + n], weights, trainable)
        if seg is None:
            pending.append((off, n))
            continue
        layout.append(Segment(off, n, seg.param, seg.encoding, seg.weight, seg.input_scale))
    for s in [s for s in layout if s.encoding == "q32b_scale"]:  # each int32 bias beside its scale
        q = Segment(0, 0, s.param, "q32b", s.weight, s.input_scale)
        blob = encode(q, weights)
        at = [(off, n) for off, n in pending if ptd[off : off + n] == blob]
        if at:
            layout.append(Segment(at[0][0], at[0][1], s.param, "q32b", s.weight, s.input_scale))
    found = {(s.param, s.encoding) for s in layout}
    pairs = (("q8c", "q8c_scale"), ("q8c_scale", "q8c"), ("q32b_scale", "q32b"))  # a scale goes with its values
    unpaired = sorted(f"{p} ({b})" for p, e in found for a, b in pairs if e == a and (p, b) not in found)
    if unpaired:
        raise ExportError(f"the lowered data file lacks {unpaired[0]}, which edgelearn would need to rebuild it")
    missing = sorted(set(trainable) - {s.param for s in layout})
    if missing:
        raise ExportError(f"the lowered data file holds {missing[0]} in an encoding edgelearn cannot rebuild "
                          f"({len(missing)} parameter(s) missing); releases would need a new lowering")  # fmt: skip
    layout.sort(key=lambda s: s.offset)
    if patch_data(ptd, layout, weights) != ptd:
        raise ExportError("rebuilding the data file from the export's own weights does not give the lowered bytes")
    return layout

"""One speaker per device (the LEAF Shakespeare split) for a simulated char-lm fleet.

The text is in Tiny Shakespeare's format: blocks `NAME:\\nline\\nline\\n\\n`. It is cut in three parts:

    [ server head (9·h bytes) | device part | held-out tail (h bytes) ]

The exporter trains on head + tail written as one file, so `models.text.text_splits` (train on the
first 90 %, test on the last 10 %) tests exactly on the tail; every release is scored there.
h = `HELD_OUT_BYTES` gives the 200 test windows the exporter keeps at most. Devices get the speakers
of the blocks lying wholly in the device part: a speaker's blocks (header lines included) joined in
order. Speakers with less than one window of text (context + 1 bytes) are dropped. With at most as
many devices as speakers, device k holds the k-th largest speaker; with more devices, the largest
piece is halved (at the line break nearest its middle) until there are enough pieces, so a big
speaker spans several devices and no device mixes speakers.
"""

from __future__ import annotations

import heapq
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.atomic import write_bytes
from models import ModelError
from models.charlm import CONTEXT
from models.data import Split
from models.text import read_text, windows

log = logging.getLogger(__name__)

TEST_FRACTION = 0.1  # models.text.text_splits' default: the test part is the last 10 % of the export text
HELD_OUT_BYTES = 200 * 32 + 64 + 1  # 200 windows at stride 32 (= char-lm CONTEXT // 2) of 64 + 1 bytes
EXPORT_TEXT = "export-text.txt"  # head + tail, in the simulation's out folder (the bundle's export.json names it)
SHARDS_JSON = "speakers.json"  # device k (sim{k:04d}) ← speaker, bytes, windows
HEADER = re.compile(rb"(?:\A|\n\n)([^\s:][^\n:]{0,63}):\n")  # a speaker line at the start or after a blank line


@dataclass(frozen=True)
class TextParts:
    server: bytes  # head + tail: what export trains (first 90 %) and tests (last 10 %) on
    lo: int  # the device part is text[lo:hi]
    hi: int


@dataclass(frozen=True)
class SpeakerShard:
    speaker: str  # "NAME", or "NAME#i" for a piece (from byte i of NAME's text) of a speaker split over devices
    text: bytes


def head_bytes(held_out_bytes: int) -> int:
    """H such that text_splits' cut of H + h bytes is H: ⌊(H + h)·(1 − TEST_FRACTION)⌋ = H, h = held-out bytes.
    9·h, or 9·h − 1 when float rounding puts 0.9 · 10h just below 9h."""
    h = held_out_bytes
    head = 9 * h
    while int((head + h) * (1.0 - TEST_FRACTION)) < head:
        head -= 1
    return head


def cut_parts(text: bytes, held_out_bytes: int = HELD_OUT_BYTES) -> TextParts:
    """Head text[:H] (H = `head_bytes(h)`), tail text[L−h:], device part text[H:L−h]."""
    h = held_out_bytes
    head = head_bytes(h)
    if len(text) < head + 2 * h:
        raise ValueError(f"text has {len(text)} bytes; simulating char-lm needs more than {head + 2 * h}")
    return TextParts(text[:head] + text[len(text) - h :], head, len(text) - h)


def speaker_blocks(text: bytes) -> list[tuple[str, int, int]]:
    """(speaker, start, end) of each block: from its `NAME:` line to the next one (or the end of text).
    Text before the first `NAME:` line belongs to no block."""
    starts = [(m.group(1).decode("utf-8", "replace").strip(), m.start(1)) for m in HEADER.finditer(text)]
    ends = [s for _, s in starts[1:]] + [len(text)]
    return [(name, s, e) for (name, s), e in zip(starts, ends, strict=True)]


def speaker_texts(text: bytes, lo: int = 0, hi: int | None = None) -> dict[str, bytes]:
    """Each speaker's blocks lying wholly in text[lo:hi], joined in order (first appearance order)."""
    hi = len(text) if hi is None else hi
    out: dict[str, list[bytes]] = {}
    for name, s, e in speaker_blocks(text):
        if lo <= s and e <= hi:
            out.setdefault(name, []).append(text[s:e])
    return {name: b"".join(parts) for name, parts in out.items()}


def split_point(piece: bytes, min_bytes: int) -> int:
    """Where to halve `piece`: the line break (cut after it) nearest len/2 that leaves ≥ min_bytes on
    each side, else len/2 itself. Requires len(piece) ≥ 2·min_bytes."""
    mid = len(piece) // 2
    left = piece.rfind(b"\n", min_bytes - 1, mid)  # cut c = i + 1 ≤ mid
    right = piece.find(b"\n", mid, len(piece) - min_bytes)  # cut c = i + 1 > mid
    cuts = [i + 1 for i in (left, right) if i >= 0]
    return min(cuts, key=lambda c: (abs(c - mid), c)) if cuts else mid


def assign_speakers(speakers: dict[str, bytes], n_devices: int, min_bytes: int) -> list[SpeakerShard]:
    """`n_devices` shards: speakers with < min_bytes dropped, the largest first; with more devices than
    speakers the largest piece is halved (`split_point`) until there are n_devices pieces."""
    kept = [(len(t), name, t) for name, t in speakers.items() if len(t) >= min_bytes]
    kept.sort(key=lambda s: (-s[0], s[1]))
    if n_devices <= len(kept):
        return [SpeakerShard(name, t) for _, name, t in kept[:n_devices]]
    heap = [(-len(t), name, 0, t) for _, name, t in kept]  # (−size, speaker, first byte, text)
    heapq.heapify(heap)
    while heap and len(heap) < n_devices:
        size, name, at, t = heapq.heappop(heap)
        if -size < 2 * min_bytes:
            raise ValueError(
                f"{n_devices} devices: the speakers' text ({sum(len(s[2]) for s in kept)} bytes) splits into "
                f"at most {len(heap) + 1} pieces of {min_bytes} bytes; give fewer devices or a longer --text"
            )
        c = split_point(t, min_bytes)
        heapq.heappush(heap, (-c, name, at, t[:c]))
        heapq.heappush(heap, (-(len(t) - c), name, at + c, t[c:]))
    if not heap:
        raise ValueError(f"no speaker has {min_bytes} bytes of text (one window); is the text NAME:/lines blocks?")
    pieces = sorted(heap, key=lambda p: (p[0], p[1], p[2]))
    counts = Counter(p[1] for p in pieces)
    return [SpeakerShard(name if counts[name] == 1 else f"{name}#{at}", t) for _, name, at, t in pieces]


def shard_windows(shard: SpeakerShard, context: int, max_windows: int | None = None) -> Split:
    """The shard's byte windows as `models.text.windows` makes them (stride context/2), the first
    `max_windows` of them if given."""
    tokens = np.frombuffer(shard.text, dtype=np.uint8).astype(np.int64)
    w = windows(tokens, context, stride=max(1, context // 2))
    return w if max_windows is None else Split(w.x[:max_windows], w.y[:max_windows])


def speaker_shards(
    text: bytes, n_devices: int, context: int, held_out_bytes: int = HELD_OUT_BYTES, max_windows: int | None = None
) -> tuple[bytes, list[SpeakerShard], list[Split]]:
    """The export text (head + tail), each device's speaker shard and its windows."""
    parts = cut_parts(text, held_out_bytes)
    shards = assign_speakers(speaker_texts(text, parts.lo, parts.hi), n_devices, context + 1)
    return parts.server, shards, [shard_windows(s, context, max_windows) for s in shards]


# ------------------------------------------------------------ I/O at the edges (prepare / SimConfig)


def _read(path: Path | None) -> bytes:
    try:
        return read_text(path)
    except ModelError as e:
        raise ValueError(str(e)) from None


def check_text(path: Path | None, n_devices: int, bundle: Path | None) -> None:
    """ValueError (one line) unless the text splits into `n_devices` speaker shards and `bundle`, if
    given, was exported from this text's head + tail (else its test text could be device text)."""
    text = _read(path)
    parts = cut_parts(text)
    assign_speakers(speaker_texts(text, parts.lo, parts.hi), n_devices, CONTEXT + 1)
    if bundle is not None and exported_text(Path(bundle)) != parts.server:
        raise ValueError(
            f"bundle {bundle} was not exported by `edgelearn simulate --model char-lm` from this text (its "
            "test text could be device text): run once without --bundle, then reuse OUT/bundle"
        )


def exported_text(bundle: Path) -> bytes | None:
    """The bytes of the text file the bundle's export.json names, or None if there is none."""
    try:
        path = json.loads((bundle / "export.json").read_bytes()).get("text")
        return None if path is None else Path(path).read_bytes()
    except (OSError, ValueError):
        return None


def lm_shards(path: Path | None, n_devices: int, out: Path, max_windows: int | None) -> tuple[Path, list[Split]]:
    """Write out/EXPORT_TEXT (head + tail) and out/SHARDS_JSON; return the text file and each device's windows."""
    server, shards, splits = speaker_shards(_read(path), n_devices, CONTEXT, max_windows=max_windows)
    text_file = (out / EXPORT_TEXT).resolve()
    write_bytes(text_file, server)
    rows: list[dict[str, Any]] = [
        {"speaker": s.speaker, "bytes": len(s.text), "windows": len(w.y)} for s, w in zip(shards, splits, strict=True)
    ]
    write_bytes(out / SHARDS_JSON, json.dumps(rows, indent=1).encode())
    log.info("char-lm: %d speaker shards, %d windows in all", len(shards), sum(r["windows"] for r in rows))
    return text_file, splits

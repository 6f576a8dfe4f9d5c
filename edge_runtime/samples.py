"""Samples: JSON-lines parsing, a bounded crash-safe on-disk store, and a reservoir replay buffer.

The store is a folder of safetensors segments (`x`, `y`, `seq`) plus `index.json`; both are written
with temp → fsync → rename, segment first, so a crash leaves at most an orphan segment (deleted on
open). Every sample gets a sequence number; a learner's position in the store is the next `seq` to read.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edgelearn.atomic import write_bytes

log = logging.getLogger(__name__)
INDEX = "index.json"


@dataclass(frozen=True)
class SampleFormat:
    """How one JSON line becomes (x, y): classify {"x": [...], "y": label}; lm {"text": "..."} (text is its
    own label: x = ids[:-1], y = ids[1:], ids = byte values mod `vocab`, padded/cut to `seq_len` + 1)."""

    task: str
    x_shape: tuple[int, ...]  # one sample, without the batch dimension
    vocab: int = 256
    classes: int | None = None  # classify: labels must be in 0..classes-1 (None: not checked)

    def parse(self, line: str) -> tuple[np.ndarray, np.ndarray]:
        """Raises ValueError naming the problem for a malformed line (whatever the line holds)."""
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"not JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError("not JSON (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise ValueError("not a JSON object")
        if self.task == "lm":
            return self._parse_text(obj)
        if "x" not in obj or "y" not in obj:
            raise ValueError('needs "x" and "y"')
        try:
            x = np.asarray(obj["x"], dtype=np.float32).reshape(self.x_shape)
            y = np.asarray(int(obj["y"]), dtype=np.int64)
        except (TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"bad x or y: {str(e)[:80]}") from None
        if not np.isfinite(x).all():
            raise ValueError("x has non-finite values")
        if isinstance(obj["y"], bool) or obj["y"] != int(y) or y < 0 or (self.classes and y >= self.classes):
            raise ValueError(f"label {str(obj['y'])[:32]} is not a class id 0..{(self.classes or 0) - 1}")
        return x, y

    def _parse_text(self, obj: dict) -> tuple[np.ndarray, np.ndarray]:
        text = obj.get("text")
        if not isinstance(text, str) or len(text) < 2:
            raise ValueError('needs "text" of at least 2 characters')
        seq_len = self.x_shape[-1]
        raw = np.frombuffer(text.encode()[: seq_len + 1].ljust(seq_len + 1, b" "), dtype=np.uint8)
        ids = raw.astype(np.int64) % self.vocab
        return ids[:-1], ids[1:]


class ReplayBuffer:
    """A uniform sample of every (x, y, seq) offered so far, `capacity` rows at most."""

    def __init__(self, capacity: int, seed: int = 0) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.x: np.ndarray | None = None
        self.y: np.ndarray | None = None
        self.seq = np.zeros(0, np.int64)
        self.n_seen = 0

    def __len__(self) -> int:
        return min(self.n_seen, self.capacity)

    def offer(self, x: np.ndarray, y: np.ndarray, seq: np.ndarray) -> None:
        """Algorithm R for a batch, vectorized: item number t (0-based, over all offers) fills slot t while
        the buffer is not full, else replaces slot j ~ U{0..t} if j < capacity (if two items of one batch
        draw the same slot, the later one wins, as in the sequential algorithm)."""
        if not len(seq):
            return
        if self.x is None:
            self.x = np.zeros((self.capacity, *x.shape[1:]), x.dtype)
            self.y = np.zeros((self.capacity, *y.shape[1:]), y.dtype)
            self.seq = np.full(self.capacity, -1, np.int64)
        assert self.x is not None and self.y is not None
        t = np.arange(self.n_seen, self.n_seen + len(seq))
        slots = np.where(t < self.capacity, t, self.rng.integers(0, t + 1))
        keep = np.flatnonzero(slots < self.capacity)
        self.x[slots[keep]], self.y[slots[keep]], self.seq[slots[keep]] = x[keep], y[keep], seq[keep]
        self.n_seen += len(seq)

    def draw(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self.x is not None and self.y is not None, "draw from an empty buffer"
        idx = self.rng.integers(0, len(self), size=k if len(self) else 0)  # with replacement: k may exceed len
        return self.x[idx], self.y[idx], self.seq[idx]

    def tensors(self) -> dict[str, np.ndarray]:
        if self.x is None or self.y is None:
            return {}
        n = len(self)
        return {"replay_x": self.x[:n], "replay_y": self.y[:n], "replay_seq": self.seq[:n]}

    def restore(self, tensors: dict[str, np.ndarray], n_seen: int, rng_state: dict) -> None:
        self.n_seen = n_seen
        self.rng.bit_generator.state = rng_state
        if "replay_x" in tensors:
            n = min(len(tensors["replay_seq"]), self.capacity)  # the capacity may have been lowered since
            x, y = tensors["replay_x"][:n], tensors["replay_y"][:n]
            self.x = np.zeros((self.capacity, *x.shape[1:]), x.dtype)
            self.y = np.zeros((self.capacity, *y.shape[1:]), y.dtype)
            self.seq = np.full(self.capacity, -1, np.int64)
            self.x[:n], self.y[:n], self.seq[:n] = x, y, tensors["replay_seq"][:n]
            self.n_seen = max(n_seen, n)


class SampleStore:
    """Bounded (`max_samples`, oldest segments dropped) crash-safe store of (x, y) rows."""

    def __init__(self, folder: Path, max_samples: int = 20000, segment_size: int = 256) -> None:
        self.folder, self.max_samples, self.segment_size = folder, max_samples, segment_size
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.index = json.loads((folder / INDEX).read_bytes())
        except FileNotFoundError:
            self.index = {"segments": [], "next_seq": 0, "next_id": 0, "offsets": {}}
        listed = {f"seg-{s[0]:08d}.safetensors" for s in self.index["segments"]}
        for p in folder.glob("seg-*.safetensors"):
            if p.name not in listed:  # written, but the crash came before the index named it
                p.unlink()
        self._buf: list[tuple[np.ndarray, np.ndarray]] = []
        self._cache: dict[int, dict[str, np.ndarray]] = {}

    @property
    def next_seq(self) -> int:
        return int(self.index["next_seq"])

    @property
    def offsets(self) -> dict[str, int]:
        """Source read positions that are durable together with the samples (see `flush`)."""
        return self.index["offsets"]

    def add(self, x: np.ndarray, y: np.ndarray, flush_when_full: bool = True) -> None:
        """Buffer one sample; it is durable after the next `flush` (automatic every `segment_size`)."""
        self._buf.append((x, y))
        if flush_when_full and len(self._buf) >= self.segment_size:
            self.flush()

    def flush(self, offsets: dict[str, int] | None = None, forget: list[str] | None = None) -> None:
        """Write buffered samples as one segment, then the index with `offsets` (segment first: crash-safe);
        `forget`: source positions to drop from the index."""
        if offsets:
            self.index["offsets"].update(offsets)
        for key in forget or ():
            self.index["offsets"].pop(key, None)
        if self._buf:
            seg_id, first = int(self.index["next_id"]), self.next_seq
            seq = np.arange(first, first + len(self._buf), dtype=np.int64)
            x, y = np.stack([b[0] for b in self._buf]), np.stack([b[1] for b in self._buf])
            write_bytes(self.folder / f"seg-{seg_id:08d}.safetensors", st_save({"x": x, "y": y, "seq": seq}))
            self.index["segments"].append([seg_id, first, len(self._buf)])
            self.index["next_id"], self.index["next_seq"] = seg_id + 1, first + len(self._buf)
            self._buf = []
        dropped = self._drop_oldest()
        write_bytes(self.folder / INDEX, json.dumps(self.index).encode())
        for seg_id in dropped:  # only once the index no longer names them (a crash leaves orphans, removed on open)
            (self.folder / f"seg-{seg_id:08d}.safetensors").unlink(missing_ok=True)

    def _drop_oldest(self) -> list[int]:
        """Take the oldest segments off the index until at most `max_samples` rows remain; their ids."""
        dropped = []
        while sum(s[2] for s in self.index["segments"]) > self.max_samples and len(self.index["segments"]) > 1:
            seg_id, first, n = self.index["segments"].pop(0)
            log.info("sample store full (%d): dropped samples %d..%d", self.max_samples, first, first + n - 1)
            self._cache.pop(seg_id, None)
            dropped.append(seg_id)
        return dropped

    def read(self, from_seq: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Up to `k` durable samples with seq ≥ from_seq (the next ones); None when there are none."""
        parts = []
        for seg_id, first, n in self.index["segments"]:
            if first + n <= from_seq:
                continue
            seg = self._segment(seg_id)
            lo = max(0, from_seq - first)
            parts.append({key: v[lo : lo + k] for key, v in seg.items()})
            k -= len(parts[-1]["seq"])
            if k <= 0:
                break
        if not parts:
            return None
        return tuple(np.concatenate([p[key] for p in parts]) for key in ("x", "y", "seq"))  # type: ignore[return-value]

    def _segment(self, seg_id: int) -> dict[str, np.ndarray]:
        if seg_id not in self._cache:
            self._cache = {seg_id: st_load((self.folder / f"seg-{seg_id:08d}.safetensors").read_bytes())}
        return self._cache[seg_id]

    def __len__(self) -> int:
        return sum(s[2] for s in self.index["segments"])

"""Sample streams into the store: a JSON-lines file being appended to, a folder of such files, or stdin.

Only complete lines are read; a source's read position is saved in the store's index together with the
samples it produced, so after a crash nothing is read twice or skipped. Malformed lines are counted
and skipped with a warning.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from pathlib import Path

import numpy as np

from edge_runtime.samples import SampleFormat, SampleStore

log = logging.getLogger(__name__)
MAX_LINE_BYTES = 1 << 20


class FileTail:
    """Complete lines appended to one file (or every `*.jsonl` file of a folder), from the saved offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(self.path.glob("*.jsonl"))
        return [self.path] if self.path.exists() else []

    def read(self, offsets: dict[str, int], max_lines: int) -> tuple[list[str], dict[str, int]]:
        lines: list[str] = []
        new: dict[str, int] = {}
        for f in self.files():
            key = str(f.resolve())
            pos = offsets.get(key, 0)
            with open(f, "rb") as fh:
                fh.seek(pos)
                while len(lines) < max_lines:
                    raw = fh.readline(MAX_LINE_BYTES)
                    if not raw.endswith(b"\n"):
                        break  # a line still being written: read it when it is complete
                    pos += len(raw)
                    lines.append(raw.decode("utf-8", errors="replace"))
            new[key] = pos
        return lines, new


class StdinLines:
    """Lines from stdin, read by a daemon thread into a queue (the agent loop never blocks on stdin)."""

    def __init__(self, stream=None) -> None:
        self.q: queue.Queue[str] = queue.Queue()
        self.stream = stream or sys.stdin
        threading.Thread(target=self._pump, daemon=True, name="stdin-samples").start()

    def _pump(self) -> None:
        for line in self.stream:
            self.q.put(line)

    def read(self, offsets: dict[str, int], max_lines: int) -> tuple[list[str], dict[str, int]]:
        lines = []
        while len(lines) < max_lines:
            try:
                lines.append(self.q.get_nowait())
            except queue.Empty:
                break
        return lines, {}


class Ingestor:
    """Moves lines from a source into the store; `add()` is the Python API for embedding."""

    def __init__(
        self,
        store: SampleStore,
        fmt: SampleFormat,
        source: FileTail | StdinLines | None = None,
        poll_interval_s: float = 0.0,
    ) -> None:
        self.store, self.fmt, self.source = store, fmt, source
        self.poll_interval_s = poll_interval_s  # the agent polls between training steps: not every step
        self._next_poll_s = 0.0
        self.accepted = 0
        self.malformed = 0

    def add(self, x: np.ndarray, y: np.ndarray, flush_when_full: bool = True) -> None:
        self.store.add(np.asarray(x), np.asarray(y), flush_when_full)
        self.accepted += 1

    def add_line(self, line: str, where: str = "") -> bool:
        if not line.strip():
            return False
        try:
            x, y = self.fmt.parse(line)
        except ValueError as e:
            self.malformed += 1
            log.warning("skipped malformed sample%s: %s (%d malformed so far)", where, e, self.malformed)
            return False
        self.add(x, y, flush_when_full=False)  # poll() flushes together with the read positions
        return True

    def poll(self, max_lines: int = 1000) -> int:
        """Read what the source has now, store it durably with the new read positions; lines read."""
        if self.source is None or time.monotonic() < self._next_poll_s:
            return 0
        self._next_poll_s = time.monotonic() + self.poll_interval_s
        lines, offsets = self.source.read(self.store.offsets, max_lines)
        for line in lines:
            self.add_line(line)
        if lines or offsets != {k: self.store.offsets.get(k) for k in offsets}:
            self.store.flush(offsets)
        return len(lines)


def open_source(spec: str | None) -> FileTail | StdinLines | None:
    """`-` = stdin, a folder = its *.jsonl files, else one file (which may not exist yet)."""
    if not spec:
        return None
    return StdinLines() if spec == "-" else FileTail(Path(spec))

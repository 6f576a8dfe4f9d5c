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
OVERLONG_LINE = "\x00"  # what a line of MAX_LINE_BYTES or more comes back as: one malformed sample


class FileTail:
    """Complete lines appended to one file (or every `*.jsonl` file of a folder), from the saved offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def files(self) -> list[Path]:
        if self.path.is_dir():
            return sorted(self.path.glob("*.jsonl"))
        return [self.path] if self.path.exists() else []

    def read(self, offsets: dict[str, int], max_lines: int) -> tuple[list[str], dict[str, int]]:
        """Complete lines after each file's saved offset, and the new offsets. Positions are keyed by path and
        inode, so a file rotated into place is read from its start; a file truncated below its offset is read
        from its start again. A line longer than MAX_LINE_BYTES is skipped (it comes back as one malformed
        line). The returned offsets name only files that exist (so the index does not grow)."""
        lines: list[str] = []
        new: dict[str, int] = {}
        for f in self.files():
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            path = str(f.resolve())
            key = f"{path}#{st.st_ino}"
            pos = offsets.get(key, offsets.get(path, 0))  # (positions saved before inode keys)
            pos = 0 if pos > st.st_size else pos
            with open(f, "rb") as fh:
                fh.seek(pos)
                while len(lines) < max_lines:
                    raw = fh.readline(MAX_LINE_BYTES)
                    n = len(raw) if raw.endswith(b"\n") else _rest_of_line(fh, len(raw))
                    if n is None:
                        break  # a line still being written: read it when it is complete
                    pos += n
                    lines.append(raw.decode("utf-8", errors="replace") if n < MAX_LINE_BYTES else OVERLONG_LINE)
            new[key] = pos
        return lines, new

    def forget(self, saved: dict[str, int], current: dict[str, int]) -> list[str]:
        """Saved positions of this source's files that `read` no longer returns (deleted or rotated away)."""
        root = str(self.path.resolve())
        return [k for k in saved if k.startswith(root) and k not in current]


def _rest_of_line(fh, n: int) -> int | None:
    """Bytes of a line whose first `n` came without its newline: when that first read filled MAX_LINE_BYTES,
    the line is consumed to its end (it is skipped); None while the line is not complete yet."""
    if n < MAX_LINE_BYTES:
        return None
    while True:
        chunk = fh.readline(MAX_LINE_BYTES)
        n += len(chunk)
        if chunk.endswith(b"\n"):
            return n
        if len(chunk) < MAX_LINE_BYTES:  # its end is not written yet
            return None


class StdinLines:
    """Lines from stdin, read by a daemon thread into a queue (the agent loop never blocks on stdin)."""

    def __init__(self, stream=None, max_queued: int = 10_000) -> None:
        self.q: queue.Queue[str] = queue.Queue(maxsize=max_queued)  # full: the writer waits (back-pressure)
        self.stream = stream or sys.stdin.buffer
        threading.Thread(target=self._pump, daemon=True, name="stdin-samples").start()

    def _pump(self) -> None:
        """Bytes lines (invalid UTF-8 replaced, so such a line is one malformed sample, not the end of input)."""
        for raw in iter(lambda: self.stream.readline(MAX_LINE_BYTES), b""):
            line = raw if isinstance(raw, str) else raw.decode("utf-8", errors="replace")
            self.q.put(line if len(raw) < MAX_LINE_BYTES else OVERLONG_LINE)

    def read(self, offsets: dict[str, int], max_lines: int) -> tuple[list[str], dict[str, int]]:
        lines: list[str] = []
        while len(lines) < max_lines:
            try:
                lines.append(self.q.get_nowait())
            except queue.Empty:
                break
        return lines, {}

    def forget(self, saved: dict[str, int], current: dict[str, int]) -> list[str]:
        return []  # stdin keeps no positions


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
        gone = self.source.forget(self.store.offsets, offsets)
        if lines or gone or offsets != {k: self.store.offsets.get(k) for k in offsets}:
            self.store.flush(offsets, forget=gone)
        return len(lines)


def open_source(spec: str | None) -> FileTail | StdinLines | None:
    """`-` = stdin, a folder = its *.jsonl files, else one file (which may not exist yet)."""
    if not spec:
        return None
    return StdinLines() if spec == "-" else FileTail(Path(spec))

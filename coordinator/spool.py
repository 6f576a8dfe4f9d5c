"""Durable spool of accepted updates: fsynced to disk before their acks are sent (protocol v1).

One append-only log per round, `spool/r{round}.log`, of records `[8-byte little-endian length][payload]`.
A batch of accepted updates is appended and fsynced once (group commit); SQLite (store.py) then records
each one's (offset, length). Bytes past the last committed record (a crash between the fsync and the
commit) are cut off on restart; the device re-sends, having had no ack.
"""

from __future__ import annotations

import os
from pathlib import Path

from edgelearn.atomic import fsync_dir

LEN_BYTES = 8


class Spool:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def log_path(self, rnd: int) -> Path:
        return self.folder / f"r{rnd}.log"

    def append(self, rnd: int, payloads: list[bytes]) -> list[tuple[int, int]]:
        """Append the payloads, fsync once; returns each payload's (offset, length) in the log."""
        path = self.log_path(rnd)
        created = not path.exists()
        spans = []
        with open(path, "ab") as f:
            offset = f.tell()
            for p in payloads:
                f.write(len(p).to_bytes(LEN_BYTES, "little"))
                f.write(p)
                spans.append((offset + LEN_BYTES, len(p)))
                offset += LEN_BYTES + len(p)
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(self.folder)
        return spans

    def read(self, rnd: int, offset: int, length: int) -> bytes:
        with open(self.log_path(rnd), "rb") as f:
            f.seek(offset)
            data = f.read(length)
        if len(data) != length:
            raise OSError(f"spool {self.log_path(rnd)} is shorter than a committed record (offset {offset})")
        return data

    def truncate(self, rnd: int, end: int) -> None:
        """Cut the log after `end` bytes (the end of its last committed record)."""
        path = self.log_path(rnd)
        if path.exists() and path.stat().st_size > end:
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())

    def drop_round(self, rnd: int) -> None:
        self.log_path(rnd).unlink(missing_ok=True)

    def drop_before(self, rnd: int) -> None:
        """Delete the logs of every round before `rnd` (closed or abandoned: never read again)."""
        for path in self.folder.glob("r*.log"):
            stem = path.stem[1:]
            if stem.isdigit() and int(stem) < rnd:
                path.unlink(missing_ok=True)

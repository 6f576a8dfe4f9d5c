"""Durable spool of accepted updates: each is fsynced to disk before its ack is sent (protocol v1).

SQLite (store.py) records which spooled payloads count; a payload spooled just before a crash but
never committed is dropped on restart (its device re-sends it, since it got no ack).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from edgelearn.atomic import write_bytes


class Spool:
    """`spool/r{round}/{sha256(update_id)[:32]}.safetensors`: the raw payloads of accepted updates."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _round_dir(self, rnd: int) -> Path:
        return self.folder / f"r{rnd}"

    def path(self, rnd: int, update_id: str) -> Path:
        return self._round_dir(rnd) / f"{hashlib.sha256(update_id.encode()).hexdigest()[:32]}.safetensors"

    def put(self, rnd: int, update_id: str, payload: bytes) -> None:
        """Write the payload and fsync it (and its folder) before returning."""
        self._round_dir(rnd).mkdir(exist_ok=True)
        write_bytes(self.path(rnd, update_id), payload)

    def read_bytes(self, rnd: int, update_id: str) -> bytes:
        return self.path(rnd, update_id).read_bytes()

    def drop_uncommitted(self, rnd: int, committed: set[str]) -> None:
        keep = {self.path(rnd, uid).name for uid in committed}
        for p in self._round_dir(rnd).glob("*.safetensors"):
            if p.name not in keep:
                p.unlink()

    def drop_round(self, rnd: int) -> None:
        shutil.rmtree(self._round_dir(rnd), ignore_errors=True)

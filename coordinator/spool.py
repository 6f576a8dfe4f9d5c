"""Durable spool of accepted updates: each is fsynced to disk before its ack is sent (protocol v1)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from edgelearn.atomic import write_bytes
from edgelearn.protocol import Update, decode_update, read_metadata


class Spool:
    """`spool/r{round}/{sha256(update_id)}.safetensors`: the raw payloads of accepted updates."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.accepted_ids: set[str] = set()
        for p in folder.glob("r*/*.safetensors"):
            self.accepted_ids.add(read_metadata(p.read_bytes())["update_id"])

    def _round_dir(self, rnd: int) -> Path:
        return self.folder / f"r{rnd}"

    def put(self, rnd: int, update_id: str, payload: bytes) -> None:
        d = self._round_dir(rnd)
        d.mkdir(exist_ok=True)
        write_bytes(d / f"{hashlib.sha256(update_id.encode()).hexdigest()[:32]}.safetensors", payload)
        self.accepted_ids.add(update_id)

    def updates(self, rnd: int) -> list[Update]:
        """The accepted updates of a round, sorted by update_id (so aggregation is deterministic)."""
        us = [decode_update(p.read_bytes()) for p in self._round_dir(rnd).glob("*.safetensors")]
        return sorted(us, key=lambda u: u.update_id)

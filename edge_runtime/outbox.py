"""Crash-safe outbox: an update stays on disk until the coordinator acks its update_id (protocol v1)."""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path

from edgelearn.atomic import fsync_dir, write_bytes
from edgelearn.protocol import MAX_UPDATE_ID_CHARS, ProtocolError, read_metadata

log = logging.getLogger(__name__)


@dataclass
class Pending:
    update_id: str
    path: Path
    attempts: int = 0
    next_send_s: float = 0.0  # monotonic time of the next (re)send


def backoff_s(attempt: int, ack_timeout_s: float, max_s: float = 300.0, rng: random.Random | None = None) -> float:
    """Wait before re-send `attempt` (1, 2, …): min(max_s, ack_timeout_s · 2^(attempt−1)) · U(1.0, 1.25).

    The jitter only lengthens the wait, so no re-send comes before the ack timeout has passed.
    """
    base = min(max_s, ack_timeout_s * 2 ** max(0, attempt - 1))
    return base * (rng or random).uniform(1.0, 1.25)


class Outbox:
    """Updates as files `{sha256(update_id)}.safetensors` in one directory, each kept until its ack.

    Nothing unacked is ever dropped: `max_items` is the bound the caller keeps by not starting new work
    while the outbox is `full` (a crash or a lowered bound may leave more on disk; all are kept).
    """

    def __init__(self, folder: Path, max_items: int = 100) -> None:
        self.folder = folder
        self.max_items = max_items
        folder.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, Pending] = {}
        for p in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime):
            try:
                uid = read_metadata(p.read_bytes())["update_id"]
            except (ProtocolError, KeyError, OSError):
                log.warning("outbox: dropping unreadable %s", p.name)
                p.unlink(missing_ok=True)
                continue
            if not 0 < len(uid) <= MAX_UPDATE_ID_CHARS:  # written by an older runtime: can never be acked
                log.warning("outbox: dropping %s: update_id of %d characters can never be acked", p.name, len(uid))
                p.unlink(missing_ok=True)
                continue
            self.pending[uid] = Pending(uid, p)

    @property
    def full(self) -> bool:
        return len(self.pending) >= self.max_items

    def _path(self, update_id: str) -> Path:
        return self.folder / f"{hashlib.sha256(update_id.encode()).hexdigest()[:32]}.safetensors"

    def put(self, update_id: str, payload: bytes) -> None:
        """Store durably (fsync) before the first send. Never drops an update: see `full`."""
        path = self._path(update_id)
        write_bytes(path, payload)
        self.pending[update_id] = Pending(update_id, path)

    def remove(self, update_id: str) -> bool:
        item = self.pending.pop(update_id, None)
        if item is None:
            return False
        item.path.unlink(missing_ok=True)
        fsync_dir(self.folder)
        return True

    def due(self, now_s: float) -> list[Pending]:
        return [p for p in self.pending.values() if p.next_send_s <= now_s]

    def sent(self, item: Pending, now_s: float, ack_timeout_s: float) -> None:
        item.attempts += 1
        item.next_send_s = now_s + backoff_s(item.attempts, ack_timeout_s)

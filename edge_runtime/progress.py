"""What the device has finished (persisted atomically) and the update ids derived from it.

`device.json` holds the last synchronous round and the last asynchronous sequence number whose update
went into the outbox. A job whose number is not above them is done: after a crash it is not trained
and sent again under a new id. A job interrupted before its update was queued resumes (or is redone)
under the same id, so the coordinator counts it once whatever happens.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from edgelearn.atomic import write_bytes
from edgelearn.protocol import MAX_UPDATE_ID_CHARS

log = logging.getLogger(__name__)
HASH_CHARS = 12  # 48 bits of sha256: a collision between two ids of one device is not a practical concern


@dataclass(frozen=True)
class Progress:
    last_round: int = 0  # last synchronous round whose update was queued
    async_seq: int = 0  # sequence number of the last asynchronous update queued
    last_round_base: int = 0  # the release that round trained on: a later release's rounds are new again

    def is_new_round(self, rnd: int, base_version: int) -> bool:
        """(round, base) is after the last finished one: a newer release, or a later round on the same one. So a
        forged round with a huge number stops a device only until the next (signed) release."""
        return base_version > self.last_round_base or (base_version == self.last_round_base and rnd > self.last_round)


def load_progress(path: Path) -> Progress:
    """The saved progress; all zeros if there is none or it is unreadable (logged)."""
    try:
        d = json.loads(path.read_bytes())
        return Progress(int(d.get("last_round", 0)), int(d.get("async_seq", 0)), int(d.get("last_round_base", 0)))
    except FileNotFoundError:
        return Progress()
    except (ValueError, TypeError, AttributeError) as e:
        log.error("progress file %s unreadable (%s): starting from zero", path, e)
        return Progress()


def save_progress(path: Path, progress: Progress) -> None:
    write_bytes(path, json.dumps(asdict(progress)).encode())


def update_id_for(device_id: str, tag: str, max_chars: int = MAX_UPDATE_ID_CHARS) -> str:
    """`{device_id}-{tag}` when it fits in `max_chars`; else `{device_id[:k]}-{h}-{tag}` with
    h = the first 12 hex digits of sha256(`{device_id}-{tag}`) and k = max_chars − len(tag) − 14
    (so exactly `max_chars` long); only sha256 hex when even that cannot fit.

    Deterministic: the same device, round (or sequence number) and base version give the same id,
    e.g. when a job is retrained after a crash.
    """
    full = f"{device_id}-{tag}"
    if len(full) <= max_chars:
        return full
    h = hashlib.sha256(full.encode()).hexdigest()
    keep = max_chars - len(tag) - HASH_CHARS - 2
    if keep < 1:
        return h[:max_chars]
    return f"{device_id[:keep]}-{h[:HASH_CHARS]}-{tag}"


def async_due(now_s: float, last_queued_s: float | None, interval_s: float) -> bool:
    """True when no asynchronous update was queued yet, or `now_s − last_queued_s ≥ interval_s`."""
    return last_queued_s is None or now_s - last_queued_s >= interval_s

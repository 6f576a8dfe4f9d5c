"""Canary rollouts on the device (protocol v1.3): which release on trial to install, and the health it reports.

The coordinator publishes a release on trial on `P/model/canary` and, signed, `P/rollout/current` naming the
devices that try it. `CanaryWatch` keeps the latest of each (both retained, in any order) and says when this
device should install the archive: it is named, the trial is open and the archive is that version. The others
keep the stable release from `P/model/lean`; an old (v1.2) device never subscribes and behaves the same.

`Health` is what the device's status carries for the coordinator's verdict, bounded in size: the agent's last
few start times (a crash loop shows as several within a trial), the active release, the last release that failed
to load (and why), and the loss of the new and the previous release on the same recent samples of the device's
own store, measured when a canary activates the release on trial (others skip it: activation stays cheap).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgelearn.atomic import write_bytes
from edgelearn.bundle import BundleError, read_lean_release
from edgelearn.programs import InferenceProgram
from edgelearn.protocol import RolloutMsg
from models.quality import cross_entropy, program_logits

log = logging.getLogger(__name__)
HELD_OUT = 64  # recent samples scored by both releases at an activation
MAX_ERROR_CHARS = 200


class CanaryWatch:
    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self.archive: bytes | None = None
        self.rollout: RolloutMsg | None = None

    def trying(self, version: int) -> bool:
        """Whether this device is a canary of an open trial of `version` (then it scores it at activation)."""
        r = self.rollout
        return r is not None and r.state == "canary" and r.version == version and self.device_id in r.canary

    def due(self, active_version: int) -> bytes | None:
        """The archive to install now, if this device is a canary of an open trial newer than what it runs."""
        r, archive = self.rollout, self.archive
        if r is None or archive is None or not self.trying(r.version) or r.version <= active_version:
            return None
        try:
            version = read_lean_release(archive)[0].version
        except BundleError as e:
            log.warning("canary archive unreadable: %s", e)
            return None
        return archive if version == r.version else None


def mean_loss(program: InferenceProgram, x: np.ndarray, y: np.ndarray) -> float:
    """The program's mean cross-entropy on the rows (a language model: on the label of the last position)."""
    return round(cross_entropy(program_logits(program, x).astype(np.float64), y), 5)


STARTS_FILE, STARTS_KEPT = "starts.json", 5


def record_start(state_dir: Path, now_unix_s: float) -> list[float]:
    """This start appended to the last STARTS_KEPT starts of the agent (a file in its state folder; a crash loop
    shows as several within a canary trial)."""
    path = state_dir / STARTS_FILE
    try:
        starts = [float(t) for t in json.loads(path.read_bytes())][-(STARTS_KEPT - 1) :]
    except (FileNotFoundError, ValueError, TypeError):
        starts = []
    starts.append(round(now_unix_s, 3))
    write_bytes(path, json.dumps(starts).encode())
    return starts


@dataclass
class Health:
    starts: list[float] = field(default_factory=list)  # the agent's recent starts (unix s)
    release: int = 0
    failed: dict = field(default_factory=dict)  # {"release": v, "error": "..."} of the last one that failed
    loss: dict = field(default_factory=dict)  # {"release": v, "value": L, "previous": v0, "previous_value": L0, "n": k}

    def fields(self) -> dict:
        return {"release": self.release, "failed": self.failed or None, "loss": self.loss or None,
                "starts": self.starts}  # fmt: skip

    def activated(self, version: int, loss: dict | None) -> None:
        self.release = version
        if loss:
            self.loss = loss

    def failed_to_load(self, version: int, error: object) -> None:
        self.failed = {"release": version, "error": str(error)[:MAX_ERROR_CHARS]}


def compare_losses(
    old: InferenceProgram, old_version: int, new: InferenceProgram, new_version: int,
    x: np.ndarray, y: np.ndarray,
) -> dict:  # fmt: skip
    """The health's loss entry: both releases on the same recent samples."""
    return {"release": new_version, "value": mean_loss(new, x, y), "previous": old_version,
            "previous_value": mean_loss(old, x, y), "n": len(x)}  # fmt: skip

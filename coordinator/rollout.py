"""Canary rollouts (protocol v1.3): a new release goes to a few devices first and reaches the fleet only if they
stay healthy; otherwise the coordinator rolls them back. The rules are pure functions of the devices' statuses.

A trial of release v (the stable release being v0) ends:
- **abort** as soon as a canary reports that v failed to load (its smoke test, a bad program), that its agent
  started `max_restarts` times since the trial began (a crash loop), or when the mean
  relative rise of the canaries' loss on their own recent samples, (L_v − L_v0) / L_v0, exceeds
  `max_loss_rise`, or when not every canary runs v after `timeout_s`;
- **promote** once every canary runs v and `hold_s` passed.
An abort publishes release v+1 with v0's weights to everyone (devices never go backwards), so the canaries are
back on v0's model; a promotion publishes v to the fleet. Rounds wait while a trial is open.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass

ROLLOUT_KEY = "rollout"  # store meta: the current trial as JSON
HISTORY_KEY = "rollout_history"  # store meta: the last HISTORY trials that ended, as a JSON list
HISTORY = 20
COMMAND_KEY = "rollout_command"  # store meta: promote | abort, written by `edgelearn fleet rollout`


@dataclass(frozen=True)
class CanaryConfig:
    devices: int = 2  # canaries per trial (online devices; fewer if fewer are online)
    hold_s: float = 30.0  # a healthy trial lasts this long before promotion
    max_loss_rise: float = 0.05  # relative rise of the canaries' mean loss that aborts
    timeout_s: float = 300.0  # canaries that do not all run the release by then abort it
    share: float = 0.0  # or this share of the online devices (the larger of the two counts)
    ids: tuple[str, ...] = ()  # these devices first, when online (then others up to the count)
    max_restarts: int = 3  # a canary's agent starting this often during a trial is a crash loop: abort

    def __post_init__(self) -> None:
        if self.devices < 1 or self.hold_s < 0 or self.max_loss_rise < 0 or self.timeout_s <= self.hold_s:
            raise ValueError("canary: devices ≥ 1, hold_s ≥ 0, max_loss_rise ≥ 0 and timeout_s > hold_s")
        if not 0 <= self.share <= 1 or self.max_restarts < 1:
            raise ValueError("canary: share in [0, 1] and max_restarts ≥ 1")


@dataclass(frozen=True)
class Trial:
    version: int
    stable: int
    canary: tuple[str, ...]
    started_unix_s: float
    state: str = "canary"  # canary | promoted | aborted
    reason: str = ""
    ended_unix_s: float | None = None
    fleet_s: float | None = None  # promoted: from the start of the trial until every online device ran it

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Trial:
        return cls.from_dict(json.loads(text))

    @classmethod
    def from_dict(cls, d: dict) -> Trial:
        return cls(**{**d, "canary": tuple(d["canary"])})


def with_history(history_json: str | None, trial: Trial) -> str:
    """The history list with `trial` in place of its earlier entry (same version) or appended; the last HISTORY."""
    items = [t for t in json.loads(history_json or "[]") if t["version"] != trial.version]
    return json.dumps([*items, json.loads(trial.to_json())][-HISTORY:])


def fleet_caught_up(statuses: dict[str, dict], version: int) -> bool:
    """Every device online runs `version` or newer (and at least one is online)."""
    online = [s for s in statuses.values() if s.get("state") not in (None, "offline")]
    return bool(online) and all(isinstance(s.get("version"), int) and s["version"] >= version for s in online)


def choose_canaries(statuses: dict[str, dict], version: int, cfg: CanaryConfig) -> tuple[str, ...]:
    """max(devices, ⌈share · online⌉) online devices: the named ones first, then others spread by a hash of
    (device, version) so that trials do not always burden the same ones."""
    online = [d for d, s in statuses.items() if s.get("state") not in (None, "offline")]
    k = max(cfg.devices, math.ceil(cfg.share * len(online)), sum(d in cfg.ids for d in online))
    spread = sorted(online, key=lambda d: (d not in cfg.ids, hashlib.sha256(f"{d}|{version}".encode()).hexdigest()))
    return tuple(spread[:k])


def loss_rise(health: dict, version: int) -> float | None:
    """(L_v − L_prev) / L_prev from a device's health, when it scored release `version` against its previous one."""
    loss = health.get("loss") or {}
    if loss.get("release") != version or not loss.get("previous_value"):
        return None
    return (float(loss["value"]) - float(loss["previous_value"])) / float(loss["previous_value"])


def judge(trial: Trial, statuses: dict[str, dict], now_unix_s: float, cfg: CanaryConfig) -> tuple[str, str]:
    """("wait" | "promote" | "abort", reason) for the open trial, from the canaries' retained statuses."""
    healths = {d: (statuses.get(d) or {}).get("health") or {} for d in trial.canary}
    for d, h in healths.items():
        failed = h.get("failed") or {}
        if failed.get("release") == trial.version:
            return "abort", f"{d}: release v{trial.version} failed to load: {failed.get('error', '')}"[:300]
    for d, h in healths.items():
        starts = [t for t in h.get("starts") or [] if isinstance(t, int | float) and t >= trial.started_unix_s]
        if len(starts) >= cfg.max_restarts:
            return "abort", f"{d}: the agent started {len(starts)} times during the trial (a crash loop)"
    running = [d for d, h in healths.items() if h.get("release") == trial.version]
    rises = [r for d in running if (r := loss_rise(healths[d], trial.version)) is not None]
    if rises and sum(rises) / len(rises) > cfg.max_loss_rise:
        mean = sum(rises) / len(rises)
        return (
            "abort",
            f"canary loss rose {100 * mean:.1f} % (limit {100 * cfg.max_loss_rise:.1f} %) over {len(rises)} canaries",
        )
    elapsed = now_unix_s - trial.started_unix_s
    if len(running) == len(trial.canary) and elapsed >= cfg.hold_s:
        return "promote", f"{len(running)} canaries healthy for {elapsed:.0f} s"
    if elapsed > cfg.timeout_s:
        return "abort", f"{len(running)} of {len(trial.canary)} canaries run v{trial.version} after {elapsed:.0f} s"
    return "wait", ""

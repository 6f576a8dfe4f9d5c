"""Operator commands on a coordinator's state directory: rollback, fleet status, fleet rounds."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from coordinator.rollout import COMMAND_KEY, HISTORY_KEY, ROLLOUT_KEY, Trial
from coordinator.rounds import Rebuild, Rounds
from coordinator.sites import read_relays
from coordinator.state import StateLayout
from coordinator.store import Store
from edgelearn.bundle import BundleError, Manifest

log = logging.getLogger(__name__)


class OpsError(RuntimeError):
    """An operator command that cannot be carried out (the message says why)."""


def open_store(state_dir: Path) -> Store:
    db = StateLayout(state_dir).sqlite
    if not db.exists():
        raise OpsError(f"{state_dir}: no state.sqlite (not a coordinator state directory)")
    return Store(db)


def rollback(state_dir: Path, to_version: int, rebuild: Rebuild) -> Manifest:
    """`Rounds.roll_back` on a stopped coordinator's state (its lock is taken): v+1 carries the weights of
    kept release `to_version`; the coordinator publishes it when it starts."""
    layout = StateLayout(state_dir)
    lock = layout.lock("rolling back")
    try:
        open_store(state_dir).close()  # OpsError unless this is a coordinator state folder
        rounds = Rounds.of_state(state_dir, rebuild)
        try:
            return rounds.roll_back(to_version)
        except (ValueError, BundleError) as e:
            raise OpsError(str(e)) from None
        finally:
            rounds.close_state()
    finally:
        lock.close()


def _age(ts: float | None) -> str:
    return "-" if ts is None else f"{time.time() - ts:.0f}s ago"


def fleet_status_lines(state_dir: Path) -> list[str]:
    """One line per device seen (from its retained status): state, version, last seen, budget readings."""
    store = open_store(state_dir)
    try:
        head = f"fleet state {state_dir}: release v{store.get('version')}, round {store.get('round')}"
        rows, relays = store.devices(), read_relays(store)
    finally:
        store.close()
    lines = [head, f"{'device':<20} {'state':<10} {'version':>7} {'last seen':>10}  readings"]
    for relay_id, r in sorted(relays.items()):  # site relays (v1.4): their devices are seen only by them
        extra = {k: v for k, v in r.items() if k not in ("state", "seen", "relay")}
        lines.append(f"{'relay/' + relay_id:<20} {r.get('state', '?'):<10} {'-':>7} {_age(r['seen']):>10}  "
                     f"{json.dumps(extra, sort_keys=True)}")  # fmt: skip
    for d in rows:
        extra = {k: v for k, v in d["status"].items() if k not in ("state", "version", "round", "ts")}
        lines.append(
            f"{d['device_id']:<20} {d['state']:<10} {d['version'] if d['version'] is not None else '-':>7} "
            f"{_age(d['last_seen']):>10}  {json.dumps(extra, sort_keys=True)}"
        )
    return lines


def fleet_rounds_lines(state_dir: Path, limit: int = 20) -> list[str]:
    """One line per round: participants, accepted, rejected by reason, duration, evaluation metric."""
    store = open_store(state_dir)
    try:
        rows = store.rounds(limit)
    finally:
        store.close()
    head = f"{'round':>5} {'base':>4} {'->v':>4} {'invited':>7} {'accepted':>8} {'dup':>4} {'seconds':>8}"
    lines = [f"{head}  rejected  metrics"]
    for r in rows:
        invited = json.loads(r["participants"] or "null")
        out = r["version_out"] or ("—" if r["closed"] else "open")  # closed without a release: abandoned
        lines.append(
            f"{r['round']:>5} {r['base_version']:>4} {out:>4} "
            f"{'any' if invited is None else len(invited):>7} {r['n_updates']:>8} {r['duplicates']:>4} "
            f"{r['seconds'] if r['seconds'] is None else round(r['seconds'], 1)!s:>8}  {r['rejected']}  {r['metrics']}"
        )
    return lines


def fleet_rollout_lines(state_dir: Path, command: str | None = None) -> list[str]:
    """Where the last canary trial stands (and its canaries' health); `command` (promote | abort) is left for the
    running coordinator, which acts on it at its next tick."""
    store = open_store(state_dir)
    try:
        saved = store.get(ROLLOUT_KEY)
        if not saved:
            return ["no canary trial yet (edgelearn coordinator --canary K)"]
        trial = Trial.from_json(saved)
        if command and trial.state != "canary":
            raise OpsError(f"no trial is open (release v{trial.version} was {trial.state}): nothing to {command}")
        if command:
            store.set_meta({COMMAND_KEY: command})
        devices = {d["device_id"]: d["status"] for d in store.devices()}
        history = [Trial.from_dict(t) for t in json.loads(store.get(HISTORY_KEY) or "[]")]
    finally:
        store.close()
    lines = [f"release v{trial.version} {trial.state} (stable v{trial.stable}), started {_age(trial.started_unix_s)}"
             + (f": {trial.reason}" if trial.reason else "")]  # fmt: skip
    for d in trial.canary:
        lines.append(f"  canary {d:<20} {json.dumps((devices.get(d) or {}).get('health'), sort_keys=True)}")
    if command:
        lines.append(f"{command}: the running coordinator acts on it within a tick")
    lines += ["earlier trials:"] * bool(history)
    for t in reversed(history):
        fleet = f"; on every online device {t.fleet_s:.1f} s after its trial began" if t.fleet_s is not None else ""
        lines.append(f"  v{t.version} {t.state}: {t.reason}{fleet}")
    return lines

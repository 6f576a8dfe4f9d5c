"""Operator commands on a coordinator's state directory: rollback, fleet status, fleet rounds."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from coordinator.engine import Rebuild, drop_opt_state
from coordinator.server import lock_state
from coordinator.spool import Spool
from coordinator.store import Store
from edgelearn.bundle import Manifest, load_weights, verify_bundle

log = logging.getLogger(__name__)


class OpsError(RuntimeError):
    """An operator command that cannot be carried out (the message says why)."""


def open_store(state_dir: Path) -> Store:
    db = state_dir / "state.sqlite"
    if not db.exists():
        raise OpsError(f"{state_dir}: no state.sqlite (not a coordinator state directory)")
    return Store(db)


def rollback(state_dir: Path, to_version: int, rebuild: Rebuild) -> Manifest:
    """Publish the weights of kept release `to_version` as a new version v+1 (devices never go backwards).

    The coordinator must be stopped (its state lock is taken); it publishes v+1 when it starts. The
    open round is abandoned: its accepted updates stay recorded (duplicates stay duplicates) but are
    never aggregated, and the next round starts on v+1; server-optimizer state (momentum) restarts.
    """
    lock = lock_state(state_dir, "rolling back")
    try:
        store = open_store(state_dir)
        version, rnd = int(store.get("version")), int(store.get("round"))
        kept = [v for v, _, _ in store.releases()]
        src = state_dir / "releases" / f"v{to_version}"
        if to_version not in kept or not src.exists():
            raise OpsError(f"release v{to_version} is not kept (kept: {', '.join(f'v{v}' for v in kept)})")
        if to_version == version:
            raise OpsError(f"v{to_version} is already the current release")
        verify_bundle(src)
        new = version + 1
        manifest = rebuild(src, load_weights(src), new, state_dir / "releases" / f"v{new}")
        drop_opt_state(state_dir, new)  # from a close that crashed
        store.roll_back(rnd, new, f"rollback to v{to_version}")
        store.close()
        Spool(state_dir / "spool").drop_round(rnd)
        log.info("rolled back: v%d now carries the weights of v%d", new, to_version)
        return manifest
    finally:
        lock.close()


def _age(ts: float | None) -> str:
    return "-" if ts is None else f"{time.time() - ts:.0f}s ago"


def fleet_status_lines(state_dir: Path) -> list[str]:
    """One line per device seen (from its retained status): state, version, last seen, budget readings."""
    store = open_store(state_dir)
    try:
        head = f"fleet state {state_dir}: release v{store.get('version')}, round {store.get('round')}"
        rows = store.devices()
    finally:
        store.close()
    lines = [head, f"{'device':<20} {'state':<10} {'version':>7} {'last seen':>10}  readings"]
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

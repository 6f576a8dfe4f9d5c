"""Durable coordinator state in SQLite (WAL, synchronous=FULL): round, version, accepted updates, releases.

The spool holds the payloads; this database says which of them count. An update counts once its
row is committed here (after its payload was fsynced to the spool, before its ack is published).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

UPDATES_TABLE = """CREATE TABLE IF NOT EXISTS updates (
  update_id TEXT NOT NULL, round INTEGER NOT NULL, seq INTEGER NOT NULL, device_id TEXT NOT NULL,
  num_samples INTEGER NOT NULL, base_version INTEGER NOT NULL, weight REAL NOT NULL,
  spool_offset INTEGER NOT NULL, spool_bytes INTEGER NOT NULL, received REAL NOT NULL,
  PRIMARY KEY (device_id, update_id))"""
UPDATES_INDEX = "CREATE INDEX IF NOT EXISTS updates_round ON updates(round, seq)"
SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);\n"
    + f"{UPDATES_TABLE};\n{UPDATES_INDEX};\n"
    + """
CREATE TABLE IF NOT EXISTS rounds (
  round INTEGER PRIMARY KEY, base_version INTEGER NOT NULL, opened REAL NOT NULL, closed REAL,
  version_out INTEGER, participants TEXT, accepted INTEGER DEFAULT 0, rejected TEXT DEFAULT '{}',
  duplicates INTEGER DEFAULT 0, metrics TEXT DEFAULT '{}', seconds REAL);
CREATE TABLE IF NOT EXISTS releases (version INTEGER PRIMARY KEY, created REAL NOT NULL, note TEXT);
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY, state TEXT, version INTEGER, last_seen REAL, status TEXT);
"""
)


@dataclass(frozen=True)
class AcceptedRow:
    update_id: str
    round: int
    seq: int
    device_id: str
    num_samples: int
    base_version: int
    weight: float
    spool_offset: int
    spool_bytes: int


ROW_COLUMNS = ", ".join(AcceptedRow.__dataclass_fields__)


class _AcceptedIds:
    """`(device_id, update_id) in store.accepted_ids`: a set-like view of the committed updates. An update id
    belongs to its sender: another device sending the same id sends an update of its own."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        row = self.db.execute("SELECT 1 FROM updates WHERE device_id=? AND update_id=?", key).fetchone()
        return row is not None


class PendingIds:
    """The committed (sender, update id) pairs (`Store.accepted_ids`) plus those accepted earlier in the same batch,
    before it is committed; `prefix` keys a site relay's ids apart from a device's (`relaying.sender_key`)."""

    def __init__(self, committed: Container[tuple[str, str]], prefix: str = "") -> None:
        self.committed, self.prefix = committed, prefix
        self.batch: set[tuple[str, str]] = set()

    def add(self, key: tuple[str, str]) -> None:
        self.batch.add((self.prefix + key[0], key[1]))

    def __contains__(self, key: object) -> bool:
        if not (isinstance(key, tuple) and len(key) == 2):
            return False
        key = (self.prefix + key[0], key[1])
        return key in self.batch or key in self.committed


def _migrate(db: sqlite3.Connection) -> None:
    """Stores made before update ids were keyed by device: the updates table gets the (device_id, update_id) key."""
    pk = [r[1] for r in db.execute("PRAGMA table_info(updates)") if r[5]]
    if pk != ["update_id"]:
        return
    with db:
        db.execute("BEGIN IMMEDIATE")
        db.execute("ALTER TABLE updates RENAME TO updates_v1")
        db.execute(UPDATES_TABLE)
        db.execute("INSERT INTO updates SELECT * FROM updates_v1")
        db.execute("DROP TABLE updates_v1")
        db.execute(UPDATES_INDEX)


class Store:
    """One SQLite file; every method is one transaction."""

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """`read_only`: a reader beside the running coordinator (the dashboard): no schema, no writes."""
        if read_only:
            self.db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            _migrate(self.db)
        self.accepted_ids = _AcceptedIds(self.db)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ meta

    def get(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else default

    def set_meta(self, values: dict[str, object]) -> None:
        """Write meta keys in one transaction (e.g. the rollout, or an operator's command for it)."""
        with self.db:
            self._set(values)

    def _set(self, values: dict[str, object]) -> None:
        self.db.executemany(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
            [(k, str(v)) for k, v in values.items()],
        )

    # ------------------------------------------------------------ updates

    def accept(self, rows: list[AcceptedRow]) -> None:
        """Commit a batch of accepted updates in one transaction (one fsync)."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO updates VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*(getattr(r, f) for f in AcceptedRow.__dataclass_fields__), now) for r in rows],
            )

    def accepted(self, rnd: int) -> list[AcceptedRow]:
        """The accepted updates of a round in arrival order (the order they were folded in)."""
        rows = self.db.execute(f"SELECT {ROW_COLUMNS} FROM updates WHERE round=? ORDER BY seq", (rnd,)).fetchall()
        return [AcceptedRow(*r) for r in rows]

    def accepted_after(self, seq: int) -> list[AcceptedRow]:
        """Every accepted update with a sequence number above `seq`, in arrival order (a relay's unsent ones)."""
        rows = self.db.execute(f"SELECT {ROW_COLUMNS} FROM updates WHERE seq>? ORDER BY seq", (seq,)).fetchall()
        return [AcceptedRow(*r) for r in rows]

    def has_update(self, rnd: int, device_id: str, base_version: int) -> bool:
        """Whether `device_id` already has an update computed on `base_version` counted in round `rnd`."""
        q = "SELECT 1 FROM updates WHERE round=? AND device_id=? AND base_version=? LIMIT 1"
        return self.db.execute(q, (rnd, device_id, base_version)).fetchone() is not None

    def next_seq(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM updates").fetchone()[0])

    # ------------------------------------------------------------ rounds and releases

    def open_round(self, rnd: int, base_version: int, participants: list[str] | None) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "INSERT INTO rounds(round, base_version, opened, participants) VALUES(?, ?, ?, ?) "
                "ON CONFLICT(round) DO UPDATE SET participants=excluded.participants",  # `opened` stays
                (rnd, base_version, time.time(), json.dumps(participants)),
            )

    def invited(self, rnd: int) -> list[str] | None:
        """The devices invited to round `rnd` (None: any online device, or not opened yet)."""
        row = self.db.execute("SELECT participants FROM rounds WHERE round=?", (rnd,)).fetchone()
        invited = json.loads(row[0]) if row and row[0] else None
        return [str(d) for d in invited] if isinstance(invited, list) else None

    def round_opened(self, rnd: int) -> float:
        """Unix time round `rnd` was first opened (recorded once, kept across restarts)."""
        row = self.db.execute("SELECT opened FROM rounds WHERE round=?", (rnd,)).fetchone()
        if row is None:
            raise KeyError(f"round {rnd} was never opened")
        return float(row[0])

    def ensure_round(self, rnd: int, base_version: int) -> None:
        with self.db:
            self.db.execute(
                "INSERT OR IGNORE INTO rounds(round, base_version, opened) VALUES(?, ?, ?)",
                (rnd, base_version, time.time()),
            )

    def save_counts(self, rnd: int, rejected: dict[str, int], duplicates: int) -> None:
        """The open round's rejection and duplicate counts (so they survive a restart)."""
        with self.db:
            self.db.execute(
                "UPDATE rounds SET rejected=?, duplicates=? WHERE round=?", (json.dumps(rejected), duplicates, rnd)
            )

    def counts(self, rnd: int) -> tuple[dict[str, int], int]:
        row = self.db.execute("SELECT rejected, duplicates FROM rounds WHERE round=?", (rnd,)).fetchone()
        return (json.loads(row[0] or "{}"), int(row[1] or 0)) if row else ({}, 0)

    def close_round(self, rnd: int, version_out: int, summary: dict, meta: dict[str, object]) -> None:
        """Atomically: the round's outcome, release `version_out`, and the next state (`meta`)."""
        now = time.time()
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE rounds SET closed=?, version_out=?, accepted=?, rejected=?, duplicates=?, metrics=?, "
                "seconds=? WHERE round=?",
                (
                    now,
                    version_out,
                    summary["accepted"],
                    json.dumps(summary["rejected"]),
                    summary["duplicates"],
                    json.dumps(summary["metrics"]),
                    summary["seconds"],
                    rnd,
                ),
            )
            self.db.execute("INSERT OR REPLACE INTO releases VALUES(?, ?, ?)", (version_out, now, f"round {rnd}"))
            self._set(meta)

    def roll_back(self, rnd: int, version: int, note: str) -> None:
        """One transaction: abandon round `rnd`, record release `version`, open round rnd+1 on it, and accept
        no update computed on a release older than `version` (async mode would otherwise take them)."""
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute(
                "UPDATE rounds SET closed=?, metrics=? WHERE round=? AND closed IS NULL",
                (time.time(), json.dumps({"abandoned": note}), rnd),
            )
            self.db.execute("INSERT OR REPLACE INTO releases VALUES(?, ?, ?)", (version, time.time(), note))
            self._set({"version": version, "round": rnd + 1, "min_base_version": version})

    def add_release(self, version: int, note: str, meta: dict[str, object]) -> None:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("INSERT OR REPLACE INTO releases VALUES(?, ?, ?)", (version, time.time(), note))
            self._set(meta)

    def releases(self) -> list[tuple[int, float, str]]:
        return self.db.execute("SELECT version, created, note FROM releases ORDER BY version").fetchall()

    def drop_release(self, version: int) -> None:
        with self.db:
            self.db.execute("DELETE FROM releases WHERE version=?", (version,))

    def rounds(self, limit: int = 50) -> list[dict]:
        cur = self.db.execute(
            "SELECT r.*, (SELECT COUNT(*) FROM updates u WHERE u.round = r.round) AS n_updates "
            "FROM rounds r ORDER BY round DESC LIMIT ?",
            (limit,),
        )
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()][::-1]

    # ------------------------------------------------------------ devices (from retained status topics)

    def see_devices(self, statuses: list[tuple[str, dict]]) -> None:
        """Record the latest status of each device, all in one transaction."""
        now = time.time()
        rows = []
        for device_id, status in statuses:
            version = status.get("version")
            version = version if isinstance(version, int) and 0 <= version < 2**53 else None  # fits SQLite
            state = str(status.get("state", "?"))[:64]
            rows.append((device_id, state, version, now, json.dumps(status)))
        with self.db:  # an unchanged status (the broker re-delivering the retained one) keeps its last_seen
            self.db.execute("BEGIN IMMEDIATE")
            self.db.executemany(
                "INSERT INTO devices VALUES(?, ?, ?, ?, ?) ON CONFLICT(device_id) DO UPDATE SET "
                "state=excluded.state, version=excluded.version, status=excluded.status, "
                "last_seen=CASE WHEN devices.status = excluded.status "
                "THEN devices.last_seen ELSE excluded.last_seen END",
                rows,
            )

    def devices(self) -> list[dict]:
        cur = self.db.execute("SELECT device_id, state, version, last_seen, status FROM devices ORDER BY device_id")
        return [
            {"device_id": d, "state": s, "version": v, "last_seen": t, "status": json.loads(j)}
            for d, s, v, t, j in cur.fetchall()
        ]

"""A site relay's durable state (protocol v1.4): its devices' accepted updates and the combined updates made of them.

RELAY_STATE/
  lock, state.sqlite, spool/   as a coordinator's (coordinator/state.py): accepted device updates, fsynced to the
                               spool before their acks; meta `sent_seq`: every update up to it is in a part
  parts/{uid}.safetensors      combined updates not yet acked by the coordinator (written and fsynced before they
                               are published, deleted on its ack)
  parts/rejected/              combined updates the coordinator rejected: kept for the operator, never re-sent

Each accepted update goes into exactly one part. A flush first commits its intent (`flush_seq`), writes the parts
of the updates up to it, then commits `sent_seq`; only then are they published. A crash in between remakes the
same parts (same updates, same ids) before anything else happens, and none of them had left the relay.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

from coordinator import aggregate as agg
from coordinator.spool import Spool
from coordinator.state import StateLayout
from coordinator.store import AcceptedRow, PendingIds, Store
from coordinator.validate import Rules, Verdict, check_update, full_update
from edgelearn.atomic import write_bytes
from edgelearn.protocol import RelayTerms, Update, decode_update, encode_update
from edgelearn.relaying import MAX_RELAY_DEVICES, RelayInfo

log = logging.getLogger(__name__)
PART_SUFFIX = ".safetensors"


@dataclass(frozen=True)
class Part:
    """One combined update: its id (`r{round}b{base}s{first seq}-{last seq}`) and its bytes."""

    update_id: str
    payload: bytes


class RelayState:
    """Accepts device updates durably and turns them into parts; every method runs on the relay's one thread."""

    def __init__(self, root: Path, relay_id: str) -> None:
        self.relay_id = relay_id
        self.layout = StateLayout(root)
        self.lock = self.layout.lock("starting a relay")
        self.store = Store(self.layout.sqlite)
        self.spool = Spool(self.layout.spool)
        self.parts_dir = root / "parts"
        (self.parts_dir / "rejected").mkdir(parents=True, exist_ok=True)

    @property
    def sent_seq(self) -> int:
        return int(self.store.get("sent_seq") or 0)

    def unsent(self) -> list[AcceptedRow]:
        return self.store.accepted_after(self.sent_seq)

    # ------------------------------------------------------------ device updates

    def accept(self, items: list[tuple[str, bytes]], rules: Rules) -> list[Verdict]:
        """Validate each (the coordinator's rules, `coordinator.validate`); a device counts once per round and
        base; the accepted ones are spooled with one fsync and committed in one transaction before this returns
        (the caller acks after it)."""
        verdicts, pending = [], []
        ids = PendingIds(self.store.accepted_ids)
        claimed: set[tuple[str, int | None, int]] = set()
        for device_id, payload in items:
            v = check_update(device_id, payload, rules, ids)
            u = v.update
            if v.status == "accepted" and u is not None:
                key = (u.device_id, u.round, u.base_version)
                if key in claimed or self.store.has_update(u.round or 0, u.device_id, u.base_version):
                    v = Verdict("rejected", v.update_id, "second_update_for_base")
                else:
                    claimed.add(key)
                    ids.add((u.device_id, u.update_id))
                    pending.append((u, payload))
            verdicts.append(v)
        if pending:
            seq = self.store.next_seq()
            rows = []
            for by_round in _by_round(pending).values():  # one spool log per round, one fsync per log
                spans = self.spool.append(by_round[0][0].round or 0, [p for _, p in by_round])
                rows += [AcceptedRow(u.update_id, u.round or 0, 0, u.device_id, u.num_samples, u.base_version, 1.0,
                                     off, n) for (u, _), (off, n) in zip(by_round, spans, strict=True)]  # fmt: skip
            self.store.accept([replace(r, seq=seq + i) for i, r in enumerate(rows)])
        return verdicts

    def reported(self, rnd: int, base_version: int) -> set[str]:
        """Devices with an accepted update of round `rnd` on `base_version`."""
        return {r.device_id for r in self.store.accepted(rnd) if r.base_version == base_version}

    # ------------------------------------------------------------ parts

    def flush(self, terms: RelayTerms, model_id: str, shapes: dict[str, tuple[int, ...]]) -> list[Part]:
        """Combine every unsent update into parts (one per round and base, ≤ MAX_RELAY_DEVICES devices each),
        durably; returns them for publishing. A flush a crash interrupted is redone first, with the same ids."""
        target = int(self.store.get("flush_seq") or 0)
        if target <= self.sent_seq:
            rows = self.unsent()
            if not rows:
                return []
            target = rows[-1].seq
            self.store.set_meta({"flush_seq": target})
        rows = [r for r in self.unsent() if r.seq <= target]
        groups: dict[tuple[int, int], list[AcceptedRow]] = defaultdict(list)
        for r in rows:
            groups[(r.round, r.base_version)].append(r)
        parts = []
        for (rnd, base), group in sorted(groups.items()):
            for k in range(0, len(group), MAX_RELAY_DEVICES):
                chunk = group[k : k + MAX_RELAY_DEVICES]
                parts.append(self._combine(chunk, rnd, base, terms, model_id, shapes))
                write_bytes(self.parts_dir / f"{parts[-1].update_id}{PART_SUFFIX}", parts[-1].payload)
        self.store.set_meta({"sent_seq": target})
        log.info("relay %s: %d updates combined into %d parts", self.relay_id, len(rows), len(parts))
        return parts

    def _combine(self, rows: list[AcceptedRow], rnd: int, base: int, terms: RelayTerms, model_id: str,
                 shapes: dict[str, tuple[int, ...]]) -> Part:  # fmt: skip
        """Δ_S = Σ_k w_k·f_k·Δ_k / Σ_k w_k (aggregate.partial_mean) with the round's terms; metadata per relaying."""
        updates = [full_update(decode_update(self.spool.read(r.round, r.spool_offset, r.spool_bytes)), shapes)
                   for r in rows]  # fmt: skip
        capped = [min(u.num_samples, terms.max_samples) for u in updates]
        weights = [float(n) if terms.weighting == "samples" else 1.0 for n in capped]
        mean, norms = agg.partial_mean([u.deltas for u in updates], weights, terms.clip_norm)
        uid = f"r{rnd}b{base}s{rows[0].seq}-{rows[-1].seq}"
        info = RelayInfo(tuple(u.device_id for u in updates), tuple(norms), terms.weighting)
        combined = Update(uid, self.relay_id, model_id, base, sum(capped), mean, rnd)
        return Part(uid, encode_update(combined, info.metadata()))

    def outstanding(self) -> list[Part]:
        """Parts written but not yet acked by the coordinator (after a restart: to re-send)."""
        return [
            Part(p.name[: -len(PART_SUFFIX)], p.read_bytes()) for p in sorted(self.parts_dir.glob(f"*{PART_SUFFIX}"))
        ]

    def acked(self, update_id: str, status: str) -> bool:
        """The coordinator's ack for a part: accepted or duplicate deletes it, rejected moves it aside. False for
        an ack of no outstanding part (a repeat)."""
        path = self.parts_dir / f"{update_id}{PART_SUFFIX}"
        if not path.exists():
            return False
        if status == "rejected":
            path.rename(self.parts_dir / "rejected" / path.name)
        else:
            path.unlink()
        self._drop_spools()
        return True

    def _drop_spools(self) -> None:
        """Delete the spool logs whose every update is in a part the coordinator acked."""
        parts = [p.name[: -len(PART_SUFFIX)] for p in self.parts_dir.glob(f"*{PART_SUFFIX}")]
        waiting = {r.round for r in self.unsent()} | {_round_of(uid) for uid in parts}
        for path in self.spool.folder.glob("r*.log"):
            stem = path.stem[1:]
            if stem.isdigit() and int(stem) not in waiting:
                path.unlink(missing_ok=True)

    def close(self) -> None:
        self.store.close()
        self.lock.close()


def _by_round(pending: list[tuple[Update, bytes]]) -> dict[int, list[tuple[Update, bytes]]]:
    out: dict[int, list[tuple[Update, bytes]]] = defaultdict(list)
    for item in pending:
        out[item[0].round or 0].append(item)
    return out


def _round_of(update_id: str) -> int:
    return int(update_id[1 : update_id.index("b")])

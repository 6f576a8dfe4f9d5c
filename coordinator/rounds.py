"""`Rounds`: the coordinator's durable core, independent of MQTT: accept updates, fold them, close rounds
into releases, roll back.

Crash safety: an accepted update is (1) fsynced to the spool, (2) committed to SQLite, (3) folded
into the running sum, and only then acked by the caller (a batch shares one fsync and one commit).
On start the running sum is rebuilt by
re-folding the current round's committed updates in their arrival order, so the next release is
bit-identical to the one an uninterrupted run would produce. A round closes in one SQLite
transaction after its release directory is fully written; a crash before that commit redoes the
(deterministic) close.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as st_load_file

from coordinator import aggregate as agg
from coordinator.config import CoordinatorConfig
from coordinator.optim import make_server_opt
from coordinator.spool import Spool
from coordinator.state import StateLayout
from coordinator.store import AcceptedRow, PendingIds, Store
from coordinator.strategies import make_strategy
from coordinator.validate import Rules, Verdict, check_update, full_update
from coordinator.views import fp32_data_view
from edgelearn import relaying
from edgelearn.atomic import write_bytes
from edgelearn.bundle import Manifest, dump_weights, load_weights, utc_now, verify_bundle
from edgelearn.protocol import ProtocolError, RelayTerms, Update, decode_update, read_metadata, reason_kind

log = logging.getLogger(__name__)
Relayed = relaying.RelayInfo | None  # what a relay's combined update stands for (None: a device's own update)

# rebuild(previous bundle dir, new weights, new version, output dir, created="") -> manifest of the new bundle;
# `created` is the manifest's timestamp (empty: now)
Rebuild = Callable[..., Manifest]


@dataclass(frozen=True)
class RoundSummary:
    round: int
    version: int  # the release the round produced
    participants: tuple[str, ...]
    accepted: int
    rejected: dict[str, int]
    duplicates: int
    metrics: dict
    seconds: float


class Rounds:
    """Round state + streaming aggregation by the configured strategy; every method runs on the coordinator's
    single thread (the caller holds the state folder's lock)."""

    def __init__(self, cfg: CoordinatorConfig, rebuild: Rebuild) -> None:
        self.cfg, self.rebuild = cfg, rebuild
        self.layout = StateLayout(cfg.state_dir)
        self.layout.releases.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.layout.sqlite)
        self.spool = Spool(self.layout.spool)
        self.server_opt = make_server_opt(cfg.server_opt)
        self.strategy = make_strategy(cfg.aggregator, cfg.mode, cfg.samples_bound(), cfg.clip_norm,
                                      cfg.trim_fraction, cfg.dp, self.layout.dp_secret() if cfg.dp else 0)  # fmt: skip
        if self.store.get("version") is None:
            m = self.layout.import_bundle(cfg.bundle_dir)
            self.store.add_release(
                m.version,
                f"imported from {cfg.bundle_dir}",
                {"version": m.version, "round": 1},
            )
            log.info("fleet %s: starting from bundle %s (v%d)", cfg.fleet, cfg.bundle_dir, m.version)
        self.version = int(self.store.get("version") or 1)
        self.round = int(self.store.get("round") or 1)
        self.spool.drop_before(self.round)  # logs of closed rounds a crash left behind
        self.deadline = time.time() + cfg.round_timeout_s
        self.manifest = verify_bundle(self.release_dir(self.version))
        self.weights = load_weights(self.release_dir(self.version))
        self.shapes = {n: tuple(self.weights[n].shape) for n in self.manifest.trainable}
        self.opt_state = self._load_opt_state()
        self.norm_ref = float(self.store.get("median_update_norm") or 0.0)  # of the last closed round's updates
        self._reset_round()
        self._refold()

    @classmethod
    def of_state(cls, state_dir: Path, rebuild: Rebuild) -> Rounds:
        """An operator's handle on a stopped coordinator's existing state (e.g. for `roll_back`): the
        settings that matter are the state's own; MQTT and aggregation settings are not used."""
        if not StateLayout(state_dir).sqlite.exists():
            raise FileNotFoundError(f"{state_dir}: no state.sqlite (not a coordinator state directory)")
        return cls(CoordinatorConfig("mqtt://127.0.0.1", "ops", state_dir, state_dir), rebuild)

    def release_dir(self, version: int) -> Path:
        return self.layout.release(version)

    def _opt_path(self, version: int) -> Path:
        return self.layout.opt_state(version, self.cfg.server_opt.name)

    def _load_opt_state(self) -> dict[str, np.ndarray]:
        p = self._opt_path(self.version)
        return st_load_file(p) if p.exists() else {}

    def _reset_round(self) -> None:
        self.store.ensure_round(self.round, self.version)
        self.agg = self.strategy.accumulator(self.shapes)
        self.n_total = 0.0
        self.devices: list[str] = []
        self.counted: set[tuple[str, int]] = set()  # (device, base version) of every folded update, relayed too
        self.norms: list[float] = []  # ‖Δ_k‖ of the round's folded updates, before clipping
        rejected, self.duplicates = self.store.counts(self.round)
        self.rejected: Counter[str] = Counter(rejected)

    def _refold(self) -> None:
        """Re-fold the committed updates of the open round, in arrival order, from the spool."""
        rows = self.store.accepted(self.round)
        for row in rows:
            payload = self.spool.read(self.round, row.spool_offset, row.spool_bytes)
            self._fold(full_update(decode_update(payload), self.shapes), row, payload, self._relay_info(row, payload))
        self.spool.truncate(self.round, max((r.spool_offset + r.spool_bytes for r in rows), default=0))
        if rows:
            log.info("round %d: recovered %d accepted updates from the spool", self.round, len(rows))

    # ------------------------------------------------------------ updates

    def rules(self) -> Rules:
        rnd = None if self.cfg.mode == "async" else self.round
        min_base = int(self.store.get("min_base_version") or 1)  # set by a rollback
        return Rules(self.manifest.model_id, self.shapes, self.version, rnd, self.cfg.max_update_norm,
                     self.cfg.max_staleness, min_base, self.cfg.local.lora_rank)  # fmt: skip

    def clip_limit(self) -> float | None:
        """C for the open round: the strategy's (--clip-norm, DP) and k × the median ‖Δ‖ of the last closed round's
        updates (--clip-to-median k), whichever is smaller; None when neither applies (round 1 without --clip-norm)."""
        limits = [c for c in (self.strategy.clip_norm,) if c]
        if self.cfg.clip_to_median and self.norm_ref > 0:
            limits.append(self.cfg.clip_to_median * self.norm_ref)
        return min(limits) if limits else None

    def relay_terms(self) -> RelayTerms | None:
        """How a site relay combines its devices' updates for this round so that folding the combination equals
        folding them (protocol v1.4): the clip limit, n_max and the weighting. None where the rule does not
        decompose into partial sums (median, trimmed mean) and in asynchronous mode: relays then take nothing."""
        if self.cfg.mode != "sync" or self.cfg.aggregator != "mean":
            return None
        return RelayTerms(self.clip_limit(), self.cfg.samples_bound(), "uniform" if self.cfg.dp else "samples")

    def _relay_info(self, row: AcceptedRow, payload: bytes) -> Relayed:
        """What an accepted row stands for, from its spooled payload (the re-fold after a restart)."""
        if relaying.relay_of(row.device_id) is None:
            return None
        return relaying.read_relay_info(read_metadata(payload, relaying.RELAY_HEADER_BYTES))

    def _fold(self, u: Update, row: AcceptedRow, payload: bytes, relayed: Relayed = None) -> None:
        """Fold w·clip(Δ) (= w·f·Δ with f = min(1, C/‖Δ‖), C = clip_limit()); one pass over the payload bytes when
        they are flat. The weight w was set by the strategy when the update was accepted (row.weight). A relay's
        combined update (`relayed`) was clipped per device by its relay: folded as it is, for its K devices."""
        devices: tuple[str, ...]
        if relayed is None:
            clip_norm, norm = self.clip_limit(), agg.l2_norm(u.deltas)
            norms, devices, factor = [norm], (u.device_id,), agg.clip_factor(norm, clip_norm) if clip_norm else 1.0
        else:
            clip_norm, norms, devices, factor = None, list(relayed.norms), relayed.devices, 1.0
        self.norms.extend(norms)
        flat = fp32_data_view(payload, self.shapes) if isinstance(self.agg, agg.StreamingMean) else None
        if flat is not None and isinstance(self.agg, agg.StreamingMean):
            self.agg.add_flat(flat, row.weight, factor, len(devices))
        else:
            self.agg.add(agg.clip(u.deltas, clip_norm) if clip_norm else u.deltas, row.weight, len(devices))
        self.n_total += agg.sample_weight(u.num_samples, self.strategy.samples_cap(len(devices)))
        self.devices.extend(devices)
        self.counted.update((d, u.base_version) for d in devices)

    def handle(self, device_id: str, payload: bytes) -> Verdict:
        return self.handle_batch([(device_id, payload)])[0]

    def _check_relayed(self, v: Verdict, payload: bytes, claimed: set[tuple[str, int]]) -> tuple[Verdict, Relayed]:
        """A relay's combined update (v1.4), after the rules every update meets: its devices must be new to the
        round, its weighting the one the round asked for, and the rule must decompose at all. Returns the verdict
        and, when it is accepted, the devices and norms the update stands for."""
        terms, u = self.relay_terms(), v.update
        if v.status != "accepted" or u is None:
            return v, None
        try:
            info = relaying.read_relay_info(read_metadata(payload, relaying.RELAY_HEADER_BYTES))
        except ProtocolError as e:
            return Verdict("rejected", v.update_id, e.reason), None
        if terms is None:
            return Verdict("rejected", v.update_id, f"relay_not_supported:{self.cfg.aggregator}"), None
        if info.weighting != terms.weighting:
            return Verdict("rejected", v.update_id, "relay_weighting_mismatch"), None
        if any((d, u.base_version) in claimed for d in info.devices):
            return Verdict("rejected", v.update_id, "device_counted_twice"), None
        return v, info

    def handle_batch(self, items: list[tuple[str, bytes]], relayed: bool = False) -> list[Verdict]:
        """Validate each; the accepted ones are spooled with one fsync, committed in one SQLite transaction,
        then folded in arrival order (group commit). The caller acks after this returns. `relayed`: the items
        are site relays' combined updates (protocol v1.4), keyed by relay id."""
        verdicts: list[Verdict] = []
        pending: list[tuple[Update, bytes, Relayed]] = []
        ids = PendingIds(self.store.accepted_ids, relaying.SENDER_PREFIX if relayed else "")
        claimed = set(self.counted)  # (device, base) already counted this round, growing with the batch
        rules = replace(self.rules(), header_bytes=relaying.RELAY_HEADER_BYTES) if relayed else self.rules()
        for device_id, payload in items:
            v = check_update(device_id, payload, rules, ids)
            v, info = self._check_relayed(v, payload, claimed) if relayed else (self._check_device(v, claimed), None)
            verdicts.append(v)
            if v.status == "accepted":
                assert v.update is not None and v.update_id is not None  # an accepted verdict carries both
                ids.add((device_id, v.update_id))
                pending.append((v.update, payload, info))
                claimed.update((d, v.update.base_version) for d in (info.devices if info else (device_id,)))
            elif v.status == "duplicate":
                self.duplicates += 1
            else:
                self.rejected[reason_kind(v.reason)] += 1
        if len(pending) < len(items):
            self.store.save_counts(self.round, dict(self.rejected), self.duplicates)
        if pending:
            spans = self.spool.append(self.round, [p for _, p, _ in pending])
            seq = self.store.next_seq()
            rows = []
            for i, ((u, _, info), (off, n)) in enumerate(zip(pending, spans, strict=True)):
                k = len(info.devices) if info else 1
                sender = relaying.sender_key(u.device_id) if info else u.device_id
                rows.append(AcceptedRow(u.update_id, self.round, seq + i, sender, u.num_samples, u.base_version,
                                        self.strategy.weight(u, self.version, k), off, n))  # fmt: skip
            self.store.accept(rows)
            for (u, payload, info), row in zip(pending, rows, strict=True):
                self._fold(u, row, payload, info)
        return verdicts

    def _check_device(self, v: Verdict, claimed: set[tuple[str, int]]) -> Verdict:
        """Rounds: a device counts once per round per base version (its fresh update, and at most one late one
        from each earlier release), also through a relay, so one device cannot fill a round's quorum or
        outweigh the rest."""
        u = v.update
        if v.status != "accepted" or self.cfg.mode != "sync" or u is None:
            return v
        if (u.device_id, u.base_version) in claimed:
            return Verdict("rejected", v.update_id, "second_update_for_base")
        return v

    @property
    def devices_counted(self) -> int:
        """Distinct devices with an update in the open round (what a round's quorum counts)."""
        return len(set(self.devices))

    @property
    def count(self) -> int:
        return self.agg.count

    def ready(self) -> bool:
        if self.cfg.mode == "async":
            return self.count >= self.cfg.buffer_size
        return self.devices_counted >= self.cfg.min_updates

    # ------------------------------------------------------------ closing

    def aggregated_delta(self) -> dict[str, np.ndarray]:
        """Δ̄ of the open round by the strategy (coordinator.strategies)."""
        return self.strategy.result(self.agg, self.n_total, self.round)

    def close(self) -> RoundSummary:
        """Aggregate, apply the server optimizer, write release v+1, then commit the new state at once."""
        t0 = time.perf_counter()
        rnd, v = self.round, self.version
        theta, opt_state = self.server_opt.step(self.weights, self.aggregated_delta(), self.opt_state)
        opened = self.store.round_opened(rnd)  # from state: a redone close writes the same bytes
        self.manifest = self.rebuild(
            self.release_dir(v), theta, v + 1, self.release_dir(v + 1), created=utc_now(opened)
        )
        if opt_state:
            self._opt_path(v + 1).parent.mkdir(exist_ok=True)
            write_bytes(self._opt_path(v + 1), dump_weights(opt_state))
        summary = RoundSummary(
            rnd, v + 1, tuple(sorted(self.devices)), self.count, dict(self.rejected), self.duplicates,
            dict(self.manifest.metrics), time.time() - opened,  # across restarts too
        )  # fmt: skip
        meta: dict[str, object] = {"version": v + 1, "round": rnd + 1}
        if self.norms:  # the next round's clipping reference, committed with the round
            self.norm_ref = float(np.median(self.norms))
            meta["median_update_norm"] = repr(self.norm_ref)
        self.store.close_round(rnd, v + 1, summary.__dict__ | {"rejected": summary.rejected}, meta)
        self.version, self.round = v + 1, rnd + 1
        self.weights, self.opt_state = load_weights(self.release_dir(v + 1)), opt_state
        self.spool.drop_round(rnd)
        self._prune()
        self._reset_round()
        self.deadline = time.time() + self.cfg.round_timeout_s
        log.info("round %d closed: %d updates → release v%d in %.2fs", rnd, summary.accepted, v + 1,
                 time.perf_counter() - t0)  # fmt: skip
        return summary

    def _prune(self) -> None:
        """Keep the newest `keep_releases` release directories (and their optimizer state)."""
        for version, _, _ in self.store.releases()[: -self.cfg.keep_releases]:
            shutil.rmtree(self.release_dir(version), ignore_errors=True)
            self.layout.drop_opt_state(version)
            self.store.drop_release(version)

    def open_round(self, participants: list[str] | None) -> None:
        self.store.open_round(self.round, self.version, participants)

    def extend_deadline(self) -> None:
        self.deadline = time.time() + self.cfg.round_timeout_s

    def roll_back(self, to_version: int) -> Manifest:
        """Publish the weights of kept release `to_version` as a new version v+1 (devices never go backwards).

        The open round is abandoned: its accepted updates stay recorded (duplicates stay duplicates) but are
        never aggregated, and the next round starts on v+1; server-optimizer state (momentum) restarts.
        """
        kept = [v for v, _, _ in self.store.releases()]
        src = self.release_dir(to_version)
        if to_version not in kept or not src.exists():
            raise ValueError(f"release v{to_version} is not kept (kept: {', '.join(f'v{v}' for v in kept)})")
        if to_version == self.version:
            raise ValueError(f"v{to_version} is already the current release")
        verify_bundle(src)
        rnd, new = self.round, self.version + 1
        manifest = self.rebuild(src, load_weights(src), new, self.release_dir(new))
        self.layout.drop_opt_state(new)  # from a close that crashed
        self.store.roll_back(rnd, new, f"rollback to v{to_version}")
        self.spool.drop_round(rnd)
        self.version, self.round, self.manifest = new, rnd + 1, manifest
        self.weights, self.opt_state = load_weights(self.release_dir(new)), {}
        self._reset_round()
        log.info("rolled back: v%d now carries the weights of v%d", new, to_version)
        return manifest

    def close_state(self) -> None:
        self.store.close()

"""The coordinator's durable core, independent of MQTT: accept updates, fold them, close rounds into releases.

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
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file as st_load_file

from coordinator import aggregate as agg
from coordinator import optim
from coordinator.config import CoordinatorConfig
from coordinator.spool import Spool
from coordinator.store import AcceptedRow, Store
from coordinator.validate import Rules, Verdict, check_update
from coordinator.views import fp32_data_view
from edgelearn.atomic import replace_dir, write_bytes
from edgelearn.bundle import Manifest, dump_weights, load_weights, utc_now, verify_bundle
from edgelearn.protocol import Update, decode_update, reason_kind

log = logging.getLogger(__name__)

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


def import_bundle(bundle_dir: Path, releases: Path) -> Manifest:
    """Copy the operator's starting bundle into `releases/v{version}` (atomically) and return its manifest."""
    manifest = verify_bundle(bundle_dir)
    dest = releases / f"v{manifest.version}"
    if not dest.exists():
        tmp = releases / f".v{manifest.version}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(bundle_dir, tmp)
        replace_dir(tmp, dest)  # fsynced: a power cut cannot leave a torn v1 that fails every start
    return manifest


def drop_opt_state(state_dir: Path, version: int) -> None:
    """Delete the server-optimizer state saved after release `version` (whichever optimizer wrote it)."""
    for p in (state_dir / "opt").glob(f"v{version}.*safetensors"):
        p.unlink(missing_ok=True)


def dp_secret(state_dir: Path) -> int:
    """The 256-bit secret behind every round's DP noise, `state_dir/dp.secret` (mode 0600, made on first use).
    Anyone who learns it can subtract the noise from the releases: it never leaves the state folder."""
    path = state_dir / "dp.secret"
    if not path.exists():
        write_bytes(path, os.urandom(32).hex().encode())  # mkstemp: 0600 from creation on
    return int(path.read_text().strip(), 16)


class _Pending:
    """Committed update ids plus those accepted earlier in the same batch."""

    def __init__(self, committed) -> None:
        self.committed, self.batch = committed, set()

    def add(self, update_id: str) -> None:
        self.batch.add(update_id)

    def __contains__(self, update_id: object) -> bool:
        return update_id in self.batch or update_id in self.committed


class Engine:
    """Round state + streaming aggregation; every method runs on the coordinator's single thread."""

    def __init__(self, cfg: CoordinatorConfig, rebuild: Rebuild) -> None:
        self.cfg, self.rebuild = cfg, rebuild
        self.releases = cfg.state_dir / "releases"
        self.releases.mkdir(parents=True, exist_ok=True)
        self.store = Store(cfg.state_dir / "state.sqlite")
        self.spool = Spool(cfg.state_dir / "spool")
        if self.store.get("version") is None:
            m = import_bundle(cfg.bundle_dir, self.releases)
            self.store.add_release(
                m.version,
                f"imported from {cfg.bundle_dir}",
                {"version": m.version, "round": 1},
            )
            log.info("fleet %s: starting from bundle %s (v%d)", cfg.fleet, cfg.bundle_dir, m.version)
        self.version = int(self.store.get("version"))
        self.round = int(self.store.get("round"))
        self.spool.drop_before(self.round)  # logs of closed rounds a crash left behind
        self.deadline = time.time() + cfg.round_timeout_s
        self.manifest = verify_bundle(self.release_dir(self.version))
        self.weights = load_weights(self.release_dir(self.version))
        self.shapes = {n: tuple(self.weights[n].shape) for n in self.manifest.trainable}
        self.opt_state = self._load_opt_state()
        self._reset_round()
        self._refold()

    def release_dir(self, version: int) -> Path:
        return self.releases / f"v{version}"

    def _opt_path(self, version: int) -> Path:
        """Server-optimizer state after release `version`, per optimizer: a restart with another
        `--server-opt` starts that optimizer's state afresh instead of reading the other's."""
        return self.cfg.state_dir / "opt" / f"v{version}.{self.cfg.server_opt.name}.safetensors"

    def _load_opt_state(self) -> dict[str, np.ndarray]:
        p = self._opt_path(self.version)
        return st_load_file(p) if p.exists() else {}

    def _new_aggregator(self) -> agg.StreamingMean | agg.Median | agg.TrimmedMean:
        if self.cfg.aggregator == "median":
            return agg.Median(self.shapes)
        if self.cfg.aggregator == "trimmed_mean":
            return agg.TrimmedMean(self.shapes, self.cfg.trim_fraction)
        return agg.StreamingMean(self.shapes)

    def _reset_round(self) -> None:
        self.store.ensure_round(self.round, self.version)
        self.agg = self._new_aggregator()
        self.n_total = 0.0
        self.devices: list[str] = []
        rejected, self.duplicates = self.store.counts(self.round)
        self.rejected: Counter[str] = Counter(rejected)

    def _refold(self) -> None:
        """Re-fold the committed updates of the open round, in arrival order, from the spool."""
        rows = self.store.accepted(self.round)
        for row in rows:
            payload = self.spool.read(self.round, row.spool_offset, row.spool_bytes)
            self._fold(decode_update(payload), row, payload)
        self.spool.truncate(self.round, max((r.spool_offset + r.spool_bytes for r in rows), default=0))
        if rows:
            log.info("round %d: recovered %d accepted updates from the spool", self.round, len(rows))

    # ------------------------------------------------------------ updates

    def rules(self) -> Rules:
        rnd = None if self.cfg.mode == "async" else self.round
        min_base = int(self.store.get("min_base_version") or 1)  # set by a rollback
        return Rules(self.manifest.model_id, self.shapes, self.version, rnd, self.cfg.max_update_norm,
                     self.cfg.max_staleness, min_base)  # fmt: skip

    def weight_of(self, u: Update) -> float:
        """w_k = min(n_k, n_max) in sync mode; w_k = min(n_k, n_max) · 1/sqrt(1+s_k) in async mode; 1 under DP."""
        if self.cfg.dp is not None:
            return 1.0
        w = agg.sample_weight(u.num_samples, self.cfg.max_samples_per_update)
        if self.cfg.mode == "async":
            w *= agg.staleness_weight(self.version - u.base_version)
        return w

    def _fold(self, u: Update, row: AcceptedRow, payload: bytes) -> None:
        """Fold w·clip(Δ) (= w·f·Δ with f = min(1, C/‖Δ‖)); one pass over the payload bytes when they are flat."""
        clip_norm = self.cfg.dp.clip_norm if self.cfg.dp is not None else self.cfg.clip_norm
        factor = agg.clip_factor(agg.l2_norm(u.deltas), clip_norm) if clip_norm else 1.0
        flat = fp32_data_view(payload, self.shapes) if isinstance(self.agg, agg.StreamingMean) else None
        if flat is not None:
            self.agg.add_flat(flat, row.weight * factor)
        else:
            self.agg.add(agg.clip(u.deltas, clip_norm) if clip_norm else u.deltas, row.weight)
        self.n_total += agg.sample_weight(u.num_samples, self.cfg.max_samples_per_update)
        self.devices.append(u.device_id)

    def handle(self, device_id: str, payload: bytes) -> Verdict:
        return self.handle_batch([(device_id, payload)])[0]

    def handle_batch(self, items: list[tuple[str, bytes]]) -> list[Verdict]:
        """Validate each; the accepted ones are spooled with one fsync, committed in one SQLite transaction,
        then folded in arrival order (group commit). The caller acks after this returns."""
        verdicts, pending, ids = [], [], _Pending(self.store.accepted_ids)
        for device_id, payload in items:
            v = check_update(device_id, payload, self.rules(), ids)
            verdicts.append(v)
            if v.status == "accepted":
                ids.add(v.update_id)
                pending.append((v.update, payload))
            elif v.status == "duplicate":
                self.duplicates += 1
            else:
                self.rejected[reason_kind(v.reason)] += 1
        if len(pending) < len(items):
            self.store.save_counts(self.round, dict(self.rejected), self.duplicates)
        if pending:
            spans = self.spool.append(self.round, [p for _, p in pending])
            seq = self.store.next_seq()
            rows = [
                AcceptedRow(u.update_id, self.round, seq + i, u.device_id, u.num_samples, u.base_version,
                            self.weight_of(u), off, n)
                for i, ((u, _), (off, n)) in enumerate(zip(pending, spans, strict=True))
            ]  # fmt: skip
            self.store.accept(rows)
            for (u, payload), row in zip(pending, rows, strict=True):
                self._fold(u, row, payload)
        return verdicts

    @property
    def count(self) -> int:
        return self.agg.count

    def ready(self) -> bool:
        target = self.cfg.buffer_size if self.cfg.mode == "async" else self.cfg.min_updates
        return self.count >= target

    # ------------------------------------------------------------ closing

    def aggregated_delta(self) -> dict[str, np.ndarray]:
        """Δ̄ of the open round: weighted mean (sync), FedBuff Σ α(s)n Δ / Σ n (async), robust rule, or DP mean."""
        if self.cfg.dp is not None:
            seed = agg.noise_seed(dp_secret(self.cfg.state_dir), self.round)
            return agg.dp_mean(self.agg.sum, self.count, self.cfg.dp, seed)
        if self.cfg.mode == "async" and isinstance(self.agg, agg.StreamingMean):
            return self.agg.result(self.n_total)
        return self.agg.result()

    def close(self) -> RoundSummary:
        """Aggregate, apply the server optimizer, write release v+1, then commit the new state at once."""
        t0 = time.perf_counter()
        rnd, v = self.round, self.version
        theta, opt_state = optim.apply(self.cfg.server_opt, self.weights, self.aggregated_delta(), self.opt_state)
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
        self.store.close_round(
            rnd, v + 1, summary.__dict__ | {"rejected": summary.rejected}, {"version": v + 1, "round": rnd + 1}
        )
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
            drop_opt_state(self.cfg.state_dir, version)
            self.store.drop_release(version)

    def open_round(self, participants: list[str] | None) -> None:
        self.store.open_round(self.round, self.version, participants)

    def extend_deadline(self) -> None:
        self.deadline = time.time() + self.cfg.round_timeout_s

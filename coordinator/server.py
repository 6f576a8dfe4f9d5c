"""The coordinator: publishes releases and rounds, validates and acks updates, aggregates with FedAvg.

paho's thread only enqueues messages; validation, spooling, aggregation and
publishing all run on the coordinator's own thread.
"""

from __future__ import annotations

import json
import logging
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from coordinator.fedavg import aggregate
from coordinator.spool import Spool
from coordinator.validate import Rules, check_update
from edgelearn.atomic import write_bytes
from edgelearn.bundle import Manifest, load_weights, pack_release, verify_bundle
from edgelearn.mqtt import MqttLink
from edgelearn.protocol import OFFLINE, Ack, LocalConfig, RoundMsg, Topics, encode_status

log = logging.getLogger(__name__)

# (previous bundle dir, new weights, new version, output dir) -> manifest of the new bundle
Rebuild = Callable[[Path, dict[str, np.ndarray], int, Path], Manifest]


@dataclass(frozen=True)
class CoordinatorConfig:
    broker_url: str
    fleet: str
    bundle_dir: Path
    state_dir: Path
    topic_root: str = "edgelearn"
    min_updates: int = 2
    round_timeout_s: float = 60.0
    local: LocalConfig = field(default_factory=LocalConfig)
    max_update_norm: float = 1e3
    max_samples_per_update: int | None = None
    max_rounds: int | None = None  # stop after this many aggregations (None: run forever)
    tick_s: float = 0.2
    mqtt_v311: bool = False


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


class Coordinator:
    """Synchronous FedAvg rounds (protocol v1)."""

    def __init__(
        self, cfg: CoordinatorConfig, rebuild: Rebuild, on_round: Callable[[RoundSummary], None] | None = None
    ) -> None:
        self.cfg, self.rebuild, self.on_round = cfg, rebuild, on_round
        self.topics = Topics(cfg.fleet, cfg.topic_root)
        self.releases = cfg.state_dir / "releases"
        self.state_file = cfg.state_dir / "state.json"
        self.releases.mkdir(parents=True, exist_ok=True)
        self.state = self._load_state()
        self.spool = Spool(cfg.state_dir / "spool")
        self.manifest = verify_bundle(self.releases / f"v{self.state['version']}")
        self.weights = load_weights(self.releases / f"v{self.state['version']}")
        self.accepted = {u.update_id: u for u in self.spool.updates(self.state["round"])}
        self.rejected: Counter[str] = Counter()
        self.duplicates = 0
        self.round_started_s = time.monotonic()
        self.rounds_done = 0
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.link = MqttLink(
            cfg.broker_url,
            f"edgelearn-{cfg.fleet}-coordinator",
            [self.topics.all_devices("update")],
            on_message=lambda t, p: self.events.put((t, p)),
            will=(self.topics.coordinator_status, OFFLINE),
            mqtt_v311=cfg.mqtt_v311,
            on_connected=lambda: self.events.put(("", b"connected")),
        )

    # ------------------------------------------------------------ state

    def _load_state(self) -> dict:
        try:
            return json.loads(self.state_file.read_bytes())
        except FileNotFoundError:
            pass
        manifest = verify_bundle(self.cfg.bundle_dir)
        dest = self.releases / f"v{manifest.version}"
        if not dest.exists():
            tmp = self.releases / f".v{manifest.version}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(self.cfg.bundle_dir, tmp)
            tmp.rename(dest)
        state = {"version": manifest.version, "round": 1, "deadline": time.time() + self.cfg.round_timeout_s}
        self._save_state(state)
        log.info("fleet %s: starting from bundle %s (v%d)", self.cfg.fleet, self.cfg.bundle_dir, manifest.version)
        return state

    def _save_state(self, state: dict) -> None:
        write_bytes(self.state_file, json.dumps(state).encode())

    def rules(self) -> Rules:
        shapes = {n: tuple(self.weights[n].shape) for n in self.manifest.trainable}
        return Rules(
            self.manifest.model_id, shapes, self.state["version"], self.state["round"], self.cfg.max_update_norm
        )

    def round_msg(self) -> RoundMsg:
        return RoundMsg(
            self.state["round"],
            self.state["version"],
            self.state["deadline"],
            self.cfg.min_updates,
            None,
            self.cfg.local,
        )

    # ------------------------------------------------------------ publishing

    def publish_all(self) -> None:
        """(Re)publish coordinator status, the current release and the current round, all retained."""
        v = self.state["version"]
        self.link.publish(
            self.topics.coordinator_status, encode_status("online", version=v, round=self.state["round"]), retain=True
        )
        self.link.publish(self.topics.model_latest, pack_release(self.releases / f"v{v}"), retain=True)
        self.link.publish(self.topics.rounds_current, self.round_msg().encode(), retain=True)

    # ------------------------------------------------------------ updates

    def on_update(self, topic: str, payload: bytes) -> None:
        parsed = self.topics.parse_device_topic(topic)
        if parsed is None or parsed[1] != "update":
            return
        device_id = parsed[0]
        verdict = check_update(device_id, payload, self.rules(), self.spool.accepted_ids)
        if verdict.status == "accepted":
            self.spool.put(self.state["round"], verdict.update_id, payload)  # fsync before the ack
            self.accepted[verdict.update_id] = verdict.update
            log.info(
                "round %d: accepted %s from %s (%d/%d)",
                self.state["round"],
                verdict.update_id,
                device_id,
                len(self.accepted),
                self.cfg.min_updates,
            )
        elif verdict.status == "duplicate":
            self.duplicates += 1
            log.info("duplicate update %s from %s", verdict.update_id, device_id)
        else:
            self.rejected[verdict.reason or "unknown"] += 1
            log.warning("rejected update %s from %s: %s", verdict.update_id, device_id, verdict.reason)
        ack = Ack(verdict.update_id, verdict.status, verdict.reason, self.state["version"])
        self.link.publish(self.topics.device(device_id, "ack"), ack.encode())
        if len(self.accepted) >= self.cfg.min_updates:
            self.close_round()

    def close_round(self) -> None:
        """FedAvg the round's spooled updates into release v+1, publish it and open the next round."""
        t0 = time.perf_counter()
        rnd, v = self.state["round"], self.state["version"]
        updates = self.spool.updates(rnd)
        theta = aggregate(
            self.weights, [u.deltas for u in updates], [u.num_samples for u in updates], self.cfg.max_samples_per_update
        )
        out = self.releases / f"v{v + 1}"
        self.manifest = self.rebuild(self.releases / f"v{v}", theta, v + 1, out)
        self.weights = load_weights(out)
        summary = RoundSummary(
            rnd,
            v + 1,
            tuple(sorted(u.device_id for u in updates)),
            len(updates),
            dict(self.rejected),
            self.duplicates,
            dict(self.manifest.metrics),
            time.monotonic() - self.round_started_s,
        )
        self.state = {"version": v + 1, "round": rnd + 1, "deadline": time.time() + self.cfg.round_timeout_s}
        self._save_state(self.state)
        self.accepted, self.rejected, self.duplicates = {}, Counter(), 0
        self.round_started_s = time.monotonic()
        self.rounds_done += 1
        log.info(
            "round %d closed: %d updates → release v%d in %.2fs", rnd, len(updates), v + 1, time.perf_counter() - t0
        )
        self.publish_all()
        if self.on_round:
            self.on_round(summary)

    def check_deadline(self) -> None:
        """At the deadline: close with ≥ min_updates, else re-announce the round with a new deadline."""
        if time.time() < self.state["deadline"]:
            return
        if len(self.accepted) >= self.cfg.min_updates:
            self.close_round()
            return
        self.state = {**self.state, "deadline": time.time() + self.cfg.round_timeout_s}
        self._save_state(self.state)
        log.info(
            "round %d: %d/%d updates at the deadline; re-announced",
            self.state["round"],
            len(self.accepted),
            self.cfg.min_updates,
        )
        self.link.publish(self.topics.rounds_current, self.round_msg().encode(), retain=True)

    # ------------------------------------------------------------ loop

    def done(self) -> bool:
        return self.cfg.max_rounds is not None and self.rounds_done >= self.cfg.max_rounds

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set or `max_rounds` rounds are aggregated."""
        self.link.start(wait_s=0)
        try:
            while not stop.is_set() and not self.done():
                try:
                    topic, payload = self.events.get(timeout=self.cfg.tick_s)
                except queue.Empty:
                    pass
                else:
                    if topic == "":
                        self.publish_all()
                    else:
                        self.on_update(topic, payload)
                self.check_deadline()
        finally:
            self.link.stop((self.topics.coordinator_status, OFFLINE))

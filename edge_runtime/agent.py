"""The device agent: one event loop over MQTT messages — releases, rounds, acks — and the outbox.

paho's network thread only enqueues `(topic, payload)`; everything else runs on the
agent's own thread, so no state is shared between threads.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge_runtime.inference import InferenceProgram
from edge_runtime.outbox import Outbox
from edge_runtime.release import ReleaseStore
from edge_runtime.trainer import TrainProgram, local_train
from edgelearn.atomic import write_bytes
from edgelearn.bundle import INFER_PTE, TRAIN_PTE, BundleError, Manifest, load_weights, pack_release
from edgelearn.mqtt import MqttLink
from edgelearn.protocol import OFFLINE, Ack, ProtocolError, RoundMsg, Topics, Update, encode_status, encode_update

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeviceConfig:
    broker_url: str
    fleet: str
    device_id: str
    state_dir: Path
    topic_root: str = "edgelearn"
    encoding: str = "fp32"
    ack_timeout_s: float = 10.0
    max_outbox: int = 100
    tick_s: float = 0.2
    keepalive_s: int = 30
    mqtt_v311: bool = False  # only for brokers without MQTT 5 (the embedded demo broker)


@dataclass
class Active:
    manifest: Manifest
    infer: InferenceProgram
    train: TrainProgram | None
    weights: dict[str, np.ndarray]


def load_release(bundle_dir: Path, manifest: Manifest, example: tuple[np.ndarray, np.ndarray]) -> Active:
    """Load both programs of a verified bundle and smoke-test inference; raises on any failure."""
    weights = load_weights(bundle_dir)
    infer = InferenceProgram((bundle_dir / INFER_PTE).read_bytes())
    out = infer.predict(np.zeros(manifest.input["shape"], dtype=np.float32))
    if not np.isfinite(out).all():
        raise ValueError("smoke inference returned non-finite values")
    train = None
    if TRAIN_PTE in manifest.files:
        train = TrainProgram((bundle_dir / TRAIN_PTE).read_bytes(), weights, example)
    return Active(manifest, infer, train, weights)


class DeviceAgent:
    """Learns from local (x, y) when a round includes this device and sends the update until acked."""

    def __init__(self, cfg: DeviceConfig, x: np.ndarray, y: np.ndarray) -> None:
        self.cfg, self.x, self.y = cfg, x, y
        self.topics = Topics(cfg.fleet, cfg.topic_root)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.releases = ReleaseStore(cfg.state_dir)
        self.outbox = Outbox(cfg.state_dir / "outbox", cfg.max_outbox)
        self.progress_file = cfg.state_dir / "device.json"
        self.last_round = self._load_progress()
        self.pending_round: RoundMsg | None = None
        self.active: Active | None = None
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.link = MqttLink(
            cfg.broker_url,
            f"edgelearn-{cfg.fleet}-{cfg.device_id}",
            [self.topics.model_latest, self.topics.rounds_current, self.topics.device(cfg.device_id, "ack")],
            on_message=lambda t, p: self.events.put((t, p)),
            will=(self.topics.device(cfg.device_id, "status"), OFFLINE),
            mqtt_v311=cfg.mqtt_v311,
            on_connected=lambda: self.events.put(("", b"connected")),
        )
        self._restore_active()

    # ------------------------------------------------------------ state

    def _load_progress(self) -> int:
        try:
            return int(json.loads(self.progress_file.read_bytes())["last_round"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def _example(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[:1], self.y[:1]

    def _restore_active(self) -> None:
        found = self.releases.load_active()
        if found:
            try:
                self.active = load_release(found[1], found[0], self._example())
                log.info("%s: resumed release v%d", self.cfg.device_id, found[0].version)
            except Exception as e:
                log.error("%s: active release v%d fails to load: %s", self.cfg.device_id, found[0].version, e)

    @property
    def version(self) -> int:
        return self.active.manifest.version if self.active else 0

    def publish_status(self, state: str) -> None:
        self.link.publish(
            self.topics.device(self.cfg.device_id, "status"),
            encode_status(state, version=self.version, round=self.last_round, ts=round(time.time(), 3)),
            retain=True,
        )

    # ------------------------------------------------------------ events

    def handle(self, topic: str, payload: bytes) -> None:
        if topic == "":
            self.publish_status("idle")
        elif topic == self.topics.model_latest:
            self.on_release(payload)
        elif topic == self.topics.rounds_current:
            self.on_round(payload)
        elif topic == self.topics.device(self.cfg.device_id, "ack"):
            self.on_ack(payload)

    def on_release(self, payload: bytes) -> None:
        """Verify, install, load and smoke-test a new release; activate it only if all of that works."""
        if not payload:
            return
        try:
            manifest = self.releases.install(payload)
        except BundleError as e:
            log.error("%s: release refused: %s (keeping v%d)", self.cfg.device_id, e, self.version)
            return
        if manifest is None:
            return
        try:
            active = load_release(self.releases.path(manifest.version), manifest, self._example())
        except Exception as e:
            log.error(
                "%s: release v%d fails to load (%s); keeping v%d", self.cfg.device_id, manifest.version, e, self.version
            )
            self.releases.discard(manifest.version)
            return
        self.releases.activate(manifest.version)
        self.active = active
        log.info("%s: activated release v%d", self.cfg.device_id, manifest.version)
        self.publish_status("idle")
        if self.pending_round and self.pending_round.base_version == manifest.version:
            rnd, self.pending_round = self.pending_round, None
            self.train_round(rnd)

    def seed(self, bundle_dir: Path) -> None:
        """Install a local bundle (e.g. the one flashed with the device) as if it came from the broker."""
        self.on_release(pack_release(bundle_dir))

    def on_round(self, payload: bytes) -> None:
        try:
            rnd = RoundMsg.decode(payload)
        except ProtocolError as e:
            log.warning("%s: bad round message: %s", self.cfg.device_id, e)
            return
        if not rnd.includes(self.cfg.device_id) or rnd.round <= self.last_round:
            return
        if rnd.base_version > self.version:
            self.pending_round = rnd  # its release has not arrived yet
        elif rnd.base_version == self.version:
            self.train_round(rnd)

    def train_round(self, rnd: RoundMsg) -> None:
        """Train on local data, put the update in the outbox, then record the round as done."""
        if self.active is None or self.active.train is None:
            log.warning(
                "%s: release v%d has no training program; skipping round %d",
                self.cfg.device_id,
                self.version,
                rnd.round,
            )
            return
        self.publish_status("training")
        prog = self.active.train
        prog.load(self.active.weights)
        res = local_train(prog, self.x, self.y, rnd.local.steps, rnd.local.batch_size, rnd.local.lr, seed=rnd.round)
        update = Update(
            update_id=f"{self.cfg.device_id}-r{rnd.round}-v{rnd.base_version}",  # same id if retrained after a crash
            device_id=self.cfg.device_id,
            model_id=self.active.manifest.model_id,
            base_version=rnd.base_version,
            num_samples=res.num_samples,
            deltas=res.deltas,
            round=rnd.round,
            encoding=self.cfg.encoding,
            loss=res.loss,
            train_seconds=res.train_seconds,
        )
        self.outbox.put(update.update_id, encode_update(update))
        self.last_round = rnd.round
        write_bytes(self.progress_file, json.dumps({"last_round": rnd.round}).encode())
        log.info(
            "%s: round %d trained on %d samples in %.2fs, loss %.3f",
            self.cfg.device_id,
            rnd.round,
            res.num_samples,
            res.train_seconds,
            res.loss,
        )
        self.publish_status("idle")
        self.flush_outbox()

    def on_ack(self, payload: bytes) -> None:
        try:
            ack = Ack.decode(payload)
        except ProtocolError as e:
            log.warning("%s: bad ack: %s", self.cfg.device_id, e)
            return
        if ack.update_id and self.outbox.remove(ack.update_id):
            log.info(
                "%s: update %s %s%s",
                self.cfg.device_id,
                ack.update_id,
                ack.status,
                f" ({ack.reason})" if ack.reason else "",
            )

    def flush_outbox(self) -> None:
        """(Re)send every update whose ack is overdue; backoff with jitter between attempts."""
        if not self.link.connected.is_set():
            return
        now = time.monotonic()
        topic = self.topics.device(self.cfg.device_id, "update")
        for item in self.outbox.due(now):
            try:
                payload = item.path.read_bytes()
            except FileNotFoundError:
                self.outbox.pending.pop(item.update_id, None)
                continue
            if self.link.publish(topic, payload):
                self.outbox.sent(item, now, self.cfg.ack_timeout_s)

    # ------------------------------------------------------------ loop

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; then publish offline status and disconnect."""
        self.link.start(wait_s=0)
        try:
            while not stop.is_set():
                try:
                    topic, payload = self.events.get(timeout=self.cfg.tick_s)
                except queue.Empty:
                    pass
                else:
                    self.handle(topic, payload)
                self.flush_outbox()
        finally:
            self.link.stop((self.topics.device(self.cfg.device_id, "status"), OFFLINE))

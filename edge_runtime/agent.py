"""The device agent: one event loop over MQTT messages — releases, rounds, the coordinator's status, acks —
and the outbox.

paho's network thread only enqueues `(topic, payload)`; everything else runs on the
agent's own thread, so no state is shared between threads.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Protocol

import numpy as np

from edge_runtime.budget import PAUSE, Governor, PsutilSource, ReadingSource
from edge_runtime.canary import HELD_OUT, CanaryWatch, Health, compare_losses, record_start
from edge_runtime.config import DeviceConfig
from edge_runtime.ingest import Ingestor, open_source
from edge_runtime.learner import Job, Learner
from edge_runtime.outbox import Outbox
from edge_runtime.release import (
    Active,
    IncompleteReleaseError,
    ReleaseStore,
    load_release,
    personalize,
    public_key,
)
from edge_runtime.samples import SampleStore
from edge_runtime.schedule import Scheduler, sized_steps
from edgelearn.bundle import BundleError, Manifest, pack_release
from edgelearn.mqtt import MqttLink
from edgelearn.protocol import (
    OFFLINE,
    Ack,
    ProtocolError,
    RolloutMsg,
    RoundMsg,
    Topics,
    decode_status,
    encode_status,
    encode_update,
)
from edgelearn.signing import verify_message

log = logging.getLogger(__name__)


class Endpoint(Protocol):
    """What the agent asks of a local inference endpoint (edge_runtime.serve.Serving)."""

    def busy(self) -> bool: ...  # requests in flight or just served: training waits
    def summary(self) -> dict[str, float]: ...  # recent latency percentiles, for the status


class DeviceAgent:
    """Serves inference, learns from its sample store when a round includes it (or, when the coordinator
    runs in asynchronous mode, whenever nothing is unacked) and the budget allows, and sends each update
    until acked."""

    def __init__(
        self,
        cfg: DeviceConfig,
        x: np.ndarray | None = None,
        y: np.ndarray | None = None,
        source_reading: ReadingSource | None = None,
    ) -> None:
        self.cfg = cfg
        self.x, self.y = x, y  # the fixed local data set, if any (it is also imported into the sample store)
        self.topics = Topics(cfg.fleet, cfg.topic_root)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.releases = ReleaseStore(cfg.state_dir, public_key(cfg.public_key_path), cfg.fleet, cfg.min_release)
        self.relay_key = public_key(cfg.relay_key_path)
        self.outbox = Outbox(cfg.state_dir / "outbox", cfg.max_outbox)
        self._outbox_full_logged = False
        self.schedule = Scheduler(
            cfg.device_id, cfg.state_dir / "device.json", cfg.async_interval_s, cfg.async_local, cfg.mu
        )
        self.schedule.recover(self.outbox.pending)
        self.active: Active | None = None
        self.learner: Learner | None = None
        self.store = SampleStore(cfg.state_dir / "samples", cfg.max_store_samples)
        self.ingest: Ingestor | None = None
        self.governor = Governor(cfg.budget, source_reading or PsutilSource())
        self._import_shard(x, y)
        self._source = open_source(cfg.samples)
        self._status_sent: tuple | None = None  # (state, budget decision) last published
        self.activation_s: float | None = None  # verify + load + smoke-test + activate of the last release
        self.serving: Endpoint | None = None  # the local inference endpoint, when `start_serving` runs one
        self.lock = threading.Lock()  # the store and learner: the agent's loop vs the endpoint's feedback
        self.steps_total = self.pauses_total = 0
        self.canary = CanaryWatch(cfg.device_id)  # releases on trial (protocol v1.3)
        self.health = Health(record_start(cfg.state_dir, time.time()))
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.link = MqttLink(
            cfg.broker_url,
            self.topics.client_id(cfg.device_id),
            [
                self.topics.model_lean,
                self.topics.model_canary,
                self.topics.rollout_current,
                self.topics.rounds_current,
                self.topics.coordinator_status,
                self.topics.device(cfg.device_id, "ack"),
            ],
            on_message=lambda t, p: self.events.put((t, p)),
            will=(self.topics.device(cfg.device_id, "status"), OFFLINE),
            mqtt_v311=cfg.mqtt_v311,
            keepalive_s=cfg.keepalive_s,
            on_connected=lambda: self.events.put(("", b"connected")),
        )
        self.releases.restore(self._load)  # the active release, or the previous one if it fails to load

    # ------------------------------------------------------------ state

    @property
    def last_round(self) -> int:
        return self.schedule.progress.last_round

    def _import_shard(self, x: np.ndarray | None, y: np.ndarray | None) -> None:
        """Put a fixed local data set into the sample store once (a marker offset makes it idempotent)."""
        if x is None or y is None or self.store.offsets.get("shard"):
            return
        for i in range(len(y)):
            self.store.add(x[i], y[i], flush_when_full=False)
        self.store.flush({"shard": len(y)})

    def _load(self, bundle_dir: Path, manifest: Manifest) -> Active:
        """Load, smoke-test and activate an installed release, with the device's personal adapter if it has one."""
        active = personalize(
            load_release(bundle_dir, manifest), bundle_dir, self.cfg.personal_adapter, self.cfg.state_dir
        )
        loss = self._trial_loss(active) if self.canary.trying(manifest.version) else None
        self._activate(active)
        self.health.activated(manifest.version, loss)
        return active

    def _trial_loss(self, new: Active) -> dict | None:
        """A canary's loss entry: the release on trial and the one it replaces on the device's recent samples."""
        recent = self.store.read(max(0, self.store.next_seq - HELD_OUT), HELD_OUT)
        if recent is None or self.active is None:
            return None
        return compare_losses(self.active.infer, self.version, new.infer, new.manifest.version, recent[0], recent[1])

    def _activate(self, active: Active) -> None:
        """Serve `active` and give the learner an engine on its weights (resuming a checkpointed job)."""
        m = active.manifest
        engine = active.engine(self.cfg.engine)
        self.active = active
        if self.learner is not None:  # keep the store position and replay buffer across releases
            self.learner.save(list(self.outbox.pending))
        self.learner = Learner(
            engine, self.store, self.cfg.state_dir, self.governor, self.cfg.replay_size, self.cfg.checkpoint_every_s
        )
        self.learner.eager_factory = lambda: active.engine("eager")
        self.learner.restore()
        job = self.learner.job
        if job and self.schedule.done_or_stale(job, m.version):
            self.learner.job = None
        if self.ingest is None:
            self.ingest = Ingestor(self.store, self.active.sample_format(), self._source, self.cfg.tick_s)
        log.info("%s: serving v%d, training engine %s", self.cfg.device_id, m.version, engine.name)

    @property
    def version(self) -> int:
        return self.active.manifest.version if self.active else 0

    def status_fields(self) -> dict:
        job = self.learner.job if self.learner else None
        return {
            "version": self.version,
            "round": self.last_round,
            "job": {"round": job.round, "seq": job.seq, "steps_done": job.steps_done, "steps": job.steps}
            if job
            else None,
            "mode": self.schedule.mode,
            "budget": self.governor.telemetry(),
            "samples": {
                "stored": len(self.store),
                "accepted": self.ingest.accepted if self.ingest else 0,
                "malformed": self.ingest.malformed if self.ingest else 0,
            },
            "outbox": len(self.outbox.pending),
            "outbox_full": self.outbox.full,
            **({"serving": self.serving.summary()} if self.serving else {}),
            "health": self.health.fields(),
            "ts": round(time.time(), 3),
        }

    def publish_status(self, state: str) -> None:
        fields = self.status_fields()
        self._status_sent = (state, self.governor.decision)
        self.link.publish(self.topics.device(self.cfg.device_id, "status"), encode_status(state, **fields), retain=True)

    def _state(self) -> str:
        if self.learner and self.learner.job:
            d = self.governor.decision
            return "paused" if d and d.action == PAUSE else "training"
        return "idle"

    # ------------------------------------------------------------ events

    def handle(self, topic: str, payload: bytes) -> None:
        if topic == "":
            self.publish_status(self._state())
        elif topic == self.topics.model_lean:
            self.on_release(payload)
        elif topic == self.topics.model_latest:  # the full archive, asked for after a lean one it could not complete
            self.link.unsubscribe(self.topics.model_latest)
            self.on_release(payload)
        elif topic == self.topics.model_canary:
            self.canary.archive = payload or None
            self._try_canary()
        elif topic == self.topics.rollout_current:
            self.on_rollout(payload)
        elif topic == self.topics.rounds_current:
            self.on_round(payload)
        elif topic == self.topics.device(self.cfg.device_id, "ack"):
            self.on_ack(payload)
        elif topic == self.topics.coordinator_status:
            self.on_coordinator_status(payload)

    def handle_safely(self, topic: str, payload: bytes) -> None:
        """`handle`, but an exception nobody foresaw is logged and the agent keeps serving: retained
        payloads come back at every restart, so a crash on one would repeat forever."""
        try:
            self.handle(topic, payload)
        except Exception:
            log.exception("%s: unexpected failure handling a message on %s; ignored", self.cfg.device_id, topic)

    def on_release(self, payload: bytes) -> None:
        """Verify, install, load and smoke-test a new release; activate it only if all of that works."""
        if not payload:
            return
        t0 = time.monotonic()
        try:
            manifest = self.releases.install(payload)
        except IncompleteReleaseError as e:
            log.info("%s: %s; fetching the full archive", self.cfg.device_id, e)
            self.link.subscribe(self.topics.model_latest)
            return
        except BundleError as e:
            log.error("%s: release refused: %s (keeping v%d)", self.cfg.device_id, e, self.version)
            return
        if manifest is None:
            return
        try:
            self._load(self.releases.path(manifest.version), manifest)
        except Exception as e:
            log.error(
                "%s: release v%d fails to load (%s); keeping v%d", self.cfg.device_id, manifest.version, e, self.version
            )
            self.releases.discard(manifest.version)
            self.health.failed_to_load(manifest.version, e)
            self.publish_status(self._state())
            return
        self.releases.activate(manifest.version)
        self.activation_s = time.monotonic() - t0
        log.info("%s: activated release v%d in %.3fs", self.cfg.device_id, manifest.version, self.activation_s)
        self.publish_status(self._state())
        self.start_next_job()

    def on_rollout(self, payload: bytes) -> None:
        """A (signed) trial: install the release on trial if this device is one of its canaries."""
        if payload and not self.signed_by_coordinator(payload, self.topics.rollout_current, "rollout"):
            return
        try:
            self.canary.rollout = RolloutMsg.decode(payload) if payload else None
        except ProtocolError as e:
            log.warning("%s: rollout ignored: %s", self.cfg.device_id, e)
            return
        self._try_canary()

    def _try_canary(self) -> None:
        archive, trial = self.canary.due(self.version), self.canary.rollout
        if archive is None or trial is None:
            return
        log.info("%s: canary of release v%d", self.cfg.device_id, trial.version)
        self.on_release(archive)
        if self.version != trial.version and self.health.failed.get("release") != trial.version:
            self.health.failed_to_load(trial.version, "refused (see the device's log)")
            self.publish_status(self._state())

    def seed(self, bundle_dir: Path) -> None:
        """Install a local bundle (e.g. the one flashed with the device) as if it came from the broker."""
        self.on_release(pack_release(bundle_dir))

    def signed_by_coordinator(self, payload: bytes, topic: str, what: str) -> bool:
        """In a signed fleet, a round or ack counts only with the coordinator's signature for its topic (v1.2); an
        ack may carry the site relay's instead, when this device was given its key (v1.4)."""
        try:
            if what == "ack" and self.relay_key is not None and self.releases.public_key is not None:
                with contextlib.suppress(BundleError):
                    verify_message(payload, topic, self.relay_key)
                    return True
            verify_message(payload, topic, self.releases.public_key)
            return True
        except BundleError as e:
            log.warning("%s: %s ignored: %s", self.cfg.device_id, what, e)
            return False

    def on_round(self, payload: bytes) -> None:
        if not self.signed_by_coordinator(payload, self.topics.rounds_current, "round"):
            return
        try:
            rnd = RoundMsg.decode(payload)
        except ProtocolError as e:
            log.warning("%s: bad round message: %s", self.cfg.device_id, e)
            return
        self.schedule.offer_round(rnd)
        self.start_next_job()

    def on_coordinator_status(self, payload: bytes) -> None:
        """Follow the coordinator's mode (`sync` or `async`); an offline status leaves it as it was."""
        try:
            mode = decode_status(payload).get("mode")
        except ProtocolError as e:
            log.warning("%s: bad coordinator status: %s", self.cfg.device_id, e)
            return
        if self.schedule.set_mode(mode):
            log.info("%s: coordinator mode %s", self.cfg.device_id, mode)
            job = self.learner.job if self.learner else None
            if mode == "sync" and job is not None and job.seq and self.learner:  # a sync coordinator rejects it
                log.info("%s: asynchronous job %d dropped", self.cfg.device_id, job.seq)
                self.learner.clear(list(self.outbox.pending))
            self.publish_status(self._state())

    def outbox_has_room(self) -> bool:
        """False (logged once, shown in the status) while the outbox is full: no new job may start then,
        since its update could only be stored by dropping an unacked one."""
        if not self.outbox.full:
            self._outbox_full_logged = False
            return True
        if not self._outbox_full_logged:
            self._outbox_full_logged = True
            n = len(self.outbox.pending)
            log.warning("%s: outbox full (%d unacked): no new local job until acks free room", self.cfg.device_id, n)
            self.publish_status(self._state())
        return False

    def next_job(self) -> Job | None:
        """The pending round once its release is active (it replaces a running job); else, in asynchronous
        mode, the next job when none runs, nothing is unacked and the budget allows. Never while the
        outbox is full."""
        s = self.schedule
        if s.round_ready(self.version):
            return s.round_job(self.version) if self.outbox_has_room() else None
        if s.mode != "async" or (self.learner and self.learner.job is not None) or self.outbox.pending:
            return None
        job = s.async_job(self.version, time.monotonic())
        return job if job and self.governor.check().action != PAUSE else None

    def start_next_job(self) -> None:
        """Start `next_job` if there is one; `work` then does its steps one by one as the budget allows."""
        if self.learner is None or self.active is None:
            return
        job = self.next_job()
        if job is None:
            return
        self._size_to_deadline(job)
        self.learner.start(job, self.active.weights)
        kind = f"asynchronous job {job.seq}" if job.seq else f"round {job.round}"
        log.info("%s: %s from v%d", self.cfg.device_id, kind, job.base_version)
        self.publish_status("training")

    def _size_to_deadline(self, job: Job) -> None:
        """A round job takes only the steps that fit before the round's deadline at the measured step time and
        the budget's training share (`schedule.sized_steps`), so a slow or throttled device is not late."""
        deadline = self.schedule.round_deadline_unix_s
        if job.seq or not job.round or deadline is None or self.learner is None:
            return
        steps = sized_steps(job.steps, deadline - time.time(), self.learner.s_per_step, self.cfg.budget.train_duty)
        if steps < job.steps:
            log.info("%s: round %d: %d of %d steps fit before the deadline (%.1f ms a step)", self.cfg.device_id,
                     job.round, steps, job.steps, 1e3 * (self.learner.s_per_step or 0.0))  # fmt: skip
            job.steps = steps

    def finish_job(self) -> None:
        """Put the update in the outbox (fsync), then record the job as done (atomic), then clear it."""
        assert self.learner is not None and self.active is not None, "a job finishes only on an active release"
        res = self.learner.finish()
        job = res.job
        update = self.schedule.update_of(res, self.active.manifest.model_id, self.cfg.encoding)
        self.outbox.put(update.update_id, encode_update(update))
        self.schedule.finished(job, time.monotonic())
        self.learner.clear(list(self.outbox.pending))
        log.info("%s: update %s: %d steps on %d samples in %.2fs, loss %.3f", self.cfg.device_id, update.update_id,
                 job.steps, res.num_samples, job.train_s, job.loss)  # fmt: skip
        self.publish_status("idle")
        self.flush_outbox()

    def on_ack(self, payload: bytes) -> None:
        if not self.signed_by_coordinator(payload, self.topics.device(self.cfg.device_id, "ack"), "ack"):
            return
        try:
            ack = Ack.decode(payload)
        except ProtocolError as e:
            log.warning("%s: bad ack: %s", self.cfg.device_id, e)
            return
        if ack.update_id and self.outbox.remove(ack.update_id):
            reason = f" ({ack.reason})" if ack.reason else ""
            log.info("%s: update %s %s%s", self.cfg.device_id, ack.update_id, ack.status, reason)

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

    def work(self) -> bool:
        """Ingest new samples and do at most one training step, unless inference requests are being served
        (they come first); True if a step ran (more may follow)."""
        with self.lock:
            if self.ingest is not None:
                self.ingest.poll()
            self.start_next_job()  # a round that waited for room in the outbox, or the next asynchronous job
            if self.learner is None or self.learner.job is None or (self.serving and self.serving.busy()):
                return False
            outcome = self.learner.step()
        self.steps_total += outcome == "stepped"
        self.pauses_total += outcome == "paused"
        if outcome == "done":
            self.finish_job()
        elif self._status_sent != (self._state(), self.governor.decision):
            self.publish_status(self._state())  # a budget decision changed: report it
        return outcome == "stepped"

    def add_feedback(self, x: np.ndarray, y: np.ndarray) -> int:
        """A validated sample from the inference endpoint's feedback, durable (flushed) on return; the store size."""
        with self.lock:
            if self.ingest is None:
                raise RuntimeError("no release is active: samples have no format yet")
            self.ingest.add(x, y, flush_when_full=False)
            self.store.flush()
            return len(self.store)

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set; then checkpoint, publish offline status and disconnect."""
        self.link.start(wait_s=0)
        busy = False
        try:
            while not stop.is_set():
                try:
                    topic, payload = self.events.get(timeout=0 if busy else self.cfg.tick_s)
                except queue.Empty:
                    pass
                else:
                    self.handle_safely(topic, payload)
                busy = self.work()
                self.flush_outbox()
        finally:
            if self.learner is not None:
                self.learner.save(list(self.outbox.pending))
            self.link.stop((self.topics.device(self.cfg.device_id, "status"), OFFLINE))

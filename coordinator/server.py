"""The coordinator: publishes releases and rounds, validates and acks updates, aggregates, over MQTT.

paho's thread only enqueues messages; validation, spooling, aggregation and publishing all run on
the coordinator's own thread. The durable core (state, fold, close) is `rounds.Rounds`.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import replace

from coordinator.config import CoordinatorConfig
from coordinator.metrics import Metrics
from coordinator.rollout import (
    COMMAND_KEY,
    HISTORY_KEY,
    ROLLOUT_KEY,
    CanaryConfig,
    Trial,
    choose_canaries,
    fleet_caught_up,
    judge,
    with_history,
)
from coordinator.rounds import Rebuild, Rounds, RoundSummary
from coordinator.selection import eligible, may_open, over_selected, select, top_up
from coordinator.sites import read_relays, record_relay_statuses
from coordinator.state import StateLayout, StateLockedError
from edgelearn.bundle import release_archives
from edgelearn.mqtt import MqttLink
from edgelearn.protocol import (
    NAME_RE,
    OFFLINE,
    Ack,
    ProtocolError,
    RolloutMsg,
    RoundMsg,
    Topics,
    decode_status,
    encode_status,
)

__all__ = ["Coordinator", "CoordinatorConfig", "RoundSummary", "StateLockedError"]

log = logging.getLogger(__name__)


class Coordinator:
    """Synchronous FedAvg rounds (protocol v1) or asynchronous FedBuff, over one MQTT connection."""

    def __init__(
        self,
        cfg: CoordinatorConfig,
        rebuild: Rebuild,
        on_round: Callable[[RoundSummary], None] | None = None,
        sign: Callable[[bytes, str], bytes] | None = None,
    ) -> None:
        """`sign(payload, topic)`: a signed fleet's signer for rounds and acks (edgelearn.signing.sign_message)."""
        self.cfg, self.on_round = cfg, on_round
        self.sign = sign or (lambda payload, topic: payload)
        self._lock = StateLayout(cfg.state_dir).lock("starting a coordinator")
        self.rounds = Rounds(cfg, rebuild)
        self.topics = Topics(cfg.fleet, cfg.topic_root)
        self.metrics = Metrics()
        self.metrics.version.set(self.rounds.version)
        self.metrics.round_accepted.set(self.rounds.count)
        self.metrics.dp_noise_multiplier.set(cfg.dp.noise_multiplier if cfg.dp else 0.0)
        self.statuses: dict[str, dict] = {}
        self.relays = read_relays(self.rounds.store)  # site relays' last statuses (v1.4)
        self.participants = self.rounds.store.invited(self.rounds.round)  # the open round's, kept across restarts
        self.selected = cfg.target_participants is None or self.participants is not None  # None: any online device
        self.attempt_round, self.attempt = 0, 0  # selections drawn for round `attempt_round`
        self.select_from = 0.0  # monotonic time the current round began to wait for its participants
        self.waiting: int | None = None  # eligible devices online when the wait was last reported
        self.connected_at: float | None = None
        self.rounds_done = 0
        saved = self.rounds.store.get(ROLLOUT_KEY)
        self.trial = Trial.from_json(saved) if saved else None  # an open canary trial (protocol v1.3)
        self.trial = self.trial if self.trial and self.trial.state == "canary" else None
        self.promoted: Trial | None = None  # promoted, until every online device runs it
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        t = self.topics
        self.link = MqttLink(
            cfg.broker_url,
            t.client_id(),
            [t.all_devices("update"), t.all_devices("status"), t.all_relays("update"), t.all_relays("status")],
            on_message=lambda t, p: self.events.put((t, p)),
            will=(self.topics.coordinator_status, OFFLINE),
            mqtt_v311=cfg.mqtt_v311,
            on_connected=lambda: self.events.put(("", b"connected")),
        )

    # ------------------------------------------------------------ publishing

    def round_msg(self) -> RoundMsg:
        e = self.rounds
        invited = None if self.participants is None else tuple(self.participants)
        return RoundMsg(e.round, e.version, e.deadline, self.cfg.min_updates, invited, self.cfg.local, e.relay_terms())

    def publish_all(self) -> None:
        """(Re)publish coordinator status, the current release and (sync mode) the current round, retained; while
        a release is on trial, the fleet's release stays the stable one and no round opens."""
        e = self.rounds
        self.publish_status()
        stable = self.trial.stable if self.trial else e.version
        full, lean = release_archives(e.release_dir(stable))  # v1's full archive first, for a v1.2 device sent there
        self.link.publish(self.topics.model_latest, full, retain=True)
        self.link.publish(self.topics.model_lean, lean, retain=True)
        if self.trial is not None:
            self.publish_trial(self.trial)
            return
        self.publish_round()

    def publish_status(self, **extra: object) -> None:
        """The retained coordinator status; `waiting` says why no round is open yet, `trial` what is on trial."""
        e = self.rounds
        if self.trial is not None:
            extra["trial"] = {"version": self.trial.version, "stable": self.trial.stable, "canary": self.trial.canary}
        status = encode_status("online", version=e.version, round=e.round, mode=self.cfg.mode, **extra)
        self.link.publish(self.topics.coordinator_status, status, retain=True)

    def publish_round(self) -> None:
        if self.cfg.mode == "sync" and self.selected:
            self.rounds.open_round(self.participants)
            topic = self.topics.rounds_current
            self.link.publish(topic, self.sign(self.round_msg().encode(), topic), retain=True)

    def open_when_quorum(self, waited_s: float) -> bool:
        """Select and publish the round once enough eligible devices are online (`selection.may_open`);
        until then log, show in the coordinator status and the metric why it waits. True if opened."""
        online = len(eligible(self.statuses, self.cfg.eligibility))
        need = over_selected(self.cfg.min_updates, self.cfg.over_selection)
        if not may_open(online, self.cfg.min_updates, self.cfg.over_selection, waited_s, self.cfg.quorum_wait_s):
            self.metrics.round_waiting.set(need - online)
            if self.waiting != online:
                self.waiting = online
                log.info("round %d waits: %d of %d eligible devices online (or %d after %.0fs)", self.rounds.round,
                         online, need, self.cfg.min_updates, self.cfg.quorum_wait_s)  # fmt: skip
                self.publish_status(waiting={"online_eligible": online, "needed": need})
            return False
        self.waiting = None
        self.metrics.round_waiting.set(0)
        self.rounds.extend_deadline()  # the round's time runs from its opening
        self.select_participants()
        self.publish_status()
        self.publish_round()
        return True

    def top_up_round(self) -> None:
        """Invite devices that came online (or became eligible) while the open round is under-subscribed."""
        if not (self.cfg.mode == "sync" and self.selected and self.participants is not None):
            return
        target = self.cfg.target_participants or 0
        grown = top_up(self.participants, eligible(self.statuses, self.cfg.eligibility), target,
                       self.cfg.over_selection, f"{self.rounds.round}/{self.attempt}/top-up")  # fmt: skip
        if len(grown) > len(self.participants):
            log.info("round %d: %d more devices invited (%d in all)", self.rounds.round,
                     len(grown) - len(self.participants), len(grown))  # fmt: skip
            self.participants = grown
            self.publish_round()

    def select_participants(self) -> None:
        """Invite ⌈target·over_selection⌉ eligible online devices (reproducibly, seeded by the round)."""
        candidates = eligible(self.statuses, self.cfg.eligibility)
        rnd = self.rounds.round
        self.attempt = self.attempt + 1 if self.attempt_round == rnd else 0  # a re-announce draws anew
        self.attempt_round = rnd
        self.participants = select(
            candidates, self.cfg.target_participants or 0, self.cfg.over_selection, f"{rnd}/{self.attempt}"
        )
        self.selected = True
        log.info("round %d: selected %d of %d eligible devices", self.rounds.round, len(self.participants),
                 len(candidates))  # fmt: skip

    # ------------------------------------------------------------ messages

    def on_statuses(self, messages: list[tuple[str, bytes]]) -> None:
        """Remember each device's retained status (for selection, `fleet status` and the online gauge)."""
        seen = []
        for device_id, payload in messages:
            try:
                status = decode_status(payload)
            except ProtocolError as e:
                log.warning("status from %s ignored: %s", device_id, e)
                self.metrics.dropped.labels("bad_status").inc()
                continue
            self.statuses[device_id] = status
            seen.append((device_id, status))
        if seen:
            self.rounds.store.see_devices(seen)
            self.top_up_round()
            self.note_fleet_caught_up()
        self.metrics.devices_online.set(sum(s.get("state") != "offline" for s in self.statuses.values()))

    def on_messages(self, messages: list[tuple[str, bytes]]) -> None:
        """Statuses are recorded; updates (a device's, or a site relay's combined one) are handled as
        group-committed batches, then acked."""
        statuses: list[tuple[str, bytes]] = []
        updates: list[tuple[str, bytes]] = []
        relayed: list[tuple[str, bytes]] = []
        sites: list[tuple[str, bytes]] = []
        for topic, payload in messages:
            parsed = self.topics.parse_device_topic(topic)
            if parsed is not None and parsed[1] in ("status", "update"):
                group = statuses if parsed[1] == "status" else updates
            else:
                parsed = self.topics.parse_device_topic(topic, "relays")
                if parsed is None or parsed[1] not in ("status", "update"):
                    continue
                group = relayed if parsed[1] == "update" else sites
            if not NAME_RE.match(parsed[0]):  # no valid ack topic exists for it: drop, count, log
                log.warning("%s on %r dropped: the sender id is not [A-Za-z0-9_-]{1,64}", parsed[1], topic[:200])
                self.metrics.dropped.labels("bad_device_id").inc()
                continue
            group.append((parsed[0], payload))
        self.on_statuses(statuses)
        record_relay_statuses(self.rounds.store, self.relays, sites)
        for batch, via in ((updates, "device"), (relayed, "relay")):
            if batch:
                self.metrics.update_bytes.labels(via).inc(sum(len(p) for _, p in batch))
                self.on_updates(batch, via == "relay")

    def on_updates(self, updates: list[tuple[str, bytes]], relayed: bool = False) -> None:
        e = self.rounds
        verdicts = e.handle_batch(updates, relayed)  # accepted ones are fsynced and committed when this returns
        what = "combined update" if relayed else "update"
        for (sender, _), verdict in zip(updates, verdicts, strict=True):
            self.metrics.update(verdict.status, verdict.reason)
            if verdict.status == "rejected":
                log.warning("rejected %s %s from %s: %s", what, verdict.update_id, sender, verdict.reason)
            else:
                log.info("%s %s %s from %s", verdict.status, what, verdict.update_id, sender)
            topic = self.topics.relay(sender, "ack") if relayed else self.topics.device(sender, "ack")
            self.link.publish(topic, self.sign(Ack(*_ack_fields(verdict, e.version)).encode(), topic))
        log.info("round %d: %d accepted so far", e.round, e.count)
        self.metrics.round_accepted.set(e.count)  # `tick` closes the round once it is ready

    def ready(self) -> bool:
        """min_updates (sync) / K (async) accepted. A round whose invitees all reported with fewer waits for
        its deadline and is re-announced: it never closes below its quorum."""
        return self.rounds.ready()

    def close_round(self) -> None:
        t0 = time.perf_counter()
        stable = self.rounds.version
        summary = self.rounds.close()
        self.metrics.aggregation_seconds.observe(time.perf_counter() - t0)
        self.metrics.rounds.inc()
        self.metrics.version.set(self.rounds.version)
        self.metrics.round_accepted.set(0)
        self.rounds_done += 1
        if self.cfg.target_participants is not None:  # the next round opens once its quorum is online (tick)
            self.selected, self.participants, self.select_from = False, None, time.monotonic()
        self.start_trial(stable)
        self.publish_all()
        if self.on_round:
            self.on_round(summary)

    # ------------------------------------------------------------ canary trials (protocol v1.3, coordinator/rollout.py)

    def start_trial(self, stable: int) -> None:
        """After a close: the new release goes to a few online devices first, if canaries are configured."""
        c, v = self.cfg.canary, self.rounds.version
        if c is None or self.cfg.mode != "sync":
            return
        canary = choose_canaries(self.statuses, v, c)
        if not canary:
            log.warning("release v%d: no device online to try it on: released to the fleet", v)
            return
        self.save_trial(Trial(v, stable, canary, time.time()))
        log.info("release v%d on trial on %s; the fleet keeps v%d", v, ", ".join(canary), stable)

    def save_trial(self, trial: Trial) -> None:
        store = self.rounds.store
        self.trial = trial if trial.state == "canary" else None
        self.promoted = trial if trial.state == "promoted" and trial.fleet_s is None else None
        history = with_history(store.get(HISTORY_KEY), trial) if trial.state != "canary" else store.get(HISTORY_KEY)
        store.set_meta({ROLLOUT_KEY: trial.to_json(), COMMAND_KEY: "", HISTORY_KEY: history or "[]"})

    def note_fleet_caught_up(self) -> None:
        """Once every online device runs the promoted release: how long after its trial began (logged, kept)."""
        p = self.promoted
        if p is None or not fleet_caught_up(self.statuses, p.version):
            return
        done = replace(p, fleet_s=round(time.time() - p.started_unix_s, 2))
        log.info("release v%d runs on every online device %.1f s after its trial began", p.version, done.fleet_s)
        self.save_trial(done)

    def publish_trial(self, trial: Trial) -> None:
        """The signed trial message, and the release on trial (cleared once the trial ended), both retained."""
        topic = self.topics.rollout_current
        msg = RolloutMsg(trial.version, trial.stable, trial.canary, trial.state).encode()
        self.link.publish(topic, self.sign(msg, topic), retain=True)
        on_trial = release_archives(self.rounds.release_dir(trial.version), (False,))[0] if self.trial else b""
        self.link.publish(self.topics.model_canary, on_trial, retain=True)  # b"": deletes the retained one

    def tick_trial(self, trial: Trial, canary: CanaryConfig) -> None:
        """Promote or abort the trial when `rollout.judge` (or an operator's command) says so."""
        command = self.rounds.store.get(COMMAND_KEY) or ""
        if command in ("promote", "abort"):
            verdict, reason = command, "by hand (edgelearn fleet rollout)"
        else:
            verdict, reason = judge(trial, self.statuses, time.time(), canary)
        if verdict == "wait":
            return
        if verdict == "abort":
            self.rounds.roll_back(trial.stable)  # v+1 carries the stable weights: the canaries are back on them
            self.metrics.version.set(self.rounds.version)
        ended = replace(trial, state="promoted" if verdict == "promote" else "aborted", reason=reason,
                        ended_unix_s=time.time())  # fmt: skip
        self.save_trial(ended)
        (log.info if verdict == "promote" else log.warning)("release v%d %s: %s", trial.version, ended.state, reason)
        self.publish_trial(ended)
        self.publish_all()

    def tick(self) -> None:
        """Deadline handling (sync): close with ≥ min_updates, else re-select and re-announce; while a release
        is on trial, only the trial's verdict."""
        e = self.rounds
        if self.trial is not None and self.cfg.canary is not None:
            self.tick_trial(self.trial, self.cfg.canary)
            return
        if self.connected_at is not None and self.ready():  # enough updates (also when restarted mid-close)
            self.close_round()
            return
        waited_s = time.monotonic() - max(self.connected_at or 0.0, self.select_from)
        if not self.selected:  # no round is open yet: it waits for its quorum, not for a deadline
            if self.connected_at and waited_s > self.cfg.selection_grace_s:
                self.open_when_quorum(waited_s - self.cfg.selection_grace_s)
            return
        if self.cfg.mode != "sync" or time.time() < e.deadline:
            return
        if e.devices_counted >= self.cfg.min_updates:
            self.close_round()
            return
        e.extend_deadline()
        log.info("round %d: %d/%d updates at the deadline; re-announced", e.round, e.count, self.cfg.min_updates)
        if self.cfg.target_participants is not None:
            self.select_participants()
        self.publish_round()

    # ------------------------------------------------------------ loop

    def next_batch(self, max_items: int = 256) -> list[tuple[str, bytes]]:
        """Wait up to a tick for one event, then take whatever else is already queued (up to `max_items`)."""
        try:
            batch = [self.events.get(timeout=self.cfg.tick_s)]
        except queue.Empty:
            return []
        while len(batch) < max_items:
            try:
                batch.append(self.events.get_nowait())
            except queue.Empty:
                break
        return batch

    def done(self) -> bool:
        return self.cfg.max_rounds is not None and self.rounds_done >= self.cfg.max_rounds

    def serve_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """One turn of the loop. An unforeseen error is logged and the coordinator keeps serving: what was
        committed stays committed, and updates left unacked are re-sent by their devices and acked then."""
        try:
            if ("", b"connected") in batch:
                self.connected_at = time.monotonic()
                self.publish_all()
            self.on_messages([m for m in batch if m[0]])
            self.tick()
        except Exception:
            log.exception("error while serving %d messages; continuing", len(batch))
            self.metrics.dropped.labels("internal_error").inc()

    def run(self, stop: threading.Event) -> None:
        """Serve until `stop` is set or `max_rounds` rounds are aggregated."""
        if self.cfg.metrics_port:
            self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_addr)
        self.link.start(wait_s=0)
        try:
            while not stop.is_set() and not self.done():
                self.serve_batch(self.next_batch())
        finally:
            self.link.stop((self.topics.coordinator_status, OFFLINE))
            self.rounds.store.close()
            self._lock.close()


def _ack_fields(verdict, version: int) -> tuple:
    return verdict.update_id, verdict.status, verdict.reason, version

"""A site relay (protocol v1.4): the coordinator's side of protocol v1 toward the devices of one site, one combined
update per round and base toward the coordinator.

The relay is a client of the site's broker only. That broker is bridged to the core broker
(`edgelearn broker config --bridge-to`): releases, rounds and the relay's acks come down the bridge, the relay's
combined updates and status go up it, and the devices' own updates never leave the site. Toward its devices the
relay validates, spools (fsync), dedupes and acks exactly as the coordinator does (`relay_state.RelayState`); a
flush combines the accepted updates into parts, `aggregate.partial_mean` under the round's `relay` terms, which
the coordinator folds as the sum of their devices. Parts are re-sent until the coordinator acks them. As in the
coordinator, paho's thread only enqueues messages; everything else runs on the relay's own thread.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from coordinator.relay_state import Part, RelayState
from coordinator.validate import Rules
from edgelearn.bundle import BundleError, read_lean_release
from edgelearn.mqtt import MqttLink
from edgelearn.protocol import (
    NAME_RE,
    OFFLINE,
    Ack,
    ProtocolError,
    RoundMsg,
    Topics,
    check_name,
    decode_status,
    encode_status,
)
from edgelearn.signing import load_private, load_public, sign_message, verify, verify_message

log = logging.getLogger(__name__)
MAX_RESEND_S = 120.0
STATUS_EVERY_S = 5.0


@dataclass(frozen=True)
class RelayConfig:
    broker_url: str  # the site's broker (bridged to the core broker)
    fleet: str
    relay_id: str  # the site's name: its topics P/relays/{relay_id}/…, its account on the core broker
    state_dir: Path
    topic_root: str = "edgelearn"
    public_key: Path | None = None  # the fleet's: releases, rounds and the coordinator's acks must carry its signature
    signing_key: Path | None = None  # the relay's own: signs its acks to devices (`edgelearn device --relay-key`)
    max_update_norm: float = 1e3  # as the coordinator's --max-update-norm
    max_staleness: int = 4  # as the coordinator's --max-staleness: late updates of earlier rounds, up to this old
    flush_s: float = 5.0  # combine at most this long after the first unsent update (sooner once all reported)
    ack_timeout_s: float = 10.0  # re-send a part the coordinator has not acked after this (doubling, ≤ 120 s)
    tick_s: float = 0.2
    mqtt_v311: bool = False

    def __post_init__(self) -> None:
        check_name("relay id", self.relay_id)
        if not (self.flush_s >= 0 and self.ack_timeout_s > 0 and self.max_staleness >= 0):
            raise ValueError("flush_s and max_staleness must be >= 0, ack_timeout_s > 0")


@dataclass
class _Sending:
    part: Part
    next_s: float
    wait_s: float


class Relay:
    """One site's aggregator; `run(stop)` serves until `stop` is set."""

    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg
        self.topics = t = Topics(cfg.fleet, cfg.topic_root)
        self.public = load_public(cfg.public_key) if cfg.public_key else None
        private = load_private(cfg.signing_key) if cfg.signing_key else None
        self.sign: Callable[[bytes, str], bytes] = (
            (lambda payload, topic: sign_message(payload, topic, private)) if private else (lambda p, topic: p)
        )
        if self.public is not None and private is None:
            log.warning("a signed fleet without --signing-key: its devices will refuse this relay's unsigned acks "
                        "(and keep re-sending); give the relay a key and its devices --relay-key")  # fmt: skip
        self.state = RelayState(cfg.state_dir, cfg.relay_id)
        self.round: RoundMsg | None = None
        self.releases: dict[int, tuple[str, dict[str, tuple[int, ...]]]] = {}  # version -> (model id, shapes)
        self.statuses: dict[str, dict] = {}
        self.first_unsent_s = time.monotonic() if self.state.unsent() else None
        now = time.monotonic()
        self.sending = {p.update_id: _Sending(p, now, cfg.ack_timeout_s) for p in self.state.outstanding()}
        self.status_shown: bytes = b""
        self.status_key: tuple = ()
        self.status_at_s = 0.0
        self.events: queue.Queue[tuple[str, bytes]] = queue.Queue()
        subscriptions = [t.rounds_current, t.model_lean, t.relay(cfg.relay_id, "ack")]
        self.link = MqttLink(
            cfg.broker_url,
            f"{cfg.topic_root}:{cfg.fleet}:relay:{cfg.relay_id}",
            [*subscriptions, t.all_devices("update"), t.all_devices("status")],
            on_message=lambda topic, p: self.events.put((topic, p)),
            will=(t.relay(cfg.relay_id, "status"), OFFLINE),
            mqtt_v311=cfg.mqtt_v311,
            on_connected=lambda: self.events.put(("", b"connected")),
        )

    # ------------------------------------------------------------ from the coordinator (down the bridge)

    def on_round(self, payload: bytes) -> None:
        try:
            verify_message(payload, self.topics.rounds_current, self.public)
            rnd = RoundMsg.decode(payload)
        except (BundleError, ProtocolError) as e:
            log.warning("round ignored: %s", e)
            return
        if self.round is not None and rnd.round != self.round.round:
            self.first_unsent_s = 0.0 if self.state.unsent() else None  # now late: combine them at once
        self.round = rnd
        if rnd.relay is None:
            log.warning("round %d takes no relayed updates (the coordinator's aggregator does not decompose into "
                        "partial sums): devices keep theirs until it does", rnd.round)  # fmt: skip

    def on_release(self, payload: bytes) -> None:
        try:
            manifest, files = read_lean_release(payload, lambda m: verify(m, self.public))
            weights = st_load(files["weights.safetensors"])
            shapes = {n: tuple(weights[n].shape) for n in manifest.trainable}
        except (BundleError, SafetensorError, KeyError, ValueError) as e:
            log.warning("release ignored: %s", e)
            return
        self.releases = {v: r for v, r in self.releases.items() if v > manifest.version - 8}
        self.releases[manifest.version] = (manifest.model_id, shapes)

    def on_ack(self, payload: bytes) -> None:
        topic = self.topics.relay(self.cfg.relay_id, "ack")
        try:
            verify_message(payload, topic, self.public)
            ack = Ack.decode(payload)
        except (BundleError, ProtocolError) as e:
            log.warning("ack ignored: %s", e)
            return
        if ack.update_id is None or not self.state.acked(ack.update_id, ack.status):
            return
        self.sending.pop(ack.update_id, None)
        if ack.status == "rejected":
            log.error("the coordinator rejected combined update %s (%s): kept in %s/rejected", ack.update_id,
                      ack.reason, self.state.parts_dir)  # fmt: skip
        else:
            log.info("combined update %s %s by the coordinator", ack.update_id, ack.status)

    # ------------------------------------------------------------ from the devices

    def rules(self) -> Rules | None:
        """The coordinator's rules for the open round, or None while updates cannot be taken (no round yet, its
        release not seen yet, or a round that takes no relayed updates): devices then keep theirs and re-send."""
        r = self.round
        if r is None or r.relay is None or r.base_version not in self.releases:
            return None
        model_id, shapes = self.releases[r.base_version]
        return Rules(model_id, shapes, r.base_version, r.round, self.cfg.max_update_norm, self.cfg.max_staleness,
                     1, r.local.lora_rank)  # fmt: skip

    def on_updates(self, updates: list[tuple[str, bytes]]) -> None:
        rules = self.rules()
        if rules is None:
            log.info("%d device updates left unacked: no round with relay terms and its release yet", len(updates))
            return
        verdicts = self.state.accept(updates, rules)
        for (device_id, _), v in zip(updates, verdicts, strict=True):
            why = f": {v.reason}" if v.reason else ""
            (log.warning if v.status == "rejected" else log.info)("%s update %s from %s%s", v.status, v.update_id,
                                                                  device_id, why)  # fmt: skip
            ack, topic = Ack(v.update_id, v.status, v.reason, rules.base_version), self.topics.device(device_id, "ack")
            self.link.publish(topic, self.sign(ack.encode(), topic))
        if any(v.status == "accepted" for v in verdicts) and self.first_unsent_s is None:
            self.first_unsent_s = time.monotonic()

    def on_messages(self, messages: list[tuple[str, bytes]]) -> None:
        updates = []
        for topic, payload in messages:
            if topic == self.topics.rounds_current:
                self.on_round(payload)
            elif topic == self.topics.model_lean:
                self.on_release(payload)
            elif topic == self.topics.relay(self.cfg.relay_id, "ack"):
                self.on_ack(payload)
            elif (parsed := self.topics.parse_device_topic(topic)) and NAME_RE.match(parsed[0]):
                if parsed[1] == "update":
                    updates.append((parsed[0], payload))
                elif parsed[1] == "status":
                    self._on_status(parsed[0], payload)
        if updates:
            self.on_updates(updates)

    def _on_status(self, device_id: str, payload: bytes) -> None:
        try:
            self.statuses[device_id] = decode_status(payload)
        except ProtocolError:
            self.statuses.pop(device_id, None)

    # ------------------------------------------------------------ toward the coordinator (up the bridge)

    def all_reported(self) -> bool:
        """Every online device the open round invites has an accepted update for it at this relay."""
        r = self.round
        if r is None:
            return False
        online = {d for d, s in self.statuses.items() if s.get("state") != "offline" and r.includes(d)}
        return bool(online) and online <= self.state.reported(r.round, r.base_version)

    def flush_due(self, now_s: float) -> bool:
        if self.first_unsent_s is None or self.rules() is None:
            return False
        return now_s - self.first_unsent_s >= self.cfg.flush_s or self.all_reported()

    def tick(self) -> None:
        now = time.monotonic()
        if self.flush_due(now):
            r = self.round
            assert r is not None and r.relay is not None  # flush_due: a round with terms and its release
            model_id, shapes = self.releases[r.base_version]
            for part in self.state.flush(r.relay, model_id, shapes):
                self.sending[part.update_id] = _Sending(part, now, self.cfg.ack_timeout_s)
            self.first_unsent_s = None
        for s in self.sending.values():
            if now >= s.next_s:
                self.link.publish(self.topics.relay(self.cfg.relay_id, "update"), s.part.payload)
                s.next_s, s.wait_s = now + s.wait_s, min(2 * s.wait_s, MAX_RESEND_S)
        self.publish_status(now)

    def publish_status(self, now_s: float) -> None:
        """The relay's retained status (up the bridge: operators and the coordinator see each site): at once when
        its round or whether it takes updates changes, otherwise at most every STATUS_EVERY_S (not once per device
        update: the uplink and the coordinator's store would carry one message per device)."""
        r = self.round
        key = (r.round if r else None, self.rules() is not None)
        if key == self.status_key and now_s - self.status_at_s < STATUS_EVERY_S:
            return  # not due: nothing is read or built
        status = encode_status(
            "online", relay=self.cfg.relay_id, round=key[0], accepting=key[1],
            devices_online=sum(s.get("state") != "offline" for s in self.statuses.values()),
            unsent=len(self.state.unsent()), unacked_parts=len(self.sending),
        )  # fmt: skip
        if status != self.status_shown:
            self.link.publish(self.topics.relay(self.cfg.relay_id, "status"), status, retain=True)
            self.status_shown, self.status_key, self.status_at_s = status, key, now_s

    # ------------------------------------------------------------ loop

    def serve_batch(self, batch: list[tuple[str, bytes]]) -> None:
        """One turn; an unforeseen error is logged and the relay keeps serving (unacked work is re-sent)."""
        try:
            if ("", b"connected") in batch:
                self.status_shown, self.status_key = b"", ()
                for s in self.sending.values():
                    s.next_s = 0.0
            self.on_messages([m for m in batch if m[0]])
            self.tick()
        except Exception:
            log.exception("relay error while serving %d messages; continuing", len(batch))

    def run(self, stop: threading.Event) -> None:
        self.link.start(wait_s=0)
        try:
            while not stop.is_set():
                batch = []
                try:
                    batch.append(self.events.get(timeout=self.cfg.tick_s))
                    while len(batch) < 256:
                        batch.append(self.events.get_nowait())
                except queue.Empty:
                    pass
                self.serve_batch(batch)
        finally:
            self.link.stop((self.topics.relay(self.cfg.relay_id, "status"), OFFLINE))
            self.state.close()

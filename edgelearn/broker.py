"""Brokers for tests and demos: a real mosquitto process, or an embedded amqtt broker (demo only).

amqtt speaks MQTT 3.1.1 only; protocol v1 requires MQTT 5, so clients talk 3.1.1 to it
(`mqtt_v311=True`) and the demo says so. Tests and production use mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from edgelearn.protocol import Topics, check_name, parse_broker_url

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = 10.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


MIB = 1024 * 1024
MAX_PACKET_LIMIT_BYTES = 256 * MIB - 1  # paho rejects a CONNACK MaximumPacketSize >= 2^28


@dataclass(frozen=True)
class BrokerSizing:
    max_queued_messages: int
    max_packet_bytes: int
    backlog_bytes: int  # memory the broker may need to hold an offline coordinator's full backlog


def size_broker(devices: int, model_bytes: int, release_bytes: int | None = None) -> BrokerSizing:
    """Limits for a fleet of `devices` and a model of `model_bytes` float32 weights (one fp32 update ≈ that).

    max_packet_bytes = max(release, update) + 1 MiB of headroom, rounded up to a MiB (release defaults
    to 4 × model: weights + two programs); max_queued_messages = max(10 000, 8 · devices): an offline
    coordinator's queue must hold every device's update, its re-sends and its status changes (the
    default 1000 silently drops the rest); backlog_bytes = 4 · devices · model_bytes.
    """
    if devices < 1 or model_bytes < 1:
        raise ValueError("devices and model_bytes must be >= 1")
    release = release_bytes if release_bytes is not None else 4 * model_bytes
    packet = -(-(max(release, model_bytes) + MIB) // MIB) * MIB
    if packet > MAX_PACKET_LIMIT_BYTES:
        raise ValueError(
            f"a {packet / MIB:.0f} MiB packet is above MQTT clients' 256 MiB limit: shrink the model or release"
        )
    return BrokerSizing(max(10_000, 8 * devices), packet, 4 * devices * model_bytes)


DEFAULT_SIZING = size_broker(devices=1000, model_bytes=16 * MIB, release_bytes=100 * MIB)


def is_loopback(host: str) -> bool:
    return host == "localhost" or host == "::1" or host.startswith("127.")


COORDINATOR_USER = "coordinator"  # the broker account of a fleet's coordinator in the generated ACL


def downstream_topics(t: Topics) -> tuple[str, ...]:
    """What the coordinator publishes for the whole fleet: every device (and every site relay) reads these."""
    return t.model_latest, t.model_lean, t.model_canary, t.rollout_current, t.rounds_current, t.coordinator_status


def fleet_acl(fleet: str, root: str = "edgelearn", coordinator_user: str = COORDINATOR_USER,
              relays: tuple[str, ...] = ()) -> str:  # fmt: skip
    """A mosquitto ACL for one fleet, from the protocol's topic table (edgelearn/protocol.py: Topics): the
    coordinator's account reads and writes `P/#`; a device's account, named by its device id, writes only its
    own update and status and reads the releases (with a release on trial and its trial message, v1.3), the round,
    the coordinator's status and its own acks. A site relay's account (v1.4, on the core broker: its site broker's
    bridge), named by its relay id, writes only its combined updates and status and reads its acks."""
    t = Topics(fleet, root)
    own = t.device("ACCOUNT", "update").rsplit("/", 1)[0].replace("ACCOUNT", "%u")
    relay_blocks = []
    for r in relays:
        relay_blocks += [f"user {check_name('relay id', r)}", f"topic write {t.relay(r, 'update')}",
                         f"topic write {t.relay(r, 'status')}", f"topic read {t.relay(r, 'ack')}",
                         *[f"topic read {topic}" for topic in downstream_topics(t)], ""]  # fmt: skip
    return "\n".join([
        f"# edgelearn fleet {fleet} (generated): one account per device, named by its device id",
        f"user {coordinator_user}",
        f"topic readwrite {t.prefix}/#",
        "",
        *relay_blocks,
        f"pattern write {own}/update",
        f"pattern write {own}/status",
        f"pattern read {own}/ack",
        *[f"pattern read {topic}" for topic in downstream_topics(t)],
        "",
    ])  # fmt: skip


def bridge_config(core_url: str, fleet: str, relay_id: str, root: str = "edgelearn",
                  sizing: BrokerSizing = DEFAULT_SIZING) -> str:  # fmt: skip
    """The bridge section of a site broker's mosquitto.conf (protocol v1.4): one connection to the core broker at
    `core_url` as the relay's account (`mqtts://relay:password@host?cafile=…&cert=…&key=…`; MQTT 5, persistent
    on both sides so a site works offline and catches up). Down (in): the coordinator's releases, rounds, trials
    and status, and this relay's acks. Up (out): this relay's combined updates and status; the devices' own
    updates and statuses stay on the site broker. While the uplink is down, the site broker queues what goes up
    within its `max_queued_messages` / `max_queued_bytes`, and the relay re-sends until acked anyway."""
    b, t = parse_broker_url(core_url), Topics(fleet, root)
    if not is_loopback(b.host) and not b.tls:
        raise ValueError(f"bridge to {b.host} without TLS: use mqtts://… (credentials and updates cross the network)")
    auth = [f"remote_username {b.username}"] if b.username else []
    auth += [f"remote_password {b.password}"] if b.password else []
    tls = [f"bridge_{k} {v}" for k, v in (("cafile", b.cafile), ("certfile", b.certfile), ("keyfile", b.keyfile)) if v]
    if b.tls and not b.cafile:
        tls.append("bridge_capath /etc/ssl/certs")
    return "\n".join([
        f"# edgelearn site bridge (generated): relay {relay_id} of fleet {fleet} to the core broker",
        f"connection {root}-{fleet}-{check_name('relay id', relay_id)}",
        f"address {b.host}:{b.port}",
        "bridge_protocol_version mqttv50",
        f"remote_clientid {root}:{fleet}:bridge:{relay_id}",
        *auth, *tls,
        *(["bridge_insecure false"] if b.tls else []),
        "cleansession false",
        "local_cleansession false",
        "try_private true",
        "restart_timeout 2 30",
        "keepalive_interval 30",
        f"bridge_max_packet_size {sizing.max_packet_bytes}",
        "notifications true",
        "notifications_local_only true",
        f"notification_topic {t.prefix}/relays/{relay_id}/bridge",
        *[f"topic {topic} in 1" for topic in (*downstream_topics(t), t.relay(relay_id, "ack"))],
        f"topic {t.relay(relay_id, 'update')} out 1",
        f"topic {t.relay(relay_id, 'status')} out 1",
        "",
    ])  # fmt: skip


PASSWD_FILE, ACCOUNTS_FILE = "passwd", "accounts.txt"


def write_accounts(folder: Path, device_ids: list[str], coordinator_user: str = COORDINATOR_USER) -> Path:
    """One broker account per device id plus the coordinator's, each with a fresh random password
    (`secrets.token_urlsafe(18)`): FOLDER/accounts.txt (`user password` lines, mode 0600, for the operator
    and `flash`) and FOLDER/passwd, hashed by Debian's `mosquitto_passwd -U` (mode 0644: mosquitto reads it
    after dropping to its own user). Returns the passwd path. ValueError for a bad or repeated id."""
    users = [coordinator_user, *(check_name("device id", d) for d in device_ids)]
    if len(set(users)) != len(users):
        raise ValueError(f"device ids must be distinct and not {coordinator_user!r}")
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        raise FileNotFoundError("mosquitto_passwd not found: install mosquitto (Debian: apt-get install mosquitto)")
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"{u}:{secrets.token_urlsafe(18)}" for u in users]
    plain = folder / ACCOUNTS_FILE
    plain.touch(mode=0o600)
    plain.chmod(0o600)
    plain.write_text("".join(line.replace(":", " ", 1) + "\n" for line in lines))
    passwd = folder / PASSWD_FILE
    passwd.write_text("".join(line + "\n" for line in lines))
    subprocess.run([tool, "-U", str(passwd)], check=True, capture_output=True)  # hashes the file in place
    passwd.chmod(0o644)
    return passwd


@dataclass(frozen=True)
class MutualTls:
    """A TLS listener that requires a client certificate signed by `cafile` and takes its common name as the
    MQTT username (so the ACL's `%u` is the device id); made by `edgelearn pki`."""

    certfile: Path
    keyfile: Path
    cafile: Path

    def lines(self) -> list[str]:
        return [f"certfile {self.certfile}", f"keyfile {self.keyfile}", f"cafile {self.cafile}",
                "require_certificate true", "use_identity_as_username true"]  # fmt: skip


def mosquitto_config(
    port: int,
    data_dir: Path,
    sizing: BrokerSizing = DEFAULT_SIZING,
    bind: str = "127.0.0.1",
    password_file: Path | None = None,
    acl_file: Path | None = None,
    tls: MutualTls | None = None,
) -> str:
    """A mosquitto.conf for one fleet broker: persistence on, MQTT 5-capable listener, queues sized for the fleet.

    Anonymous clients are allowed on a loopback listener only: anywhere else anyone on the network could
    publish a release or fake acks, so a `password_file` (mosquitto_passwd) is required and an `acl_file` is
    recommended. `max_packet_bytes` must stay below 256 MiB: mosquitto then announces it in CONNACK, and paho
    rejects a MaximumPacketSize of 2^28 or more as a malformed packet.
    """
    if sizing.max_packet_bytes > MAX_PACKET_LIMIT_BYTES:
        raise ValueError(f"max_packet_bytes {sizing.max_packet_bytes} must be < 256 MiB (paho rejects larger)")
    if password_file is None and tls is None and not is_loopback(bind):
        raise ValueError(f"listening on {bind} needs --tls-cert/--tls-key/--cafile (mutual TLS) or --password-file "
                         "(and --acl-file): anonymous clients could publish releases and acks")  # fmt: skip
    auth = ["allow_anonymous true"] if password_file is None and tls is None else ["allow_anonymous false"]
    auth += [f"password_file {password_file}"] if password_file else []
    if password_file or tls:  # with accounts, a client's id is its username: nobody can take another's session
        auth += ["use_username_as_clientid true"]
    auth += [f"acl_file {acl_file}"] if acl_file else []
    return "\n".join(
        [
            f"# edgelearn fleet broker (generated): persistence on, MQTT 5 clients on port {port}",
            f"listener {port} {bind}",
            "protocol mqtt",
            *(tls.lines() if tls else []),
            *auth,
            "persistence true",
            f"persistence_location {data_dir}/",
            "autosave_interval 1",
            f"max_queued_messages {sizing.max_queued_messages}",
            f"max_queued_bytes {sizing.backlog_bytes}",  # per client: bounds an offline coordinator's backlog
            "max_inflight_messages 100",
            f"max_packet_size {sizing.max_packet_bytes}",
            "persistent_client_expiration 7d",
            f"log_dest file {data_dir}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "",
        ]
    )


class Mosquitto:
    """A mosquitto process on a loopback port with a generated config; `stop()`/`kill()`/`start()` for tests."""

    @staticmethod
    def find_exe() -> str:
        """The mosquitto executable; FileNotFoundError saying how to install it."""
        exe = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None
        )
        if exe is None:
            raise FileNotFoundError("mosquitto not found: install it (Debian: apt-get install mosquitto)")
        return exe

    def __init__(self, data_dir: Path, port: int | None = None, sizing: BrokerSizing = DEFAULT_SIZING,
                 extra: str = "") -> None:  # fmt: skip
        """`extra`: more configuration after the generated one (a site broker's `bridge_config`)."""
        self.exe = self.find_exe()
        self.data_dir = data_dir
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        data_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(data_dir, 0o777)  # mosquitto drops privileges to user `mosquitto` when started as root
        self.conf = data_dir / "mosquitto.conf"
        self.conf.write_text(mosquitto_config(self.port, data_dir, sizing) + extra)

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        if not wait_port(self.port):
            self.stop()
            raise RuntimeError(f"mosquitto did not listen on port {self.port}")
        return self

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file before exiting."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


class EmbeddedBroker:
    """amqtt in a background thread (MQTT 3.1.1 only): for the zero-setup demo."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="amqtt")
        self._broker = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedBroker:
        from amqtt.broker import Broker

        cfg = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "sys_interval": 0,
            "auth": {"allow-anonymous": True},
        }
        logging.getLogger("amqtt").setLevel(logging.ERROR)
        self._thread.start()

        async def _start() -> None:
            self._broker = broker = Broker(cfg, loop=self._loop)
            await broker.start()

        asyncio.run_coroutine_threadsafe(_start(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        if self._broker is not None:
            try:
                asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop).result(timeout=10)
            except Exception as e:  # shutdown noise must not fail the demo
                log.debug("amqtt shutdown: %s", e)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def check_broker(kind: str) -> None:
    """Raise at once if `start_broker(kind, …)` could not work: an unknown kind or a bad URL (ValueError),
    mosquitto not installed (FileNotFoundError)."""
    if kind == "mosquitto":
        Mosquitto.find_exe()
    elif kind != "embedded":
        if "://" not in kind:
            raise ValueError(f"unknown broker {kind!r}: use embedded, mosquitto or an mqtt://host:port URL")
        parse_broker_url(kind)


def start_broker(kind: str, work: Path) -> tuple[EmbeddedBroker | Mosquitto | None, str, bool]:
    """(broker we started or None, its URL, whether clients must speak MQTT 3.1.1) for `kind`: `embedded`
    (amqtt, 3.1.1 only), `mosquitto` (a local one in work/mosquitto, MQTT 5) or an mqtt:// URL (not ours)."""
    check_broker(kind)
    if kind == "embedded":
        brk: EmbeddedBroker | Mosquitto = EmbeddedBroker().start()
        return brk, brk.url, True
    if kind == "mosquitto":
        brk = Mosquitto(work / "mosquitto").start()
        return brk, brk.url, False
    return None, kind, False

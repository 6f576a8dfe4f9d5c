"""Scale-out through real brokers (protocol v1.4): a core mosquitto, three site mosquittos bridged to it (mosquitto's
own bridge, as `edgelearn broker config --bridge-to` writes it), the coordinator and three `edgelearn relay`
processes, thirty scripted devices (ten per site, re-sending until acked).

Each round's release must equal the flat FedAvg of the same thirty device updates (an in-process `Rounds`) within
1e-6: with every site up; with one relay SIGKILLed mid-round and restarted; with one site's uplink cut while its
devices report. The coordinator's bytes in per round are a few combined updates, not thirty.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from coordinator.dashboard import read_snapshot, render
from coordinator.ops import fleet_status_lines
from coordinator.rounds import Rounds
from edgelearn.broker import Mosquitto, bridge_config, free_port
from edgelearn.bundle import read_lean_release
from edgelearn.mqtt import MqttLink
from edgelearn.protocol import OFFLINE, Ack, RoundMsg, Topics, Update, encode_status, encode_update
from tests.netgate import TcpGate
from tests.test_coordinator_rounds import make_cfg, weights_only_rebuild

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)
SITES, PER_SITE = 3, 10


class ScriptedDevice:
    """A protocol-v1 device without a model: its update for round r is seeded by (device, r); it re-sends until
    acked, as a device's outbox does."""

    def __init__(self, url: str, fleet: str, dev: str, model_id: str, shapes: dict) -> None:
        self.t, self.dev, self.model_id, self.shapes = Topics(fleet), dev, model_id, shapes
        self.rounds: dict[int, RoundMsg] = {}
        self.acks: dict[str, str] = {}
        self.link = MqttLink(url, self.t.client_id(dev), [self.t.rounds_current, self.t.device(dev, "ack")],
                             self.on_message, will=(self.t.device(dev, "status"), OFFLINE))  # fmt: skip
        assert self.link.start(wait_s=10)
        self.link.publish(self.t.device(dev, "status"), encode_status("online"), retain=True)

    def on_message(self, topic: str, payload: bytes) -> None:
        if topic == self.t.rounds_current:
            r = RoundMsg.decode(payload)
            self.rounds[r.round] = r
        else:
            a = Ack.decode(payload)
            self.acks[str(a.update_id)] = a.status

    def update(self, rnd: int) -> bytes:
        r = self.rounds[rnd]
        rng = np.random.default_rng([int(self.dev[1:]), rnd])
        deltas = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in self.shapes.items()}
        n = int(rng.integers(5, 60))
        return encode_update(Update(f"{self.dev}-r{rnd}", self.dev, self.model_id, r.base_version, n, deltas, rnd))

    def send(self, rnd: int) -> None:
        self.link.publish(self.t.device(self.dev, "update"), self.update(rnd))

    def acked(self, rnd: int) -> bool:
        return self.acks.get(f"{self.dev}-r{rnd}") in ("accepted", "duplicate")


def wait_until(pred, timeout_s: float, what: str, procs=(), logs=()) -> None:
    end = time.monotonic() + timeout_s
    while not pred():
        dead = [p.args[3] for p in procs if p.poll() is not None]
        if dead or time.monotonic() > end:
            tails = "\n".join(f"--- {p}\n{p.read_text()[-2500:]}" for p in logs if p.exists())
            raise AssertionError(f"{what}: {'exited: ' + str(dead) if dead else 'timed out'}\n{tails}")
        time.sleep(0.1)


def deliver(devices: list[ScriptedDevice], rnd: int, timeout_s: float = 60.0, procs=(), logs=()) -> None:
    """Send each device's round-`rnd` update, re-sending every 3 s until the relay acked it."""
    end = time.monotonic() + timeout_s
    while waiting := [d for d in devices if not d.acked(rnd)]:
        assert time.monotonic() < end, f"round {rnd}: {[d.dev for d in waiting]} never acked"
        for d in waiting:
            d.send(rnd)
        resend_s = time.monotonic() + 3.0
        wait_until(lambda w=waiting, t=resend_s: all(d.acked(rnd) for d in w) or time.monotonic() > t, 10.0,
                   f"round {rnd} acks", procs, logs)  # fmt: skip


def cli(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=log.open("ab"), stderr=subprocess.STDOUT)


def relay_bytes(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    m = re.search(r'edgelearn_update_bytes_total\{via="relay"\} ([0-9.e+]+)', text)
    return float(m.group(1)) if m else 0.0


def test_three_bridged_sites_give_the_flat_release_through_a_relay_crash_and_an_uplink_cut(bundle_dir, fleet,
                                                                                           tmp_path):  # fmt: skip
    # Prepare: brokers, bridges (site 2's through a gate we can cut), coordinator, relays, devices
    t = Topics(fleet)
    core = Mosquitto(tmp_path / "core").start()
    gates = [TcpGate(core.port) for _ in range(SITES)]
    bridges = [bridge_config(f"mqtt://127.0.0.1:{gates[s].port}", fleet, f"site{s}") for s in range(SITES)]
    sites = [Mosquitto(tmp_path / f"site{s}", extra=bridges[s]).start() for s in range(SITES)]
    logs = [tmp_path / "coordinator.log", *(tmp_path / f"relay{s}.log" for s in range(SITES))]
    metrics_port = free_port()
    coord = cli("coordinator", "--broker", core.url, "--fleet", fleet, "--bundle", str(bundle_dir), "--state",
                str(tmp_path / "coord"), "--min-updates", str(SITES * PER_SITE), "--round-timeout", "120",
                "--metrics-port", str(metrics_port), log=logs[0])  # fmt: skip

    def relay(s: int) -> subprocess.Popen:
        return cli("relay", "--broker", sites[s].url, "--fleet", fleet, "--site", f"site{s}", "--state",
                   str(tmp_path / f"relay{s}"), "--flush-s", "60", "--ack-timeout", "3", log=logs[1 + s])  # fmt: skip

    relays = [relay(s) for s in range(SITES)]
    flat = Rounds(make_cfg(bundle_dir, tmp_path / "flat", min_updates=SITES * PER_SITE), weights_only_rebuild)
    releases: dict[int, dict] = {}

    def on_core(topic: str, payload: bytes) -> None:
        manifest, files = read_lean_release(payload)
        releases[manifest.version] = st_load(files["weights.safetensors"])

    watcher = MqttLink(core.url, "watcher", [t.model_lean], on_core, session_expiry_s=0)
    assert watcher.start(wait_s=10)
    devices = [[ScriptedDevice(sites[s].url, fleet, f"d{s * PER_SITE + k}", flat.manifest.model_id, flat.shapes)
                for k in range(PER_SITE)] for s in range(SITES)]  # fmt: skip
    everyone = [d for site in devices for d in site]
    procs = [coord, *relays]
    try:

        def round_reaches_all(rnd: int) -> None:
            wait_until(lambda: all(rnd in d.rounds for d in everyone), 90, f"round {rnd} at every site", procs, logs)

        def check_release(rnd: int) -> float:
            flat.handle_batch([(d.dev, d.update(rnd)) for d in everyone])
            assert flat.ready()
            flat.close()
            wait_until(lambda: flat.version in releases, 120, f"release v{flat.version}", procs, logs)
            got, want = releases[flat.version], load_weights_of(flat)
            return max(float(np.abs(got[n] - want[n]).max()) for n in want)

        # Round 1: every site up
        round_reaches_all(1)
        deliver(everyone, 1, procs=procs, logs=logs)
        diff1 = check_release(1)
        bytes1 = relay_bytes(metrics_port)
        # Round 2: relay 1 is SIGKILLed after half of its devices were acked, restarted after the rest sent
        round_reaches_all(2)
        deliver([d for s in (0, 2) for d in devices[s]] + devices[1][:5], 2, procs=procs, logs=logs)
        relays[1].send_signal(signal.SIGKILL)
        relays[1].wait(timeout=10)
        for d in devices[1][5:]:
            d.send(2)  # queued by the site broker for the relay's persistent session
        time.sleep(1.0)
        relays[1] = procs[2] = relay(1)
        deliver(devices[1], 2, procs=procs, logs=logs)
        diff2 = check_release(2)
        # Round 3: site 2's uplink is cut while its devices report; restored 5 s later
        round_reaches_all(3)
        gates[2].cut()
        deliver(everyone, 3, procs=procs, logs=logs)
        time.sleep(5.0)
        assert 4 not in releases  # the core cannot close without site 2's ten devices
        gates[2].restore()
        diff3 = check_release(3)
        wait_until(lambda: all(r.get("round") == 4 for r in read_snapshot(tmp_path / "coord")["relays"]), 30,
                   "the relays' statuses of round 4 at the coordinator", procs, logs)  # fmt: skip
        snap = read_snapshot(tmp_path / "coord")
        page, fleet_lines = render(snap), sum(x.startswith("relay/") for x in fleet_status_lines(tmp_path / "coord"))
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        for d in everyone:
            d.link.stop()
        watcher.stop()
        for b in [*sites, core]:
            b.stop()
        for g in gates:
            g.close()
    # Assert: identical to the flat FedAvg each round; each device counted once; bytes in ∝ sites, not devices
    assert max(diff1, diff2, diff3) <= 1e-6, (diff1, diff2, diff3)
    device_bytes = sum(len(d.update(1)) for d in everyone)
    assert bytes1 <= SITES * (len(everyone[0].update(1)) + 4096) < device_bytes / 5, (bytes1, device_bytes)
    rows = sqlite_rows(tmp_path / "coord" / "state.sqlite")
    assert rows == [(1, 30), (2, 30), (3, 30)], rows
    # the sites as operators saw them: each relay's last status, up its bridge, in the coordinator's state
    assert [r["relay"] for r in snap["relays"]] == ["site0", "site1", "site2"], snap["relays"]
    assert all(r["accepting"] and r["devices_online"] == PER_SITE for r in snap["relays"]), snap["relays"]
    assert all(f'id="relay-site{s}"' in page for s in range(SITES)) and fleet_lines == SITES


def load_weights_of(e: Rounds) -> dict:
    from edgelearn.bundle import load_weights

    return load_weights(e.release_dir(e.version))


def sqlite_rows(path: Path) -> list[tuple[int, int]]:
    import sqlite3

    db = sqlite3.connect(path)
    try:
        return db.execute("SELECT round, accepted FROM rounds WHERE closed IS NOT NULL ORDER BY round").fetchall()
    finally:
        db.close()


def test_broker_config_writes_a_bridge_mosquitto_accepts(tmp_path, capsys):
    from cli import main

    out = tmp_path / "site.conf"
    url = "mqtts://siteA:pw@core.example:8883?cafile=/etc/edgelearn/ca.pem&cert=/etc/s.pem&key=/etc/s.key"
    args = ["broker", "config", "--devices", "50", "--model-bytes", "100000", "--fleet", "f", "--site", "siteA"]
    assert main([*args, "--bridge-to", url, "--out", str(out)]) == 0
    text = out.read_text()
    assert "address core.example:8883" in text and "remote_username siteA" in text and "cleansession false" in text
    assert "bridge_cafile /etc/edgelearn/ca.pem" in text and "topic edgelearn/f/relays/siteA/update out 1" in text
    assert "topic edgelearn/f/rounds/current in 1" in text and "devices" not in text.split("# edgelearn site")[1]
    assert main([*args[:-2], "--bridge-to", url]) == 2
    assert main([*args, "--bridge-to", "mqtt://core.example:1883"]) == 2  # plain MQTT off loopback: refused
    errors = capsys.readouterr().err.splitlines()
    assert "needs --fleet and --site" in errors[0] and "without TLS" in errors[1] and len(errors) == 2
    if shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists():  # mosquitto parses it (the bridge then
        conf = tmp_path / "m.conf"  # retries its unreachable address in the background)
        tmp_path.chmod(0o777)  # mosquitto started as root writes its log as user mosquitto
        conf.write_text(
            text.replace("listener 1883", f"listener {free_port()}").replace("/var/lib/mosquitto", str(tmp_path))
        )
        proc = subprocess.Popen([Mosquitto.find_exe(), "-c", str(conf)], stderr=subprocess.PIPE)
        time.sleep(1.0)
        alive = proc.poll() is None
        proc.terminate()
        err = proc.communicate(timeout=10)[1].decode()
        assert alive, err


def test_a_signed_fleet_behind_a_relay_real_devices_trust_its_acks_only_with_its_key(bundle_dir, fleet, tmp_path):
    # Prepare: the coordinator signs releases, rounds and acks; the relay checks them with the fleet's public key
    # and signs its own acks; dev0 and dev1 were given the relay's key, dev2 was not
    from edgelearn.protocol import decode_update
    from edgelearn.signing import generate_keys, load_public, verify
    from models.shards import write_shards
    from tests.conftest import SERVER_FRACTION

    t = Topics(fleet)
    generate_keys(tmp_path / "release.key", tmp_path / "release.pub")
    generate_keys(tmp_path / "relay.key", tmp_path / "relay.pub")
    core = Mosquitto(tmp_path / "core").start()
    site = Mosquitto(tmp_path / "site", extra=bridge_config(core.url, fleet, "siteA")).start()
    log = tmp_path / "procs.log"
    shards = write_shards(tmp_path / "data", 3, SERVER_FRACTION)
    procs = [
        cli("coordinator", "--broker", core.url, "--fleet", fleet, "--bundle", str(bundle_dir), "--state",
            str(tmp_path / "coord"), "--min-updates", "3", "--steps", "5", "--signing-key",
            str(tmp_path / "release.key"), log=log),
        cli("relay", "--broker", site.url, "--fleet", fleet, "--site", "siteA", "--state", str(tmp_path / "relay"),
            "--public-key", str(tmp_path / "release.pub"), "--signing-key", str(tmp_path / "relay.key"), log=log),
    ]  # fmt: skip
    for k, shard in enumerate(shards):
        trust = ["--relay-key", str(tmp_path / "relay.pub")] if k < 2 else []
        procs.append(cli("device", "--broker", site.url, "--fleet", fleet, "--id", f"dev{k}", "--state",
                         str(tmp_path / f"dev{k}"), "--data", str(shard), "--public-key", str(tmp_path / "release.pub"),
                         *trust, log=tmp_path / f"dev{k}.log"))  # fmt: skip
    updates: dict[str, bytes] = {}
    releases: dict[int, dict] = {}

    def on_message(topic: str, payload: bytes) -> None:
        if topic == t.model_lean:
            manifest, files = read_lean_release(payload, lambda m: verify(m, load_public(tmp_path / "release.pub")))
            releases[manifest.version] = st_load(files["weights.safetensors"])
        else:
            updates.setdefault(decode_update(payload).device_id, payload)

    site_rec = MqttLink(site.url, "rec", [t.model_lean, t.all_devices("update")], on_message, session_expiry_s=0)
    assert site_rec.start(wait_s=10)
    try:
        # Execute: until release 2 reaches the site, and dev2 has seen (and refused) the relay's acks
        wait_until(lambda: 2 in releases, 240, "release v2 at the site", procs, [log])
        wait_until(lambda: "ack ignored" in (tmp_path / "dev2.log").read_text(), 60, "dev2 refusing", procs, [log])
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        site_rec.stop()
        site.stop()
        core.stop()
    # Assert: release 2 is the FedAvg of the three devices' updates (dev2's counted although it never took an ack);
    # the devices holding the relay's key took its acks
    us = [decode_update(updates[f"dev{k}"]) for k in range(3)]
    n = sum(u.num_samples for u in us)
    for name, theta in releases[1].items():
        expected = theta + sum(u.num_samples / n * u.deltas[name] for u in us)
        np.testing.assert_allclose(releases[2][name], expected, atol=1e-6)
    for k in (0, 1):
        text = (tmp_path / f"dev{k}.log").read_text()
        assert "ack ignored" not in text and re.search(rf"dev{k}: update \S+ accepted", text), text[-2000:]


def test_a_bridge_logs_in_as_its_relay_and_may_write_only_that_relays_topics(fleet):
    # Prepare: a core broker with generated accounts (dev1, relays siteA and siteB) and ACL; site A's broker is
    # bridged to it with siteA's password
    import queue
    import tempfile

    from cli import main

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    home = Path(tempfile.mkdtemp(prefix="edgelearn-relay-acl-"))
    home.chmod(0o755)  # mosquitto reads the password file after dropping to its own user
    core = Mosquitto(home / "core")
    (home / "ids.txt").write_text("dev1\n")
    args = ["broker", "config", "--devices", "2", "--model-bytes", "1000", "--port", str(core.port), "--data-dir",
            str(core.data_dir), "--accounts-out", str(core.data_dir), "--device-ids", str(home / "ids.txt"),
            "--acl-out", str(core.data_dir / "acl"), "--fleet", fleet, "--relay", "siteA", "--relay", "siteB",
            "--out", str(core.conf)]  # fmt: skip
    assert main(args) == 0
    (core.data_dir / "acl").chmod(0o644)
    words = (core.data_dir / "accounts.txt").read_text().split()
    accounts = dict(zip(words[::2], words[1::2], strict=True))
    core.start()
    t = Topics(fleet)
    site = Mosquitto(home / "site", extra=bridge_config(f"mqtt://siteA:{accounts['siteA']}@127.0.0.1:{core.port}",
                                                        fleet, "siteA")).start()  # fmt: skip
    got: queue.Queue = queue.Queue()
    coord = MqttLink(f"mqtt://coordinator:{accounts['coordinator']}@127.0.0.1:{core.port}", t.client_id(),
                     [t.all_relays("update")], lambda topic, p: got.put((topic, p)), session_expiry_s=0)  # fmt: skip
    clients = [coord]
    try:
        assert coord.start(wait_s=10)
        time.sleep(2.0)  # the bridge connects
        # Execute: the relay publishes at its site; then (its account's login takes over the bridge's session,
        # client ids being usernames) siteA's account tries siteB's topic, and dev1 tries a relay topic
        local = MqttLink(site.url, "relay-local", [], lambda *a: None, session_expiry_s=0)
        clients.append(local)
        assert local.start(wait_s=10)
        local.publish(t.relay("siteA", "update"), b"from site A")
        seen = [got.get(timeout=10)]
        posing = MqttLink(f"mqtt://siteA:{accounts['siteA']}@127.0.0.1:{core.port}", "posing", [], lambda *a: None,
                          session_expiry_s=0)  # fmt: skip
        dev1 = MqttLink(f"mqtt://dev1:{accounts['dev1']}@127.0.0.1:{core.port}", t.client_id("dev1"), [],
                        lambda *a: None, session_expiry_s=0)  # fmt: skip
        clients += [posing, dev1]
        assert posing.start(wait_s=10) and dev1.start(wait_s=10)
        posing.publish(t.relay("siteB", "update"), b"siteA posing as siteB")
        dev1.publish(t.relay("siteA", "update"), b"dev1 posing as a relay")
        time.sleep(2.0)
        while not got.empty():
            seen.append(got.get())
    finally:
        for c in clients:
            c.stop()
        site.stop()
        core.stop()
        shutil.rmtree(home, ignore_errors=True)
    # Assert: only the bridged update from site A reached the coordinator
    assert seen == [(t.relay("siteA", "update"), b"from site A")], seen

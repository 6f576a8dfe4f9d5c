"""The coordinator process through a real mosquitto: SIGKILL + restart mid-round, duplicates, bad input, metrics."""

import json
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import replace

import numpy as np
import pytest

from coordinator.aggregate import StreamingMean
from coordinator.optim import fedavg_step
from coordinator.views import fp32_data_view
from edgelearn.broker import free_port
from edgelearn.bundle import read_lean_release
from edgelearn.protocol import Ack, RoundMsg, Topics, Update, encode_status, encode_update

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)


def start_coordinator(url: str, fleet: str, bundle_dir, state, log, *extra: str) -> subprocess.Popen:
    args = ["--broker", url, "--fleet", fleet, "--bundle", str(bundle_dir), "--state", str(state)]
    return subprocess.Popen(
        [sys.executable, "-m", "cli", "coordinator", *args, "--min-updates", "3", *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for(rec, topic_pred, timeout_s: float = 90.0) -> tuple[str, bytes]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            topic, payload = rec.next(timeout_s=1)
        except Exception:
            continue
        if topic_pred(topic, payload):
            return topic, payload
    raise AssertionError("timed out waiting for a message")


def make_update(uid: str, dev: str, theta: dict, trainable: list[str], model_id: str, n: int, seed: int) -> Update:
    rng = np.random.default_rng(seed)
    deltas = {k: rng.normal(0, 0.01, theta[k].shape).astype(np.float32) for k in trainable}
    return Update(uid, dev, model_id, 1, n, deltas, 1)


def ack_of(t: Topics, uid: str):
    return lambda topic, p: topic.endswith("/ack") and Ack.decode(p).update_id == uid


def release_v1(rec) -> tuple:
    from safetensors.numpy import load

    _, payload = wait_for(rec, lambda topic, p: topic.endswith("model/latest"))
    manifest, files = read_lean_release(payload)
    return manifest, load(files["weights.safetensors"])


def test_sigkill_mid_round_loses_nothing_and_counts_nothing_twice(mosquitto, bundle_dir, fleet, recorder, tmp_path):
    # Prepare: a coordinator, release v1, three hand-made updates of round 1
    t = Topics(fleet)
    rec = recorder([t.model_latest, t.all_devices("ack")])
    log = (tmp_path / "coord.log").open("wb")
    proc = start_coordinator(mosquitto.url, fleet, bundle_dir, tmp_path / "state", log)
    manifest, theta = release_v1(rec)
    us = [
        make_update(f"u{k}", f"dev{k}", theta, manifest.trainable, manifest.model_id, 10 * k + 5, k) for k in range(3)
    ]
    try:
        for u in us[:2]:
            rec.publish(t.device(u.device_id, "update"), encode_update(u))
            _, p = wait_for(rec, ack_of(t, u.update_id))
            assert Ack.decode(p).status == "accepted"
        # Execute: kill -9 after two acks, re-send one of them while it is down, restart, send the third
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        rec.publish(t.device("dev1", "update"), encode_update(us[1]))
        proc = start_coordinator(mosquitto.url, fleet, bundle_dir, tmp_path / "state", log)
        _, p = wait_for(rec, ack_of(t, "u1"))
        assert Ack.decode(p).status == "duplicate"
        rec.publish(t.device("dev2", "update"), encode_update(us[2]))
        _, payload = wait_for(
            rec, lambda topic, p: topic == t.model_latest and read_lean_release(p)[0].version == 2, 180
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # Assert: v2 is bit-identical to an uninterrupted fold of u0, u1, u2; each counted once
    from safetensors.numpy import load

    shapes = {k: theta[k].shape for k in manifest.trainable}
    acc = StreamingMean(shapes)
    for u in us:  # the coordinator's own fold: one pass over each payload's float32 data
        acc.add_flat(fp32_data_view(encode_update(u), shapes), float(u.num_samples))
    expected = fedavg_step(theta, acc.result())
    got = load(read_lean_release(payload)[1]["weights.safetensors"])
    assert all(np.array_equal(got[k], expected[k]) for k in theta), (tmp_path / "coord.log").read_text()[-2000:]
    db = sqlite3.connect(tmp_path / "state" / "state.sqlite")
    assert db.execute("SELECT COUNT(*) FROM updates WHERE round=1").fetchone()[0] == 3
    assert db.execute("SELECT accepted, duplicates FROM rounds WHERE round=1").fetchone() == (3, 1)  # the re-send


def publish_raw(url: str, topic: str, payload: bytes) -> bool:
    """Publish with a bare paho client (no size guard); True when the broker dropped the connection."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from edgelearn.protocol import parse_broker_url

    b = parse_broker_url(url)
    dropped = threading.Event()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="huge-sender", protocol=mqtt.MQTTv5)
    c.on_disconnect = lambda *args: dropped.set()
    c.connect(b.host, b.port)
    c.loop_start()
    try:
        c.publish(topic, payload, qos=1)
        return dropped.wait(30)
    finally:
        c.loop_stop()


def test_bad_input_is_counted_and_the_coordinator_keeps_serving(mosquitto, bundle_dir, fleet, recorder, tmp_path):
    # Prepare
    t = Topics(fleet)
    rec = recorder([t.model_latest, t.all_devices("ack")])
    port = free_port()
    log = (tmp_path / "coord.log").open("wb")
    proc = start_coordinator(mosquitto.url, fleet, bundle_dir, tmp_path / "state", log, "--metrics-port", str(port))
    manifest, theta = release_v1(rec)
    good = make_update("ok", "devg", theta, manifest.trainable, manifest.model_id, 5, 1)
    truncated = encode_update(make_update("tr", "devt", theta, manifest.trainable, manifest.model_id, 5, 3))[:-100]
    other_model = make_update("om", "devm", theta, manifest.trainable, "another-model", 5, 2)
    rng = np.random.default_rng(0)
    try:
        # Execute: random bytes, truncated safetensors, an unknown model, a status, then a valid update
        rec.publish(t.device("devr", "update"), rng.bytes(5000))
        rec.publish(t.device("devt", "update"), truncated)
        rec.publish(t.device("devm", "update"), encode_update(other_model))
        rec.publish(t.device("devs", "status"), encode_status("idle", version=1, battery_percent=77), retain=True)
        rec.publish(t.device("devn", "status"), b"[" * 30_000)  # nested past Python's recursion limit
        bad_id = make_update("ab", "a.b", theta, manifest.trainable, manifest.model_id, 5, 1)
        rec.publish(f"{t.prefix}/devices/a.b/update", encode_update(bad_id))  # no valid ack topic for it
        rec.publish(t.device("devb", "update"), bytes(20 * 2**20))  # 20 MB: through the broker, refused unparsed
        huge_sender_dropped = publish_raw(mosquitto.url, t.device("devh", "update"), bytes(200 * 2**20))
        rec.publish(t.device("devg", "update"), encode_update(good))
        _, p = wait_for(rec, ack_of(t, "ok"))
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        status = subprocess.run(
            [sys.executable, "-m", "cli", "fleet", "status", "--state", str(tmp_path / "state")],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # Assert
    assert Ack.decode(p).status == "accepted" and proc.returncode == 0
    assert 'edgelearn_updates_total{reason="not_safetensors",status="rejected"} 2.0' in metrics
    assert 'edgelearn_updates_total{reason="model_id_mismatch",status="rejected"} 1.0' in metrics
    assert 'edgelearn_updates_total{reason="payload_too_large",status="rejected"} 1.0' in metrics
    assert huge_sender_dropped  # 200 MB is above the broker's packet limit: mosquitto drops that sender
    assert 'edgelearn_updates_total{reason="",status="accepted"} 1.0' in metrics
    assert "edgelearn_devices_online 1.0" in metrics
    assert 'edgelearn_messages_dropped_total{cause="bad_status"} 1.0' in metrics
    assert 'edgelearn_messages_dropped_total{cause="bad_device_id"} 1.0' in metrics
    line = next(x for x in status.stdout.splitlines() if x.startswith("devs"))
    assert "idle" in line and json.loads(line.split("  ", 1)[1].split("ago", 1)[1].strip())["battery_percent"] == 77


def test_round_invites_eligible_online_devices(mosquitto, bundle_dir, fleet, recorder, tmp_path):
    # Prepare: retained statuses of four devices; two pass the rules, one is offline
    t = Topics(fleet)
    rec = recorder([t.rounds_current])
    statuses = {
        "ok1": encode_status("idle", battery_percent=80, temp_c=30),
        "ok2": encode_status("idle", battery_percent=50, temp_c=40),
        "low": encode_status("idle", battery_percent=5, temp_c=30),
        "gone": encode_status("offline"),
    }
    for dev, s in statuses.items():
        rec.publish(t.device(dev, "status"), s, retain=True)
    log = (tmp_path / "coord.log").open("wb")
    rules = ["--eligible", "battery_percent>=20", "--eligible", "temp_c<45"]
    # Execute: ask for 1 participant (quorum 1) with over-selection 2 → ⌈1·2⌉ = 2 invited
    proc = start_coordinator(
        mosquitto.url,
        fleet,
        bundle_dir,
        tmp_path / "s",
        log,
        "--participants",
        "1",
        "--over-selection",
        "2",
        "--min-updates",
        "1",
        *rules,  # the round opens once ⌈1·2⌉ = 2 eligible devices are online
    )
    try:
        _, payload = wait_for(rec, lambda topic, p: topic == t.rounds_current)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # Assert
    assert list(RoundMsg.decode(payload).participants) == ["ok1", "ok2"]


def test_async_mode_publishes_no_round_and_accepts_older_bases(mosquitto, bundle_dir, fleet, recorder, tmp_path):
    # Prepare: an async coordinator (FedBuff K=3) and two round-less updates
    t = Topics(fleet)
    rec = recorder([t.model_latest, t.all_devices("ack")])
    log = (tmp_path / "coord.log").open("wb")
    proc = start_coordinator(mosquitto.url, fleet, bundle_dir, tmp_path / "s", log, "--mode", "async",
                             "--buffer-size", "3")  # fmt: skip
    manifest, theta = release_v1(rec)
    us = [make_update(f"a{k}", f"dev{k}", theta, manifest.trainable, manifest.model_id, 5, k) for k in range(2)]
    try:
        # Execute
        acks = []
        for u in us:
            rec.publish(t.device(u.device_id, "update"), encode_update(replace(u, round=None)))
            acks.append(Ack.decode(wait_for(rec, ack_of(t, u.update_id))[1]))
        late = recorder([t.rounds_current])  # a retained round would arrive at once
        time.sleep(1.0)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    # Assert
    assert [a.status for a in acks] == ["accepted", "accepted"]
    assert late.messages.empty()


def test_round_is_reannounced_at_the_deadline(mosquitto, bundle_dir, fleet, recorder, tmp_path):
    t = Topics(fleet)
    rec = recorder([t.rounds_current])
    log = (tmp_path / "coord.log").open("wb")
    proc = start_coordinator(mosquitto.url, fleet, bundle_dir, tmp_path / "s", log, "--round-timeout", "1")
    try:
        first = RoundMsg.decode(wait_for(rec, lambda topic, p: True)[1])
        second = RoundMsg.decode(wait_for(rec, lambda topic, p: True, 30)[1])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    assert (first.round, second.round) == (1, 1) and second.deadline_unix_s > first.deadline_unix_s


def staggered_fleet(url: str, fleet: str, bundle_dir, recorder, tmp_path, restart=None) -> tuple[list, int]:
    """A coordinator wanting 3 of ⌈3·1.3⌉ = 4 invitees; devices d0..d5 publish their status 4 s apart (20 s) and
    each invited device sends one update; `restart()` runs after the second device. Returns the round messages
    seen as (devices online then, participants) and the accepted count of round 1."""
    t = Topics(fleet)
    rec = recorder([t.model_latest, t.rounds_current, t.all_devices("ack")])
    log = (tmp_path / "coord.log").open("wb")
    proc = start_coordinator(url, fleet, bundle_dir, tmp_path / "s", log, "--participants", "3",
                             "--over-selection", "1.3")  # fmt: skip
    manifest, theta = release_v1(rec)
    online: list[str] = []
    rounds: list[tuple[int, tuple[str, ...]]] = []
    sent: set[str] = set()
    try:
        next_online, deadline = time.monotonic(), time.monotonic() + 150
        while time.monotonic() < deadline and not (rounds and RoundMsg.decode(rounds[-1][2]).round == 2):
            if len(online) < 6 and time.monotonic() >= next_online:
                online.append(f"d{len(online)}")
                rec.publish(t.device(online[-1], "status"), encode_status("idle"), retain=True)
                next_online += 4.0
                if restart is not None and len(online) == 2:
                    restart()
            try:
                topic, payload = rec.next(timeout_s=0.5)
            except Exception:
                continue
            if topic != t.rounds_current:
                continue
            r = RoundMsg.decode(payload)
            rounds.append((len(online), r.participants or (), payload))
            for dev in (r.participants or ()) if r.round == 1 else ():
                if dev not in sent:
                    sent.add(dev)
                    u = make_update(f"u-{dev}", dev, theta, manifest.trainable, manifest.model_id, 5, len(sent))
                    rec.publish(t.device(dev, "update"), encode_update(u))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    db = sqlite3.connect(tmp_path / "s" / "state.sqlite")
    accepted = db.execute("SELECT COUNT(*) FROM updates WHERE round=1").fetchone()[0]
    db.close()
    return [(n, parts) for n, parts, _ in rounds], accepted


def test_devices_connecting_one_by_one_over_20s_never_get_a_round_below_its_quorum(
    mosquitto, bundle_dir, fleet, recorder, tmp_path
):
    # Execute
    rounds, accepted = staggered_fleet(mosquitto.url, fleet, bundle_dir, recorder, tmp_path)
    # Assert: round 1 was first announced with ≥ 4 devices online (and ≥ 4 invited); it closed with ≥ 3 accepted
    assert rounds and rounds[0][0] >= 4 and len(rounds[0][1]) >= 4, (rounds, (tmp_path / "coord.log").read_text())
    assert accepted >= 3


def test_a_broker_restart_mid_fleet_never_gives_a_round_below_its_quorum(bundle_dir, fleet, tmp_path):
    from edgelearn.broker import Mosquitto
    from tests.conftest import Recorder

    broker = Mosquitto(tmp_path / "broker").start()
    made: list[Recorder] = []

    def recorder(topics):
        made.append(Recorder(broker.url, topics))
        return made[-1]

    def restart():
        broker.stop()
        broker.start()

    try:
        # Execute: the broker restarts after two devices are online
        rounds, accepted = staggered_fleet(broker.url, fleet, bundle_dir, recorder, tmp_path, restart)
    finally:
        for r in made:
            r.close()
        broker.stop()
    # Assert
    assert rounds and rounds[0][0] >= 4 and len(rounds[0][1]) >= 4, (rounds, (tmp_path / "coord.log").read_text())
    assert accepted >= 3

"""The generated access layer on a real mosquitto: accounts from mosquitto_passwd, the fleet ACL from the protocol's
topic table, client ids bound to usernames. A device with valid credentials cannot pose as another device or the
coordinator (trust issue, attacks 4 and the ACL rows)."""

from __future__ import annotations

import queue
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from cli import main
from edgelearn.broker import Mosquitto, MutualTls, fleet_acl, mosquitto_config
from edgelearn.bundle import read_lean_release
from edgelearn.mqtt import MqttLink
from edgelearn.pki import init_ca, issue
from edgelearn.protocol import Topics
from models.shards import write_shards
from tests.conftest import SERVER_FRACTION

ACCOUNTS: dict[str, str] = {}  # user -> password, as `edgelearn broker config --accounts-out` made them


@pytest.fixture
def guarded():
    """A mosquitto with the generated config, accounts and ACL for fleet `f`, in a folder the `mosquitto` user can
    reach (it drops to that user before reading the password file; pytest's tmp_path is 0700)."""
    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd is not installed (it comes with the mosquitto package)")
    home = Path(tempfile.mkdtemp(prefix="edgelearn-acl-"))
    home.chmod(0o755)
    broker = Mosquitto(home / "broker")
    ids, acl = home / "ids.txt", broker.data_dir / "acl"
    ids.write_text("dev1\ndev2\n")
    conf = home / "mosquitto.conf"
    args = ["broker", "config", "--devices", "2", "--model-bytes", "1000", "--port", str(broker.port), "--data-dir",
            str(broker.data_dir), "--accounts-out", str(broker.data_dir), "--device-ids", str(ids),
            "--acl-out", str(acl), "--fleet", "f", "--out", str(conf)]  # fmt: skip
    assert main(args) == 0
    accounts = (broker.data_dir / "accounts.txt").read_text().split()
    ACCOUNTS.update(zip(accounts[::2], accounts[1::2], strict=True))
    assert sorted(ACCOUNTS) == ["coordinator", "dev1", "dev2"]
    assert (broker.data_dir / "accounts.txt").stat().st_mode & 0o077 == 0  # the passwords: the operator's only
    acl.chmod(0o644)  # mosquitto reads it after dropping to its own user
    broker.conf.write_text(conf.read_text())
    yield broker.start()
    broker.stop()
    shutil.rmtree(home, ignore_errors=True)


def link(broker: Mosquitto, user: str, client_id: str, topics: list[str]) -> tuple[MqttLink, queue.Queue]:
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    url = f"mqtt://{user}:{ACCOUNTS[user]}@127.0.0.1:{broker.port}"
    made = MqttLink(url, client_id, topics, lambda t, p: got.put((t, p)), session_expiry_s=0)
    assert made.start(wait_s=10), f"{user} could not connect"
    return made, got


def received(q: queue.Queue, wait_s: float = 1.5) -> list[tuple[str, bytes]]:
    time.sleep(wait_s)
    out = []
    while not q.empty():
        out.append(q.get())
    return out


def test_a_device_cannot_take_the_coordinators_session_or_write_where_it_may_not(guarded):
    t = Topics("f")
    coord, to_coord = link(guarded, "coordinator", t.client_id(), [t.all_devices("update")])
    dev2, to_dev2 = link(
        guarded, "dev2", t.client_id("dev2"),
        [t.model_latest, t.model_canary, t.rollout_current, t.rounds_current, t.device("dev2", "ack")],
    )  # fmt: skip
    wrong = MqttLink(f"mqtt://dev1:{ACCOUNTS['dev2']}@127.0.0.1:{guarded.port}", "dev1", [], lambda t, p: None)
    assert not wrong.start(wait_s=3)  # the generated passwd file: another account's password does not open dev1
    wrong.stop()
    try:
        # Session takeover: dev1's credentials with the coordinator's client id
        evil, _ = link(guarded, "dev1", t.client_id(), [])
        time.sleep(1.0)
        assert coord.connected.is_set() and evil.connected.is_set()  # both online: the ids are the usernames
        # Writes: its own update passes; another device's update, a release, a round and an ack for dev2 do not
        evil.publish(t.device("dev1", "update"), b"own")
        evil.publish(t.device("dev2", "update"), b"forged")
        evil.publish(t.model_latest, b"forged release", retain=True)
        evil.publish(t.device("dev2", "ack"), b"forged ack")
        evil.publish(t.rounds_current, b"forged round 10^9", retain=True)
        evil.publish(t.rollout_current, b"forged trial", retain=True)
        evil.publish(t.model_canary, b"forged release on trial", retain=True)
        assert received(to_coord) == [(t.device("dev1", "update"), b"own")]
        assert received(to_dev2, 0.5) == []
        assert coord.connected.is_set()
        # Reads: a device gets what the coordinator publishes for it, the canary trial's topics included (v1.3)
        for topic in (t.rollout_current, t.model_canary):
            coord.publish(topic, b"from the coordinator")
        assert sorted(received(to_dev2)) == [(t.model_canary, b"from the coordinator"),
                                             (t.rollout_current, b"from the coordinator")]  # fmt: skip
    finally:
        for c in (coord, dev2):
            c.stop()


@pytest.fixture
def mtls():
    """A fleet PKI (CA; certificates for broker, coordinator, dev0, dev1, dev2, observer) and a mosquitto with the
    generated mTLS listener and ACL; yields (broker, url(name)): the mqtts URL a client with that certificate
    uses (None: no certificate)."""
    home = Path(tempfile.mkdtemp(prefix="edgelearn-mtls-"))
    home.chmod(0o755)
    pki = home / "pki"
    ca = init_ca(pki, "f")
    broker_cert, broker_key = issue(pki, "broker", hosts=("127.0.0.1", "localhost"))
    for name in ("coordinator", "dev0", "dev1", "dev2", "observer"):
        issue(pki, name)
    pki.chmod(0o755)
    broker_key.chmod(0o644)  # the test's broker runs as user mosquitto; deploy: chown mosquitto
    broker = Mosquitto(home / "broker")
    acl = broker.data_dir / "acl"
    acl.write_text(fleet_acl("f"))
    acl.chmod(0o644)
    tls = MutualTls(broker_cert, broker_key, ca)
    broker.conf.write_text(mosquitto_config(broker.port, broker.data_dir, acl_file=acl, tls=tls))
    broker.start()

    def url(name: str | None) -> str:
        mine = f"&cert={pki / name}.crt&key={pki / name}.key" if name else ""
        return f"mqtts://127.0.0.1:{broker.port}?cafile={ca}{mine}"

    yield broker, url
    broker.stop()
    shutil.rmtree(home, ignore_errors=True)


def test_mutual_tls_end_to_end_names_each_device_by_its_certificate(mtls):
    # Prepare
    _, url = mtls
    t = Topics("f")
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    coord = MqttLink(url("coordinator"), t.client_id(), [t.all_devices("update")], lambda a, b: got.put((a, b)))
    dev1 = MqttLink(url("dev1"), t.client_id("dev1"), [], lambda a, b: None)
    stranger = MqttLink(url(None), "stranger", [], lambda a, b: None)  # trusts the CA but shows no certificate
    try:
        assert coord.start(wait_s=10) and dev1.start(wait_s=10)
        assert not stranger.start(wait_s=3)
        # Execute: dev1 (named by its certificate) writes its own update and one for dev2
        dev1.publish(t.device("dev1", "update"), b"own")
        dev1.publish(t.device("dev2", "update"), b"forged")
        # Assert
        assert received(got) == [(t.device("dev1", "update"), b"own")]
    finally:
        for c in (coord, dev1, stranger):
            c.stop()


@pytest.mark.slow
def test_a_fleet_round_over_mutual_tls(mtls, bundle_dir, tmp_path):
    # Prepare: the coordinator and two device processes, each with its own certificate, and an observer
    _, url = mtls
    t = Topics("f")
    got: queue.Queue[tuple[str, bytes]] = queue.Queue()
    observer = MqttLink(url("observer"), "observer", [t.model_latest], lambda a, b: got.put((a, b)))
    assert observer.start(wait_s=10)
    shards = write_shards(tmp_path / "data", 2, SERVER_FRACTION)
    log = (tmp_path / "procs.log").open("wb")
    cli = [sys.executable, "-m", "cli"]
    coordinator = ["--fleet", "f", "--bundle", str(bundle_dir), "--state", str(tmp_path / "coord"),
                   "--min-updates", "2", "--steps", "5"]  # fmt: skip
    procs = [subprocess.Popen([*cli, "coordinator", "--broker", url("coordinator"), *coordinator],
                              stdout=log, stderr=subprocess.STDOUT)]  # fmt: skip
    for k, shard in enumerate(shards):
        device = ["--fleet", "f", "--id", f"dev{k}", "--state", str(tmp_path / f"dev{k}"), "--data", str(shard)]
        procs.append(subprocess.Popen([*cli, "device", "--broker", url(f"dev{k}"), *device],
                                      stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    # Execute: wait for release 2
    try:
        end, version = time.monotonic() + 180, 0
        while version < 2 and time.monotonic() < end:
            try:
                _, payload = got.get(timeout=1)
            except queue.Empty:
                assert all(p.poll() is None for p in procs), (tmp_path / "procs.log").read_text()[-3000:]
                continue
            version = max(version, read_lean_release(payload)[0].version)
    finally:
        observer.stop()
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        log.close()
    # Assert: the round closed with both devices over mTLS
    assert version == 2, (tmp_path / "procs.log").read_text()[-3000:]


@pytest.mark.slow
def test_one_device_with_valid_credentials_cannot_hijack_outweigh_or_fill_a_round_over_mtls(mtls, bundle_dir, tmp_path):
    # Prepare: the coordinator process (round = 2 devices, 5 steps × batch 8: a claim weighs at most 40 samples);
    # dev1 honest, dev2 the attacker, each with its own certificate
    import numpy as np
    from safetensors.numpy import load

    from edgelearn.bundle import load_weights, verify_bundle
    from edgelearn.protocol import Ack, Update, encode_update

    _, url = mtls
    t, m = Topics("f"), verify_bundle(bundle_dir)
    theta = load_weights(bundle_dir)
    rng = np.random.default_rng(0)

    def delta(scale: float) -> dict:
        return {n: (scale * rng.normal(0, 0.01, theta[n].shape)).astype(np.float32) for n in m.trainable}

    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    links = {name: MqttLink(url(name), t.client_id(name), [t.device(name, "ack"), t.rounds_current],
                            lambda a, b: inbox.put((a, b))) for name in ("dev1", "dev2")}  # fmt: skip
    observer = MqttLink(url("observer"), "observer", [t.model_latest], lambda a, b: inbox.put((a, b)))
    log = (tmp_path / "coord.log").open("wb")
    args = ["--fleet", "f", "--bundle", str(bundle_dir), "--state", str(tmp_path / "coord"), "--min-updates", "2",
            "--steps", "5", "--batch-size", "8", "--round-timeout", "120"]  # fmt: skip
    coord = subprocess.Popen([sys.executable, "-m", "cli", "coordinator", "--broker", url("coordinator"), *args],
                             stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    acks: dict[str, list[Ack]] = {"dev1": [], "dev2": []}
    release = None
    try:
        assert all(c.start(wait_s=10) for c in (*links.values(), observer))
        wait_until = time.monotonic() + 60
        while not any(topic == t.rounds_current for topic, _ in list(inbox.queue)) and time.monotonic() < wait_until:
            time.sleep(0.1)
        # Execute: dev2 sends dev1's next update id with 10^14 samples and a 1000× Δ, then a second update;
        # then dev1 sends its honest update under that id
        evil, honest = delta(1000.0), delta(1.0)
        links["dev2"].publish(
            t.device("dev2", "update"), encode_update(Update("dev1-r1-v1", "dev2", m.model_id, 1, 10**14, evil, 1))
        )
        links["dev2"].publish(
            t.device("dev2", "update"), encode_update(Update("dev2-r1-v1", "dev2", m.model_id, 1, 40, delta(1.0), 1))
        )
        time.sleep(1.0)
        links["dev1"].publish(
            t.device("dev1", "update"), encode_update(Update("dev1-r1-v1", "dev1", m.model_id, 1, 40, honest, 1))
        )
        end = time.monotonic() + 120
        while (release is None or len(acks["dev1"]) + len(acks["dev2"]) < 3) and time.monotonic() < end:
            try:
                topic, payload = inbox.get(timeout=1)
            except queue.Empty:
                assert coord.poll() is None, (tmp_path / "coord.log").read_text()[-3000:]
                continue
            if topic.endswith("/ack"):
                acks[topic.split("/")[-2]].append(Ack.decode(payload))
            elif topic == t.model_latest and read_lean_release(payload)[0].version == 2:
                release = load(read_lean_release(payload)[1]["weights.safetensors"])
    finally:
        for c in (*links.values(), observer):
            c.stop()
        coord.terminate()
        coord.wait(timeout=30)
        log.close()
    # Assert: the victim's update counted (not `duplicate`); the attacker's second update refused; the attacker's
    # 10^14-sample claim weighed as 40: θ₂ = θ₁ + (40·Δ_evil + 40·Δ_honest)/80
    assert release is not None, (tmp_path / "coord.log").read_text()[-3000:]
    assert [a.status for a in acks["dev1"]] == ["accepted"]
    assert acks["dev2"][0].status == "accepted"  # its own id namespace: "dev1-r1-v1" from dev2 is dev2's
    assert acks["dev2"][1].status == "rejected" and "second_update_for_base" in (acks["dev2"][1].reason or "")
    for n in m.trainable:
        np.testing.assert_allclose(release[n], theta[n] + (evil[n] + honest[n]) / 2, atol=1e-5)

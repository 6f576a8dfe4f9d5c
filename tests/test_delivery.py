"""Delivery: updates survive a broker SIGKILL + restart and a coordinator that was offline while they were
sent; the next release is FedAvg over exactly one update per device (none lost, none counted twice)."""

import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.budget import Budget, Reading
from edgelearn.broker import Mosquitto
from edgelearn.bundle import read_lean_release
from edgelearn.protocol import Topics, decode_status, decode_update
from tests.conftest import Recorder

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)

COOL = Reading(other_cpu_percent=0.0, rss_mb=100.0, available_mb=4000.0, temperature_c=40.0)
HOT = Reading(other_cpu_percent=0.0, rss_mb=100.0, available_mb=4000.0, temperature_c=90.0)


def coordinator(url: str, fleet: str, bundle_dir: Path, state: Path, log) -> subprocess.Popen:
    args = ["--broker", url, "--fleet", fleet, "--bundle", str(bundle_dir), "--state", str(state)]
    args += ["--min-updates", "2", "--round-timeout", "600", "--steps", "5", "--batch-size", "8"]
    return subprocess.Popen([sys.executable, "-m", "cli", "coordinator", *args], stdout=log, stderr=log)


def device(url: str, fleet: str, k: int, tmp_path: Path, hot: threading.Event, sent: dict) -> DeviceAgent:
    rng = np.random.default_rng(k)
    x, y = rng.uniform(0, 16, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    cfg = DeviceConfig(
        url,
        fleet,
        f"dev{k}",
        tmp_path / f"dev{k}",
        ack_timeout_s=1.0,
        budget=Budget(max_temperature_c=70.0, interval_s=0.05),
    )
    agent = DeviceAgent(cfg, x, y, source_reading=lambda: HOT if hot.is_set() else COOL)
    put = agent.outbox.put

    def spy(update_id: str, payload: bytes) -> None:  # records what the device sends; the outbox stays real
        sent[update_id] = decode_update(payload)
        put(update_id, payload)

    agent.outbox.put = spy
    return agent


def wait_for(cond, what: str, timeout_s: float = 180.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        time.sleep(0.05)


def latest_release(url: str, fleet: str, version: int) -> dict[str, np.ndarray]:
    """Weights of the retained release once it is `version`."""
    t = Topics(fleet)
    rec = Recorder(url, [t.model_latest])
    try:
        while True:
            _, payload = rec.next(timeout_s=180)
            manifest, files = read_lean_release(payload)
            if manifest.version == version:
                return load(files["weights.safetensors"])
    finally:
        rec.close()


def test_updates_survive_broker_kill_and_offline_coordinator(bundle_dir, fleet, tmp_path):
    # Prepare: own broker, a coordinator process, two agents held paused by a "hot" device
    broker = Mosquitto(tmp_path / "broker").start()
    log = (tmp_path / "coord.log").open("wb")
    hot, stop, sent = threading.Event(), threading.Event(), {}
    hot.set()
    coord = coordinator(broker.url, fleet, bundle_dir, tmp_path / "coord", log)
    agents = [device(broker.url, fleet, k, tmp_path, hot, sent) for k in range(2)]
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for th in threads:
        th.start()
    status = Recorder(broker.url, [Topics(fleet).device("dev0", "status")])
    try:
        wait_for(lambda: all(a.learner and a.learner.job for a in agents), "round 1 to reach both devices")
        seen = []
        wait_for(lambda: seen.append(decode_status(status.next(60)[1])) or seen[-1]["state"] == "paused", "paused")
        status.close()
        base = latest_release(broker.url, fleet, 1)
        # Execute: coordinator dies; devices cool down, train and send; broker is killed and restarted
        coord.kill()
        coord.wait()
        hot.clear()
        wait_for(
            lambda: all(a.outbox.pending and next(iter(a.outbox.pending.values())).attempts for a in agents), "sends"
        )
        broker.kill()
        time.sleep(1.0)
        broker.start()
        coord = coordinator(broker.url, fleet, bundle_dir, tmp_path / "coord", log)
        new = latest_release(broker.url, fleet, 2)
        wait_for(lambda: not any(a.outbox.pending for a in agents), "acks for every update")
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=30)
        coord.terminate()
        coord.wait(timeout=30)
        broker.stop()
        log.close()
    # Assert: the pause was reported with its reason and reading; one update per device, each counted
    # once: θ₂ = θ₁ + Σ (n_k/Σn)·Δ_k
    budget = seen[-1]["budget"]
    assert budget["decision"]["reasons"] == ["temperature"] and budget["reading"]["temperature_c"] == 90.0
    first = [u for u in sent.values() if u.base_version == 1]  # release 2 may open round 2 before the agents stop
    assert sorted(u.device_id for u in first) == ["dev0", "dev1"]
    n = sum(u.num_samples for u in first)
    for name in sent["dev0-r1-v1"].deltas:
        expected = base[name] + sum(u.num_samples / n * u.deltas[name] for u in first)
        np.testing.assert_allclose(new[name], expected, atol=1e-6)

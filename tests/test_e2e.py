"""End to end through a real mosquitto: export → coordinator → 3 device processes → 2 FedAvg rounds.

The fleet is signed: the coordinator signs every release, devices accept only releases signed by its key.
"""

import subprocess
import sys
import time

import numpy as np
import pytest

from edgelearn.bundle import read_lean_release
from edgelearn.protocol import Topics, decode_update
from edgelearn.signing import generate_keys, load_public, verify
from models.shards import write_shards
from tests.conftest import SERVER_FRACTION

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)

N_DEVICES = 3


def spawn(*args: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=log, stderr=subprocess.STDOUT)


def weights_of(payload: bytes, public_key) -> tuple[int, dict[str, np.ndarray]]:
    from safetensors.numpy import load

    manifest, files = read_lean_release(payload, lambda m: verify(m, public_key))  # raises unless signed
    return manifest.version, load(files["weights.safetensors"])


def spawn_fleet(broker_url: str, fleet: str, bundle_dir, tmp_path, shards, log) -> list[subprocess.Popen]:
    """A signing coordinator (one round = all devices) and one device process per shard."""
    coordinator = ["--bundle", str(bundle_dir), "--state", str(tmp_path / "coord"), "--min-updates", str(N_DEVICES),
                   "--round-timeout", "120", "--steps", "10", "--lr", "0.1",
                   "--signing-key", str(tmp_path / "release.key")]  # fmt: skip
    procs = [spawn("coordinator", "--broker", broker_url, "--fleet", fleet, *coordinator, log=log)]
    for k, shard in enumerate(shards):
        device = ["--id", f"dev{k}", "--state", str(tmp_path / f"dev{k}"), "--data", str(shard),
                  "--public-key", str(tmp_path / "release.pub")]  # fmt: skip
        procs.append(spawn("device", "--broker", broker_url, "--fleet", fleet, *device, log=log))
    return procs


def record_until_release(rec, t: Topics, version: int, procs, tmp_path) -> tuple[dict, dict]:
    """Releases by version and updates by update_id (QoS 1 may deliver twice) until `version` is out."""
    releases: dict[int, dict[str, np.ndarray]] = {}
    updates: dict[str, object] = {}
    deadline = time.monotonic() + 240
    while version not in releases:
        message = rec.next_while_running(procs, tmp_path / "procs.log", deadline)
        if message is None:
            continue
        topic, payload = message
        if topic == t.model_latest:
            v, w = weights_of(payload, load_public(tmp_path / "release.pub"))
            releases[v] = w
        else:
            u = decode_update(payload)
            updates[u.update_id] = u
    return releases, updates


def test_two_rounds_of_fedavg(mosquitto, bundle_dir, fleet, recorder, tmp_path):
    # Prepare: a recorder of releases and updates, device shards, a coordinator and 3 devices
    t = Topics(fleet)
    rec = recorder([t.model_latest, t.all_devices("update")])
    shards = write_shards(tmp_path / "data", N_DEVICES, SERVER_FRACTION)
    generate_keys(tmp_path / "release.key", tmp_path / "release.pub")
    with (tmp_path / "procs.log").open("wb") as log:
        procs = spawn_fleet(mosquitto.url, fleet, bundle_dir, tmp_path, shards, log)
        # Execute: record until release 3 is out
        try:
            releases, updates = record_until_release(rec, t, 3, procs, tmp_path)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    # Assert: each release is θ_v + Σ (n_k/Σn)·Δ_k over the updates of its round
    for rnd, v in ((1, 1), (2, 2)):
        us = [u for u in updates.values() if u.round == rnd]
        assert sorted(u.device_id for u in us) == [f"dev{k}" for k in range(N_DEVICES)]
        n = sum(u.num_samples for u in us)
        for name, theta in releases[v].items():
            expected = theta + sum(u.num_samples / n * u.deltas[name] for u in us)
            np.testing.assert_allclose(releases[v + 1][name], expected, atol=1e-6)
    assert any(np.abs(releases[3][k] - releases[1][k]).max() > 1e-4 for k in releases[1])
    assert all(p.returncode == 0 for p in procs)

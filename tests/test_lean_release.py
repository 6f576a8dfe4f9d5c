"""Lean release archives (protocol v1.2): only the manifest and the weights travel; a device takes the programs from
a release it has and rebuilds infer.ptd, or fetches the full archive when it cannot."""

from __future__ import annotations

import io
import tarfile
import threading
import time

import numpy as np
import pytest

from coordinator.release import release_builder
from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.release import IncompleteReleaseError, ReleaseStore
from edgelearn.bundle import (
    DELTA,
    INFER_PTD,
    BundleError,
    load_weights,
    pack_release,
    read_lean_release,
    read_release,
    verify_bundle,
)
from edgelearn.delta import apply_delta
from edgelearn.protocol import Topics

CREATED = "2026-12-01T00:00:00Z"


@pytest.fixture
def v2(bundle_dir, tmp_path):
    """Release 2 of the session bundle, built by the coordinator's release path from moved weights."""
    rng = np.random.default_rng(3)
    new = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in load_weights(bundle_dir).items()}
    release_builder()(bundle_dir, new, 2, tmp_path / "v2", created=CREATED)
    return tmp_path / "v2"


def members(payload: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
        return tar.getnames()


def test_a_lean_archive_carries_the_manifest_and_the_weights_only(v2):
    lean, full = pack_release(v2, lean=True), pack_release(v2)
    assert members(lean) == ["manifest.json", "weights.safetensors"]
    assert len(lean) < len(full) and set(members(full)) == {"manifest.json", *verify_bundle(v2).files}
    with pytest.raises(BundleError, match="lacks"):
        read_release(lean)  # a reader that cannot complete it refuses it
    manifest, files = read_lean_release(lean)
    assert manifest.version == 2 and set(files) == {"weights.safetensors"}


def test_a_device_with_an_earlier_release_completes_a_lean_one_byte_for_byte(bundle_dir, v2, tmp_path):
    store = ReleaseStore(tmp_path / "state")
    assert store.install(pack_release(bundle_dir)).version == 1
    store.activate(1)
    manifest = store.install(pack_release(v2, lean=True))
    assert manifest is not None and manifest.version == 2
    for name in manifest.files:  # programs copied, infer.ptd rebuilt from the weights: all as the coordinator's
        assert (store.path(2) / name).read_bytes() == (v2 / name).read_bytes()


def test_a_new_device_cannot_complete_a_lean_release_and_nothing_is_written(v2, tmp_path):
    store = ReleaseStore(tmp_path / "state")
    with pytest.raises(IncompleteReleaseError, match="no release here has"):
        store.install(pack_release(v2, lean=True))
    assert not store.path(2).exists()


def test_tampered_lean_weights_are_refused_before_anything_is_rebuilt(bundle_dir, v2, tmp_path):
    store = ReleaseStore(tmp_path / "state")
    store.install(pack_release(bundle_dir))
    store.activate(1)
    payload = bytearray(pack_release(v2, lean=True))
    weights = (v2 / "weights.safetensors").read_bytes()
    at = payload.find(weights[-64:]) + 10
    payload[at] ^= 0x01
    with pytest.raises(BundleError, match="weights.safetensors does not match its sha256"):
        store.install(bytes(payload))
    assert not store.path(2).exists()


def test_a_new_device_given_a_lean_release_fetches_the_full_archive_through_the_broker(mosquitto, fleet, recorder, v2,
                                                                                      tmp_path):  # fmt: skip
    # Prepare: the coordinator's two retained archives on a real mosquitto, and an agent with no release at all
    t = Topics(fleet)
    pub = recorder([t.device("dev1", "status")])
    pub.publish(t.model_latest, pack_release(v2), retain=True)
    pub.publish(t.model_lean, pack_release(v2, lean=True), retain=True)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    agent = DeviceAgent(DeviceConfig(mosquitto.url, fleet, "dev1", tmp_path / "state"), x, y)
    stop = threading.Event()
    th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    # Execute
    th.start()
    try:
        end = time.monotonic() + 60
        while agent.version != 2 and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        stop.set()
        th.join(timeout=30)
    # Assert: it asked for the full archive, activated it, and stopped listening there
    assert agent.version == 2 and t.model_latest not in agent.link.subscriptions
    assert (tmp_path / "state" / "releases" / "v2" / INFER_PTD).read_bytes() == (v2 / INFER_PTD).read_bytes()


def test_a_delta_release_rebuilds_its_weights_exactly_within_half_a_step_of_the_target(bundle_dir, tmp_path):
    # Prepare
    rng = np.random.default_rng(4)
    w1 = load_weights(bundle_dir)
    target = {k: (v + 0.05 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in w1.items()}
    rebuild = release_builder(delta=True)
    # Execute
    m = rebuild(bundle_dir, target, 2, tmp_path / "v2", created=CREATED)
    # Assert: the release holds what the delta rebuilds; each weight moved within half a row step of the target
    w2 = load_weights(tmp_path / "v2")
    rebuilt = apply_delta(w1, (tmp_path / "v2" / DELTA).read_bytes())
    for k in w1:
        assert rebuilt[k].tobytes() == w2[k].tobytes()
        step = np.abs(target[k] - w1[k]).max() / 127
        assert np.abs(w2[k] - target[k]).max() <= step / 2 + 1e-7
    lean = pack_release(tmp_path / "v2", lean=True)
    assert members(lean) == ["manifest.json", DELTA] and DELTA in m.files
    assert len(lean) < len(pack_release(bundle_dir, lean=True))  # digits is tiny: manifest and headers weigh


def test_a_device_rebuilds_a_delta_release_on_the_one_it_runs_and_else_fetches_the_full(bundle_dir, tmp_path):
    rebuild, w1 = release_builder(delta=True), load_weights(bundle_dir)
    rebuild(bundle_dir, {k: v * 1.01 for k, v in w1.items()}, 2, tmp_path / "v2", created=CREATED)
    rebuild(tmp_path / "v2", {k: v * 1.02 for k, v in w1.items()}, 3, tmp_path / "v3", created=CREATED)
    store = ReleaseStore(tmp_path / "state")
    store.install(pack_release(bundle_dir))
    store.activate(1)
    with pytest.raises(IncompleteReleaseError, match="is lean"):
        store.install(pack_release(tmp_path / "v3", lean=True))  # v3's delta extends v2, which it missed
    manifest = store.install(pack_release(tmp_path / "v2", lean=True))
    assert manifest is not None
    for name in manifest.files:
        assert (store.path(2) / name).read_bytes() == (tmp_path / "v2" / name).read_bytes()


def test_a_release_signed_for_another_fleet_is_refused(bundle_dir, tmp_path):
    # Prepare: one signing key shared by two fleets; the coordinator of fleet "b" names its releases
    from edgelearn.signing import generate_keys, load_private, load_public, sign_bundle

    generate_keys(tmp_path / "k", tmp_path / "k.pub")
    release_builder(fleet="b")(bundle_dir, load_weights(bundle_dir), 2, tmp_path / "v2", created=CREATED)
    signed = sign_bundle(tmp_path / "v2", load_private(tmp_path / "k"))
    public = load_public(tmp_path / "k.pub")
    # Execute / Assert: a device of fleet "a" refuses it; one of fleet "b" takes it; unnamed manifests keep bytes
    with pytest.raises(BundleError, match="release is for fleet 'b', this device is in 'a'"):
        ReleaseStore(tmp_path / "a", public, fleet="a").install(pack_release(tmp_path / "v2"))
    assert ReleaseStore(tmp_path / "b", public, fleet="b").install(pack_release(tmp_path / "v2")) == signed
    assert signed.fleet == "b" and b'"fleet"' not in (bundle_dir / "manifest.json").read_bytes()


def test_a_device_with_a_rollback_floor_refuses_older_releases_even_without_state(bundle_dir, v2, tmp_path):
    floor = ReleaseStore(tmp_path / "fresh", min_release=2)  # e.g. flashed knowing v2 is the oldest it may run
    with pytest.raises(BundleError, match="older than this device's floor v2"):
        floor.install(pack_release(bundle_dir))
    assert not floor.path(1).exists() and floor.install(pack_release(v2)) is not None

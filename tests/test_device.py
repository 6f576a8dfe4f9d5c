"""Device side: releases are verified before use; a tampered, broken or older release never replaces the running one."""

from dataclasses import replace

import numpy as np

from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.outbox import Outbox
from edgelearn.bundle import Manifest, pack_release, verify_bundle, write_bundle
from edgelearn.protocol import Update, encode_update


def agent(tmp_path) -> DeviceAgent:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    return DeviceAgent(DeviceConfig("mqtt://127.0.0.1:1", "f", "dev1", tmp_path / "state"), x, y)


def release_with_version(bundle_dir, tmp_path, version: int) -> bytes:
    m = verify_bundle(bundle_dir)
    files = {name: (bundle_dir / name).read_bytes() for name in m.files}
    out = tmp_path / f"v{version}-src"
    write_bundle(out, replace(m, version=version, files={}), files)
    return pack_release(out)


def test_release_activates_and_survives_restart(bundle_dir, tmp_path):
    a = agent(tmp_path)
    a.on_release(release_with_version(bundle_dir, tmp_path, 1))
    assert a.version == 1 and a.active.train_pte is not None and a.learner is not None
    assert agent(tmp_path).version == 1  # a restarted agent resumes the active release


def test_tampered_release_is_refused_and_running_model_stays(bundle_dir, tmp_path, caplog):
    a = agent(tmp_path)
    a.on_release(release_with_version(bundle_dir, tmp_path, 1))
    payload = bytearray(release_with_version(bundle_dir, tmp_path, 2))
    program = (bundle_dir / "infer.pte").read_bytes()
    at = payload.find(program[64:96]) + 8  # a byte inside infer.pte
    assert at > 8
    payload[at] ^= 0xFF
    a.on_release(bytes(payload))
    assert a.version == 1
    assert "does not match its sha256" in caplog.text
    assert not (tmp_path / "state" / "releases" / "v2").exists()


def test_older_release_is_ignored(bundle_dir, tmp_path):
    a = agent(tmp_path)
    a.on_release(release_with_version(bundle_dir, tmp_path, 3))
    a.on_release(release_with_version(bundle_dir, tmp_path, 2))
    assert a.version == 3 and not (tmp_path / "state" / "releases" / "v2").exists()


def test_release_with_broken_program_is_rolled_back(bundle_dir, tmp_path, caplog):
    a = agent(tmp_path)
    a.on_release(release_with_version(bundle_dir, tmp_path, 1))
    m = verify_bundle(bundle_dir)
    files = {name: (bundle_dir / name).read_bytes() for name in m.files}
    files["infer.pte"] = b"not a program"  # hashes are right, the program is not
    write_bundle(tmp_path / "bad", Manifest(**{**m.__dict__, "version": 2, "files": {}}), files)
    a.on_release(pack_release(tmp_path / "bad"))
    assert a.version == 1 and "fails to load" in caplog.text


def test_outbox_keeps_updates_across_restarts_until_acked(tmp_path):
    u = Update("dev1-r1-v1", "dev1", "m", 1, 5, {"w": np.ones(2, np.float32)}, round=1)
    box = Outbox(tmp_path / "outbox")
    box.put(u.update_id, encode_update(u))
    again = Outbox(tmp_path / "outbox")
    assert list(again.pending) == ["dev1-r1-v1"]
    assert again.remove("dev1-r1-v1") and not list((tmp_path / "outbox").iterdir())


def test_seed_installs_a_local_bundle(bundle_dir, tmp_path):
    a = agent(tmp_path)
    a.seed(bundle_dir)
    assert a.version == 1 and (tmp_path / "state" / "releases" / "v1" / "infer.pte").exists()


def test_damaged_active_release_rolls_back_to_the_previous_one_on_restart(bundle_dir, tmp_path, caplog):
    # Prepare: v1 then v2 activated; then v2's program is damaged on disk
    a = agent(tmp_path)
    a.on_release(release_with_version(bundle_dir, tmp_path, 1))
    a.on_release(release_with_version(bundle_dir, tmp_path, 2))
    assert a.version == 2
    pte = tmp_path / "state" / "releases" / "v2" / "infer.pte"
    pte.write_bytes(b"\0" * len(pte.read_bytes()))
    # Execute: restart
    again = agent(tmp_path)
    # Assert: the previous release serves, and is now the active one on disk
    assert again.version == 1 and "rolled back from v2 to v1" in caplog.text
    assert agent(tmp_path).version == 1


def test_release_of_another_model_is_refused(bundle_dir, tmp_path, caplog):
    a = agent(tmp_path)
    a.on_release(release_with_version(bundle_dir, tmp_path, 1))
    m = verify_bundle(bundle_dir)
    files = {name: (bundle_dir / name).read_bytes() for name in m.files}
    write_bundle(tmp_path / "other", replace(m, model_id="other-model", version=2, files={}), files)
    a.on_release(pack_release(tmp_path / "other"))
    assert a.version == 1 and "release is for model 'other-model', this device runs 'digits-mlp'" in caplog.text


def test_signed_fleet_refuses_unsigned_and_accepts_signed(bundle_dir, tmp_path, caplog):
    from edgelearn.signing import generate_keys, load_private, sign_bundle

    generate_keys(tmp_path / "k", tmp_path / "k.pub")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    cfg = DeviceConfig("mqtt://127.0.0.1:1", "f", "dev1", tmp_path / "state", public_key_path=tmp_path / "k.pub")
    a = DeviceAgent(cfg, x, y)
    a.on_release(release_with_version(bundle_dir, tmp_path, 1))
    assert a.version == 0 and "release is not signed" in caplog.text
    payload = release_with_version(bundle_dir, tmp_path, 2)  # writes the bundle v2-src, unsigned
    sign_bundle(tmp_path / "v2-src", load_private(tmp_path / "k"))
    a.on_release(pack_release(tmp_path / "v2-src"))
    assert a.version == 2 and payload != pack_release(tmp_path / "v2-src")

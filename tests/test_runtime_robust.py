"""A malformed release, round or ack never crashes a device; update ids fit in 64 characters for every
valid device id; the outbox never drops an unacked update; the first re-send waits the ack timeout."""

import io
import json
import math
import random
import tarfile
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.validate import Rules, check_update
from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.budget import Budget
from edge_runtime.outbox import Outbox, backoff_s
from edge_runtime.progress import update_id_for
from edgelearn.bundle import BundleError, read_release, verify_bundle
from edgelearn.protocol import Ack, LocalConfig, ProtocolError, RoundMsg, Topics, Update, encode_update
from tests.test_device import release_with_version

ROUND_OK = {"round": 1, "base_version": 1, "deadline": 1.8e9, "min_updates": 1, "participants": None}
NO_RSS_LIMIT = Budget(max_rss_mb=None)  # the test process holds torch and many programs: not what is tested


def tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def release_with_manifest(bundle_dir, edit) -> bytes:
    """A release of the real bundle (members hash-correct) whose manifest JSON is `edit(manifest dict)`."""
    m = verify_bundle(bundle_dir)
    d = json.loads((bundle_dir / "manifest.json").read_bytes())
    manifest = edit(d)
    body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
    return tar([("manifest.json", body), *[(n, (bundle_dir / n).read_bytes()) for n in m.files]])


def deep(depth: int) -> dict:
    d: dict = {}
    for _ in range(depth):
        d = {"x": d}
    return d


def _drop_sha(d: dict) -> dict:
    del d["files"]["weights.safetensors"]["sha256"]
    return d


BAD_MANIFESTS = {
    "missing sha256": (_drop_sha, "needs a sha256 string"),
    "non-dict file entry": (lambda d: {**d, "files": {**d["files"], "infer.pte": 5}}, "needs a sha256 string"),
    "files a number": (lambda d: {**d, "files": 7}, "wrong type"),
    "files null": (lambda d: {**d, "files": None}, "wrong type"),
    "version a boolean": (lambda d: {**d, "version": True}, "version True is not an integer"),
    "trainable a string": (lambda d: {**d, "trainable": "fc2.weight"}, "trainable is not a list"),
    "input.shape negative": (lambda d: {**d, "input": {"shape": [-1, 64]}}, "input.shape"),
    "signature a string": (lambda d: {**d, "signature": "sig"}, "signature is not an object"),
    "metrics nested 900 deep": (lambda d: {**d, "metrics": deep(900)}, "nested deeper than 16"),
    "manifest nested 100000 deep": (lambda d: b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    "manifest a list": (lambda d: [d], "not a valid manifest"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_malformed_manifest_is_a_bundle_error_with_its_reason(bundle_dir, case):
    # Prepare
    edit, reason = BAD_MANIFESTS[case]
    payload = release_with_manifest(bundle_dir, edit)
    # Execute / Assert
    with pytest.raises(BundleError, match=reason) as e:
        read_release(payload)
    assert "\n" not in str(e.value)


def test_a_member_of_the_wrong_size_is_refused_even_with_the_right_hash_field(bundle_dir):
    d = json.loads((bundle_dir / "manifest.json").read_bytes())
    d["files"]["infer.pte"]["bytes"] += 1
    payload = tar(
        [("manifest.json", json.dumps(d).encode()), *[(n, (bundle_dir / n).read_bytes()) for n in d["files"]]]
    )
    with pytest.raises(BundleError, match="infer.pte does not match"):
        read_release(payload)


BAD_ROUNDS = {
    "local not an object": {**ROUND_OK, "local": 5},
    "participants a string": {**ROUND_OK, "participants": "dev1"},
    "participants not strings": {**ROUND_OK, "participants": [1, 2]},
    "deadline NaN": {**ROUND_OK, "deadline": float("nan")},
    "deadline a string": {**ROUND_OK, "deadline": "soon"},
    "round a boolean": {**ROUND_OK, "round": True},
    "round a float": {**ROUND_OK, "round": 1.5},
    "round missing": {k: v for k, v in ROUND_OK.items() if k != "round"},
    "steps zero": {**ROUND_OK, "local": {"steps": 0}},
    "lr infinite": {**ROUND_OK, "local": {"lr": float("inf")}},
    "deadline a 400-digit integer": {**ROUND_OK, "deadline": 10**400},
    "lr a 400-digit integer": {**ROUND_OK, "local": {"lr": 10**400}},
}


@pytest.mark.parametrize("case", sorted(BAD_ROUNDS))
def test_malformed_round_is_bad_round(case):
    with pytest.raises(ProtocolError) as e:
        RoundMsg.decode(json.dumps(BAD_ROUNDS[case]).encode())
    assert e.value.reason == "bad_round"


def test_round_without_local_gets_the_protocol_defaults():
    rnd = RoundMsg.decode(json.dumps({**ROUND_OK, "local": None, "participants": ["a"]}).encode())
    assert rnd.local == LocalConfig(20, 32, 0.05) and rnd.participants == ("a",)


@pytest.mark.parametrize(
    "ack",
    [
        {"update_id": "u", "status": "accepted", "version": "7"},
        {"update_id": "u", "status": "accepted", "version": 1.5},
        {"update_id": "u", "status": "rejected", "reason": {"rule": "x"}},
        {"update_id": "u", "status": ["accepted"]},
    ],
)
def test_malformed_ack_is_bad_ack(ack):
    with pytest.raises(ProtocolError) as e:
        Ack.decode(json.dumps(ack).encode())
    assert e.value.reason == "bad_ack"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
ROUND_KEYS = st.sampled_from([*ROUND_OK, "local", "steps", "batch_size", "lr"])


@settings(max_examples=600, deadline=None)
@given(st.dictionaries(ROUND_KEYS, JSON, max_size=8), st.dictionaries(ROUND_KEYS, JSON, max_size=4))
def test_any_json_round_or_ack_decodes_or_is_a_protocol_error(fields, local):
    # Prepare: a valid round with fields replaced by arbitrary JSON (also inside `local`), and an ack alike
    rnd = {**ROUND_OK, "local": local, **fields}
    ack = {"update_id": "u", "status": "accepted", **{k: v for k, v in fields.items() if k != "local"}}
    for decode, payload in ((RoundMsg.decode, rnd), (Ack.decode, ack)):
        # Execute / Assert: either a well-typed message or ProtocolError, nothing else
        try:
            msg = decode(json.dumps(payload).encode())
        except ProtocolError:
            continue
        if isinstance(msg, RoundMsg):
            assert msg.round >= 1 and math.isfinite(msg.deadline_unix_s) and msg.local.steps >= 1
        else:
            assert isinstance(msg.version, int) and (msg.reason is None or isinstance(msg.reason, str))


def test_agent_keeps_serving_after_malformed_messages_and_an_unforeseen_failure(mosquitto, bundle_dir, fleet, tmp_path):
    # Prepare: an agent running v1 on a real broker; queued: broken releases, round, ack, an ack whose
    # handling fails in a way nobody foresaw, then a valid release v2
    cfg = DeviceConfig(mosquitto.url, fleet, "dev1", tmp_path / "state", budget=NO_RSS_LIMIT)
    agent = DeviceAgent(cfg)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    t = Topics(fleet)
    ack_topic = t.device("dev1", "ack")
    real_on_ack = agent.on_ack
    failures = []

    def on_ack_failing_once(payload: bytes) -> None:  # fault injection: the first ack handling raises
        if not failures:
            failures.append(payload)
            raise RuntimeError("injected failure")
        real_on_ack(payload)

    agent.on_ack = on_ack_failing_once
    for payload in (
        release_with_manifest(bundle_dir, lambda d: {**_drop_sha(d), "version": 5}),
        release_with_manifest(bundle_dir, lambda d: b"[" * 100_000 + b"]" * 100_000),
    ):
        agent.events.put((t.model_lean, payload))
    agent.events.put((t.rounds_current, json.dumps({**ROUND_OK, "local": "x"}).encode()))
    agent.events.put((ack_topic, b'{"update_id": "u", "status": "accepted", "version": "x"}'))
    agent.events.put((ack_topic, b'{"update_id": "u", "status": "accepted", "version": 1}'))
    agent.events.put((t.model_lean, release_with_version(bundle_dir, tmp_path, 2)))
    stop = threading.Event()
    th = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    # Execute
    th.start()
    end = time.monotonic() + 60
    while agent.version != 2 and th.is_alive() and time.monotonic() < end:
        time.sleep(0.05)
    stop.set()
    th.join(timeout=30)
    # Assert: every bad message was refused, the injected failure was survived, v2 activated
    assert failures and agent.version == 2 and not (tmp_path / "state" / "releases" / "v5").exists()


# ---------------------------------------------------------------- update ids


@pytest.mark.parametrize("device_id", ["dev1", "d" * 50, "x" * 64, "A-_" * 21])
@pytest.mark.parametrize("tag", ["r1-v1", "a123-v7", "r999999999999999-v999999999999999"])
def test_update_id_fits_and_is_deterministic(device_id, tag):
    uid = update_id_for(device_id, tag)
    assert len(uid) <= 64 and uid == update_id_for(device_id, tag) and uid.endswith(tag)
    if len(device_id) + 1 + len(tag) <= 64:
        assert uid == f"{device_id}-{tag}"  # the readable form whenever it fits
    assert uid != update_id_for(device_id[:-1] + "Z", tag)  # another device, another id


def test_a_64_character_device_id_gets_its_update_accepted_by_the_coordinator_rules(bundle_dir, tmp_path):
    # Prepare: an agent with the longest valid device id, a round of 2 steps
    dev = "d" * 64
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 16, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    agent = DeviceAgent(DeviceConfig("mqtt://127.0.0.1:1", "f", dev, tmp_path / "s", budget=NO_RSS_LIMIT), x, y)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    m = agent.active.manifest
    rules = Rules(m.model_id, {n: agent.active.weights[n].shape for n in m.trainable}, base_version=1, round=1)
    # Execute: train the round, check the queued update as the coordinator does
    agent.on_round(RoundMsg(1, 1, time.time() + 60, 1, None, LocalConfig(2, 8, 0.05)).encode())
    end = time.monotonic() + 60
    while agent.last_round < 1 and time.monotonic() < end:
        agent.work()
    (item,) = agent.outbox.pending.values()
    verdict = check_update(dev, item.path.read_bytes(), rules, set())
    # Assert
    assert verdict.status == "accepted" and verdict.update_id == item.update_id and len(item.update_id) == 64


# ---------------------------------------------------------------- outbox


def small_update(uid: str) -> bytes:
    return encode_update(Update(uid, "d", "m", 1, 1, {"w": np.zeros(1, np.float32)}))


def test_outbox_never_drops_an_unacked_update(tmp_path):
    box = Outbox(tmp_path / "outbox", max_items=2)
    for i in range(3):
        box.put(f"u{i}", small_update(f"u{i}"))
    assert list(box.pending) == ["u0", "u1", "u2"] and box.full
    assert sorted(Outbox(tmp_path / "outbox", max_items=2).pending) == ["u0", "u1", "u2"]  # all kept on disk


def test_full_outbox_holds_back_a_round_until_an_ack_frees_room(bundle_dir, tmp_path, caplog):
    # Prepare: an outbox of one, already holding an unacked update
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 16, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    cfg = DeviceConfig("mqtt://127.0.0.1:1", "f", "dev1", tmp_path / "s", max_outbox=1, budget=NO_RSS_LIMIT)
    agent = DeviceAgent(cfg, x, y)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    agent.outbox.put("old", small_update("old"))
    # Execute: a round arrives; the agent works a few ticks; then the old update is acked
    agent.on_round(RoundMsg(1, 1, time.time() + 60, 1, None, LocalConfig(2, 8, 0.05)).encode())
    for _ in range(3):
        agent.work()
    held = (agent.learner.job, agent.status_fields()["outbox_full"], caplog.text.count("outbox full"))
    agent.on_ack(Ack("old", "accepted", None, 1).encode())
    agent.work()
    # Assert: no job while full (logged once, in the status); the round starts once there is room
    assert held == (None, True, 1)
    assert agent.learner.job is not None and agent.learner.job.round == 1
    assert list(agent.outbox.pending) == [] and not agent.status_fields()["outbox_full"]


# ---------------------------------------------------------------- backoff


def test_first_resend_never_comes_before_the_ack_timeout():
    rng = random.Random(0)
    waits = [backoff_s(1, ack_timeout_s=10.0, rng=rng) for _ in range(10_000)]
    assert min(waits) >= 10.0 and max(waits) <= 12.5 and max(waits) - min(waits) > 2.0  # jitter, lengthening only


@pytest.mark.parametrize(("attempt", "low", "high"), [(1, 10.0, 12.5), (2, 20.0, 25.0), (10, 300.0, 375.0)])
def test_backoff_doubles_with_lengthening_jitter_and_a_cap(attempt, low, high):
    rng = random.Random(attempt)
    assert all(low <= backoff_s(attempt, 10.0, max_s=300.0, rng=rng) <= high for _ in range(1000))


def test_outbox_drops_an_update_id_no_coordinator_can_ever_ack(tmp_path):
    # Prepare: an older runtime queued an update whose id is over 64 characters (acked with a null id)
    box = Outbox(tmp_path / "outbox")
    box.put("ok", small_update("ok"))
    box.put("x" * 70, small_update("x" * 70))
    # Execute: the agent restarts
    reloaded = Outbox(tmp_path / "outbox")
    # Assert: the unackable one is gone (it would be re-sent forever and hold async mode back); the other stays
    assert list(reloaded.pending) == ["ok"] and len(list((tmp_path / "outbox").glob("*.safetensors"))) == 1


@pytest.mark.parametrize("name", ["a" * 256, "bad\x00name", "tab\tname"])
def test_member_names_a_file_system_cannot_take_are_refused(bundle_dir, name):
    from edgelearn.bundle import BundleError, _check_member_name

    with pytest.raises(BundleError, match="bad file name"):
        _check_member_name(name)

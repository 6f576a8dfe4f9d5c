from dataclasses import replace

import pytest

from edgelearn.bundle import BundleError, Manifest
from edgelearn.signing import canonical, generate_keys, load_private, load_public, sign, verify

M = Manifest(
    model_id="m",
    version=2,
    task="classify",
    target="portable",
    input={"shape": [1, 2], "dtype": "float32"},
    trainable=["w"],
    files={"weights.safetensors": {"sha256": "ab", "bytes": 1}, "infer.pte": {"sha256": "cd", "bytes": 2}},
    created="2026-11-28T12:00:00Z",
)


@pytest.fixture
def keys(tmp_path):
    generate_keys(tmp_path / "k", tmp_path / "k.pub")
    return load_private(tmp_path / "k"), load_public(tmp_path / "k.pub")


def test_canonical_json_drops_signature_and_sorts_keys():
    c = canonical(replace(M, signature={"alg": "ed25519"}))
    assert c.startswith(b'{"created":"2026-11-28T12:00:00Z","files":{"infer.pte":') and b"signature" not in c


def test_signed_manifest_verifies(keys):
    verify(sign(M, keys[0]), keys[1])


def test_unsigned_release_refused_when_fleet_has_a_key(keys):
    with pytest.raises(BundleError, match="not signed"):
        verify(M, keys[1])


def test_edited_manifest_fails_verification(keys):
    signed = sign(M, keys[0])
    with pytest.raises(BundleError, match="does not verify"):
        verify(replace(signed, version=3), keys[1])


def test_other_key_fails_verification(keys, tmp_path):
    generate_keys(tmp_path / "o", tmp_path / "o.pub")
    with pytest.raises(BundleError, match="does not verify"):
        verify(sign(M, keys[0]), load_public(tmp_path / "o.pub"))


def test_unsigned_fleet_accepts_anything():
    verify(M, None)


def test_private_key_file_is_owner_only(tmp_path):
    generate_keys(tmp_path / "k", tmp_path / "k.pub")
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0


def test_signed_release_archive_round_trip(keys, tmp_path):
    import numpy as np

    from edgelearn.bundle import dump_weights, pack_release, read_release, write_bundle
    from edgelearn.signing import read_signed_release, sign_bundle

    files = {"weights.safetensors": dump_weights({"w": np.zeros(2, np.float32)}), "infer.pte": b"P"}
    write_bundle(tmp_path / "b", replace(M, files={}), files)
    unsigned = pack_release(tmp_path / "b")
    with pytest.raises(BundleError, match="not signed"):
        read_signed_release(unsigned, keys[1])
    sign_bundle(tmp_path / "b", keys[0])
    manifest, _ = read_signed_release(pack_release(tmp_path / "b"), keys[1])
    assert manifest.signature["alg"] == "ed25519"
    assert read_release(unsigned)[0].signature is None  # an unsigned fleet still reads it


def test_private_key_is_owner_only(tmp_path):
    generate_keys(tmp_path / "k", tmp_path / "k.pub")
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "k.pub").stat().st_mode & 0o777 == 0o644


def test_signed_messages_expire_unless_the_clock_cannot_tell(tmp_path):
    import json

    from edgelearn.signing import CLOCK_PLAUSIBLE_UNIX_S, MESSAGE_TTL_S, sign_message, verify_message

    generate_keys(tmp_path / "k", tmp_path / "k.pub")
    key, pub = load_private(tmp_path / "k"), load_public(tmp_path / "k.pub")
    now = 1_800_000_000.0
    msg = sign_message(b'{"round": 3}', "edgelearn/f/rounds/current", key, now_s=now)
    assert json.loads(msg)["expires"] == int(now + MESSAGE_TTL_S)
    verify_message(msg, "edgelearn/f/rounds/current", pub, now_s=now + MESSAGE_TTL_S - 1)
    with pytest.raises(BundleError, match="expired"):
        verify_message(msg, "edgelearn/f/rounds/current", pub, now_s=now + MESSAGE_TTL_S + 10)
    verify_message(msg, "edgelearn/f/rounds/current", pub, now_s=CLOCK_PLAUSIBLE_UNIX_S - 1e6)  # no RTC: 1970
    body = json.loads(msg)
    body["expires"] += 10**6  # extending the expiry breaks the signature
    with pytest.raises(BundleError, match="does not verify"):
        verify_message(json.dumps(body).encode(), "edgelearn/f/rounds/current", pub, now_s=now)

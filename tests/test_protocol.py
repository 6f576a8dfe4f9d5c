import numpy as np
import pytest

from edgelearn.protocol import (
    Ack,
    LocalConfig,
    ProtocolError,
    RoundMsg,
    Topics,
    Update,
    decode_update,
    encode_update,
    parse_broker_url,
    read_metadata,
)


def make_update(**kw) -> Update:
    rng = np.random.default_rng(0)
    fields = dict(
        update_id="dev1-r1-v1",
        device_id="dev1",
        model_id="digits-mlp",
        base_version=1,
        num_samples=64,
        round=1,
        deltas={
            "fc.weight": rng.normal(size=(3, 4)).astype(np.float32),
            "fc.bias": rng.normal(size=(3,)).astype(np.float32),
        },
        loss=0.5,
        train_seconds=1.25,
    )
    fields.update(kw)
    return Update(**fields)


def test_fp32_round_trip_is_exact():
    u = make_update()
    back = decode_update(encode_update(u))
    assert (back.update_id, back.device_id, back.model_id, back.base_version, back.num_samples, back.round) == (
        u.update_id,
        u.device_id,
        u.model_id,
        u.base_version,
        u.num_samples,
        u.round,
    )
    assert back.loss == 0.5 and back.train_seconds == 1.25 and back.encoding == "fp32"
    for name, d in u.deltas.items():
        np.testing.assert_array_equal(back.deltas[name], d)


def test_int8_round_trip_within_half_a_step():
    u = make_update(encoding="int8")
    payload = encode_update(u)
    back = decode_update(payload)
    for name, d in u.deltas.items():
        step = np.abs(d).max() / 127
        assert np.abs(back.deltas[name] - d).max() <= step / 2 + 1e-7
        assert back.deltas[name].dtype == np.float32


def test_metadata_follows_the_protocol():
    meta = read_metadata(encode_update(make_update(round=None)))
    assert meta["schema"] == "edgelearn.update/1"
    assert meta["base_version"] == "1" and meta["num_samples"] == "64" and meta["encoding"] == "fp32"
    assert "round" not in meta  # asynchronous mode


def test_topics():
    t = Topics("fleet-1")
    assert t.model_latest == "edgelearn/fleet-1/model/latest"
    assert t.rounds_current == "edgelearn/fleet-1/rounds/current"
    assert t.device("d1", "update") == "edgelearn/fleet-1/devices/d1/update"
    assert t.parse_device_topic("edgelearn/fleet-1/devices/d1/ack") == ("d1", "ack")
    assert t.parse_device_topic("edgelearn/other/devices/d1/ack") is None


@pytest.mark.parametrize("bad", ["", "a/b", "x" * 65, "dev#1", "dev 1"])
def test_bad_names_are_refused(bad):
    with pytest.raises(ValueError, match="invalid"):
        Topics(bad)


def test_broker_urls():
    u = parse_broker_url("mqtts://me:s3cret@broker.example:9000")
    assert (u.host, u.port, u.tls, u.username, u.password) == ("broker.example", 9000, True, "me", "s3cret")
    assert parse_broker_url("mqtt://localhost").port == 1883
    assert parse_broker_url("mqtts://localhost").port == 8883
    with pytest.raises(ValueError, match="invalid broker URL"):
        parse_broker_url("http://localhost")


def test_round_and_ack_round_trip():
    r = RoundMsg(7, 7, 1795000000.0, 3, ("a", "b"), LocalConfig(20, 32, 0.05))
    assert RoundMsg.decode(r.encode()) == r
    assert r.includes("a") and not r.includes("c")
    a = Ack("u1", "rejected", "not_finite", 7)
    assert Ack.decode(a.encode()) == a
    with pytest.raises(ProtocolError):
        Ack.decode(b'{"status": "maybe"}')


def test_client_ids_never_collide_between_coordinator_devices_and_fleets():
    a, b = Topics("fleet1"), Topics("fleet1", root="other")
    ids = {a.client_id(), a.client_id("coordinator"), a.client_id("dev-1"), b.client_id(), Topics("f2").client_id()}
    assert len(ids) == 5
    with pytest.raises(ValueError, match="device_id"):
        a.client_id("bad/id")


def test_a_status_larger_than_any_real_one_is_refused_by_the_decoder():
    from edgelearn.protocol import MAX_STATUS_BYTES, ProtocolError, decode_status, encode_status

    assert decode_status(encode_status("online", version=3)) == {"state": "online", "version": 3}
    huge = encode_status("online", pad="x" * MAX_STATUS_BYTES)
    with pytest.raises(ProtocolError, match="status_too_large"):
        decode_status(huge)

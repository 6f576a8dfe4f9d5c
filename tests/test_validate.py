"""One test per rejection rule of protocol v1 (coordinator/validate.py)."""

import json

import numpy as np
import pytest

from coordinator.validate import Rules, check_update
from edgelearn.protocol import Update, encode_update

SHAPES = {"fc.weight": (3, 4), "fc.bias": (3,)}
RULES = Rules("digits-mlp", SHAPES, base_version=2, round=5, max_update_norm=10.0)


def update(**kw) -> Update:
    fields = dict(
        update_id="u1",
        device_id="dev1",
        model_id="digits-mlp",
        base_version=2,
        num_samples=10,
        round=5,
        deltas={n: np.full(s, 0.1, np.float32) for n, s in SHAPES.items()},
    )
    fields.update(kw)
    return Update(**fields)


def verdict(payload: bytes, topic_device: str = "dev1", accepted: set[tuple[str, str]] | None = None):
    return check_update(topic_device, payload, RULES, accepted or set())


def with_metadata(**changes) -> bytes:
    """A valid payload whose safetensors __metadata__ is edited (header rewritten, data untouched)."""
    payload = encode_update(update())
    n = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + n])
    for k, v in changes.items():
        if v is None:
            header["__metadata__"].pop(k)
        else:
            header["__metadata__"][k] = v
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    return len(new).to_bytes(8, "little") + new + payload[8 + n :]


def test_valid_update_is_accepted():
    v = verdict(encode_update(update()))
    assert (v.status, v.reason, v.update_id) == ("accepted", None, "u1")


def test_not_safetensors():
    v = verdict(b"\x00\x01garbage")
    assert (v.status, v.reason, v.update_id) == ("rejected", "not_safetensors", None)


def test_truncated_payload():
    v = verdict(encode_update(update())[:-7])
    assert v.status == "rejected" and v.reason == "not_safetensors"


def test_unknown_schema():
    v = verdict(with_metadata(schema="edgelearn.update/9"))
    assert (v.status, v.reason) == ("rejected", "unknown_schema")


def test_device_id_differs_from_topic():
    v = verdict(encode_update(update()), topic_device="dev2")
    assert (v.status, v.reason) == ("rejected", "device_id_mismatch")


def test_model_id_differs():
    v = verdict(encode_update(update(model_id="other-model")))
    assert (v.status, v.reason) == ("rejected", "model_id_mismatch")


def test_trainable_name_missing():
    v = verdict(encode_update(update(deltas={"fc.weight": np.zeros((3, 4), np.float32)})))
    assert (v.status, v.reason) == ("rejected", "missing_name:fc.bias")


def test_extra_name():
    deltas = {n: np.zeros(s, np.float32) for n, s in SHAPES.items()} | {"fc2.weight": np.zeros(2, np.float32)}
    v = verdict(encode_update(update(deltas=deltas)))
    assert (v.status, v.reason) == ("rejected", "extra_name:fc2.weight")


def test_shape_differs():
    deltas = {"fc.weight": np.zeros((4, 3), np.float32), "fc.bias": np.zeros(3, np.float32)}
    v = verdict(encode_update(update(deltas=deltas)))
    assert (v.status, v.reason) == ("rejected", "bad_shape:fc.weight")


def test_dtype_differs():
    from safetensors.numpy import save

    payload = save(
        {"fc.weight": np.zeros((3, 4), np.float64), "fc.bias": np.zeros(3, np.float32)},
        metadata={
            "schema": "edgelearn.update/1",
            "update_id": "u1",
            "device_id": "dev1",
            "model_id": "digits-mlp",
            "base_version": "2",
            "num_samples": "10",
            "round": "5",
            "encoding": "fp32",
        },
    )
    v = verdict(payload)
    assert (v.status, v.reason) == ("rejected", "bad_dtype:fc.weight")


def test_value_not_finite():
    deltas = {"fc.weight": np.full((3, 4), np.nan, np.float32), "fc.bias": np.zeros(3, np.float32)}
    v = verdict(encode_update(update(deltas=deltas)))
    assert (v.status, v.reason) == ("rejected", "not_finite")


@pytest.mark.parametrize("n", ["0", "-3", "2.5", "many"])
def test_num_samples_not_a_positive_integer(n):
    v = verdict(with_metadata(num_samples=n))
    assert (v.status, v.reason) == ("rejected", "bad_num_samples")


def test_norm_exceeds_max_update_norm():
    deltas = {"fc.weight": np.full((3, 4), 5.0, np.float32), "fc.bias": np.zeros(3, np.float32)}
    v = verdict(encode_update(update(deltas=deltas)))  # ‖Δ‖ = 5·sqrt(12) ≈ 17.3 > 10
    assert (v.status, v.reason) == ("rejected", "norm_too_large")


def test_already_accepted_is_duplicate():
    v = verdict(encode_update(update()), accepted={("dev1", "u1")})
    assert (v.status, v.update_id) == ("duplicate", "u1")


def test_an_update_id_belongs_to_its_device():
    # another device already sent an update under this id (e.g. to hijack it): this one is still this device's
    v = verdict(encode_update(update()), accepted={("attacker", "u1")})
    assert v.status == "accepted"


def test_stale_base_version():
    v = verdict(encode_update(update(base_version=1)))
    assert (v.status, v.reason) == ("rejected", "stale_base_version")


def test_wrong_round():
    v = verdict(encode_update(update(round=4)))
    assert (v.status, v.reason) == ("rejected", "wrong_round")


def test_missing_update_id():
    v = verdict(with_metadata(update_id=None))
    assert (v.status, v.reason, v.update_id) == ("rejected", "bad_update_id", None)


def test_overflowing_squares_are_too_large_not_infinite():
    # 1e30² overflows float32, but every value is finite: the reason must be the norm
    big = update(update_id="big", deltas={n: np.full(s, 1e30, np.float32) for n, s in SHAPES.items()})
    v = verdict(encode_update(big))
    assert (v.status, v.reason) == ("rejected", "norm_too_large")


def test_norm_just_below_the_limit_is_accepted():
    # ‖Δ‖ = sqrt(15)·c with 15 values; c chosen so that the norm is 9.99 < 10
    c = np.float32(9.99 / np.sqrt(15))
    v = verdict(encode_update(update(deltas={n: np.full(s, c, np.float32) for n, s in SHAPES.items()})))
    assert v.status == "accepted"


def test_payload_larger_than_any_valid_update_is_refused_unparsed():
    v = verdict(b"\xff" * (4 * 15 + 64 * 1024 + 1))
    assert (v.status, v.reason, v.update_id) == ("rejected", "payload_too_large", None)


def raw_safetensors(header: dict, data: bytes) -> bytes:
    """Hand-made safetensors bytes: 8-byte header length, JSON header, data (for payloads numpy can't make)."""
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


META = {"schema": "edgelearn.update/1", "update_id": "u1", "device_id": "dev1", "model_id": "digits-mlp",
        "base_version": "2", "num_samples": "10", "round": "5", "encoding": "fp32"}  # fmt: skip


def test_dtype_numpy_cannot_hold_is_bad_dtype():
    header = {"__metadata__": META, "fc.weight": {"dtype": "BF16", "shape": [3, 4], "data_offsets": [0, 24]},
              "fc.bias": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}  # fmt: skip
    v = verdict(raw_safetensors(header, bytes(36)))
    assert (v.status, v.reason, v.update_id) == ("rejected", "bad_dtype", "u1")


def test_absurdly_nested_header_is_not_safetensors():
    nested = b"[" * 30_000
    v = verdict(len(nested).to_bytes(8, "little") + nested)
    assert (v.status, v.reason, v.update_id) == ("rejected", "not_safetensors", None)


@pytest.mark.parametrize("n", ["1" + "0" * 30, " 5", "5_0", "٣"])
def test_num_samples_must_be_plain_decimal_below_10_15(n):
    v = verdict(with_metadata(num_samples=n))
    assert (v.status, v.reason) == ("rejected", "bad_num_samples")


def test_oversized_payload_ack_names_its_update_id():
    payload = encode_update(update())
    v = verdict(payload + bytes(64 * 1024))  # trailing junk past any valid size; header still readable
    assert (v.status, v.reason, v.update_id) == ("rejected", "payload_too_large", "u1")


def test_int8_scale_must_be_a_true_scalar():
    from safetensors.numpy import save

    tensors = {n: np.zeros(s, np.int8) for n, s in SHAPES.items()}
    tensors |= {f"{n}:scale": np.ones((1,), np.float32) for n in SHAPES}
    v = verdict(save(tensors, metadata={**META, "encoding": "int8"}))
    assert v.status == "rejected" and v.reason.startswith("bad_dtype:")

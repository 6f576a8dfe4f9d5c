"""Fuzzing the update decoder and validator (hypothesis): any bytes give a verdict, never an exception."""

import json

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.validate import Rules, check_update
from edgelearn.protocol import ProtocolError, Update, decode_update, encode_update

SHAPES = {"w": (4, 3), "b": (3,)}
RULES = Rules("m", SHAPES, base_version=1, round=1, max_update_norm=10.0)
VALID = encode_update(Update("u", "d", "m", 1, 5, {n: np.ones(s, np.float32) * 0.1 for n, s in SHAPES.items()}, 1))
FAST = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def verdict_of(payload: bytes):
    v = check_update("d", payload, RULES, set())
    assert v.status in ("accepted", "rejected")
    assert (v.status == "rejected") == (v.reason is not None)
    return v


@FAST
@given(st.binary(max_size=2048))
def test_random_bytes_are_rejected_cleanly(data):
    v = verdict_of(data)
    assert v.status == "rejected"


@FAST
@given(st.integers(0, len(VALID) - 1), st.binary(min_size=1, max_size=8))
def test_corrupted_valid_payloads_never_crash(pos, junk):
    # Overwrite bytes anywhere (header length, JSON header, tensor data) or truncate there
    verdict_of(VALID[:pos] + junk + VALID[pos + len(junk) :])
    verdict_of(VALID[:pos])


@settings(max_examples=1000, deadline=None)
@given(
    st.dictionaries(
        st.text(max_size=12),
        st.one_of(st.text(max_size=12), st.integers(), st.none(), st.lists(st.integers(), max_size=3)),
        max_size=6,
    )
)
def test_arbitrary_metadata_gives_protocol_errors_only(meta):
    n = int.from_bytes(VALID[:8], "little")
    header = json.loads(VALID[8 : 8 + n])
    header["__metadata__"] = meta
    raw = json.dumps(header).encode()
    payload = len(raw).to_bytes(8, "little") + raw + VALID[8 + n :]
    try:
        decode_update(payload)
    except ProtocolError as e:
        assert e.reason
    assert verdict_of(payload).status == "rejected"

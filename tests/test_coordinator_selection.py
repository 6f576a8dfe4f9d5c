"""Participant selection and eligibility rules (coordinator/selection.py)."""

import pytest

from coordinator.selection import Eligibility, eligible, over_selected, select

STATUSES = {
    "a": {"state": "idle", "battery_percent": 80, "charging": True, "temp_c": 30},
    "b": {"state": "training", "battery_percent": 10, "charging": False, "temp_c": 30},
    "c": {"state": "idle", "battery_percent": 90, "charging": True, "temp_c": 50},
    "d": {"state": "offline"},
    "e": {"state": "idle"},  # no telemetry
}


def test_eligibility_rules_filter_online_devices():
    rules = (Eligibility.parse("battery_percent>=20"), Eligibility.parse("temp_c < 45"))
    assert eligible(STATUSES, rules) == ["a"]
    assert eligible(STATUSES, ()) == ["a", "b", "c", "e"]  # offline excluded
    assert eligible(STATUSES, (Eligibility.parse("charging==true"),)) == ["a", "c"]


def test_bad_rule_is_refused_with_its_text():
    with pytest.raises(ValueError, match="battery"):
        Eligibility.parse("battery ~ 3")


def test_over_selection_and_reproducible_sample():
    assert over_selected(10, 1.3) == 13
    devices = [f"d{i}" for i in range(100)]
    s1, s2 = select(devices, 10, 1.3, seed=4), select(devices, 10, 1.3, seed=4)
    assert s1 == s2 and len(s1) == 13 and len(set(s1)) == 13
    assert select(devices, 10, 1.3, seed=5) != s1
    assert select(["x", "y"], 10, 1.3, seed=1) == ["x", "y"]  # fewer candidates than wanted: all of them


def test_over_selection_and_trimming_round_exactly():
    import numpy as np

    from coordinator.aggregate import TrimmedMean

    # 100 × 1.1 and 0.35 × 180 are 110.00000000000001 and 62.99999999999999 in floats
    assert over_selected(100, 1.1) == 110
    stacked = (np.arange(180, dtype=np.float32) ** 2).reshape(180, 1)
    mean = TrimmedMean({"w": (1,)}, 0.35).reduce(stacked)
    np.testing.assert_allclose(mean, (np.arange(63, 117, dtype=np.float32) ** 2).mean(keepdims=True))


def test_a_reannounced_round_draws_new_participants():
    devices = [f"d{k:02d}" for k in range(30)]
    first, again = select(devices, 5, 1.0, "7/0"), select(devices, 5, 1.0, "7/1")
    assert first != again and first == select(devices, 5, 1.0, "7/0")


def test_participants_set_the_close_threshold_unless_min_updates_is_given():
    from cli import build_parser
    from cli.coordinator_cmd import _coordinator_config

    base = ["coordinator", "--broker", "mqtt://h", "--fleet", "f", "--bundle", "b", "--state", "s"]
    with_target = _coordinator_config(build_parser().parse_args([*base, "--participants", "10"]))
    explicit = _coordinator_config(build_parser().parse_args([*base, "--participants", "10", "--min-updates", "3"]))
    plain = _coordinator_config(build_parser().parse_args(base))
    assert (with_target.min_updates, explicit.min_updates, plain.min_updates) == (10, 3, 2)

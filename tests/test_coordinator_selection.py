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

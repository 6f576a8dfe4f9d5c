"""Budgets: scripted readings drive exact pause / shrink / resume sequences (hysteresis included)."""

from collections import deque

import pytest

from edge_runtime.budget import PAUSE, RUN, SHRINK, Budget, Governor, PsutilSource, Reading, decide, used_train_s

OK = Reading(other_cpu_percent=10.0, rss_mb=100.0, available_mb=4000.0, temperature_c=50.0)
BUDGET = Budget(
    max_cpu_percent=80.0,
    max_rss_mb=500.0,
    min_available_mb=200.0,
    max_temperature_c=70.0,
    min_battery_percent=20.0,
    batch_size=32,
    threads=2,
    interval_s=1.0,
)


class Script:
    """A reading source that returns the given readings in order, and a clock the test advances."""

    def __init__(self, readings: list[Reading]) -> None:
        self.readings = deque(readings)
        self.now_s = 0.0

    def __call__(self) -> Reading:
        return self.readings.popleft()

    def clock(self) -> float:
        return self.now_s


def run_script(readings: list[Reading], budget: Budget = BUDGET) -> list[tuple[str, tuple[str, ...]]]:
    """One governor check per reading, `interval_s` apart; returns (action, reasons) per check."""
    s = Script(readings)
    g = Governor(budget, s, s.clock)
    out = []
    for _ in range(len(readings)):
        d = g.check()
        out.append((d.action, d.reasons))
        s.now_s += budget.interval_s
    return out


def r(**kw) -> Reading:
    return Reading(**{**OK.__dict__, **kw})


def test_temperature_pauses_and_resumes_only_below_the_hysteresis_level():
    # Prepare: 50 → 64 (soft) → 71 (over) → 68 (still above resume 65) → 64 (resumed, soft) → 50
    temps = [50, 64, 71, 68, 64, 50]
    # Execute
    got = run_script([r(temperature_c=t) for t in temps])
    # Assert
    assert got == [
        (RUN, ()),
        (SHRINK, ("temperature",)),
        (PAUSE, ("temperature",)),
        (PAUSE, ("temperature",)),
        (SHRINK, ("temperature",)),
        (RUN, ()),
    ]


def test_low_battery_pauses_unless_charging_and_no_battery_means_mains():
    readings = [
        r(battery_percent=50, charging=False),
        r(battery_percent=15, charging=False),
        r(battery_percent=15, charging=True),
        r(battery_percent=22, charging=False),  # above 20 but below resume 25 after a pause
        r(battery_percent=26, charging=False),
        r(battery_percent=None, charging=None),
    ]
    got = [a for a, _ in run_script(readings)]
    # 22% right after charging: the earlier pause was lifted while charging, so 22% > 20% runs.
    assert got == [RUN, PAUSE, RUN, RUN, RUN, RUN]


def test_battery_hysteresis_holds_the_pause_until_the_margin():
    got = [a for a, _ in run_script([r(battery_percent=p, charging=False) for p in (15, 22, 24, 26)])]
    assert got == [PAUSE, PAUSE, PAUSE, RUN]


def test_memory_pressure_and_rss_pause_training():
    readings = [r(available_mb=190), r(available_mb=210), r(available_mb=300), r(rss_mb=510), r(rss_mb=460)]
    got = run_script(readings)
    assert got == [
        (PAUSE, ("memory",)),
        (PAUSE, ("memory",)),  # 200/210 = 0.95: over the resume level 0.9, so still paused
        (RUN, ()),  # 200/300 = 0.67
        (PAUSE, ("rss",)),
        (PAUSE, ("rss",)),  # 460/500 = 0.92 ≥ 0.9
    ]


def test_cpu_load_of_other_processes_shrinks_then_pauses():
    got = run_script([r(other_cpu_percent=c) for c in (10, 75, 85, 75, 65)])
    assert [a for a, _ in got] == [RUN, SHRINK, PAUSE, PAUSE, RUN]


def test_shrink_halves_the_batch_and_uses_one_thread():
    d = decide(BUDGET, r(other_cpu_percent=75), 0.0, frozenset())
    assert (d.action, d.batch_size, d.threads) == (SHRINK, 16, 1)
    d = decide(BUDGET, OK, 0.0, frozenset())
    assert (d.action, d.batch_size, d.threads) == (RUN, 32, 2)


def test_training_time_quota_pauses_until_the_hour_window_frees():
    # Prepare: 60 s of training per hour allowed; 60 s trained at t = 0..60
    s = Script([OK] * 4)
    g = Governor(Budget(max_train_s_per_hour=60.0, interval_s=1.0), s, s.clock)
    g.record_training(0.0, 60.0)
    s.now_s = 61.0
    # Execute / Assert: quota used → pause; half an hour later still paused; after the hour it runs
    assert g.check().reasons == ("train_quota",)
    s.now_s = 1800.0
    assert g.check().action == PAUSE
    s.now_s = 3630.0  # half of the span has left the window
    assert g.check().action == RUN
    assert g.telemetry()["train_s_last_hour"] == pytest.approx(30.0)


def test_used_train_s_clips_spans_at_the_window_edge():
    assert used_train_s(deque([(0.0, 10.0), (100.0, 110.0)]), now_s=3605.0) == pytest.approx(15.0)


def test_decisions_are_sampled_at_the_interval_and_logged_once_per_change():
    s = Script([r(temperature_c=80), OK])
    g = Governor(BUDGET, s, s.clock)
    assert g.check().action == PAUSE
    s.now_s = 0.5  # within the interval: no new reading is taken
    assert g.check().action == PAUSE and len(s.readings) == 1
    s.now_s = 1.0
    assert g.check().action == RUN
    assert [h["action"] for h in g.history] == [PAUSE, RUN]
    assert g.history[0]["reading"]["temperature_c"] == 80


def test_psutil_source_reads_this_machine():
    reading = PsutilSource()()
    assert reading.rss_mb > 10 and reading.available_mb > 0 and reading.other_cpu_percent >= 0


def test_psutil_source_survives_missing_sensor_files():
    # Prepare: psutil as in a container or chroot without /sys/class/power_supply (seen under qemu)
    import types

    import psutil

    def no_power_supply():
        raise FileNotFoundError(2, "No such file or directory", "/sys/class/power_supply")

    source = PsutilSource()
    source._psutil = types.SimpleNamespace(**{n: getattr(psutil, n) for n in dir(psutil) if not n.startswith("_")})
    source._psutil.sensors_battery = no_power_supply
    del source._psutil.sensors_temperatures  # a platform without temperature sensors
    # Execute
    reading = source()
    # Assert: a reading without battery or temperature, not an exception
    assert reading.battery_percent is None and reading.charging is None and reading.temperature_c is None
    assert reading.rss_mb > 10


def test_psutil_source_holds_a_missed_temperature_and_reports_unknown_power_as_unknown():
    # Prepare: sensors that answer 90 °C, then nothing for one read; a battery whose plug state is unknown
    import types

    import psutil

    temps = [{"cpu": [types.SimpleNamespace(current=90.0)]}, {}]
    source = PsutilSource()
    source._psutil = types.SimpleNamespace(**{n: getattr(psutil, n) for n in dir(psutil) if not n.startswith("_")})
    source._psutil.sensors_temperatures = lambda: temps.pop(0)
    source._psutil.sensors_battery = lambda: types.SimpleNamespace(percent=50.0, power_plugged=None)
    # Execute
    first, second = source(), source()
    # Assert: the hot reading is kept across the missed one (a pause must not lift on a sensor hiccup)
    assert (first.temperature_c, second.temperature_c) == (90.0, 90.0)
    assert second.charging is None and second.battery_percent == 50.0


@pytest.mark.parametrize("bad", [{"threads": 0}, {"batch_size": 0}, {"soft_fraction": 0}, {"interval_s": 0}])
def test_bad_budget_is_refused_with_a_clear_error(bad):
    with pytest.raises(ValueError, match="budget"):
        Budget(**bad)


def test_back_to_back_training_spans_merge_so_the_quota_stays_cheap():
    s = Script([OK])
    g = Governor(Budget(max_train_s_per_hour=100.0), s, s.clock)
    for k in range(1000):
        g.record_training(k * 0.01, k * 0.01 + 0.009)
    g.record_training(20.0, 21.0)  # after a 10 s gap: a new span
    assert len(g.spans) == 2 and used_train_s(g.spans, 30.0) == pytest.approx(9.999 + 1.0)

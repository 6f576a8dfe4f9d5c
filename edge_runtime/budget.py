"""Resource budgets: read the device with psutil, decide run / shrink / pause before every training step.

The governor is pure decision logic over `Reading`s; where readings come from is injectable
(`ReadingSource`), so tests drive exact sequences and the default reads real psutil.
Hysteresis: a limit that paused training must fall below its resume level before training resumes.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger(__name__)

RUN, SHRINK, PAUSE = "run", "shrink", "pause"
QUOTA_WINDOW_S = 3600.0
TEMP_HOLD_S = 60.0  # a missing temperature read is replaced by the last one this long


@dataclass(frozen=True)
class Budget:
    """What training may use. None disables a limit. `soft_fraction` of a limit → shrink; over it → pause.

    A device profile's `[budget]` table (devices/profiles/*.toml) holds exactly these fields."""

    max_cpu_percent: float | None = None  # system CPU used by *other* processes, % of all cores (off: shared hosts)
    max_rss_mb: float | None = 600.0  # this process
    min_available_mb: float | None = 200.0
    max_temperature_c: float | None = 75.0  # hottest psutil sensor, where present
    min_battery_percent: float | None = 20.0  # ignored while charging; no battery = mains
    max_train_s_per_hour: float | None = None
    threads: int = 1
    batch_size: int = 32
    soft_fraction: float = 0.9
    cpu_resume_margin_percent: float = 10.0
    temperature_resume_margin_c: float = 5.0
    battery_resume_margin_percent: float = 5.0
    memory_resume_fraction: float = 0.9
    interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.threads < 1 or self.batch_size < 1:
            raise ValueError("budget: threads and batch_size must be ≥ 1")
        if not 0 < self.soft_fraction <= 1:
            raise ValueError("budget: soft_fraction must be in (0, 1]")
        if self.interval_s <= 0:
            raise ValueError("budget: interval_s must be > 0")

    @property
    def train_duty(self) -> float:
        """The share of wall time training may use: max_train_s_per_hour / 3600, capped at 1 (1 when unset)."""
        return 1.0 if self.max_train_s_per_hour is None else min(1.0, max(0.0, self.max_train_s_per_hour / 3600))


@dataclass(frozen=True)
class Reading:
    """One sample of the device. `other_cpu_percent` excludes this process (training must not pause itself)."""

    other_cpu_percent: float
    rss_mb: float
    available_mb: float
    temperature_c: float | None = None
    battery_percent: float | None = None
    charging: bool | None = None


@dataclass(frozen=True)
class Decision:
    action: str  # RUN, SHRINK or PAUSE
    batch_size: int
    threads: int
    reasons: tuple[str, ...] = ()

    def as_json(self) -> dict:
        return {**asdict(self), "reasons": list(self.reasons)}


ReadingSource = Callable[[], Reading]


def other_cpu_percent(system_percent: float, process_percent: float, n_cpus: int) -> float:
    """Load of everything but us, in % of all cores: max(0, system − process / n_cpus)."""
    return max(0.0, system_percent - process_percent / max(1, n_cpus))


def busy_percent(idle0: float, total0: float, idle1: float, total1: float) -> float:
    """System CPU busy % between two cpu_times samples: 100 · (1 − Δidle / Δtotal)."""
    d_total = total1 - total0
    return 0.0 if d_total <= 0 else max(0.0, min(100.0, 100.0 * (1.0 - (idle1 - idle0) / d_total)))


class PsutilSource:
    """Real readings. CPU % is measured between consecutive calls from this instance's own cpu_times
    samples (psutil.cpu_percent(None) keeps one module-wide baseline that every caller would share)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._proc = psutil.Process()
        self._n_cpus = psutil.cpu_count() or 1
        self._last = self._cpu_sample()
        self._last_temp: tuple[float, float] | None = None  # (°C, monotonic s) of the last sensor reading

    def _cpu_sample(self) -> tuple[float, float, float, float]:
        """(idle_s, total_s) of the system, this process's CPU seconds, and wall time."""
        t = self._psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # Linux counts these in user/nice too
        own = self._proc.cpu_times()
        return idle, sum(t) - guest, own.user + own.system, time.monotonic()

    def __call__(self) -> Reading:
        ps = self._psutil
        now = self._cpu_sample()
        (idle0, total0, own0, wall0), self._last = self._last, now
        system = busy_percent(idle0, total0, now[0], now[1])
        own = 100.0 * (now[2] - own0) / max(now[3] - wall0, 1e-6)  # % of one core
        temps = _sensor(ps, "sensors_temperatures") or {}
        current = [t.current for entries in temps.values() for t in entries if t.current is not None]
        if current:
            self._last_temp = (max(current), now[3])
        elif self._last_temp and now[3] - self._last_temp[1] <= TEMP_HOLD_S:  # one missed read keeps the limit
            current = [self._last_temp[0]]
        battery = _sensor(ps, "sensors_battery")
        plugged = getattr(battery, "power_plugged", None)
        return Reading(
            other_cpu_percent=other_cpu_percent(system, own, self._n_cpus),
            rss_mb=self._proc.memory_info().rss / 2**20,
            available_mb=ps.virtual_memory().available / 2**20,
            temperature_c=max(current) if current else None,
            battery_percent=battery.percent if battery else None,
            charging=None if plugged is None else bool(plugged),  # None: unknown (the battery limit applies)
        )


def _sensor(ps: Any, name: str) -> Any:
    """psutil's `name()` reading, or None where the platform lacks it or its /sys files are missing
    (psutil raises FileNotFoundError when /sys/class/power_supply does not exist, e.g. in a container)."""
    fn = getattr(ps, name, None)
    if fn is None:
        return None
    try:
        return fn()
    except OSError as e:
        log.debug("%s unavailable: %s", name, e)
        return None


def used_train_s(spans: deque[tuple[float, float]], now_s: float, window_s: float = QUOTA_WINDOW_S) -> float:
    """Training seconds inside [now − window, now] from (start_s, end_s) spans, clipping the oldest span."""
    lo = now_s - window_s
    return sum(max(0.0, end - max(start, lo)) for start, end in spans if end > lo)


def levels(b: Budget, r: Reading, train_s: float) -> list[tuple[str, float, float, float]]:
    """(name, pressure, soft, resume) per active limit; pressure ≥ 1 means over the limit.

    Pressure is value/limit for maxima and limit/value for minima, so one scale fits all:
    shrink at ≥ soft, pause at > 1, resume (after a pause) only at < resume.
    """
    out: list[tuple[str, float, float, float]] = []
    s = b.soft_fraction
    if b.max_cpu_percent is not None:
        resume = (b.max_cpu_percent - b.cpu_resume_margin_percent) / b.max_cpu_percent
        out.append(("cpu", r.other_cpu_percent / b.max_cpu_percent, s, resume))
    if b.max_rss_mb is not None:
        out.append(("rss", r.rss_mb / b.max_rss_mb, s, b.memory_resume_fraction))
    if b.min_available_mb is not None:
        out.append(("memory", b.min_available_mb / max(r.available_mb, 1e-9), s, b.memory_resume_fraction))
    if b.max_temperature_c is not None and r.temperature_c is not None:
        resume = (b.max_temperature_c - b.temperature_resume_margin_c) / b.max_temperature_c
        out.append(("temperature", r.temperature_c / b.max_temperature_c, s, resume))
    if b.min_battery_percent is not None and r.battery_percent is not None and not r.charging:
        resume = b.min_battery_percent / (b.min_battery_percent + b.battery_resume_margin_percent)
        out.append(("battery", b.min_battery_percent / max(r.battery_percent, 1e-9), 1.0, resume))
    if b.max_train_s_per_hour is not None:
        out.append(("train_quota", train_s / b.max_train_s_per_hour, 1.0, 1.0))
    return out


def decide(b: Budget, r: Reading, train_s: float, paused_by: frozenset[str]) -> Decision:
    """Pause if any limit is over (pressure ≥ 1 for the quota, > 1 otherwise) or a limit that paused us has
    not yet fallen below its resume level; shrink (batch/2, 1 thread) in the soft zone; else run."""
    over, soft = [], []
    for name, p, soft_at, resume in levels(b, r, train_s):
        if p > 1.0 or (name == "train_quota" and p >= 1.0) or (name in paused_by and p >= resume):
            over.append(name)
        elif p >= soft_at and soft_at < 1.0:
            soft.append(name)
    if over:
        return Decision(PAUSE, 0, 0, tuple(over))
    if soft:
        return Decision(SHRINK, max(1, b.batch_size // 2), 1, tuple(soft))
    return Decision(RUN, b.batch_size, b.threads)


@dataclass
class Governor:
    """Samples the source every `interval_s` (at most) and answers `check()` before each training step."""

    budget: Budget
    source: ReadingSource = field(default_factory=PsutilSource)
    clock: Callable[[], float] = time.monotonic
    decision: Decision | None = None
    reading: Reading | None = None
    spans: deque[tuple[float, float]] = field(default_factory=deque)
    history: list[dict] = field(default_factory=list)
    _last_sample_s: float = float("-inf")

    def check(self) -> Decision:
        """The current decision, re-sampled if the last reading is older than `interval_s`."""
        now = self.clock()
        if self.decision is None or now - self._last_sample_s >= self.budget.interval_s:
            self._last_sample_s = now
            self.reading = self.source()
            paused_by = (
                frozenset(self.decision.reasons) if self.decision and self.decision.action == PAUSE else frozenset()
            )
            self._prune(now)
            new = decide(self.budget, self.reading, used_train_s(self.spans, now), paused_by)
            if new != self.decision:
                self._log(new)
            self.decision = new
        return self.decision

    def record_training(self, start_s: float, end_s: float, merge_gap_s: float = 1.0) -> None:
        """Count a training span (clock seconds) against the hourly quota; a span starting within
        `merge_gap_s` of the previous one extends it (the gap counts as training), so spans stay few."""
        if self.spans and start_s - self.spans[-1][1] < merge_gap_s:
            self.spans[-1] = (self.spans[-1][0], end_s)
        else:
            self.spans.append((start_s, end_s))

    def _prune(self, now_s: float) -> None:
        while self.spans and self.spans[0][1] <= now_s - QUOTA_WINDOW_S:
            self.spans.popleft()

    def _log(self, d: Decision) -> None:
        entry = {"t": round(self.clock(), 3), **d.as_json(), "reading": asdict(self.reading) if self.reading else None}
        self.history.append(entry)
        del self.history[:-50]
        level = logging.WARNING if d.action == PAUSE else logging.INFO
        log.log(
            level,
            "training %s (batch %d, threads %d)%s",
            d.action,
            d.batch_size,
            d.threads,
            f": {', '.join(d.reasons)}" if d.reasons else "",
        )

    def telemetry(self) -> dict:
        """Budget readings and the last decision, for the status JSON."""
        return {
            "decision": self.decision.as_json() if self.decision else None,
            "reading": asdict(self.reading) if self.reading else None,
            "train_s_last_hour": round(used_train_s(self.spans, self.clock()), 3),
        }


def apply_threads(n: int) -> None:
    """Set torch's intra-op threads (cheap no-op if unchanged)."""
    import torch

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)

"""Resource traces for simulated devices: CPU load, temperature, memory and battery as `Reading`s.

Each simulated device gets a `TraceSource`, the agent's injectable reading source. Time is
compressed: heating and battery use are per training step, cooling, CPU swing and charging per
wall-clock second, chosen so that heating, cooling and battery cycles happen within a few rounds.
The physics is in small pure functions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_runtime.budget import Reading


@dataclass(frozen=True)
class TraceSpec:
    """How one kind of board behaves. `battery_percent` None means mains power (no battery sensor)."""

    ambient_c: float = 45.0  # idle SoC temperature in a case
    heat_c_per_step: float = 0.5  # temperature rise per training step (before cooling)
    cool_per_s: float = 0.15  # Newton cooling rate: fraction of (T − ambient) lost per second
    cpu_base_percent: float = 20.0  # the board's own job
    cpu_swing_percent: float = 15.0  # its daily-ish swing (sinusoid)
    cpu_period_s: float = 30.0
    rss_mb: float = 380.0  # torch + executorch floor measured on x86-64 (devices/profiles/rpi4.toml)
    available_mb: float = 2500.0
    battery_percent: float | None = None
    drain_percent_per_step: float = 0.2  # per training step
    idle_drain_percent_per_s: float = 0.05
    charge_percent_per_s: float = 2.0


# Pis and Jetsons run on mains in the field; one may be given a battery (UPS HAT / robot pack) with `battery=True`.
TRACES = {
    "rpi4": TraceSpec(ambient_c=50.0, heat_c_per_step=0.5, available_mb=2500.0),
    "rpi5": TraceSpec(ambient_c=45.0, heat_c_per_step=0.4, available_mb=5500.0),
    "jetson-orin-nano": TraceSpec(ambient_c=40.0, heat_c_per_step=0.3, available_mb=5000.0, cpu_base_percent=30.0),
    "jetson-nano": TraceSpec(ambient_c=45.0, heat_c_per_step=0.4, available_mb=2200.0, cpu_base_percent=30.0),
    "x86-dev": TraceSpec(ambient_c=40.0, heat_c_per_step=0.1, available_mb=8000.0, cpu_base_percent=10.0),
}


def cool(t_c: float, ambient_c: float, cool_per_s: float, dt_s: float) -> float:
    """Newton cooling over dt: T − min(1, cool·dt)·(T − ambient)."""
    return t_c - min(1.0, cool_per_s * dt_s) * (t_c - ambient_c)


def next_battery(pct: float, charging: bool, spent_percent: float, spec: TraceSpec, dt_s: float) -> tuple[float, bool]:
    """Charge at `charge_percent_per_s`, or lose `spent_percent` (training steps) + idle drain·dt;
    start charging at ≤ 10 %, stop at 95 %; clipped to [0, 100]."""
    if charging:
        pct = min(100.0, pct + spec.charge_percent_per_s * dt_s)
        return pct, pct < 95.0
    pct = max(0.0, pct - spent_percent - spec.idle_drain_percent_per_s * dt_s)
    return pct, pct <= 10.0


def cpu_load(spec: TraceSpec, t_s: float, phase: float) -> float:
    """Other processes' CPU %: base + swing·sin(2π t / period + phase), clipped to [0, 100]."""
    v = spec.cpu_base_percent + spec.cpu_swing_percent * math.sin(2 * math.pi * t_s / spec.cpu_period_s + phase)
    return max(0.0, min(100.0, v))


class TraceSource:
    """A device's reading source. The agent calls `on_step()` after each training step (heat, battery);
    between readings the board cools. The state persists across agent restarts of the device."""

    def __init__(self, spec: TraceSpec, phase: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.spec, self.phase, self.clock = spec, phase, clock
        self.temperature_c = spec.ambient_c
        self.battery_percent = spec.battery_percent
        self.charging = False
        self._t0 = self._last = clock()
        self._spent_percent = 0.0
        self.max_temperature_c = self.temperature_c

    def on_step(self) -> None:
        """One training step done: the SoC heats, the battery pays for it (counted per step, not per wall
        second, so a busy simulation host does not make the simulated boards hotter)."""
        self.temperature_c += self.spec.heat_c_per_step
        self.max_temperature_c = max(self.max_temperature_c, self.temperature_c)
        self._spent_percent += self.spec.drain_percent_per_step

    def __call__(self) -> Reading:
        now = self.clock()
        dt, self._last = now - self._last, now
        s = self.spec
        self.temperature_c = cool(self.temperature_c, s.ambient_c, s.cool_per_s, dt)
        if self.battery_percent is not None:
            self.battery_percent, self.charging = next_battery(
                self.battery_percent, self.charging, self._spent_percent, s, dt
            )
        self._spent_percent = 0.0
        return Reading(
            other_cpu_percent=cpu_load(s, now - self._t0, self.phase),
            rss_mb=s.rss_mb,
            available_mb=s.available_mb,
            temperature_c=round(self.temperature_c, 2),
            battery_percent=None if self.battery_percent is None else round(self.battery_percent, 2),
            charging=None if self.battery_percent is None else self.charging,
        )

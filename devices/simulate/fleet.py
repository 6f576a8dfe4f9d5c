"""The simulated fleet: N devices with profiles, data and traces, each a live agent while it is online.

Either every device stays online for the whole run (the coordinator selects each round's participants
among them), or only a cohort per round is online: a device outside it is offline, its state (release,
samples, outbox, checkpoint) stays on disk and nothing of it runs, as in cross-device FL where a few
percent of devices are available at a time.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from devices.profiles import Profile, load_profile
from devices.simulate.agent import Body, Meter, SimAgent
from devices.simulate.traces import TRACES, TraceSource
from edge_runtime.agent import DeviceConfig
from models.data import Split

log = logging.getLogger(__name__)

STEP_S = {"rpi4": 0.05, "rpi5": 0.025, "jetson-nano": 0.04, "jetson-orin-nano": 0.015, "x86-dev": 0.0}


@dataclass(frozen=True)
class Outage:
    """Device `device_id` goes offline right after queueing its update of `round`, for `seconds`."""

    device_id: str
    round: int
    seconds: float


@dataclass
class Device:
    device_id: str
    profile: Profile
    data: Split
    body: Body
    events: list[dict] = field(default_factory=list)  # outages, pauses (for the report)


@dataclass
class Live:
    agent: SimAgent
    stop: threading.Event
    thread: threading.Thread


def parse_mix(text: str) -> list[tuple[str, float]]:
    """'rpi4:0.5,rpi5:0.3' → [(rpi4, 0.5), (rpi5, 0.3)]; weights > 0, normalised later."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition(":")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ValueError(f"profile mix {part!r}: weight must be a number") from None
        if weight <= 0:
            raise ValueError(f"profile mix {part!r}: weight must be > 0")
        out.append((name, weight))
    if not out:
        raise ValueError("profile mix is empty")
    return out


def assign_profiles(mix: list[tuple[str, float]], n: int, rng: np.random.Generator) -> list[str]:
    """Exactly round(n·w/Σw) devices per profile (largest remainders), in shuffled order."""
    w = np.array([x[1] for x in mix]) / sum(x[1] for x in mix)
    counts = np.floor(w * n).astype(int)
    for i in np.argsort(-(w * n - counts))[: n - counts.sum()]:
        counts[i] += 1
    names = [name for (name, _), c in zip(mix, counts, strict=True) for _ in range(c)]
    rng.shuffle(names)
    return names


def make_devices(
    shards: list[Split], mix: list[tuple[str, float]], hot: set[str], battery_fraction: float,
    max_link_delay_s: float, seed: int, ambient_spread_c: float = 28.0,
) -> list[Device]:  # fmt: skip
    """Devices with a profile each, a budget from it, and a body: ambient temperature spread over
    [ambient, ambient + spread] (some enclosures are hot), CPU phase, battery for a fraction, link delay."""
    rng = np.random.default_rng(seed + 1)
    names = assign_profiles(mix, len(shards), rng)
    profiles = {n: load_profile(n) for n in set(names)}
    out = []
    for k, (shard, name) in enumerate(zip(shards, names, strict=True)):
        dev_id, p = f"sim{k:04d}", profiles[name]
        spec = TRACES.get(name, TRACES["x86-dev"])
        ambient = (
            (p.budget.max_temperature_c or 75.0) + 5.0
            if dev_id in hot
            else spec.ambient_c + rng.uniform(0.0, ambient_spread_c)
        )
        battery = float(rng.uniform(20.0, 100.0)) if rng.random() < battery_fraction else None
        spec = replace(spec, ambient_c=ambient, battery_percent=battery,
                       cpu_base_percent=float(rng.uniform(0.0, spec.cpu_base_percent * 2.5)))  # fmt: skip
        body = Body(name, STEP_S.get(name, 0.0), float(rng.uniform(0.0, max_link_delay_s)),
                    TraceSource(spec, phase=float(rng.uniform(0, 2 * np.pi))))  # fmt: skip
        out.append(Device(dev_id, p, shard, body))
    return out


class Fleet:
    """Starts and stops live agents of devices; runs outages (stop, wait, restart on the same state)."""

    def __init__(self, devices: list[Device], broker_url: str, fleet: str, state_dir: Path, v311: bool) -> None:
        self.devices = {d.device_id: d for d in devices}
        self.broker_url, self.fleet, self.state_dir, self.v311 = broker_url, fleet, state_dir, v311
        self.urls: dict[str, str] = {}  # a device's own broker (simulate --sites), else broker_url
        self.meter = Meter()
        self.live: dict[str, Live] = {}
        self.lock = threading.Lock()
        self.outages: dict[tuple[str, int], Outage] = {}  # (device, round) -> its outage; under `lock`
        self.wanted: set[str] | None = None  # devices meant to be online now (None: all); outages return only those
        self.closing = threading.Event()
        self.timers: list[threading.Thread] = []

    def config(self, d: Device) -> DeviceConfig:
        """The profile's budget, keep-alive and outbox bound; a simulation's own pace: re-send after 5 s, and
        tick_s 0.5 (an idle agent wakes twice a second, messages wake it at once: 1000 idle agents cost
        little CPU)."""
        p = d.profile
        return DeviceConfig(
            self.urls.get(d.device_id, self.broker_url), self.fleet, d.device_id, self.state_dir / d.device_id,
            mqtt_v311=self.v311,
            budget=p.budget, keepalive_s=p.mqtt.keepalive_s, max_outbox=p.outbox.max_items, ack_timeout_s=5.0,
            checkpoint_every_s=60.0, tick_s=0.5,
        )  # fmt: skip

    def start(self, device_id: str, rnd: int) -> None:
        """Bring a device online (a new agent on its state dir); no-op if it is live already."""
        d = self.devices[device_id]
        with self.lock:
            if device_id in self.live or self.closing.is_set():
                return
            agent = SimAgent(self.config(d), d.data.x, d.data.y, d.body, self.meter, self._went_down)
            agent.outage_after_update = (device_id, rnd) in self.outages
            stop = threading.Event()
            thread = threading.Thread(target=agent.run, args=(stop,), name=device_id, daemon=True)
            self.live[device_id] = Live(agent, stop, thread)
        thread.start()

    def stop(self, device_ids: list[str] | None = None) -> None:
        """Take devices offline (all live ones by default): each checkpoints and disconnects."""
        with self.lock:
            gone = [self.live.pop(i) for i in (list(self.live) if device_ids is None else device_ids) if i in self.live]
        for g in gone:
            g.stop.set()
        for g in gone:
            g.thread.join(timeout=30)
            self._note_pauses(g.agent)

    def connected(self) -> int:
        """Live devices whose MQTT link is connected."""
        with self.lock:
            return sum(live.agent.link.connected.is_set() for live in self.live.values())

    def arm_outages(self, rnd: int) -> None:
        """Live devices with an outage planned for round `rnd` go down after queueing their next update."""
        with self.lock:
            for dev, live in self.live.items():
                live.agent.outage_after_update = (dev, rnd) in self.outages

    def paused_since(self, t0_s: float) -> dict[str, int]:
        """Live devices whose governor paused training at any time since monotonic time `t0_s` (a pause
        decided before and still in force counts), counted by reason."""
        out: dict[str, int] = {}
        with self.lock:
            agents = [live.agent for live in self.live.values()]
        for agent in agents:
            history = list(agent.governor.history)
            before = [h for h in history if h["t"] < t0_s - 1e-3][-1:]
            recent = before + [h for h in history if h["t"] >= t0_s - 1e-3]
            for r in {r for h in recent if h["action"] == "pause" for r in h["reasons"]}:
                out[r] = out.get(r, 0) + 1
        return out

    def _note_pauses(self, agent: SimAgent) -> None:
        d = self.devices[agent.cfg.device_id]
        for h in agent.governor.history:
            if h["action"] == "pause":
                d.events.append({"event": "pause", "reasons": h["reasons"], "reading": h["reading"]})

    def _went_down(self, agent: SimAgent) -> None:
        """Called on the agent's thread: finish the outage on another thread (it joins this one)."""
        dev = agent.cfg.device_id
        with self.lock:
            outage = self.outages.get((dev, self.meter.round)) or next(
                (o for (i, _), o in self.outages.items() if i == dev), None
            )
        if outage is None:  # its round closed meanwhile (the outage was cleared): it simply stays online
            return
        t = threading.Thread(target=self._outage, args=(dev, outage), daemon=True)
        self.timers.append(t)
        t.start()

    def _outage(self, device_id: str, outage: Outage) -> None:
        d = self.devices[device_id]
        pending = len(self.live[device_id].agent.outbox.pending) if device_id in self.live else 0
        log.info("%s: link down for %.1fs with %d update(s) in its outbox", device_id, outage.seconds, pending)
        self.stop([device_id])
        d.events.append({"event": "outage", "round": outage.round, "seconds": outage.seconds, "outbox": pending})
        if self.closing.wait(outage.seconds):
            return
        with self.lock:
            self.outages.pop((device_id, outage.round), None)
            back = self.wanted is None or device_id in self.wanted
        if back:  # not when a later round's cohort no longer includes it
            self.start(device_id, outage.round)
            d.events.append({"event": "reconnect", "round": outage.round})

    def end_round(self, rnd: int, cohort: list[str]) -> None:
        """Cohort mode, at a round's close: take its devices offline and forget its outages (planned ones that
        never fired, and running ones, whose devices then come back only if a later cohort wants them)."""
        with self.lock:
            for key in [k for k in self.outages if k[1] == rnd]:
                del self.outages[key]
            self.wanted = set()
        self.stop(cohort)

    def close(self) -> None:
        self.closing.set()
        for t in self.timers:
            t.join(timeout=30)
        self.stop()

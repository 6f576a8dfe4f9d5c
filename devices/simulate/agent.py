"""A device agent with a simulated body: slower steps, a resource trace, link delay, outages, byte meter.

Only observation and the network are simulated: the agent's protocol, training (ExecuTorch), budget
governor, outbox and checkpoints are the real `edge_runtime.agent.DeviceAgent`.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from devices.simulate.traces import TraceSource
from edge_runtime.agent import DeviceAgent, DeviceConfig

# ExecuTorch's first load_method (XNNPACK/cpuinfo initialisation) deadlocked when two agent threads of one
# process loaded programs at once (seen in a 1000-device run): until one load has finished, loading is
# serialised; after that, agents load in parallel.
LOAD_LOCK = threading.Lock()
WARM = threading.Event()


@contextlib.contextmanager
def first_load(agent: DeviceAgent | None = None) -> Iterator[None]:
    """Holds LOAD_LOCK while no agent of this process has loaded a program yet (then WARM is set)."""
    if WARM.is_set():
        yield
        return
    with LOAD_LOCK:
        yield
        if agent is not None and getattr(agent, "active", None) is not None:
            WARM.set()


class Meter:
    """Thread-safe byte counters, keyed by (round, kind)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[tuple[int, str]] = Counter()
        self.round = 1

    def add(self, kind: str, n_bytes: int) -> None:
        with self._lock:
            self.counts[(self.round, kind)] += n_bytes

    def of_round(self, rnd: int) -> dict[str, int]:
        with self._lock:
            return {k: v for (r, k), v in self.counts.items() if r == rnd}


@dataclass(frozen=True)
class Body:
    """What is simulated about one device (beyond its profile's budget)."""

    profile: str
    step_s: float  # extra seconds per training step: a board slower than this host
    link_delay_s: float  # an update leaves this long after it is queued
    trace: TraceSource


def _kind(topic: str) -> str:
    return topic.rsplit("/", 1)[-1]


class SimAgent(DeviceAgent):
    """`DeviceAgent` + body. `outage_after_update` (set by the fleet) takes the device offline right after
    it queues an update and before the update is sent; `went_down(agent)` is then called once."""

    def __init__(
        self, cfg: DeviceConfig, x: np.ndarray, y: np.ndarray, body: Body, meter: Meter,
        went_down: Callable[[SimAgent], None] | None = None,
    ) -> None:  # fmt: skip
        with first_load(self):  # restores the active release (loads its programs)
            super().__init__(cfg, x, y, source_reading=body.trace)
        self.body, self.meter, self.went_down = body, meter, went_down
        self.outage_after_update = False
        self.down = False
        self._pending_since: float | None = None
        publish = self.link.publish

        def counted(topic: str, payload: bytes, retain: bool = False) -> bool:
            ok = publish(topic, payload, retain)
            if ok:
                meter.add(f"up_{_kind(topic)}", len(payload))
            return ok

        self.link.publish = counted  # type: ignore[method-assign]

    def handle(self, topic: str, payload: bytes) -> None:
        if topic:
            release = topic in (self.topics.model_latest, self.topics.model_lean)
            self.meter.add("down_" + ("release" if release else _kind(topic)), len(payload))
        super().handle(topic, payload)

    def on_release(self, payload: bytes) -> None:
        with first_load(self):
            super().on_release(payload)

    def work(self) -> bool:
        stepped = super().work()
        if stepped:
            self.body.trace.on_step()
            if self.body.step_s > 0:
                time.sleep(self.body.step_s)
        return stepped

    def flush_outbox(self) -> None:
        if not self.outbox.pending:
            self._pending_since = None
            return
        if self.down:
            return
        if self.outage_after_update:
            self.down = True
            if self.went_down:
                self.went_down(self)
            return
        now = time.monotonic()
        self._pending_since = self._pending_since or now
        if now - self._pending_since >= self.body.link_delay_s:
            super().flush_outbox()

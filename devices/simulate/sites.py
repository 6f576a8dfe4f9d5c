"""`simulate --sites K`: the hierarchy on one machine (protocol v1.4, docs/scale.md).

K site mosquittos, each bridged to the core mosquitto the coordinator uses (`edgelearn.broker.bridge_config`, as
`edgelearn broker config --bridge-to` writes it), one relay per site (`coordinator.relay`, in a thread of this
process), and the devices spread over the sites in turn: device k talks to site k mod K only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from coordinator.relay import Relay, RelayConfig
from edgelearn.broker import Mosquitto, bridge_config


@dataclass
class Sites:
    brokers: list[Mosquitto] = field(default_factory=list)
    relays: list[tuple[threading.Thread, threading.Event]] = field(default_factory=list)

    def url_of(self, device_index: int) -> str:
        """The broker of device number `device_index` (devices go to the sites in turn)."""
        return self.brokers[device_index % len(self.brokers)].url

    def stop(self) -> None:
        for _, stop in self.relays:
            stop.set()
        for thread, _ in self.relays:
            thread.join(timeout=30)
        for b in self.brokers:
            b.stop()


def start_sites(k: int, core_url: str, fleet: str, work: Path, flush_s: float = 5.0) -> Sites:
    """Start K bridged site brokers and their relays (state in work/site{i}, work/relay{i})."""
    sites = Sites()
    try:
        for i in range(k):
            broker = Mosquitto(work / f"site{i}", extra=bridge_config(core_url, fleet, f"site{i}"))
            sites.brokers.append(broker.start())
            relay = Relay(RelayConfig(broker.url, fleet, f"site{i}", work / f"relay{i}", flush_s=flush_s))
            stop = threading.Event()
            thread = threading.Thread(target=relay.run, args=(stop,), name=f"relay-site{i}", daemon=True)
            thread.start()
            sites.relays.append((thread, stop))
    except BaseException:
        sites.stop()
        raise
    return sites

"""`edgelearn demo`: export → broker → coordinator → N devices → R FedAvg rounds, all in one process."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from edgelearn.bundle import verify_bundle
from edgelearn.protocol import LocalConfig

log = logging.getLogger(__name__)


DEMO_PROFILES = (("rpi5", 0.5), ("jetson-orin-nano", 0.5))


def run_demo(
    devices: int = 4,
    rounds: int = 5,
    broker: str = "embedded",
    workdir: Path | None = None,
    say: Callable[[str], None] = print,
) -> dict:
    """A short `edgelearn simulate` run: export, broker, coordinator, N simulated boards with non-IID data
    (label skew), R FedAvg rounds; every device in every round. Returns the simulation report."""
    from devices.simulate.run import SimConfig, simulate

    t0 = time.monotonic()
    work = workdir or Path(tempfile.mkdtemp(prefix="edgelearn-demo-"))
    say(f"[demo] a short `edgelearn simulate` run in {work}: export → broker → coordinator + {devices} devices "
        f"({', '.join(p for p, _ in DEMO_PROFILES)}) → {rounds} FedAvg rounds")  # fmt: skip
    say("[demo] broker: " + ("embedded amqtt (MQTT 3.1.1, zero setup)" if broker == "embedded" else broker))
    cfg = SimConfig(
        devices=devices, profiles=DEMO_PROFILES, rounds=rounds, broker=broker, out=work, min_updates=devices,
        local=LocalConfig(steps=40, batch_size=32, lr=0.2), round_timeout_s=120, outage_rate=0.0,
        battery_fraction=0.0, ambient_spread_c=0.0, fleet="demo",
    )  # fmt: skip
    report = simulate(cfg, say=say)
    first = verify_bundle(work / "bundle").metrics.get("accuracy_pte", float("nan"))
    accuracy = [f"{r['accuracy']:.3f}" for r in report["rounds"] if r["accuracy"] is not None]
    say(f"[demo] done: {len(report['rounds'])} rounds in {time.monotonic() - t0:.1f}s; held-out accuracy of the "
        f"int8 .pte: v1 {first:.3f} → {' → '.join(accuracy)}; report.json and plots in {work}")  # fmt: skip
    return report

"""`edgelearn demo`: export → broker → coordinator → N devices → R FedAvg rounds, all in one process."""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from devices.simulate.run import SimConfig, simulate
from edgelearn.bundle import load_weights, verify_bundle
from edgelearn.protocol import LocalConfig
from models.charlm import STUDENT, CharLM, generate

log = logging.getLogger(__name__)


DEMO_PROFILES = (("rpi5", 0.5), ("jetson-orin-nano", 0.5))
DEMO_PROMPT = b"ROMEO:\n"
DEMO_SETTINGS: dict[str, dict[str, Any]] = {  # what each model's demo changes in the simulation
    "digits-mlp": {"local": LocalConfig(steps=40, batch_size=32, lr=0.2)},
    "char-lm": {"model": "char-lm", "export_minutes": 0.5},  # the rest: simulate's char-lm defaults
}


def run_demo(
    devices: int = 4,
    rounds: int = 5,
    broker: str = "embedded",
    workdir: Path | None = None,
    say: Callable[[str], None] = print,
    model: str = "digits-mlp",
) -> dict:
    """A short `edgelearn simulate` run: export, broker, coordinator, N simulated boards, R FedAvg rounds; every
    device in every round. digits-mlp: non-IID label skew; char-lm: one Shakespeare speaker per device, and a
    sample of generated text from the first and the last release. Returns the simulation report."""
    t0 = time.monotonic()
    work = workdir or Path(tempfile.mkdtemp(prefix="edgelearn-demo-"))
    say(f"[demo] a short `edgelearn simulate --model {model}` run in {work}: export → broker → coordinator + "
        f"{devices} devices ({', '.join(p for p, _ in DEMO_PROFILES)}) → {rounds} FedAvg rounds")  # fmt: skip
    say("[demo] broker: " + ("embedded amqtt (MQTT 3.1.1, zero setup)" if broker == "embedded" else broker))
    cfg = SimConfig(
        devices=devices, profiles=DEMO_PROFILES, rounds=rounds, broker=broker, out=work, min_updates=devices,
        round_timeout_s=120, outage_rate=0.0, battery_fraction=0.0, ambient_spread_c=0.0, fleet="demo",
        **DEMO_SETTINGS[model],
    )  # fmt: skip
    report = simulate(cfg, say=say)
    first = verify_bundle(work / "bundle").metrics.get("accuracy_pte", float("nan"))
    accuracy = [f"{r['accuracy']:.3f}" for r in report["rounds"] if r["accuracy"] is not None]
    if model == "char-lm":
        last = report["rounds"][-1]["version"] if report["rounds"] else 1
        say_samples(work / "bundle", work / "state" / "coordinator" / "releases" / f"v{last}", last, say)
        ppl = [f"{r['perplexity']:.2f}" for r in report["rounds"] if r.get("perplexity") is not None]
        first_ppl = verify_bundle(work / "bundle").metrics.get("perplexity_pte", float("nan"))
        say(f"[demo] perplexity of the int8 .pte on the export text's held-out tail (200 windows): v1 "
            f"{first_ppl:.2f} → {' → '.join(ppl)}")  # fmt: skip
    say(f"[demo] done: {len(report['rounds'])} rounds in {time.monotonic() - t0:.1f}s; held-out accuracy of the "
        f"int8 .pte: v1 {first:.3f} → {' → '.join(accuracy)}; report.json and plots in {work}")  # fmt: skip
    return report


def say_samples(first: Path, last: Path, version: int, say: Callable[[str], None], n_bytes: int = 160) -> None:
    """The same prompt continued by release 1 and by release `version` (eager fp32 weights, temperature 0.8)."""
    for label, bundle in (("v1", first), (f"v{version}", last)):
        net = CharLM(STUDENT)
        net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in load_weights(bundle).items()})
        text = generate(net, DEMO_PROMPT, n_bytes).decode("utf-8", "replace")
        say(f"[demo] {label} writes:\n" + "\n".join("    " + line for line in text.splitlines()))

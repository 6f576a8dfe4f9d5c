"""`edgelearn demo`: export → broker → coordinator → N devices → R FedAvg rounds, all in one process."""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from safetensors.numpy import save_file

from coordinator.server import Coordinator, CoordinatorConfig, RoundSummary
from edge_runtime.budget import Budget
from edgelearn.broker import EmbeddedBroker, Mosquitto
from edgelearn.protocol import LocalConfig
from export.data import Split, load_digits, shard_non_iid

log = logging.getLogger(__name__)
# The demo's devices share one process: a per-process RSS limit would measure the whole fleet, so it is off.
SHARED_PROCESS_BUDGET = Budget(max_rss_mb=None)


def write_shards(
    out: Path, n_devices: int, server_fraction: float, classes_per_device: int = 4, seed: int = 0
) -> list[Path]:
    """Non-IID device shards of the digits pool (+ test.safetensors) as safetensors files {x, y}."""
    data = load_digits(server_fraction, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, shard in enumerate(shard_non_iid(data.pool, n_devices, classes_per_device, seed)):
        paths.append(out / f"device-{k}.safetensors")
        save_file({"x": shard.x, "y": shard.y}, str(paths[-1]))
    save_file({"x": data.test.x, "y": data.test.y}, str(out / "test.safetensors"))
    return paths


def load_shard(path: Path) -> Split:
    from safetensors.numpy import load_file

    t = load_file(str(path))
    if "x" not in t or "y" not in t or len(t["x"]) != len(t["y"]) or len(t["y"]) == 0:
        raise ValueError(f"{path}: expected non-empty tensors 'x' and 'y' of equal length")
    return Split(t["x"].astype("float32"), t["y"].astype("int64"))


def run_demo(
    devices: int = 4,
    rounds: int = 5,
    broker: str = "embedded",
    workdir: Path | None = None,
    server_fraction: float = 0.05,
    local: LocalConfig | None = None,
    say: Callable[[str], None] = print,
) -> list[RoundSummary]:
    """Run the whole fleet end to end and return one summary per round."""
    from export.pipeline import ExportConfig, export_bundle

    t0 = time.monotonic()
    work = workdir or Path(tempfile.mkdtemp(prefix="edgelearn-demo-"))
    say(f"[demo] working in {work}")
    say("[demo] 1/4 export: teacher → distilled student → int8 XNNPACK infer.pte + train.pte")
    manifest = export_bundle(ExportConfig(server_fraction=server_fraction, compare=False), work / "bundle")
    say(
        f"[demo]     release v1: student {manifest.metrics['student_params']} params, held-out accuracy "
        f"{manifest.metrics['accuracy_pte']:.3f} (.pte)"
    )
    shards = write_shards(work / "data", devices, server_fraction)
    brk, v311 = _start_broker(broker, work)
    say(f"[demo] 2/4 broker: {brk.url} ({'embedded amqtt, MQTT 3.1.1' if v311 else 'mosquitto, MQTT 5'})")
    summaries: list[RoundSummary] = []
    try:
        ccfg = CoordinatorConfig(
            brk.url, "demo", work / "bundle", work / "coordinator", min_updates=devices, round_timeout_s=120,
            local=local or LocalConfig(steps=40, batch_size=32, lr=0.2), max_rounds=rounds, mqtt_v311=v311,
        )  # fmt: skip
        agents = _make_agents(brk.url, v311, work, shards)
        say(
            f"[demo] 3/4 fleet: coordinator + {devices} devices (non-IID shards of "
            f"{', '.join(str(len(a.y)) for a in agents)} samples), {rounds} rounds"
        )
        _run_fleet(ccfg, agents, lambda s: (summaries.append(s), say(round_line(s))))
    finally:
        brk.stop()
    final = summaries[-1].metrics.get("accuracy_pte", float("nan")) if summaries else float("nan")
    say(
        f"[demo] 4/4 done: {len(summaries)} rounds in {time.monotonic() - t0:.1f}s, final held-out accuracy {final:.3f}"
    )
    return summaries


def round_line(s: RoundSummary) -> str:
    return (
        f"[demo] round {s.round}: participants {', '.join(s.participants)} · accepted {s.accepted} · "
        f"rejected {sum(s.rejected.values())} · release v{s.version} held-out accuracy "
        f"{s.metrics.get('accuracy_pte', float('nan')):.3f} ({s.seconds:.1f}s)"
    )


def _make_agents(url: str, v311: bool, work: Path, shards: list[Path]) -> list:
    from edge_runtime.agent import DeviceAgent, DeviceConfig

    return [
        DeviceAgent(
            DeviceConfig(url, "demo", f"dev{k}", work / f"dev{k}", mqtt_v311=v311, budget=SHARED_PROCESS_BUDGET),
            *_xy(load_shard(p)),
        )
        for k, p in enumerate(shards)
    ]


def _run_fleet(ccfg: CoordinatorConfig, agents: list, on_round: Callable[[RoundSummary], object]) -> None:
    """Devices in threads, the coordinator on this thread until its last round; then everything stops."""
    from export.pipeline import rebuild_bundle

    coord = Coordinator(ccfg, rebuild_bundle, on_round)
    stop = threading.Event()
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    try:
        for t in threads:
            t.start()
        coord.run(stop)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)


def _xy(s: Split) -> tuple:
    return s.x, s.y


def _start_broker(kind: str, work: Path) -> tuple[EmbeddedBroker | Mosquitto, bool]:
    if kind == "embedded":
        return EmbeddedBroker().start(), True
    if kind == "mosquitto":
        return Mosquitto(work / "mosquitto").start(), False
    raise ValueError(f"unknown broker {kind!r}: use embedded or mosquitto")

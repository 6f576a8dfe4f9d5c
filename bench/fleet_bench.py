"""Fleet benchmark: one synchronous round of N = 10, 100, 1000 simulated devices through mosquitto on loopback.

    .venv/bin/python bench/fleet_bench.py [--bundle DIR]   # exports the digits bundle if none is given

The coordinator is the real `edgelearn coordinator` process (spool fsync + SQLite commit per update,
the release built as it always is: the same programs with a new data file, no lowering). Simulated
devices are one MQTT client publishing N precomputed updates on N device topics and counting the acks.
Reported per N: collect seconds (first publish → N-th ack), release seconds (first publish → release v2
received), coordinator CPU seconds over each phase (psutil), CPU ms per update.
Writes bench/results/fleet.json and fleet.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgelearn.broker import Mosquitto, size_broker  # noqa: E402
from edgelearn.bundle import read_lean_release  # noqa: E402
from edgelearn.mqtt import MqttLink  # noqa: E402
from edgelearn.protocol import Ack, RoundMsg, Topics, Update, encode_update  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FLEET_SIZES = (10, 100, 1000)


def wait(q: queue.Queue, pred, timeout_s: float) -> tuple[str, bytes]:
    end = time.monotonic() + timeout_s
    while True:
        topic, payload = q.get(timeout=max(0.01, end - time.monotonic()))
        if pred(topic, payload):
            return topic, payload


def one_round(broker: Mosquitto, bundle: Path, n: int, work: Path) -> dict:
    fleet = f"bench{uuid.uuid4().hex[:8]}"
    t = Topics(fleet)
    q: queue.Queue[tuple[str, bytes]] = queue.Queue()
    link = MqttLink(broker.url, f"sim-{fleet}", [t.model_latest, t.rounds_current, t.all_devices("ack")],
                    lambda tp, p: q.put((tp, p)), session_expiry_s=0)  # fmt: skip
    assert link.start(wait_s=10)
    args = ["--broker", broker.url, "--fleet", fleet, "--bundle", str(bundle), "--state", str(work / fleet)]
    log = (work / f"{fleet}.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "coordinator", *args, "--min-updates", str(n),
                             "--round-timeout", "600"], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)  # fmt: skip
    try:
        _, rel = wait(q, lambda tp, p: tp == t.model_latest, 120)
        _, rnd = wait(q, lambda tp, p: tp == t.rounds_current, 60)
        manifest, files = read_lean_release(rel)
        from safetensors.numpy import load

        theta = load(files["weights.safetensors"])
        r = RoundMsg.decode(rnd)
        rng = np.random.default_rng(0)
        payloads = [
            (f"sim{k}", encode_update(Update(f"u{k}", f"sim{k}", manifest.model_id, r.base_version, 10,
             {n_: rng.normal(0, 1e-3, theta[n_].shape).astype(np.float32) for n_ in manifest.trainable}, r.round)))
            for k in range(n)
        ]  # fmt: skip
        cp = psutil.Process(proc.pid)
        cpu0, t0 = sum(cp.cpu_times()[:2]), time.monotonic()
        for dev, p in payloads:
            link.publish(t.device(dev, "update"), p)
        acks = 0
        while acks < n:
            _, p = wait(q, lambda tp, p: tp.endswith("/ack"), 300)
            acks += Ack.decode(p).status == "accepted"
        cpu1, t1 = sum(cp.cpu_times()[:2]), time.monotonic()
        wait(q, lambda tp, p: tp == t.model_latest and read_lean_release(p)[0].version == 2, 300)
        cpu2, t2 = sum(cp.cpu_times()[:2]), time.monotonic()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
        link.stop()
    return {
        "devices": n,
        "update_bytes": len(payloads[0][1]),
        "collect_seconds": t1 - t0,
        "release_seconds": t2 - t0,
        "rebuild_seconds": t2 - t1,
        "coordinator_cpu_collect_s": cpu1 - cpu0,
        "coordinator_cpu_release_s": cpu2 - cpu1,
        "cpu_ms_per_update": 1000 * (cpu1 - cpu0) / n,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| devices | update bytes | collect s | release s (aggregate + build + publish) | coordinator CPU s (collect) "
        "| CPU ms / update | coordinator CPU s (aggregate + rebuild) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['devices']} | {r['update_bytes']} | {r['collect_seconds']:.2f} | {r['release_seconds']:.2f} "
            f"| {r['coordinator_cpu_collect_s']:.2f} | {r['cpu_ms_per_update']:.1f} "
            f"| {r['coordinator_cpu_release_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=None, help="bundle directory (default: export digits-mlp)")
    ap.add_argument("--sizes", type=int, nargs="+", default=list(FLEET_SIZES))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleet-bench-") as tmp:
        work = Path(tmp)
        bundle = a.bundle
        if bundle is None:
            from export.pipeline import ExportConfig, export_bundle

            bundle = work / "bundle"
            export_bundle(ExportConfig(server_fraction=0.05, epochs=30), bundle)
        broker = Mosquitto(work / "mosquitto", sizing=size_broker(max(a.sizes), 64 * 1024)).start()
        try:
            rows = []
            for n in a.sizes:
                rows.append(one_round(broker, bundle, n, work))
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
        finally:
            broker.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores (shared with other jobs)"
    (RESULTS / "fleet.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    (RESULTS / "fleet.md").write_text(
        f"One synchronous round through mosquitto on loopback ({machine}); digits-mlp updates; "
        "coordinator = `edgelearn coordinator` process (fsync + SQLite commit per update).\n\n" + markdown(rows)
    )
    print(f"wrote {RESULTS / 'fleet.json'} and fleet.md")


if __name__ == "__main__":
    main()

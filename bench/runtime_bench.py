"""Device runtime benchmark → bench/results/runtime.json + runtime.md.

    python bench/runtime_bench.py [--bundle DIR ...] [--steps N]

Per bundle (default: a digits-mlp bundle exported to a temp folder): training throughput of each engine
inside the agent's learner (budget checks, replay, store reads, checkpoints) vs a bare eager loop on one
fixed batch; batch-1 inference latency of infer.pte; release activation time (how long a global change
takes to reach the served program). Once: peak RSS of a device process vs the floor of
`import torch; import executorch.runtime`; CPU cost of the budget monitor; time from a CPU hog starting
to training pausing. All ratios come from one run on one (possibly shared) machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edge_runtime.agent import example_batch, load_release
from edge_runtime.budget import Budget, Governor, PsutilSource
from edge_runtime.engines import default_engine, make_engine
from edge_runtime.learner import Job, Learner
from edge_runtime.samples import SampleStore
from edgelearn.bundle import TRAIN_PTE, load_weights, verify_bundle

RESULTS = Path(__file__).resolve().parent / "results"
BATCH = 32
WINDOW_S = 1.0  # every throughput measurement stops after `steps` or this long, so all get the same window


def random_batch(manifest, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    x0 = example_batch(manifest)[0]
    if manifest.task == "lm":
        vocab = int(manifest.input.get("vocab", 96))
        x = rng.integers(0, vocab, (n, *x0.shape[1:]))
        return x, np.roll(x, -1, axis=1)
    return rng.uniform(0, 16, (n, *x0.shape[1:])).astype(np.float32), rng.integers(0, 10, n)


def bare_eager_sps(manifest, weights, x, y, steps: int) -> float:
    """The reference: the student in a bare loop on one fixed batch, manual SGD."""
    from models.registry import TrainStep, get_spec

    step = TrainStep(get_spec(manifest.model_id).make_student())
    step.net.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    params = [p for p in step.parameters() if p.requires_grad]
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.perf_counter()
    done = 0
    while done < steps and (done % 64 or time.perf_counter() - t0 < WINDOW_S):
        done += 1
        loss = step(xt, yt)[0]
        for p, g in zip(params, torch.autograd.grad(loss, params), strict=True):
            p.data.sub_(g, alpha=0.01)
    return done * len(y) / (time.perf_counter() - t0)


def learner_sps(bundle: Path, manifest, weights, kind: str, xs, ys, steps: int) -> float:
    """The agent's path: store → replay mix → budget check (real psutil) → engine step → periodic checkpoint."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SampleStore(Path(tmp) / "samples", max_samples=len(ys) + 1)
        for i in range(len(ys)):
            store.add(xs[i], ys[i], flush_when_full=False)
        store.flush()
        train_pte = (bundle / TRAIN_PTE).read_bytes() if TRAIN_PTE in manifest.files else None
        engine = make_engine(kind, manifest.model_id, manifest.task, weights, train_pte, example_batch(manifest))
        # every budget check runs as in the agent; no RSS cap: this process holds several models at once
        gov = Governor(Budget(max_rss_mb=None, interval_s=0.5), PsutilSource())
        learner = Learner(engine, store, Path(tmp), gov, replay_size=2000, checkpoint_every_s=5.0)
        learner.start(Job(1, manifest.version, steps, BATCH, 0.01), weights)
        learner.step()  # warm-up (first reading)
        t0 = time.perf_counter()
        while learner.step() == "stepped" and (learner.job.steps_done % 64 or time.perf_counter() - t0 < WINDOW_S):
            pass
        dt = time.perf_counter() - t0
        learner.save()
        return (learner.job.steps_done - 1) * BATCH / dt


def inference_us(bundle: Path, manifest, n: int = 1000) -> float:
    active = load_release(bundle, manifest)
    x = example_batch(manifest)[0]
    for _ in range(50):
        active.infer.predict(x)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        active.infer.predict(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def activation_ms(bundle: Path, manifest, repeats: int = 5) -> float:
    """Verify + load + smoke-test a release: the delay before a new global model is served."""
    from edge_runtime.release import ReleaseStore
    from edgelearn.bundle import pack_release

    payload = pack_release(bundle)
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            store = ReleaseStore(Path(tmp) / str(r))
            t0 = time.perf_counter()
            m = store.install(payload)
            load_release(store.path(m.version), m)
            store.activate(m.version)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_bundle(bundle: Path, steps: int) -> dict:
    manifest = verify_bundle(bundle)
    weights = load_weights(bundle)
    rng = np.random.default_rng(0)
    x, y = random_batch(manifest, BATCH, rng)
    xs, ys = random_batch(manifest, 4096, rng)
    torch.set_num_threads(1)
    bare, engines = 0.0, {"eager": 0.0, "executorch": 0.0}
    for _ in range(5):  # alternate, keep the best of each: the machine is shared and noisy
        bare = max(bare, bare_eager_sps(manifest, weights, x, y, steps))
        for kind in engines:
            engines[kind] = max(engines[kind], learner_sps(bundle, manifest, weights, kind, xs, ys, steps))
    default = default_engine(manifest.model_id)
    return {
        "model_id": manifest.model_id,
        "target": manifest.target,
        "batch_size": BATCH,
        "bare_eager_samples_per_s": round(bare, 1),
        "agent_samples_per_s": {k: round(v, 1) for k, v in engines.items()},
        "default_engine": default,
        "faster_engine": max(engines, key=engines.get),
        "default_vs_bare": round(engines[default] / bare, 3),
        "inference_us_median": round(inference_us(bundle, manifest), 1),
        "activation_ms_median": round(activation_ms(bundle, manifest), 1),
    }


def peak_rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report the bench's own peak.
RSS = "import re; print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) / 1024)"
FLOOR = f"import torch, executorch.runtime\n{RSS}"
LEAN_FLOOR = f"from edgelearn.et_import import runtime_modules\nruntime_modules()\n{RSS}"
DEVICE = (
    """
import sys, tempfile, numpy as np
from pathlib import Path
from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.learner import Job
from edgelearn.bundle import pack_release
bundle = Path(sys.argv[1])
rng = np.random.default_rng(0)
x, y = rng.uniform(0, 16, (2000, 64)).astype(np.float32), rng.integers(0, 10, 2000)
agent = DeviceAgent(DeviceConfig("mqtt://127.0.0.1:1", "f", "d", Path(tempfile.mkdtemp()) / "s"), x, y)
agent.on_release(pack_release(bundle))
agent.learner.start(Job(1, agent.version, 300, 32, 0.01), agent.active.weights)
while agent.learner.step() in ("stepped", "paused"):
    pass
agent.finish_job()
for _ in range(200):
    agent.active.infer.predict(x[:1])
"""
    + RSS
)


def monitor_cpu_fraction(interval_s: float = 0.5, calls: int = 200) -> float:
    """CPU seconds per reading × readings per second = share of one core the monitor costs."""
    src = PsutilSource()
    t0 = time.process_time()
    for _ in range(calls):
        src()
    return (time.process_time() - t0) / calls / interval_s


HOG = "import time\nend = time.time() + 20\nwhile time.time() < end: pass"


def hog_to_pause_s(bundle: Path) -> dict:
    """Train, read the background load, set the CPU limit halfway between it and 100 %, start one busy
    process per core and time until the learner reports 'paused'."""
    manifest = verify_bundle(bundle)
    weights = load_weights(bundle)
    xs, ys = random_batch(manifest, 4096, np.random.default_rng(0))
    with tempfile.TemporaryDirectory() as tmp:
        store = SampleStore(Path(tmp) / "samples")
        for i in range(len(ys)):
            store.add(xs[i], ys[i], flush_when_full=False)
        store.flush()
        engine = make_engine("eager", manifest.model_id, manifest.task, weights, None, example_batch(manifest))
        learner = Learner(engine, store, Path(tmp), Governor(Budget(interval_s=0.5)), checkpoint_every_s=60)
        learner.start(Job(1, manifest.version, 10**9, BATCH, 0.01), weights)
        t_end = time.monotonic() + 2.1
        while time.monotonic() < t_end:
            learner.step()
        background = learner.governor.reading.other_cpu_percent
        if background > 90:
            return {"seconds": None, "note": f"machine too busy: other processes use {background:.0f} % CPU"}
        limit = (background + 100) / 2
        learner.governor = Governor(Budget(max_cpu_percent=limit, interval_s=0.5))
        assert learner.step() == "stepped"
        hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(os.cpu_count() or 1)]
        t0 = time.monotonic()
        try:
            while learner.step() != "paused" and time.monotonic() - t0 < 15:
                pass
            r = learner.governor.reading
            return {
                "seconds": round(time.monotonic() - t0, 3),
                "background_cpu_percent": round(background, 1),
                "limit_cpu_percent": round(limit, 1),
                "other_cpu_percent_at_pause": round(r.other_cpu_percent, 1),
            }
        finally:
            for h in hogs:
                h.kill()
                h.wait()


def markdown(res: dict) -> str:
    lines = [
        "# Device runtime benchmark",
        "",
        f"`python bench/runtime_bench.py` on {res['machine']} (shared with other jobs: ratios are within one run).",
        "",
        "| model | bare eager (samples/s) | agent eager | agent executorch | default | default / bare (≥ 0.8) "
        "| infer.pte batch-1 (µs) | release activation (ms) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in res["models"]:
        a = m["agent_samples_per_s"]
        lines.append(
            f"| {m['model_id']} | {m['bare_eager_samples_per_s']} | {a['eager']} | {a['executorch']} | "
            f"{m['default_engine']} | {m['default_vs_bare']} | {m['inference_us_median']} | "
            f"{m['activation_ms_median']} |"
        )
    r, h = res["rss"], res["hog_to_pause"]
    lines += [
        "",
        "| measure | value | target |",
        "|---|---|---|",
        f"| peak RSS, floor `import torch, executorch.runtime` (MB) | {r['floor_mb']} | |",
        f"| peak RSS, torch + ExecuTorch runtime without the exporter (MB) | {r['lean_floor_mb']} | |",
        f"| peak RSS, device process: release loaded, 300 steps, 200 inferences (MB) | {r['device_mb']} | |",
        f"| device / floor | {r['ratio']} | ≤ 1.3 |",
        f"| monitor CPU (share of one core, 0.5 s interval) | {res['monitor_core_fraction']} | ≤ 0.01 |",
        f"| CPU hog start → training paused (s) | {h['seconds']} | ≤ 2 |",
        "",
    ]
    return "\n".join(lines)


def default_bundle(tmp: Path) -> Path:
    from export.pipeline import ExportConfig, export_bundle

    out = tmp / "digits-mlp"
    export_bundle(ExportConfig(server_fraction=0.05, epochs=10), out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, action="append", help="bundle dir (repeat; default: export digits-mlp)")
    p.add_argument(
        "--steps", type=int, default=2000, help="max steps per measurement (default 2000; each also stops after 1 s)"
    )
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundles = a.bundle or [default_bundle(Path(tmp))]
        models = [bench_bundle(b, a.steps) for b in bundles]
        floor, lean = peak_rss_mb(FLOOR), peak_rss_mb(LEAN_FLOOR)
        device = peak_rss_mb(DEVICE.replace("sys.argv[1]", repr(str(bundles[0]))))
        res = {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "shared_machine": True,
            "models": models,
            "rss": {
                "floor_mb": round(floor, 1),
                "lean_floor_mb": round(lean, 1),
                "device_mb": round(device, 1),
                "ratio": round(device / floor, 3),
            },
            "monitor_core_fraction": round(monitor_cpu_fraction(), 5),
            "hog_to_pause": hog_to_pause_s(bundles[0]),
            "bench_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(res, indent=2) + "\n")
    (RESULTS / "runtime.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()

"""Release benchmark: building, shipping and activating a release with and without lowering, digits and char-lm.

    .venv/bin/python bench/release_bench.py [--lm-minutes 0.5]

For each model a release 1 is exported (char-lm: `--lm-minutes` of training on the shipped corpus), then:
- build s: release v+1 from moved weights by the coordinator's path (`coordinator/release.py`, data only)
  in a fresh process (`cold`: imports + test split + first build) and warm (median of 5), next to the
  format 1 path that lowers again (`export.pipeline.rebuild_bundle`, median of 2);
- coordinator peak RSS (VmHWM) of a fresh process that builds 3 releases either way;
- bytes per device per release: the lean archive (protocol v1.2), the same with an int8 delta
  (`--delta-releases`), the full archive, the weights file;
- device activation s: install + load + smoke test + activate of a lean archive (median of 5), and of the full one;
- agreement of the data-only program with a program lowered afresh from the same weights (test split).
Writes bench/results/release.json and release.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgelearn.bundle import WEIGHTS, load_weights, pack_release  # noqa: E402

RESULTS = ROOT / "bench" / "results"
CREATED = "2026-12-01T00:00:00Z"
BUILD_SCRIPT = """
import sys, time, json
from pathlib import Path
import numpy as np
t0 = time.perf_counter()
mode, prev, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
if mode == "data":
    from coordinator.release import release_builder
    rebuild = release_builder()
else:
    from export.pipeline import rebuild_bundle as rebuild
from edgelearn.bundle import load_weights
w = load_weights(prev)
times = []
for v in range(3):
    rng = np.random.default_rng(v)
    new = {k: (a + 0.01 * rng.standard_normal(a.shape)).astype(np.float32) for k, a in w.items()}
    t = time.perf_counter()
    rebuild(prev, new, 2 + v, out / f"v{2 + v}", created="2026-12-01T00:00:00Z")
    times.append(time.perf_counter() - t)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]  # not ru_maxrss: kept across exec
print(json.dumps({"cold_s": time.perf_counter() - t0, "times_s": times, "max_rss_mb": int(hwm.split()[1]) / 1024,
                  "exporter_loaded": "executorch.exir" in sys.modules}))
"""


def moved(weights: dict[str, np.ndarray], seed: int, scale: float = 0.01) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}


def export(model: str, out: Path, lm_minutes: float) -> Path:
    from export.pipeline import ExportConfig, export_bundle

    if model == "digits-mlp":
        cfg = ExportConfig(model_id=model, server_fraction=0.2, epochs=30, compare=False)
    else:
        cfg = ExportConfig(model_id=model, train_minutes=lm_minutes, compare=False)
    export_bundle(cfg, out)
    return out


def build_process(mode: str, bundle: Path, work: Path) -> dict:
    """A fresh interpreter building 3 releases from `bundle` by `mode` (data | relower)."""
    out = subprocess.run([sys.executable, "-c", BUILD_SCRIPT, mode, str(bundle), str(work / mode)], cwd=ROOT,
                         capture_output=True, text=True, timeout=1800, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def activation(bundle: Path, v2: Path, work: Path, lean: bool) -> float:
    """Median seconds of install + load + smoke test + activate on a device that runs release 1."""
    from edge_runtime.release import ReleaseStore, load_release

    times = []
    for i in range(5):
        store = ReleaseStore(work / f"dev-{lean}-{i}")
        store.install(pack_release(bundle))
        store.activate(1)
        payload = pack_release(v2, lean=lean)
        t = time.perf_counter()
        manifest = store.install(payload)
        assert manifest is not None
        load_release(store.path(manifest.version), manifest)
        store.activate(manifest.version)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def agreement(model: str, v2: Path) -> dict:
    """The data-only program of `v2` against a program lowered afresh from its weights, on the export's test split."""
    import torch

    from coordinator.release import release_test_split
    from edgelearn.programs import bundle_program, loaded_program
    from export.pipeline import ExportConfig, check_config, lower_programs
    from models.quality import program_logits

    cfg = ExportConfig(**json.loads((v2 / "export.json").read_bytes()))
    spec = check_config(cfg)
    data = release_test_split(model, (v2 / "export.json").read_bytes())
    student = spec.make_student()
    student.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(v2).items()})
    fresh = lower_programs(spec, student.eval(), cfg, spec.load_data(cfg))
    x = data.test.x
    got = program_logits(bundle_program(v2), x)
    with loaded_program(fresh["infer.pte"], fresh.get("infer.ptd")) as prog:
        ref = program_logits(prog, x)
    return {"rows": len(x), "max_abs_diff": float(np.abs(got - ref).max()),
            "argmax_agree": float((got.argmax(1) == ref.argmax(1)).mean())}  # fmt: skip


def bench_model(model: str, work: Path, lm_minutes: float) -> dict:
    from coordinator.release import release_builder

    bundle = export(model, work / "v1", lm_minutes)
    v2 = work / "v2"
    release_builder()(bundle, moved(load_weights(bundle), 0), 2, v2, created=CREATED)
    data, relower = build_process("data", bundle, work), build_process("relower", bundle, work)
    weights_b = (v2 / WEIGHTS).stat().st_size
    lean_b, full_b = len(pack_release(v2, lean=True)), len(pack_release(v2))
    release_builder(delta=True)(v2, moved(load_weights(v2), 1), 3, work / "v3-delta", created=CREATED)
    delta_b = len(pack_release(work / "v3-delta", lean=True))
    return {
        "model": model,
        "build_s": {
            "data_cold": data["cold_s"],
            "data_warm": statistics.median(data["times_s"]),
            "relower": statistics.median(relower["times_s"]),
        },
        "coordinator_max_rss_mb": {"data": data["max_rss_mb"], "relower": relower["max_rss_mb"]},
        "exporter_loaded": {"data": data["exporter_loaded"], "relower": relower["exporter_loaded"]},
        "bytes": {
            "weights": weights_b,
            "lean": lean_b,
            "full": full_b,
            "lean_over_weights": lean_b / weights_b,
            "full_over_weights": full_b / weights_b,
            "lean_delta": delta_b,
            "lean_delta_over_weights": delta_b / weights_b,
        },
        "activation_s": {"lean": activation(bundle, v2, work, True), "full": activation(bundle, v2, work, False)},
        "vs_fresh_lowering": agreement(model, v2),
    }


def write(rows: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "python": platform.python_version(),
    }
    (RESULTS / "release.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Releases without lowering (bench/release_bench.py)",
        "",
        f"Machine: {meta['machine']}. Build = round closed → release bundle written; RSS = peak (VmHWM) of a "
        "fresh coordinator-side process building 3 releases; bytes = one device's download per release.",
        "",
        "| model | build s data (cold / warm) | build s relower | coordinator RSS MB data / relower | "
        "weights B | lean archive B (× weights) | int8 delta archive B (× weights) | full archive B (× weights) | "
        "activation s lean / full | "
        "vs fresh lowering: max |Δ logit|, argmax agree |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, m, y, a, f = r["build_s"], r["coordinator_max_rss_mb"], r["bytes"], r["activation_s"], r["vs_fresh_lowering"]
        lines.append(
            f"| {r['model']} | {b['data_cold']:.2f} / {b['data_warm']:.3f} | {b['relower']:.2f} | "
            f"{m['data']:.0f} / {m['relower']:.0f} | {y['weights']} | {y['lean']} ({y['lean_over_weights']:.2f}) | "
            f"{y['lean_delta']} ({y['lean_delta_over_weights']:.2f}) | "
            f"{y['full']} ({y['full_over_weights']:.2f}) | {a['lean']:.3f} / {a['full']:.3f} | "
            f"{f['max_abs_diff']:.3g}, {f['argmax_agree']:.3f} ({f['rows']} rows) |"
        )
    (RESULTS / "release.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lm-minutes", type=float, default=0.5, help="char-lm export training minutes")
    p.add_argument("--models", nargs="+", default=["digits-mlp", "char-lm"])
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench_model(m, Path(tmp) / m, a.lm_minutes) for m in a.models]
    write(rows)


if __name__ == "__main__":
    main()

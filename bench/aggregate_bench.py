"""Aggregation benchmark: serialized updates → aggregated model, ours (safetensors + streaming fold) vs Flower.

    .venv/bin/python bench/aggregate_bench.py            # creates bench/.flwr-venv (flwr) on first use

Each measurement runs in its own process (so peak RSS is its own) on the same deterministic updates:
K=100 × 1M and K=1000 × 100k float32 parameters, 10 tensors per update. Peak memory is the rise of
VmHWM above the resident payloads (reset through /proc/self/clear_refs once they are built and one
warm-up aggregation has run: a coordinator runs many rounds, and one-time costs such as torch's thread
pool are not per-round memory). Ours runs with torch's default thread count (all cores), as the
coordinator does; the read-bandwidth limit is measured with the same threads.
Flower runs from a separate venv (never a project dependency): `parameters_to_ndarrays` on its own
serialization of the same tensors, then `flwr.server.strategy.aggregate.aggregate`.
Writes bench/results/aggregate.json and aggregate.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
FLWR_VENV = ROOT / "bench" / ".flwr-venv"
CASES = ((100, 1_000_000), (1000, 100_000))
N_TENSORS = 10
REPEATS = 7


def tensors(k: int, params: int) -> list[np.ndarray]:
    """Update k: N_TENSORS float32 tensors of params/N_TENSORS values each (same bytes in every process)."""
    rng = np.random.default_rng(1000 + k)
    return [rng.standard_normal(params // N_TENSORS, dtype=np.float32) * 0.01 for _ in range(N_TENSORS)]


def num_samples(k: int) -> int:
    return 1 + (k * 7) % 50


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def reset_peak() -> float:
    """Reset VmHWM to the current RSS (Linux clear_refs 5); returns the RSS in MB."""
    Path("/proc/self/clear_refs").write_text("5")
    return rss_mb("VmRSS")


def best_of(fn, repeats: int = REPEATS) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ---------------------------------------------------------------- workers (one process each)


def worker_ours(k_updates: int, params: int) -> dict:
    import torch

    from coordinator.aggregate import StreamingMean
    from coordinator.validate import Rules, check_update
    from coordinator.views import fp32_data_view
    from edgelearn.protocol import Update, decode_update, encode_update, read_metadata

    shapes = {f"t{i}": (params // N_TENSORS,) for i in range(N_TENSORS)}
    payloads = [
        encode_update(Update(f"u{k}", "d", "m", 1, num_samples(k), dict(zip(shapes, tensors(k, params), strict=True))))
        for k in range(k_updates)
    ]

    def run(validate: bool) -> dict[str, np.ndarray]:
        """What the coordinator does per update: (validate,) view the fp32 data, fold it."""
        acc = StreamingMean(shapes)
        rules = Rules("m", shapes, 1, None, 1e9, 0)
        for p in payloads:
            if validate:
                n = check_update("d", p, rules, set()).update.num_samples
            else:
                n = int(read_metadata(p)["num_samples"])
            acc.add_flat(fp32_data_view(p, shapes), float(n))
        return acc.result()

    run(False)  # warm-up (thread pool, lazy imports)
    base = reset_peak()
    t_e2e, out = best_of(lambda: run(False))
    peak_mb = rss_mb("VmHWM") - base
    t_validated, _ = best_of(lambda: run(True))
    decoded = [decode_update(p).deltas for p in payloads]
    payloads.clear()
    probes = fold_and_read_probes(decoded, shapes, k_updates * params)
    return {
        "seconds": t_e2e,
        "seconds_with_validation": t_validated,
        **probes,
        "peak_mb": peak_mb,
        "threads": torch.get_num_threads(),
        "checksum": float(sum(float(a.astype(np.float64).sum()) for a in out.values())),
    }


def fold_and_read_probes(decoded: list[dict], shapes: dict, n_values: int) -> dict:
    """Fold alone (pre-decoded flat updates) vs pure reads of the same bytes: one buffer (numpy asks the kernel
    for transparent huge pages on large arrays), one buffer of 4 KiB pages (an anonymous mmap, as received
    payloads are), and the K buffers themselves."""
    import mmap

    import torch

    from coordinator.aggregate import StreamingMean

    flats = [np.concatenate([d[n] for n in sorted(d)]) for d in decoded]
    decoded.clear()

    def fold_only() -> None:
        acc = StreamingMean(shapes)
        for k, d in enumerate(flats):
            acc.add_flat(d, float(num_samples(k)))

    flat = np.ones(n_values, np.float32)
    small_pages = np.frombuffer(mmap.mmap(-1, flat.nbytes), np.float32)  # THP=madvise: no huge pages here
    small_pages[:] = 1.0
    probes = {"fold": fold_only, "sep": lambda: [torch.from_numpy(d).sum() for d in flats],
              "one": lambda: torch.from_numpy(flat).sum(),
              "one_4k": lambda: torch.from_numpy(small_pages).sum()}  # fmt: skip
    best = dict.fromkeys(probes, float("inf"))
    for _ in range(REPEATS):  # interleaved, so that load from other jobs hits all probes alike
        for name, fn in probes.items():
            best[name] = min(best[name], best_of(fn, 1)[0])
    t_fold, t_read_sep, t_read = best["fold"], best["sep"], best["one"]
    return {
        "read_4k_seconds": best["one_4k"],
        "read_4k_gb_per_s": flat.nbytes / best["one_4k"] / 1e9,
        "fold_seconds": t_fold,
        "fold_gb_per_s": flat.nbytes / t_fold / 1e9,
        "read_seconds": t_read,
        "read_gb_per_s": flat.nbytes / t_read / 1e9,
        "read_separate_seconds": t_read_sep,
        "read_separate_gb_per_s": flat.nbytes / t_read_sep / 1e9,
    }


def worker_flower(k_updates: int, params: int) -> dict:
    from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server.strategy.aggregate import aggregate

    serialized = [(ndarrays_to_parameters(tensors(k, params)), num_samples(k)) for k in range(k_updates)]
    base = reset_peak()

    def run() -> list[np.ndarray]:
        return aggregate([(parameters_to_ndarrays(p), n) for p, n in serialized])

    t, out = best_of(run, 1)
    peak_mb = rss_mb("VmHWM") - base
    t2, _ = best_of(run, REPEATS - 1)
    import flwr

    return {
        "flwr_version": flwr.__version__,
        "seconds": min(t, t2),
        "peak_mb": peak_mb,
        "checksum": float(sum(float(a.astype(np.float64).sum()) for a in out)),
    }


# ---------------------------------------------------------------- driver


def flwr_python() -> str:
    py = FLWR_VENV / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(FLWR_VENV)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "flwr", "numpy"], check=True)
    return str(py)


def run_worker(python: str, which: str, k: int, params: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [python, __file__, "--worker", which, "--k", str(k), "--params", str(params)],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict]) -> str:
    lines = [
        "| K × params | ours s | ours s (validated) | Flower s | speed-up | ours peak MB | Flower peak MB "
        "| model MB | fold GB/s | read GB/s (1 buffer) | fold / read | read GB/s (1 buffer, 4 KiB pages) "
        "| fold / read (4 KiB) | read GB/s (K buffers) | fold / read (K) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, f = r["ours"], r["flower"]
        lines.append(
            f"| {r['k']} × {r['params']:,} | {o['seconds']:.3f} | {o['seconds_with_validation']:.3f} "
            f"| {f['seconds']:.3f} | {f['seconds'] / o['seconds']:.1f}× | {o['peak_mb']:.1f} | {f['peak_mb']:.0f} "
            f"| {r['model_mb']:.1f} | {o['fold_gb_per_s']:.1f} | {o['read_gb_per_s']:.1f} "
            f"| {o['read_seconds'] / o['fold_seconds']:.0%} | {o['read_4k_gb_per_s']:.1f} "
            f"| {o['read_4k_seconds'] / o['fold_seconds']:.0%} | {o['read_separate_gb_per_s']:.1f} "
            f"| {o['read_separate_seconds'] / o['fold_seconds']:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", choices=("ours", "flower"))
    ap.add_argument("--k", type=int)
    ap.add_argument("--params", type=int)
    ap.add_argument("--flwr-python", default=None, help="python of a venv with flwr (default: bench/.flwr-venv)")
    a = ap.parse_args()
    if a.worker:
        fn = worker_ours if a.worker == "ours" else worker_flower
        print(json.dumps(fn(a.k, a.params)))
        return
    fpy = a.flwr_python or flwr_python()
    rows = []
    for k, params in CASES:
        ours, flower = run_worker(sys.executable, "ours", k, params), run_worker(fpy, "flower", k, params)
        assert abs(ours["checksum"] - flower["checksum"]) <= 1e-3 * max(1.0, abs(flower["checksum"])), (ours, flower)
        rows.append({"k": k, "params": params, "model_mb": params * 4 / 1e6, "ours": ours, "flower": flower})
        print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": rows[0]["ours"]["threads"]}
    (RESULTS / "aggregate.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (RESULTS / "aggregate.md").write_text(
        "Aggregation from serialized updates to the aggregated model (best of 7; "
        f"{meta['threads']} threads for ours and the read probes; {meta['machine']}).\n"
        "Peak MB: rise of peak RSS above the resident payloads, after one warm-up aggregation. "
        "fold / read: time of a pure read (torch.sum) of the K×params float32 "
        "over the fold's time, as one buffer (huge pages where the kernel grants them), one buffer of 4 KiB "
        "pages, and the K separate buffers the fold really reads.\n\n" + markdown(rows)
    )
    print(f"wrote {RESULTS / 'aggregate.json'} and aggregate.md")


if __name__ == "__main__":
    main()

"""Hardware ceiling of the fold: what hand-written C (no Python, no torch) reaches on this machine.

    .venv/bin/python bench/fold_ceiling.py        # needs a C compiler with OpenMP (cc -fopenmp)

Compiles bench/fold_ceiling.c with `cc -O3 -march=native -fopenmp` into a temporary folder and runs it
for each case in its own process, RUNS times: the read-bandwidth limit (one contiguous buffer), a read of
the K separate buffers, the best possible per-update fold (acc ← acc + w·x, one update per pass) and a fused
fold of two updates per pass. Then, in Python on the same K=1000 × 100k buffers, the fold variants one might
try instead of the coordinator's one `add_` per update (`--no-python` skips them). It exists to answer one
question for bench/aggregate_bench.py: how close to the read limit can a fold that takes updates one at a
time get here at all?
Writes bench/results/fold_ceiling.json and fold_ceiling.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SOURCE = ROOT / "bench" / "fold_ceiling.c"
CASES = ((1000, 100_000), (100, 1_000_000))
RUNS = 3
ROUNDS = 9


def compile_probe(out_dir: Path) -> Path:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("fold_ceiling: no C compiler found (install gcc or set CC)")
    exe = out_dir / "fold_ceiling"
    subprocess.run([cc, "-O3", "-march=native", "-fopenmp", "-o", str(exe), str(SOURCE)], check=True)
    return exe


def python_variants(k: int, params: int) -> dict[str, Callable[[], torch.Tensor]]:
    """acc = Σ_k w_k x_k over K separate float32 buffers, five ways; each returns the sum."""
    xs = [torch.from_numpy(np.random.default_rng(i).standard_normal(params, dtype=np.float32)) for i in range(k)]
    w = [float(1 + (i * 7) % 50) for i in range(k)]
    one = torch.ones(k * params)

    def add_per_update() -> torch.Tensor:  # what the coordinator does
        acc = torch.zeros(params)
        for x, wi in zip(xs, w, strict=True):
            acc.add_(x, alpha=wi)
        return acc

    def pairwise() -> torch.Tensor:  # t = x_a + (w_b/w_a) x_b, acc += w_a t: one read pass per 2 updates
        acc, t = torch.zeros(params), torch.empty(params)
        for a in range(0, k, 2):
            torch.add(xs[a], xs[a + 1], alpha=w[a + 1] / w[a], out=t)
            acc.add_(t, alpha=w[a])
        return acc

    def stack_addmv(g: int = 8) -> torch.Tensor:  # copy g updates into one (g, P) block, then one gemv
        acc, block, wt = torch.zeros(params), torch.empty(g, params), torch.tensor(w)
        for a in range(0, k, g):
            torch.stack(xs[a : a + g], out=block)
            acc.addmv_(block.t(), wt[a : a + g])
        return acc

    def two_threads() -> torch.Tensor:  # two Python threads, one torch thread each, alternate updates
        accs = [torch.zeros(params), torch.zeros(params)]

        def work(j: int) -> None:
            torch.set_num_threads(1)
            for i in range(j, k, 2):
                accs[j].add_(xs[i], alpha=w[i])

        threads = [threading.Thread(target=work, args=(j,)) for j in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return accs[0].add_(accs[1])

    return {"read (1 buffer)": lambda: one.sum(), "read (K buffers)": lambda: torch.stack([x.sum() for x in xs]),
            "add_ per update": add_per_update, "pairwise add + add_": pairwise,
            "stack 8 + addmv": stack_addmv, "2 Python threads": two_threads}  # fmt: skip


def measure_python(k: int, params: int) -> dict[str, float]:
    """GB/s of each variant (best of ROUNDS, interleaved); checks that every fold gives the same sum."""
    variants = python_variants(k, params)
    ref = variants["add_ per update"]()
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(ROUNDS):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            if "read" not in name and float((out - ref).abs().max()) > 1e-4 * float(ref.abs().max()):
                raise RuntimeError(f"{name} does not compute the weighted sum")
    return {name: k * params * 4 / t / 1e9 for name, t in best.items()}


def markdown_python(gb_per_s: dict[str, float]) -> str:
    one = gb_per_s["read (1 buffer)"]
    lines = ["| K=1000 × 100,000, Python | GB/s | / read (1 buffer) |", "|---|---|---|"]
    lines += [f"| {name} | {v:.1f} | {v / one:.0%} |" for name, v in gb_per_s.items()]
    return "\n".join(lines) + "\n"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| K × params | run | read GB/s (1 buffer) | read GB/s (K buffers) | fold GB/s (1 update / pass) "
        "| fold / read | fused fold GB/s (2 updates / pass) | fused / read |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        one = r["sum_one_gb_per_s"]
        lines.append(
            f"| {r['k']} × {r['params']:,} | {r['run']} | {one:.1f} | {r['sum_k_gb_per_s']:.1f} "
            f"| {r['fold1_gb_per_s']:.1f} | {r['fold1_gb_per_s'] / one:.0%} | {r['fold2_gb_per_s']:.1f} "
            f"| {r['fold2_gb_per_s'] / one:.0%} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=RUNS, help="processes per case (default %(default)s)")
    ap.add_argument("--no-python", action="store_true", help="skip the Python fold variants")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        exe = compile_probe(Path(tmp))
        for k, params in CASES:
            for run in range(1, a.runs + 1):
                out = subprocess.run(
                    [str(exe), str(k), str(params), str(ROUNDS)], check=True, capture_output=True, text=True
                )
                rows.append({"k": k, "params": params, "run": run, **json.loads(out.stdout)})
                print(markdown(rows[-1:]).splitlines()[-1], flush=True)
    py = {} if a.no_python else measure_python(*CASES[0])
    if py:
        print(markdown_python(py), flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "threads": rows[0]["threads"], "rounds": ROUNDS}
    (RESULTS / "fold_ceiling.json").write_text(json.dumps({"meta": meta, "rows": rows, "python": py}, indent=2) + "\n")
    (RESULTS / "fold_ceiling.md").write_text(
        f"Fold ceiling in C (`cc -O3 -march=native -fopenmp`, {meta['threads']} threads, best of {ROUNDS} interleaved "
        f"rounds per run; {meta['machine']}). fold / read: the fold's GB/s over the one-buffer read's, same run.\n\n"
        + markdown(rows)
        + (
            f"\nIn Python (torch {torch.__version__}, {torch.get_num_threads()} threads), interleaved:\n\n"
            + markdown_python(py)
            if py
            else ""
        )
    )
    print(f"wrote {RESULTS / 'fold_ceiling.json'} and fold_ceiling.md")


if __name__ == "__main__":
    main()

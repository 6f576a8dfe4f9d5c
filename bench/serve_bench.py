"""The device's inference endpoint under load: latency and throughput over HTTP on loopback, with and without
training running, next to the bare `.pte` call.

    .venv/bin/python bench/serve_bench.py                       # exports what it needs (~3 min on 2 cores)
    .venv/bin/python bench/serve_bench.py --digits B1 --lm B2    # or serve bundles you have

The agent (one torch thread) serves in this process; the client is another process (http.client, keep-alive,
one request at a time, JSON tensors) so each has a core. Cases: digits and char-lm saturated (the next request
as soon as the last answer came); digits paced at `--paced-rps` requests/s while a round job trains (training
yields to requests, so it runs between them) and the same pace without training. Latency is measured by the
client (HTTP both ways included). Writes bench/results/serve.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

CLIENT = r"""
import http.client, json, sys, time
port, path, n, rps, body = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.stdin.buffer.read()
conn = http.client.HTTPConnection("127.0.0.1", port)
lat, t_start = [], time.perf_counter()
for i in range(n):
    if rps > 0:
        time.sleep(max(0.0, t_start + i / rps - time.perf_counter()))
    t0 = time.perf_counter()
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
    lat.append(time.perf_counter() - t0)
print(json.dumps({"lat": lat, "wall_s": time.perf_counter() - t_start}))
"""


def run_client(port: int, model: str, x: np.ndarray, n: int, rps: float = 0.0, binary_out: bool = False) -> dict:
    """Latency percentiles (ms) and requests/s of `n` requests from a separate process."""
    req = {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    body = json.dumps({**req, "parameters": {"binary_data_output": True}} if binary_out else req).encode()
    out = subprocess.run([sys.executable, "-c", CLIENT, str(port), f"/v2/models/{model}/infer", str(n), str(rps)],
                         input=body, capture_output=True, check=True)  # fmt: skip
    res = json.loads(out.stdout)
    lat = np.array(res["lat"][n // 10 :]) * 1e3  # the first tenth warms the connection and caches
    return {"requests": n, "p50_ms": round(float(np.percentile(lat, 50)), 3),
            "p99_ms": round(float(np.percentile(lat, 99)), 3), "rps": round(n / res["wall_s"], 1)}  # fmt: skip


def bare_ms(agent, x: np.ndarray, n: int = 500) -> float:
    """p50 of the bare ExecuTorch call the endpoint makes (no HTTP, no JSON)."""
    t = []
    for _ in range(n):
        t0 = time.perf_counter()
        agent.active.infer.predict(x)
        t.append(time.perf_counter() - t0)
    return round(float(np.percentile(np.array(t[n // 10 :]) * 1e3, 50)), 3)


def serve(bundle: Path, work: Path):
    from edge_runtime.agent import DeviceAgent, DeviceConfig
    from edge_runtime.budget import Budget
    from edge_runtime.serve import start_serving
    from edgelearn.bundle import pack_release

    cfg = DeviceConfig(
        "mqtt://127.0.0.1:1", "bench", "dev1", work, budget=Budget(max_rss_mb=None, max_temperature_c=None)
    )
    agent = DeviceAgent(cfg)
    agent.on_release(pack_release(bundle))
    server = start_serving(agent, "127.0.0.1", 0)
    return agent, server, server.server_address[1]


def training(agent, steps: int) -> tuple[threading.Event, threading.Thread]:
    """A round job of `steps` steps on random digits samples, run by the agent's own loop in a thread."""
    from edgelearn.protocol import LocalConfig, RoundMsg

    rng = np.random.default_rng(0)
    for _ in range(256):
        agent.add_feedback(rng.uniform(0, 16, 64).astype(np.float32), np.int64(rng.integers(10)))
    agent.on_round(RoundMsg(1, agent.version, time.time() + 3600, 1, None, LocalConfig(steps, 32, 0.05)).encode())
    stop = threading.Event()
    t = threading.Thread(target=agent.run, args=(stop,), daemon=True)
    t.start()
    return stop, t


def export(model: str, out: Path, extra: list[str]) -> Path:
    subprocess.run([sys.executable, "-m", "cli", "export", "--model", model, "--out", str(out), "--no-compare",
                    *extra], check=True, cwd=ROOT)  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--digits", type=Path, default=None, help="a digits-mlp bundle (default: export one)")
    ap.add_argument("--lm", type=Path, default=None, help="a char-lm bundle (default: export one, 0.5 min)")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--paced-rps", type=float, default=50.0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="edgelearn-serve-bench-"))
    digits = a.digits or export("digits-mlp", tmp / "digits", [])
    lm = a.lm or export("char-lm", tmp / "lm", ["--train-minutes", "0.5"])
    out: dict = {"machine": f"{platform.machine()}, 1 torch thread (server), client in another process"}
    agent, server, port = serve(digits, tmp / "d-state")
    x = np.random.default_rng(1).uniform(0, 16, (1, 64)).astype(np.float32)
    out["digits_bare_pte_p50_ms"] = bare_ms(agent, x)
    out["digits_saturated"] = run_client(port, "digits-mlp", x, a.requests)
    n_paced = int(a.paced_rps * 20)
    out["digits_paced_no_training"] = run_client(port, "digits-mlp", x, n_paced, a.paced_rps)
    steps_before = agent.steps_total
    stop, t = training(agent, 10**6)
    time.sleep(1.0)
    out["digits_paced_training"] = run_client(port, "digits-mlp", x, n_paced, a.paced_rps)
    out["digits_paced_training"]["training_steps_meanwhile"] = agent.steps_total - steps_before
    stop.set()
    t.join(30)
    server.shutdown()
    agent, server, port = serve(lm, tmp / "lm-state")
    ids = np.frombuffer(b"ROMEO: But soft, what light through yonder window breaks? It is the east, and Juli",
                        np.uint8)[:64].astype(np.float32)[None]  # fmt: skip
    out["lm_bare_pte_p50_ms"] = bare_ms(agent, ids)
    out["lm_saturated"] = run_client(port, "char-lm", ids, a.requests // 3)
    out["lm_saturated_binary_output"] = run_client(port, "char-lm", ids, a.requests // 3, binary_out=True)
    server.shutdown()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(out, indent=1))
    (RESULTS / "serve.md").write_text(markdown(out))
    print(markdown(out))


def markdown(d: dict) -> str:
    lm_over = d["lm_saturated_binary_output"]["p50_ms"] - d["lm_bare_pte_p50_ms"]
    digits_over = d["digits_saturated"]["p50_ms"] - d["digits_bare_pte_p50_ms"]
    rows = [f"| {k.replace('_', ' ')} | {v['p50_ms']:.3f} | {v['p99_ms']:.3f} | {v['rps']:.0f} |"
            for k, v in d.items() if isinstance(v, dict)]  # fmt: skip
    ratio = d["digits_paced_training"]["p99_ms"] / d["digits_paced_no_training"]["p99_ms"]
    return "\n".join([
        "# The device's inference endpoint (bench/serve_bench.py)", "",
        f"Machine: {d['machine']}. Open Inference Protocol `POST /v2/models/NAME/infer`, JSON tensors, one",
        "keep-alive connection, one request at a time; latency seen by the client.", "",
        "| case | p50 ms | p99 ms | requests/s |", "|---|---|---|---|", *rows, "",
        f"Bare `.pte` call (p50): digits {d['digits_bare_pte_p50_ms']:.3f} ms, char-lm "
        f"{d['lm_bare_pte_p50_ms']:.3f} ms. HTTP + JSON add {digits_over:.3f} ms (digits) and {lm_over:.3f} ms "
        "(char-lm, 256 logits as binary output) at p50.", "",
        f"While a round job trains (paced {d['digits_paced_training']['requests']} requests), p99 is {ratio:.2f}× "
        f"the p99 without training; the job took {d['digits_paced_training']['training_steps_meanwhile']} steps "
        "between the requests (training yields while requests arrive).",
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()

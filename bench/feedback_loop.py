"""Predict → correct → learn → improve: an app on the device uses the local inference endpoint, sends the right
label back for each mistake, and the fleet's rounds turn those corrections into better releases.

    .venv/bin/python bench/feedback_loop.py            # ~2 min on 2 cores; needs mosquitto

Release 1 is the digits student exported from 5 % of the data (a weak start). One device agent serves it
(`--serve`); a coordinator runs rounds with it through a real mosquitto. Each round the app asks the endpoint
about `--per-round` new digits it meets (never the evaluation ones), and its user corrects each wrong answer
and confirms each right one: both POST the label to `/feedback` (corrections alone would be a skewed sample).
Then one round runs: the device trains on that feedback (with replay of earlier rounds') and the coordinator
publishes the next release, which the endpoint serves from then on. Accuracy is measured through the same endpoint on
359 held-out digits after each release, overall and on the three classes release 1 got most wrong.
Writes bench/results/feedback_loop.{json,md}.
"""

from __future__ import annotations

import argparse
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
MODEL = "digits-mlp"


class App:
    """The app: one keep-alive HTTP connection to the device's endpoint."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def post(self, path: str, doc: dict) -> dict:
        self.conn.request("POST", f"/v2/models/{MODEL}/{path}", body=json.dumps(doc).encode())
        r = self.conn.getresponse()
        out = json.loads(r.read())
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status} {out}")
        return out

    def predict(self, x: np.ndarray) -> tuple[np.ndarray, str]:
        """Predicted classes of the rows of x, and the release version that answered."""
        out = self.post("infer", {"inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                                              "data": x.ravel().tolist()}]})  # fmt: skip
        logits = np.asarray(out["outputs"][0]["data"], np.float32).reshape(out["outputs"][0]["shape"])
        return logits.argmax(1), out["model_version"]

    def correct(self, x: np.ndarray, y: np.ndarray) -> int:
        """Predict each row; the user corrects each mistake and confirms each right answer (both are feedback:
        corrections alone would teach a skewed sample); returns the number of corrections."""
        pred, _ = self.predict(x)
        for i in range(len(y)):
            self.post("feedback", {"x": x[i].tolist(), "y": int(y[i])})
        return int((pred != y).sum())


def accuracy(app: App, x: np.ndarray, y: np.ndarray, classes: list[int]) -> dict:
    pred, version = np.concatenate([app.predict(x[i : i + 64])[0] for i in range(0, len(y), 64)]), ""
    _, version = app.predict(x[:1])
    sel = np.isin(y, classes)
    return {"release": int(version), "all": round(float((pred == y).mean()), 4),
            "weak_classes": round(float((pred[sel] == y[sel]).mean()), 4)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--per-round", type=int, default=150, help="digits the app meets per round")
    a = ap.parse_args()
    from coordinator.config import CoordinatorConfig
    from coordinator.release import release_builder
    from coordinator.server import Coordinator
    from edge_runtime.agent import DeviceAgent, DeviceConfig
    from edge_runtime.budget import Budget
    from edge_runtime.serve import start_serving
    from edgelearn.broker import Mosquitto
    from edgelearn.protocol import LocalConfig
    from models.digits import load_digits

    tmp = Path(tempfile.mkdtemp(prefix="edgelearn-feedback-"))
    bundle = tmp / "bundle"
    subprocess.run([sys.executable, "-m", "cli", "export", "--out", str(bundle), "--no-compare", "--server-fraction",
                    "0.05"], check=True, cwd=ROOT, capture_output=True)  # fmt: skip
    d = load_digits(0.05)
    met, evaluation = d.pool, d.test  # the app meets pool digits; the evaluation digits are never corrected
    broker = Mosquitto(tmp / "broker").start()
    agent = DeviceAgent(DeviceConfig(broker.url, "fb", "phone1", tmp / "device", budget=Budget(max_rss_mb=None)))
    agent.seed(bundle)  # release 1, flashed with the device
    server = start_serving(agent, "127.0.0.1", 0)
    stop = threading.Event()
    threading.Thread(target=agent.run, args=(stop,), daemon=True).start()
    # one round per coordinator run (its state carries over), so each round learns from that round's feedback
    ccfg = CoordinatorConfig(broker.url, "fb", bundle, tmp / "coordinator", min_updates=1, round_timeout_s=120,
                             local=LocalConfig(40, 16, 0.1), max_rounds=1)  # fmt: skip
    app = App(server.server_address[1])
    pred = np.concatenate([app.predict(evaluation.x[i : i + 64])[0] for i in range(0, len(evaluation.y), 64)])
    per_class = [float((pred[evaluation.y == c] == c).mean()) for c in range(10)]
    weak = [int(c) for c in np.argsort(per_class)[:3]]
    curve, rng, t0 = [accuracy(app, evaluation.x, evaluation.y, weak)], np.random.default_rng(0), time.monotonic()
    for r in range(1, a.rounds + 1):
        idx = rng.choice(len(met.y), a.per_round, replace=False)
        mistakes = app.correct(met.x[idx], met.y[idx])
        Coordinator(ccfg, release_builder(), lambda summary: None).run(threading.Event())  # returns after one round
        while agent.version < r + 1 and time.monotonic() - t0 < 600:
            time.sleep(0.2)
        curve.append({**accuracy(app, evaluation.x, evaluation.y, weak), "round": r, "corrections": mistakes})
        print(curve[-1], flush=True)
    stop.set()
    server.shutdown()
    broker.stop()
    doc = {"command": f"bench/feedback_loop.py --rounds {a.rounds} --per-round {a.per_round}",
           "weak_classes": weak, "evaluation_digits": len(evaluation.y), "curve": curve}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feedback_loop.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / "feedback_loop.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(d: dict) -> str:
    rows = [f"| {c.get('round', 0)} | v{c['release']} | {c.get('corrections', '-')} | {c['all']:.3f} | "
            f"{c['weak_classes']:.3f} |" for c in d["curve"]]  # fmt: skip
    return "\n".join([
        "# Predict → correct → learn → improve (bench/feedback_loop.py)", "",
        f"Command: `{d['command']}`. Accuracy through the device's endpoint on {d['evaluation_digits']} held-out "
        f"digits; weak classes = the three release 1 got most wrong ({', '.join(map(str, d['weak_classes']))}).", "",
        "| round | release served | corrections sent | accuracy | weak classes |", "|---|---|---|---|---|", *rows,
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()

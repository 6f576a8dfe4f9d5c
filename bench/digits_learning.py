"""Digits under Dirichlet label skew: what the fleet reaches next to the same network trained on the pooled
device data with the same samples.

    .venv/bin/python bench/digits_learning.py            # ~2 min on 2 cores

Release 1 is `edgelearn export`'s digits student (default options). 20 devices hold `simulate`'s
Dirichlet(α) shards of the device pool (`devices.simulate.data.device_shards`, α = 0.5, the pool split
evenly). Each round every device runs the recipe with the device code (`EagerEngine`, `LocalOptimizer`,
`lr_at`, `clip_grads_`) from the global weights; the coordinator code folds (`WeightedMean`, then the
server optimizer). The centralized learner takes the same number of samples per round from the pooled
shards. Both are scored each round on the held-out test digits (fp32). Several recipes run side by side;
the first is `simulate`'s default. Writes bench/results/digits_learning.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"

from lm_learning import local_job  # noqa: E402  (the same device arithmetic as the char-lm bench)

from coordinator.optim import ServerOptConfig, make_server_opt  # noqa: E402
from coordinator.strategies import WeightedMean  # noqa: E402
from devices.simulate.data import device_shards  # noqa: E402
from devices.simulate.run import LOCAL_DEFAULTS  # noqa: E402
from edge_runtime.engines import EagerEngine  # noqa: E402
from edge_runtime.optim import LocalOptimizer  # noqa: E402
from edgelearn.bundle import load_weights  # noqa: E402
from edgelearn.protocol import LocalConfig, Update  # noqa: E402
from models.digits import load_digits  # noqa: E402

RECIPES = {  # name: (local recipe, server optimizer)
    "simulate default (SGD 0.2, 10×16; FedAvg)": (LOCAL_DEFAULTS["digits-mlp"], ServerOptConfig()),
    "SGD 0.2, 40×16; FedAvg": (replace(LOCAL_DEFAULTS["digits-mlp"], steps=40), ServerOptConfig()),
    "SGD 0.2, 40×16; FedAvgM 0.6": (
        replace(LOCAL_DEFAULTS["digits-mlp"], steps=40),
        ServerOptConfig("fedavgm", 1.0, 0.6),
    ),
    "AdamW 3e-3, 40×16, cosine; FedAvgM 0.6": (
        LocalConfig(40, 16, 3e-3, "adamw", 4, "cosine", 1.0),
        ServerOptConfig("fedavgm", 1.0, 0.6),
    ),
}


def accuracy(w: dict, x: np.ndarray, y: np.ndarray) -> float:
    engine = EagerEngine("digits-mlp", w)
    with torch.no_grad():
        logits = engine.step_module.net(torch.from_numpy(x))
    return round(float((logits.argmax(1).numpy() == y).mean()), 4)


def run(w1: dict, shards: list, test: tuple, rounds: int, recipe: LocalConfig, server: ServerOptConfig) -> dict:
    """The fleet and the centralized learner for one recipe: accuracy per round of each."""
    torch.set_num_threads(1)
    rng, w, opt, state = np.random.default_rng(1), dict(w1), make_server_opt(server), {}
    engine, fleet = EagerEngine("digits-mlp", w1), [accuracy(w1, *test)]
    for r in range(1, rounds + 1):
        updates = []
        for k, s in enumerate(shards):
            engine.load(w)
            n = local_job(engine, s.x, s.y, recipe, rng)
            theta = engine.state()
            updates.append(Update(f"u{r}-{k}", f"d{k}", "digits-mlp", r, n, {m: theta[m] - w[m] for m in theta}, r))
        w, state = opt.step(w, WeightedMean().aggregate(updates, version=r, rnd=r), state)
        fleet.append(accuracy(w, *test))
    px, py = np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards])
    central_engine, crng = EagerEngine("digits-mlp", w1), np.random.default_rng(2)
    copt, central = LocalOptimizer(recipe.optimizer, central_engine.params), [fleet[0]]
    per_round = replace(recipe, steps=recipe.steps * len(shards), schedule="constant")
    for r in range(1, rounds + 1):
        local_job(central_engine, px, py, replace(per_round, warmup_steps=recipe.warmup_steps if r == 1 else 0),
                  crng, copt)  # fmt: skip
        central.append(accuracy({**w1, **central_engine.state()}, *test))
    return {"recipe": asdict(recipe), "server_opt": asdict(server), "fleet": fleet, "centralized": central}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--alpha", type=float, default=0.5)
    a = ap.parse_args()
    t0 = time.perf_counter()
    bundle = Path(tempfile.mkdtemp(prefix="edgelearn-digits-")) / "bundle"
    subprocess.run([sys.executable, "-m", "cli", "export", "--out", str(bundle), "--no-compare"], check=True,
                   cwd=ROOT, capture_output=True)  # fmt: skip
    w1, d = load_weights(bundle), load_digits()
    shards = device_shards(d.pool, a.devices, None, alpha=a.alpha)
    test = (d.test.x, d.test.y)
    with ProcessPoolExecutor(2) as pool:
        futures = {name: pool.submit(run, w1, shards, test, a.rounds, *rc) for name, rc in RECIPES.items()}
        runs = {name: f.result() for name, f in futures.items()}
    doc = {
        "command": f"bench/digits_learning.py --devices {a.devices} --rounds {a.rounds} --alpha {a.alpha}",
        "device_samples": [len(s.y) for s in shards],
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "digits_learning.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / "digits_learning.md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(d: dict) -> str:
    rows = []
    for name, r in d["runs"].items():
        f, c = r["fleet"], r["centralized"]
        rows.append(f"| {name} | {f[0]:.3f} | {f[-1]:.3f} | {max(f):.3f} | {c[-1]:.3f} | {max(c):.3f} | "
                    f"{100 * (c[-1] - f[-1]):+.1f} |")  # fmt: skip
    return "\n".join([
        "# Digits, Dirichlet label skew (bench/digits_learning.py)", "",
        f"Command: `{d['command']}` ({d['seconds']:.0f} s). Samples per device: {d['device_samples']}.", "",
        "| recipe | release 1 | fleet, last round | fleet, best | pooled, last round | pooled, best | "
        "pooled − fleet (points, last round) |", "|---|---|---|---|---|---|---|", *rows,
    ]) + "\n"  # fmt: skip


if __name__ == "__main__":
    main()

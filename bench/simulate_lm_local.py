"""Local recipes for `edgelearn simulate --model char-lm`: FedAvg over speaker shards, in one process.

    .venv/bin/edgelearn simulate --model char-lm --devices 20 --rounds 1 --out /tmp/sim-lm   # makes the bundle
    .venv/bin/python bench/simulate_lm_local.py --bundle /tmp/sim-lm/bundle

Every device of the cohort trains `steps` plain-SGD steps of `batch` windows drawn from its speaker
shard (the device's eager engine, as the agents use), the updates are averaged weighted by the
distinct windows each device drew, and the eager student is scored on the held-out windows the releases are
scored on (next-token accuracy and perplexity). A centralised run (all shards pooled, one learner)
bounds what the optimiser can do in as many steps. Writes bench/results/simulate_lm_local.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from devices.simulate.speakers import speaker_shards
from edge_runtime.engines import EagerEngine
from edgelearn.bundle import load_weights
from models.charlm import CONTEXT
from models.quality import quality
from models.registry import get_spec
from models.text import read_text, text_splits

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
RECIPES = ((20, 16, 0.1), (100, 16, 0.1), (20, 16, 0.2), (10, 16, 0.5), (10, 64, 0.5))


def evaluate(weights: dict[str, np.ndarray], test) -> dict[str, float]:
    net = get_spec("char-lm").make_student()
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    with torch.no_grad():
        return quality(net.eval()(torch.from_numpy(test.x)).numpy(), test.y, "lm")


def fedavg(w0: dict, shards: list, test, steps: int, batch: int, lr: float, rounds: int) -> list[dict]:
    """Per round: every shard trains from the global weights; θ ← Σ n_k θ_k / Σ n_k, n_k = distinct
    windows device k drew (the update's num_samples, as the coordinator weights it)."""
    rng, w, out = np.random.default_rng(0), dict(w0), []
    engine = EagerEngine("char-lm", w0)
    for _ in range(rounds):
        acc = {k: np.zeros_like(v, dtype=np.float64) for k, v in w.items()}
        total = 0
        for s in shards:
            engine.load(w)
            drawn = [rng.integers(0, len(s.y), batch) for _ in range(steps)]
            for idx in drawn:
                engine.step(s.x[idx], s.y[idx], lr)
            n, state = len(np.unique(np.concatenate(drawn))), engine.state()  # distinct samples, as devices report
            for k in acc:
                acc[k] += n * state.get(k, w[k])
            total += n
        w = {k: (v / total).astype(np.float32) for k, v in acc.items()}
        out.append({k: round(v, 4) for k, v in evaluate(w, test).items()})
    return out


def central(w0: dict, shards: list, test, steps: int, batch: int, lr: float) -> dict:
    """One learner on all shards pooled: mean training loss of the first and last 20 steps, and quality."""
    x, y = np.concatenate([s.x for s in shards]), np.concatenate([s.y for s in shards])
    rng, engine = np.random.default_rng(0), EagerEngine("char-lm", w0)
    losses = [engine.step(x[i], y[i], lr) for i in (rng.integers(0, len(y), batch) for _ in range(steps))]
    w = {**w0, **engine.state()}
    return {"loss_first": round(float(np.mean(losses[:20])), 3), "loss_last": round(float(np.mean(losses[-20:])), 3),
            **{k: round(v, 4) for k, v in evaluate(w, test).items()}}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="char-lm bundle exported by simulate")
    ap.add_argument("--text", type=Path, default=None, help="the simulate --text (default: the shipped corpus)")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(1)
    server, _, shards = speaker_shards(read_text(a.text), a.devices, CONTEXT)
    test = text_splits(server, CONTEXT)[1]
    w0 = load_weights(a.bundle)
    rows = []
    for steps, batch, lr in RECIPES:
        t0 = time.perf_counter()
        rounds = fedavg(w0, shards, test, steps, batch, lr, a.rounds)
        seconds = round(time.perf_counter() - t0, 1)
        rows.append({"steps": steps, "batch": batch, "lr": lr, "rounds": rounds, "seconds": seconds})
        print(rows[-1], flush=True)
    result = {
        "start": evaluate(w0, test), "devices": a.devices, "fedavg": rows, "machine": platform.machine(),
        "central_300_steps_batch16_lr0.1": central(w0, shards, test, 300, 16, 0.1),
    }  # fmt: skip
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "simulate_lm_local.json").write_text(json.dumps(result, indent=1))
    lines = [f"FedAvg of {a.devices} char-lm speaker shards from release 1 ({a.bundle.name}), {a.rounds} rounds, "
             "eager student on the held-out windows: next-token accuracy / perplexity.", ""]  # fmt: skip
    lines += ["| steps | batch | lr | " + " | ".join(f"round {r + 1} acc / ppl" for r in range(a.rounds)) + " |"]
    lines.append("|---" * (3 + a.rounds) + "|")
    for r in rows:
        cells = " | ".join(f"{q['accuracy']:.3f} / {q['perplexity']:.2f}" for q in r["rounds"])
        lines.append(f"| {r['steps']} | {r['batch']} | {r['lr']} | {cells} |")
    s, c = result["start"], result["central_300_steps_batch16_lr0.1"]
    lines += [
        "",
        f"Release 1: {s['accuracy']:.3f} / {s['perplexity']:.2f}. Centralised, 300 steps of 16 at lr 0.1: training "
        f"loss {c['loss_first']} → {c['loss_last']} nats, {c['accuracy']:.3f} / {c['perplexity']:.2f}.",
    ]
    (RESULTS / "simulate_lm_local.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

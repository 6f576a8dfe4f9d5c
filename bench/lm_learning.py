"""Does the fleet teach the language model anything? char-lm, speakers as devices, held-out speakers as the test.

    .venv/bin/python bench/lm_learning.py --text ../shared/data/tinyshakespeare.txt     # ~25 min on 2 cores

Split (LEAF-style, by speaker): 10 held-out speakers nobody trains on; the 20 largest other speakers are the
devices (each trains on the first 80 % of its text; the last 20 % is its own held-out part); every other
speaker's text is the export text. Release 1 is the student trained on the export text by the exporter's
budgeted recipe (`export.distill.fit_for`). Each round every device runs the device code's recipe from the
global weights (`EagerEngine.loss_and_grads`, `clip_grads_`, `LocalOptimizer`, `lr_at`: what
`edge_runtime.learner.Learner.step` calls) on random windows of its text, and the coordinator code folds the
updates (`coordinator.strategies.WeightedMean.aggregate`, then the server optimizer's `step`). MQTT, the
sample store and the budget governor are left out: `edgelearn simulate` covers those; this measures learning.

The fleet runs twice, side by side: full updates and rank-r adapter updates (`--lora-rank`, protocol v1.3;
the device trains B with `edge_runtime.lora.LoraEngine`, the coordinator folds ΔW = B·A).

Scored on the held-out speakers: 250 windows, positions 32..63 of each (8,000 next-byte predictions with at
least 32 bytes of context), next to unigram and bigram tables fitted on all training text and to a centralized
learner given the same samples (one AdamW run over the pooled device text) from the same release 1. Also:
personal parts (global vs global + a head or an adapter fine-tuned on the device's own 80 %, scored on its
20 %) and
forgetting (the export text's accuracy after learning one device's text, with and without replay).
Writes bench/results/lm_learning.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from coordinator.optim import ServerOptConfig, default_server_opt, make_server_opt
from coordinator.strategies import WeightedMean
from devices.simulate.run import LOCAL_DEFAULTS
from devices.simulate.speakers import speaker_texts
from edge_runtime.engines import EagerEngine, TrainEngine
from edge_runtime.lora import LoraEngine
from edge_runtime.optim import LocalOptimizer, clip_grads_
from edgelearn import lora
from edgelearn.protocol import LocalConfig, Update
from edgelearn.schedule import lr_at
from export.distill import Budget, fit_for
from models.charlm import CONTEXT, STUDENT, CharLM
from models.text import windows

RESULTS = Path(__file__).resolve().parent / "results"
EVAL_WINDOWS, EVAL_FROM = 250, 32  # windows of the held-out speakers; positions scored in each: EVAL_FROM..63
RECIPE = LOCAL_DEFAULTS["char-lm"]  # simulate's default char-lm recipe


@dataclass(frozen=True)
class Split:
    export_text: bytes
    devices: list[tuple[str, bytes, bytes]]  # (speaker, train 80 %, own held-out 20 %)
    held_out: list[str]
    eval_x: np.ndarray  # (W, 64) float ids
    eval_y: np.ndarray  # (W, 64) next ids


def leaf_split(text: bytes, n_devices: int, n_held_out: int = 10, seed: int = 0) -> Split:
    """Held-out speakers drawn among those ranked n_devices+1 .. n_devices+40 by size; devices = the largest."""
    speakers = sorted(speaker_texts(text).items(), key=lambda kv: (-len(kv[1]), kv[0]))
    pool = speakers[n_devices : n_devices + 40]
    rng = np.random.default_rng(seed)
    held = {pool[i][0] for i in rng.choice(len(pool), size=n_held_out, replace=False)}
    devices = [(n, t[: int(0.8 * len(t))], t[int(0.8 * len(t)) :]) for n, t in speakers[:n_devices]]
    rest = [t for n, t in speakers[n_devices:] if n not in held]
    held_text = b"".join(t for n, t in speakers if n in held)
    w = windows(np.frombuffer(held_text, np.uint8).astype(np.int64), CONTEXT, CONTEXT // 2)
    pick = np.linspace(0, len(w.y) - 1, EVAL_WINDOWS).astype(int)
    return Split(b"".join(rest), devices, sorted(held), w.x[pick], w.y[pick])


def text_windows(text: bytes) -> tuple[np.ndarray, np.ndarray]:
    w = windows(np.frombuffer(text, np.uint8).astype(np.int64), CONTEXT, CONTEXT // 2)
    return w.x, w.y


@torch.no_grad()
def score(net: CharLM, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Next-byte accuracy and cross-entropy (nats) over positions EVAL_FROM..63 of every window."""
    logits = net.eval().sequence_logits(torch.from_numpy(x))[:, EVAL_FROM:]  # (W, P, V)
    target = torch.from_numpy(y[:, EVAL_FROM:])
    ce = F.cross_entropy(logits.flatten(0, 1), target.reshape(-1))
    acc = (logits.argmax(-1) == target).float().mean()
    return {"acc": round(float(acc), 4), "ce": round(float(ce), 4), "positions": int(target.numel())}


def ngram_baselines(train: bytes, y: np.ndarray, x: np.ndarray) -> dict[str, dict[str, float]]:
    """Unigram p(b) and bigram p(b | previous byte), add-0.01 smoothed, on the scored positions."""
    t = np.frombuffer(train, np.uint8).astype(np.int64)
    uni = np.bincount(t, minlength=256) + 0.01
    bi = np.zeros((256, 256)) + 0.01
    np.add.at(bi, (t[:-1], t[1:]), 1.0)
    prev, nxt = x[:, EVAL_FROM:].astype(np.int64).ravel(), y[:, EVAL_FROM:].ravel()
    p_uni = uni / uni.sum()
    p_bi = bi / bi.sum(axis=1, keepdims=True)
    return {
        "unigram": {"acc": round(float((nxt == p_uni.argmax()).mean()), 4),
                    "ce": round(float(-np.log(p_uni[nxt]).mean()), 4)},
        "bigram": {"acc": round(float((p_bi[prev].argmax(1) == nxt).mean()), 4),
                   "ce": round(float(-np.log(p_bi[prev, nxt]).mean()), 4)},
    }  # fmt: skip


def weights_of(net: CharLM) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}


def net_of(w: dict[str, np.ndarray]) -> CharLM:
    net = CharLM(STUDENT)
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in w.items()})
    return net


def local_job(engine: TrainEngine, x: np.ndarray, y: np.ndarray, recipe: LocalConfig, rng: np.random.Generator,
              opt: LocalOptimizer | None = None) -> int:  # fmt: skip
    """`recipe.steps` steps of Learner.step's arithmetic on random windows; returns the distinct windows used."""
    opt = opt or LocalOptimizer(recipe.optimizer, engine.params)
    drawn = []
    for t in range(recipe.steps):
        idx = rng.integers(0, len(y), min(recipe.batch_size, len(y)))
        drawn.append(idx)
        _, grads = engine.loss_and_grads(x[idx], y[idx])
        clip_grads_(grads, recipe.clip_norm)
        opt.step(engine.params, grads, engine.anchor, lr_at(t, recipe.steps, recipe.lr, recipe.warmup_steps,
                                                            recipe.schedule))  # fmt: skip
    return len(np.unique(np.concatenate(drawn)))


def device_update(engine: EagerEngine, w: dict, data: tuple, recipe: LocalConfig, rng: np.random.Generator,
                  version: int) -> tuple[int, dict[str, np.ndarray], int, float]:  # fmt: skip
    """One device's job from the global `w`: (samples, the full Δ the coordinator folds, bytes sent, seconds).
    With `recipe.lora_rank` the device trains adapters and sends B; Δ is the coordinator's expansion B·A."""
    engine.load(w)
    trained: TrainEngine = LoraEngine(engine, recipe.lora_rank, version) if recipe.lora_rank else engine
    t0 = time.perf_counter()
    n = local_job(trained, *data, recipe, rng)
    seconds, theta = time.perf_counter() - t0, trained.state()
    sent = 4 * sum(v.size for v in theta.values())
    if recipe.lora_rank:
        return n, lora.expand(theta, {m: v.shape for m, v in w.items()}, version), sent, seconds
    return n, {m: theta[m] - w[m] for m in theta}, sent, seconds


def run_fleet(w1: dict, split: Split, rounds: int, recipe: LocalConfig, server: ServerOptConfig,
              label: str = "fleet") -> list[dict]:  # fmt: skip
    """Rounds of every device's `device_update`, folded by the coordinator's code; one score per round."""
    torch.set_num_threads(1)
    rng, w, curve = np.random.default_rng(1), dict(w1), [{"round": 0, **score(net_of(w1), split.eval_x, split.eval_y)}]
    data = [text_windows(train) for _, train, _ in split.devices]
    engine, strategy, opt, state = EagerEngine("char-lm", w1), WeightedMean(), make_server_opt(server), {}
    for r in range(1, rounds + 1):
        t0, updates, sent, job_s = time.perf_counter(), [], 0, 0.0
        for k, xy in enumerate(data):
            n, delta, nbytes, seconds = device_update(engine, w, xy, recipe, rng, version=r)
            updates.append(Update(f"u{r}-{k}", f"d{k}", "char-lm", r, n, delta, r))
            sent, job_s = sent + nbytes, job_s + seconds
        w, state = opt.step(w, strategy.aggregate(updates, version=r, rnd=r), state)
        curve.append({"round": r, "seconds": round(time.perf_counter() - t0, 1), "bytes_sent": sent,
                      "ms_per_step": round(1e3 * job_s / (len(data) * recipe.steps), 2),
                      **score(net_of(w), split.eval_x, split.eval_y)})  # fmt: skip
        print(f"{label} round {r}: {curve[-1]}", flush=True)
    np.savez(RESULTS / f".lm_learning_{label}.npz", **w)
    return curve


def run_central(w1: dict, split: Split, rounds: int, recipe: LocalConfig) -> list[dict]:
    """One learner, pooled device text, as many samples per round as the fleet (devices × steps × batch)."""
    torch.set_num_threads(1)
    x = np.concatenate([text_windows(t)[0] for _, t, _ in split.devices])
    y = np.concatenate([text_windows(t)[1] for _, t, _ in split.devices])
    per_round = replace(recipe, steps=recipe.steps * len(split.devices))
    engine, rng = EagerEngine("char-lm", w1), np.random.default_rng(2)
    opt = LocalOptimizer(recipe.optimizer, engine.params)  # one continuous optimizer
    curve = [{"round": 0, **score(net_of(w1), split.eval_x, split.eval_y)}]
    for r in range(1, rounds + 1):
        local_job(engine, x, y, replace(per_round, warmup_steps=recipe.warmup_steps if r == 1 else 0,
                                        schedule="constant"), rng, opt)  # fmt: skip
        curve.append({"round": r, **score(net_of({**w1, **engine.state()}), split.eval_x, split.eval_y)})
        print(f"central round {r}: {curve[-1]}", flush=True)
    return curve


def personal(w: dict, split: Split, steps: int = 200, rank: int = 8) -> list[dict]:
    """Each device fine-tunes, from the final global model, on its own 80 % a part it keeps (never sent): its
    head (`head.*`), or a rank-`rank` adapter of every 2-D weight (`LoraEngine`; inference runs the merged
    W + B·A). All three are scored on the device's own last 20 %."""
    torch.set_num_threads(1)
    out, rng = [], np.random.default_rng(3)
    head = [n for n in w if n.startswith("head.")]
    recipe = LocalConfig(steps, 16, 3e-3, "adamw", warmup_steps=5, schedule="cosine", clip_norm=1.0)
    for name, train, own in split.devices:
        x, y = text_windows(train)
        ox, oy = text_windows(own)
        heads = EagerEngine("char-lm", w, trainable=head)
        local_job(heads, x, y, recipe, rng)
        adapters = LoraEngine(EagerEngine("char-lm", w), rank, version=0)
        local_job(adapters, x, y, recipe, rng)
        out.append({"speaker": name, "global": score(net_of(w), ox, oy),
                    "head": score(net_of({**w, **heads.state()}), ox, oy),
                    "adapter": score(net_of({**w, **adapters.merged()}), ox, oy)})  # fmt: skip
    return out


def forgetting(w: dict, split: Split, steps: int = 200) -> dict[str, dict]:
    """From the final global model, learn the largest device's text alone, without and with replay of 25 %
    export-text windows per batch; score the export text's last windows (old data) and the device's own 20 %."""
    torch.set_num_threads(1)
    _, train, own = split.devices[0]
    x, y = text_windows(train)
    ex, ey = text_windows(split.export_text)
    old = (ex[-EVAL_WINDOWS:], ey[-EVAL_WINDOWS:])
    new = text_windows(own)
    out = {"before": {"old": score(net_of(w), *old), "new": score(net_of(w), *new)}}
    for label, replay in (("no_replay", 0), ("replay_25", 4)):
        engine, rng = EagerEngine("char-lm", w), np.random.default_rng(4)
        opt = LocalOptimizer("adamw", engine.params)
        for t in range(steps):
            i, j = rng.integers(0, len(y), 16 - replay), rng.integers(0, len(ey) - EVAL_WINDOWS, replay)
            bx, by = np.concatenate([x[i], ex[j]]), np.concatenate([y[i], ey[j]])
            _, grads = engine.loss_and_grads(bx, by)
            clip_grads_(grads, 1.0)
            opt.step(engine.params, grads, engine.anchor, lr_at(t, steps, 1e-3, 5, "cosine"))
        final = net_of({**w, **engine.state()})
        out[label] = {"old": score(final, *old), "new": score(final, *new)}
    return out


def gap_closed(curve: list[dict], central: list[dict], key: str) -> float | None:
    """(fleet − release 1) / (centralized − release 1) at the last round, for acc or ce."""
    d = central[-1][key] - curve[0][key]
    return None if abs(d) < 1e-9 else round((curve[-1][key] - curve[0][key]) / d, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--text", type=Path, required=True, help="Tiny Shakespeare (NAME:/lines blocks)")
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--export-minutes", type=float, default=2.0, help="release 1: the exporter's budgeted recipe")
    ap.add_argument("--server-opt", default=None, help="default: the char-lm default (coordinator.optim)")
    ap.add_argument("--server-lr", type=float, default=None)
    ap.add_argument("--server-momentum", type=float, default=None)
    ap.add_argument("--steps", type=int, default=RECIPE.steps)
    ap.add_argument("--lr", type=float, default=RECIPE.lr)
    ap.add_argument("--lora-rank", type=int, default=8, help="rank of the adapter fleet run beside the full one")
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    split = leaf_split(a.text.read_bytes(), a.devices)
    recipe = replace(RECIPE, steps=a.steps, lr=a.lr)
    full, adapters = replace(recipe, lora_rank=0), replace(recipe, lora_rank=a.lora_rank)
    server = default_server_opt("char-lm", name=a.server_opt, lr=a.server_lr, momentum=a.server_momentum)
    ex, ey = text_windows(split.export_text)
    release1, steps = fit_for(CharLM(STUDENT), ex, ey, Budget(60 * a.export_minutes), name="release-1")
    w1 = weights_of(release1)
    train_all = split.export_text + b"".join(t for _, t, _ in split.devices)
    base = {"release_1": score(release1, split.eval_x, split.eval_y),
            **ngram_baselines(train_all, split.eval_y, split.eval_x)}  # fmt: skip
    print("baselines", base, flush=True)
    with ProcessPoolExecutor(2) as pool:  # full and adapter fleets and the centralized learner, 2 cores
        full_f = pool.submit(run_fleet, w1, split, a.rounds, full, server, "full")
        lora_f = pool.submit(run_fleet, w1, split, a.rounds, adapters, server, "lora")
        central_f = pool.submit(run_central, w1, split, a.rounds, recipe)
        curves = {"full": full_f.result(), "lora": lora_f.result()}
        central = central_f.result()
    default = "lora" if recipe.lora_rank else "full"
    fleet, final = curves[default], dict(np.load(RESULTS / f".lm_learning_{default}.npz"))
    for label in curves:
        (RESULTS / f".lm_learning_{label}.npz").unlink()
    with ProcessPoolExecutor(2) as pool:
        personal_f, forget_f = pool.submit(personal, final, split), pool.submit(forgetting, final, split)
        own, forget = personal_f.result(), forget_f.result()
    doc = {
        "command": f"bench/lm_learning.py --text {a.text.name} --devices {a.devices} --rounds {a.rounds} "
                   f"--export-minutes {a.export_minutes} --server-opt {server.name} --server-lr {server.lr} "
                   f"--server-momentum {server.momentum} "
                   f"--steps {a.steps} --lr {a.lr} --lora-rank {a.lora_rank}",
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread per process, 2 processes",
        "split": {"held_out_speakers": split.held_out, "devices": [d[0] for d in split.devices],
                  "export_bytes": len(split.export_text), "device_bytes": sum(len(d[1]) for d in split.devices),
                  "eval_positions": int(split.eval_y[:, EVAL_FROM:].size)},
        "release_1_steps": steps, "recipe": asdict(recipe), "server_opt": asdict(server),
        "baselines": base, "fleet": fleet, "centralized": central, "default": default, "lora_rank": a.lora_rank,
        "full_vs_lora": {**curves, "optimizer_state_bytes": {  # AdamW: trainable + 2 moments, fp32
            "full": 12 * sum(v.size for v in w1.values()),
            "lora": 12 * sum(s[0] * s[1] for s in lora.adapter_shapes(
                {n: v.shape for n, v in w1.items()}, a.lora_rank).values())}},
        "gap_closed": {"acc": gap_closed(fleet, central, "acc"), "ce": gap_closed(fleet, central, "ce")},
        "update_bytes_fp32": 4 * sum(v.size for v in w1.values()),
        "personal": own, "forgetting": forget, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_learning.json").write_text(json.dumps(doc, indent=1))
    (RESULTS / "lm_learning.md").write_text(markdown(doc))
    plot(doc, RESULTS / "lm_learning.png")
    print(markdown(doc))


def markdown(d: dict) -> str:
    b, f, c = d["baselines"], d["fleet"], d["centralized"]
    pers = d["personal"]
    own = {k: np.mean([p[k]["acc"] for p in pers]) for k in ("global", "head", "adapter")}
    lines = [
        "# char-lm: what the fleet learns (bench/lm_learning.py)", "",
        f"Command: `{d['command']}` ({d['seconds']:.0f} s, {d['machine']}).", "",
        f"Held-out speakers ({', '.join(d['split']['held_out_speakers'])}): {d['split']['eval_positions']} next-byte "
        f"positions. Export text {d['split']['export_bytes']} B; {len(d['split']['devices'])} device speakers "
        f"{d['split']['device_bytes']} B (80 % each). Recipe per device and round: {d['recipe']}; server "
        f"{d['server_opt']['name']} lr {d['server_opt']['lr']} momentum {d['server_opt']['momentum']}.", "",
        "| model | accuracy | cross-entropy (nats) |", "|---|---|---|",
        f"| unigram | {b['unigram']['acc']:.3f} | {b['unigram']['ce']:.3f} |",
        f"| bigram | {b['bigram']['acc']:.3f} | {b['bigram']['ce']:.3f} |",
        f"| release 1 ({d['release_1_steps']} steps) | {b['release_1']['acc']:.3f} | {b['release_1']['ce']:.3f} |",
        f"| fleet, round {f[-1]['round']} | {f[-1]['acc']:.3f} | {f[-1]['ce']:.3f} |",
        f"| centralized, same samples | {c[-1]['acc']:.3f} | {c[-1]['ce']:.3f} |", "",
        f"Gap closed by the fleet (release 1 → centralized): accuracy {d['gap_closed']['acc']}, cross-entropy "
        f"{d['gap_closed']['ce']}. Update size {d['update_bytes_fp32'] / 1024:.0f} KiB (fp32). Mean round "
        f"({len(d['split']['devices'])} devices in sequence, 1 thread): "
        f"{np.mean([r['seconds'] for r in f[1:]]):.1f} s.", "",
        "| round | fleet acc | fleet CE | centralized acc | centralized CE |", "|---|---|---|---|---|",
        *[f"| {x['round']} | {x['acc']:.3f} | {x['ce']:.3f} | {y['acc']:.3f} | {y['ce']:.3f} |"
          for x, y in zip(f, c, strict=True) if x["round"] % 5 == 0 or x["round"] in (1, 2)],
        "", *full_vs_lora(d), "",
        f"Personal parts (own-speaker last 20 %, mean over {len(pers)} devices, from the final {d['default']} "
        f"global model): global {own['global']:.3f}; + personal head {own['head']:.3f} "
        f"({own['head'] - own['global']:+.3f}); + personal rank-8 adapter {own['adapter']:.3f} "
        f"({own['adapter'] - own['global']:+.3f}).", "",
        "Forgetting (largest device's text alone, 200 steps): " + "; ".join(
            f"{k}: old {v['old']['acc']:.3f} / new {v['new']['acc']:.3f}" for k, v in d["forgetting"].items()),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def full_vs_lora(d: dict) -> list[str]:
    """The side-by-side table: accuracy per round and per MiB sent, step time, optimizer memory."""
    fl, mem = d["full_vs_lora"], d["full_vs_lora"]["optimizer_state_bytes"]
    rows = []
    for label in ("full", "lora"):
        c = fl[label]
        mib = sum(r["bytes_sent"] for r in c[1:]) / 2**20
        gain = c[-1]["acc"] - c[0]["acc"]
        per_update_kib = c[1]["bytes_sent"] / len(d["split"]["devices"]) / 1024
        rows.append(f"| {label} | {c[-1]['acc']:.3f} | {c[-1]['ce']:.3f} | {per_update_kib:.1f} "
                    f"| {mib:.1f} | {100 * gain / mib:+.3f} | {np.mean([r['ms_per_step'] for r in c[1:]]):.1f} "
                    f"| {mem[label] / 1024:.0f} |")  # fmt: skip
    return [
        f"Full updates vs rank-{d['lora_rank']} adapters (same data, rounds, recipe and server optimizer; the "
        f"default is **{d['default']}**):", "",
        f"| update | acc r{fl['full'][-1]['round']} | CE r{fl['full'][-1]['round']} | KiB per update "
        "| MiB sent in all | accuracy points per MiB sent | ms per step "
        "| AdamW state KiB |", "|---|---|---|---|---|---|---|---|", *rows, "",
        "| round | full acc | adapters acc |", "|---|---|---|",
        *[f"| {x['round']} | {x['acc']:.3f} | {y['acc']:.3f} |" for x, y in zip(fl["full"], fl["lora"], strict=True)
          if x["round"] % 5 == 0 or x["round"] in (1, 2)],
    ]  # fmt: skip


def plot(d: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "acc", "next-byte accuracy"), (axes[1], "ce", "cross-entropy (nats)")):
        for name, style in (("full", "o-"), ("lora", "^-")):
            c = d["full_vs_lora"][name]
            what = "full updates" if name == "full" else f"rank-{d['lora_rank']} adapters"
            ax.plot([r["round"] for r in c], [r[key] for r in c], style, label=f"fleet, {what}")
        ax.plot([r["round"] for r in d["centralized"]], [r[key] for r in d["centralized"]], "s--",
                label="centralized, same samples")  # fmt: skip
        for name, style in (("bigram", ":"), ("unigram", "-.")):
            ax.axhline(d["baselines"][name][key], color="grey", linestyle=style, label=name)
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.set_title(f"held-out speakers: {label}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()

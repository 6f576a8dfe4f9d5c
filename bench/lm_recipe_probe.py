"""Probe: a char-level LM learning recipe (export release 1 + simulated federated fine-tuning) by measurement.

    .venv/bin/python bench/lm_recipe_probe.py data
    .venv/bin/python bench/lm_recipe_probe.py export --model student --minutes 2 --lr 3e-3
        --save /tmp/lmprobe/s.pt
    .venv/bin/python bench/lm_recipe_probe.py export --model student --teacher /tmp/lmprobe/t.pt --T 2 --alpha 0.5 ...
    .venv/bin/python bench/lm_recipe_probe.py fed --init /tmp/lmprobe/s.pt --local adamw --lr 2e-3 --steps 20 \
        --server avg
    .venv/bin/python bench/lm_recipe_probe.py fed --init ... --centralized
    .venv/bin/python bench/lm_recipe_probe.py personal --init /tmp/lmprobe/fed_best.pt
    .venv/bin/python bench/lm_recipe_probe.py forget --init /tmp/lmprobe/s.pt

Data (LEAF-style, by speaker, Tiny Shakespeare blocks `NAME:\\nlines\\n\\n`, parsed with
devices.simulate.speakers.speaker_blocks):
  * held-out: 10 speakers drawn (rng seed 0) among the speakers ranked 21..60 by bytes; nobody trains on them;
  * devices: the 20 largest remaining speakers (one speaker = one device, its blocks joined in order);
    each device trains on the first 80 % of its text, the last 20 % is its personal test part;
  * export (server) text: every other speaker's blocks, joined in order.
Eval: windows of 64 (+1) bytes at stride 32 over each held-out speaker's text, an evenly spaced subset of
`EVAL_WINDOWS` of them; scored positions 32..63 of each window (every scored byte sees 32..63 bytes of
context), i.e. EVAL_WINDOWS × 32 positions. Unigram / bigram baselines (add-0.01 smoothing) are fitted on
export + device-train text and scored on the same positions.
Results are appended as JSON lines to OUT/results.jsonl (OUT = --out, default /tmp/lmprobe).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from devices.simulate.speakers import speaker_blocks
from models.charlm import STUDENT, TEACHER, CharLM

TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"  # beside the clone; --text
CTX = 64
EVAL_WINDOWS = 250  # × 32 scored positions = 8000 positions
SCORE_FROM = 32
N_HELD, N_DEV = 10, 20
SMOOTH = 0.01


# ------------------------------------------------------------------------------------------------ data


def split_text(path: Path = TEXT):
    text = path.read_bytes()
    blocks = speaker_blocks(text)
    sizes: dict[str, int] = {}
    for n, s, e in blocks:
        sizes[n] = sizes.get(n, 0) + e - s
    ranked = sorted(sizes, key=lambda n: (-sizes[n], n))
    rng = np.random.default_rng(0)
    held = sorted(rng.choice(ranked[20:60], N_HELD, replace=False).tolist())
    rest = [n for n in ranked if n not in held]
    devs = rest[:N_DEV]
    per: dict[str, list[bytes]] = {}
    export: list[bytes] = []
    for n, s, e in blocks:
        if n in held or n in devs:
            per.setdefault(n, []).append(text[s:e])
        else:
            export.append(text[s:e])
    dev_texts = [b"".join(per[n]) for n in devs]
    held_texts = [b"".join(per[n]) for n in held]
    return dict(export=b"".join(export), devs=devs, dev_texts=dev_texts, held=held, held_texts=held_texts)


def tok(b: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(b, dtype=np.uint8).astype(np.int64))


def eval_windows(texts: list[bytes], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for t in texts:
        a = tok(t)
        starts = torch.arange(0, len(a) - CTX, CTX // 2)
        idx = starts[:, None] + torch.arange(CTX)[None, :]
        xs.append(a[idx])
        ys.append(a[idx + 1])
    x, y = torch.cat(xs), torch.cat(ys)
    if n and len(x) > n:
        pick = torch.from_numpy(np.linspace(0, len(x) - 1, n).round().astype(np.int64))
        x, y = x[pick], y[pick]
    return x, y


class Data:
    def __init__(self, text: Path = TEXT) -> None:
        d = split_text(text)
        self.__dict__.update(d)
        self.dev_train = [t[: int(len(t) * 0.8)] for t in self.dev_texts]
        self.dev_test = [t[int(len(t) * 0.8) :] for t in self.dev_texts]
        self.export_tok = tok(self.export)
        self.dev_tok = [tok(t) for t in self.dev_train]
        self.ex, self.ey = eval_windows(self.held_texts, EVAL_WINDOWS)
        self.baselines = ngram_baselines(self.export + b"".join(self.dev_train), self.ex, self.ey)


def ngram_baselines(train: bytes, x: torch.Tensor, y: torch.Tensor) -> dict:
    a = np.frombuffer(train, dtype=np.uint8).astype(np.int64)
    uni = np.bincount(a, minlength=256) + SMOOTH
    uni = uni / uni.sum()
    big = np.zeros((256, 256)) + SMOOTH
    np.add.at(big, (a[:-1], a[1:]), 1)
    big = big / big.sum(1, keepdims=True)
    xs, ys = x[:, SCORE_FROM:].numpy().ravel(), y[:, SCORE_FROM:].numpy().ravel()
    out = {}
    out["unigram"] = dict(acc=float((ys == uni.argmax()).mean()), ce=float(-np.log(uni[ys]).mean()))
    out["bigram"] = dict(acc=float((big[xs].argmax(1) == ys).mean()), ce=float(-np.log(big[xs, ys]).mean()))
    out["positions"] = len(ys)
    return out


def batch_from(t: torch.Tensor, b: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.randint(0, len(t) - CTX - 1, (b,), generator=g)
    idx = s[:, None] + torch.arange(CTX + 1)[None, :]
    w = t[idx]
    return w[:, :-1], w[:, 1:]


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    model.eval()
    ce, acc, n = 0.0, 0.0, 0
    for i in range(0, len(x), 128):
        lg = model.sequence_logits(x[i : i + 128].float())[:, SCORE_FROM:]
        yy = y[i : i + 128, SCORE_FROM:]
        ce += F.cross_entropy(lg.reshape(-1, lg.shape[-1]), yy.reshape(-1), reduction="sum").item()
        acc += (lg.argmax(-1) == yy).sum().item()
        n += yy.numel()
    model.train()
    return dict(acc=acc / n, ce=ce / n)


# ------------------------------------------------------------------------------------------------ model


def make(cfg) -> CharLM:
    m = CharLM(cfg)
    for mod in m.modules():  # GPT-2 style init
        if isinstance(mod, (nn.Linear, nn.Embedding)):
            nn.init.normal_(mod.weight, 0.0, 0.02)
            if isinstance(mod, nn.Linear) and mod.bias is not None:
                nn.init.zeros_(mod.bias)
    return m


def load(path: str) -> CharLM:
    ck = torch.load(path, weights_only=False)
    m = CharLM(ck["config"])
    m.load_state_dict(ck["state"])
    return m


def save(m: CharLM, path: str) -> None:
    torch.save({"config": m.config, "state": m.state_dict()}, path)


def n_params(m: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only)


class LoRA(nn.Module):
    def __init__(self, base: nn.Linear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = nn.Parameter(torch.randn(r, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


def add_lora(m: CharLM, r: int, alpha: float | None = None) -> CharLM:
    alpha = float(2 * r) if alpha is None else alpha
    for p in m.parameters():
        p.requires_grad_(False)
    for blk in m.blocks:
        blk.attn.qkv = LoRA(blk.attn.qkv, r, alpha)
        blk.attn.proj = LoRA(blk.attn.proj, r, alpha)
        blk.mlp[0] = LoRA(blk.mlp[0], r, alpha)
        blk.mlp[2] = LoRA(blk.mlp[2], r, alpha)
    return m


# ------------------------------------------------------------------------------------------------ export


def cosine_lr(step: int, total: int, lr: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def cmd_export(a, data: Data, log) -> None:
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    cfg = STUDENT if a.model == "student" else TEACHER
    m = make(cfg)
    teacher = load(a.teacher).eval() if a.teacher else None
    opt = torch.optim.AdamW(m.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    budget = a.minutes * 60
    t0 = time.perf_counter()
    total, step, calib = 10**9, 0, 30
    while True:
        if step == calib:
            rate = calib / (time.perf_counter() - t0)
            total = int(budget * rate)
        if step >= total:
            break
        for gr in opt.param_groups:
            gr["lr"] = cosine_lr(step, total, a.lr, a.warmup)
        x, y = batch_from(data.export_tok, a.batch, g)
        lg = m.sequence_logits(x.float())
        ce = F.cross_entropy(lg.reshape(-1, 256), y.reshape(-1))
        if teacher is not None:
            with torch.no_grad():
                tl = teacher.sequence_logits(x.float())
            kl = F.kl_div(
                F.log_softmax(lg / a.T, -1).reshape(-1, 256),
                F.log_softmax(tl / a.T, -1).reshape(-1, 256),
                log_target=True,
                reduction="batchmean",
            )
            loss = a.alpha * a.T**2 * kl + (1 - a.alpha) * ce
        else:
            loss = ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 500 == 0:
            print(f"step {step}/{total} ce {ce.item():.3f} {time.perf_counter() - t0:.0f}s", flush=True)
    wall = time.perf_counter() - t0
    ev = evaluate(m, data.ex, data.ey)
    if a.save:
        save(m, a.save)
    log(
        dict(
            exp="export",
            model=a.model,
            lr=a.lr,
            minutes=a.minutes,
            batch=a.batch,
            warmup=a.warmup,
            kd=bool(teacher),
            T=a.T if teacher else None,
            alpha=a.alpha if teacher else None,
            steps=step,
            wall_s=wall,
            steps_per_s=step / wall,
            params=n_params(m),
            **ev,
            save=a.save,
        )
    )


# ------------------------------------------------------------------------------------------------ federated


def local_train(m: nn.Module, params, t: torch.Tensor, a, g: torch.Generator, steps: int, opt=None) -> None:
    if a.local == "sgd":
        opt = torch.optim.SGD(params, lr=a.lr)
    elif opt is None:
        opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
    for s in range(steps):
        if a.local == "adamw" and a.warmup:
            for gr in opt.param_groups:
                gr["lr"] = a.lr * min(1.0, (s + 1) / a.warmup)
        x, y = batch_from(t, a.batch, g)
        loss = F.cross_entropy(m.sequence_logits(x.float()).reshape(-1, 256), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip:
            torch.nn.utils.clip_grad_norm_(params, a.clip)
        opt.step()


def cmd_fed(a, data: Data, log) -> None:
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    m = load(a.init)
    if a.lora:
        add_lora(m, a.lora)
    params = [p for p in m.parameters() if p.requires_grad]
    n_upd = sum(p.numel() for p in params)
    ev0 = evaluate(m, data.ex, data.ey)
    curve = [dict(round=0, **ev0)]
    print(f"round 0 {ev0} update params {n_upd}", flush=True)
    n_k = [len(t) for t in data.dev_tok]
    t_local, n_local = 0.0, 0
    t0 = time.perf_counter()
    if a.centralized:
        pooled = torch.cat(data.dev_tok)
        opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0) if a.local == "adamw" else None
        for r in range(1, a.rounds + 1):
            ts = time.perf_counter()
            # same samples per round as the fleet (devices × steps × batch); warmup only at the very start
            wu, a.warmup = a.warmup, (a.warmup if r == 1 else 0)
            local_train(m, params, pooled, a, g, N_DEV * a.steps, opt)
            a.warmup = wu
            t_local += time.perf_counter() - ts
            n_local += N_DEV * a.steps
            ev = evaluate(m, data.ex, data.ey)
            curve.append(dict(round=r, **ev))
            print(f"round {r} {ev} {time.perf_counter() - t0:.0f}s", flush=True)
    else:
        glob = [p.detach().clone() for p in params]
        mom = [torch.zeros_like(p) for p in params]
        vel = [torch.zeros_like(p) for p in params]
        for r in range(1, a.rounds + 1):
            delta = [torch.zeros_like(p) for p in params]
            for k, t in enumerate(data.dev_tok):
                with torch.no_grad():
                    for p, g0 in zip(params, glob, strict=True):
                        p.copy_(g0)
                ts = time.perf_counter()
                local_train(m, params, t, a, g, a.steps)
                t_local += time.perf_counter() - ts
                n_local += a.steps
                w = n_k[k] / sum(n_k)
                with torch.no_grad():
                    for d, p, g0 in zip(delta, params, glob, strict=True):
                        d += w * (p - g0)
            with torch.no_grad():
                for i, (d, g0) in enumerate(zip(delta, glob, strict=True)):
                    if a.server == "avg":
                        g0 += a.slr * d
                    elif a.server == "avgm":
                        mom[i] = a.smom * mom[i] + d
                        g0 += a.slr * mom[i]
                    elif a.server == "adam":
                        mom[i] = 0.9 * mom[i] + 0.1 * d
                        vel[i] = 0.99 * vel[i] + 0.01 * d * d
                        g0 += a.slr * mom[i] / (vel[i].sqrt() + a.tau)
                for p, g0 in zip(params, glob, strict=True):
                    p.copy_(g0)
            ev = evaluate(m, data.ex, data.ey)
            curve.append(dict(round=r, **ev))
            print(f"round {r} {ev} {time.perf_counter() - t0:.0f}s", flush=True)
    if a.save:
        if a.lora:  # merge adapters into the base weights
            for blk in m.blocks:
                for holder, key in ((blk.attn, "qkv"), (blk.attn, "proj"), (blk.mlp, "0"), (blk.mlp, "2")):
                    lo = getattr(holder, key) if key.isalpha() else holder[int(key)]
                    with torch.no_grad():
                        lo.base.weight += (lo.B @ lo.A) * lo.scale
                    if key.isalpha():
                        setattr(holder, key, lo.base)
                    else:
                        holder[int(key)] = lo.base
        save(m, a.save)
    log(
        dict(
            exp="fed",
            tag=a.tag,
            init=a.init,
            centralized=a.centralized,
            local=a.local,
            lr=a.lr,
            steps=a.steps,
            batch=a.batch,
            clip=a.clip,
            warmup=a.warmup,
            server=a.server,
            slr=a.slr,
            smom=a.smom,
            tau=a.tau,
            lora=a.lora,
            rounds=a.rounds,
            update_params=n_upd,
            update_bytes_fp32=4 * n_upd,
            s_per_local_step=t_local / max(1, n_local),
            wall_s=time.perf_counter() - t0,
            curve=curve,
        )
    )


# ------------------------------------------------------------------------------------------------ personal / forgetting


def cmd_personal(a, data: Data, log) -> None:
    torch.manual_seed(a.seed)
    g = torch.Generator().manual_seed(a.seed)
    rows = []
    for k, name in enumerate(data.devs):
        x, y = eval_windows([data.dev_test[k]], 0)
        m = load(a.init)
        before = evaluate(m, x, y)
        add_lora(m, a.lora)
        params = [p for p in m.parameters() if p.requires_grad]
        local_train(m, params, data.dev_tok[k], a, g, a.steps)
        after = evaluate(m, x, y)
        rows.append(dict(device=name, positions=int(y[:, SCORE_FROM:].numel()), before=before, after=after))
        print(name, before, after, flush=True)
    mean = lambda key, f: float(np.mean([r[key][f] for r in rows]))  # noqa: E731
    log(
        dict(
            exp="personal",
            init=a.init,
            lora=a.lora,
            lr=a.lr,
            steps=a.steps,
            batch=a.batch,
            acc_before=mean("before", "acc"),
            acc_after=mean("after", "acc"),
            ce_before=mean("before", "ce"),
            ce_after=mean("after", "ce"),
            rows=rows,
        )
    )


def cmd_forget(a, data: Data, log) -> None:
    k = a.device
    old_x, old_y = eval_windows([data.export], EVAL_WINDOWS)
    new_x, new_y = eval_windows([data.dev_test[k]], 0)
    out = dict(exp="forget", init=a.init, device=data.devs[k], steps=a.steps, lr=a.lr, batch=a.batch, runs={})
    for replay in (0.0, 0.25):
        torch.manual_seed(a.seed)
        g = torch.Generator().manual_seed(a.seed)
        m = load(a.init)
        before = dict(old=evaluate(m, old_x, old_y), new=evaluate(m, new_x, new_y), held=evaluate(m, data.ex, data.ey))
        opt = torch.optim.AdamW(m.parameters(), lr=a.lr, betas=(0.9, 0.99), weight_decay=0.0)
        n_old = round(a.batch * replay)
        for s in range(a.steps):
            for gr in opt.param_groups:
                gr["lr"] = a.lr * min(1.0, (s + 1) / 10)
            x, y = batch_from(data.dev_tok[k], a.batch - n_old, g)
            if n_old:
                xo, yo = batch_from(data.export_tok, n_old, g)
                x, y = torch.cat([x, xo]), torch.cat([y, yo])
            loss = F.cross_entropy(m.sequence_logits(x.float()).reshape(-1, 256), y.reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opt.step()
        after = dict(old=evaluate(m, old_x, old_y), new=evaluate(m, new_x, new_y), held=evaluate(m, data.ex, data.ey))
        out["runs"][str(replay)] = dict(before=before, after=after)
        print(replay, before, after, flush=True)
    log(out)


def cmd_data(a, data: Data, log) -> None:
    log(
        dict(
            exp="data",
            export_bytes=len(data.export),
            held=data.held,
            held_bytes=[len(t) for t in data.held_texts],
            devs=data.devs,
            dev_bytes=[len(t) for t in data.dev_texts],
            eval_windows=len(data.ex),
            **data.baselines,
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/lmprobe")
    p.add_argument(
        "--text", type=Path, default=TEXT, help="Tiny Shakespeare (default: ../shared/data beside the clone)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("data", help="print the split and the unigram/bigram baselines")
    e = sub.add_parser("export", help="train release 1 on the export text for a wall-time budget")
    e.add_argument("--model", choices=["student", "teacher"], default="student")
    e.add_argument("--minutes", type=float, default=2.0)
    e.add_argument("--lr", type=float, default=3e-3)
    e.add_argument("--batch", type=int, default=32)
    e.add_argument("--warmup", type=int, default=100)
    e.add_argument("--teacher", default=None, help="checkpoint of a teacher: train the student with KD")
    e.add_argument("--T", type=float, default=2.0)
    e.add_argument("--alpha", type=float, default=0.5)
    e.add_argument("--save", default=None)
    for name, help_ in (
        ("fed", "simulated federated fine-tuning (or --centralized) from a release"),
        ("personal", "per-device LoRA adapters on 80 %% of the speaker's text, scored on its last 20 %%"),
        ("forget", "fine-tune on one device's text: export-text accuracy before/after, with/without replay"),
    ):
        f = sub.add_parser(name, help=help_)
        f.add_argument("--init", required=True)
        f.add_argument("--local", choices=["sgd", "adamw"], default="adamw")
        f.add_argument("--lr", type=float, default=2e-3)
        f.add_argument("--steps", type=int, default=20)
        f.add_argument("--batch", type=int, default=16)
        f.add_argument("--clip", type=float, default=1.0)
        f.add_argument("--warmup", type=int, default=5)
        f.add_argument("--lora", type=int, default=0 if name != "personal" else 4)
        f.add_argument("--save", default=None)
        if name == "fed":
            f.add_argument("--rounds", type=int, default=30)
            f.add_argument("--server", choices=["avg", "avgm", "adam"], default="avg")
            f.add_argument("--slr", type=float, default=1.0)
            f.add_argument("--smom", type=float, default=0.9)
            f.add_argument("--tau", type=float, default=1e-3)
            f.add_argument("--centralized", action="store_true")
            f.add_argument("--tag", default="")
        if name == "forget":
            f.add_argument("--device", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    def log(rec: dict) -> None:
        print(json.dumps({k: v for k, v in rec.items() if k not in ("curve", "rows")}), flush=True)
        with open(out / "results.jsonl", "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    data = Data(a.text)
    {"data": cmd_data, "export": cmd_export, "fed": cmd_fed, "personal": cmd_personal, "forget": cmd_forget}[a.cmd](
        a, data, log
    )


if __name__ == "__main__":
    main()

"""Incremental learning, one step at a time: new samples from the store mixed with reservoir replay,
paced by the budget governor, checkpointed atomically so that `kill -9` at any moment loses at most
the steps since the last checkpoint.

Checkpoint (`checkpoint.safetensors`, temp → fsync → rename → fsync dir): θ_local per parameter, the
replay buffer, the distinct sample ids of the job, and JSON metadata: job (round, base version, steps
done/total, lr, μ), store position, replay RNG state and pending update ids. Plain SGD keeps no other
optimizer state.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edge_runtime.budget import PAUSE, Governor, apply_threads
from edge_runtime.engines import EagerEngine, TrainEngine
from edge_runtime.lora import LoraEngine
from edge_runtime.optim import LocalOptimizer, clip_grads_
from edge_runtime.samples import ReplayBuffer, SampleStore
from edgelearn.atomic import write_bytes
from edgelearn.protocol import LocalConfig, read_metadata
from edgelearn.schedule import lr_at

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.safetensors"
PLAN_STEPS = 8  # batches assembled at once


@dataclass
class Job:
    """`steps` SGD steps from release `base_version`; `round` 0 = learning outside a FedAvg round;
    `seq` ≥ 1 = the device's asynchronous update number (0 for round jobs). Mutable: the learner
    advances `steps_done`, `loss` and `train_s` in place (no copy per step)."""

    round: int
    base_version: int
    steps: int
    batch_size: int
    lr: float
    mu: float = 0.0
    steps_done: int = 0
    loss: float = float("nan")
    train_s: float = 0.0
    seq: int = 0
    optimizer: str = "sgd"  # the recipe's rest (protocol.LocalConfig): optimizer, warm-up, schedule, clipping
    warmup_steps: int = 0
    schedule: str = "constant"
    clip_norm: float = 0.0
    lora_rank: int = 0  # ≥ 1: train and send low-rank adapters (protocol v1.3); 0: full update

    @classmethod
    def of(cls, round: int, base_version: int, local: LocalConfig, mu: float = 0.0, seq: int = 0) -> Job:
        """The job that carries out the recipe `local`."""
        return cls(round, base_version, local.steps, local.batch_size, local.lr, mu, seq=seq,
                   optimizer=local.optimizer, warmup_steps=local.warmup_steps, schedule=local.schedule,
                   clip_norm=local.clip_norm, lora_rank=local.lora_rank)  # fmt: skip

    def lr_at_step(self) -> float:
        """The learning rate of the next step (warm-up, then constant or cosine)."""
        return lr_at(self.steps_done, self.steps, self.lr, self.warmup_steps, self.schedule)

    @property
    def key(self) -> tuple[int, int, int]:
        """What identifies a job across restarts: (round, base_version, seq)."""
        return self.round, self.base_version, self.seq


@dataclass(frozen=True)
class JobResult:
    job: Job
    deltas: dict[str, np.ndarray]  # Δ = θ_local − θ_base
    num_samples: int


def mix_counts(batch_size: int, n_new: int, n_replay: int) -> tuple[int, int]:
    """(new, replay) rows of a batch: half new (all of it when replay is empty), the rest replay."""
    new = min(n_new, batch_size if n_replay == 0 else max(1, batch_size // 2))
    return new, min(n_replay, batch_size - new)


class Learner:
    def __init__(
        self,
        engine: TrainEngine,
        store: SampleStore,
        state_dir: Path,
        governor: Governor | None = None,
        replay_size: int = 2000,
        checkpoint_every_s: float = 5.0,
    ) -> None:
        self.full_engine: TrainEngine = engine  # the release's engine; a LoRA job trains adapters on top of it
        self.engine, self.store, self.governor = engine, store, governor
        self.path = state_dir / CHECKPOINT
        for tmp in state_dir.glob(f".{CHECKPOINT}.*.tmp"):  # left by a crash while writing; never read
            tmp.unlink(missing_ok=True)
        self.replay = ReplayBuffer(replay_size)
        self.cursor = 0  # next store seq to learn from
        self.offered = 0  # store seqs below this were offered to the replay reservoir (each exactly once)
        self.job: Job | None = None
        self.base: dict[str, np.ndarray] = engine.state()
        self._seen: list[np.ndarray] = []  # seq ids of the job's batches, compacted now and then
        self.checkpoint_every_s = checkpoint_every_s
        self._last_ckpt_s = time.monotonic()
        self._plan: deque = deque()
        self._plan_batch_size = 0
        self.opt = LocalOptimizer("sgd", engine.params)  # replaced by the job's at start / restore
        self.eager_factory: Callable[[], TrainEngine] | None = None  # an eager engine on the release, for LoRA
        self._eager: TrainEngine | None = None
        self.s_per_step: float | None = None  # measured, smoothed (EMA 0.8): what a round job's size plans with

    # ------------------------------------------------------------ jobs

    def start(self, job: Job, base: dict[str, np.ndarray]) -> None:
        """Begin `job` from θ_base (resumes instead if the checkpoint holds the same job)."""
        if self.job and self.job.key == job.key:
            self.job.steps = job.steps  # resumed from the checkpoint
            return
        self.engine = self._engine_for(job)
        self.engine.load(base)
        self.base = self.engine.state()  # θ_base of the trainable tensors (zero adapters in a LoRA job)
        self.job, self._seen = job, []
        self.opt = LocalOptimizer(job.optimizer, self.engine.params)
        self._plan.clear()

    def step(self) -> str:
        """One training step if the budget allows: 'stepped', 'paused', 'no-data' or 'done'."""
        job = self.job
        if job is None or job.steps_done >= job.steps:
            return "done"
        batch_size = job.batch_size
        if self.governor is not None:
            d = self.governor.check()
            if d.action == PAUSE:
                return "paused"
            batch_size = min(batch_size, d.batch_size)
            apply_threads(d.threads)
        batch = self._batch(batch_size)
        if batch is None:
            return "no-data"
        t0 = time.monotonic()
        loss, grads = self.engine.loss_and_grads(batch[0], batch[1])
        clip_grads_(grads, job.clip_norm)
        self.opt.step(self.engine.params, grads, self.engine.anchor, job.lr_at_step(), job.mu)
        t1 = time.monotonic()
        if self.governor is not None:
            self.governor.record_training(t0, t1)
        self.s_per_step = t1 - t0 if self.s_per_step is None else 0.8 * self.s_per_step + 0.2 * (t1 - t0)
        job.steps_done, job.loss, job.train_s = job.steps_done + 1, loss, job.train_s + t1 - t0
        if t1 - self._last_ckpt_s >= self.checkpoint_every_s:
            self.save()
        return "stepped"

    def _batch(self, batch_size: int) -> tuple[np.ndarray, np.ndarray] | None:
        """The next planned batch (a new plan when none is left or the batch size changed)."""
        if not self._plan or self._plan_batch_size != batch_size:
            self._plan, self._plan_batch_size = self._make_plan(batch_size, PLAN_STEPS), batch_size
        if not self._plan:
            return None
        x, y, seq, cursor = self._plan.popleft()
        self.cursor = cursor
        self._seen.append(seq)
        if len(self._seen) > 512:
            self._seen = [self.seen_ids()]
        return x, y

    def _make_plan(self, batch_size: int, k: int) -> deque:
        """Up to `k` batches from one store read, one reservoir offer and one replay draw (per-step overhead
        matters for small models). The store position advances only as batches are used; a plan dropped
        (new batch size, job end) re-reads its samples, which are not offered to the reservoir again."""
        fresh = self.store.read(self.cursor, batch_size * k) or (np.zeros(0), np.zeros(0), np.zeros(0, np.int64))
        n_fresh = len(fresh[2])
        if n_fresh:
            if fresh[2][0] >= self.offered:  # the usual case: all new, offered without a copy
                self.replay.offer(*fresh)
            else:  # a plan dropped mid-way re-reads rows already offered
                unseen = fresh[2] >= self.offered
                self.replay.offer(*(a[unseen] for a in fresh))
            self.offered = max(self.offered, int(fresh[2][-1]) + 1)
        counts, left = [], n_fresh
        for _ in range(k):
            n_new, n_rep = mix_counts(batch_size, left, len(self.replay))
            if n_new + n_rep == 0:
                break
            counts.append((n_new, n_rep))
            left -= n_new
        if not counts:
            return deque()
        rx, ry, rs = self.replay.draw(sum(c[1] for c in counts))
        pool = [np.concatenate((f, r)) for f, r in zip(fresh, (rx, ry, rs), strict=True)] if n_fresh else [rx, ry, rs]
        order, ends, i, j = [], [], 0, n_fresh  # pool rows: fresh first, then the replay draws
        for n_new, n_rep in counts:
            order += [np.arange(i, i + n_new), np.arange(j, j + n_rep)]
            i, j = i + n_new, j + n_rep
            ends.append((n_new + n_rep, int(fresh[2][i - 1]) + 1 if i else self.cursor))
        px, py, ps = (a[np.concatenate(order)] for a in pool)  # one gather; each batch is then a view
        plan: deque[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = deque()
        at = 0
        for n, cursor in ends:
            plan.append((px[at : at + n], py[at : at + n], ps[at : at + n], cursor))
            at += n
        return plan

    def seen_ids(self) -> np.ndarray:
        """Distinct sample ids that went into the job's steps (num_samples of the update)."""
        return np.unique(np.concatenate(self._seen)) if self._seen else np.zeros(0, np.int64)

    def finish(self) -> JobResult:
        """Δ of the finished job; the job stays in the checkpoint until `clear()`."""
        assert self.job is not None, "finish() without a job"
        theta = self.engine.state()
        return JobResult(self.job, {n: theta[n] - self.base[n] for n in theta}, max(1, len(self.seen_ids())))

    def clear(self, pending: list[str] | None = None) -> None:
        self.job = None
        self.save(pending)

    def _engine_for(self, job: Job) -> TrainEngine:
        """The release's engine, or adapters on an eager engine for a LoRA job (the ExecuTorch training program
        has no adapters: `eager_factory` builds an eager engine on the same weights; without one, or when this
        host cannot build the model, the job trains the full weights, an update the protocol also accepts)."""
        if not job.lora_rank:
            return self.full_engine
        inner, factory = self.full_engine, self.eager_factory
        if not isinstance(inner, EagerEngine) and factory is not None:
            try:
                self.eager_factory, self._eager = None, factory()  # built once per release
            except Exception as e:  # no model code on this host: full updates are still valid
                log.warning("no eager engine for LoRA (%s)", e)
        inner = self._eager or inner
        if not isinstance(inner, EagerEngine):
            log.warning("LoRA rank %d asked, engine %s trains full weights", job.lora_rank, inner.name)
            return inner
        return LoraEngine(inner, job.lora_rank, job.base_version)

    # ------------------------------------------------------------ checkpoint

    def save(self, pending: list[str] | None = None) -> None:
        """Atomic checkpoint of everything needed to resume (see module docstring)."""
        tensors = {f"w.{n}": v for n, v in self.engine.state().items()}
        tensors.update({f"base.{n}": v for n, v in self.base.items()})
        tensors.update(self.replay.tensors())
        tensors["seen"] = self.seen_ids()
        tensors.update(self._plan_tensors())
        tensors.update({f"opt.{k}": v for k, v in self.opt.state().items()})
        meta = {
            "job": asdict(self.job) if self.job else None,
            "cursor": self.cursor,
            "offered": self.offered,
            "replay_seen": self.replay.n_seen,
            "replay_rng": self.replay.rng.bit_generator.state,
            "pending": pending or [],
            "plan": [[len(b[2]), b[3]] for b in self._plan],  # rows and cursor of each batch still planned
            "plan_batch_size": self._plan_batch_size,
        }
        write_bytes(self.path, st_save(tensors, metadata={"meta": json.dumps(meta)}))
        self._last_ckpt_s = time.monotonic()

    def _plan_tensors(self) -> dict[str, np.ndarray]:
        """The batches of the current plan not yet used: a resume takes exactly these next, so it continues
        as if never interrupted (the reservoir and its RNG already reflect the whole plan)."""
        if not self._plan:
            return {}
        return {f"plan_{k}": np.concatenate([b[i] for b in self._plan]) for i, k in enumerate(("x", "y", "seq"))}

    def _restore_plan(self, tensors: dict[str, np.ndarray], plan: list[list[int]], batch_size: int) -> None:
        self._plan = _split_plan(tensors, plan) if plan and "plan_seq" in tensors else deque()
        self._plan_batch_size = batch_size if self._plan else 0

    def restore(self) -> bool:
        """Load the checkpoint if there is one; False if none. A damaged one is logged and ignored."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return False
        try:
            tensors = st_load(data)
            meta = json.loads(read_metadata(data)["meta"])
        except (SafetensorError, ValueError, KeyError) as e:
            log.error("checkpoint %s unreadable (%s): starting from the release weights", self.path, e)
            return False
        self.cursor = int(meta["cursor"])
        self.offered = int(meta.get("offered", self.cursor))
        self.replay.restore(tensors, int(meta["replay_seen"]), meta["replay_rng"])
        self._seen = [tensors["seen"]]
        self._restore_plan(tensors, meta.get("plan", []), int(meta.get("plan_batch_size", 0)))
        self.job = Job(**meta["job"]) if meta["job"] else None
        if self.job:
            self.engine = self._engine_for(self.job)
            self.opt = LocalOptimizer(self.job.optimizer, self.engine.params)
            self.opt.load_state({k[4:]: v for k, v in tensors.items() if k.startswith("opt.")})
            self.base = {k[5:]: v for k, v in tensors.items() if k.startswith("base.")}
            self.engine.load(self.base)  # anchor θ_global = θ_base
            self.engine.load_trainable({k[2:]: v for k, v in tensors.items() if k.startswith("w.")})
        log.info("resumed from checkpoint: job %s, store position %d", self.job, self.cursor)
        return True


def _split_plan(tensors: dict[str, np.ndarray], plan: list[list[int]]) -> deque:
    """The saved batches still planned, as (x, y, seq, cursor) (the inverse of `Learner._plan_tensors`)."""
    out: deque[tuple[np.ndarray, np.ndarray, np.ndarray, int]] = deque()
    at = 0
    for n, cursor in plan:
        x, y, seq = (tensors[f"plan_{k}"][at : at + n] for k in ("x", "y", "seq"))
        out.append((x, y, seq, int(cursor)))
        at += n
    return out

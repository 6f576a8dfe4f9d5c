"""Learning without a coordinator: a bundle, a sample stream, a budget and a state folder (Python API + CLI).

`LocalRun` is what the device agent does between rounds, without MQTT: ingest samples, take SGD steps when
the budget allows, checkpoint; after a crash it resumes from the checkpoint. The result is θ_local written
atomically to `state/local-weights.safetensors`.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

from edge_runtime.budget import Budget, Governor, PsutilSource, ReadingSource
from edge_runtime.ingest import Ingestor, open_source
from edge_runtime.learner import Job, Learner
from edge_runtime.lora import LoraEngine
from edge_runtime.release import load_release
from edge_runtime.samples import SampleStore
from edgelearn import lora
from edgelearn.atomic import write_bytes
from edgelearn.bundle import verify_bundle
from edgelearn.protocol import DEFAULT_LOCAL

log = logging.getLogger(__name__)
LOCAL_WEIGHTS = "local-weights.safetensors"
PERSONAL_ADAPTER = "personal-adapter.safetensors"


@dataclass(frozen=True)
class LocalRunConfig:
    """`edgelearn learn`: one local job of `steps` steps on a bundle, from a sample stream, within a budget."""

    bundle_dir: Path
    state_dir: Path
    samples: str | None
    steps: int
    batch_size: int = DEFAULT_LOCAL.batch_size
    lr: float = DEFAULT_LOCAL.lr
    mu: float = 0.0
    engine: str | None = None
    budget: Budget = field(default_factory=Budget)
    replay_size: int = 2000
    checkpoint_every_s: float = 5.0
    idle_s: float = 0.05
    optimizer: str = DEFAULT_LOCAL.optimizer
    lora_rank: int = 0  # ≥ 1: a personal adapter (edgelearn.lora) on the bundle's weights, which stay as they are


class LocalRun:
    def __init__(self, cfg: LocalRunConfig, reading_source: ReadingSource | None = None) -> None:
        self.cfg = cfg
        if cfg.lora_rank:
            lora.check_rank(cfg.lora_rank)
        m = self.manifest = verify_bundle(cfg.bundle_dir)
        active = load_release(cfg.bundle_dir, m)  # smoke-tests infer.pte; knows the class count
        if cfg.lora_rank and cfg.engine == "executorch":
            raise ValueError("--lora-rank trains adapters with the eager engine: drop --engine executorch")
        self.engine = active.engine("eager" if cfg.lora_rank else cfg.engine)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = SampleStore(cfg.state_dir / "samples")
        self.ingest = Ingestor(self.store, active.sample_format(), open_source(cfg.samples), poll_interval_s=0.2)
        self.governor = Governor(cfg.budget, reading_source or PsutilSource())
        self.learner = Learner(
            self.engine, self.store, cfg.state_dir, self.governor, cfg.replay_size, cfg.checkpoint_every_s
        )
        self.resumed_at = self.learner.job.steps_done if self.learner.restore() and self.learner.job else 0
        job = Job(0, m.version, cfg.steps, cfg.batch_size, cfg.lr, cfg.mu, optimizer=cfg.optimizer,
                  lora_rank=cfg.lora_rank)  # fmt: skip
        self.learner.start(job, active.weights)

    def run(self, stop: threading.Event | None = None, until_done: bool = True) -> Job:
        """Ingest and step until the job is done (or `stop`); checkpoints on the way and at the end."""
        stop = stop or threading.Event()
        try:
            while not stop.is_set():
                self.ingest.poll()
                outcome = self.learner.step()
                if outcome == "done":
                    self._write_result()
                    break
                if outcome != "stepped":
                    time.sleep(self.cfg.idle_s)  # paused by the budget or waiting for samples
        finally:
            self.learner.save()
        assert self.learner.job is not None  # started in __init__; only clear() drops it
        return self.learner.job

    def _write_result(self) -> None:
        """θ_local of the trained tensors; for an adapter job, the merged W + B·A it stands for, and the adapter
        itself (B, with the rank and version that define A) in PERSONAL_ADAPTER."""
        engine = self.learner.engine
        if isinstance(engine, LoraEngine):
            meta = {"rank": str(engine.rank), "version": str(engine.version), "model_id": self.manifest.model_id}
            write_bytes(self.cfg.state_dir / PERSONAL_ADAPTER, st_save(engine.state(), metadata=meta))
            theta = engine.merged()
        else:
            theta = engine.state()
        write_bytes(self.cfg.state_dir / LOCAL_WEIGHTS, st_save({n: np.ascontiguousarray(v) for n, v in theta.items()}))

"""Coordinator configuration (frozen): rounds, aggregation, privacy, retention, selection, metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from coordinator.aggregate import DpConfig
from coordinator.optim import ServerOptConfig
from coordinator.rollout import CanaryConfig
from coordinator.selection import Eligibility
from edgelearn.protocol import LocalConfig

MODES = ("sync", "async")
AGGREGATORS = ("mean", "median", "trimmed_mean")


@dataclass(frozen=True)
class CoordinatorConfig:
    broker_url: str
    fleet: str
    bundle_dir: Path
    state_dir: Path
    topic_root: str = "edgelearn"
    min_updates: int = 2
    round_timeout_s: float = 60.0
    local: LocalConfig = field(default_factory=LocalConfig)
    max_update_norm: float = 1e3
    max_samples_per_update: int | None = None
    max_rounds: int | None = None  # stop after this many aggregations (None: run forever)
    tick_s: float = 0.2
    mqtt_v311: bool = False
    mode: str = "sync"  # sync: rounds (protocol v1); async: FedBuff, no round published
    buffer_size: int = 10  # async: aggregate every K accepted updates
    max_staleness: int = 4  # oldest accepted base, in versions behind (sync: late updates of earlier rounds)
    aggregator: str = "mean"  # mean (streaming) | median | trimmed_mean (these hold all K updates)
    trim_fraction: float = 0.1
    clip_norm: float | None = None  # clip each update to this L2 norm before aggregating
    clip_to_median: float | None = 3.0  # k: clip each update to k × the previous round's median norm (None: off)
    dp: DpConfig | None = None  # central DP: clip to C, add N(0, (σC)²) to the sum
    server_opt: ServerOptConfig = field(default_factory=ServerOptConfig)
    canary: CanaryConfig | None = None  # sync mode: each new release is tried on a few devices first
    keep_releases: int = 5
    metrics_port: int | None = None  # Prometheus text format on this port
    metrics_addr: str = "127.0.0.1"
    target_participants: int | None = None  # sync: select this many (× over_selection) among online devices
    over_selection: float = 1.3
    eligibility: tuple[Eligibility, ...] = ()
    selection_grace_s: float = 1.0  # wait for retained statuses before the first selection
    quorum_wait_s: float = 60.0  # sync + selection: open below ⌈min_updates·over_selection⌉ online after this

    def samples_bound(self) -> int:
        """n_max: the samples one update may claim in the FedAvg weights; by default what the round's recipe can
        touch (local steps × batch size); more is clipped (a device cannot buy weight with a large claim)."""
        return self.max_samples_per_update or self.local.steps * self.local.batch_size

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: use one of {MODES}")
        if self.aggregator not in AGGREGATORS:
            raise ValueError(f"aggregator {self.aggregator!r}: use one of {AGGREGATORS}")
        if self.dp is not None and self.aggregator != "mean":
            raise ValueError("central DP needs the mean aggregator (its sensitivity bound is for a sum)")
        if self.keep_releases < 1:
            raise ValueError("keep_releases must be >= 1")
        if self.min_updates < 1 or self.buffer_size < 1:
            raise ValueError("min_updates and buffer_size must be >= 1")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip norm {self.clip_norm} must be > 0 (leave it out for no clipping)")
        if self.clip_to_median is not None and not self.clip_to_median >= 1:
            raise ValueError(f"clip-to-median factor {self.clip_to_median} must be >= 1 (0 on the command line: off)")
        if self.local.steps < 1 or self.local.batch_size < 1 or not self.local.lr >= 0:
            raise ValueError("local steps and batch size must be >= 1 and lr >= 0")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ValueError(f"trim fraction {self.trim_fraction} must be in [0, 0.5)")

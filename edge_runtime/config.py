"""The device agent's settings (`edgelearn device` builds them from a profile and its options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge_runtime.budget import Budget
from edgelearn.protocol import LocalConfig


@dataclass(frozen=True)
class DeviceConfig:
    broker_url: str
    fleet: str
    device_id: str
    state_dir: Path
    topic_root: str = "edgelearn"
    encoding: str = "fp32"
    ack_timeout_s: float = 30.0  # the coordinator acks nothing while it builds a release
    max_outbox: int = 100
    tick_s: float = 0.2
    keepalive_s: int = 30
    mqtt_v311: bool = False  # only for brokers without MQTT 5 (the embedded demo broker)
    budget: Budget = field(default_factory=Budget)
    engine: str | None = None  # None: the faster engine for the model (engines.DEFAULT_ENGINE)
    samples: str | None = None  # JSON-lines file, folder of *.jsonl, or "-" for stdin
    max_store_samples: int = 20000
    replay_size: int = 2000
    mu: float = 0.0  # proximal term μ/2‖θ − θ_global‖²
    checkpoint_every_s: float = 5.0
    public_key_path: Path | None = None  # signed fleet: refuse releases not signed by this ed25519 key
    relay_key_path: Path | None = None  # behind a site relay (v1.4): acks signed by this key count too
    min_release: int = 0  # rollback floor: never install a release older than this, even with no state
    async_interval_s: float = 10.0  # asynchronous mode: least time between two queued updates
    async_local: LocalConfig = field(default_factory=LocalConfig)  # asynchronous mode: the local recipe
    personal_adapter: Path | None = None  # `learn --lora-rank` output: inference runs global + personal

"""Server optimizers applied to the aggregated delta Δ̄ (the negative pseudo-gradient), as pure functions.

Optimizer state (momentum m, second moment v) is a dict of arrays saved with each release, so a
restarted coordinator continues with exactly the state an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Tensors = dict[str, np.ndarray]


@dataclass(frozen=True)
class ServerOptConfig:
    name: str = "fedavg"  # fedavg | fedavgm | fedadam
    lr: float = 1.0  # η (1.0 with fedavg is the protocol's FedAvg)
    momentum: float = 0.9  # β for fedavgm
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # ε-like adaptivity for fedadam

    def __post_init__(self) -> None:
        if self.name not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"unknown server optimizer {self.name!r}: use fedavg, fedavgm or fedadam")


def fedavg_step(theta: Tensors, delta: Tensors, lr: float = 1.0) -> Tensors:
    """θ' = θ + η · Δ̄ for names in Δ̄; others unchanged."""
    return {n: (t + np.float32(lr) * delta[n]).astype(np.float32) if n in delta else t for n, t in theta.items()}


def fedavgm_step(theta: Tensors, delta: Tensors, m: Tensors, lr: float, beta: float) -> tuple[Tensors, Tensors]:
    """m' = β · m + Δ̄;  θ' = θ + η · m'  (FedAvgM, Hsu et al. 2019); m starts at 0."""
    m2 = {n: (np.float32(beta) * m.get(n, 0.0) + d).astype(np.float32) for n, d in delta.items()}
    return fedavg_step(theta, m2, lr), m2


def fedadam_step(
    theta: Tensors, delta: Tensors, m: Tensors, v: Tensors, cfg: ServerOptConfig
) -> tuple[Tensors, Tensors, Tensors]:
    """m' = β₁m + (1−β₁)Δ̄;  v' = β₂v + (1−β₂)Δ̄²;  θ' = θ + η · m' / (√v' + τ)  (Reddi et al. 2021)."""
    b1, b2 = np.float32(cfg.beta1), np.float32(cfg.beta2)
    m2 = {n: (b1 * m.get(n, 0.0) + (1 - b1) * d).astype(np.float32) for n, d in delta.items()}
    v2 = {n: (b2 * v.get(n, 0.0) + (1 - b2) * d * d).astype(np.float32) for n, d in delta.items()}
    step = {n: m2[n] / (np.sqrt(v2[n]) + np.float32(cfg.tau)) for n in delta}
    return fedavg_step(theta, step, cfg.lr), m2, v2


def apply(cfg: ServerOptConfig, theta: Tensors, delta: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
    """One server step; `state` holds `m:{name}` / `v:{name}` arrays; returns (θ', state')."""
    if cfg.name == "fedavg":
        return fedavg_step(theta, delta, cfg.lr), {}
    m = {n[2:]: a for n, a in state.items() if n.startswith("m:")}
    if cfg.name == "fedavgm":
        theta2, m2 = fedavgm_step(theta, delta, m, cfg.lr, cfg.momentum)
        return theta2, {f"m:{n}": a for n, a in m2.items()}
    v = {n[2:]: a for n, a in state.items() if n.startswith("v:")}
    theta2, m2, v2 = fedadam_step(theta, delta, m, v, cfg)
    return theta2, {**{f"m:{n}": a for n, a in m2.items()}, **{f"v:{n}": a for n, a in v2.items()}}

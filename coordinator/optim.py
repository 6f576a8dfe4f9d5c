"""Server optimizers applied to the aggregated delta Δ̄ (the negative pseudo-gradient), as pure functions.

Optimizer state (momentum m, second moment v) is a dict of arrays saved with each release, so a
restarted coordinator continues with exactly the state an uninterrupted one would have.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

Tensors = dict[str, np.ndarray]
SERVER_OPT_NAMES = ("fedavg", "fedavgm", "fedadam")


@dataclass(frozen=True)
class ServerOptConfig:
    name: str = "fedavg"  # fedavg | fedavgm | fedadam
    lr: float = 1.0  # η (1.0 with fedavg is the protocol's FedAvg)
    momentum: float = 0.9  # β for fedavgm
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # ε-like adaptivity for fedadam

    def __post_init__(self) -> None:
        if self.name not in SERVER_OPT_NAMES:
            raise ValueError(f"unknown server optimizer {self.name!r}: use fedavg, fedavgm or fedadam")


# Per-model server optimizer when the operator names none. char-lm: FedAvgM β 0.6 closed 32–36 % of the
# accuracy gap to centralized training in 10 rounds where FedAvg closed 21 % (two seeds), and FedAdam less
# (bench/results/lm_recipe_probe.md §5).
MODEL_SERVER_OPT = {"char-lm": ServerOptConfig("fedavgm", momentum=0.6)}


def default_server_opt(
    model_id: str, name: str | None = None, lr: float | None = None, momentum: float | None = None
) -> ServerOptConfig:
    """The model's default server optimizer, with each field the operator gave (not None) in its place."""
    base = MODEL_SERVER_OPT.get(model_id, ServerOptConfig())
    base = replace(base, name=name) if name is not None else base
    base = replace(base, lr=lr) if lr is not None else base
    return replace(base, momentum=momentum) if momentum is not None else base


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


class ServerOpt:
    """A server optimizer: `step(θ, Δ̄, state) -> (θ', state')`; state arrays are keyed `m:{name}` / `v:{name}`."""

    def __init__(self, cfg: ServerOptConfig) -> None:
        self.cfg = cfg

    def step(self, theta: Tensors, delta: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        raise NotImplementedError


class ServerSgd(ServerOpt):
    """`--server-opt fedavg`: θ' = θ + η · Δ̄ (η = 1 is plain FedAvg); no state."""

    def step(self, theta: Tensors, delta: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        return fedavg_step(theta, delta, self.cfg.lr), {}


class ServerMomentum(ServerOpt):
    """`--server-opt fedavgm`: m' = β · m + Δ̄;  θ' = θ + η · m' (Hsu et al. 2019)."""

    def step(self, theta: Tensors, delta: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        theta2, m2 = fedavgm_step(theta, delta, _part(state, "m"), self.cfg.lr, self.cfg.momentum)
        return theta2, {f"m:{n}": a for n, a in m2.items()}


class ServerAdam(ServerOpt):
    """`--server-opt fedadam`: m' = β₁m + (1−β₁)Δ̄;  v' = β₂v + (1−β₂)Δ̄²;  θ' = θ + η · m' / (√v' + τ)
    (Reddi et al. 2021)."""

    def step(self, theta: Tensors, delta: Tensors, state: Tensors) -> tuple[Tensors, Tensors]:
        theta2, m2, v2 = fedadam_step(theta, delta, _part(state, "m"), _part(state, "v"), self.cfg)
        return theta2, {**{f"m:{n}": a for n, a in m2.items()}, **{f"v:{n}": a for n, a in v2.items()}}


SERVER_OPTS: dict[str, type[ServerOpt]] = {"fedavg": ServerSgd, "fedavgm": ServerMomentum, "fedadam": ServerAdam}


def make_server_opt(cfg: ServerOptConfig) -> ServerOpt:
    return SERVER_OPTS[cfg.name](cfg)


def _part(state: Tensors, key: str) -> Tensors:
    """The `key:{name}` arrays of a saved state, by name."""
    prefix = f"{key}:"
    return {n[len(prefix) :]: a for n, a in state.items() if n.startswith(prefix)}

"""FedAvg as pure functions (protocol v1, "Aggregation")."""

from __future__ import annotations

import numpy as np


def fedavg_weights(num_samples: list[int], max_samples_per_update: int | None = None) -> list[float]:
    """w_k = n_k / Σ_j n_j, with each n clipped to `max_samples_per_update` first."""
    if not num_samples:
        raise ValueError("FedAvg needs at least one update")
    n = [min(k, max_samples_per_update) if max_samples_per_update else k for k in num_samples]
    total = float(sum(n))
    return [k / total for k in n]


def aggregate(
    base: dict[str, np.ndarray],
    deltas: list[dict[str, np.ndarray]],
    num_samples: list[int],
    max_samples_per_update: int | None = None,
) -> dict[str, np.ndarray]:
    """θ_{v+1} = θ_v + Σ_k (n_k / Σ_j n_j) · Δ_k; parameters that no Δ names are returned unchanged."""
    weights = fedavg_weights(num_samples, max_samples_per_update)
    out = {name: np.array(theta, dtype=np.float32, copy=True) for name, theta in base.items()}
    for w, delta in zip(weights, deltas, strict=True):
        for name, d in delta.items():
            out[name] += np.float32(w) * d
    return out

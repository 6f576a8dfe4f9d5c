"""Aggregation math: streaming weighted sums, robust aggregators, clipping, central DP, staleness.

Every aggregator has the same two-call interface: `add(deltas, weight)` for each accepted update,
then `result()` for the aggregated delta Δ̄. `StreamingMean` keeps one running sum (memory O(model));
`Median` and `TrimmedMean` must hold all K updates of a round (memory K × model).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

Tensors = dict[str, np.ndarray]

# The fold reads views of received (immutable) bytes; torch warns on every such read-only view although it
# only reads it. The filter matches that one message.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def fold(acc: Tensors, delta: Tensors, weight: float) -> None:
    """In place: acc_t ← acc_t + w · Δ_t for every tensor t (one pass over Δ, no temporaries)."""
    for name, d in delta.items():
        torch.from_numpy(acc[name]).add_(torch.from_numpy(np.ascontiguousarray(d)), alpha=weight)


def l2_norm(delta: Tensors) -> float:
    """‖Δ‖₂ = sqrt(Σ_t Σ_i Δ_{t,i}²), accumulated in float64.

    Computed by torch on its own thread pool, the one the fold uses: numpy's float64 dot runs in OpenBLAS's
    threads, which keep spinning after the call and starved the next fold on 2 cores (0.04 → 4 ms per 536 KiB
    update, bench/results/relay.md)."""
    norms = [torch.linalg.vector_norm(torch.from_numpy(np.ascontiguousarray(d)).reshape(-1), dtype=torch.float64)
             for d in delta.values()]  # fmt: skip
    return math.sqrt(sum(float(n) ** 2 for n in norms))


def clip_factor(norm: float, max_norm: float) -> float:
    """min(1, C / ‖Δ‖): the scale that brings an update's norm down to at most C."""
    return 1.0 if norm <= max_norm else max_norm / norm


def clip(delta: Tensors, max_norm: float) -> Tensors:
    """clip_C(Δ) = Δ · min(1, C / ‖Δ‖₂) (a new dict; Δ is untouched)."""
    f = np.float32(clip_factor(l2_norm(delta), max_norm))
    return delta if f == 1.0 else {n: d * f for n, d in delta.items()}


def staleness_weight(staleness: int) -> float:
    """FedBuff's discount of an update computed s versions ago: α(s) = 1 / sqrt(1 + s)."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} < 0")
    return 1.0 / math.sqrt(1.0 + staleness)


def sample_weight(num_samples: int, max_samples: int | None) -> float:
    """n_k clipped to the coordinator's max_samples_per_update: min(n_k, n_max)."""
    return float(min(num_samples, max_samples) if max_samples else num_samples)


def noise_seed(secret: int, rnd: int) -> np.random.SeedSequence:
    """The seed of round `rnd`'s DP noise: SeedSequence(secret, spawn_key=(rnd,)) — the same after a crash and
    redo, independent across rounds, and not guessable from the releases without the ≥128-bit secret."""
    return np.random.SeedSequence(secret, spawn_key=(rnd,))


def gaussian_noise(shapes: dict[str, tuple[int, ...]], std: float, seed: int | np.random.SeedSequence) -> Tensors:
    """z_t ~ N(0, std²) i.i.d. per coordinate, from a seeded generator (reproducible after a restart)."""
    rng = np.random.default_rng(seed)
    return {n: rng.normal(0.0, std, size=s).astype(np.float32) for n, s in sorted(shapes.items())}


class StreamingMean:
    """Δ̄ = Σ_k w_k Δ_k / Σ_k w_k, folded one update at a time (memory: one model).

    The running sum is one flat float32 buffer (names in sorted order); `sum[name]` are views into it,
    so an update whose data is already flat in that order folds in a single pass (`add_flat`).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        sizes = {n: int(np.prod(shapes[n], dtype=np.int64)) for n in sorted(shapes)}
        self.flat = np.zeros(sum(sizes.values()), np.float32)
        self._flat_t = torch.from_numpy(self.flat)
        self.sum: Tensors = {}
        offset = 0
        for n, size in sizes.items():
            self.sum[n] = self.flat[offset : offset + size].reshape(shapes[n])
            offset += size
        self.total_weight = 0.0
        self.count = 0

    def add(self, delta: Tensors, weight: float, count: int = 1) -> None:
        """S ← S + w·Δ; `count`: the updates Δ stands for (a site relay's combined update: its devices)."""
        fold(self.sum, delta, weight)
        self.total_weight += weight
        self.count += count

    def add_flat(self, flat_delta: np.ndarray, weight: float, scale: float = 1.0, count: int = 1) -> None:
        """Same as `add` for f·Δ, Δ given as one float32 array in sorted-name order: S ← S + w·f·Δ in one pass
        (f: a clipping factor; it scales the update, not its weight w in Σ w)."""
        self._flat_t.add_(torch.from_numpy(flat_delta), alpha=weight * scale)
        self.total_weight += weight
        self.count += count

    def result(self, denominator: float | None = None) -> Tensors:
        """Σ_k w_k Δ_k / D with D = Σ_k w_k unless given (FedBuff divides by Σ n_k, DP by K)."""
        d = self.total_weight if denominator is None else denominator
        if self.count == 0 or d <= 0:
            raise ValueError("no updates to aggregate")
        return {n: s / np.float32(d) for n, s in self.sum.items()}


def partial_mean(deltas: list[Tensors], weights: list[float], clip_norm: float | None) -> tuple[Tensors, list[float]]:
    """A site's share of FedAvg, and each ‖Δ_k‖₂: Δ_S = Σ_k w_k·f_k·Δ_k / Σ_k w_k with f_k = min(1, C/‖Δ_k‖₂)
    (f_k = 1 without C). Folding W_S·Δ_S with W_S = Σ_k w_k adds Σ_k w_k·f_k·Δ_k: what folding each Δ_k would
    add (up to float32 rounding, ~1e-7 relative)."""
    if not deltas:
        raise ValueError("no updates to combine")
    acc = StreamingMean({n: tuple(d.shape) for n, d in deltas[0].items()})
    norms = [l2_norm(d) for d in deltas]
    for delta, w, norm in zip(deltas, weights, norms, strict=True):
        acc.add(delta, w * (clip_factor(norm, clip_norm) if clip_norm else 1.0))
    return acc.result(float(sum(weights))), norms


class _Buffered:
    """Holds every update of the round (memory: K models); subclasses reduce them coordinate-wise."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes
        self.deltas: list[Tensors] = []
        self.count = 0

    def add(self, delta: Tensors, weight: float, count: int = 1) -> None:  # unweighted: robust rules
        self.deltas.append({n: np.array(delta[n], np.float32) for n in self.shapes})
        self.count += 1

    def result(self, denominator: float | None = None) -> Tensors:
        if not self.deltas:
            raise ValueError("no updates to aggregate")
        return {n: self.reduce(np.stack([d[n] for d in self.deltas])) for n in self.shapes}

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class Median(_Buffered):
    """Coordinate-wise median: Δ̄_i = median_k Δ_{k,i} (mean of the two middle values for even K)."""

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0).astype(np.float32)


class TrimmedMean(_Buffered):
    """Coordinate-wise β-trimmed mean: drop the ⌊βK⌋ smallest and largest Δ_{k,i}, average the rest."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], trim_fraction: float = 0.1) -> None:
        super().__init__(shapes)
        if not 0.0 <= trim_fraction < 0.5:
            raise ValueError(f"trim fraction {trim_fraction} must be in [0, 0.5)")
        self.trim_fraction = trim_fraction

    def reduce(self, stacked: np.ndarray) -> np.ndarray:
        k = math.floor(self.trim_fraction * stacked.shape[0] + 1e-9)  # 0.35 × 180 is 62.99999999999999
        s = np.sort(stacked, axis=0)
        return s[k : stacked.shape[0] - k].mean(axis=0).astype(np.float32)


@dataclass(frozen=True)
class DpConfig:
    """Central DP (DP-FedAvg): clip every update to C, add N(0, (σC)²) to the sum, divide by K."""

    clip_norm: float  # C
    noise_multiplier: float  # σ

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip_norm) and self.clip_norm > 0):
            raise ValueError(f"DP clip norm C={self.clip_norm} must be a number > 0")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"DP noise multiplier σ={self.noise_multiplier} must be a number >= 0")


def dp_mean(sum_of_clipped: Tensors, count: int, dp: DpConfig, seed: int | np.random.SeedSequence) -> Tensors:
    """Δ̄ = (Σ_k clip_C(Δ_k) + z) / K with z ~ N(0, (σ·C)²·I): uniform weights, sensitivity C."""
    if count == 0:
        raise ValueError("no updates to aggregate")
    shapes = {n: s.shape for n, s in sum_of_clipped.items()}
    noise = gaussian_noise(shapes, dp.noise_multiplier * dp.clip_norm, seed)
    return {n: (s + noise[n]) / np.float32(count) for n, s in sum_of_clipped.items()}

"""Aggregation strategies: one class per rule, each turning a round's accepted updates into one Δ̄.

A strategy says how much each update weighs (`weight`), how far an update is clipped before it is
folded (`clip_norm`), what accumulates the round (`accumulator`: one running sum, or every update for
the coordinate-wise rules) and how the accumulated round becomes Δ̄ (`result`). `aggregate` is the
whole rule as one pure call over a list of updates (what the tests check); the coordinator folds the
same way one update at a time, so a round never needs all of its updates in memory unless the rule
does (median, trimmed mean). `make_strategy` picks the class from the coordinator's settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from coordinator import aggregate as agg
from edgelearn.protocol import Update

Tensors = agg.Tensors
Accumulator = agg.StreamingMean | agg.Median | agg.TrimmedMean


@dataclass(frozen=True)
class Strategy:
    """Base: sample-weighted streaming mean; subclasses change one piece each."""

    max_samples: int | None = None  # n_max: a device claims at most this many samples (None: uncapped)
    clip_norm: float | None = None  # C: each Δ_k is scaled to ‖Δ_k‖ ≤ C before it is folded (None: no clip)

    def weight(self, u: Update, version: int, devices: int = 1) -> float:
        """w_k = min(n_k, n_max); a relay's combined update of K devices: min(Σ n, K·n_max) (protocol v1.4)."""
        return agg.sample_weight(u.num_samples, self.samples_cap(devices))

    def samples_cap(self, devices: int = 1) -> int | None:
        """The most samples an update standing for `devices` devices may claim: K·n_max (None: uncapped)."""
        return self.max_samples * devices if self.max_samples else None

    def accumulator(self, shapes: dict[str, tuple[int, ...]]) -> Accumulator:
        return agg.StreamingMean(shapes)

    def result(self, acc: Accumulator, n_total: float, rnd: int) -> Tensors:
        """Σ_k w_k Δ_k / Σ_k w_k."""
        return acc.result()

    def aggregate(self, updates: Sequence[Update], version: int, rnd: int = 0) -> Tensors:
        """Δ̄ of `updates` (computed against the current release `version`), exactly as the coordinator folds it."""
        if not updates:
            raise ValueError("no updates to aggregate")
        acc = self.accumulator({n: tuple(d.shape) for n, d in updates[0].deltas.items()})
        n_total = 0.0
        for u in updates:
            deltas = agg.clip(u.deltas, self.clip_norm) if self.clip_norm else u.deltas
            acc.add(deltas, self.weight(u, version))
            n_total += agg.sample_weight(u.num_samples, self.max_samples)
        return self.result(acc, n_total, rnd)


class WeightedMean(Strategy):
    """FedAvg (McMahan et al. 2017) with late updates: Δ̄ = Σ_k w_k Δ_k / Σ_k w_k, w_k = n_k · α(s_k),
    n_k = min(samples_k, n_max), α(s) = 1/√(1+s), s_k = version − base_k (0 for the round's own updates,
    so a round without late updates is plain FedAvg)."""

    def weight(self, u: Update, version: int, devices: int = 1) -> float:
        """w_k = min(n_k, n_max) · α(version − base_k)."""
        return super().weight(u, version, devices) * agg.staleness_weight(version - u.base_version)


@dataclass(frozen=True)
class FedBuff(Strategy):
    """Asynchronous FedBuff (Nguyen et al. 2022): Δ̄ = Σ_k α(s_k) n_k Δ_k / Σ_k n_k with α(s) = 1/√(1+s),
    s_k = version − base_k (how many releases old the update's base is)."""

    def weight(self, u: Update, version: int, devices: int = 1) -> float:
        """w_k = min(n_k, n_max) · α(version − base_k)."""
        return super().weight(u, version, devices) * agg.staleness_weight(version - u.base_version)

    def result(self, acc: Accumulator, n_total: float, rnd: int) -> Tensors:
        """Σ_k w_k Δ_k / Σ_k n_k (stale updates count fully in the denominator: they are damped, not renormalised)."""
        return acc.result(n_total)


class Median(Strategy):
    """Coordinate-wise median: Δ̄_i = median_k Δ_{k,i}; unweighted (a device cannot buy weight with n_k)."""

    def accumulator(self, shapes: dict[str, tuple[int, ...]]) -> Accumulator:
        return agg.Median(shapes)


@dataclass(frozen=True)
class TrimmedMean(Strategy):
    """Coordinate-wise β-trimmed mean: drop the ⌊βK⌋ smallest and largest Δ_{k,i}, average the rest."""

    trim_fraction: float = 0.1

    def accumulator(self, shapes: dict[str, tuple[int, ...]]) -> Accumulator:
        return agg.TrimmedMean(shapes, self.trim_fraction)


@dataclass(frozen=True)
class DpMean(Strategy):
    """Central DP (DP-FedAvg): Δ̄ = (Σ_k clip_C(Δ_k) + z) / K, z ~ N(0, (σC)²·I), uniform weights.

    The noise of round r is drawn from SeedSequence(secret, spawn_key=(r,)): the same after a crash and
    redo, unguessable without the secret."""

    dp: agg.DpConfig = field(default_factory=lambda: agg.DpConfig(1.0, 0.0))
    secret: int = 0

    def weight(self, u: Update, version: int, devices: int = 1) -> float:
        """w_k = 1 (K for a relay's combined update of K devices): the sensitivity bound C holds for a plain sum."""
        return float(devices)

    def result(self, acc: Accumulator, n_total: float, rnd: int) -> Tensors:
        assert isinstance(acc, agg.StreamingMean)
        return agg.dp_mean(acc.sum, acc.count, self.dp, agg.noise_seed(self.secret, rnd))


def make_strategy(
    aggregator: str,
    mode: str,
    max_samples: int | None = None,
    clip_norm: float | None = None,
    trim_fraction: float = 0.1,
    dp: agg.DpConfig | None = None,
    dp_secret: int = 0,
) -> Strategy:
    """The strategy for the coordinator's settings: DP, else the robust rule asked for, else FedBuff in
    asynchronous mode and the weighted mean in rounds."""
    if dp is not None:
        return DpMean(max_samples, dp.clip_norm, dp, dp_secret)
    if aggregator == "median":
        return Median(max_samples, clip_norm)
    if aggregator == "trimmed_mean":
        return TrimmedMean(max_samples, clip_norm, trim_fraction)
    if mode == "async":
        return FedBuff(max_samples, clip_norm)
    return WeightedMean(max_samples, clip_norm)

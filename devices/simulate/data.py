"""Non-IID data for a simulated fleet: per-device class mixtures drawn from the digits pool."""

from __future__ import annotations

import numpy as np

from models.data import Split
from models.digits import shard_non_iid


def class_mix(
    k: int, n_classes: int, alpha: float | None, classes_per_device: int, rng: np.random.Generator
) -> np.ndarray:
    """Device k's class probabilities: Dirichlet(α·1) if α is given, else uniform over the label-skew
    classes k·s … k·s + s − 1 (mod C) of `models.digits.shard_non_iid`, s = classes_per_device."""
    if alpha is not None:
        return rng.dirichlet(np.full(n_classes, alpha))
    p = np.zeros(n_classes)
    p[[(k * classes_per_device + j) % n_classes for j in range(classes_per_device)]] = 1.0
    return p / p.sum()


def device_shards(
    pool: Split, n_devices: int, samples_per_device: int | None, alpha: float | None = None,
    classes_per_device: int = 4, seed: int = 0,
) -> list[Split]:  # fmt: skip
    """`samples_per_device` examples per device, class counts ~ Multinomial(m, mix_k).

    Label skew without `samples_per_device` partitions the pool instead (`models.digits.shard_non_iid`:
    every example on exactly one of the devices that own its class) while that leaves each device at
    least 32 examples; past that, examples are drawn as above with m = 32.

    Within a device examples of a class are distinct while the class has enough; across devices they
    may repeat once n_devices · m exceeds the pool (the digits pool has ~1,350 images).
    """
    if alpha is not None and alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if samples_per_device is None:
        if alpha is None and len(pool.y) >= 32 * n_devices:
            return shard_non_iid(pool, n_devices, classes_per_device, seed)
        samples_per_device = max(32, len(pool.y) // n_devices)
    rng = np.random.default_rng(seed)
    n_classes = int(pool.y.max()) + 1
    by_class = [np.flatnonzero(pool.y == c) for c in range(n_classes)]
    shards = []
    for k in range(n_devices):
        counts = rng.multinomial(samples_per_device, class_mix(k, n_classes, alpha, classes_per_device, rng))
        idx = np.concatenate(
            [rng.choice(by_class[c], n, replace=n > len(by_class[c])) for c, n in enumerate(counts) if n]
        )
        rng.shuffle(idx)
        shards.append(Split(pool.x[idx], pool.y[idx]))
    return shards

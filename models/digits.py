"""`digits-mlp`: scikit-learn's bundled digits (no download), split into server / device pool / held-out test,
and the MLP that classifies them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.data import Split


class MLP(nn.Module):
    """Digits classifier: 64 pixels → hidden ReLU layers → 10 logits."""

    def __init__(self, hidden: tuple[int, ...], n_in: int = 64, n_out: int = 10) -> None:
        super().__init__()
        sizes = (n_in, *hidden, n_out)
        for i in range(len(sizes) - 1):
            self.add_module(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.n_layers = len(sizes) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 10)
        for i in range(1, self.n_layers):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.n_layers}")(x)


def mlp_trainable(m: nn.Module, subset: str) -> list[str]:
    """`all` parameters, or the output layer only for `head` / `last`."""
    names = [n for n, _ in m.named_parameters()]
    return names if subset == "all" else [n for n in names if n.startswith(f"fc{m.n_layers}.")]


@dataclass(frozen=True)
class Digits:
    server: Split  # what the exporter trains on
    pool: Split  # what the devices hold (the demo shards it non-IID)
    test: Split  # held out for evaluation


def load_digits(server_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0) -> Digits:
    """Deterministic split of the 1797 digits into server / device pool / test."""
    from sklearn.datasets import load_digits as sk_load

    d = sk_load()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = round(test_fraction * len(y))
    n_server = round(server_fraction * (len(y) - n_test))
    test, server, pool = np.split(order, [n_test, n_test + n_server])
    return Digits(Split(x[server], y[server]), Split(x[pool], y[pool]), Split(x[test], y[test]))


def shard_non_iid(split: Split, n_devices: int, classes_per_device: int = 4, seed: int = 0) -> list[Split]:
    """Label-skewed shards: device k holds mostly `classes_per_device` classes (pathological non-IID split).

    Every example goes to exactly one device: an example of class c goes to a random one of
    the devices that own c (device k owns classes k·s … k·s + s−1 mod 10, s = classes_per_device).
    """
    rng = np.random.default_rng(seed)
    n_classes = int(split.y.max()) + 1
    owners: dict[int, list[int]] = {c: [] for c in range(n_classes)}
    for k in range(n_devices):
        for j in range(classes_per_device):
            owners[(k * classes_per_device + j) % n_classes].append(k)
    buckets: list[list[int]] = [[] for _ in range(n_devices)]
    for i, c in enumerate(split.y):
        cands = owners[int(c)] or list(range(n_devices))
        buckets[int(rng.choice(cands))].append(i)
    return [Split(split.x[b], split.y[b]) for b in buckets]

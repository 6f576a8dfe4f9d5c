"""A user model: scikit-learn's bundled iris flowers (no download), a small MLP teacher and a tiny student.

    edgelearn export --model export.examples.iris:make --target xnnpack-fp32 --out iris-bundle

The contract (models.user.UserModel) is documented in docs/user-models.md.
"""

from __future__ import annotations

import numpy as np
import torch

from models.data import Split
from models.digits import MLP
from models.user import UserModel


def _splits(test_fraction: float = 0.3, seed: int = 0) -> tuple[Split, Split]:
    """Standardised features (z = (x − mean) / std over the training rows), shuffled into train / test."""
    from sklearn.datasets import load_iris

    d = load_iris()
    order = np.random.default_rng(seed).permutation(len(d.target))
    n_test = round(test_fraction * len(order))
    test, train = order[:n_test], order[n_test:]
    mean, std = d.data[train].mean(axis=0), d.data[train].std(axis=0)
    x = ((d.data - mean) / std).astype(np.float32)
    y = d.target.astype(np.int64)
    return Split(x[train], y[train]), Split(x[test], y[test])


def make() -> UserModel:
    """Teacher 4→64→64→3, student 4→8→3 (≈1.5% of the teacher's parameters)."""
    train, test = _splits()
    return UserModel(
        teacher=MLP((64, 64), n_in=4, n_out=3),
        student=MLP((8,), n_in=4, n_out=3),
        example_inputs=(torch.zeros(1, 4),),
        train=train,
        test=test,
        epochs=100,
        lr=1e-2,
    )

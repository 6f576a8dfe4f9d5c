"""The data type every model trains on: numpy arrays x (inputs) and y (labels or next tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Split:
    x: np.ndarray  # (N, ...) float32 inputs: digits pixels / 16, or char-lm byte ids
    y: np.ndarray  # (N,) int64 class ids, or (N, T) next-byte ids

"""Inference with the ExecuTorch runtime on a bundle's `infer.pte`."""

from __future__ import annotations

import numpy as np
import torch

from edgelearn.et_import import runtime_modules


class InferenceProgram:
    """The `forward` method of an inference program, loaded from .pte bytes."""

    def __init__(self, pte: bytes) -> None:
        self._program = runtime_modules()[0].Runtime.get().load_program(pte)
        self._forward = self._program.load_method("forward")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run `forward` on one input of the program's shape; returns the first output as numpy."""
        out = self._forward.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return out[0].numpy()

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy over rows of `x`, one batch-1 call each."""
        pred = np.array([int(self.predict(x[i : i + 1]).argmax()) for i in range(len(x))])
        return float((pred == y).mean()) if len(y) else 0.0

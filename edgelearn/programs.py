"""Inference with the ExecuTorch runtime on a bundle's `infer.pte`."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from edgelearn.bundle import INFER_PTD, INFER_PTE
from edgelearn.et_import import runtime_modules


class InferenceProgram:
    """The `forward` method of an inference program, loaded from .pte bytes and, for a program that keeps its
    constants outside (bundle format 1.1), its data file `data_path` (.ptd)."""

    def __init__(self, pte: bytes, data_path: Path | None = None) -> None:
        runtime = runtime_modules()[0].Runtime.get()
        self._program = runtime.load_program(pte, data_path=data_path)
        self._forward = self._program.load_method("forward")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Run `forward` on one input of the program's shape; returns the first output as numpy."""
        out = self._forward.execute([torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))])
        return out[0].numpy()

    def accuracy(self, x: np.ndarray, y: np.ndarray) -> float:
        """Top-1 accuracy over rows of `x`, one batch-1 call each."""
        pred = np.array([int(self.predict(x[i : i + 1]).argmax()) for i in range(len(x))])
        return float((pred == y).mean()) if len(y) else 0.0


def bundle_program(bundle_dir: Path) -> InferenceProgram:
    """The inference program of a (verified) bundle directory, with its data file if it has one (format 1.1)."""
    data = bundle_dir / INFER_PTD
    return InferenceProgram((bundle_dir / INFER_PTE).read_bytes(), data if data.exists() else None)


@contextmanager
def loaded_program(pte: bytes, data: bytes | None = None) -> Iterator[InferenceProgram]:
    """The inference program `pte`, with its data file's bytes `data` when it keeps its constants outside (a program
    that needs a data file must get it: the runtime does not check)."""
    if data is None:
        yield InferenceProgram(pte)
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, INFER_PTD)
        path.write_bytes(data)
        yield InferenceProgram(pte, path)

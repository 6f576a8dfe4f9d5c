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


class ProgramFileError(ValueError):
    """A .pte or .ptd whose header does not fit the file (truncated, or not one at all): refused before the
    ExecuTorch loader sees it, which crashed (SIGSEGV) on a truncated data file while other threads of the process
    were loading programs (tests/test_programs.py)."""


# (file identifier at bytes 4..8, extended-header magic at 8..12) and the extended header's layout, all
# little-endian: a .pte (ExecuTorch's `_ExtendedHeader`): u32 length, u64 program size, u64 segment base offset,
# u64 segment data size; a .ptd (`FlatTensorHeader`): u32 length, u64 flatbuffer offset, u64 flatbuffer size,
# u64 segment base offset, u64 segment data size.
PTE_MAGIC, PTD_MAGIC = (b"ET12", b"eh00"), (b"FT01", b"FH01")


def check_program_file(head: bytes, size: int, kind: str) -> None:
    """Raise ProgramFileError unless a `kind` ("pte" or "ptd") file of `size` bytes starts with its identifier and,
    when it has an extended header (a file with segments), every region that header names lies inside the file:
    [0, program size) for a .pte, the flatbuffer for a .ptd, and the segments [base, base + data size) for both.
    `head`: the file's first 48 bytes (or all of it, if shorter)."""
    magic = PTE_MAGIC if kind == "pte" else PTD_MAGIC
    if len(head) < 12 or head[4:8] != magic[0]:
        raise ProgramFileError(f"infer.{kind} is not an ExecuTorch {kind} file (no {magic[0].decode()} identifier)")
    if head[8:12] != magic[1]:
        return  # no extended header: a program without segments (constants inside), nothing to check against
    if len(head) < 48:
        raise ProgramFileError(f"infer.{kind} is truncated or damaged: {size} bytes, shorter than its header")
    u64 = [int.from_bytes(head[i : i + 8], "little") for i in range(16, 48, 8)]
    regions = [(0, u64[0]), (u64[1], u64[2])] if kind == "pte" else [(u64[0], u64[1]), (u64[2], u64[3])]
    for start, length in regions:
        if start + length > size:
            raise ProgramFileError(f"infer.{kind} is truncated or damaged: its header names bytes up to "
                                   f"{start + length}, the file has {size}")  # fmt: skip


class InferenceProgram:
    """The `forward` method of an inference program, loaded from .pte bytes and, for a program that keeps its
    constants outside (bundle format 1.1), its data file `data_path` (.ptd). Both are checked first
    (`check_program_file`): ProgramFileError for one the runtime might crash on."""

    def __init__(self, pte: bytes, data_path: Path | None = None) -> None:
        check_program_file(pte[:48], len(pte), "pte")
        if data_path is not None:
            with open(data_path, "rb") as f:
                check_program_file(f.read(48), data_path.stat().st_size, "ptd")
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

"""Speed and size figures for the export report: batch-1 latency timers, sparsity, programs run on test rows.
The quality metrics themselves are in models/quality.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from edgelearn.programs import loaded_program
from models.quality import program_logits

LATENCY_RUNS = 200
WARMUP_RUNS = 20


def sparsity(model: nn.Module) -> float:
    """Share of exactly-zero entries over all nn.Linear weights (what magnitude pruning zeroes)."""
    mats = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    total = sum(p.numel() for p in mats)
    return float(sum(int((p == 0).sum()) for p in mats) / total) if total else 0.0


def median_us(call: Callable[[], object], runs: int = LATENCY_RUNS, warmup: int = WARMUP_RUNS) -> float:
    """Median wall time of `call()` in microseconds over `runs` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        call()
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter()
        call()
        times[i] = time.perf_counter() - t0
    return float(np.median(times) * 1e6)


def eager_latency_us(model: nn.Module, x: torch.Tensor, runs: int = LATENCY_RUNS) -> float:
    """Batch-1 latency of the eager fp32 model under `torch.inference_mode`, one intra-op thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return median_us(lambda: model(x), runs)
    finally:
        torch.set_num_threads(threads)


def pte_latency_us(pte: bytes, x: torch.Tensor, runs: int = LATENCY_RUNS, data: bytes | None = None) -> float:
    """Batch-1 latency of a `.pte`'s `forward` (with its data file `data`) run by the ExecuTorch runtime."""
    with loaded_program(pte, data) as prog:
        return median_us(lambda: prog.predict(x.numpy()), runs)


def pte_logits(pte: bytes, x: np.ndarray, data: bytes | None = None) -> np.ndarray:
    """`forward` of a `.pte` (with its data file `data`) on each row of `x` (batch 1, as the device runs it),
    stacked (N, C)."""
    with loaded_program(pte, data) as prog:
        return program_logits(prog, x)

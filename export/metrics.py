"""Quality and speed figures for the export report: pure metric functions and batch-1 latency timers."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

from edgelearn.programs import InferenceProgram

LATENCY_RUNS = 200
WARMUP_RUNS = 20


def last_target(y: np.ndarray) -> np.ndarray:
    """The label each inference output is scored against: y itself (N,), or the last position of (N, T)."""
    return y[:, -1] if y.ndim == 2 else y


def top1(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy: mean over rows of [argmax_c logits[i, c] == y_i]."""
    y = last_target(y)
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else 0.0


def perplexity(logits: np.ndarray, y: np.ndarray) -> float:
    """exp(mean_i −log softmax(logits_i)[y_i]): the exponential of the mean next-token cross-entropy."""
    y = last_target(y)
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(np.exp(-log_p[np.arange(len(y)), y].mean()))


def quality(logits: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    """{accuracy} for a classifier; {accuracy, perplexity} (next token) for a language model."""
    out = {"accuracy": top1(logits, y)}
    if task == "lm":
        out["perplexity"] = perplexity(logits, y)
    return out


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


def pte_latency_us(pte: bytes, x: torch.Tensor, runs: int = LATENCY_RUNS) -> float:
    """Batch-1 latency of a `.pte`'s `forward` run by the ExecuTorch runtime."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(pte).load_method("forward")
    return median_us(lambda: method.execute([x]), runs)


def pte_logits(pte: bytes, x: np.ndarray) -> np.ndarray:
    """`forward` of a `.pte` on each row of `x` (batch 1, as the device runs it), stacked (N, C)."""
    prog = InferenceProgram(pte)
    return np.concatenate([prog.predict(x[i : i + 1]) for i in range(len(x))])

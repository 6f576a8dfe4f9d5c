"""How good a model or a release is: pure metric functions, and the figures a release carries in its manifest.

Both the exporter (release 1) and the coordinator (every later release) measure a release the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from edgelearn.programs import InferenceProgram
from models.registry import ModelSpec, TaskData


def last_target(y: np.ndarray) -> np.ndarray:
    """The label each inference output is scored against: y itself (N,), or the last position of (N, T)."""
    return y[:, -1] if y.ndim == 2 else y


def top1(logits: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy: mean over rows of [argmax_c logits[i, c] == y_i]."""
    y = last_target(y)
    return float((logits.argmax(axis=1) == y).mean()) if len(y) else 0.0


def cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    """mean_i −log softmax(logits_i)[y_i] (nats), in the logits' dtype."""
    y = last_target(y)
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def perplexity(logits: np.ndarray, y: np.ndarray) -> float:
    """exp(cross_entropy): the exponential of the mean next-token cross-entropy."""
    return float(np.exp(cross_entropy(logits, y)))


def quality(logits: np.ndarray, y: np.ndarray, task: str) -> dict[str, float]:
    """{accuracy} for a classifier; {accuracy, perplexity} (next token) for a language model."""
    out = {"accuracy": top1(logits, y)}
    if task == "lm":
        out["perplexity"] = perplexity(logits, y)
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """The inference logits `model(x)` (N, C), in chunks of `chunk` rows."""
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + chunk])).numpy() for i in range(0, len(x), chunk)])


def program_logits(program: InferenceProgram, x: np.ndarray) -> np.ndarray:
    """`forward` of an inference program on each row of `x` (batch 1, as the device runs it), stacked (N, C)."""
    return np.concatenate([program.predict(x[i : i + 1]) for i in range(len(x))])


def release_metrics(spec: ModelSpec, model: nn.Module, program: InferenceProgram, data: TaskData) -> dict[str, float]:
    """Eager fp32 quality of `model` and quality of its inference program run by ExecuTorch, on the test split:
    {accuracy[, perplexity], accuracy_pte[, perplexity_pte]}."""
    eager = quality(predict_logits(model, data.test.x), data.test.y, spec.task)
    pte = quality(program_logits(program, data.test.x), data.test.y, spec.task)
    return {**eager, **{f"{k}_pte": v for k, v in pte.items()}}

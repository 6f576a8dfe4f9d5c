"""Knowledge distillation and plain supervised training: pure loss functions and one plain loop."""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from export.metrics import top1

log = logging.getLogger(__name__)


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    """α·CE(y, p_s) + (1−α)·T²·KL(p_t^T ‖ p_s^T), KL averaged over the batch.

    p^T = softmax(logits / T); the T² factor keeps the soft term's gradient scale independent of T.
    """
    ce = F.cross_entropy(student_logits, y)
    log_ps = F.log_softmax(student_logits / temperature, dim=-1)  # (B, C)
    log_pt = F.log_softmax(teacher_logits / temperature, dim=-1)  # (B, C)
    kl = F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)
    return alpha * ce + (1.0 - alpha) * temperature**2 * kl


def fit(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float = 3e-3,
    batch_size: int = 32,
    teacher: nn.Module | None = None,
    alpha: float = 0.5,
    temperature: float = 4.0,
    seed: int = 0,
) -> nn.Module:
    """Train `model` with Adam on (x, y); with a `teacher`, on kd_loss instead of cross-entropy."""
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    if teacher is not None:
        teacher.eval()
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(yt), generator=g)
        for i in range(0, len(yt), batch_size):
            idx = perm[i : i + batch_size]
            logits, target = train_logits(model, xt[idx]), yt[idx].reshape(-1)
            if teacher is None:
                loss = F.cross_entropy(logits, target)
            else:
                with torch.no_grad():
                    t_logits = train_logits(teacher, xt[idx])
                loss = kd_loss(logits, t_logits, target, alpha, temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        log.debug("epoch %d loss %.4f", epoch, loss.item())
    return model.eval()


def train_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits that training scores: every position of a sequence model (B·T, V), else the model's (B, C)."""
    if hasattr(model, "sequence_logits"):
        return model.sequence_logits(x).flatten(0, 1)  # type: ignore[operator]
    return model(x)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, chunk: int = 256) -> np.ndarray:
    """The inference logits `model(x)` (N, C), in chunks of `chunk` rows."""
    model.eval()
    return np.concatenate([model(torch.from_numpy(x[i : i + chunk])).numpy() for i in range(0, len(x), chunk)])


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of `model(x)` against y (for sequence targets (N, T): the last position)."""
    return top1(predict_logits(model, x), y)

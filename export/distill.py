"""Knowledge distillation and plain supervised training: pure loss functions and two plain loops.

`fit` runs epochs (the digits model: a few seconds); `fit_for` runs for a wall-time budget, the way a
language model is trained here: AdamW, a linear warm-up then cosine decay (edgelearn.schedule), gradient
clipping, random batches, and a progress line every ~10 % with the time left.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgelearn.schedule import lr_at
from models.quality import predict_logits, top1

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


@dataclass(frozen=True)
class Budget:
    """A wall-time training budget and its recipe (the exporter's; devices have protocol.LocalConfig)."""

    seconds: float
    lr: float = 3e-3
    batch_size: int = 32
    warmup_steps: int = 100
    clip_norm: float = 1.0
    weight_decay: float = 0.01
    calibration_steps: int = 20  # steps timed to size the schedule to the budget
    threads: int = max(1, (os.cpu_count() or 2) - 1)  # leave a core to the rest: 2 threads on 2 busy cores ran
    # 15× slower than 1 (0.12 → ~2 s per teacher step, measured here with another job on the other core)


def fit_for(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    budget: Budget,
    teacher: nn.Module | None = None,
    alpha: float = 0.5,
    temperature: float = 4.0,
    seed: int = 0,
    name: str = "train",
) -> tuple[nn.Module, int]:
    """Train `model` for about `budget.seconds` of wall time; returns (model, steps taken).

    Every `calibration_steps` steps the total is estimated anew, T = steps · budget / elapsed; T shapes the
    cosine schedule and the progress estimate. The loop stops when the budget is spent."""
    threads = torch.get_num_threads()
    torch.set_num_threads(budget.threads)
    try:
        return _fit_for(model, x, y, budget, teacher, alpha, temperature, seed, name)
    finally:
        torch.set_num_threads(threads)


def _fit_for(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    budget: Budget,
    teacher: nn.Module | None,
    alpha: float,
    temperature: float,
    seed: int,
    name: str,
) -> tuple[nn.Module, int]:
    g = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.AdamW(model.parameters(), lr=budget.lr, betas=(0.9, 0.99), weight_decay=budget.weight_decay)
    if teacher is not None:
        teacher.eval()
    model.train()
    t0, total, step, next_report = time.perf_counter(), 0, 0, 0.1
    while True:
        elapsed = time.perf_counter() - t0
        if step and step % budget.calibration_steps == 0:  # re-estimated as the pace changes (a shared machine)
            estimate = max(step + 1, int(step * budget.seconds / max(elapsed, 1e-9)))
            if total == 0:
                log.info("[%s] ~%d steps in %.0fs (%.1f steps/s)", name, estimate, budget.seconds, step / elapsed)
            total = estimate
        if elapsed >= budget.seconds:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total or 10**9, budget.lr, budget.warmup_steps, "cosine")
        idx = torch.randint(0, len(yt), (budget.batch_size,), generator=g)
        loss = _loss(model, teacher, xt[idx], yt[idx], alpha, temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if budget.clip_norm > 0:
            nn.utils.clip_grad_norm_(model.parameters(), budget.clip_norm)
        opt.step()
        step += 1
        if total and step >= next_report * total:
            left = (time.perf_counter() - t0) / step * (total - step)
            log.info("[%s] %3.0f%% (%d/%d steps), loss %.3f, %.0fs left", name, 100 * step / total, step, total,
                     loss.item(), left)  # fmt: skip
            next_report += 0.1
    return model.eval(), step


def _loss(
    model: nn.Module, teacher: nn.Module | None, x: torch.Tensor, y: torch.Tensor, alpha: float, temperature: float
) -> torch.Tensor:
    logits, target = train_logits(model, x), y.reshape(-1)
    if teacher is None:
        return F.cross_entropy(logits, target)
    with torch.no_grad():
        t_logits = train_logits(teacher, x)
    return kd_loss(logits, t_logits, target, alpha, temperature)


def train_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Logits that training scores: every position of a sequence model (B·T, V), else the model's (B, C)."""
    if hasattr(model, "sequence_logits"):
        return model.sequence_logits(x).flatten(0, 1)  # type: ignore[operator]
    return model(x)


@torch.no_grad()
def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of `model(x)` against y (for sequence targets (N, T): the last position)."""
    return top1(predict_logits(model, x), y)

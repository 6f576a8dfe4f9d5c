"""The learning-rate schedule that protocol v1.1's local recipe names, shared by the exporter's training and
the devices' local jobs (one formula, one place)."""

from __future__ import annotations

import math

FINAL_LR_FRACTION = 0.1  # cosine decay ends at η/10


def lr_at(step: int, total: int, lr: float, warmup_steps: int = 0, schedule: str = "constant") -> float:
    """η_t for step t (0-based) of `total`: linear warm-up η·(t+1)/W for t < W; then η (constant) or the
    cosine decay η·(f + (1−f)·(1 + cos(π·(t−W)/(T−W)))/2) from η to f·η, f = FINAL_LR_FRACTION."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule != "cosine" or total <= warmup_steps:
        return lr
    progress = min(1.0, (step - warmup_steps) / max(1, total - warmup_steps))
    f = FINAL_LR_FRACTION
    return lr * (f + (1.0 - f) * 0.5 * (1.0 + math.cos(math.pi * progress)))

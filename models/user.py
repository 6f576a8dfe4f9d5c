"""User models: `--model package.module:factory`, where `factory()` returns a `UserModel` (docs/user-models.md)."""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from models import ModelError
from models.data import Split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class UserModel:
    """What a user factory returns.

    teacher: trained-from-scratch reference (or None to skip distillation); student: the model to ship,
    `student(x)` maps a float32 batch to class logits (B, C); example_inputs: one batch-1 input tuple;
    train / test: numpy splits (x float32, y int64 class ids); trainable: parameter names the device
    trains (None = all); epochs, lr: training settings for teacher and student.
    """

    teacher: nn.Module | None
    student: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    train: Split
    test: Split
    trainable: list[str] | None = None
    epochs: int = 20
    lr: float = 3e-3


def load_factory(ref: str) -> UserModel:
    """Import `package.module`, call `factory()` and check the result; any failure is one ModelError line."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ModelError(f"model {ref!r} must look like package.module:factory")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ModelError(f"cannot load model factory {ref!r}: {type(e).__name__}: {e}") from None
    try:
        made = factory()
    except Exception as e:  # the user's code: any exception is a bad model, reported in one line
        raise ModelError(f"model factory {ref!r} raised {type(e).__name__}: {e}") from None
    return check_user_model(ref, made)


def check_user_model(ref: str, made: Any) -> UserModel:
    """Everything about the factory's result that can be checked before training, each as one ModelError."""
    if not isinstance(made, UserModel):
        raise ModelError(f"model factory {ref!r} returned {type(made).__name__}, not models.user.UserModel")
    ex = made.example_inputs
    if not (isinstance(ex, tuple) and len(ex) == 1 and isinstance(ex[0], torch.Tensor) and ex[0].dim() >= 1
            and ex[0].shape[0] == 1):  # fmt: skip
        raise ModelError(f"model factory {ref!r}: example_inputs must be a tuple of one batch-1 tensor")
    for name, split in (("train", made.train), ("test", made.test)):
        check_split(ref, name, split)
    names = [n for n, _ in made.student.named_parameters()] if isinstance(made.student, nn.Module) else None
    if names is None:
        raise ModelError(f"model factory {ref!r}: student must be a torch.nn.Module")
    unknown = sorted(set(made.trainable or ()) - set(names))
    if made.trainable is not None and (unknown or not made.trainable):
        what = f"names no student parameter has: {', '.join(unknown[:3])}" if unknown else "an empty list"
        raise ModelError(f"model factory {ref!r}: trainable is {what}")
    return made


def check_split(ref: str, name: str, split: Any) -> None:
    """x: non-empty float32 array, one row per label; y: 1-D integer class ids ≥ 0."""
    x, y = getattr(split, "x", None), getattr(split, "y", None)
    if not (isinstance(x, np.ndarray) and isinstance(y, np.ndarray)):
        raise ModelError(f"model factory {ref!r}: {name} split must hold numpy arrays x and y")
    if len(y) == 0 or x.ndim < 1 or len(x) != len(y) or x.dtype != np.float32:
        raise ModelError(f"model factory {ref!r}: {name} split must be non-empty float32 x with one y per row")
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise ModelError(f"model factory {ref!r}: {name} split y must be 1-D integer class ids >= 0, got {y.dtype}")

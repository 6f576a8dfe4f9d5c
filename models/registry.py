"""The model registry: what the export stage trains and the device runs, by model id.

A `ModelSpec` names a model's networks, its trainable subsets and its data loader; `TrainStep` is the
training step both the exporter's training program and the device's eager engine run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from models import ModelError, charlm
from models.data import Split
from models.digits import MLP, load_digits, mlp_trainable
from models.text import read_text, text_splits
from models.user import load_factory

SUBSETS = ("all", "last", "head")


WRAPPED = "net."  # parameter-name prefix of the network inside a TrainStep


class TrainStep(nn.Module):
    """What the training program runs: `(x, y) -> (loss, predicted class)`, loss first as ExecuTorch wants.

    A sequence model (one with `sequence_logits`, y of shape (B, T)) is scored at every position;
    the prediction is always the class of the inference output `net(x)`.
    """

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if hasattr(self.net, "sequence_logits"):
            seq = self.net.sequence_logits(x)  # type: ignore[operator]  # (B, T, V)
            return F.cross_entropy(seq.flatten(0, 1), y.reshape(-1)), seq[:, -1, :].detach().argmax(dim=-1)
        logits = self.net(x)  # (B, classes)
        return F.cross_entropy(logits, y), logits.detach().argmax(dim=-1)


@dataclass(frozen=True)
class TaskData:
    server: Split  # what the exporter trains (and calibrates int8) on
    test: Split  # held out for the report


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    task: str  # "classify" or "lm"
    input_shape: tuple[int, ...]
    make_teacher: Callable[[], nn.Module | None]
    make_student: Callable[[], nn.Module]
    trainable: Callable[[nn.Module, str], list[str]]  # (student, subset) -> parameter names
    load_data: Callable[[Any], TaskData]  # ExportConfig -> data
    default_epochs: int
    lr: float = 3e-3
    default_quant: str = "static"  # PT2E int8 mode when the user gives none
    default_minutes: float | None = None  # train for this wall time instead of default_epochs (export's budget)
    default_distill: bool = True  # train a teacher and distill the student from it
    default_sparsity: float = 0.5  # magnitude pruning of the Linear weights (0: none)


def _digits(cfg: Any) -> TaskData:
    d = load_digits(cfg.server_fraction, seed=cfg.seed)
    return TaskData(d.server, d.test)


def _text(cfg: Any) -> TaskData:
    train, test = text_splits(read_text(cfg.text), charlm.CONTEXT)
    return TaskData(train, test)


MODELS: dict[str, ModelSpec] = {
    "digits-mlp": ModelSpec(
        model_id="digits-mlp",
        task="classify",
        input_shape=(1, 64),
        make_teacher=lambda: MLP((128, 128)),
        make_student=lambda: MLP((32,)),
        trainable=mlp_trainable,
        load_data=_digits,
        default_epochs=60,
    ),
    "char-lm": ModelSpec(
        model_id="char-lm",
        task="lm",
        input_shape=(1, charlm.CONTEXT),
        make_teacher=lambda: charlm.CharLM(charlm.TEACHER),
        make_student=lambda: charlm.CharLM(charlm.STUDENT),
        trainable=charlm.trainable_names,
        load_data=_text,
        default_epochs=2,
        default_quant="dynamic",  # static int8 activations cost the trained LM ~20 points of next-byte accuracy
        default_minutes=3.0,
        # Measured on the full Tiny Shakespeare with --train-minutes 4 (docs/export.md): at equal wall time the KD
        # student lost to the student without KD (0.38 vs 0.45: a teacher step costs ~4 student steps and the
        # teacher was no better, 0.47), and 50 % pruning cost points with no speed-up (dense XNNPACK kernels).
        default_distill=False,
        default_sparsity=0.0,
    ),
}


def get_spec(model_id: str) -> ModelSpec:
    """A registered model, or a user model `package.module:factory` (see docs/user-models.md)."""
    if ":" in model_id:
        return user_spec(model_id)
    if model_id not in MODELS:
        raise ModelError(
            f"unknown model {model_id!r}: choose one of {', '.join(MODELS)} or give package.module:factory"
        )
    return MODELS[model_id]


def user_spec(ref: str) -> ModelSpec:
    """A ModelSpec for the user model `ref`; the factory is called once here and again for each new student."""
    first = load_factory(ref)

    def trainable(student: nn.Module, subset: str) -> list[str]:
        names = [n for n, _ in student.named_parameters()]
        if subset != "all":
            raise ModelError(f"user model {ref!r}: only the trainable subset 'all' (or the factory's list) is known")
        return list(first.trainable) if first.trainable is not None else names

    return ModelSpec(
        model_id=ref,
        task="classify",
        input_shape=tuple(first.example_inputs[0].shape),
        make_teacher=lambda: load_factory(ref).teacher,
        make_student=lambda: load_factory(ref).student,
        trainable=trainable,
        load_data=lambda cfg: TaskData(first.train, first.test),
        default_epochs=first.epochs,
        lr=first.lr,
    )


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())

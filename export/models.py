"""Example models and their registry. Plain nn.Modules, one screen each (nanoGPT style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from export import ExportError, charlm
from export.data import Split, load_digits
from export.text import read_text, text_splits


class MLP(nn.Module):
    """Digits classifier: 64 pixels → hidden ReLU layers → 10 logits."""

    def __init__(self, hidden: tuple[int, ...], n_in: int = 64, n_out: int = 10) -> None:
        super().__init__()
        sizes = (n_in, *hidden, n_out)
        for i in range(len(sizes) - 1):
            self.add_module(f"fc{i + 1}", nn.Linear(sizes[i], sizes[i + 1]))
        self.n_layers = len(sizes) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 64) -> (B, 10)
        for i in range(1, self.n_layers):
            x = F.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.n_layers}")(x)


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
            seq = self.net.sequence_logits(x)  # (B, T, V)
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


def mlp_trainable(m: nn.Module, subset: str) -> list[str]:
    """`all` parameters, or the output layer only for `head` / `last`."""
    names = [n for n, _ in m.named_parameters()]
    return names if subset == "all" else [n for n in names if n.startswith(f"fc{m.n_layers}.")]


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
    ),
}
TARGETS = ("xnnpack-int8", "xnnpack-fp32", "portable")
SUBSETS = ("all", "last", "head")


def get_spec(model_id: str) -> ModelSpec:
    """A registered model, or a user model `package.module:factory` (see docs/user-models.md)."""
    if ":" in model_id:
        from export.user import user_spec

        return user_spec(model_id)
    if model_id not in MODELS:
        raise ExportError(
            f"unknown model {model_id!r}: choose one of {', '.join(MODELS)} or give package.module:factory"
        )
    return MODELS[model_id]


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())

"""Example models and their registry. Plain nn.Modules, one screen each (nanoGPT style)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from export import ExportError


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
    """What the training program runs: `(x, y) -> (loss, predicted class)`, loss first as ExecuTorch wants."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.net(x)  # (B, classes)
        return F.cross_entropy(logits, y), logits.detach().argmax(dim=-1)


@dataclass(frozen=True)
class ModelSpec:
    model_id: str
    task: str
    input_shape: tuple[int, ...]
    make_teacher: Callable[[], nn.Module]
    make_student: Callable[[], nn.Module]
    trainable: Callable[[nn.Module], list[str]]


def _all_params(m: nn.Module) -> list[str]:
    return [n for n, _ in m.named_parameters()]


MODELS: dict[str, ModelSpec] = {
    "digits-mlp": ModelSpec(
        model_id="digits-mlp",
        task="classify",
        input_shape=(1, 64),
        make_teacher=lambda: MLP((128, 128)),
        make_student=lambda: MLP((32,)),
        trainable=_all_params,
    ),
}
TARGETS = ("xnnpack-int8", "xnnpack-fp32", "portable")


def get_spec(model_id: str) -> ModelSpec:
    if model_id not in MODELS:
        raise ExportError(f"unknown model {model_id!r}: choose one of {', '.join(MODELS)}")
    return MODELS[model_id]


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())

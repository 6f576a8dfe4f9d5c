"""Training engines: one SGD step θ ← θ − η(∇ℓ(θ; x, y) + μ(θ − θ_global)) on any model whose training step
takes (x, y) and returns the loss first.

- `EagerEngine`: eager PyTorch on the bundle's fp32 weights (the model from `models.registry`).
- `ExecuTorchEngine`: the bundle's `train.pte` run by the ExecuTorch training runtime (what a C++ device runs).

Both take and give weights as `{name: float32 ndarray}` by the student's parameter names.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from edge_runtime.trainer import TrainProgram
from models.registry import TrainStep, get_spec

log = logging.getLogger(__name__)
ENGINES = ("eager", "executorch")
# The faster engine per model, measured by bench/runtime_bench.py. For the tiny digits student the ExecuTorch
# program was as fast or faster in every run (portable kernels cost little at 64→32→10); for larger models
# ExecuTorch training is 8–30× slower (portable kernels only, STACK-NOTES), so eager is the default otherwise.
DEFAULT_ENGINE = {"digits-mlp": "executorch"}
FALLBACK_ENGINE = "eager"


def default_engine(model_id: str) -> str:
    return DEFAULT_ENGINE.get(model_id, FALLBACK_ENGINE)


class TrainEngine(Protocol):
    """What a learner trains with: weights in and out by parameter name, one step at a time."""

    name: str

    params: list[torch.Tensor]  # the trainable tensors, in a fixed order (what an optimizer steps)
    anchor: list[torch.Tensor]  # θ_global of the same tensors (the loaded release), for FedProx's μ term

    def load(self, weights: dict[str, np.ndarray]) -> None: ...
    def load_trainable(self, weights: dict[str, np.ndarray]) -> None: ...
    def state(self) -> dict[str, np.ndarray]: ...
    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[torch.Tensor]]: ...
    def step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0) -> float: ...


def proximal_sgd_(
    params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor], lr: float, mu: float
) -> None:
    """In place: θ ← θ − η(g + μ(θ − θ_global)); the μ term is ∇ of μ/2‖θ − θ_global‖² (skipped when μ = 0).
    One fused multi-tensor call per update (torch._foreach_*), as torch.optim.SGD does."""
    with torch.no_grad():
        if mu:
            grads = torch._foreach_add(list(grads), torch._foreach_sub(list(params), list(anchor)), alpha=mu)
        torch._foreach_add_(list(params), list(grads), alpha=-lr)


def _as_tensor(a: np.ndarray) -> torch.Tensor:
    a = np.ascontiguousarray(a)
    return torch.from_numpy(a.astype(np.float32) if a.dtype == np.float64 else a)


class EagerEngine:
    """The student `nn.Module` wrapped in models.registry.TrainStep; manual SGD (torch.optim would import dynamo)."""

    name = "eager"

    def __init__(self, model_id: str, weights: dict[str, np.ndarray], trainable: list[str] | None = None) -> None:
        spec = get_spec(model_id)
        net = spec.make_student()
        names = set(trainable or spec.trainable(net, "all"))
        for n, p in net.named_parameters():
            p.requires_grad_(n in names)
        self.step_module = TrainStep(net)
        self._all = dict(net.named_parameters())
        self.trainable = {n: p for n, p in self._all.items() if n in names}  # by name (LoraEngine reads them)
        self.params: list[torch.Tensor] = list(self.trainable.values())
        self.anchor: list[torch.Tensor] = []
        self.load(weights)

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """θ ← weights (every parameter the weights name); the anchor θ_global becomes the loaded trainables."""
        with torch.no_grad():
            for n, p in self._all.items():
                if n in weights:
                    p.copy_(torch.from_numpy(np.asarray(weights[n], dtype=np.float32)))
                elif n in self.trainable:
                    raise ValueError(f"weights lack trainable parameter {n!r}")
        self.anchor = [p.detach().clone() for p in self.params]

    def load_trainable(self, weights: dict[str, np.ndarray]) -> None:
        """θ ← weights for the trainable parameters only; the anchor θ_global stays."""
        with torch.no_grad():
            for n, p in self.trainable.items():
                p.copy_(torch.from_numpy(np.asarray(weights[n], dtype=np.float32)))

    def state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self.trainable.items()}

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[torch.Tensor]]:
        """ℓ(θ; x, y) and ∇ℓ for the trainable parameters, in `params` order."""
        loss = self.step_module(_as_tensor(x), _as_tensor(y))[0]
        return float(loss.detach()), list(torch.autograd.grad(loss, self.params))

    def step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0) -> float:
        loss, grads = self.loss_and_grads(x, y)
        proximal_sgd_(self.params, grads, self.anchor, lr, mu)
        return loss


class ExecuTorchEngine:
    """The bundle's train.pte; parameters alias program memory (TrainProgram keeps the .pte bytes alive)."""

    name = "executorch"

    def __init__(self, pte: bytes, weights: dict[str, np.ndarray], example: tuple[np.ndarray, np.ndarray]) -> None:
        self.program = TrainProgram(pte, weights, example)
        self._names = self.program.names
        self.params: list[torch.Tensor] = [self.program.params[n] for n in self._names]
        self.anchor: list[torch.Tensor] = []
        self.load(weights)

    def load(self, weights: dict[str, np.ndarray]) -> None:
        self.program.load(weights)
        self.anchor = [torch.from_numpy(np.asarray(weights[n], dtype=np.float32)).clone() for n in self._names]

    def load_trainable(self, weights: dict[str, np.ndarray]) -> None:
        self.program.load(weights)

    def state(self) -> dict[str, np.ndarray]:
        return self.program.state()

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[torch.Tensor]]:
        """ℓ and ∇ℓ in `params` order; the gradients alias program memory until the next call."""
        loss, grads = self.program.forward_backward(x, y)
        return loss, [grads[n] for n in self._names]

    def step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0) -> float:
        loss, grads = self.loss_and_grads(x, y)
        proximal_sgd_(self.params, grads, self.anchor, lr, mu)
        return loss


def make_engine(
    kind: str | None,
    model_id: str,
    task: str,
    weights: dict[str, np.ndarray],
    train_pte: bytes | None,
    example: tuple[np.ndarray, np.ndarray],
    trainable: list[str] | None = None,
) -> TrainEngine:
    """`kind` or the model's default; eager falls back to ExecuTorch for a model this host cannot build,
    and the ExecuTorch default falls back to eager for a bundle without train.pte."""
    kind = kind or default_engine(model_id)
    if kind == "executorch" and train_pte is None:
        kind = FALLBACK_ENGINE
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}: choose one of {', '.join(ENGINES)}")
    if kind == "eager":
        try:
            return EagerEngine(model_id, weights, trainable)
        except Exception as e:  # unknown model id here: the device can still train with the bundle's program
            if train_pte is None:
                raise
            log.warning("eager engine unavailable for %s (%s); using executorch", model_id, e)
    if train_pte is None:
        raise ValueError(f"model {model_id!r} has no train.pte: the executorch engine cannot train it")
    return ExecuTorchEngine(train_pte, weights, example)

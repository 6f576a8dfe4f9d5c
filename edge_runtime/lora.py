"""Training low-rank adapters on the device (protocol v1.3, math in `edgelearn.lora`).

`LoraEngine` wraps an `EagerEngine`: the release's weights stay frozen and the trainable tensors are one
B_t (out × r, zero at the start of a job) per 2-D trainable tensor t; the network runs with
W_t + B_t·A_t (A_t from `edgelearn.lora.projection`, frozen). Its `state()` is the adapters, so a job's
Δ = B − 0 is the adapter update the protocol sends. AdamW then keeps moments for B only (2 × r/in of the
full model's optimizer memory).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.func import functional_call

from edge_runtime.engines import EagerEngine, _as_tensor, proximal_sgd_
from edgelearn import lora
from models.registry import WRAPPED


class LoraEngine:
    """A TrainEngine whose trainable tensors are the adapters of `inner`'s 2-D trainable tensors."""

    name = "eager+lora"

    def __init__(self, inner: EagerEngine, rank: int, version: int) -> None:
        self.inner, self.rank, self.version = inner, lora.check_rank(rank), version
        shapes = {n: tuple(p.shape) for n, p in inner.trainable.items()}
        self.targets = lora.targets(shapes)
        self._a = {t: torch.from_numpy(lora.projection(t, shapes[t][1], rank, version)) for t in self.targets}
        self._b = {t + lora.SUFFIX: torch.zeros(shapes[t][0], rank, requires_grad=True) for t in self.targets}
        self.params: list[torch.Tensor] = list(self._b.values())
        self.anchor: list[torch.Tensor] = [torch.zeros_like(b) for b in self.params]

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Adapters ← `weights`' adapters (a checkpoint), or a release's weights ← `weights` and B ← 0;
        the anchor (FedProx's θ_global) is B = 0 either way: the adapters start at zero every job."""
        if lora.is_adapter_update(list(weights)):
            self.load_trainable(weights)
            return
        self.inner.load(weights)
        with torch.no_grad():
            for b in self.params:
                b.zero_()

    def load_trainable(self, weights: dict[str, np.ndarray]) -> None:
        with torch.no_grad():
            for n, b in self._b.items():
                b.copy_(torch.from_numpy(np.asarray(weights[n], dtype=np.float32)))

    def state(self) -> dict[str, np.ndarray]:
        return {n: b.detach().numpy().copy() for n, b in self._b.items()}

    def effective(self) -> dict[str, torch.Tensor]:
        """W_t + B_t·A_t for each target (detached base: gradients flow to B only)."""
        tr = self.inner.trainable
        return {t: tr[t].detach() + self._b[t + lora.SUFFIX] @ self._a[t] for t in self.targets}

    def loss_and_grads(self, x: np.ndarray, y: np.ndarray) -> tuple[float, list[torch.Tensor]]:
        """ℓ(W + B·A; x, y) and ∇_B ℓ, in `params` order."""
        over = {WRAPPED + n: p.detach() for n, p in self.inner.trainable.items()}
        over.update({WRAPPED + t: w for t, w in self.effective().items()})
        loss = functional_call(self.inner.step_module, over, (_as_tensor(x), _as_tensor(y)))[0]
        return float(loss.detach()), list(torch.autograd.grad(loss, self.params))

    def step(self, x: np.ndarray, y: np.ndarray, lr: float, mu: float = 0.0) -> float:
        loss, grads = self.loss_and_grads(x, y)
        proximal_sgd_(self.params, grads, self.anchor, lr, mu)
        return loss

    def merged(self) -> dict[str, np.ndarray]:
        """The weights the adapters stand for: W_t + B_t·A_t for the targets (what inference would run)."""
        with torch.no_grad():
            return {t: w.numpy().copy() for t, w in self.effective().items()}

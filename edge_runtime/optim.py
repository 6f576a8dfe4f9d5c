"""The device's local optimizers, learning-rate schedule and gradient clipping, as small pure pieces.

Written with torch._foreach_* over the trainable tensors instead of torch.optim: `torch.optim` lazily
imports torch._dynamo (+70 MiB RSS on a device, STACK-NOTES). AdamW keeps two moments per trainable
parameter (2× the trainable weights in memory, counted in the process RSS the budget watches) and its
step count; `state()` / `load_state()` carry them through the crash-safe checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
ADAM_BETAS = (0.9, 0.99)
ADAM_EPS = 1e-8


def clip_grads_(grads: Sequence[torch.Tensor], max_norm: float) -> float:
    """In place: g ← g · min(1, C/‖g‖₂) over all tensors together (C = max_norm; ≤ 0 skips); returns ‖g‖₂."""
    norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
    if max_norm > 0 and norm > max_norm:
        torch._foreach_mul_(list(grads), max_norm / (norm + 1e-6))
    return norm


class LocalOptimizer:
    """One step θ ← θ − η·u(g + μ(θ − θ_global)) over a fixed list of parameters; u is the identity (`sgd`)
    or AdamW's bias-corrected m̂/(√v̂ + ε) (`adamw`, decoupled weight decay λ: θ ← θ − ηλθ first)."""

    def __init__(self, kind: str, params: Sequence[torch.Tensor], weight_decay: float = 0.0) -> None:
        if kind not in OPTIMIZERS:
            raise ValueError(f"unknown local optimizer {kind!r}: choose one of {', '.join(OPTIMIZERS)}")
        self.kind, self.weight_decay = kind, weight_decay
        self.t = 0
        self.m = [torch.zeros_like(p) for p in params] if kind == "adamw" else []
        self.v = [torch.zeros_like(p) for p in params] if kind == "adamw" else []

    @torch.no_grad()
    def step(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        anchor: Sequence[torch.Tensor],
        lr: float,
        mu: float = 0.0,
    ) -> None:
        p, g = list(params), list(grads)
        if mu:  # FedProx: ∇ of μ/2‖θ − θ_global‖²
            g = list(torch._foreach_add(g, torch._foreach_sub(p, list(anchor)), alpha=mu))
        if self.kind == "sgd":
            torch._foreach_add_(p, g, alpha=-lr)
            return
        b1, b2 = ADAM_BETAS
        self.t += 1
        torch._foreach_lerp_(self.m, g, 1.0 - b1)  # m ← β₁m + (1−β₁)g
        torch._foreach_mul_(self.v, b2)
        torch._foreach_addcmul_(self.v, g, g, value=1.0 - b2)  # v ← β₂v + (1−β₂)g²
        if self.weight_decay:
            torch._foreach_mul_(p, 1.0 - lr * self.weight_decay)
        denom = torch._foreach_sqrt(self.v)
        torch._foreach_div_(denom, math.sqrt(1.0 - b2**self.t))
        torch._foreach_add_(denom, ADAM_EPS)
        torch._foreach_addcdiv_(p, self.m, denom, value=-lr / (1.0 - b1**self.t))

    def state(self) -> dict[str, np.ndarray]:
        """The moments and step count, for the checkpoint (empty for sgd)."""
        if self.kind == "sgd":
            return {}
        out = {f"m.{i}": m.numpy().copy() for i, m in enumerate(self.m)}
        out.update({f"v.{i}": v.numpy().copy() for i, v in enumerate(self.v)})
        out["t"] = np.array([self.t], np.int64)
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore what `state()` saved; a state of another optimizer or shape raises ValueError."""
        if self.kind == "sgd" or not state:
            return
        if len([k for k in state if k.startswith("m.")]) != len(self.m):
            raise ValueError("optimizer state does not match the trainable parameters")
        with torch.no_grad():
            for i in range(len(self.m)):
                self.m[i].copy_(torch.from_numpy(state[f"m.{i}"]))
                self.v[i].copy_(torch.from_numpy(state[f"v.{i}"]))
        self.t = int(state["t"][0])

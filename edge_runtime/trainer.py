"""On-device learning with the bundle's ExecuTorch training program: θ ← θ − η∇ℓ on local batches."""

from __future__ import annotations

import numpy as np
import torch

from edgelearn.et_import import runtime_modules
from models.registry import WRAPPED  # the training program's parameter names: TrainStep holds the model as `net`


class TrainProgram:
    """The `forward` method of a training program (returns loss first); parameters alias program memory."""

    def __init__(self, pte: bytes, weights: dict[str, np.ndarray], example: tuple[np.ndarray, np.ndarray]) -> None:
        self._pte = pte  # the loader keeps no reference: dropping the buffer segfaults forward_backward
        self._x_dtype = np.asarray(example[0]).dtype  # the program's input dtype (the manifest's `input.dtype`)
        self._module = runtime_modules()[1]._load_for_executorch_for_training_from_buffer(pte)
        self._module.forward_backward("forward", _tensors(*example))  # must run once before named_parameters
        self._params = {_strip(k): v for k, v in self._module.named_parameters().items()}
        self.load(weights)

    @property
    def names(self) -> list[str]:
        return sorted(self._params)

    def load(self, weights: dict[str, np.ndarray]) -> None:
        """Copy θ (by parameter name) into the program's trainable parameters."""
        missing = [n for n in self._params if n not in weights]
        if missing:
            raise ValueError(f"weights lack trainable parameter {missing[0]!r}")
        with torch.no_grad():
            for n, p in self._params.items():
                p.copy_(torch.from_numpy(np.asarray(weights[n], dtype=np.float32)))

    def state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().numpy().copy() for n, p in self._params.items()}

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self._params

    def forward_backward(self, x: np.ndarray, y: np.ndarray) -> tuple[float, dict[str, torch.Tensor]]:
        """ℓ(θ; x, y) and ∇ℓ by parameter name (gradient tensors alias program memory until the next call)."""
        out = self._module.forward_backward("forward", _tensors(np.asarray(x).astype(self._x_dtype, copy=False), y))
        return float(out[0]), {_strip(k): g for k, g in self._module.named_gradients().items()}

    def step(self, x: np.ndarray, y: np.ndarray, lr: float) -> float:
        """One SGD step θ ← θ − η∇ℓ(θ; x, y); returns ℓ before the step."""
        loss, grads = self.forward_backward(x, y)
        with torch.no_grad():
            for n, p in self._params.items():
                p.sub_(grads[n], alpha=lr)
        return loss


def _strip(name: str) -> str:
    return name[len(WRAPPED) :] if name.startswith(WRAPPED) else name


def _tensors(x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """x as float32 (or int64 token ids), y as int64 labels."""
    x = np.asarray(x)
    x = x.astype(np.int64 if np.issubdtype(x.dtype, np.integer) else np.float32, copy=False)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

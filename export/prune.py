"""Magnitude pruning with `torch.nn.utils.prune`: global L1 over every Linear weight, fine-tune, make permanent."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch.nn as nn
from torch.nn.utils import prune

from export import ExportError

log = logging.getLogger(__name__)


def linear_weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    """(module, "weight") for every nn.Linear: the matrices pruning zeroes."""
    return [(m, "weight") for m in model.modules() if isinstance(m, nn.Linear)]


def magnitude_prune(model: nn.Module, amount: float, fine_tune: Callable[[nn.Module], object]) -> nn.Module:
    """Zero the `amount` share of Linear weights with the smallest |w| (one global threshold),
    fine-tune with the masks in place (pruned weights stay zero), then fold the masks into the weights."""
    if not 0.0 <= amount < 1.0:
        raise ExportError(f"sparsity {amount} must be in [0, 1)")
    params = linear_weights(model)
    if amount == 0.0 or not params:
        return model
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
    fine_tune(model)
    for module, name in params:
        prune.remove(module, name)
    return model.eval()

"""Lowering to ExecuTorch: PT2E int8 quantization, inference program, training program."""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from export import ExportError
from export.models import TrainStep

log = logging.getLogger(__name__)


def quantize_int8(model: nn.Module, example: tuple[torch.Tensor, ...], calib: torch.Tensor) -> nn.Module:
    """PT2E static int8 (XNNPACK quantizer, symmetric per-channel), calibrated on `calib` rows."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(model.eval(), example).module(), quantizer)
    with torch.no_grad():
        for i in range(0, len(calib), example[0].shape[0]):
            batch = calib[i : i + example[0].shape[0]]
            if batch.shape[0] == example[0].shape[0]:
                prepared(batch)
    return convert_pt2e(prepared)


def lower_infer(model: nn.Module, example: tuple[torch.Tensor, ...], target: str, calib: torch.Tensor) -> bytes:
    """The inference program `forward` for `target` (xnnpack-int8, xnnpack-fp32 or portable) as .pte bytes."""
    from executorch.exir import to_edge_transform_and_lower

    if target == "xnnpack-int8":
        model = quantize_int8(model, example, calib)
    partitioners = []
    if target.startswith("xnnpack"):
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners = [XnnpackPartitioner()]
    try:
        with torch.no_grad():
            ep = torch.export.export(model, example)
            prog = to_edge_transform_and_lower(ep, partitioner=partitioners).to_executorch()
    except Exception as e:  # ExecuTorch raises many types; the cause is the user's model on this target
        raise ExportError(f"cannot lower model to {target}: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return prog.buffer


def export_train(
    model: nn.Module, example_batch: tuple[torch.Tensor, torch.Tensor], trainable: list[str], max_batch: int = 1024
) -> bytes:
    """Training program (forward + backward of `trainable`) as .pte bytes, batch size 1..`max_batch`.

    Parameters not in `trainable` are frozen constants of the program.
    """
    from executorch.exir import to_edge
    from torch.export.experimental import _export_forward_backward

    names = set(trainable)
    for n, p in model.named_parameters():
        p.requires_grad_(n in names)
    try:
        batch = torch.export.Dim("batch", min=1, max=max_batch)
        dynamic = ({0: batch}, {0: batch})
        ep = torch.export.export(TrainStep(model), example_batch, dynamic_shapes=dynamic, strict=True)
        prog = to_edge(_export_forward_backward(ep)).to_executorch()
    except Exception as e:
        raise ExportError(f"cannot export the training program: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return prog.buffer

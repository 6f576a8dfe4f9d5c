"""Lowering to ExecuTorch: PT2E int8 quantization, inference program, training program."""

from __future__ import annotations

import logging
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from export import ExportError
from models.registry import ModelSpec, TrainStep

log = logging.getLogger(__name__)
TARGETS = ("xnnpack-int8", "xnnpack-fp32", "portable")  # what `--target` takes
# ExecuTorch's GPU backends for a Jetson: investigated with the packaged executorch (docs/export.md).
GPU_TARGETS = {
    "cuda": "CudaBackend",
    "vulkan": "VulkanBackend",
}
CALIB_ROWS = 128  # calibration examples for static int8 (batch-1 calls, the program's shape)
OP_PATTERN = re.compile(r"\b(?:aten(?:::|\.)\w+|[a-z_]+::\w+)(?:\.\w+)?")  # aten.add.Tensor, mylib::op


def quant_mode(spec: ModelSpec, cfg: Any) -> str:
    """The PT2E int8 mode of an export: the user's `--quant`, else the model's default."""
    return cfg.quant or spec.default_quant


def runtime_backends() -> list[str]:
    """Backends registered in the installed ExecuTorch runtime (the Python pybindings)."""
    from executorch.extension.pybindings.portable_lib import _get_registered_backend_names

    return sorted(_get_registered_backend_names())


def check_target(target: str) -> None:
    """Raise ExportError unless `target` is one we lower and can run here; GPU targets say why they are not."""
    if target in GPU_TARGETS:
        raise ExportError(
            f"target {target!r} is not supported: the packaged executorch runtime has no {GPU_TARGETS[target]} "
            f"(registered: {', '.join(runtime_backends())}); see docs/export.md"
        )
    if target not in TARGETS:
        raise ExportError(f"unknown target {target!r}: choose one of {', '.join(TARGETS)}")


def quantize_int8(
    model: nn.Module, example: tuple[torch.Tensor, ...], calib: torch.Tensor, mode: str = "static"
) -> nn.Module:
    """PT2E int8 (XNNPACK quantizer, symmetric per-channel weights), calibrated on `calib` rows.

    mode "static": int8 activations with ranges observed on `calib`; "dynamic": only Linear layers,
    activation ranges computed at run time per batch.
    """
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    config = get_symmetric_quantization_config(is_per_channel=True, is_dynamic=mode == "dynamic")
    quantizer = XNNPACKQuantizer().set_global(config)
    prepared = prepare_pt2e(torch.export.export(model.eval(), example).module(), quantizer)
    n = example[0].shape[0]
    rows = [calib[i : i + n] for i in range(0, min(len(calib), CALIB_ROWS) - n + 1, n)] or [example[0]]
    with torch.no_grad():
        for batch in rows:  # also runs the weight observers, which dynamic int8 needs too
            prepared(batch)
    return convert_pt2e(prepared)


def lowering_error(e: Exception, target: str) -> ExportError:
    """One line naming the operator (when the message names one) and the target."""
    text = str(e)
    ops = OP_PATTERN.findall(text)
    what = f"operator {ops[0]} " if ops else ""
    return ExportError(f"cannot lower {what}to {target}: {type(e).__name__}: {text.strip().splitlines()[0][:300]}")


DATA_TAG = "infer"  # the data file's name (`infer.ptd`) in ExecuTorch's program–data separation


def lower_infer(
    model: nn.Module, example: tuple[torch.Tensor, ...], target: str, calib: torch.Tensor, quant: str = "static"
) -> bytes:
    """The inference program `forward` for `target` (xnnpack-int8, xnnpack-fp32 or portable) as .pte bytes,
    its constants inside."""
    return _lower_infer(model, example, target, calib, quant, external=False)[0]


def lower_infer_split(
    model: nn.Module, example: tuple[torch.Tensor, ...], target: str, calib: torch.Tensor, quant: str = "static"
) -> tuple[bytes, bytes]:
    """(program, data): the inference program with every constant (XNNPACK's packed weights too) in a separate
    data file (.ptd), which a release can replace without lowering again (edgelearn/datafile.py)."""
    program, data = _lower_infer(model, example, target, calib, quant, external=True)
    assert data is not None
    return program, data


def _lower_infer(
    model: nn.Module, example: tuple[torch.Tensor, ...], target: str, calib: torch.Tensor, quant: str, external: bool
) -> tuple[bytes, bytes | None]:
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.external_constants_pass import delegate_external_constants_pass_unlifted

    check_target(target)
    if target == "xnnpack-int8":
        try:
            model = quantize_int8(model, example, calib, quant)
        except Exception as e:
            raise lowering_error(e, target) from e
    partitioners = []
    if target.startswith("xnnpack"):
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioners = [XnnpackPartitioner()]
    config = ExecutorchBackendConfig(external_constants=(lambda node: DATA_TAG) if external else False)
    try:
        with torch.no_grad():
            ep = torch.export.export(model, example)
            if external:  # tag the delegate's constants too (the pass works on an unlifted graph)
                module = ep.module()
                delegate_external_constants_pass_unlifted(module, gen_tag_fn=lambda node: DATA_TAG)
                ep = torch.export.export(module, example)
            prog = to_edge_transform_and_lower(ep, partitioner=partitioners).to_executorch(config)
    except Exception as e:  # ExecuTorch raises many types; the cause is the user's model on this target
        raise lowering_error(e, target) from e
    if not external:
        return prog.buffer, None
    with tempfile.TemporaryDirectory() as tmp:
        prog.write_tensor_data_to_file(tmp)
        data = Path(tmp, f"{DATA_TAG}.ptd")
        if not data.exists():
            raise ExportError(f"lowering to {target} wrote no {DATA_TAG}.ptd data file")
        return prog.buffer, data.read_bytes()


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
        raise lowering_error(e, "the training program (portable)") from e
    finally:
        for p in model.parameters():
            p.requires_grad_(True)
    return prog.buffer

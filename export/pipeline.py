"""The export chain: data → teacher → distilled student → int8 → `.pte` programs → bundle.

`export_bundle` makes release 1 from scratch; `rebuild_bundle` makes release v+1 from
aggregated weights (the coordinator calls it, so every release carries fresh programs).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgelearn.bundle import INFER_PTE, TRAIN_PTE, WEIGHTS, Manifest, dump_weights, verify_bundle, write_bundle
from export import ExportError
from export.data import Digits, load_digits
from export.distill import accuracy, fit
from export.models import TARGETS, ModelSpec, get_spec, param_count

log = logging.getLogger(__name__)
TRAIN_MAX_BATCH = 1024
EXPORT_JSON = "export.json"  # the ExportConfig, so the coordinator can re-lower later releases the same way


@dataclass(frozen=True)
class ExportConfig:
    model_id: str = "digits-mlp"
    target: str = "xnnpack-int8"
    server_fraction: float = 0.2
    epochs: int = 60
    alpha: float = 0.5
    temperature: float = 4.0
    seed: int = 0


def check_config(cfg: ExportConfig) -> ModelSpec:
    spec = get_spec(cfg.model_id)
    if cfg.target not in TARGETS:
        raise ExportError(f"unknown target {cfg.target!r}: choose one of {', '.join(TARGETS)}")
    if not 0.0 < cfg.server_fraction <= 1.0:
        raise ExportError(f"server fraction {cfg.server_fraction} must be in (0, 1]")
    return spec


def train_student(spec: ModelSpec, data: Digits, cfg: ExportConfig) -> tuple[nn.Module, dict]:
    """Teacher on the server split, then the student distilled from it; returns the student and metrics."""
    torch.manual_seed(cfg.seed)
    teacher = fit(spec.make_teacher(), data.server.x, data.server.y, cfg.epochs, seed=cfg.seed)
    log.info("teacher: %d params, test accuracy %.3f", param_count(teacher), accuracy(teacher, *_xy(data.test)))
    torch.manual_seed(cfg.seed)
    student = fit(
        spec.make_student(),
        data.server.x,
        data.server.y,
        cfg.epochs,
        teacher=teacher,
        alpha=cfg.alpha,
        temperature=cfg.temperature,
        seed=cfg.seed,
    )
    metrics = {
        "teacher_params": param_count(teacher),
        "student_params": param_count(student),
        "teacher_accuracy": accuracy(teacher, *_xy(data.test)),
        "accuracy": accuracy(student, *_xy(data.test)),
    }
    log.info(
        "student (KD, α=%.2f T=%.1f): %d params, test accuracy %.3f",
        cfg.alpha,
        cfg.temperature,
        metrics["student_params"],
        metrics["accuracy"],
    )
    return student, metrics


def _xy(split: object) -> tuple[np.ndarray, np.ndarray]:
    return split.x, split.y  # type: ignore[attr-defined]


def lower_programs(spec: ModelSpec, student: nn.Module, target: str, calib: np.ndarray) -> dict[str, bytes]:
    """infer.pte for `target` and train.pte (dynamic batch) for the spec's trainable parameters."""
    from export.lower import export_train, lower_infer

    example = (torch.zeros(spec.input_shape),)
    infer = lower_infer(student, example, target, torch.from_numpy(calib))
    log.info("lowered infer.pte for %s: %d bytes", target, len(infer))
    batch = (torch.zeros(8, *spec.input_shape[1:]), torch.zeros(8, dtype=torch.long))
    train = export_train(student, batch, spec.trainable(student), max_batch=TRAIN_MAX_BATCH)
    log.info("exported train.pte: %d bytes", len(train))
    return {INFER_PTE: infer, TRAIN_PTE: train}


def pte_accuracy(infer_pte: bytes, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy of an inference program run by the ExecuTorch runtime, one row at a time."""
    from edge_runtime.inference import InferenceProgram

    return InferenceProgram(infer_pte).accuracy(x, y)


def make_bundle(
    out: str | Path, spec: ModelSpec, student: nn.Module, cfg: ExportConfig, version: int, data: Digits, metrics: dict
) -> Manifest:
    """Lower `student`, check the .pte's accuracy on the test split, and write the bundle atomically."""
    target = cfg.target
    programs = lower_programs(spec, student, target, data.server.x)
    metrics = {**metrics, "accuracy_pte": pte_accuracy(programs[INFER_PTE], data.test.x, data.test.y)}
    weights = {k: v.detach().numpy() for k, v in student.state_dict().items()}
    manifest = Manifest(
        model_id=spec.model_id,
        version=version,
        task=spec.task,
        target=target,
        input={"shape": list(spec.input_shape), "dtype": "float32"},
        trainable=spec.trainable(student),
        metrics=metrics,
    )
    files = {WEIGHTS: dump_weights(weights), EXPORT_JSON: json.dumps(asdict(cfg)).encode(), **programs}
    final = write_bundle(out, manifest, files)
    log.info(
        "wrote bundle %s (version %d, accuracy %.3f fp32 / %.3f .pte)",
        out,
        version,
        metrics["accuracy"],
        metrics["accuracy_pte"],
    )
    return final


def export_bundle(cfg: ExportConfig, out: str | Path) -> Manifest:
    """Release 1: train, distill, quantize, lower and write the bundle (atomically) to `out`."""
    spec = check_config(cfg)
    data = load_digits(cfg.server_fraction, seed=cfg.seed)
    log.info(
        "data: %d server / %d device pool / %d test examples", len(data.server.y), len(data.pool.y), len(data.test.y)
    )
    student, metrics = train_student(spec, data, cfg)
    return make_bundle(out, spec, student, cfg, 1, data, metrics)


def rebuild_bundle(prev_dir: Path, weights: dict[str, np.ndarray], version: int, out: Path) -> Manifest:
    """Release `version` with `weights`: same model, target and calibration data as the bundle at `prev_dir`."""
    prev = verify_bundle(prev_dir)
    cfg = ExportConfig(**json.loads((prev_dir / EXPORT_JSON).read_bytes()))
    spec = check_config(cfg)
    student = spec.make_student()
    student.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    data = load_digits(cfg.server_fraction, seed=cfg.seed)
    metrics = {"accuracy": accuracy(student, data.test.x, data.test.y)}
    log.debug("rebuilding %s v%d -> v%d", prev.model_id, prev.version, version)
    return make_bundle(out, spec, student.eval(), cfg, version, data, metrics)

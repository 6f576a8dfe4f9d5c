"""The export chain: data → teacher → distilled student (vs. no KD) → pruned → int8 → `.pte` programs → bundle.

`export_bundle` makes release 1 from scratch and measures every step into `report.json`;
`rebuild_bundle` makes release v+1 from aggregated weights (the coordinator calls it, so every
release carries fresh programs) and only re-lowers: it must stay fast.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from edgelearn.bundle import (
    EXPORT_JSON,
    INFER_PTD,
    INFER_PTE,
    TRAIN_PTE,
    WEIGHTS,
    BundleError,
    Manifest,
    check_bundle_target,
    dump_weights,
    verify_bundle,
    write_bundle,
)
from edgelearn.datafile import DATA_LAYOUT, dump_layout
from edgelearn.programs import loaded_program
from export import ExportError
from export.datamap import find_layout
from export.distill import Budget, fit, fit_for
from export.lower import check_target, export_train, lower_infer, lower_infer_split, quant_mode
from export.prune import magnitude_prune
from export.report import build_report
from models.quality import predict_logits, quality, release_metrics
from models.registry import SUBSETS, ModelSpec, TaskData, get_spec, param_count
from models.text import read_text

log = logging.getLogger(__name__)
TRAIN_MAX_BATCH = 1024
REPORT_JSON = "report.json"
QUANT_MODES = ("static", "dynamic")


@dataclass(frozen=True)
class ExportConfig:
    model_id: str = "digits-mlp"
    target: str = "xnnpack-int8"
    server_fraction: float = 0.2
    epochs: int | None = None  # None: the model's default (its minutes, else its epochs)
    train_minutes: float | None = None  # wall-time budget of all training (shares: SHARES); --epochs wins
    distill: bool | None = None  # train a teacher and distill the student from it; None: the model's default
    alpha: float = 0.5
    temperature: float = 4.0
    seed: int = 0
    text: str | None = None  # char-lm training text (file or directory); None: the shipped corpus
    text_sha256: str | None = None  # of that text at export: later releases are lowered from the same text
    sparsity: float | None = None  # magnitude pruning of Linear weights; 0 skips the step; None: the model's
    quant: str | None = None  # PT2E int8: "static" (calibrated activations), "dynamic" (Linear only); None: model's
    train_subset: str = "all"  # what train.pte trains: all, last (last block + head) or head
    compare: bool = True  # also train a no-KD student and lower every target for the report


def with_model_defaults(cfg: ExportConfig, spec: ModelSpec) -> ExportConfig:
    """`cfg` with the model's defaults in place of the settings left unset (None)."""
    return replace(cfg, sparsity=spec.default_sparsity if cfg.sparsity is None else cfg.sparsity,
                   distill=spec.default_distill if cfg.distill is None else cfg.distill)  # fmt: skip


def check_config(cfg: ExportConfig) -> ModelSpec:
    check_target(cfg.target)
    if not 0.0 < cfg.server_fraction <= 1.0:
        raise ExportError(f"server fraction {cfg.server_fraction} must be in (0, 1]")
    if cfg.quant is not None and cfg.quant not in QUANT_MODES:
        raise ExportError(f"unknown quantization {cfg.quant!r}: choose one of {', '.join(QUANT_MODES)}")
    if cfg.train_subset not in SUBSETS:
        raise ExportError(f"unknown trainable subset {cfg.train_subset!r}: choose one of {', '.join(SUBSETS)}")
    if cfg.sparsity is not None and not 0.0 <= cfg.sparsity < 1.0:
        raise ExportError(f"sparsity {cfg.sparsity} must be in [0, 1)")
    if cfg.epochs is not None and cfg.epochs < 1:
        raise ExportError(f"epochs {cfg.epochs} must be at least 1")
    if cfg.train_minutes is not None and not (0 < cfg.train_minutes <= 24 * 60):
        raise ExportError(f"train minutes {cfg.train_minutes} must be in (0, 1440]")
    if ":" in cfg.model_id and cfg.train_subset != "all":  # a user model: its factory names what trains
        raise ExportError(f"user model {cfg.model_id!r}: only the trainable subset 'all' (or the factory's list)")
    return get_spec(cfg.model_id)


class Stages:
    """Progress of the export: one log line per stage with its wall time, kept for the report."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()

    def done(self, name: str, detail: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._t0, 3)
        log.info("[%s] %s (%.1fs)", name, detail, now - self._t0)
        self._t0 = now


SHARES = {"teacher": 4.0, "student-no-kd": 3.0, "student-kd": 3.0, "pruned": 1.0}  # of a --train-minutes budget


@dataclass(frozen=True)
class TrainPlan:
    """How long each model trains: `epochs` each (prune fine-tuning: a quarter), or a share of `minutes`
    (SHARES, over the stages that run)."""

    epochs: int
    minutes: float | None
    stages: tuple[str, ...]

    def budget(self, spec: ModelSpec, stage: str) -> Budget | None:
        if self.minutes is None:
            return None
        share = SHARES[stage] / sum(SHARES[s] for s in self.stages)
        return Budget(60.0 * self.minutes * share, lr=spec.lr)


def train_plan(spec: ModelSpec, cfg: ExportConfig, has_teacher: bool) -> TrainPlan:
    """--epochs wins; else --train-minutes; else the model's default minutes, else its default epochs."""
    minutes = None if cfg.epochs is not None else (cfg.train_minutes or spec.default_minutes)
    stages = [s for s, run in (("teacher", has_teacher), ("student-no-kd", cfg.compare or not has_teacher),
                               ("student-kd", has_teacher), ("pruned", bool(cfg.sparsity))) if run]  # fmt: skip
    return TrainPlan(cfg.epochs or spec.default_epochs, minutes, tuple(stages))


def _fit(spec: ModelSpec, cfg: ExportConfig, data: TaskData, model: nn.Module, teacher: nn.Module | None,
         plan: TrainPlan, stage: str) -> tuple[nn.Module, str]:  # fmt: skip
    """Train one model of the plan; returns it and how long it trained (for the stage's log line)."""
    torch.manual_seed(cfg.seed)
    x, y = data.server.x, data.server.y
    kd = {} if teacher is None else {"teacher": teacher, "alpha": cfg.alpha, "temperature": cfg.temperature}
    budget = plan.budget(spec, stage)
    if budget is not None:
        model, steps = fit_for(model, x, y, budget, seed=cfg.seed, name=stage, **kd)  # type: ignore[arg-type]
        return model, f"{steps} steps in {budget.seconds:.0f}s"
    epochs = max(1, plan.epochs // 4) if stage == "pruned" else plan.epochs
    return fit(model, x, y, epochs, lr=spec.lr, seed=cfg.seed, **kd), f"{epochs} epochs"  # type: ignore[arg-type]


def _quality(spec: ModelSpec, model: nn.Module, data: TaskData) -> dict[str, float]:
    """Eager quality of `model` on the test split."""
    return quality(predict_logits(model, data.test.x), data.test.y, spec.task)


def train_models(spec: ModelSpec, data: TaskData, cfg: ExportConfig, stages: Stages) -> tuple[nn.Module, dict]:
    """Teacher (when distilling), student without KD (if compare, or no teacher), KD student, pruned student;
    returns the student to ship."""
    torch.manual_seed(cfg.seed)
    cfg = with_model_defaults(cfg, spec)
    teacher, q = (spec.make_teacher() if cfg.distill else None), {}
    plan = train_plan(spec, cfg, teacher is not None)
    if teacher is not None:
        teacher, how = _fit(spec, cfg, data, teacher, None, plan, "teacher")
        q["teacher"] = _quality(spec, teacher, data)
        stages.done("teacher", f"{param_count(teacher)} params, {how}: {q['teacher']}")
    if "student-no-kd" in plan.stages:
        plain, how = _fit(spec, cfg, data, spec.make_student(), None, plan, "student-no-kd")
        q["student_no_kd"] = _quality(spec, plain, data)
        stages.done("student-no-kd", f"{param_count(plain)} params, {how}: {q['student_no_kd']}")
    student = plain if teacher is None else None
    if teacher is not None:
        student, how = _fit(spec, cfg, data, spec.make_student(), teacher, plan, "student-kd")
        q["student_kd"] = _quality(spec, student, data)
        stages.done("student-kd", f"α={cfg.alpha} T={cfg.temperature}, {how}: {q['student_kd']}")
    assert student is not None  # plain without a teacher, the KD student with one
    if cfg.sparsity:
        hows: list[str] = []

        def tune(m: nn.Module) -> nn.Module:
            m, how = _fit(spec, cfg, data, m, teacher, plan, "pruned")
            hows.append(how)
            return m

        student = magnitude_prune(student, cfg.sparsity, tune)
        q["pruned"] = _quality(spec, student, data)
        stages.done("pruned", f"sparsity {cfg.sparsity:.2f}, fine-tuned {', '.join(hows)}: {q['pruned']}")
    params = {"teacher": param_count(teacher) if teacher is not None else None, "student": param_count(student)}
    return student, {"params": params, "quality": q}


def lower_programs(
    spec: ModelSpec, student: nn.Module, cfg: ExportConfig, data: TaskData, target: str | None = None
) -> dict[str, bytes]:
    """infer.pte for `target` (default cfg.target) with its constants in infer.ptd and where the trainable
    parameters sit in that file (data.json: later releases replace only the data), and train.pte (dynamic
    batch) for the trainable subset. A program whose data edgelearn cannot rebuild keeps its constants
    inside (bundle format 1: each release is lowered again)."""
    target = target or cfg.target
    example = (torch.zeros(spec.input_shape),)
    calib, quant = torch.from_numpy(data.server.x[:512]), quant_mode(spec, cfg)
    trainable = spec.trainable(student, cfg.train_subset)
    try:
        infer, ptd = lower_infer_split(student, example, target, calib, quant)
        layout = find_layout(ptd, state_arrays(student), trainable)
        programs = {INFER_PTE: infer, INFER_PTD: ptd, DATA_LAYOUT: dump_layout(layout)}
        log.info("lowered infer.pte for %s: %d bytes + infer.ptd %d bytes (%d segments a release rewrites)",
                 target, len(infer), len(ptd), len(layout))  # fmt: skip
    except ExportError as e:
        log.warning("%s: keeping the constants inside infer.pte, so every release is lowered again", e)
        programs = {INFER_PTE: lower_infer(student, example, target, calib, quant)}
    batch = (torch.from_numpy(data.server.x[:8]), torch.from_numpy(data.server.y[:8]))
    train = export_train(student, batch, trainable, max_batch=TRAIN_MAX_BATCH)
    log.info("exported train.pte: %d bytes", len(train))
    return {**programs, TRAIN_PTE: train}


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as float32 numpy arrays (what weights.safetensors holds)."""
    return {k: v.detach().float().contiguous().numpy() for k, v in model.state_dict().items()}


def programs_metrics(spec: ModelSpec, student: nn.Module, programs: dict[str, bytes], data: TaskData) -> dict:
    """models.quality.release_metrics of `student` and its inference program (with its data file, if any)."""
    with loaded_program(programs[INFER_PTE], programs.get(INFER_PTD)) as program:
        return release_metrics(spec, student, program, data)


def make_bundle(
    out: str | Path,
    spec: ModelSpec,
    student: nn.Module,
    cfg: ExportConfig,
    version: int,
    programs: dict[str, bytes],
    metrics: dict,
    extra: dict[str, bytes] | None = None,
    created: str = "",
) -> Manifest:
    """Write the bundle (weights, programs, export.json, extras) atomically to `out` (`created`: now if empty)."""
    weights = state_arrays(student)
    manifest = Manifest(
        model_id=spec.model_id,
        version=version,
        task=spec.task,
        target=cfg.target,
        input={"shape": list(spec.input_shape), "dtype": "float32"},
        trainable=spec.trainable(student, cfg.train_subset),
        metrics=metrics,
        created=created,
    )
    files = {WEIGHTS: dump_weights(weights), EXPORT_JSON: json.dumps(asdict(cfg)).encode(), **programs, **(extra or {})}
    final = write_bundle(out, manifest, files)
    log.info("wrote bundle %s (version %d, %s)", out, version, metrics)
    return final


def export_bundle(cfg: ExportConfig, out: str | Path) -> Manifest:
    """Release 1: train, distill, prune, quantize, lower, measure and write the bundle (atomically) to `out`."""
    spec = check_config(cfg)
    cfg = with_model_defaults(cfg, spec)  # export.json records what was done
    try:
        check_bundle_target(out)  # before minutes of training, not after
    except BundleError as e:
        raise ExportError(f"--out: {e}") from None
    if cfg.text is not None:  # export.json names it absolutely, with its hash (the coordinator re-lowers from it)
        cfg = replace(cfg, text=str(Path(cfg.text).resolve()), text_sha256=text_digest(cfg.text))
    stages = Stages()
    data = spec.load_data(cfg)
    stages.done("data", f"{len(data.server.y)} training / {len(data.test.y)} test examples")
    student, trained = train_models(spec, data, cfg, stages)
    programs = lower_programs(spec, student, cfg, data)
    metrics = programs_metrics(spec, student, programs, data)
    stages.done("lower", f"{cfg.target} infer.pte {len(programs[INFER_PTE])} B, train.pte {len(programs[TRAIN_PTE])} B")
    report = build_report(spec, cfg, student, data, programs, trained, stages)
    params = trained["params"]
    metrics = {**metrics, "student_params": params["student"], "teacher_params": params["teacher"]}
    if "teacher" in trained["quality"]:
        metrics["teacher_accuracy"] = trained["quality"]["teacher"]["accuracy"]
    extra = {REPORT_JSON: json.dumps(report, indent=2).encode()}
    return make_bundle(out, spec, student, cfg, 1, programs, metrics, extra)


def text_digest(path: str) -> str:
    """sha256 of the training text as the exporter reads it (a file, or a folder's files joined)."""
    import hashlib

    return hashlib.sha256(read_text(path)).hexdigest()


def rebuild_bundle(
    prev_dir: Path, weights: dict[str, np.ndarray], version: int, out: Path, created: str = ""
) -> Manifest:
    """Release `version` with `weights`: same model, target and calibration data as the bundle at `prev_dir`.
    The coordinator passes `created` (its round's opening time) so that a close redone after a crash writes
    the same bytes."""
    prev = verify_bundle(prev_dir)
    cfg = ExportConfig(**json.loads((prev_dir / EXPORT_JSON).read_bytes()))
    if cfg.text is not None and cfg.text_sha256 and text_digest(cfg.text) != cfg.text_sha256:
        raise ExportError(f"text {cfg.text} changed since release 1 was exported: its calibration data and test "
                          "split would differ (restore it, or export a new release 1)")  # fmt: skip
    spec = check_config(replace(cfg, compare=False))
    student = spec.make_student()
    student.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    data = spec.load_data(cfg)
    programs = lower_programs(spec, student.eval(), cfg, data)
    metrics = programs_metrics(spec, student, programs, data)
    log.debug("rebuilding %s v%d -> v%d", prev.model_id, prev.version, version)
    return make_bundle(out, spec, student.eval(), cfg, version, programs, metrics, created=created)

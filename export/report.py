"""The export report: parameters, file sizes, quality at every step and batch-1 latency, as JSON and a table."""

from __future__ import annotations

import logging
import platform
from typing import Any

import torch
import torch.nn as nn

from edgelearn.bundle import INFER_PTD, INFER_PTE, TRAIN_PTE
from export.lower import TARGETS, lower_infer, quant_mode
from export.metrics import eager_latency_us, pte_latency_us, pte_logits, sparsity
from models.quality import quality
from models.registry import ModelSpec, TaskData

log = logging.getLogger(__name__)
THREADS = 1  # eager and ExecuTorch both run on one thread: 2 threads on 2 shared cores spike 5–100×


def set_threads(n: int) -> None:
    """One intra-op thread for eager torch and for ExecuTorch's (XNNPACK) thread pool."""
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    torch.set_num_threads(n)
    _unsafe_reset_threadpool(n)


def target_programs(spec: ModelSpec, cfg: Any, student: nn.Module, data: TaskData, shipped: tuple) -> dict:
    """(infer.pte, infer.ptd or None) for every target in the report: the shipped one, plus the others (constants
    inside) when cfg.compare."""
    progs = {cfg.target: shipped}
    if cfg.compare:
        calib = torch.from_numpy(data.server.x[:512])
        for t in TARGETS:
            if t not in progs:
                pte = lower_infer(student, (torch.zeros(spec.input_shape),), t, calib, quant_mode(spec, cfg))
                progs[t] = (pte, None)
    return progs


def build_report(spec: ModelSpec, cfg: Any, student: nn.Module, data: TaskData, programs: dict, trained: dict, stages):
    """Everything `edgelearn export` measured, as a JSON-able dict (written to the bundle as report.json)."""
    set_threads(THREADS)
    x1 = torch.from_numpy(data.test.x[:1])
    progs = target_programs(spec, cfg, student, data, (programs[INFER_PTE], programs.get(INFER_PTD)))
    q = dict(trained["quality"])
    pte_q = {t: quality(pte_logits(p, data.test.x, d), data.test.y, spec.task) for t, (p, d) in progs.items()}
    if "xnnpack-int8" in pte_q:
        q["int8"] = pte_q["xnnpack-int8"]
    latency = {"eager-fp32": eager_latency_us(student, x1)}
    for t, (p, d) in progs.items():
        latency[t] = pte_latency_us(p, x1, data=d)
        log.info("latency %s: %.1f µs (eager fp32 %.1f µs)", t, latency[t], latency["eager-fp32"])
    stages.done("report", f"latency µs {', '.join(f'{k} {v:.0f}' for k, v in latency.items())}")
    return {
        "model_id": spec.model_id,
        "task": spec.task,
        "target": cfg.target,
        "config": {k: v for k, v in vars(cfg).items()},
        "params": {**trained["params"], "student_fraction": _fraction(trained["params"])},
        "sparsity": sparsity(student),
        "quant": quant_mode(spec, cfg),
        "quality": q,
        "quality_pte": pte_q,
        "bytes": {
            **{f"{t}.pte": len(p) for t, (p, _) in progs.items()},
            "train.pte": len(programs[TRAIN_PTE]),
            **({INFER_PTD: len(programs[INFER_PTD])} if INFER_PTD in programs else {}),
        },
        "latency_us": latency,
        "latency_runs": 200,
        "threads": THREADS,
        "stage_seconds": stages.seconds,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }


def _fraction(params: dict) -> float | None:
    """student / teacher parameters (None without a teacher)."""
    return round(params["student"] / params["teacher"], 4) if params.get("teacher") else None


def _fmt_quality(q: dict[str, float]) -> str:
    parts = [f"acc {q['accuracy']:.3f}"]
    if "perplexity" in q:
        parts.append(f"ppl {q['perplexity']:.2f}")
    return " · ".join(parts)


def format_table(report: dict) -> str:
    """The end-of-export table: one row per figure, in the order the stages ran."""
    rows = [("parameters", f"teacher {report['params']['teacher']} · student {report['params']['student']}")]
    rows += [(f"quality: {k}", _fmt_quality(v)) for k, v in report["quality"].items()]
    rows += [(f"quality: {t}.pte", _fmt_quality(v)) for t, v in report["quality_pte"].items()]
    rows += [(f"size: {k}", f"{v / 1024:.1f} kB") for k, v in report["bytes"].items()]
    eager = report["latency_us"]["eager-fp32"]
    rows += [(f"latency: {k}", f"{v:.1f} µs ({v / eager:.2f}× eager)") for k, v in report["latency_us"].items()]
    width = max(len(r[0]) for r in rows)
    title = f"{report['model_id']} → {report['target']} (batch 1, {report['threads']} thread, median of 200)"
    return "\n".join([title, *(f"  {k.ljust(width)}  {v}" for k, v in rows)])

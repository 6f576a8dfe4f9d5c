"""Export benchmark: both example models through `export_bundle`, figures checked against the issue's targets.

    .venv/bin/python bench/export_bench.py            # → bench/results/export.json + export.md

Every figure comes from the bundles' report.json (same process, same run, 1 thread). For char-lm the
shipped student is also lowered with static int8 (the default for char-lm is dynamic) to compare the two PT2E modes.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgelearn.bundle import load_weights
from export.metrics import pte_latency_us, pte_logits
from export.pipeline import REPORT_JSON, ExportConfig, export_bundle
from models.quality import quality
from models.registry import get_spec

RESULTS = Path(__file__).resolve().parent / "results"


def fp32_student(report: dict) -> dict:
    """Quality of the fp32 student that was quantized: the pruned one if pruning ran, else the KD student."""
    q = report["quality"]
    return q.get("pruned") or q.get("student_kd") or q["student_no_kd"]


def check(name: str, value: float, limit: float, op: str) -> dict:
    """One target: `value op limit` (op is "<=" or ">="), recorded with whether it was met."""
    met = value <= limit if op == "<=" else value >= limit
    return {"target": name, "value": round(value, 4), "limit": round(limit, 4), "op": op, "met": bool(met)}


def common_targets(r: dict) -> list[dict]:
    size = r["bytes"]["xnnpack-int8.pte"] / r["bytes"]["xnnpack-fp32.pte"]
    lat = r["latency_us"]["xnnpack-int8"] / r["latency_us"]["eager-fp32"]
    return [
        check("int8 infer.pte size / fp32 .pte", size, 0.30, "<="),
        check("int8 .pte latency / eager fp32", lat, 0.5, "<="),
    ]


def digits_targets(r: dict) -> list[dict]:
    q, student = r["quality"], fp32_student(r)
    return [
        *common_targets(r),
        check("student accuracy / teacher", student["accuracy"] / q["teacher"]["accuracy"], 0.98, ">="),
        check("student params / teacher", r["params"]["student_fraction"], 0.25, "<="),
        check(
            "KD − no-KD accuracy (points)",
            100 * (q["student_kd"]["accuracy"] - q["student_no_kd"]["accuracy"]),
            0,
            ">=",
        ),
        check("int8 accuracy loss (points)", 100 * (student["accuracy"] - q["int8"]["accuracy"]), 0.5, "<="),
    ]


def lm_targets(r: dict) -> list[dict]:
    gap = 100 * abs(fp32_student(r)["accuracy"] - r["quality"]["int8"]["accuracy"])
    return [*common_targets(r), check("int8 next-token accuracy gap (points)", gap, 1.0, "<=")]


def static_variant(bundle: Path, report: dict) -> dict:
    """The char-lm student lowered with static int8: size, latency and quality next to the dynamic one."""
    from export.lower import lower_infer

    spec = get_spec("char-lm")
    cfg = ExportConfig(**report["config"])
    data = spec.load_data(cfg)
    student = spec.make_student()
    student.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(bundle).items()})
    calib = torch.from_numpy(data.server.x[:512])
    pte = lower_infer(student.eval(), (torch.zeros(spec.input_shape),), "xnnpack-int8", calib, "static")
    x1 = torch.from_numpy(data.test.x[:1])
    q = quality(pte_logits(pte, data.test.x), data.test.y, "lm")
    return {"bytes": len(pte), "latency_us": pte_latency_us(pte, x1), "quality": q}


def run(models: list[str], work: Path) -> dict:
    results = {"machine": "2 shared x86_64 cores (other jobs running), 1 thread", "models": {}}
    for model in models:
        t0 = time.perf_counter()
        out = work / model
        export_bundle(ExportConfig(model_id=model), out)
        report = json.loads((out / REPORT_JSON).read_bytes())
        targets = digits_targets(report) if model == "digits-mlp" else lm_targets(report)
        entry = {"report": report, "targets": targets, "seconds": round(time.perf_counter() - t0, 1)}
        if model == "char-lm":
            entry["static_int8"] = static_variant(out, report)
        results["models"][model] = entry
    return results


def _q(q: dict) -> str:
    return f"{100 * q['accuracy']:.1f}%" + (f" / ppl {q['perplexity']:.2f}" if "perplexity" in q else "")


def markdown(results: dict) -> str:
    lines = [f"Machine: {results['machine']}. Latency: batch 1, median of 200 runs.", ""]
    lines += ["| model | target | value | limit | met |", "|---|---|---|---|---|"]
    for model, e in results["models"].items():
        for t in e["targets"]:
            met = "yes" if t["met"] else "**no**"
            lines.append(f"| {model} | {t['target']} | {t['value']} | {t['op']} {t['limit']} | {met} |")
    head = ["model", "params T / S", "teacher", "no KD", "KD", "pruned", "int8 .pte"]
    head += ["eager µs", "int8 µs", "fp32 µs", "portable µs", "int8 / fp32 kB"]
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, e in results["models"].items():
        r = e["report"]
        q, lat, b = r["quality"], r["latency_us"], r["bytes"]
        cells = [model, f"{r['params']['teacher']} / {r['params']['student']}"]
        cells += [_q(q[k]) if k in q else "–" for k in ("teacher", "student_no_kd", "student_kd", "pruned", "int8")]
        cells += [f"{lat[k]:.0f}" for k in ("eager-fp32", "xnnpack-int8", "xnnpack-fp32", "portable")]
        cells.append(f"{b['xnnpack-int8.pte'] / 1024:.0f} / {b['xnnpack-fp32.pte'] / 1024:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    if "char-lm" in results["models"] and "static_int8" in results["models"]["char-lm"]:
        d = results["models"]["char-lm"]["static_int8"]
        lines += [
            "",
            f"char-lm with static int8 instead (int8 activations): {d['bytes'] / 1024:.0f} kB, "
            f"{d['latency_us']:.0f} µs, "
            f"{_q(d['quality'])}",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits-mlp", "char-lm"])
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    np.random.seed(0)
    with tempfile.TemporaryDirectory() as work:
        results = run(a.models, Path(work))
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "export.json").write_text(json.dumps(results, indent=2))
    (a.out / "export.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

"""Commands of the export stage: `export`, `data`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import stop_on_signals  # noqa: F401


def cmd_export(a: argparse.Namespace) -> int:
    import json

    from export.pipeline import REPORT_JSON, ExportConfig, export_bundle
    from export.report import format_table
    from models import ModelError

    cfg = ExportConfig(
        model_id=a.model,
        target=a.target,
        server_fraction=a.server_fraction,
        epochs=a.epochs,
        train_minutes=a.train_minutes,
        distill=a.distill,
        alpha=a.alpha,
        temperature=a.temperature,
        seed=a.seed,
        text=None if a.text is None else str(a.text),
        sparsity=a.sparsity,
        quant=a.quant,
        train_subset=a.train_subset,
        compare=not a.no_compare,
    )
    try:
        m = export_bundle(cfg, a.out)
    except ModelError as e:  # ExportError is a ModelError
        print(f"edgelearn export: error: {e}", file=sys.stderr)
        return 2
    print(format_table(json.loads((a.out / REPORT_JSON).read_bytes())))
    sizes = ", ".join(f"{name} ({meta['bytes']} B)" for name, meta in m.files.items())
    print(f"bundle {a.out}: {m.model_id} v{m.version} {m.target}, files {sizes}")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from models.shards import write_shards

    paths = write_shards(a.out, a.devices, a.server_fraction, a.classes_per_device, a.seed)
    print(f"wrote {len(paths)} device shards and test.safetensors to {a.out}")
    return 0


def _add_export_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "export",
        help="distill, quantize and lower a model into a bundle",
        description="Train a teacher and a distilled student (and one without KD), prune, quantize "
        "(PT2E int8), lower to ExecuTorch (infer.pte + train.pte), measure every step into report.json "
        "and write a bundle directory atomically (docs/export.md).",
    )
    e.add_argument(
        "--model", default="digits-mlp", help="digits-mlp (default), char-lm, or a user model package.module:factory"
    )
    e.add_argument("--target", default="xnnpack-int8", help="xnnpack-int8 (default), xnnpack-fp32 or portable")
    e.add_argument("--text", type=Path, default=None, help="char-lm training text: UTF-8 file or directory")
    e.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="share of Linear weights magnitude pruning zeroes (default: the model's, 0.5 digits-mlp, 0 char-lm)",
    )
    e.add_argument(
        "--quant",
        choices=("static", "dynamic"),
        default=None,
        help="PT2E int8 mode for xnnpack-int8 (default: static for digits-mlp, dynamic for char-lm)",
    )
    e.add_argument(
        "--train-subset", default="all", help="what train.pte trains: all (default), last (last block + head), head"
    )
    e.add_argument(
        "--no-compare", action="store_true", help="skip the no-KD student and the other targets in the report"
    )
    e.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    e.add_argument(
        "--server-fraction",
        type=float,
        default=0.2,
        help="share of the training data the exporter trains on; devices hold the rest (default 0.2)",
    )
    e.add_argument("--epochs", type=int, default=None,
                   help="training epochs of each model (default: the model's: 60 for digits-mlp; char-lm trains for "
                   "--train-minutes instead)")  # fmt: skip
    e.add_argument("--train-minutes", type=float, default=None,
                   help="wall time for all training (teacher 4 : students 3 : pruning 1), with progress and the time "
                   "left (default: the model's, 3 for char-lm; --epochs wins)")  # fmt: skip
    e.add_argument("--distill", action=argparse.BooleanOptionalAction, default=None,
                   help="train a teacher and distill the student from it (default: the model's)")  # fmt: skip
    e.add_argument("--alpha", type=float, default=0.5, help="KD weight of the hard-label loss (default 0.5)")
    e.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default 4)")
    e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    e.set_defaults(func=cmd_export)


def _add_data_parser(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "data",
        help="write non-IID device shards of the digits data",
        description="Split the digits device pool into label-skewed shards (safetensors x, y).",
    )
    d.add_argument("--devices", type=int, default=4, help="number of shards (default 4)")
    d.add_argument("--out", type=Path, required=True, help="folder for device-K.safetensors and test.safetensors")
    d.add_argument("--server-fraction", type=float, default=0.2, help="as given to export (default 0.2)")
    d.add_argument("--classes-per-device", type=int, default=4, help="classes each device mostly holds (default 4)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(func=cmd_data)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_export_parser(sub)
    _add_data_parser(sub)

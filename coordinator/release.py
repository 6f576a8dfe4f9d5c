"""Releases from new weights without lowering: the previous release's programs, a rewritten data file.

A bundle of format 1.1 (export lowered `infer.pte` once, its constants in `infer.ptd`, `data.json` saying
where the trainable parameters sit) becomes release v+1 by: new `weights.safetensors`, `infer.ptd`
patched in numpy (edgelearn/datafile.py), every other file copied byte for byte, and the release's
metrics measured on the export's test split with the ExecuTorch runtime. Neither torch.export nor
any lowering runs, so the coordinator never imports the exporter for such a bundle. A format 1
bundle (programs with their constants inside) still needs the exporter: `release_builder` hands it
to the `relower` function its caller gives (export.pipeline.rebuild_bundle, imported lazily).
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import asdict, replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from edgelearn.bundle import (
    EXPORT_JSON,
    INFER_PTD,
    INFER_PTE,
    WEIGHTS,
    BundleError,
    Manifest,
    dump_weights,
    verify_bundle,
    write_bundle,
)
from edgelearn.datafile import DATA_LAYOUT, load_layout, patch_data
from edgelearn.programs import InferenceProgram
from models.quality import release_metrics
from models.registry import TaskData, get_spec
from models.text import read_text

log = logging.getLogger(__name__)
RELEASE_ONLY = ("report.json",)  # release 1's export report is not carried into later releases
Rebuild = Callable[..., Manifest]


@lru_cache(maxsize=4)
def release_test_split(model_id: str, export_json: bytes) -> TaskData:
    """The export's data (its test split measures each release), read once per process and bundle lineage."""
    cfg = SimpleNamespace(**json.loads(export_json))
    if cfg.text is not None and cfg.text_sha256 and hashlib.sha256(read_text(cfg.text)).hexdigest() != cfg.text_sha256:
        raise BundleError(f"text {cfg.text} changed since release 1 was exported: its test split would differ "
                          "(restore it, or export a new release 1)")  # fmt: skip
    return get_spec(model_id).load_data(cfg)


def measure(
    manifest: Manifest, weights: dict[str, np.ndarray], infer_pte: bytes, ptd: bytes, export_json: bytes
) -> dict:
    """models.quality.release_metrics of `weights` (eager) and of the program with data file `ptd`."""
    spec = get_spec(manifest.model_id)
    model = spec.make_student()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, INFER_PTD)
        path.write_bytes(ptd)
        program = InferenceProgram(infer_pte, path)
        return release_metrics(spec, model, program, release_test_split(manifest.model_id, export_json))


def data_release(
    prev_dir: Path, weights: dict[str, np.ndarray], version: int, out: Path, created: str = ""
) -> Manifest:
    """Release `version` with `weights`: the format 1.1 bundle at `prev_dir` with a new data file. Deterministic:
    the same inputs write the same bytes (a close redone after a crash publishes the same release)."""
    prev = verify_bundle(prev_dir)
    files = {n: (prev_dir / n).read_bytes() for n in prev.files if n not in RELEASE_ONLY}
    layout = load_layout(files[DATA_LAYOUT])
    files[INFER_PTD] = patch_data(files[INFER_PTD], layout, weights)
    files[WEIGHTS] = dump_weights(weights)
    metrics = measure(prev, weights, files[INFER_PTE], files[INFER_PTD], files[EXPORT_JSON])
    manifest = replace(prev, version=version, metrics=metrics, created=created, signature=None, files={})
    log.debug("data release %s v%d -> v%d", prev.model_id, prev.version, version)
    return write_bundle(out, Manifest(**asdict(manifest)), files)


def has_data_layout(bundle_dir: Path) -> bool:
    return (Path(bundle_dir) / DATA_LAYOUT).exists() and (Path(bundle_dir) / INFER_PTD).exists()


def release_builder(relower: Rebuild | None = None) -> Rebuild:
    """`rebuild(prev_dir, weights, version, out, created)`: `data_release` for a format 1.1 bundle, else
    `relower` (which lowers the programs again); without `relower` a format 1 bundle raises BundleError."""

    def rebuild(prev_dir: Path, weights: dict[str, np.ndarray], version: int, out: Path, created: str = "") -> Manifest:
        if has_data_layout(prev_dir):
            return data_release(prev_dir, weights, version, out, created)
        if relower is None:
            raise BundleError(f"{prev_dir} keeps its constants inside infer.pte (bundle format 1): a new release "
                              "must be lowered again, which needs the exporter; export a new release 1")  # fmt: skip
        return relower(prev_dir, weights, version, out, created=created)

    return rebuild

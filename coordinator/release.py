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
from collections.abc import Callable
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from safetensors.numpy import load as st_load

from edgelearn.bundle import (
    DELTA,
    EXPORT_JSON,
    INFER_PTD,
    INFER_PTE,
    WEIGHTS,
    BundleError,
    Manifest,
    dump_weights,
    read_bundle,
    sha256,
    write_bundle,
)
from edgelearn.datafile import DATA_LAYOUT, load_layout, patch_data
from edgelearn.delta import encode_delta
from edgelearn.et_import import runtime_modules
from edgelearn.programs import loaded_program
from models.quality import release_metrics
from models.registry import TaskData, get_spec
from models.text import read_text

log = logging.getLogger(__name__)
RELEASE_ONLY = ("report.json", DELTA)  # release 1's export report and a release's own delta are not carried on
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
    with loaded_program(infer_pte, ptd) as program:
        return release_metrics(spec, model, program, release_test_split(manifest.model_id, export_json))


def data_release(
    prev_dir: Path,
    weights: dict[str, np.ndarray],
    version: int,
    out: Path,
    created: str = "",
    delta: bool = False,
    fleet: str = "",
) -> Manifest:
    """Release `version` with `weights`: the format 1.1 bundle at `prev_dir` with a new data file. Deterministic:
    the same inputs write the same bytes (a close redone after a crash publishes the same release).
    `delta`: the release's weights are those an int8 delta from `prev_dir`'s rebuilds (edgelearn/delta.py),
    and the delta is part of the bundle, when it is smaller than the weights file. `fleet` names the fleet in the
    manifest (signed with it): a device of another fleet refuses the release."""
    prev, files = read_bundle(prev_dir)
    files = {n: data for n, data in files.items() if n not in RELEASE_ONLY}
    if delta:
        base = files[WEIGHTS]
        rebuilt, blob = encode_delta(st_load(base), weights, sha256(base))
        if len(blob) < len(base):
            weights, files[DELTA] = rebuilt, blob
    layout = load_layout(files[DATA_LAYOUT])
    files[INFER_PTD] = patch_data(files[INFER_PTD], layout, weights)
    files[WEIGHTS] = dump_weights(weights)
    metrics = measure(prev, weights, files[INFER_PTE], files[INFER_PTD], files[EXPORT_JSON])
    manifest = replace(prev, version=version, metrics=metrics, created=created, signature=None, files={},
                       fleet=fleet or prev.fleet)  # fmt: skip
    log.debug("data release %s v%d -> v%d", prev.model_id, prev.version, version)
    return write_bundle(out, manifest, files)


def warm_up(bundle_dir: Path, model_id: str) -> None:
    """Load what a data release of the (verified) bundle `bundle_dir` of `model_id` needs (the ExecuTorch
    runtime, the export's test split) now, so that the first round's close does not pay for it."""
    if has_data_layout(bundle_dir):
        runtime_modules()
        release_test_split(model_id, (Path(bundle_dir) / EXPORT_JSON).read_bytes())


def has_data_layout(bundle_dir: Path) -> bool:
    return (Path(bundle_dir) / DATA_LAYOUT).exists() and (Path(bundle_dir) / INFER_PTD).exists()


def release_builder(relower: Rebuild | None = None, delta: bool = False, fleet: str = "") -> Rebuild:
    """`rebuild(prev_dir, weights, version, out, created)`: `data_release` (with `delta`) for a format 1.1 bundle,
    else `relower` (which lowers the programs again); without `relower` a format 1 bundle raises BundleError."""

    def rebuild(prev_dir: Path, weights: dict[str, np.ndarray], version: int, out: Path, created: str = "") -> Manifest:
        if has_data_layout(prev_dir):
            return data_release(prev_dir, weights, version, out, created, delta, fleet)
        if relower is None:
            raise BundleError(f"{prev_dir} keeps its constants inside infer.pte (bundle format 1): a new release "
                              "must be lowered again, which needs the exporter; export a new release 1")  # fmt: skip
        return relower(prev_dir, weights, version, out, created=created)

    return rebuild

"""Releases on the device: verify, install, activate atomically, keep the previous one for rollback."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from safetensors import SafetensorError
from safetensors.numpy import load as st_load

from edge_runtime.engines import TrainEngine, make_engine
from edge_runtime.samples import SampleFormat
from edgelearn import lora
from edgelearn.atomic import write_bytes
from edgelearn.bundle import (
    DELTA,
    INFER_PTD,
    INFER_PTE,
    MANIFEST,
    TRAIN_PTE,
    WEIGHTS,
    BundleError,
    Manifest,
    dump_weights,
    load_weights,
    sha256,
    verify_bundle,
    write_bundle,
)
from edgelearn.datafile import DATA_LAYOUT, load_layout, patch_data
from edgelearn.delta import DeltaError, apply_delta, delta_base
from edgelearn.programs import InferenceProgram, bundle_program
from edgelearn.protocol import ProtocolError, read_metadata
from edgelearn.signing import load_public, read_signed_release

log = logging.getLogger(__name__)
KEEP_RELEASES = 2


class IncompleteReleaseError(BundleError):
    """A lean release archive (protocol v1.2) this device cannot complete from what it has installed."""


class ReleaseStore:
    """`state/releases/v{N}/` bundles plus `state/active.json` naming the running version."""

    def __init__(
        self, state_dir: Path, public_key: Ed25519PublicKey | None = None, fleet: str = "", min_release: int = 0
    ) -> None:
        self.min_release = min_release  # rollback floor: older releases are refused even on a device with no state
        self.public_key = public_key  # an Ed25519PublicKey: this fleet accepts only releases signed by it
        self.fleet = fleet  # a release naming another fleet is refused ("" : not checked)
        self.root = state_dir / "releases"
        self.root.mkdir(parents=True, exist_ok=True)
        self.active_file = state_dir / "active.json"

    def active_version(self) -> int:
        try:
            return int(json.loads(self.active_file.read_bytes())["version"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    def previous_version(self) -> int:
        try:
            return int(json.loads(self.active_file.read_bytes()).get("previous") or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _model_id(self, version: int) -> str | None:
        try:
            return str(json.loads((self.path(version) / "manifest.json").read_bytes())["model_id"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def path(self, version: int) -> Path:
        return self.root / f"v{version}"

    def install(self, payload: bytes) -> Manifest | None:
        """Verify a release archive and install it (not yet active); None if not newer than the active one.

        Raises BundleError for a corrupt, tampered, unsigned (in a signed fleet) or other-model
        archive; nothing is written then.
        """
        manifest, files = read_signed_release(payload, self.public_key, self.complete)
        current = self.active_version()
        running = self._model_id(current)
        if manifest.version < self.min_release:
            raise BundleError(f"release v{manifest.version} is older than this device's floor v{self.min_release}")
        if self.fleet and manifest.fleet and manifest.fleet != self.fleet:
            raise BundleError(f"release is for fleet {manifest.fleet!r}, this device is in {self.fleet!r}")
        if running is not None and manifest.model_id != running:
            raise BundleError(f"release is for model {manifest.model_id!r}, this device runs {running!r}")
        if manifest.version <= current:
            log.info("release v%d ignored: not newer than active v%d", manifest.version, current)
            return None
        write_bundle(self.path(manifest.version), manifest, files)
        return manifest

    def installed(self) -> list[Path]:
        """Installed release directories, newest first."""
        found = [p for p in self.root.glob("v*") if p.name[1:].isdigit() and (p / MANIFEST).exists()]
        return sorted(found, key=lambda p: -int(p.name[1:]))

    def _local_file(self, name: str, digest: str) -> bytes | None:
        """`name` with sha256 `digest` from an installed release, if one has it."""
        for d in self.installed():
            path = d / name
            if path.exists():
                blob = path.read_bytes()
                if sha256(blob) == digest:
                    return blob
        return None

    def complete(self, manifest: Manifest, members: dict[str, bytes]) -> dict[str, bytes]:
        """The files a lean archive left out: each from an installed release with the same sha256, and infer.ptd
        rebuilt from the new weights on an installed one with the same data layout (edgelearn/datafile.py).
        Raises IncompleteReleaseError if any is missing (the caller fetches the full archive)."""
        files: dict[str, bytes] = {}
        if WEIGHTS not in members and DELTA in members:
            files.update(self._rebuilt_weights(manifest, members[DELTA]))
        for name in sorted(set(manifest.files) - set(members) - set(files)):
            blob = self._local_file(name, manifest.files[name]["sha256"])
            if blob is not None:
                files[name] = blob
        if INFER_PTD not in members and INFER_PTD not in files and DATA_LAYOUT in manifest.files:
            weights_file = members.get(WEIGHTS, files.get(WEIGHTS))
            files.update(self._rebuilt_data(manifest, weights_file) if weights_file else {})
        missing = sorted(set(manifest.files) - set(members) - set(files))
        if missing:
            raise IncompleteReleaseError(f"release v{manifest.version} is lean and no release here has {missing[0]}")
        return files

    def _rebuilt_weights(self, manifest: Manifest, delta: bytes) -> dict[str, bytes]:
        """{weights.safetensors: the delta applied to the installed release it extends}, or {} if none is here."""
        try:
            base = self._local_file(WEIGHTS, delta_base(delta))
            return {} if base is None else {WEIGHTS: dump_weights(apply_delta(st_load(base), delta))}
        except (DeltaError, SafetensorError) as e:
            raise BundleError(f"cannot apply the delta of release v{manifest.version}: {e}") from None

    def _rebuilt_data(self, manifest: Manifest, weights_file: bytes) -> dict[str, bytes]:
        """{infer.ptd: rebuilt from `weights_file`} on an installed release with the same data layout, or {}."""
        layout_sha = manifest.files[DATA_LAYOUT]["sha256"]
        for d in self.installed():
            if not (d / INFER_PTD).exists() or not (d / DATA_LAYOUT).exists():
                continue
            if sha256((d / DATA_LAYOUT).read_bytes()) != layout_sha:
                continue
            try:
                layout = load_layout((d / DATA_LAYOUT).read_bytes())
                return {INFER_PTD: patch_data((d / INFER_PTD).read_bytes(), layout, st_load(weights_file))}
            except (SafetensorError, ValueError) as e:  # DataFileError is a ValueError
                raise BundleError(f"cannot rebuild {INFER_PTD} of release v{manifest.version}: {e}") from None
        return {}

    def activate(self, version: int) -> None:
        """Make `version` the active release (atomic) and drop releases older than the previous one."""
        previous = self.active_version()
        write_bytes(self.active_file, json.dumps({"version": version, "previous": previous}).encode())
        for p in self.root.glob("v*"):
            if p.name[1:].isdigit() and int(p.name[1:]) < version - KEEP_RELEASES + 1 and int(p.name[1:]) != previous:
                shutil.rmtree(p, ignore_errors=True)

    def discard(self, version: int) -> None:
        shutil.rmtree(self.path(version), ignore_errors=True)

    def restore(self, load: Callable[[Path, Manifest], Active]) -> Active | None:
        """The active release loaded (and activated) by `load`; if it is damaged or fails, the previous one (made
        active again); None if neither loads (logged)."""
        v = self.active_version()
        for candidate in (v, self.previous_version()):
            found = self.load_version(candidate) if candidate else None
            if not found:
                continue
            try:
                active = load(found[1], found[0])
            except Exception as e:
                log.error("release v%d fails to load: %s", candidate, e)
                continue
            if candidate != v:
                self.activate(candidate)
                log.warning("rolled back from v%d to v%d", v, candidate)
            return active
        return None

    def load_version(self, v: int) -> tuple[Manifest, Path] | None:
        """The verified bundle of installed release `v`; None if absent or damaged (logged)."""
        if v == 0:
            return None
        try:
            return verify_bundle(self.path(v)), self.path(v)
        except BundleError as e:
            log.error("release v%d is damaged (%s)", v, e)
            return None


@dataclass
class Active:
    manifest: Manifest
    infer: InferenceProgram
    train_pte: bytes | None
    weights: dict[str, np.ndarray]
    classes: int | None = None  # classify: width of the logits (labels must be below it)

    def sample_format(self) -> SampleFormat:
        """How sample lines become (x, y) for this release; classify labels are checked against `classes`."""
        m = self.manifest
        return SampleFormat(m.task, tuple(m.input["shape"][1:]), classes=self.classes)

    def engine(self, kind: str | None) -> TrainEngine:
        """A training engine (`kind`, or the model's faster one) on this release's weights and trainable set."""
        m = self.manifest
        return make_engine(kind, m.model_id, m.task, self.weights, self.train_pte, example_batch(m), m.trainable)


def example_batch(manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """A zero batch of the program's input: x of `input.shape`/`input.dtype`; y one label per row
    (classify) or one per token (lm)."""
    shape = tuple(manifest.input["shape"])
    x = np.zeros(shape, dtype=manifest.input.get("dtype", "float32"))
    y = np.zeros(shape if manifest.task == "lm" else shape[:1], dtype=np.int64)
    return x, y


def load_release(bundle_dir: Path, manifest: Manifest) -> Active:
    """Load a verified bundle's inference program and smoke-test it; raises on any failure."""
    weights = load_weights(bundle_dir)
    infer = bundle_program(bundle_dir)
    out = infer.predict(example_batch(manifest)[0])
    if not np.isfinite(out).all():
        raise ValueError("smoke inference returned non-finite values")
    train_pte = (bundle_dir / TRAIN_PTE).read_bytes() if TRAIN_PTE in manifest.files else None
    classes = int(out.shape[-1]) if manifest.task == "classify" else None
    return Active(manifest, infer, train_pte, weights, classes)


def personal_program(bundle_dir: Path, active: Active, adapter_path: Path, work_dir: Path) -> InferenceProgram:
    """`infer.pte` on the release's weights plus the device's personal adapter, W + B·A (`edgelearn learn
    --lora-rank` writes one: B with the rank and version that define A), for a format 1.1 bundle (its data file
    rebuilt in numpy, no lowering). ValueError names why it cannot be (another model, format 1, bad file)."""
    m = active.manifest
    try:
        raw = adapter_path.read_bytes()
        adapter, meta = st_load(raw), read_metadata(raw)
        rank, version = int(meta["rank"]), int(meta["version"])
    except (OSError, SafetensorError, ProtocolError, KeyError, ValueError) as e:
        raise ValueError(f"personal adapter {adapter_path}: unreadable ({e})") from None
    if meta.get("model_id") != m.model_id:
        raise ValueError(f"personal adapter {adapter_path} is for {meta.get('model_id')!r}, not {m.model_id!r}")
    if DATA_LAYOUT not in m.files:
        raise ValueError(f"release v{m.version} keeps its weights inside infer.pte (format 1): no personal adapter")
    shapes = {n: tuple(active.weights[n].shape) for n in m.trainable}
    if {n: tuple(v.shape) for n, v in adapter.items()} != lora.adapter_shapes(shapes, rank):
        raise ValueError(f"personal adapter {adapter_path} does not fit release v{m.version}'s tensors")
    delta = lora.expand(adapter, shapes, version)
    merged = {**active.weights, **{n: active.weights[n] + delta[n] for n in lora.targets(shapes)}}
    layout = load_layout((bundle_dir / DATA_LAYOUT).read_bytes())
    data = work_dir / "personal-infer.ptd"
    write_bytes(data, patch_data((bundle_dir / INFER_PTD).read_bytes(), layout, merged))
    program = InferenceProgram((bundle_dir / INFER_PTE).read_bytes(), data)
    if not np.isfinite(program.predict(example_batch(m)[0])).all():
        raise ValueError("the personal program's smoke inference returned non-finite values")
    return program


def personalize(active: Active, bundle_dir: Path, adapter_path: Path | None, work_dir: Path) -> Active:
    """`active` serving global + the personal adapter at `adapter_path` when there is one that fits (else as it is,
    with a warning naming why)."""
    if adapter_path is None or not adapter_path.exists():
        return active
    try:
        active.infer = personal_program(bundle_dir, active, adapter_path, work_dir)
    except ValueError as e:
        log.warning("serving v%d without the personal adapter: %s", active.manifest.version, e)
        return active
    log.info("serving v%d with personal adapter %s", active.manifest.version, adapter_path)
    return active


def public_key(path: Path | None) -> Ed25519PublicKey | None:
    """The fleet's release-signing key at `path`, or None for an unsigned fleet."""
    return None if path is None else load_public(path)

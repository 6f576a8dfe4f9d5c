"""Bundles: a directory with `manifest.json` + `weights.safetensors` + `.pte` programs, and its release archive.

A bundle is written atomically (temp dir → fsync → rename) and verified by sha256
before any `.pte` in it is parsed. The release archive is an uncompressed POSIX
tar whose first member is `manifest.json` (protocol v1).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from edgelearn.atomic import replace_dir
from edgelearn.protocol import BUNDLE_FORMAT, BUNDLE_FORMAT_DATA, BUNDLE_FORMATS

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
INFER_PTE = "infer.pte"
INFER_PTD = "infer.ptd"  # format 1.1: the inference program's constants (edgelearn/datafile.py)
TRAIN_PTE = "train.pte"
DELTA = "weights.delta"  # v1.2, opt-in: the weights as an int8 difference from the previous release's
EXPORT_JSON = "export.json"  # the export settings: test split, and how a format 1 bundle is lowered again
REQUIRED_FILES = (WEIGHTS, INFER_PTE)
MAX_MEMBER_BYTES = 512 * 1024 * 1024
MAX_MANIFEST_DEPTH = 16  # a release's free-form fields (metrics, signature) nest far less; deeper ones overflow copies


class BundleError(ValueError):
    """A bundle or release archive that is malformed, incomplete or tampered with."""


@dataclass(frozen=True)
class Manifest:
    model_id: str
    version: int
    task: str
    target: str
    input: dict
    trainable: list[str]
    files: dict[str, dict] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    created: str = ""
    signature: dict | None = None
    format: str = BUNDLE_FORMAT
    fleet: str = ""  # v1.2: the fleet a coordinator built this release for ("": unnamed, e.g. an export)

    def fields(self) -> dict:
        """The manifest as JSON fields; an empty `fleet` is left out, so manifests without one keep their bytes
        (and their signatures)."""
        d = asdict(self)
        if not d["fleet"]:
            del d["fleet"]
        return d

    def to_json(self) -> bytes:
        return json.dumps(self.fields(), indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            d = json.loads(data)
            m = cls(**d)
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            raise BundleError(f"manifest.json is not a valid manifest: {e}") from None
        if m.format not in BUNDLE_FORMATS:
            raise BundleError(f"manifest format {m.format!r} is not one this edgelearn reads "
                              f"({', '.join(BUNDLE_FORMATS)}); update the device software")  # fmt: skip
        if not isinstance(m.version, int) or m.version < 1:
            raise BundleError(f"manifest version {m.version!r} must be an integer >= 1")
        missing = [f for f in REQUIRED_FILES if f not in m.files]
        if missing:
            raise BundleError(f"manifest lists no {missing[0]}")
        for name in m.files:
            _check_member_name(name)
        return m


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MAX_MEMBER_NAME_BYTES = 255  # what every common file system takes


def _check_member_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith(".") or name == MANIFEST:
        raise BundleError(f"bad file name in bundle: {name[:80]!r} (flat names only)")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_MEMBER_NAME_BYTES or not name.isprintable():
        raise BundleError(f"bad file name in bundle: {name[:80]!r} (printable, at most 255 bytes)")


def utc_now(unix_s: float | None = None) -> str:
    """`unix_s` (default: now) as the manifest's `created`: ISO 8601 UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix_s))


def check_bundle_target(out_dir: str | Path) -> Path:
    """`out_dir` resolved, if a bundle may be written there: a new or empty folder, or an existing bundle (which
    is replaced). Anything else raises BundleError, so that no one's files are ever swept away."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists():
        if not out_dir.is_dir():
            raise BundleError(f"{out_dir} is a file; choose a new or empty folder for the bundle")
        if any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
            raise BundleError(f"{out_dir} is a non-empty folder that is not a bundle; choose a new or empty folder")
    return out_dir


def write_bundle(out_dir: str | Path, manifest: Manifest, files: dict[str, bytes]) -> Manifest:
    """Write `files` + a manifest listing their sha256 into `out_dir`, atomically; returns the final manifest.
    `out_dir` must be new, empty or a bundle (`check_bundle_target`)."""
    out_dir = check_bundle_target(out_dir)
    for name in files:
        _check_member_name(name)
    listed = {name: {"sha256": sha256(data), "bytes": len(data)} for name, data in sorted(files.items())}
    fmt = BUNDLE_FORMAT_DATA if INFER_PTD in files else BUNDLE_FORMAT  # format 1 devices can still read the rest
    final = Manifest(**{**asdict(manifest), "files": listed, "created": manifest.created or utc_now(), "format": fmt})
    Manifest.from_json(final.to_json())  # same checks a reader applies
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        (tmp / MANIFEST).write_bytes(final.to_json())
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def read_bundle(bundle_dir: str | Path) -> tuple[Manifest, dict[str, bytes]]:
    """The manifest and every file it lists, each checked against its sha256; BundleError if any is missing or
    differs. One read of each file, for callers that need the bytes too (releases, archives)."""
    bundle_dir = Path(bundle_dir)
    try:
        manifest = Manifest.from_json((bundle_dir / MANIFEST).read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{bundle_dir}: no manifest.json (not a bundle directory)") from None
    files: dict[str, bytes] = {}
    for name, meta in manifest.files.items():
        try:
            data = (bundle_dir / name).read_bytes()
        except FileNotFoundError:
            raise BundleError(f"{bundle_dir}: {name} listed in the manifest is missing") from None
        if sha256(data) != meta.get("sha256") or len(data) != meta.get("bytes"):
            raise BundleError(f"{bundle_dir}: {name} does not match its sha256 in the manifest (tampered?)")
        files[name] = data
    return manifest, files


def verify_bundle(bundle_dir: str | Path) -> Manifest:
    """Check that every file the manifest lists exists with its sha256; returns the manifest or raises BundleError."""
    return read_bundle(bundle_dir)[0]


LEAN_MEMBERS = (MANIFEST, WEIGHTS)  # what a lean archive (format 1.1) carries; the device has or derives the rest
LEAN_DELTA_MEMBERS = (MANIFEST, DELTA)  # ... of a delta release: the weights follow from the previous ones


def pack_release(bundle_dir: str | Path, lean: bool = False) -> bytes:
    """The release archive of a verified bundle (`pack_files` of `read_bundle`, manifest.json as on disk)."""
    return release_archives(bundle_dir, (lean,))[0]


def release_archives(bundle_dir: str | Path, leans: tuple[bool, ...] = (False, True)) -> list[bytes]:
    """One archive of a verified bundle per entry of `leans` (full, lean), its files read and checked once."""
    manifest, files = read_bundle(bundle_dir)
    files = {MANIFEST: (Path(bundle_dir) / MANIFEST).read_bytes(), **files}
    return [pack_files(manifest, files, lean) for lean in leans]


def pack_files(manifest: Manifest, files: dict[str, bytes], lean: bool = False) -> bytes:
    """A release archive: POSIX tar, `manifest.json` (`files[MANIFEST]`, else the manifest's JSON) first. `lean`
    (format 1.1 only): just the manifest and the weights; a device takes the programs from a release it has
    installed and rebuilds infer.ptd from the weights (protocol v1.2); a delta release carries its weights as
    `weights.delta`."""
    members = {MANIFEST: manifest.to_json(), **files}
    names = [MANIFEST, *manifest.files]
    if lean and manifest.format == BUNDLE_FORMAT_DATA:
        keep = LEAN_DELTA_MEMBERS if DELTA in manifest.files else LEAN_MEMBERS
        names = [n for n in names if n in keep]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in names:
            data = members[name]
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
        end = tar.offset + 2 * tarfile.BLOCKSIZE  # the end-of-archive blocks; not the padding to a 10 KiB record
    return buf.getvalue()[:end]


Complete = Callable[[Manifest, dict[str, bytes]], dict[str, bytes]]


def read_release(
    payload: bytes, check: Callable[[Manifest], None] | None = None, complete: Complete | None = None
) -> tuple[Manifest, dict[str, bytes]]:
    """Parse and verify a release archive in memory: (manifest, {file name: bytes}); BundleError if bad.

    `check(manifest)` (e.g. the signature check of `signing.read_signed_release`) runs first and raises
    BundleError to refuse; every member's sha256 is checked before anything else reads it. A lean
    archive lacks some listed files: `complete(manifest, members)` returns them (from installed
    releases), and they are checked against the manifest the same way; without it the archive is refused.
    """
    manifest, data = _read_members(payload, check)
    if not set(data) <= set(manifest.files):
        raise BundleError(f"release archive members {sorted(data)} differ from the manifest's {sorted(manifest.files)}")
    _check_hashes(manifest, data)
    if set(data) != set(manifest.files):
        if complete is None or manifest.format != BUNDLE_FORMAT_DATA:
            raise BundleError(f"release archive lacks {sorted(set(manifest.files) - set(data))[0]} (a lean "
                              "archive, which only a format 1.1 device completes)")  # fmt: skip
        extra = complete(manifest, dict(data))
        _check_hashes(manifest, extra)
        data.update(extra)
        if set(data) != set(manifest.files):
            raise BundleError(f"release archive lacks {sorted(set(manifest.files) - set(data))[0]}")
    return manifest, data


def read_lean_release(payload: bytes, check: Callable[[Manifest], None] | None = None) -> tuple[Manifest, dict]:
    """The manifest and the members a (lean or full) release archive carries, each checked against its sha256:
    for an observer that needs the weights, not a complete bundle."""
    manifest, data = _read_members(payload, check)
    _check_hashes(manifest, data)
    return manifest, data


def _check_hashes(manifest: Manifest, files: dict[str, bytes]) -> None:
    for name, blob in files.items():
        entry = manifest.files.get(name)
        if entry is None or sha256(blob) != entry["sha256"] or len(blob) != entry["bytes"]:
            raise BundleError(f"release archive: {name} does not match its sha256 (tampered?)")


def _read_members(payload: bytes, check: Callable[[Manifest], None] | None) -> tuple[Manifest, dict[str, bytes]]:
    """The archive's manifest (its fields and `check` passed) and its other members, not yet hash-checked."""
    try:
        with tarfile.open(fileobj=io.BytesIO(payload), mode="r:") as tar:
            members = tar.getmembers()
            if not members or members[0].name != MANIFEST:
                raise BundleError("release archive: manifest.json is not the first member")
            data: dict[str, bytes] = {}
            for m in members:
                if not m.isfile() or m.size > MAX_MEMBER_BYTES or m.name in data:
                    raise BundleError(f"release archive: member {m.name!r} is not a plain file of sane size")
                f = tar.extractfile(m)
                data[m.name] = f.read() if f else b""
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:  # ValueError: e.g. a bad PAX header
        raise BundleError(f"release is not a tar archive: {str(e)[:200]}") from None
    try:  # retained on the broker: anything that escaped here would crash the device at every restart
        manifest = Manifest.from_json(data.pop(MANIFEST))
        check_manifest_fields(manifest)
        if check is not None:
            check(manifest)
    except RecursionError:
        raise BundleError("manifest.json is nested too deeply") from None
    except TypeError as e:  # e.g. `files` a number or a list of numbers, met by Manifest.from_json's own checks
        raise BundleError(f"manifest.json has a field of the wrong type: {e}") from None
    return manifest, data


def _is_int(value: object, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_str_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _field_problem(m: Manifest) -> str | None:
    """The first manifest field of the wrong type or form (protocol v1), or None."""
    if not _is_int(m.version, 1):
        return f"version {m.version!r} is not an integer >= 1"
    for key in ("model_id", "task", "target", "created", "format", "fleet"):
        if not isinstance(getattr(m, key), str):
            return f"{key} is not a string"
    shape = m.input.get("shape") if isinstance(m.input, dict) else None
    if not (isinstance(shape, list) and shape and all(_is_int(n, 1) for n in shape)):
        return "input.shape is not a list of positive integers"
    if not isinstance(m.input.get("dtype", "float32"), str):
        return "input.dtype is not a string"
    if not _is_str_list(m.trainable):
        return "trainable is not a list of names"
    if not isinstance(m.metrics, dict) or not (m.signature is None or isinstance(m.signature, dict)):
        return "metrics or signature is not an object"
    for name, entry in m.files.items():
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or not _is_int(entry.get("bytes"), 0)
        ):
            return f"files[{name!r}] needs a sha256 string and a bytes count"
    return None


def json_depth(obj: object) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0, `[]` is 1), without recursion."""
    deepest, stack = 0, [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    return deepest


def check_manifest_fields(m: Manifest) -> None:
    """Raise BundleError naming the first manifest field of the wrong type (a release is untrusted input)."""
    if not isinstance(m.files, dict):
        raise BundleError("manifest.json: files is not an object")
    if json_depth([m.input, m.metrics, m.signature]) > MAX_MANIFEST_DEPTH:
        raise BundleError(f"manifest.json: input, metrics or signature nested deeper than {MAX_MANIFEST_DEPTH}")
    problem = _field_problem(m)
    if problem:
        raise BundleError(f"manifest.json: {problem}")


def unpack_release(payload: bytes, dest_dir: str | Path) -> Manifest:
    """Verify a release archive (all hashes, before any `.pte` is parsed) and write it as a bundle at `dest_dir`."""
    manifest, files = read_release(payload)
    return write_bundle(dest_dir, manifest, files)


def load_weights(bundle_dir: str | Path) -> dict[str, np.ndarray]:
    return st_load((Path(bundle_dir) / WEIGHTS).read_bytes())


def dump_weights(weights: dict[str, np.ndarray]) -> bytes:
    return st_save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()})

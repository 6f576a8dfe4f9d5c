"""Release signatures (protocol v1): ed25519 over the canonical JSON of the manifest without `signature`.

Keys are raw 32-byte ed25519 keys, stored base64-encoded in text files. The library is
`cryptography` (pyca).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from edgelearn.atomic import write_bytes
from edgelearn.bundle import MANIFEST, BundleError, Complete, Manifest, read_release, verify_bundle

ALG = "ed25519"


def canonical(manifest: Manifest) -> bytes:
    """Canonical JSON of the manifest with `signature` removed: sorted keys, separators `,` `:`, UTF-8."""
    d = manifest.fields()
    d.pop("signature")
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def key_id(public: Ed25519PublicKey) -> str:
    """First 16 hex digits of sha256 over the raw public key."""
    return hashlib.sha256(public.public_bytes_raw()).hexdigest()[:16]


def generate_keys(private_path: Path, public_path: Path) -> str:
    """Write a new key pair (base64 raw keys, private file mode 0600); returns the key id."""
    private = Ed25519PrivateKey.generate()
    write_bytes(private_path, base64.b64encode(private.private_bytes_raw()) + b"\n")  # 0600 from creation on
    write_bytes(public_path, base64.b64encode(private.public_key().public_bytes_raw()) + b"\n")
    public_path.chmod(0o644)
    return key_id(private.public_key())


def load_private(path: Path) -> Ed25519PrivateKey:
    try:
        return Ed25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text().strip(), validate=True))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a base64 raw ed25519 private key ({e})") from None


def load_public(path: Path) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(base64.b64decode(path.read_text().strip(), validate=True))
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a base64 raw ed25519 public key ({e})") from None


def sign(manifest: Manifest, private: Ed25519PrivateKey) -> Manifest:
    """The manifest with `signature` = {"alg", "key_id", "sig"} over its canonical JSON."""
    sig = private.sign(canonical(manifest))
    return replace(
        manifest, signature={"alg": ALG, "key_id": key_id(private.public_key()), "sig": base64.b64encode(sig).decode()}
    )


def verify(manifest: Manifest, public: Ed25519PublicKey | None) -> None:
    """No key: anything goes (unsigned fleet). With a key: raise BundleError unless correctly signed by it."""
    if public is None:
        return
    s = manifest.signature
    if not isinstance(s, dict) or s.get("alg") != ALG or not isinstance(s.get("sig"), str):
        raise BundleError("release is not signed (this fleet requires an ed25519 signature)")
    try:
        public.verify(base64.b64decode(s["sig"], validate=True), canonical(manifest))
    except (InvalidSignature, ValueError):
        raise BundleError(f"release signature does not verify with key {key_id(public)}") from None


MESSAGE_SIG = "sig"  # v1.2: the field of a signed round or ack (a v1 device ignores it)
MESSAGE_EXPIRES = "expires"  # v1.3: Unix seconds after which a signed round or ack is refused (signed with it)
MESSAGE_TTL_S = 7 * 24 * 3600  # as long as the broker keeps an offline device's queued acks (persistent sessions)
CLOCK_PLAUSIBLE_UNIX_S = 1_735_689_600  # 2025-01-01: a device clock before this has no RTC time; expiry is skipped


def _message_bytes(body: dict, topic: str) -> bytes:
    """What a control message's signature covers: canonical JSON of {"topic": topic, "body": body without sig}.
    The topic names the fleet (and the device, for an ack), so a message cannot be replayed elsewhere."""
    body = {k: v for k, v in body.items() if k != MESSAGE_SIG}
    return json.dumps({"topic": topic, "body": body}, sort_keys=True, separators=(",", ":")).encode("utf-8")


def sign_message(payload: bytes, topic: str, private: Ed25519PrivateKey, now_s: float | None = None,
                 ttl_s: float = MESSAGE_TTL_S) -> bytes:  # fmt: skip
    """The JSON control message `payload` (a round or an ack) for `topic`, with `expires` = now + `ttl_s` (whole
    seconds) and `sig` = {alg, key_id, sig} over both."""
    body = json.loads(payload)
    body[MESSAGE_EXPIRES] = int((time.time() if now_s is None else now_s) + ttl_s)
    sig = private.sign(_message_bytes(body, topic))
    body[MESSAGE_SIG] = {"alg": ALG, "key_id": key_id(private.public_key()), "sig": base64.b64encode(sig).decode()}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def verify_message(payload: bytes, topic: str, public: Ed25519PublicKey | None, now_s: float | None = None) -> None:
    """No key: anything goes (unsigned fleet). With a key: BundleError unless `payload` carries a valid signature
    by it for `topic` and has not expired (`expires` < now, judged only by a clock past CLOCK_PLAUSIBLE_UNIX_S:
    a board without a real-time clock cannot tell; a v1.2 message without `expires` never expires)."""
    if public is None:
        return
    try:
        body = json.loads(payload)
    except (ValueError, RecursionError):
        raise BundleError("not JSON") from None
    s = body.get(MESSAGE_SIG) if isinstance(body, dict) else None
    if not isinstance(s, dict) or s.get("alg") != ALG or not isinstance(s.get("sig"), str):
        raise BundleError("not signed (this fleet requires ed25519 signatures on rounds and acks)")
    try:
        public.verify(base64.b64decode(s["sig"], validate=True), _message_bytes(body, topic))
    except (InvalidSignature, ValueError):  # ValueError: bad base64
        raise BundleError(f"signature does not verify with key {key_id(public)} for {topic}") from None
    _check_expiry(body.get(MESSAGE_EXPIRES), time.time() if now_s is None else now_s)


def _check_expiry(expires: object, now_s: float) -> None:
    if expires is None:
        return
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise BundleError(f"{MESSAGE_EXPIRES} is not a number")
    if now_s >= CLOCK_PLAUSIBLE_UNIX_S and now_s > expires:
        raise BundleError(f"expired {now_s - expires:.0f} s ago (a replayed message)")


def read_signed_release(
    payload: bytes, public: Ed25519PublicKey | None, complete: Complete | None = None
) -> tuple[Manifest, dict[str, bytes]]:
    """`bundle.read_release`, refusing (BundleError) a manifest not signed by `public` (None: unsigned fleet)."""
    return read_release(payload, lambda m: verify(m, public), complete)


def sign_bundle(bundle_dir: Path, private: Ed25519PrivateKey) -> Manifest:
    """Sign a verified bundle in place: its manifest.json is atomically replaced by the signed one."""
    signed = sign(verify_bundle(bundle_dir), private)
    write_bytes(bundle_dir / MANIFEST, signed.to_json())
    return signed


def ensure_signed(bundle_dir: Path, private: Ed25519PrivateKey) -> Manifest:
    """Sign `bundle_dir` unless it already carries a valid signature by this key."""
    manifest = verify_bundle(bundle_dir)
    try:
        verify(manifest, private.public_key())
    except BundleError:
        return sign_bundle(bundle_dir, private)
    return manifest


def signing_rebuild(rebuild: Callable[..., Manifest], private: Ed25519PrivateKey) -> Callable[..., Manifest]:
    """Wrap a coordinator `rebuild(prev_dir, weights, version, out)` so that every new release is signed."""

    def rebuild_and_sign(prev_dir: Path, weights: Any, version: int, out: Path, created: str = "") -> Manifest:
        rebuild(prev_dir, weights, version, out, created=created)
        return sign_bundle(out, private)

    return rebuild_and_sign

"""Wire protocol v1 (see docs/protocol.md): topics, messages and their encode/decode.

Both the device runtime and the coordinator import this module; nothing else
builds topics or payloads. Messages are frozen dataclasses; JSON keys are the
protocol's, field names carry units.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

PROTOCOL_VERSION = 1
UPDATE_SCHEMA = "edgelearn.update/1"
BUNDLE_FORMAT = "edgelearn.bundle/1"  # programs with their constants inside
BUNDLE_FORMAT_DATA = "edgelearn.bundle/1.1"  # infer.pte + infer.ptd: a release may change only the data
BUNDLE_FORMATS = (BUNDLE_FORMAT, BUNDLE_FORMAT_DATA)
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_UPDATE_ID_CHARS = 64
ENCODINGS = ("fp32", "int8")
QOS = 1


class ProtocolError(ValueError):
    """A payload or name that breaks protocol v1; `reason` is a short machine-readable rule name."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def reason_kind(reason: str | None) -> str:
    """The rule a rejection reason names, without its detail: `bad_shape:fc1.weight` -> `bad_shape`
    (counters and metric labels use this, so that payload-chosen names cannot grow them)."""
    return (reason or "unknown").split(":", 1)[0]


def check_name(kind: str, value: str) -> str:
    """Return `value` if it is a valid fleet or device id (`[A-Za-z0-9_-]{1,64}`), else raise ValueError."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(f"invalid {kind} {value!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
    return value


# ---------------------------------------------------------------- topics


@dataclass(frozen=True)
class Topics:
    """Topic names under `P = {root}/{fleet}`."""

    fleet: str
    root: str = "edgelearn"

    def __post_init__(self) -> None:
        check_name("fleet", self.fleet)
        if not self.root or any(c in self.root for c in "+#/"):
            raise ValueError(f"invalid topic root {self.root!r}: one segment without + # /")

    @property
    def prefix(self) -> str:
        return f"{self.root}/{self.fleet}"

    @property
    def model_latest(self) -> str:
        return f"{self.prefix}/model/latest"

    @property
    def model_lean(self) -> str:
        """v1.2: the lean archive of the current release (manifest + weights); `model_latest` keeps the full one
        of protocol v1, for v1 devices and for a v1.2 device that cannot complete the lean one."""
        return f"{self.prefix}/model/lean"

    @property
    def model_canary(self) -> str:
        """v1.3: the full archive of a release on trial, installed only by the devices `rollout_current` names."""
        return f"{self.prefix}/model/canary"

    @property
    def rollout_current(self) -> str:
        """v1.3: which devices try which release before the fleet gets it (`RolloutMsg`; signed in signed fleets)."""
        return f"{self.prefix}/rollout/current"

    @property
    def rounds_current(self) -> str:
        return f"{self.prefix}/rounds/current"

    @property
    def coordinator_status(self) -> str:
        return f"{self.prefix}/coordinator/status"

    def device(self, device_id: str, kind: str) -> str:
        """`P/devices/{device_id}/{kind}` for kind in status, update, ack."""
        check_name("device_id", device_id)
        if kind not in ("status", "update", "ack"):
            raise ValueError(f"unknown device topic kind {kind!r}")
        return f"{self.prefix}/devices/{device_id}/{kind}"

    def client_id(self, device_id: str | None = None) -> str:
        """MQTT client id of the coordinator (no `device_id`) or of a device: `{root}:{fleet}:coordinator`,
        `{root}:{fleet}:device:{id}`. ':' is in no name, so no device id can take the coordinator's session
        and two fleets or topic roots on one broker never share one."""
        if device_id is None:
            return f"{self.root}:{self.fleet}:coordinator"
        return f"{self.root}:{self.fleet}:device:{check_name('device_id', device_id)}"

    def all_devices(self, kind: str) -> str:
        return f"{self.prefix}/devices/+/{kind}"

    def relay(self, relay_id: str, kind: str) -> str:
        """v1.4: `P/relays/{relay_id}/{kind}` for kind in update (a site's combined update, relay → coordinator),
        ack (coordinator → relay) and status (the relay's, retained)."""
        check_name("relay id", relay_id)
        if kind not in ("status", "update", "ack"):
            raise ValueError(f"unknown relay topic kind {kind!r}")
        return f"{self.prefix}/relays/{relay_id}/{kind}"

    def all_relays(self, kind: str) -> str:
        return f"{self.prefix}/relays/+/{kind}"

    def parse_device_topic(self, topic: str, group: str = "devices") -> tuple[str, str] | None:
        """`P/devices/{id}/{kind}` (or `P/relays/{id}/{kind}` with group="relays") -> (id, kind), or None for any
        other topic."""
        parts = topic.split("/")
        head = self.prefix.split("/")
        if len(parts) != len(head) + 3 or parts[: len(head)] != head or parts[len(head)] != group:
            return None
        return parts[-2], parts[-1]


# ---------------------------------------------------------------- broker URL


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None
    cafile: str | None = None  # mqtts: the fleet CA that signed the broker's certificate (None: system CAs)
    certfile: str | None = None  # mqtts + mTLS: this client's certificate and key
    keyfile: str | None = None


TLS_QUERY = {"cafile": "cafile", "cert": "certfile", "key": "keyfile"}  # mqtts://host?cafile=…&cert=…&key=…


def parse_broker_url(url: str) -> BrokerUrl:
    """Parse `mqtt://[user[:password]@]host[:port]` (port 1883) or `mqtts://...` (TLS, port 8883), the latter with
    `?cafile=PATH` (the CA to trust) and, for mutual TLS, `&cert=PATH&key=PATH` (this client's certificate).

    Whitespace and control characters are refused before parsing (urlsplit silently drops some, e.g. a newline
    that would otherwise reach a device's environment file); percent-encode them in a user name or password.
    """
    bad = next((i for i, c in enumerate(url) if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(
            f"invalid broker URL: whitespace or control character {url[bad]!r} at position {bad} "
            "(percent-encode it in a user name or password)"
        )
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError(f"invalid broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    tls = parts.scheme == "mqtts"
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as e:
        raise ValueError(f"invalid broker URL {url!r}: {e}") from None
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    files = _tls_files(url, parts.query, tls)
    return BrokerUrl(parts.hostname, port, tls, user, password, **files)


def _tls_files(url: str, query: str, tls: bool) -> dict[str, str]:
    """{cafile, certfile, keyfile} from an mqtts URL's query; ValueError naming what is wrong."""
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False) if query else []
    unknown = [k for k, _ in pairs if k not in TLS_QUERY]
    if unknown:
        raise ValueError(f"invalid broker URL {url!r}: unknown parameter {unknown[0]!r} (use cafile, cert, key)")
    files = {TLS_QUERY[k]: v for k, v in pairs}
    if files and not tls:
        raise ValueError(f"invalid broker URL {url!r}: cafile/cert/key need mqtts://")
    if ("certfile" in files) != ("keyfile" in files):
        raise ValueError(f"invalid broker URL {url!r}: give both cert and key (mutual TLS) or neither")
    return files


# ---------------------------------------------------------------- JSON messages


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _parse_json(payload: bytes, what: str) -> dict:
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:  # RecursionError: absurdly nested JSON
        raise ProtocolError("bad_json", f"{what}: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_json", f"{what} is not a JSON object")
    return obj


LOCAL_OPTIMIZERS = ("sgd", "adamw")
LOCAL_SCHEDULES = ("constant", "cosine")
MAX_LORA_RANK = 64


@dataclass(frozen=True)
class LocalConfig:
    """Local training recipe of a round: `steps` steps of `batch_size` samples at learning rate `lr`.

    Protocol v1.1 adds the optimizer (`sgd` or `adamw`, fresh state per job), a linear warm-up over
    `warmup_steps`, the schedule after it (`constant`, or `cosine` decay to lr/10 at the last step) and
    gradient clipping to `clip_norm` (0: none). A v1 round lacks them: plain SGD at a constant rate.
    Protocol v1.3 adds `lora_rank` r: ≥ 1 asks for a low-rank adapter update (`edgelearn.lora`); 0 or absent
    asks for a full update. A device that cannot train adapters may send a full update: both are valid."""

    steps: int = 20
    batch_size: int = 32
    lr: float = 0.05
    optimizer: str = "sgd"
    warmup_steps: int = 0
    schedule: str = "constant"
    clip_norm: float = 0.0
    lora_rank: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(f"local optimizer {self.optimizer!r}: use one of {', '.join(LOCAL_OPTIMIZERS)}")
        if self.schedule not in LOCAL_SCHEDULES:
            raise ValueError(f"local schedule {self.schedule!r}: use one of {', '.join(LOCAL_SCHEDULES)}")
        if not 0 <= self.lora_rank <= MAX_LORA_RANK:
            raise ValueError(f"LoRA rank {self.lora_rank}: use 0 (full updates) to {MAX_LORA_RANK}")

    def as_json(self) -> dict[str, object]:
        """The round's `local` object; `lora_rank` only when set (a full-update round stays v1.1 exactly)."""
        out: dict[str, object] = {
            "steps": self.steps, "batch_size": self.batch_size, "lr": self.lr, "optimizer": self.optimizer,
            "warmup_steps": self.warmup_steps, "schedule": self.schedule, "clip_norm": self.clip_norm}  # fmt: skip
        if self.lora_rank:
            out["lora_rank"] = self.lora_rank
        return out

    @classmethod
    def from_json(cls, loc: dict) -> LocalConfig:
        """A round's `local` object; absent fields take the v1 defaults; ValueError names a bad one."""
        d = DEFAULT_LOCAL
        optimizer, schedule = loc.get("optimizer", d.optimizer), loc.get("schedule", d.schedule)
        if optimizer not in LOCAL_OPTIMIZERS or schedule not in LOCAL_SCHEDULES:
            raise ValueError(f"local optimizer/schedule {str(optimizer)[:16]!r}/{str(schedule)[:16]!r} is unknown")
        return cls(
            _json_int(loc, "steps", 1, d.steps),
            _json_int(loc, "batch_size", 1, d.batch_size),
            _json_float(loc, "lr", 0.0, d.lr),
            optimizer,
            _json_int(loc, "warmup_steps", 0, d.warmup_steps),
            schedule,
            _json_float(loc, "clip_norm", 0.0, d.clip_norm),
            min(_json_int(loc, "lora_rank", 0, d.lora_rank), MAX_LORA_RANK + 1),  # > max: __post_init__ names it
        )


DEFAULT_LOCAL = LocalConfig()  # the one place for the default local recipe


@dataclass(frozen=True)
class RolloutMsg:
    """v1.3, retained on `P/rollout/current`: release `version` is on trial on the `canary` devices (the others
    keep `stable`); `state` canary | promoted | aborted."""

    version: int
    stable: int
    canary: tuple[str, ...]
    state: str = "canary"

    def encode(self) -> bytes:
        return json.dumps({"version": self.version, "stable": self.stable, "canary": list(self.canary),
                           "state": self.state}).encode()  # fmt: skip

    @classmethod
    def decode(cls, payload: bytes) -> RolloutMsg:
        """ProtocolError("bad_rollout") names what is wrong."""
        d = _parse_json(payload, "rollout")
        canary = d.get("canary")
        if not isinstance(canary, list) or not all(isinstance(c, str) and NAME_RE.match(c) for c in canary):
            raise ProtocolError("bad_rollout", "canary is not a list of device ids")
        if d.get("state") not in ("canary", "promoted", "aborted"):
            raise ProtocolError("bad_rollout", f"state {str(d.get('state'))[:16]!r}")
        try:
            return cls(_json_int(d, "version", 1), _json_int(d, "stable", 0), tuple(canary), d["state"])
        except (KeyError, ValueError) as e:
            raise ProtocolError("bad_rollout", str(e)) from None


_NO_DEFAULT = object()


def _json_int(d: dict, key: str, minimum: int, default: object = _NO_DEFAULT) -> int:
    """`d[key]` if it is a JSON integer (not a boolean) >= `minimum`; `default` if absent; else ValueError."""
    value = d.get(key, default)
    if value is _NO_DEFAULT:
        raise KeyError(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key}={str(value)[:32]!r} is not an integer >= {minimum}")
    return value


def _json_float(d: dict, key: str, minimum: float, default: object = _NO_DEFAULT) -> float:
    """`d[key]` as a float if it is a finite JSON number (not a boolean) >= `minimum`; `default` if absent."""
    value = d.get(key, default)
    if value is _NO_DEFAULT:
        raise KeyError(key)
    try:  # float() of a 400-digit JSON integer overflows
        number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    except OverflowError:
        number = math.nan
    if not math.isfinite(number) or number < minimum:
        raise ValueError(f"{key}={str(value)[:32]!r} is not a finite number >= {minimum}")
    return number


RELAY_WEIGHTINGS = ("samples", "uniform")


@dataclass(frozen=True)
class RelayTerms:
    """v1.4, the round's `relay` object: how a site relay combines its devices' updates so that the coordinator's
    fold of the combination equals its fold of those updates. Each Δ_k is clipped to `clip_norm` (null: not
    clipped) and weighed w_k = min(n_k, `max_samples`) ("samples") or 1 ("uniform", central DP). A round
    without it (a median or trimmed mean does not decompose into partial sums) is one relays do not take."""

    clip_norm: float | None
    max_samples: int
    weighting: str = "samples"

    def __post_init__(self) -> None:
        if self.weighting not in RELAY_WEIGHTINGS:
            raise ValueError(f"relay weighting {self.weighting!r}: use one of {RELAY_WEIGHTINGS}")
        if self.max_samples < 1 or (self.clip_norm is not None and not self.clip_norm > 0):
            raise ValueError("relay max_samples must be >= 1 and clip_norm > 0 or null")

    def as_json(self) -> dict[str, object]:
        return {"clip_norm": self.clip_norm, "max_samples": self.max_samples, "weighting": self.weighting}

    @classmethod
    def from_json(cls, d: object) -> RelayTerms | None:
        """None for an absent (null) `relay`; ValueError names a bad field."""
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ValueError("relay is neither null nor an object")
        clip = None if d.get("clip_norm") is None else _json_float(d, "clip_norm", 0.0)
        return cls(clip, _json_int(d, "max_samples", 1), str(d.get("weighting", "samples"))[:16])


@dataclass(frozen=True)
class RoundMsg:
    """`P/rounds/current`: the open synchronous round."""

    round: int
    base_version: int
    deadline_unix_s: float
    min_updates: int
    participants: tuple[str, ...] | None = None
    local: LocalConfig = field(default_factory=LocalConfig)
    relay: RelayTerms | None = None  # v1.4: how site relays combine updates (None: relays take no updates)

    def encode(self) -> bytes:
        d = {
            "round": self.round,
            "base_version": self.base_version,
            "deadline": self.deadline_unix_s,
            "min_updates": self.min_updates,
            "participants": list(self.participants) if self.participants is not None else None,
            "local": self.local.as_json(),
        }
        if self.relay is not None:
            d["relay"] = self.relay.as_json()
        return _json(d)

    @classmethod
    def decode(cls, payload: bytes) -> RoundMsg:
        """Parse a round; ProtocolError("bad_round", ...) names the first field of the wrong type or range."""
        d = _parse_json(payload, "round")
        try:
            loc = d.get("local")
            loc = {} if loc is None else loc
            if not isinstance(loc, dict):
                raise ValueError("local is not an object")
            parts = d.get("participants")
            if parts is not None and not (isinstance(parts, list) and all(isinstance(p, str) for p in parts)):
                raise ValueError("participants is neither null nor a list of device ids")
            return cls(
                round=_json_int(d, "round", 1),
                base_version=_json_int(d, "base_version", 1),
                deadline_unix_s=_json_float(d, "deadline", 0.0),
                min_updates=_json_int(d, "min_updates", 0),
                participants=tuple(parts) if parts is not None else None,
                local=LocalConfig.from_json(loc),
                relay=RelayTerms.from_json(d.get("relay")),
            )
        except KeyError as e:
            raise ProtocolError("bad_round", f"missing {e}") from None
        except ValueError as e:
            raise ProtocolError("bad_round", str(e)) from None

    def includes(self, device_id: str) -> bool:
        return self.participants is None or device_id in self.participants


ACK_STATUSES = ("accepted", "duplicate", "rejected")


@dataclass(frozen=True)
class Ack:
    """`P/devices/{id}/ack`: the coordinator's receipt for one update."""

    update_id: str | None
    status: str
    reason: str | None = None
    version: int = 0

    def encode(self) -> bytes:
        return _json(
            {"update_id": self.update_id, "status": self.status, "reason": self.reason, "version": self.version}
        )

    @classmethod
    def decode(cls, payload: bytes) -> Ack:
        d = _parse_json(payload, "ack")
        status, reason = d.get("status"), d.get("reason")
        if not isinstance(status, str) or status not in ACK_STATUSES:
            raise ProtocolError("bad_ack", f"status {str(status)[:32]!r}")
        if reason is not None and not isinstance(reason, str):
            raise ProtocolError("bad_ack", "reason is neither null nor a string")
        try:
            version = _json_int(d, "version", 0) if d.get("version") is not None else 0
        except ValueError as e:
            raise ProtocolError("bad_ack", str(e)) from None
        uid = d.get("update_id")
        return cls(uid if isinstance(uid, str) else None, status, reason, version)


def encode_status(state: str, **fields: object) -> bytes:
    """Status JSON for `P/devices/{id}/status` or `P/coordinator/status`: `{"state": ..., ...}`."""
    return _json({"state": state, **fields})


MAX_STATUS_BYTES = 16 * 1024  # a status is a few hundred bytes; a larger one is refused, not kept


def decode_status(payload: bytes) -> dict:
    """A status JSON object; ProtocolError("status_too_large") beyond MAX_STATUS_BYTES, "bad_json" if malformed."""
    if len(payload) > MAX_STATUS_BYTES:
        raise ProtocolError("status_too_large", f"{len(payload)} bytes")
    return _parse_json(payload, "status")


OFFLINE = encode_status("offline")


# ---------------------------------------------------------------- updates (safetensors)


@dataclass(frozen=True)
class Update:
    """One device update: Δ = θ_local − θ_base for each trainable parameter (float32 after decoding)."""

    update_id: str
    device_id: str
    model_id: str
    base_version: int
    num_samples: int
    deltas: dict[str, np.ndarray]
    round: int | None = None
    encoding: str = "fp32"
    loss: float | None = None
    train_seconds: float | None = None


def quantize_int8(delta: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """Symmetric per-tensor int8: `scale = max|Δ| / 127`, `q = round(Δ / scale)`, so `Δ ≈ q · scale`."""
    peak = float(np.max(np.abs(delta))) if delta.size else 0.0
    scale = np.float32(peak / 127.0 if peak > 0 else 1.0)
    q = np.clip(np.rint(delta / scale), -127, 127).astype(np.int8)
    return q, scale


def encode_update(u: Update, extra: dict[str, str] | None = None) -> bytes:
    """Serialize an update as safetensors bytes with the protocol's `__metadata__` (plus `extra` keys: a relay's
    combined update, v1.4)."""
    if u.encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {u.encoding!r}: use one of {ENCODINGS}")
    tensors: dict[str, np.ndarray] = {}
    for name, d in u.deltas.items():
        d = np.ascontiguousarray(d, dtype=np.float32)
        if u.encoding == "fp32":
            tensors[name] = d
        else:
            q, scale = quantize_int8(d)
            tensors[name] = q
            tensors[f"{name}:scale"] = np.array(scale, dtype=np.float32)
    meta = {
        "schema": UPDATE_SCHEMA,
        "update_id": u.update_id,
        "device_id": u.device_id,
        "model_id": u.model_id,
        "base_version": str(u.base_version),
        "num_samples": str(u.num_samples),
        "encoding": u.encoding,
    }
    if u.round is not None:
        meta["round"] = str(u.round)
    if u.loss is not None:
        meta["loss"] = repr(float(u.loss))
    if u.train_seconds is not None:
        meta["train_seconds"] = repr(float(u.train_seconds))
    return st_save(tensors, metadata={**(extra or {}), **meta})


def read_metadata(payload: bytes, max_header_bytes: int | None = None) -> dict[str, str]:
    """The safetensors `__metadata__` of `payload` without touching tensor data; ProtocolError if malformed
    (or, with `max_header_bytes`, if the header is longer than that)."""
    if len(payload) < 8:
        raise ProtocolError("not_safetensors", "payload shorter than the 8-byte header length")
    n = int.from_bytes(payload[:8], "little")
    if n > len(payload) - 8 or (max_header_bytes is not None and n > max_header_bytes):
        raise ProtocolError("not_safetensors", f"header length {n} beyond payload or limit")
    try:
        header = json.loads(payload[8 : 8 + n])
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ProtocolError("not_safetensors", "header is not JSON") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise ProtocolError("bad_metadata", "missing or non-string __metadata__")
    return meta


_INT_RE = re.compile(r"^[0-9]{1,15}$")  # ASCII digits only, below 2^53 (exact in JSON, SQLite and float64)


def _int_field(meta: dict[str, str], key: str, minimum: int) -> int:
    text = meta.get(key, "")
    if not _INT_RE.match(text):
        raise ProtocolError(f"bad_{key}", f"{key}={text[:32]!r} is not a decimal integer below 10^15")
    value = int(text)
    if value < minimum:
        raise ProtocolError(f"bad_{key}", f"{key}={value} < {minimum}")
    return value


def _opt_float(meta: dict[str, str], key: str) -> float | None:
    try:
        return float(meta[key]) if key in meta else None
    except ValueError:
        return None


def decode_tensors(payload: bytes, encoding: str) -> dict[str, np.ndarray]:
    """Tensors of an update as float32 deltas (int8 ones dequantized with their `:scale`)."""
    try:
        raw = st_load(payload)
    except KeyError as e:  # a dtype safetensors knows but numpy does not (BF16, F8_*)
        raise ProtocolError("bad_dtype", f"unsupported dtype {e}") from None
    except (SafetensorError, ValueError, TypeError, OverflowError, RecursionError) as e:
        raise ProtocolError("not_safetensors", f"{type(e).__name__}: {str(e)[:200]}") from None
    if encoding == "fp32":
        return raw
    out = {}
    for name, q in raw.items():
        if name.endswith(":scale"):
            continue
        scale = raw.get(f"{name}:scale")
        if q.dtype != np.int8 or scale is None or scale.dtype != np.float32 or scale.shape != ():
            raise ProtocolError(f"bad_dtype:{name}", f"int8 tensor with float32 scalar {name}:scale expected")
        out[name] = q.astype(np.float32) * np.float32(scale.reshape(()))
    extra = [n for n in raw if n.endswith(":scale") and n[: -len(":scale")] not in raw]
    if extra:
        raise ProtocolError(f"extra_name:{extra[0]}", "scale without tensor")
    return out


def decode_update(payload: bytes) -> Update:
    """Parse and structurally check an update; raises ProtocolError(reason) naming the broken rule."""
    meta = read_metadata(payload)
    if meta.get("schema") != UPDATE_SCHEMA:
        raise ProtocolError("unknown_schema", repr(meta.get("schema")))
    uid = meta.get("update_id", "")
    if not uid or len(uid) > MAX_UPDATE_ID_CHARS:
        raise ProtocolError("bad_update_id", f"update_id must be 1-{MAX_UPDATE_ID_CHARS} characters")
    encoding = meta.get("encoding", "")
    if encoding not in ENCODINGS:
        raise ProtocolError("bad_encoding", repr(encoding))
    return Update(
        update_id=uid,
        device_id=meta.get("device_id", ""),
        model_id=meta.get("model_id", ""),
        base_version=_int_field(meta, "base_version", 1),
        num_samples=_int_field(meta, "num_samples", 1),
        round=_int_field(meta, "round", 0) if "round" in meta else None,
        encoding=encoding,
        loss=_opt_float(meta, "loss"),
        train_seconds=_opt_float(meta, "train_seconds"),
        deltas=decode_tensors(payload, encoding),
    )


def is_finite(arrays: dict[str, np.ndarray]) -> bool:
    return all(bool(np.isfinite(a).all()) for a in arrays.values())

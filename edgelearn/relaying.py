"""Site relays (protocol v1.4): what a relay's combined update carries beyond a device update, and its checks.

A relay aggregates the devices of one site behind the site's broker and sends the coordinator one combined
update per round and base version: Δ_S = Σ_k w_k·f_k·Δ_k / Σ_k w_k over its devices k (f_k the clipping factor,
w_k the weight the round's `relay` terms name), with `num_samples` = Σ_k min(n_k, n_max). Its metadata adds:

| key | value |
|---|---|
| `relay_devices` | JSON list of the device ids whose updates it holds, each once |
| `relay_norms` | JSON list of their ‖Δ_k‖₂ before clipping, in the same order (the coordinator's clipping reference) |
| `relay_weighting` | `samples` or `uniform`: the weighting it was combined with |

The coordinator folds it with weight W_S = Σ_k w_k (capped at K·n_max), which adds exactly Σ_k w_k f_k Δ_k:
what folding each device's update would have added (coordinator/rounds.py).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from edgelearn.protocol import NAME_RE, RELAY_WEIGHTINGS, ProtocolError

RELAY_DEVICES, RELAY_NORMS, RELAY_WEIGHTING = "relay_devices", "relay_norms", "relay_weighting"
MAX_RELAY_DEVICES = 20_000  # per combined update: a site with more sends several parts
RELAY_HEADER_BYTES = 2 * 1024 * 1024  # room for 20k device ids and norms in the safetensors header
SENDER_PREFIX = "relay/"  # how the coordinator keys a relay's updates apart from a device's ('/' is in no name)


@dataclass(frozen=True)
class RelayInfo:
    """The devices a combined update stands for, their update norms, and the weighting used."""

    devices: tuple[str, ...]
    norms: tuple[float, ...]
    weighting: str = "samples"

    def metadata(self) -> dict[str, str]:
        return {
            RELAY_DEVICES: json.dumps(list(self.devices), separators=(",", ":")),
            RELAY_NORMS: json.dumps([float(f"{n:.9g}") for n in self.norms], separators=(",", ":")),
            RELAY_WEIGHTING: self.weighting,
        }


def _json_list(meta: dict[str, str], key: str) -> list:
    try:
        value = json.loads(meta.get(key, ""))
    except (ValueError, RecursionError):
        raise ProtocolError("bad_relay_metadata", f"{key} is not JSON") from None
    if not isinstance(value, list):
        raise ProtocolError("bad_relay_metadata", f"{key} is not a list")
    return value


def read_relay_info(meta: dict[str, str]) -> RelayInfo:
    """The relay fields of a combined update; ProtocolError("bad_relay_metadata") names the first bad one:
    device ids that are not names or repeat, more than MAX_RELAY_DEVICES, norms not finite and ≥ 0 or not one
    per device, an unknown weighting."""
    devices, norms = _json_list(meta, RELAY_DEVICES), _json_list(meta, RELAY_NORMS)
    if not 1 <= len(devices) <= MAX_RELAY_DEVICES:
        raise ProtocolError("bad_relay_metadata", f"{len(devices)} devices (1 to {MAX_RELAY_DEVICES})")
    if not all(isinstance(d, str) and NAME_RE.match(d) for d in devices) or len(set(devices)) != len(devices):
        raise ProtocolError("bad_relay_metadata", "relay_devices must be distinct device ids")
    ok = [isinstance(n, int | float) and not isinstance(n, bool) and math.isfinite(n) and n >= 0 for n in norms]
    if len(norms) != len(devices) or not all(ok):
        raise ProtocolError("bad_relay_metadata", "relay_norms must be one finite norm >= 0 per device")
    weighting = meta.get(RELAY_WEIGHTING, "")
    if weighting not in RELAY_WEIGHTINGS:
        raise ProtocolError("bad_relay_metadata", f"relay_weighting {weighting[:16]!r}")
    return RelayInfo(tuple(devices), tuple(float(n) for n in norms), weighting)


def sender_key(relay_id: str) -> str:
    """The coordinator's key for a relay's updates: its id, apart from any device id."""
    return SENDER_PREFIX + relay_id


def relay_of(sender: str) -> str | None:
    """The relay id of a sender key, or None for a device."""
    return sender[len(SENDER_PREFIX) :] if sender.startswith(SENDER_PREFIX) else None

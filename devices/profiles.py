"""Device profiles: per-board export target, budget, MQTT and outbox settings (TOML).

Built-in profiles live in `devices/profiles/*.toml`; a user file overrides any field of
its `base` profile. Unknown fields and wrong types are errors that name the field. The `[budget]`
table is the device's `edge_runtime.budget.Budget`, field for field; a limit may be `"off"`.
`default` is the profile of a device started without `--profile`.
"""

from __future__ import annotations

import json
import math
import tomllib
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import dacite

from edge_runtime.budget import Budget

PROFILE_DIR = Path(__file__).parent / "profiles"


class ProfileError(ValueError):
    """A profile that does not exist or does not parse; the message names the file and field."""


@dataclass(frozen=True)
class MqttProfile:
    keepalive_s: int = 30


@dataclass(frozen=True)
class OutboxProfile:
    max_items: int = 100
    ack_timeout_s: float = 30.0


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    target: str
    budget: Budget = field(default_factory=Budget)
    mqtt: MqttProfile = field(default_factory=MqttProfile)
    outbox: OutboxProfile = field(default_factory=OutboxProfile)
    sources: list[str] = field(default_factory=list)

    def to_toml(self) -> str:
        """The resolved profile as TOML (what a deploy package ships)."""
        return dump_toml(asdict(self))


DEFAULT_PROFILE = "default"  # a device started without --profile
OFF = "off"  # a budget limit switched off (None in Budget)
_NESTED = {"Budget": Budget, "MqttProfile": MqttProfile, "OutboxProfile": OutboxProfile}
RENAMED = {  # old field -> where it lives now: a one-line error names the new place
    "threads": "budget.threads",
    "budget.max_temp_c": "budget.max_temperature_c",
}


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field: lo < x (lo_open) or lo <= x, and x <= hi when hi is set; finite."""

    lo: float
    hi: float | None = None
    lo_open: bool = False
    integer: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        low = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        if self.hi is None:
            return f"{kind} {low}"
        return f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}]"


RANGES = {  # dotted field -> allowed values; a budget of 0 or below would disable or invert its check
    "budget.threads": Range(1, integer=True),
    "budget.batch_size": Range(1, integer=True),
    "budget.max_cpu_percent": Range(0, 100, lo_open=True),
    "budget.max_rss_mb": Range(0, lo_open=True),
    "budget.min_available_mb": Range(0),
    "budget.max_temperature_c": Range(0, 150, lo_open=True),
    "budget.min_battery_percent": Range(0, 100),
    "budget.max_train_s_per_hour": Range(0, 3600, lo_open=True),
    "budget.soft_fraction": Range(0, 1, lo_open=True),
    "budget.interval_s": Range(0, lo_open=True),
    "mqtt.keepalive_s": Range(1, 65535, integer=True),  # MQTT keep-alive is a 16-bit count of seconds
    "outbox.max_items": Range(1, integer=True),
    "outbox.ack_timeout_s": Range(0, lo_open=True),
}


def in_range(value: Any, r: Range) -> bool:
    """True when `value` is a real number (not a bool), finite, integral if `r.integer`, and lo <(=) x <= hi."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    if r.integer and not isinstance(value, int):
        return False
    above = value > r.lo if r.lo_open else value >= r.lo
    return above and (r.hi is None or value <= r.hi)


def range_errors(values: dict[str, Any]) -> list[str]:
    """One message per numeric field of `values` (profile data, nested tables) outside its allowed range,
    naming the field and the range. Absent fields and values that are no numbers (type errors, "off") pass."""
    out = []
    for path, r in RANGES.items():
        value: Any = values
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if not isinstance(value, (int, float)):  # bools are ints: `threads = true` is out of range
            continue
        if not in_range(value, r):
            out.append(f"field '{path}' must be {r.describe()}, got {value!r}")
    return out


def builtin_names() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ProfileError(f"profile file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: not valid TOML: {e}") from None


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge: tables merge field by field, any other value replaces the base's."""
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def unknown_fields(data: dict[str, Any], cls: type, prefix: str = "") -> list[str]:
    """Dotted paths of keys in `data` that `cls` (a dataclass, nested ones too) has no field for."""
    known = {f.name: f.type for f in fields(cls)}
    out = []
    for k, v in data.items():
        sub = _NESTED.get(str(known.get(k))) if isinstance(v, dict) else None
        if k not in known:
            moved = RENAMED.get(prefix + k)
            out.append(prefix + k + (f" (now '{moved}')" if moved else ""))
        elif sub is not None:
            out += unknown_fields(v, sub, f"{prefix}{k}.")
    return out


def parse_profile(data: dict[str, Any], where: str) -> Profile:
    """Build a Profile from TOML data, strictly: no unknown fields, exact types (int is accepted for float)."""
    unknown = unknown_fields(data, Profile)
    if unknown:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(unknown)}")
    errors = range_errors(data)  # before Budget's own checks, whose messages name no range
    if errors:
        raise ProfileError(f"{where}: {'; '.join(errors)}")
    if isinstance(data.get("budget"), dict):  # "off" switches a limit off
        data = {**data, "budget": {k: None if v == OFF else v for k, v in data["budget"].items()}}
    try:
        profile = dacite.from_dict(
            Profile, data, config=dacite.Config(strict=True, cast=[], check_types=True, type_hooks={float: _as_float})
        )
    except dacite.UnexpectedDataError as e:
        raise ProfileError(f"{where}: unknown field(s) {', '.join(sorted(e.keys))}") from None
    except dacite.WrongTypeError as e:
        raise ProfileError(
            f"{where}: field '{e.field_path}' must be {_type_name(e.field_type)}, got {e.value!r}"
        ) from None
    except dacite.MissingValueError as e:
        raise ProfileError(f"{where}: missing field '{e.field_path}'") from None
    except ValueError as e:  # Budget's own checks
        raise ProfileError(f"{where}: {e}") from None
    return profile


def _as_float(v: Any) -> Any:
    return float(v) if isinstance(v, int) and not isinstance(v, bool) else v


def _type_name(t: Any) -> str:
    """`int`, `float`; an optional budget limit (`float | None`) is `float or 'off'`."""
    args = typing.get_args(t)
    if type(None) in args:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + f" or {OFF!r}"
    return getattr(t, "__name__", str(t))


def load_profile(name: str, override: Path | None = None) -> Profile:
    """The built-in profile `name` (or a TOML file path), with the fields of `override` applied on top.

    An override file may name its base with `base = "rpi4"`; then `name` may be None-like (""). Without a base
    and a name, the override file is read as a complete profile (the flashed `profile.toml`).
    """
    extra = _read_toml(override) if override else {}
    base_name = extra.pop("base") if "base" in extra else (name or "")
    if not isinstance(base_name, str):
        raise ProfileError(f"{override}: field 'base' must be a profile name (a string), got {base_name!r}")
    if not base_name and override:  # a complete profile file (as flash writes it), no base to merge onto
        return parse_profile(extra, str(override))
    path = _profile_path(base_name)
    where = f"{path.name}" + (f" + {override}" if override else "")
    return parse_profile(merge(_base_data(path), extra), where)


def _profile_path(name: str) -> Path:
    path = Path(name) if name.endswith(".toml") else PROFILE_DIR / f"{name}.toml"
    if name not in builtin_names() and not (name.endswith(".toml") and path.is_file()):
        raise ProfileError(f"unknown profile {name!r}: choose one of {', '.join(builtin_names())} or give a .toml file")
    return path


def _base_data(path: Path, depth: int = 0) -> dict[str, Any]:
    """A profile file's fields merged onto those of its own `base` (a chain of at most 8 files)."""
    data = _read_toml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or depth >= 8:
        raise ProfileError(f"{path}: field 'base' must name a profile (no longer chain than 8), got {base!r}")
    return merge(_base_data(_profile_path(base), depth + 1), data)


def list_profiles() -> list[Profile]:
    return [load_profile(n) for n in builtin_names()]


def dump_toml(d: dict[str, Any]) -> str:
    """Minimal TOML writer for flat scalars, string lists and one level of tables (what profiles use)."""
    lines: list[tuple[str, Any]] = []
    tables: list[tuple[str, Any]] = []
    for k, v in d.items():
        (tables if isinstance(v, dict) else lines).append((k, v))
    out = [f"{k} = {_toml_value(v)}" for k, v in lines]
    for name, table in tables:
        out += ["", f"[{name}]", *(f"{k} = {_toml_value(v)}" for k, v in table.items())]
    return "\n".join(out) + "\n"


def _toml_value(v: Any) -> str:
    if v is None:
        return json.dumps(OFF)  # a budget limit switched off
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")

"""Synchronous-mode participant selection among online devices, with eligibility rules on their status."""

from __future__ import annotations

import math
import operator
import random
import re
from dataclasses import dataclass

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.]*)\s*(>=|<=|==|!=|>|<)\s*(\S+)\s*$")


def _value(text: str) -> float | str | bool:
    if text in ("true", "false"):
        return text == "true"
    try:
        return float(text)
    except ValueError:
        return text


@dataclass(frozen=True)
class Eligibility:
    """One rule on a device's status JSON, e.g. `battery_percent>=20`, `charging==true`, `temp_c<45`."""

    key: str
    op: str
    value: float | str | bool

    @classmethod
    def parse(cls, text: str) -> Eligibility:
        m = _RULE.match(text)
        if not m:
            raise ValueError(f"eligibility rule {text!r}: expected KEY OP VALUE with OP one of {', '.join(_OPS)}")
        return cls(m.group(1), m.group(2), _value(m.group(3)))

    def holds(self, status: dict) -> bool:
        """A device whose status lacks the key, or has a value of another type, is not eligible."""
        v: object = status
        for part in self.key.split("."):
            if not isinstance(v, dict) or part not in v:
                return False
            v = v[part]
        if isinstance(self.value, bool) or isinstance(v, bool):
            return isinstance(v, bool) and isinstance(self.value, bool) and _OPS[self.op](v, self.value)
        if isinstance(self.value, float):
            return isinstance(v, int | float) and bool(_OPS[self.op](float(v), self.value))
        return isinstance(v, str) and bool(_OPS[self.op](v, self.value))


def eligible(statuses: dict[str, dict], rules: tuple[Eligibility, ...]) -> list[str]:
    """Online devices (state ≠ offline) whose status satisfies every rule, sorted."""
    return sorted(d for d, s in statuses.items() if s.get("state") != "offline" and all(r.holds(s) for r in rules))


def over_selected(target: int, factor: float) -> int:
    """⌈target · factor⌉: how many to invite so that `target` report despite dropouts."""
    return max(target, math.ceil(target * factor - 1e-9))  # 100 × 1.1 is 110.00000000000001 in floats


def select(candidates: list[str], target: int, factor: float, seed: int | str) -> list[str]:
    """A uniform random sample of min(⌈target·factor⌉, |candidates|) devices, reproducible from `seed`."""
    k = min(over_selected(target, factor), len(candidates))
    return sorted(random.Random(seed).sample(sorted(candidates), k))


def may_open(online_eligible: int, min_updates: int, factor: float, waited_s: float, wait_s: float) -> bool:
    """A selected round opens once ⌈min_updates·factor⌉ eligible devices are online; after `wait_s` of waiting,
    with what is there if that still meets min_updates. Never below min_updates: it could not close."""
    if online_eligible >= over_selected(min_updates, factor):
        return True
    return waited_s >= wait_s and online_eligible >= min_updates


def top_up(invited: list[str], candidates: list[str], target: int, factor: float, seed: int | str) -> list[str]:
    """`invited` plus eligible online devices not yet invited, up to ⌈target·factor⌉ in all (a random,
    reproducible choice among the newcomers): an under-subscribed round grows as devices come online."""
    room = over_selected(target, factor) - len(invited)
    new = sorted(set(candidates) - set(invited))
    if room <= 0 or not new:
        return invited
    return sorted([*invited, *random.Random(seed).sample(new, min(room, len(new)))])

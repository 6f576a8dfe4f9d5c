"""The flashed agent as the unit would start it, and the host-side watch for one finished round."""

from __future__ import annotations

import contextlib
import json
import queue
import re
import shlex
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from edgelearn.bundle import read_lean_release
from edgelearn.mqtt import MqttLink
from edgelearn.protocol import Ack, Topics, decode_update


class RoundError(RuntimeError):
    """The emulated device did not finish its round; the message says what was last seen."""


@dataclass(frozen=True)
class AgentRun:
    """What the host saw of the emulated device's round."""

    update_round: int
    update_samples: int
    ack_status: str
    latest_version: int
    active_version: int
    previous_version: int
    seconds_to_update: float
    seconds_to_active: float


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (systemd EnvironmentFile subset: no quotes, # comments)."""
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            if not sep:
                raise ValueError(f"{path}: line without '=': {line!r}")
            env[key.strip()] = value.strip()
    return env


def exec_start_argv(unit_text: str, env: dict[str, str]) -> list[str]:
    """The unit's ExecStart as argv: backslash-continued lines joined, `${VAR}` replaced from `env`."""
    joined = re.sub(r"\\\n\s*", " ", unit_text)
    lines = [ln for ln in joined.splitlines() if ln.startswith("ExecStart=")]
    if len(lines) != 1:
        raise ValueError(f"expected one ExecStart= line in the unit, found {len(lines)}")

    def var(m: re.Match[str]) -> str:
        if m.group(1) not in env:
            raise ValueError(f"ExecStart uses ${{{m.group(1)}}}, which the environment file does not set")
        return env[m.group(1)]

    return shlex.split(re.sub(r"\$\{(\w+)\}", var, lines[0].removeprefix("ExecStart=")))


def active_versions(state_dir: Path) -> tuple[int, int]:
    """(active, previous) release versions from the agent's `active.json`; (0, 0) before the first activation."""
    try:
        d = json.loads((state_dir / "active.json").read_bytes())
    except (FileNotFoundError, ValueError):
        return 0, 0
    return int(d.get("version", 0)), int(d.get("previous", 0))


@dataclass
class _Seen:
    update: tuple[int, int, float] | None = None  # (round, samples, seconds)
    ack: str = ""
    latest: int = 0


def _record(seen: _Seen, t: Topics, device_id: str, topic: str, payload: bytes, t0: float) -> None:
    if topic == t.model_latest:
        seen.latest = max(seen.latest, read_lean_release(payload)[0].version)
    elif topic == t.device(device_id, "update") and seen.update is None:
        u = decode_update(payload)
        seen.update = (u.round or 0, u.num_samples, time.monotonic() - t0)
    elif topic == t.device(device_id, "ack"):
        seen.ack = Ack.decode(payload).status


def wait_for_round(
    broker_url: str, fleet: str, device_id: str, state_dir: Path, procs: list[subprocess.Popen], timeout_s: float
) -> AgentRun:
    """Watch the broker and the agent's state dir until the device sent an update, got it acked, and activated
    the release that round produced (version 2); a process exiting early or the deadline raises RoundError."""
    t = Topics(fleet)
    inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    topics = [t.model_latest, t.device(device_id, "update"), t.device(device_id, "ack")]
    link = MqttLink(broker_url, f"qemu-watch-{uuid.uuid4().hex[:6]}", topics, lambda a, b: inbox.put((a, b)), None, 0)
    if not link.start(wait_s=10):
        raise RoundError(f"cannot connect to {broker_url} to watch the round")
    t0, seen = time.monotonic(), _Seen()
    try:
        while True:
            active, previous = active_versions(state_dir)
            if seen.update and seen.ack and seen.latest >= 2 and active >= 2:
                break
            if time.monotonic() - t0 > timeout_s:
                raise RoundError(f"no finished round after {timeout_s:.0f} s: saw {seen}, active v{active}")
            if any(p.poll() not in (None, 0) for p in procs):
                raise RoundError(f"a process exited early ({[p.poll() for p in procs]}); saw {seen}, active v{active}")
            with contextlib.suppress(queue.Empty):
                _record(seen, t, device_id, *inbox.get(timeout=1.0), t0)
    finally:
        link.stop()
    rnd, samples, t_update = seen.update
    t_active = round(time.monotonic() - t0, 1)
    return AgentRun(rnd, samples, seen.ack, seen.latest, active, previous, round(t_update, 1), t_active)

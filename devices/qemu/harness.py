"""Rehearse one device as emulated arm64 code: root file system, wheels, flash, one FedAvg round against the host.

Run as root: `python -m devices.qemu.harness` (or `make qemu-test`). Each step is timed; the timings are printed
and written as JSON. Slow parts (root file system, wheels) are cached under `--cache` between runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devices.qemu.fakecpu import CPUS, write_fake_cpu
from devices.qemu.guest import AgentRun, RoundError, exec_start_argv, read_env_file, wait_for_round
from devices.qemu.probe import probe_logits
from edgelearn.broker import Mosquitto
from models.shards import write_shards

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_CACHE = Path(os.environ.get("EDGELEARN_QEMU_CACHE", "/var/cache/edgelearn-qemu"))
SERVER_FRACTION = 0.05
MAX_LOGIT_DIFF = 1e-4  # guest vs host `infer.pte` logits; the feasibility run measured 1.5e-7


class QemuError(RuntimeError):
    """A step of the rehearsal failed; the message names the step and the log to read."""


@dataclass(frozen=True)
class QemuConfig:
    work_dir: Path
    cache_dir: Path = DEFAULT_CACHE
    board: str = "rpi4"
    device_id: str = "qemu-rpi4"
    fleet: str = field(default_factory=lambda: f"qemu{uuid.uuid4().hex[:8]}")
    round_timeout_s: float = 1800.0
    steps: int = 5
    bundle_dir: Path | None = None

    @property
    def rootfs(self) -> Path:
        return self.cache_dir / "rootfs"


@dataclass
class Timings:
    """Seconds per step, in order; written as JSON after every step so a failed run still reports."""

    out: Path
    steps: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        ok = False
        try:
            yield
            ok = True
        finally:
            seconds = round(time.monotonic() - t0, 1)
            self.steps.append({"step": name, "seconds": seconds, "ok": ok})
            log.info("step %-16s %7.1f s %s", name, seconds, "ok" if ok else "FAILED")
            self.write()

    def write(self) -> None:
        total = round(sum(s["seconds"] for s in self.steps), 1)
        self.out.write_text(json.dumps({"steps": self.steps, "total_s": total, **self.facts}, indent=2) + "\n")


def run_logged(cmd: list[str], log_path: Path, what: str, env: dict[str, str] | None = None) -> str:
    """Run `cmd`, appending its output to `log_path`; a failure raises QemuError naming `what` and the log."""
    with log_path.open("ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        res = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        f.write(res.stdout)
    if res.returncode != 0:
        tail = res.stdout.decode(errors="replace").strip().splitlines()[-5:]
        raise QemuError(f"{what} failed (exit {res.returncode}); see {log_path}: {' | '.join(tail)}")
    return res.stdout.decode(errors="replace")


def guest_cmd(cfg: QemuConfig, fake_dir: Path, *argv: str) -> list[str]:
    """The host command that runs `argv` inside the root file system as emulated arm64 code."""
    return [str(HERE / "chroot-run.sh"), str(cfg.rootfs), str(fake_dir), *argv]


def guest_env(cfg: QemuConfig) -> dict[str, str]:
    return {**os.environ, "QEMU_CPU": CPUS[cfg.board].qemu_cpu}


def host_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def check_host(cfg: QemuConfig) -> None:
    """Fail early, with the fix, where this machine cannot run the rehearsal."""
    if os.geteuid() != 0:
        raise QemuError("the arm64 rehearsal needs root (debootstrap, chroot, mounts): run it with sudo")
    if cfg.board not in CPUS:
        raise QemuError(f"no arm64 CPU description for board {cfg.board!r}; known: {', '.join(sorted(CPUS))}")
    missing = [t for t in ("debootstrap", "qemu-aarch64-static", "update-binfmts", "unshare") if not shutil.which(t)]
    if missing:
        raise QemuError(f"missing tools {missing}: apt-get install debootstrap qemu-user-static binfmt-support")


def prepare_rootfs(cfg: QemuConfig, t: Timings, logs: Path) -> None:
    """binfmt, debootstrap, aarch64 wheels and their install into site-packages (each cached)."""
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    host = {**os.environ, "EDGELEARN_HOST_PYTHON": sys.executable}
    with t.step("binfmt"):
        run_logged([str(HERE / "binfmt.sh")], logs, "binfmt")
    with t.step("debootstrap"):
        run_logged([str(HERE / "debootstrap.sh"), str(cfg.rootfs)], logs, "debootstrap")
    with t.step("wheels_download"):
        run_logged([str(HERE / "wheels.sh"), str(cfg.cache_dir / "wheels")], logs, "wheel download", host)
    with t.step("site_packages"):
        cmd = [str(HERE / "site-packages.sh"), str(cfg.rootfs), str(cfg.cache_dir / "wheels")]
        run_logged(cmd, logs, "site-packages install", host)


def build_inputs(cfg: QemuConfig, t: Timings, logs: Path) -> tuple[Path, Path, Path]:
    """The project wheel, the bundle (exported unless given) and the device's data shard, all on the host."""
    with t.step("project_wheel"):
        out = cfg.work_dir / "dist"
        run_logged([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(REPO)], logs, "wheel")
        wheel = next(out.glob("edgelearn-*.whl"))
    bundle = cfg.bundle_dir
    if bundle is None:
        with t.step("export_bundle"):
            bundle = cfg.work_dir / "bundle"
            cmd = host_cli("export", "--out", str(bundle), "--server-fraction", str(SERVER_FRACTION))
            run_logged(cmd, logs, "export")
    with t.step("data_shard"):
        shard = write_shards(cfg.work_dir / "data", 1, SERVER_FRACTION)[0]
    return wheel, bundle, shard


# qemu-user's translated code and its own heap count in the emulated agent's RSS (807 MB measured for the
# digits agent on rpi4, above the board profile's 700 MB budget): the flashed profile gets this RSS limit,
# everything else stays the board's.
EMULATION_MAX_RSS_MB = 2048


def flash_device(cfg: QemuConfig, t: Timings, logs: Path, bundle: Path, shard: Path, broker_url: str) -> None:
    """`edgelearn flash --to ROOTFS` on the host; a fresh state dir; the data file where the unit expects it."""
    state = cfg.rootfs / "var/lib/edgelearn/state"
    with t.step("flash"):
        shutil.rmtree(state, ignore_errors=True)
        override = cfg.work_dir / "emulation-profile.toml"
        override.write_text(f'base = "{cfg.board}"\n\n[budget]\nmax_rss_mb = {EMULATION_MAX_RSS_MB}\n')
        args = ["flash", "--profile-file", str(override), "--bundle", str(bundle), "--device-id", cfg.device_id]
        args += ["--fleet", cfg.fleet, "--broker", broker_url, "--to", str(cfg.rootfs)]
        run_logged(host_cli(*args), logs, "edgelearn flash")
        env = read_env_file(cfg.rootfs / "opt/edgelearn/current/device.env")
        data = cfg.rootfs / env["EDGELEARN_DATA"].lstrip("/")
        data.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shard, data)


def install_venv(cfg: QemuConfig, t: Timings, logs: Path, fake: Path, wheel: Path) -> None:
    """The unit's /opt/edgelearn/venv, made and filled by the guest's own python and pip (emulated)."""
    venv = "/opt/edgelearn/venv"
    with t.step("guest_venv"):
        if not (cfg.rootfs / venv.lstrip("/") / "bin/python").exists():
            make = ["/usr/bin/python3", "-m", "venv", "--system-site-packages", "--without-pip", venv]
            run_logged(guest_cmd(cfg, fake, *make), logs, "guest venv", guest_env(cfg))
        shutil.copy2(wheel, cfg.rootfs / "tmp" / wheel.name)
        pip = [f"{venv}/bin/python", "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--force-reinstall"]
        run_logged(guest_cmd(cfg, fake, *pip, f"/tmp/{wheel.name}"), logs, "guest pip install", guest_env(cfg))


def probe_guest(cfg: QemuConfig, t: Timings, logs: Path, fake: Path, shard: Path) -> dict[str, Any]:
    """Emulated imports and inference of the flashed bundle; proves the guest is aarch64 and matches the host."""
    from safetensors.numpy import load_file

    args = ["--bundle", "/opt/edgelearn/current/bundle", "--data", "/var/lib/edgelearn/data.safetensors"]
    args += ["--out", "/tmp/edgelearn-probe.safetensors"]
    (cfg.rootfs / "tmp/edgelearn-probe.safetensors").unlink(missing_ok=True)
    with t.step("guest_probe"):
        cmd = guest_cmd(cfg, fake, "/opt/edgelearn/venv/bin/python", "-m", "devices.qemu.probe", *args)
        out = run_logged(cmd, logs, "guest probe", guest_env(cfg))
    probe = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    if probe["machine"] != "aarch64":
        raise QemuError(f"the guest reports machine {probe['machine']!r}, not aarch64: binfmt/qemu is not in use")
    guest = load_file(str(cfg.rootfs / "tmp/edgelearn-probe.safetensors"))["logits"]
    host = probe_logits(cfg.rootfs / "opt/edgelearn/current/bundle", load_file(str(shard))["x"][: probe["rows"]])
    probe["max_abs_logit_diff"] = float(abs(guest - host).max())
    if not probe["max_abs_logit_diff"] <= MAX_LOGIT_DIFF:
        raise QemuError(f"guest logits differ from the host's by {probe['max_abs_logit_diff']:.3g} > {MAX_LOGIT_DIFF}")
    return probe


def log_tail(path: Path, lines: int = 3) -> str:
    text = path.read_text(errors="replace").strip().splitlines() if path.exists() else ["(no log)"]
    return " | ".join(text[-lines:])


def start(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log_path.open("ab"), stderr=subprocess.STDOUT, env=env)


def stop_all(procs: list[subprocess.Popen], grace_s: float = 60.0) -> None:
    """SIGTERM every process, then SIGKILL what is still running after `grace_s`."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_s
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def one_round(cfg: QemuConfig, t: Timings, bundle: Path, fake: Path, broker_url: str) -> AgentRun:
    """A host coordinator (1 round, min 1 update) and the flashed agent under QEMU, until v2 is active there."""
    unit = (cfg.rootfs / "etc/systemd/system/edgelearn-device.service").read_text()
    env = read_env_file(cfg.rootfs / "opt/edgelearn/current/device.env")  # as systemd's EnvironmentFile= does
    argv = exec_start_argv(unit, env)
    coord = [*host_cli("coordinator", "--broker", broker_url, "--fleet", cfg.fleet, "--bundle", str(bundle))]
    coord += ["--state", str(cfg.work_dir / "coordinator"), "--min-updates", "1", "--max-rounds", "1"]
    coord += ["--round-timeout", str(cfg.round_timeout_s), "--steps", str(cfg.steps)]
    procs: list[subprocess.Popen] = []
    try:
        with t.step("fedavg_round"):
            procs.append(start(coord, cfg.work_dir / "coordinator.log"))
            procs.append(start(guest_cmd(cfg, fake, *argv), cfg.work_dir / "agent.log", {**guest_env(cfg), **env}))
            state = cfg.rootfs / "var/lib/edgelearn/state"
            return wait_for_round(broker_url, cfg.fleet, cfg.device_id, state, procs, cfg.round_timeout_s + 60)
    except RoundError as e:
        agent_log = cfg.work_dir / "agent.log"
        raise QemuError(f"{e}; agent log {agent_log}: {log_tail(agent_log)}") from None
    finally:
        stop_all(procs)


def rehearse(cfg: QemuConfig, timings_path: Path) -> dict[str, Any]:
    """All steps; returns the timings document (also written to `timings_path`)."""
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    if threading.current_thread() is threading.main_thread():  # SIGTERM unwinds too: no orphaned agent
        signal.signal(signal.SIGTERM, _interrupt)
    t, logs = Timings(timings_path), cfg.work_dir / "steps.log"
    t.facts |= {"board": cfg.board, "qemu_cpu": CPUS[cfg.board].qemu_cpu, "cache_dir": str(cfg.cache_dir)}
    check_host(cfg)
    prepare_rootfs(cfg, t, logs)
    wheel, bundle, shard = build_inputs(cfg, t, logs)
    fake = cfg.work_dir / "fakecpu"
    write_fake_cpu(fake, cfg.board)
    broker = Mosquitto(cfg.work_dir / "mosquitto").start()
    try:
        flash_device(cfg, t, logs, bundle, shard, broker.url)
        install_venv(cfg, t, logs, fake, wheel)
        t.facts["guest"] = probe_guest(cfg, t, logs, fake, shard)
        t.facts["round"] = asdict(one_round(cfg, t, bundle, fake, broker.url))
    finally:
        broker.stop()
        t.facts["leftover_mounts"] = leftover_mounts(cfg.rootfs)
        t.write()
    return json.loads(timings_path.read_text())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def leftover_mounts(rootfs: Path) -> list[str]:
    """Mount points under `rootfs` in the host's table (the guest's mounts live in private namespaces: none)."""
    res = subprocess.run(["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True)
    left = [m for m in res.stdout.split() if m.startswith(str(rootfs.resolve()) + "/")]
    for m in sorted(left, reverse=True):
        subprocess.run(["umount", "-l", m])
    return left


def main(argv: list[str] | None = None, out: Callable[[str], None] = print) -> int:
    p = argparse.ArgumentParser(prog="python -m devices.qemu.harness", description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"cache folder (default {DEFAULT_CACHE})")
    p.add_argument("--work", type=Path, default=None, help="work folder (default: CACHE/runs/<time>)")
    p.add_argument("--board", default="rpi4", choices=sorted(CPUS), help="profile and emulated CPU (default rpi4)")
    p.add_argument("--bundle", type=Path, default=None, help="bundle to flash (default: export one)")
    p.add_argument("--timings", type=Path, default=None, help="timings JSON (default: WORK/qemu-timings.json)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    work = a.work or a.cache / "runs" / time.strftime("%Y%m%d-%H%M%S")
    cfg = QemuConfig(work_dir=work, cache_dir=a.cache, board=a.board, device_id=f"qemu-{a.board}", bundle_dir=a.bundle)
    try:
        doc = rehearse(cfg, a.timings or work / "qemu-timings.json")
    except QemuError as e:
        out(f"qemu rehearsal: error: {e}")
        return 1
    out(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

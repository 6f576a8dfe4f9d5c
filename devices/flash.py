"""Deploy packages: bundle + device config + systemd unit + install script, installed into a root or over ssh."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from devices.profiles import Profile
from edgelearn.bundle import verify_bundle
from edgelearn.protocol import check_name, parse_broker_url

log = logging.getLogger(__name__)
INSTALL_SH = Path(__file__).parent / "install.sh"
UNIT = "edgelearn-device.service"
DEVICE_HOME = "/var/lib/edgelearn"


class FlashError(ValueError):
    """A flash request that cannot work (bad bundle, target, device id); the message says what to fix."""


@dataclass(frozen=True)
class DeviceSettings:
    device_id: str
    fleet: str
    broker_url: str
    data_path: str = f"{DEVICE_HOME}/data.safetensors"


def unit_text(s: DeviceSettings) -> str:
    """The systemd unit: runs the agent from /opt/edgelearn/current, restarts it on failure."""
    return f"""[Unit]
Description=edgelearn device agent ({s.device_id})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
EnvironmentFile=/opt/edgelearn/current/device.env
ExecStart=/opt/edgelearn/venv/bin/edgelearn device --broker ${{EDGELEARN_BROKER}} --fleet ${{EDGELEARN_FLEET}} \\
  --id ${{EDGELEARN_DEVICE_ID}} --state {DEVICE_HOME}/state --data ${{EDGELEARN_DATA}} \\
  --bundle /opt/edgelearn/current/bundle --profile-file /opt/edgelearn/current/profile.toml
Restart=on-failure
RestartSec=5
Nice=10

[Install]
WantedBy=multi-user.target
"""


def env_text(s: DeviceSettings) -> str:
    return (
        f"EDGELEARN_BROKER={s.broker_url}\nEDGELEARN_FLEET={s.fleet}\nEDGELEARN_DEVICE_ID={s.device_id}\n"
        f"EDGELEARN_DATA={s.data_path}\n"
    )


def package_id(folder: Path) -> str:
    """sha256 over (relative path, content sha256) of every file except PACKAGE.json: same content, same id."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "PACKAGE.json":
            h.update(str(p.relative_to(folder)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_package(
    out: Path, bundle_dir: Path, profile: Profile, settings: DeviceSettings, wheels_dir: Path | None = None
) -> str:
    """Write a deploy package folder at `out`; returns its package id."""
    try:
        manifest = verify_bundle(bundle_dir)
        check_name("device id", settings.device_id)
        check_name("fleet", settings.fleet)
        parse_broker_url(settings.broker_url)
    except ValueError as e:
        raise FlashError(str(e)) from None
    if manifest.target != profile.target:
        log.warning("bundle target %s differs from profile %s's %s", manifest.target, profile.name, profile.target)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle_dir, out / "bundle")
    (out / "profile.toml").write_text(profile.to_toml(), encoding="utf-8")
    (out / "device.env").write_text(env_text(settings))
    (out / UNIT).write_text(unit_text(settings))
    shutil.copy2(INSTALL_SH, out / "install.sh")
    if wheels_dir:
        shutil.copytree(wheels_dir, out / "wheels")
    pid = package_id(out)
    info = {
        "package_id": pid,
        "device_id": settings.device_id,
        "fleet": settings.fleet,
        "profile": profile.name,
        "model_id": manifest.model_id,
        "bundle_version": manifest.version,
    }
    (out / "PACKAGE.json").write_text(json.dumps(info, indent=2) + "\n")
    return pid


def install_to_dir(package: Path, root: Path) -> None:
    """Run the package's own install.sh against a root file system folder (e.g. a mounted SD card)."""
    root.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["sh", str(package / "install.sh"), str(root.resolve())], capture_output=True, text=True)
    if res.returncode != 0:
        raise FlashError(f"install.sh failed in {root}: {res.stderr.strip().splitlines()[-1:]}")
    log.info(res.stdout.strip())


def ssh_commands(package: Path, target: str, pid: str) -> list[list[str]]:
    """rsync the package to `user@host` and run its install.sh there with sudo."""
    remote = f"/tmp/edgelearn-package-{pid}"
    return [
        ["rsync", "-a", "--delete", f"{package}/", f"{target}:{remote}/"],
        ["ssh", target, f"sudo sh {remote}/install.sh /"],
    ]


def flash(bundle_dir: Path, profile: Profile, settings: DeviceSettings, to: str, wheels_dir: Path | None = None) -> str:
    """Build the package and install it into a folder, or over ssh when `to` is `user@host`; returns its id."""
    with tempfile.TemporaryDirectory(prefix="edgelearn-flash-") as tmp:
        pkg = Path(tmp) / "package"
        pid = build_package(pkg, bundle_dir, profile, settings, wheels_dir)
        if "@" in to and not Path(to).exists():
            for cmd in ssh_commands(pkg, to, pid):
                if subprocess.run(cmd).returncode != 0:
                    raise FlashError(f"{cmd[0]} to {to} failed; check ssh access (key, sudo)")
        else:
            install_to_dir(pkg, Path(to))
    return pid

"""Deploy packages: bundle + device config + systemd unit + install script, installed into a root or over ssh."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from devices.profiles import Profile
from edgelearn.bundle import BundleError, Manifest, verify_bundle
from edgelearn.protocol import check_name, parse_broker_url
from edgelearn.signing import load_public, verify

log = logging.getLogger(__name__)
INSTALL_SH = Path(__file__).parent / "install.sh"
UNIT = "edgelearn-device.service"
DEVICE_HOME = "/var/lib/edgelearn"
PUBLIC_KEY = "release.pub"  # the fleet's release key inside a package; the agent reads it from current/
SSH_TARGET = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*@[A-Za-z0-9_][A-Za-z0-9._-]*")
REMOTE_DIR = re.compile(r"/tmp/edgelearn-package-[0-9a-f]+\.[A-Za-z0-9_]+")
REMOTE_ROOT = re.compile(r"/[A-Za-z0-9._/-]*")


class FlashError(ValueError):
    """A flash request that cannot work (bad bundle, target, device id); the message says what to fix."""


@dataclass(frozen=True)
class DeviceSettings:
    """What a flashed device is told: its id, fleet, broker, data file, and (signed fleet) the release key.

    `public_key` is a file on the flashing machine; it ships in the package as `release.pub`. Without it the
    device accepts unsigned releases (an unsigned fleet). `tls` files ship under `tls/` (the key 0600) and the
    agent connects with them (mutual TLS to an mqtts:// broker).
    """

    device_id: str
    fleet: str
    broker_url: str
    data_path: str = f"{DEVICE_HOME}/data.safetensors"
    public_key: Path | None = None
    tls: tuple[Path, Path, Path] | None = None  # (fleet CA, device certificate, device key) from `edgelearn pki`


TLS_FILES = ("ca.crt", "device.crt", "device.key")  # in the package's tls/ folder


SERVICE_USER = "edgelearn"  # the system user the agent runs as (install.sh makes it with systemd-sysusers)


def unit_text(s: DeviceSettings, min_release: int = 0) -> str:
    """The systemd unit: runs the agent as the unprivileged system user `edgelearn`, restarts it on failure.

    The broker URL (it may hold a password) reaches the agent as EDGELEARN_BROKER from device.env (0600 root,
    read by systemd before it drops privileges), never on the command line, which any local user can read in
    /proc/PID/cmdline; the TLS key (0600 root) reaches it the same way, as a credential (`LoadCredential`,
    `%d`). Sandbox: the agent may write only its state folder (`StateDirectory`, owned by its user); it keeps
    /sys and /proc readable for its budget readings (temperature, battery, memory). Left out on purpose:
    `MemoryDenyWriteExecute` (PyTorch and XNNPACK may generate code at run time), `PrivateNetwork` and
    `IPAddressDeny` (it talks MQTT, and serves apps on loopback), `ProtectProc=invisible` (psutil reads
    other processes' CPU for the budget)."""
    signed = f" \\\n  --public-key /opt/edgelearn/current/{PUBLIC_KEY}" if s.public_key else ""
    tls = "/opt/edgelearn/current/tls"
    signed += f" \\\n  --cafile {tls}/ca.crt --cert {tls}/device.crt --key %d/device.key" if s.tls else ""
    signed += f" \\\n  --min-release {min_release}" if min_release else ""
    credential = f"LoadCredential=device.key:{tls}/device.key\n" if s.tls else ""
    return f"""[Unit]
Description=edgelearn device agent ({s.device_id})
After=network-online.target
Wants=network-online.target

[Service]
Type=simple
User={SERVICE_USER}
Group={SERVICE_USER}
StateDirectory=edgelearn
StateDirectoryMode=0750
EnvironmentFile=/opt/edgelearn/current/device.env
{credential}ExecStart=/opt/edgelearn/venv/bin/edgelearn device --fleet ${{EDGELEARN_FLEET}} \\
  --id ${{EDGELEARN_DEVICE_ID}} --state {DEVICE_HOME}/state --data ${{EDGELEARN_DATA}} \\
  --bundle /opt/edgelearn/current/bundle --profile-file /opt/edgelearn/current/profile.toml{signed}
Restart=on-failure
RestartSec=5
Nice=10
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
UMask=0077

[Install]
WantedBy=multi-user.target
"""


ENV_OPTIONS = {  # device.env variable -> the flash option that sets it
    "EDGELEARN_BROKER": "--broker",
    "EDGELEARN_FLEET": "--fleet",
    "EDGELEARN_DEVICE_ID": "--device-id",
    "EDGELEARN_DATA": "--data-path",
}


def env_value_problem(value: str) -> str | None:
    """Why `value` cannot be a systemd EnvironmentFile value as is, or None when it can.

    Refused: empty, whitespace or control characters (a newline would add a variable to a root service's
    environment), quotes and backslashes (systemd would unquote or unescape them).
    """
    if not value:
        return "it is empty"
    bad = next((i for i, c in enumerate(value) if c.isspace() or not c.isprintable() or c in "\"'\\"), None)
    return None if bad is None else f"character {value[bad]!r} at position {bad}"


def env_text(s: DeviceSettings) -> str:
    """device.env, one KEY=VALUE line per setting; a value that is not safe there raises a one-line ValueError."""
    values = dict(zip(ENV_OPTIONS, (s.broker_url, s.fleet, s.device_id, s.data_path), strict=True))
    for key, value in values.items():
        problem = env_value_problem(value)
        if problem:
            raise ValueError(
                f"{ENV_OPTIONS[key]} cannot go into device.env ({key}): {problem}; "
                "whitespace, control characters, quotes and backslashes are not allowed"
            )
    return "".join(f"{k}={v}\n" for k, v in values.items())


def write_private(path: Path, text: str) -> None:
    """Write `text` to a new file that only its owner can read (mode 0600 from creation, never wider)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


def check_device_certificate(files: tuple[Path, Path, Path], device_id: str) -> None:
    """FlashError unless the CA and certificate parse and the certificate's common name is the device id (the
    broker takes it as the MQTT username: the ACL lets a device write only its own topics)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        x509.load_pem_x509_certificate(files[0].read_bytes())
        cert = x509.load_pem_x509_certificate(files[1].read_bytes())
        files[2].read_bytes()
    except (OSError, ValueError) as e:
        raise FlashError(f"--cafile/--cert/--key: {e}") from None
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [device_id]:
        raise FlashError(f"certificate {files[1]} is for {names[0] if names else 'no name'!r}, not device "
                         f"{device_id!r} (edgelearn pki issue --name {device_id})")  # fmt: skip


def check_public_key(path: Path) -> None:
    """Refuse a file that is not a base64 raw ed25519 public key, or that is the private key of a `*.pub` next to
    it (both are 32 base64 bytes; `edgelearn keys` writes release.key beside release.pub)."""
    try:
        load_public(path)
    except ValueError as e:
        raise FlashError(f"--public-key {e}") from None
    derived = Ed25519PrivateKey.from_private_bytes(base64.b64decode(path.read_text().strip())).public_key()
    for pub in sorted(path.parent.glob("*.pub")):
        try:
            matches = load_public(pub).public_bytes_raw() == derived.public_bytes_raw()
        except ValueError:
            continue
        if matches:
            raise FlashError(f"--public-key {path} is the private key of {pub}: give {pub} (keep the private one)")


def package_id(folder: Path) -> str:
    """sha256 over (relative path, content sha256) of every file except PACKAGE.json: same content, same id."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != "PACKAGE.json":
            h.update(str(p.relative_to(folder)).encode() + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:16]


def check_request(bundle_dir: Path, settings: DeviceSettings) -> Manifest:
    """The bundle's manifest once the bundle, names, broker URL, data path and key are all valid; else FlashError."""
    try:
        manifest = verify_bundle(bundle_dir)
        check_name("device id", settings.device_id)
        check_name("fleet", settings.fleet)
        parse_broker_url(settings.broker_url)
        env_text(settings)
    except ValueError as e:
        raise FlashError(str(e)) from None
    if not settings.data_path.startswith("/"):
        raise FlashError(f"--data-path must be an absolute path on the device, got {settings.data_path!r}")
    if settings.tls is not None:
        if not parse_broker_url(settings.broker_url).tls:
            raise FlashError(
                f"--cafile/--cert/--key need an mqtts:// broker, got {settings.broker_url.split('://')[0]}://"
            )
        check_device_certificate(settings.tls, settings.device_id)
    if settings.public_key is not None:
        check_public_key(settings.public_key)
        try:
            verify(manifest, load_public(settings.public_key))
        except BundleError as e:
            log.warning("flashed bundle: %s; the device refuses it and waits for the coordinator's signed release", e)
    return manifest


def build_package(
    out: Path, bundle_dir: Path, profile: Profile, settings: DeviceSettings, wheels_dir: Path | None = None
) -> str:
    """Write a deploy package folder at `out`; returns its package id. device.env (broker password) is 0600."""
    manifest = check_request(bundle_dir, settings)
    if manifest.target != profile.target:
        log.warning("bundle target %s differs from profile %s's %s", manifest.target, profile.name, profile.target)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle_dir, out / "bundle")
    (out / "profile.toml").write_text(profile.to_toml(), encoding="utf-8")
    write_private(out / "device.env", env_text(settings))
    (out / UNIT).write_text(unit_text(settings, min_release=manifest.version))  # never older than what it ships
    if settings.tls is not None:
        (out / "tls").mkdir()
        for src, name in zip(settings.tls, TLS_FILES, strict=True):
            if name.endswith(".key"):
                write_private(out / "tls" / name, src.read_text())
            else:
                shutil.copyfile(src, out / "tls" / name)
    shutil.copy2(INSTALL_SH, out / "install.sh")
    if settings.public_key is not None:
        shutil.copyfile(settings.public_key, out / PUBLIC_KEY)
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
        "signed": settings.public_key is not None,
        "mutual_tls": settings.tls is not None,
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


def check_ssh_target(target: str) -> None:
    """`user@host` with plain names only: nothing ssh or rsync could read as an option or a second argument."""
    if not SSH_TARGET.fullmatch(target):
        raise FlashError(f"--to {target!r}: expected an existing folder or user@host (letters, digits, . _ -)")


@dataclass(frozen=True)
class SshTarget:
    """`user@host`, reached with ssh's own settings (`config`: an ssh_config file, e.g. with a Host alias, port,
    key and known_hosts). Host keys are always checked and nothing prompts: an unknown or changed host key
    fails the flash (BatchMode, StrictHostKeyChecking=yes); add the device to known_hosts first."""

    target: str
    config: Path | None = None
    root: str = "/"  # the root file system install.sh installs into on the device

    def ssh_args(self) -> list[str]:
        return ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", *(["-F", str(self.config)] if self.config
                                                                            else [])]  # fmt: skip

    def ssh(self, command: str) -> list[str]:
        return ["ssh", *self.ssh_args(), self.target, command]

    def rsync(self, src: Path, remote: str) -> list[str]:
        return ["rsync", "-a", "--delete", "-e", shlex.join(["ssh", *self.ssh_args()]), f"{src}/",
                f"{self.target}:{remote}/"]  # fmt: skip


def remote_mkdir_command(to: SshTarget, pid: str) -> list[str]:
    """A fresh private (0700) folder on the device for the package, named by mktemp (no guessable /tmp path)."""
    return to.ssh(f"mktemp -d /tmp/edgelearn-package-{pid}.XXXXXXXX")


def ssh_commands(package: Path, to: SshTarget, remote: str) -> list[list[str]]:
    """rsync the package into `remote` on the device, run its install.sh there (with sudo unless the login is
    root) into `to.root`, then delete `remote` whatever install.sh returned (its exit status is kept)."""
    if not REMOTE_DIR.fullmatch(remote):
        raise FlashError(f"unexpected remote folder {remote!r} from mktemp on {to.target}")
    run = f"sh {remote}/install.sh {to.root}"
    script = f'if [ "$(id -u)" = 0 ]; then {run}; else sudo {run}; fi; rc=$?; rm -rf {remote}; exit $rc'
    return [to.rsync(package, remote), to.ssh(f"sh -c '{script}'")]


def flash_over_ssh(package: Path, to: SshTarget, pid: str) -> None:
    """Install the package on the device: private remote folder, rsync, install, remove the folder."""
    check_ssh_target(to.target)
    if not REMOTE_ROOT.fullmatch(to.root):
        raise FlashError(f"--remote-root {to.root!r}: an absolute path of letters, digits and / . _ -")
    res = subprocess.run(remote_mkdir_command(to, pid), capture_output=True, text=True)
    if res.returncode != 0:
        why = res.stderr.strip()[-300:]
        hint = (
            " (add the device's host key to known_hosts, after checking its fingerprint)"
            if "host key" in why.lower()
            else ""
        )
        raise FlashError(f"ssh to {to.target} failed{hint}: {why!r}")
    remote = res.stdout.strip()
    copy, install = ssh_commands(package, to, remote)
    if subprocess.run(copy, capture_output=True).returncode != 0:
        subprocess.run(to.ssh(f"rm -rf {remote}"), capture_output=True)
        raise FlashError(f"rsync to {to.target} failed; is rsync installed on the device?")
    if subprocess.run(install, capture_output=True).returncode != 0:
        raise FlashError(f"install.sh on {to.target} failed; check sudo rights there")


def flash(bundle_dir: Path, profile: Profile, settings: DeviceSettings, to: str, wheels_dir: Path | None = None,
          ssh_config: Path | None = None, remote_root: str = "/") -> str:  # fmt: skip
    """Build the package and install it into a folder, or over ssh when `to` is `user@host` (into `remote_root`
    there); returns its id."""
    with tempfile.TemporaryDirectory(prefix="edgelearn-flash-") as tmp:
        pkg = Path(tmp) / "package"
        pid = build_package(pkg, bundle_dir, profile, settings, wheels_dir)
        if "@" in to and not Path(to).exists():
            flash_over_ssh(pkg, SshTarget(to, ssh_config, remote_root), pid)
        else:
            install_to_dir(pkg, Path(to))
    return pid

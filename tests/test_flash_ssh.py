"""`edgelearn flash --to user@host` against a real sshd (Debian openssh-server) on a loopback port, with a
throwaway host key and client key, installing into a fake root on the far side: install, re-flash (no-op),
upgrade (atomic switch), files and modes; and an unknown host key stops it."""

from __future__ import annotations

import getpass
import os
import shutil
import stat
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from cli import main
from edgelearn.broker import free_port, wait_port
from edgelearn.bundle import verify_bundle, write_bundle

pytestmark = pytest.mark.slow
SSHD = "/usr/sbin/sshd"


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


@pytest.fixture
def sshd(tmp_path):
    """A real sshd on 127.0.0.1:PORT accepting this user with a throwaway key; yields (ssh_config, known_hosts)."""
    if not os.path.exists(SSHD) or shutil.which("rsync") is None or shutil.which("ssh") is None:
        pytest.skip("needs openssh-server, openssh-client and rsync (Debian packages)")
    if os.geteuid() != 0:
        pytest.skip("sshd with privilege separation needs root here")
    d = tmp_path / "ssh"
    d.mkdir(mode=0o700)
    host, client = keygen(d / "host_key"), keygen(d / "id")
    (d / "authorized_keys").write_text((d / "id.pub").read_text())
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host}\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PidFile {d}/sshd.pid\nUsePAM no\nStrictModes no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
    )
    os.makedirs("/run/sshd", exist_ok=True)
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stderr=subprocess.PIPE)
    assert wait_port(port), "sshd did not listen"
    known = d / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {(d / 'host_key.pub').read_text()}")
    config = d / "ssh_config"
    config.write_text(f"Host device\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {client}\n"
                      f"  IdentitiesOnly yes\n  UserKnownHostsFile {known}\n")  # fmt: skip
    yield config, known
    proc.terminate()
    proc.wait(10)


def flash_args(bundle: Path, config: Path, far: Path) -> list[str]:
    return ["flash", "--profile", "rpi4", "--bundle", str(bundle), "--device-id", "pi-1", "--fleet", "home",
            "--broker", "mqtt://user:secret@broker.local:1883", "--to", f"{getpass.getuser()}@device",
            "--ssh-config", str(config), "--remote-root", str(far)]  # fmt: skip


def test_flash_over_a_real_ssh_installs_reflashes_and_upgrades(sshd, bundle_dir, tmp_path, capsys):
    config, _ = sshd
    far = tmp_path / "far"  # the device's root file system, on the far side of ssh
    # Execute: install
    assert main(flash_args(bundle_dir, config, far)) == 0
    current = far / "opt/edgelearn/current"
    first = os.readlink(current)
    # Assert: files and modes on the far side; the remote staging folder is gone
    assert (current / "bundle/infer.pte").read_bytes() == (bundle_dir / "infer.pte").read_bytes()
    assert stat.S_IMODE((current / "device.env").stat().st_mode) == 0o600
    assert "secret" in (current / "device.env").read_text()
    assert "User=edgelearn" in (far / "etc/systemd/system/edgelearn-device.service").read_text()
    assert os.readlink(far / "etc/systemd/system/multi-user.target.wants/edgelearn-device.service")
    assert not [p for p in Path("/tmp").glob(f"edgelearn-package-{first.split('/')[-1]}.*")]
    # Execute: the same package again is a no-op
    stamp = (far / "opt/edgelearn" / first).stat().st_mtime_ns
    assert main(flash_args(bundle_dir, config, far)) == 0
    assert os.readlink(current) == first and (far / "opt/edgelearn" / first).stat().st_mtime_ns == stamp
    # Execute: a newer bundle switches `current` atomically and keeps the previous package for rollback
    m = verify_bundle(bundle_dir)
    newer = tmp_path / "v2"
    write_bundle(newer, replace(m, version=m.version + 1, files={}),
                 {n: (bundle_dir / n).read_bytes() for n in m.files})  # fmt: skip
    assert main(flash_args(newer, config, far)) == 0
    second = os.readlink(current)
    assert second != first and (far / "opt/edgelearn/previous").read_text().strip() == first.split("/")[-1]
    assert (far / "opt/edgelearn" / first).is_dir()
    assert f'"version": {m.version + 1}' in (current / "bundle/manifest.json").read_text()
    assert capsys.readouterr().out.count("installed package") == 3


def test_an_unknown_host_key_stops_the_flash_and_installs_nothing(sshd, bundle_dir, tmp_path, capsys):
    config, known = sshd
    known.write_text("")  # the device's key is not known: ssh must not ask, nor accept it silently
    far = tmp_path / "far"
    t0 = time.monotonic()
    assert main(flash_args(bundle_dir, config, far)) == 2
    err = capsys.readouterr().err
    assert "known_hosts" in err and "Host key verification failed" in err and time.monotonic() - t0 < 30
    assert not far.exists()

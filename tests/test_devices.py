"""devices/: profile loading and overrides, flashing into a root folder (files, unit, idempotent reinstall)."""

import json
import os
import shutil

import pytest

from cli import main
from devices.flash import DeviceSettings, FlashError, SshTarget, build_package, flash, ssh_commands
from devices.profiles import ProfileError, builtin_names, list_profiles, load_profile

SETTINGS = DeviceSettings("pi-kitchen", "home", "mqtt://broker.local:1883")


def test_builtin_profiles_load():
    boards = ["jetson-nano", "jetson-orin-nano", "rpi4", "rpi5", "x86-dev"]
    assert builtin_names() == sorted(["battery", "default", "pi", *boards])  # presets + measured boards
    for p in list_profiles():
        assert p.budget.threads >= 1 and p.budget.max_rss_mb and p.budget.max_rss_mb > 375  # above the floor
        assert p.sources or p.name not in boards, f"{p.name}: say where the values come from"


def test_override_file_changes_only_its_fields(tmp_path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "rpi4"\n[budget]\nthreads = 1\nmax_temperature_c = 70\n')
    p, base = load_profile("", f), load_profile("rpi4")
    assert (p.budget.threads, p.budget.max_temperature_c) == (1, 70.0)
    assert p.budget.max_rss_mb == base.budget.max_rss_mb and p.outbox == base.outbox


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('base = "rpi4"\n[budget]\nmax_cpu = 50\n', "unknown field(s) budget.max_cpu"),
        ('base = "rpi4"\ncolour = "red"\n', "unknown field(s) colour"),
        (
            'base = "rpi4"\n[budget]\nmax_rss_mb = "lots"\n',
            "field 'budget.max_rss_mb' must be float or 'off', got 'lots'",
        ),
        ('base = "rpi4"\n[budget]\nthreads = 0\n', "field 'budget.threads' must be an integer >= 1, got 0"),
        ('base = "rpi4"\nthreads = 2\n', "unknown field(s) threads (now 'budget.threads')"),
        ('base = "rpi4"\n[budget]\nmax_temp_c = 70\n', "budget.max_temp_c (now 'budget.max_temperature_c')"),
        ('base = "rpi9"\n', "unknown profile 'rpi9'"),
        ("threads = [", "not valid TOML"),
        ("base = 3\n", "field 'base' must be a profile name (a string), got 3"),
        ('base = "../profiles/rpi4"\n', "unknown profile '../profiles/rpi4'"),
    ],
)
def test_bad_profile_files_name_the_problem(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ProfileError) as e:
        load_profile("", f)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_flash_to_a_root_folder(bundle_dir, tmp_path):
    # Prepare
    root = tmp_path / "sdcard"
    # Execute
    pid = flash(bundle_dir, load_profile("rpi4"), SETTINGS, str(root))
    # Assert: package under /opt/edgelearn/current, unit installed and enabled, config written
    current = root / "opt/edgelearn/current"
    assert os.readlink(current) == f"packages/{pid}"
    assert json.loads((current / "PACKAGE.json").read_text())["device_id"] == "pi-kitchen"
    assert (current / "bundle/manifest.json").exists() and (current / "bundle/infer.pte").exists()
    assert "EDGELEARN_DEVICE_ID=pi-kitchen" in (current / "device.env").read_text()
    assert load_profile(str(current / "profile.toml")) == load_profile("rpi4")
    unit = (root / "etc/systemd/system/edgelearn-device.service").read_text()
    assert "Restart=on-failure" in unit and "/opt/edgelearn/current/bundle" in unit
    assert "User=edgelearn" in unit and "StateDirectory=edgelearn" in unit  # least privilege: its own system user
    assert "NoNewPrivileges=yes" in unit and "ProtectSystem=strict" in unit  # sandboxed: nothing to write outside state
    if shutil.which("systemd-sysusers"):  # install.sh declared the user and made it in the image's /etc/passwd
        assert "edgelearn:x:" in (root / "etc/passwd").read_text()
    wants = root / "etc/systemd/system/multi-user.target.wants/edgelearn-device.service"
    assert os.readlink(wants) == "../edgelearn-device.service"


def test_flash_command_exits_zero_and_says_what_it_installed(bundle_dir, tmp_path, capsys):
    # Prepare
    root = tmp_path / "sdcard"
    args = ["flash", "--profile", "rpi5", "--bundle", str(bundle_dir), "--device-id", "pi-hall"]
    args += ["--broker", "mqtt://fleet.local:1883", "--to", str(root)]
    # Execute
    rc = main(args)
    # Assert
    assert rc == 0
    assert "(rpi5, device pi-hall)" in capsys.readouterr().out
    assert "EDGELEARN_DEVICE_ID=pi-hall" in (root / "opt/edgelearn/current/device.env").read_text()


def test_reinstall_is_harmless_and_newer_replaces(bundle_dir, tmp_path):
    root = tmp_path / "sdcard"
    first = flash(bundle_dir, load_profile("rpi4"), SETTINGS, str(root))
    snapshot = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    assert flash(bundle_dir, load_profile("rpi4"), SETTINGS, str(root)) == first
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == snapshot
    second = flash(bundle_dir, load_profile("rpi5"), SETTINGS, str(root))
    assert second != first
    assert os.readlink(root / "opt/edgelearn/current") == f"packages/{second}"
    assert (root / "opt/edgelearn/previous").read_text().strip() == first  # kept for rollback
    third = flash(bundle_dir, load_profile("x86-dev"), SETTINGS, str(root))
    kept = sorted(p.name for p in (root / "opt/edgelearn/packages").iterdir())
    assert kept == sorted([second, third])


def test_same_content_gives_the_same_package_id(bundle_dir, tmp_path):
    a = build_package(tmp_path / "a", bundle_dir, load_profile("rpi4"), SETTINGS)
    b = build_package(tmp_path / "b", bundle_dir, load_profile("rpi4"), SETTINGS)
    assert a == b


def test_flash_refuses_a_tampered_bundle(bundle_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundle_dir, bad)
    (bad / "infer.pte").write_bytes(b"x")
    with pytest.raises(FlashError, match="infer.pte does not match its sha256"):
        flash(bad, load_profile("rpi4"), SETTINGS, str(tmp_path / "root"))
    assert not (tmp_path / "root").exists()


def test_ssh_target_uses_rsync_then_install(tmp_path):
    remote = "/tmp/edgelearn-package-abc.Xy12Zw9q"
    cmds = ssh_commands(tmp_path / "pkg", SshTarget("pi@raspberrypi.local"), remote)
    assert cmds[0][:3] == ["rsync", "-a", "--delete"] and cmds[0][-1] == f"pi@raspberrypi.local:{remote}/"
    assert cmds[1][0] == "ssh" and cmds[1][-2] == "pi@raspberrypi.local" and "StrictHostKeyChecking=yes" in cmds[1]
    assert f"sudo sh {remote}/install.sh /;" in cmds[1][-1]


def test_aarch64_lock_pins_every_distribution_the_device_agent_imports():
    # Prepare: the distributions behind the modules that `edgelearn device` loads (in a fresh interpreter; a
    # missing --data file stops the command right after its imports)
    import re
    import subprocess
    import sys
    from importlib.metadata import packages_distributions
    from pathlib import Path

    args = ["device", "--broker", "mqtt://127.0.0.1:1", "--fleet", "f", "--id", "d", "--state", "unused"]
    args += ["--data", "/nonexistent"]
    code = f"import sys; from cli import main; main({args!r}); "
    code += "print(' '.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    loaded = out.split()
    dists = packages_distributions()
    norm = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    needed = {norm(d) for m in loaded if "." not in m for d in dists.get(m, [])} - {"edgelearn"}
    # Execute: what the qemu harness installs into the arm64 root
    lock = Path("devices/qemu/requirements-aarch64.txt").read_text().splitlines()
    pinned = {norm(line.split("==")[0]) for line in lock if "==" in line and not line.startswith("#")}
    # Assert
    assert needed - pinned == set()


@pytest.mark.parametrize("tls", [False, True])
def test_the_generated_unit_passes_systemd_analyze_verify(bundle_dir, tmp_path, tls):
    """The unit as flashed (its /opt paths moved under the flashed root, where a stand-in executable waits) is
    clean for `systemd-analyze verify`: no unknown key, no bad value."""
    import subprocess

    from edgelearn.pki import init_ca, issue

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    settings = SETTINGS
    if tls:
        ca = init_ca(tmp_path / "pki", "home")
        settings = DeviceSettings("pi-kitchen", "home", "mqtts://broker.local:8883",
                                  tls=(ca, *issue(tmp_path / "pki", "pi-kitchen")))  # fmt: skip
    root = tmp_path / "root"
    flash(bundle_dir, load_profile("rpi4"), settings, str(root))
    exe = root / "opt/edgelearn/venv/bin/edgelearn"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    unit = (root / "etc/systemd/system/edgelearn-device.service").read_text()
    moved = tmp_path / "edgelearn-device.service"
    moved.write_text(unit.replace("/opt/edgelearn/", f"{root}/opt/edgelearn/"))
    out = subprocess.run(["systemd-analyze", "verify", str(moved)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout + out.stderr == "", out.stdout + out.stderr

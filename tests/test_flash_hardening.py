"""Flashing review findings: release signing on flashed devices, nothing injected into or leaked from the
device config, the remote package removed, the runtime upgraded on reflash, strict profile ranges."""

import json
import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from cli import build_parser, main
from devices.flash import (
    DeviceSettings,
    FlashError,
    SshTarget,
    build_package,
    env_text,
    flash,
    remote_mkdir_command,
    ssh_commands,
)
from devices.profiles import ProfileError, load_profile
from devices.qemu.guest import exec_start_argv, read_env_file
from edgelearn.bundle import BundleError, verify_bundle
from edgelearn.protocol import parse_broker_url
from edgelearn.signing import generate_keys, load_private, load_public, sign, verify

SETTINGS = DeviceSettings("pi-kitchen", "home", "mqtt://broker.local:1883")
UNIT = "etc/systemd/system/edgelearn-device.service"
CURRENT = "opt/edgelearn/current"


def agent_args(root: Path, monkeypatch: pytest.MonkeyPatch):
    """The agent's parsed command line as systemd would start it from `root`: ExecStart with device.env."""
    env = read_env_file(root / CURRENT / "device.env")
    argv = exec_start_argv((root / UNIT).read_text(), env)
    for key, value in env.items():  # EnvironmentFile= puts every line into the agent's environment
        monkeypatch.setenv(key, value)
    return argv, build_parser().parse_args(argv[1:])


# ---------------------------------------------------------------- 1. signing


def test_flash_with_public_key_makes_the_device_refuse_unsigned_releases(bundle_dir, tmp_path, monkeypatch, caplog):
    # Prepare
    generate_keys(tmp_path / "release.key", tmp_path / "release.pub")
    root = tmp_path / "sdcard"
    settings = DeviceSettings("pi-1", "home", "mqtt://h:1883", public_key=tmp_path / "release.pub")
    # Execute
    flash(bundle_dir, load_profile("rpi4"), settings, str(root))
    _, args = agent_args(root, monkeypatch)
    # Assert: the agent is started with the installed copy of the key, which refuses unsigned releases
    assert str(args.public_key) == f"/{CURRENT}/release.pub"
    installed = root / str(args.public_key).lstrip("/")
    assert installed.read_bytes() == (tmp_path / "release.pub").read_bytes()
    manifest = verify_bundle(bundle_dir)
    with pytest.raises(BundleError, match="release is not signed"):
        verify(manifest, load_public(installed))
    verify(sign(manifest, load_private(tmp_path / "release.key")), load_public(installed))
    assert json.loads((root / CURRENT / "PACKAGE.json").read_text())["signed"] is True
    assert "the device refuses it and waits for the coordinator's signed release" in caplog.text  # unsigned bundle


def test_flash_without_public_key_is_an_unsigned_fleet_and_says_so(bundle_dir, tmp_path, monkeypatch, capsys):
    # Prepare
    root = tmp_path / "sdcard"
    args = ["flash", "--profile", "rpi4", "--bundle", str(bundle_dir), "--device-id", "pi-2"]
    args += ["--broker", "mqtt://h:1883", "--to", str(root)]
    # Execute
    rc = main(args)
    _, parsed = agent_args(root, monkeypatch)
    # Assert
    assert rc == 0 and parsed.public_key is None
    assert "unsigned fleet" in capsys.readouterr().err
    assert not (root / CURRENT / "release.pub").exists()


def test_flash_refuses_a_bad_key_and_a_private_key(bundle_dir, tmp_path):
    # Prepare
    generate_keys(tmp_path / "release.key", tmp_path / "release.pub")
    (tmp_path / "junk.pub").write_text("not a key\n")
    cases = {tmp_path / "junk.pub": "not a base64 raw ed25519 public key", tmp_path / "release.key": "private key"}
    for key, message in cases.items():
        settings = DeviceSettings("pi-1", "home", "mqtt://h:1883", public_key=key)
        # Execute / Assert: a one-line error, nothing installed
        with pytest.raises(FlashError) as e:
            flash(bundle_dir, load_profile("rpi4"), settings, str(tmp_path / "root"))
        assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------- 2. device config: injection and leaks


@pytest.mark.parametrize(
    "url",
    [
        "mqtt://host\nLD_PRELOAD=/tmp/x.so",
        "mqtt://host\rX=1",
        "mqtt://host\tX",
        "mqtt://user:pa ss@host",
        "mqtt://host\x00",
        "mqtt://host\u2028X=1",
        "mqtt://host\x7f",
    ],
)
def test_broker_url_with_whitespace_or_control_characters_is_refused(url):
    with pytest.raises(ValueError) as e:
        parse_broker_url(url)
    assert "whitespace or control character" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("data_path", "message"),
    [
        ("/var/lib/edgelearn/d\nLD_PRELOAD=/tmp/x.so", "--data-path cannot go into device.env (EDGELEARN_DATA)"),
        ("/var/lib/my data.safetensors", "character ' ' at position 11"),
        ('/var/lib/"x".safetensors', "character '\"'"),
        ("/var/lib/x\\.safetensors", "character '\\\\'"),
        ("data.safetensors", "--data-path must be an absolute path"),
    ],
)
def test_unsafe_device_env_values_are_refused_and_nothing_is_installed(bundle_dir, tmp_path, data_path, message):
    # Prepare
    settings = DeviceSettings("pi-1", "home", "mqtt://h:1883", data_path)
    # Execute
    with pytest.raises(FlashError) as e:
        flash(bundle_dir, load_profile("rpi4"), settings, str(tmp_path / "root"))
    # Assert
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "root").exists()


def test_env_text_itself_refuses_a_newline():
    with pytest.raises(ValueError, match="--broker cannot go into device.env"):
        env_text(DeviceSettings("pi-1", "home", "mqtt://h\nX=1"))


def test_flash_command_refuses_a_broker_url_that_adds_an_environment_line(bundle_dir, tmp_path, capsys):
    # Prepare
    args = ["flash", "--profile", "rpi4", "--bundle", str(bundle_dir), "--device-id", "pi-1"]
    args += ["--broker", "mqtt://host\nLD_PRELOAD=/tmp/x.so", "--to", str(tmp_path / "root")]
    # Execute
    with pytest.raises(SystemExit) as e:
        main(args)
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "whitespace or control character '\\n'" in err[-1]
    assert not (tmp_path / "root").exists()


def test_broker_password_stays_off_the_command_line_and_device_env_is_private(bundle_dir, tmp_path, monkeypatch):
    # Prepare
    url = "mqtt://pi:s3cret@broker.local:1883"
    root = tmp_path / "sdcard"
    # Execute
    pid = build_package(tmp_path / "pkg", bundle_dir, load_profile("rpi4"), DeviceSettings("pi-1", "home", url))
    flash(bundle_dir, load_profile("rpi4"), DeviceSettings("pi-1", "home", url), str(root))
    argv, args = agent_args(root, monkeypatch)
    # Assert: ExecStart has no broker (no password in /proc/PID/cmdline); the agent reads it from its environment
    assert "s3cret" not in " ".join(argv) and "EDGELEARN_BROKER" not in (root / UNIT).read_text()
    assert args.broker == url
    packaged, installed = tmp_path / "pkg/device.env", root / f"opt/edgelearn/packages/{pid}/device.env"
    for env_file in (packaged, installed, root / CURRENT / "device.env"):
        assert stat.S_IMODE(env_file.stat().st_mode) == 0o600, env_file
    # a package an older flash left world-readable is made private by the next install
    installed.chmod(0o644)
    flash(bundle_dir, load_profile("rpi5"), DeviceSettings("pi-1", "home", url), str(root))
    assert stat.S_IMODE(installed.stat().st_mode) == 0o600


def test_device_command_without_broker_or_environment_is_a_one_line_error(monkeypatch, capsys):
    # Prepare
    monkeypatch.delenv("EDGELEARN_BROKER", raising=False)
    # Execute
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["device", "--fleet", "f", "--id", "d", "--state", "s"])
    # Assert
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("the following arguments are required: --broker")


def fake_sudo(tmp_path: Path) -> dict[str, str]:
    """PATH with a `sudo` that runs its arguments as this user (the remote side's sudo, here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize("install_rc", [0, 3])
def test_remote_package_is_removed_after_install_whatever_install_returns(tmp_path, install_rc):
    # Prepare: the remote folder as mktemp makes it, holding a package whose install.sh exits `install_rc`
    remote = Path(tempfile.mkdtemp(prefix="edgelearn-package-abc.", dir="/tmp"))
    (remote / "install.sh").write_text(f'touch "{tmp_path}/ran"; exit {install_rc}\n')
    _, install = ssh_commands(tmp_path / "pkg", SshTarget("pi@raspberrypi.local"), str(remote))
    # Execute: what ssh runs on the device (the login shell gets the command string)
    res = subprocess.run(["sh", "-c", install[-1]], env=fake_sudo(tmp_path))
    # Assert
    assert (tmp_path / "ran").exists() and res.returncode == install_rc
    assert not remote.exists()


def test_remote_folder_is_private_and_targets_cannot_be_options(bundle_dir, tmp_path):
    # Prepare / Execute
    mkdir = remote_mkdir_command(SshTarget("pi@raspberrypi.local"), "abc")
    # Assert: mktemp -d (0700, unguessable), no fixed /tmp name; option-like targets and odd folders refused
    assert mkdir[-2:] == ["pi@raspberrypi.local", "mktemp -d /tmp/edgelearn-package-abc.XXXXXXXX"]
    with pytest.raises(FlashError, match="expected an existing folder or user@host"):
        flash(bundle_dir, load_profile("rpi4"), SETTINGS, f"-oProxyCommand=touch {tmp_path}/pwned@x")
    with pytest.raises(FlashError, match="unexpected remote folder"):
        ssh_commands(tmp_path / "pkg", SshTarget("pi@host"), "/tmp/x; rm -rf /")
    assert not (tmp_path / "pwned").exists()


# ---------------------------------------------------------------- 3. reflash upgrades the runtime


def write_wheel(folder: Path, version: str, value: str) -> Path:
    """A minimal real wheel of a distribution named `edgelearn` with an `edgelearn` console script."""
    import base64
    import hashlib
    import zipfile

    info = f"edgelearn-{version}.dist-info"
    files = {
        "edgelearn_stub.py": f"VALUE = {value!r}\n\n\ndef main():\n    print(VALUE)\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: edgelearn\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/entry_points.txt": "[console_scripts]\nedgelearn = edgelearn_stub:main\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    files[f"{info}/RECORD"] = "\n".join([*record, f"{info}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"edgelearn-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return path


def test_reflash_installs_the_new_wheels_and_skips_unchanged_ones(bundle_dir, tmp_path, monkeypatch):
    # Prepare: a root for this machine's own python (EDGELEARN_VENV=1 lets install.sh make the venv there)
    monkeypatch.setenv("EDGELEARN_VENV", "1")
    root, rpi4 = tmp_path / "root", load_profile("rpi4")
    edgelearn = root / "opt/edgelearn/venv/bin/edgelearn"
    write_wheel(tmp_path / "w1", "0.0.1", "one")
    write_wheel(tmp_path / "w2", "0.0.2", "two")
    write_wheel(tmp_path / "w2b", "0.0.2", "two, rebuilt")
    # Execute / Assert: first flash installs, a newer package's wheels upgrade
    flash(bundle_dir, rpi4, SETTINGS, str(root), tmp_path / "w1")
    assert subprocess.run([edgelearn], capture_output=True, text=True).stdout == "one\n"
    flash(bundle_dir, rpi4, SETTINGS, str(root), tmp_path / "w2")
    assert subprocess.run([edgelearn], capture_output=True, text=True).stdout == "two\n"
    # the same wheels again: nothing reinstalled
    stub = next(root.glob("opt/edgelearn/venv/lib/python*/site-packages/edgelearn_stub.py"))
    before = stub.stat().st_mtime_ns
    flash(bundle_dir, rpi4, SETTINGS, str(root), tmp_path / "w2")
    assert stub.stat().st_mtime_ns == before
    # a rebuilt wheel of the same version is installed too
    flash(bundle_dir, rpi4, SETTINGS, str(root), tmp_path / "w2b")
    assert subprocess.run([edgelearn], capture_output=True, text=True).stdout == "two, rebuilt\n"


# ---------------------------------------------------------------- 4. profile ranges


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[budget]\nthreads = true", "field 'budget.threads' must be an integer >= 1, got True"),
        ("[budget]\nmax_rss_mb = true", "field 'budget.max_rss_mb' must be"),
        ("[budget]\nmax_rss_mb = -5", "field 'budget.max_rss_mb' must be a number > 0, got -5"),
        ("[budget]\nmax_rss_mb = 0", "field 'budget.max_rss_mb' must be a number > 0, got 0"),
        ("[budget]\nmax_cpu_percent = nan", "field 'budget.max_cpu_percent' must be a number in (0, 100], got nan"),
        ("[budget]\nmax_cpu_percent = 0", "field 'budget.max_cpu_percent' must be a number in (0, 100], got 0"),
        ("[budget]\nmin_available_mb = -1", "field 'budget.min_available_mb' must be a number >= 0, got -1"),
        ("[budget]\nmax_temperature_c = inf", "field 'budget.max_temperature_c' must be a number in (0, 150], got inf"),
        ("[budget]\nmin_battery_percent = 101", "field 'budget.min_battery_percent' must be a number in [0, 100]"),
        ("[budget]\nmax_train_s_per_hour = 0", "field 'budget.max_train_s_per_hour' must be a number in (0, 3600]"),
        ("[mqtt]\nkeepalive_s = 0", "field 'mqtt.keepalive_s' must be an integer in [1, 65535], got 0"),
        ("[mqtt]\nkeepalive_s = false", "field 'mqtt.keepalive_s' must be an integer in [1, 65535], got False"),
        ("[outbox]\nmax_items = 0", "field 'outbox.max_items' must be an integer >= 1, got 0"),
        ("[outbox]\nack_timeout_s = -1.0", "field 'outbox.ack_timeout_s' must be a number > 0, got -1.0"),
    ],
)
def test_out_of_range_profile_values_name_the_field_and_range(tmp_path, text, message):
    # Prepare
    f = tmp_path / "bad.toml"
    f.write_text(f'base = "rpi4"\n{text}\n')
    # Execute
    with pytest.raises(ProfileError) as e:
        load_profile("", f)
    # Assert
    assert message in str(e.value) and "\n" not in str(e.value)


def test_profiles_command_shows_a_complete_profile_file_without_base(tmp_path, capsys):
    # Prepare: a complete profile (as flash ships it), no base, no profile name on the command line
    f = tmp_path / "profile.toml"
    f.write_text(load_profile("rpi4").to_toml())
    # Execute
    rc = main(["profiles", "--file", str(f)])
    # Assert
    assert rc == 0 and capsys.readouterr().out == load_profile("rpi4").to_toml()


def test_flash_installs_the_devices_certificate_and_the_agent_is_started_with_it(bundle_dir, tmp_path, monkeypatch):
    # Prepare: a fleet PKI with a certificate for this device and one for another
    from edgelearn.pki import init_ca, issue

    ca = init_ca(tmp_path / "pki", "home")
    cert, key = issue(tmp_path / "pki", "pi-1")
    other, other_key = issue(tmp_path / "pki", "pi-2")
    url, root = "mqtts://broker.local:8883", tmp_path / "sdcard"
    # Execute
    flash(bundle_dir, load_profile("rpi4"), DeviceSettings("pi-1", "home", url, tls=(ca, cert, key)), str(root))
    _, args = agent_args(root, monkeypatch)
    # Assert: the files are installed (the key private), the agent gets them and a rollback floor at the flashed v
    tls = root / CURRENT / "tls"
    assert (tls / "device.crt").read_bytes() == cert.read_bytes() and stat.S_IMODE(
        (tls / "device.key").stat().st_mode
    ) == 0o600
    assert args.cert == Path(f"/{CURRENT}/tls/device.crt") and args.key == Path("%d/device.key")  # a credential:
    unit = (root / "etc/systemd/system/edgelearn-device.service").read_text()  # systemd reads the 0600 key for
    assert f"LoadCredential=device.key:/{CURRENT}/tls/device.key" in unit  # the agent's unprivileged user
    assert args.min_release == verify_bundle(bundle_dir).version
    with pytest.raises(FlashError, match="is for 'pi-2', not device 'pi-1'"):
        build_package(tmp_path / "p2", bundle_dir, load_profile("rpi4"),
                      DeviceSettings("pi-1", "home", url, tls=(ca, other, other_key)))  # fmt: skip
    with pytest.raises(FlashError, match="need an mqtts:// broker"):
        build_package(tmp_path / "p3", bundle_dir, load_profile("rpi4"),
                      DeviceSettings("pi-1", "home", "mqtt://broker.local", tls=(ca, cert, key)))  # fmt: skip

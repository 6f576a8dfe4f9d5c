"""Fleet tooling commands: `keys`, `profiles`, `flash`, `demo`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import add_tls_options, broker_url, device_id, fleet_name


def cmd_keys(a: argparse.Namespace) -> int:
    from edgelearn.signing import generate_keys

    a.out.mkdir(parents=True, exist_ok=True)
    private, public = a.out / "release.key", a.out / "release.pub"
    if private.exists() and not a.force:
        print(f"edgelearn keys: error: {private} exists (use --force to replace it)", file=sys.stderr)
        return 2
    kid = generate_keys(private, public)
    print(f"key {kid}: private {private} (keep it on the coordinator), public {public} (give it to devices)")
    return 0


def cmd_pki(a: argparse.Namespace) -> int:
    from edgelearn.pki import PkiError, init_ca, issue

    try:
        if a.action == "init":
            print(f"fleet CA: {init_ca(a.dir, a.fleet)} (give it to every client as --cafile; keep ca.key offline)")
        else:
            if not a.name:
                raise PkiError("issue needs --name (a device id, coordinator, or the broker's name with --host)")
            cert, key = issue(a.dir, a.name, tuple(a.host))
            what = "server certificate" if a.host else "client certificate (its common name is the MQTT username)"
            print(f"{what}: {cert}, key {key} (0600)")
    except (PkiError, OSError) as e:
        print(f"edgelearn pki: error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_profiles(a: argparse.Namespace) -> int:
    from devices.profiles import ProfileError, list_profiles, load_profile

    try:
        profiles = [load_profile(a.show, a.file)] if (a.show or a.file) else list_profiles()
    except ProfileError as e:
        print(f"edgelearn profiles: error: {e}", file=sys.stderr)
        return 2
    if a.show or a.file:
        print(profiles[0].to_toml(), end="")
        return 0
    head = ("profile", "target", "thr", "cpu%", "rss MB", "temp °C", "train s/h")
    print("{:18} {:13} {:>3} {:>5} {:>7} {:>8} {:>9}  description".format(*head))
    for p in profiles:
        b = p.budget
        print(
            f"{p.name:18} {p.target:13} {b.threads:>3} {_limit(b.max_cpu_percent):>5} {_limit(b.max_rss_mb):>7} "
            f"{_limit(b.max_temperature_c):>8} {_limit(b.max_train_s_per_hour):>9}  {p.description}"
        )
    return 0


def _limit(value: float | None) -> str:
    return "off" if value is None else f"{value:.0f}"


def cmd_flash(a: argparse.Namespace) -> int:
    from devices.flash import DeviceSettings, FlashError, flash
    from devices.profiles import ProfileError, load_profile

    try:
        profile = load_profile(a.profile, a.profile_file)
        tls = (a.cafile, a.cert, a.key) if a.cafile or a.cert or a.key else None
        if tls is not None and not all(tls):
            raise FlashError("mutual TLS needs --cafile, --cert and --key together (edgelearn pki makes them)")
        settings = DeviceSettings(a.device_id, a.fleet, a.broker, a.data_path, a.public_key, tls)
        pid = flash(a.bundle, profile, settings, a.to, a.wheels, a.ssh_config, a.remote_root)
    except (FlashError, ProfileError) as e:
        print(f"edgelearn flash: error: {e}", file=sys.stderr)
        return 2
    if a.public_key is None:
        print(
            "edgelearn flash: warning: unsigned fleet, the device accepts any release (see --public-key)",
            file=sys.stderr,
        )
    print(f"installed package {pid} ({profile.name}, device {a.device_id}) into {a.to}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from cli.demo import run_demo

    report = run_demo(a.devices, a.rounds, a.broker, a.workdir, say=lambda s: print(s, flush=True), model=a.model)
    return 0 if len(report["rounds"]) == a.rounds else 1


def _add_keys_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser(
        "keys",
        help="generate an ed25519 key pair for signed releases",
        description="Write release.key (coordinator: signs releases) and release.pub (devices: "
        "refuse releases not signed by it).",
    )
    k.add_argument("--out", type=Path, required=True, help="folder for release.key and release.pub")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    k.set_defaults(func=cmd_keys)


def _add_profiles_parser(sub: argparse._SubParsersAction) -> None:
    pr = sub.add_parser(
        "profiles",
        help="list device profiles, or show one resolved",
        description="Built-in profiles: devices/profiles/*.toml. A user file (--file) overrides "
        "any field of its `base` profile.",
    )
    pr.add_argument("show", nargs="?", default=None, help="profile to print as TOML")
    pr.add_argument("--file", type=Path, default=None, help='user profile file (with base = "NAME")')
    pr.set_defaults(func=cmd_profiles)


def _add_flash_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "flash",
        help="build a deploy package and install it into a root folder or over ssh",
        description="Package the bundle, device config, a systemd unit and install.sh; install it "
        "into TARGET (a mounted SD-card root or any folder) or on user@host via rsync + ssh.",
    )
    f.add_argument("--profile", default="", help="device profile (rpi4, rpi5, jetson-orin-nano, ...)")
    f.add_argument("--profile-file", type=Path, default=None, help="TOML file overriding profile fields")
    f.add_argument("--bundle", type=Path, required=True, help="bundle directory to ship")
    f.add_argument("--device-id", type=device_id, required=True, help="the device's id")
    f.add_argument("--fleet", type=fleet_name, default="default", help="fleet name (default: default)")
    f.add_argument("--broker", type=broker_url, required=True, help="broker URL the device connects to")
    f.add_argument("--data-path", default="/var/lib/edgelearn/data.safetensors", help="local data file on device")
    f.add_argument("--wheels", type=Path, default=None, help="folder of wheels to install edgelearn offline")
    f.add_argument(
        "--public-key",
        type=Path,
        default=None,
        help="release.pub of a signed fleet: the device refuses releases not signed by its key "
        "(without it the fleet is unsigned)",
    )
    add_tls_options(f)
    f.add_argument("--to", required=True, help="TARGET: a folder (root file system) or user@host")
    f.add_argument("--ssh-config", type=Path, default=None,
                   help="user@host: an ssh_config file (port, key, known_hosts); host keys always checked")  # fmt: skip
    f.add_argument("--remote-root", default="/", help="user@host: the root file system to install into (default /)")
    f.set_defaults(func=cmd_flash)


def _add_demo_parser(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser(
        "demo",
        help="run a whole fleet end to end on one machine",
        description="A short `edgelearn simulate` run: export the model, start a broker, a "
        "coordinator and N simulated boards with non-IID data, and run FedAvg rounds, printing "
        "participants, accepted updates and held-out accuracy per round (char-lm: one speaker per device, "
        "and text generated by the first and the last release).",
    )
    m.add_argument("--model", choices=("digits-mlp", "char-lm"), default="digits-mlp",
                   help="digits-mlp (default) or the byte-level language model char-lm")  # fmt: skip
    m.add_argument("--devices", type=int, default=4, help="number of devices (default 4)")
    m.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    m.add_argument(
        "--broker",
        choices=("embedded", "mosquitto"),
        default="embedded",
        help="embedded amqtt (MQTT 3.1.1, zero setup; default) or a local mosquitto (MQTT 5)",
    )
    m.add_argument("--workdir", type=Path, default=None, help="working folder (default: a new temp folder)")
    m.set_defaults(func=cmd_demo)


def _add_pki_parser(sub: argparse._SubParsersAction) -> None:
    k = sub.add_parser("pki", help="a fleet CA and certificates for mutual TLS (broker, coordinator, devices)")
    k.add_argument("action", choices=("init", "issue"), help="init: make the CA; issue: a certificate signed by it")
    k.add_argument("--dir", type=Path, required=True, help="the PKI folder (ca.crt, ca.key, NAME.crt, NAME.key)")
    k.add_argument("--fleet", default="default", help="init: the fleet named in the CA (default: default)")
    k.add_argument("--name", default=None, help="issue: a device id, coordinator, or the broker's name")
    k.add_argument("--host", action="append", default=[], help="issue: a DNS name or IP of the broker (server)")
    k.set_defaults(func=cmd_pki)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_keys_parser(sub)
    _add_pki_parser(sub)
    _add_profiles_parser(sub)
    _add_flash_parser(sub)
    _add_demo_parser(sub)

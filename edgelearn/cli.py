"""`edgelearn` command line: export, data, coordinator, device, demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from edgelearn.protocol import ENCODINGS, LocalConfig, check_name, parse_broker_url


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("torch", "executorch", "torchao", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _fleet(value: str) -> str:
    try:
        return check_name("fleet", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _device_id(value: str) -> str:
    try:
        return check_name("device id", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _broker(value: str) -> str:
    try:
        parse_broker_url(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def cmd_export(a: argparse.Namespace) -> int:
    import json

    from export import ExportError
    from export.pipeline import REPORT_JSON, ExportConfig, export_bundle
    from export.report import format_table

    cfg = ExportConfig(
        model_id=a.model,
        target=a.target,
        server_fraction=a.server_fraction,
        epochs=a.epochs,
        alpha=a.alpha,
        temperature=a.temperature,
        seed=a.seed,
        text=None if a.text is None else str(a.text),
        sparsity=a.sparsity,
        quant=a.quant,
        train_subset=a.train_subset,
        compare=not a.no_compare,
    )
    try:
        m = export_bundle(cfg, a.out)
    except ExportError as e:
        print(f"edgelearn export: error: {e}", file=sys.stderr)
        return 2
    print(format_table(json.loads((a.out / REPORT_JSON).read_bytes())))
    sizes = ", ".join(f"{name} ({meta['bytes']} B)" for name, meta in m.files.items())
    print(f"bundle {a.out}: {m.model_id} v{m.version} {m.target}, files {sizes}")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from edgelearn.demo import write_shards

    paths = write_shards(a.out, a.devices, a.server_fraction, a.classes_per_device, a.seed)
    print(f"wrote {len(paths)} device shards and test.safetensors to {a.out}")
    return 0


def cmd_coordinator(a: argparse.Namespace) -> int:
    from coordinator.server import Coordinator, CoordinatorConfig
    from edgelearn.bundle import BundleError, verify_bundle
    from export.pipeline import rebuild_bundle

    try:
        verify_bundle(a.bundle)
    except BundleError as e:
        print(f"edgelearn coordinator: error: {e}", file=sys.stderr)
        return 2
    cfg = CoordinatorConfig(
        a.broker,
        a.fleet,
        a.bundle,
        a.state,
        a.topic_root,
        a.min_updates,
        a.round_timeout,
        LocalConfig(a.steps, a.batch_size, a.lr),
        a.max_update_norm,
        a.max_samples_per_update,
        a.max_rounds,
    )
    Coordinator(cfg, rebuild_bundle).run(_stop_on_signals())
    return 0


def cmd_device(a: argparse.Namespace) -> int:
    from devices.profiles import ProfileError, load_profile
    from edge_runtime.agent import DeviceAgent, DeviceConfig
    from edgelearn.bundle import BundleError, verify_bundle
    from edgelearn.demo import load_shard

    try:
        shard = load_shard(a.data)
        profile = load_profile(a.profile, a.profile_file) if (a.profile or a.profile_file) else None
        if a.bundle:
            verify_bundle(a.bundle)
    except (OSError, ValueError, ProfileError, BundleError) as e:
        print(f"edgelearn device: error: {e}", file=sys.stderr)
        return 2
    cfg = DeviceConfig(a.broker, a.fleet, a.id, a.state, a.topic_root, a.encoding, a.ack_timeout)
    if profile:
        cfg = replace(
            cfg,
            ack_timeout_s=profile.outbox.ack_timeout_s,
            max_outbox=profile.outbox.max_items,
            keepalive_s=profile.mqtt.keepalive_s,
        )
    agent = DeviceAgent(cfg, shard.x, shard.y)
    if a.bundle:
        agent.seed(a.bundle)
    agent.run(_stop_on_signals())
    return 0


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
            f"{p.name:18} {p.target:13} {p.threads:>3} {b.max_cpu_percent:>5.0f} {b.max_rss_mb:>7} "
            f"{b.max_temp_c:>8.0f} {b.max_train_s_per_hour:>9}  {p.description}"
        )
    return 0


def cmd_flash(a: argparse.Namespace) -> int:
    from devices.flash import DeviceSettings, FlashError, flash
    from devices.profiles import ProfileError, load_profile

    try:
        profile = load_profile(a.profile, a.profile_file)
        pid = flash(a.bundle, profile, DeviceSettings(a.device_id, a.fleet, a.broker, a.data_path), a.to, a.wheels)
    except (FlashError, ProfileError) as e:
        print(f"edgelearn flash: error: {e}", file=sys.stderr)
        return 2
    print(f"installed package {pid} ({profile.name}, device {a.device_id}) into {a.to}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from edgelearn.demo import run_demo

    summaries = run_demo(a.devices, a.rounds, a.broker, a.workdir)
    return 0 if len(summaries) == a.rounds else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelearn",
        description="On-device edge learning: export a model, run a "
        "fleet of learning devices and a FedAvg coordinator over MQTT (protocol v1).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser(
        "export",
        help="distill, quantize and lower a model into a bundle",
        description="Train a teacher and a distilled student (and one without KD), prune, quantize "
        "(PT2E int8), lower to ExecuTorch (infer.pte + train.pte), measure every step into report.json "
        "and write a bundle directory atomically (docs/export.md).",
    )
    e.add_argument(
        "--model", default="digits-mlp", help="digits-mlp (default), char-lm, or a user model package.module:factory"
    )
    e.add_argument("--target", default="xnnpack-int8", help="xnnpack-int8 (default), xnnpack-fp32 or portable")
    e.add_argument("--text", type=Path, default=None, help="char-lm training text: UTF-8 file or directory")
    e.add_argument(
        "--sparsity",
        type=float,
        default=0.5,
        help="share of Linear weights magnitude pruning zeroes (default 0.5; 0 = off)",
    )
    e.add_argument(
        "--quant",
        choices=("static", "dynamic"),
        default=None,
        help="PT2E int8 mode for xnnpack-int8 (default: static for digits-mlp, dynamic for char-lm)",
    )
    e.add_argument(
        "--train-subset", default="all", help="what train.pte trains: all (default), last (last block + head), head"
    )
    e.add_argument(
        "--no-compare", action="store_true", help="skip the no-KD student and the other targets in the report"
    )
    e.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    e.add_argument(
        "--server-fraction",
        type=float,
        default=0.2,
        help="share of the training data the exporter trains on; devices hold the rest (default 0.2)",
    )
    e.add_argument(
        "--epochs", type=int, default=None, help="training epochs (default: the model's, 60 digits-mlp, 2 char-lm)"
    )
    e.add_argument("--alpha", type=float, default=0.5, help="KD weight of the hard-label loss (default 0.5)")
    e.add_argument("--temperature", type=float, default=4.0, help="KD temperature T (default 4)")
    e.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser(
        "data",
        help="write non-IID device shards of the digits data",
        description="Split the digits device pool into label-skewed shards (safetensors x, y).",
    )
    d.add_argument("--devices", type=int, default=4, help="number of shards (default 4)")
    d.add_argument("--out", type=Path, required=True, help="folder for device-K.safetensors and test.safetensors")
    d.add_argument("--server-fraction", type=float, default=0.2, help="as given to export (default 0.2)")
    d.add_argument("--classes-per-device", type=int, default=4, help="classes each device mostly holds (default 4)")
    d.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    d.set_defaults(func=cmd_data)

    c = sub.add_parser(
        "coordinator",
        help="run FedAvg rounds for a fleet",
        description="Publish BUNDLE as release 1, announce rounds, validate and ack updates, "
        "aggregate with FedAvg and publish each next release (protocol v1).",
    )
    c.add_argument("--broker", type=_broker, required=True, help="mqtt://[user[:pass]@]host[:port] or mqtts://")
    c.add_argument("--fleet", type=_fleet, required=True, help="fleet name ([A-Za-z0-9_-]{1,64})")
    c.add_argument("--bundle", type=Path, required=True, help="bundle directory of release 1")
    c.add_argument("--state", type=Path, required=True, help="state directory (releases, spool, round state)")
    c.add_argument("--min-updates", type=int, default=2, help="accepted updates that close a round (default 2)")
    c.add_argument("--round-timeout", type=float, default=60.0, help="round deadline in seconds (default 60)")
    c.add_argument("--steps", type=int, default=20, help="local SGD steps per round (default 20)")
    c.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    c.add_argument("--lr", type=float, default=0.05, help="local learning rate (default 0.05)")
    c.add_argument("--max-update-norm", type=float, default=1e3, help="reject updates with a larger L2 norm")
    c.add_argument("--max-samples-per-update", type=int, default=None, help="clip n_k in FedAvg weights")
    c.add_argument("--max-rounds", type=int, default=None, help="exit after this many rounds (default: never)")
    c.add_argument("--topic-root", default="edgelearn", help="first topic segment (default edgelearn)")
    c.set_defaults(func=cmd_coordinator)

    v = sub.add_parser(
        "device",
        help="run the device agent",
        description="Verify and activate releases, serve inference with ExecuTorch, train on "
        "local data when a round includes this device and send the update until acked.",
    )
    v.add_argument("--broker", type=_broker, required=True, help="mqtt://[user[:pass]@]host[:port] or mqtts://")
    v.add_argument("--fleet", type=_fleet, required=True, help="fleet name")
    v.add_argument("--id", type=_device_id, required=True, help="device id ([A-Za-z0-9_-]{1,64})")
    v.add_argument("--state", type=Path, required=True, help="state directory (releases, outbox, progress)")
    v.add_argument("--data", type=Path, required=True, help="local data: safetensors file with tensors x and y")
    v.add_argument("--encoding", choices=ENCODINGS, default="fp32", help="update encoding (default fp32)")
    v.add_argument("--ack-timeout", type=float, default=10.0, help="seconds before re-sending an unacked update")
    v.add_argument("--topic-root", default="edgelearn", help="first topic segment (default edgelearn)")
    v.add_argument("--bundle", type=Path, default=None, help="a local bundle to start from (e.g. the flashed one)")
    v.add_argument("--profile", default=None, help="device profile name (see `edgelearn profiles`)")
    v.add_argument("--profile-file", type=Path, default=None, help="TOML file overriding profile fields")
    v.set_defaults(func=cmd_device)

    k = sub.add_parser(
        "keys",
        help="generate an ed25519 key pair for signed releases",
        description="Write release.key (coordinator: signs releases) and release.pub (devices: "
        "refuse releases not signed by it).",
    )
    k.add_argument("--out", type=Path, required=True, help="folder for release.key and release.pub")
    k.add_argument("--force", action="store_true", help="replace an existing key pair")
    k.set_defaults(func=cmd_keys)

    pr = sub.add_parser(
        "profiles",
        help="list device profiles, or show one resolved",
        description="Built-in profiles: devices/profiles/*.toml. A user file (--file) overrides "
        "any field of its `base` profile.",
    )
    pr.add_argument("show", nargs="?", default=None, help="profile to print as TOML")
    pr.add_argument("--file", type=Path, default=None, help='user profile file (with base = "NAME")')
    pr.set_defaults(func=cmd_profiles)

    f = sub.add_parser(
        "flash",
        help="build a deploy package and install it into a root folder or over ssh",
        description="Package the bundle, device config, a systemd unit and install.sh; install it "
        "into TARGET (a mounted SD-card root or any folder) or on user@host via rsync + ssh.",
    )
    f.add_argument("--profile", default="", help="device profile (rpi4, rpi5, jetson-orin-nano, ...)")
    f.add_argument("--profile-file", type=Path, default=None, help="TOML file overriding profile fields")
    f.add_argument("--bundle", type=Path, required=True, help="bundle directory to ship")
    f.add_argument("--device-id", type=_device_id, required=True, help="the device's id")
    f.add_argument("--fleet", type=_fleet, default="default", help="fleet name (default: default)")
    f.add_argument("--broker", type=_broker, required=True, help="broker URL the device connects to")
    f.add_argument("--data-path", default="/var/lib/edgelearn/data.safetensors", help="local data file on device")
    f.add_argument("--wheels", type=Path, default=None, help="folder of wheels to install edgelearn offline")
    f.add_argument("--to", required=True, help="TARGET: a folder (root file system) or user@host")
    f.set_defaults(func=cmd_flash)

    m = sub.add_parser(
        "demo",
        help="run a whole fleet end to end on one machine",
        description="Export the digits model, start a broker, a coordinator and N devices with "
        "non-IID data, and run FedAvg rounds, printing accuracy per round.",
    )
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, quiet=args.command == "demo")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

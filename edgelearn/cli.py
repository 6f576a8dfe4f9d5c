"""`edgelearn` command line: export, data, coordinator, fleet, broker, device, demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
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
    from export import ExportError
    from export.pipeline import ExportConfig, export_bundle

    cfg = ExportConfig(a.model, a.target, a.server_fraction, a.epochs, a.alpha, a.temperature, a.seed)
    try:
        m = export_bundle(cfg, a.out)
    except ExportError as e:
        print(f"edgelearn export: error: {e}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{name} ({meta['bytes']} B)" for name, meta in m.files.items())
    print(
        f"bundle {a.out}: {m.model_id} v{m.version} {m.target}, accuracy {m.metrics['accuracy_pte']:.3f}, files {sizes}"
    )
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    from edgelearn.demo import write_shards

    paths = write_shards(a.out, a.devices, a.server_fraction, a.classes_per_device, a.seed)
    print(f"wrote {len(paths)} device shards and test.safetensors to {a.out}")
    return 0


def _coordinator_config(a: argparse.Namespace):
    from coordinator.aggregate import DpConfig
    from coordinator.config import CoordinatorConfig
    from coordinator.optim import ServerOptConfig
    from coordinator.selection import Eligibility

    return CoordinatorConfig(
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
        mode=a.mode,
        buffer_size=a.buffer_size,
        max_staleness=a.max_staleness,
        aggregator=a.aggregator,
        trim_fraction=a.trim_fraction,
        clip_norm=a.clip_norm,
        dp=DpConfig(a.dp_clip, a.dp_noise) if a.dp_clip else None,
        server_opt=ServerOptConfig(a.server_opt, a.server_lr, a.server_momentum),
        keep_releases=a.keep_releases,
        metrics_port=a.metrics_port,
        metrics_addr=a.metrics_addr,
        target_participants=a.participants,
        over_selection=a.over_selection,
        eligibility=tuple(Eligibility.parse(r) for r in a.eligible),
    )


def cmd_rollback(a: argparse.Namespace) -> int:
    from coordinator.ops import OpsError, rollback
    from coordinator.server import StateLockedError
    from export.pipeline import rebuild_bundle

    if a.state is None or a.to is None:
        print("edgelearn coordinator rollback: error: --state and --to are required", file=sys.stderr)
        return 2
    try:
        m = rollback(a.state, a.to, rebuild_bundle)
    except (OpsError, StateLockedError) as e:
        print(f"edgelearn coordinator rollback: error: {e}", file=sys.stderr)
        return 2
    print(f"release v{m.version} now carries the weights of v{a.to}; start the coordinator to publish it")
    return 0


def cmd_coordinator(a: argparse.Namespace) -> int:
    if a.action == "rollback":
        return cmd_rollback(a)
    from coordinator.server import Coordinator, StateLockedError
    from edgelearn.bundle import BundleError, verify_bundle
    from export.pipeline import rebuild_bundle

    missing = [f"--{n}" for n in ("broker", "fleet", "bundle", "state") if getattr(a, n) is None]
    if missing:
        print(f"edgelearn coordinator: error: the following arguments are required: {', '.join(missing)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        verify_bundle(a.bundle)
        cfg = _coordinator_config(a)
        coord = Coordinator(cfg, rebuild_bundle)
    except (BundleError, ValueError, StateLockedError) as e:
        print(f"edgelearn coordinator: error: {e}", file=sys.stderr)
        return 2
    coord.run(_stop_on_signals())
    return 0


def cmd_fleet(a: argparse.Namespace) -> int:
    from coordinator.ops import OpsError, fleet_rounds_lines, fleet_status_lines

    try:
        lines = fleet_status_lines(a.state) if a.what == "status" else fleet_rounds_lines(a.state, a.limit)
    except OpsError as e:
        print(f"edgelearn fleet: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def cmd_broker(a: argparse.Namespace) -> int:
    from edgelearn.broker import mosquitto_config, size_broker

    try:
        sizing = size_broker(a.devices, a.model_bytes, a.release_bytes)
    except ValueError as e:
        print(f"edgelearn broker config: error: {e}", file=sys.stderr)
        return 2
    text = mosquitto_config(a.port, a.data_dir, sizing.max_queued_messages, sizing.max_packet_bytes, a.bind)
    if a.out:
        a.out.write_text(text)
        backlog_mib = sizing.backlog_bytes / 2**20
        print(
            f"wrote {a.out}: max_queued_messages {sizing.max_queued_messages}, "
            f"max_packet_size {sizing.max_packet_bytes}, backlog up to {backlog_mib:.0f} MiB"
        )
    else:
        print(text, end="")
    return 0


def cmd_device(a: argparse.Namespace) -> int:
    from edge_runtime.agent import DeviceAgent, DeviceConfig
    from edgelearn.demo import load_shard

    try:
        shard = load_shard(a.data)
    except (OSError, ValueError) as e:
        print(f"edgelearn device: error: cannot read --data {a.data}: {e}", file=sys.stderr)
        return 2
    cfg = DeviceConfig(a.broker, a.fleet, a.id, a.state, a.topic_root, a.encoding, a.ack_timeout)
    DeviceAgent(cfg, shard.x, shard.y).run(_stop_on_signals())
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from edgelearn.demo import run_demo

    summaries = run_demo(a.devices, a.rounds, a.broker, a.workdir)
    return 0 if len(summaries) == a.rounds else 1


def _add_coordinator_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "coordinator",
        help="run FedAvg rounds for a fleet (or: coordinator rollback --to V)",
        description="Publish BUNDLE as release 1, announce rounds, validate and ack updates, "
        "aggregate with FedAvg and publish each next release (protocol v1). "
        "`edgelearn coordinator rollback --to V --state DIR` republishes kept release V as a new version.",
    )
    c.add_argument("action", nargs="?", choices=("run", "rollback"), default="run", help="run (default) or rollback")
    c.add_argument("--to", type=int, default=None, help="rollback: the kept release version to return to")
    c.add_argument("--broker", type=_broker, default=None, help="mqtt://[user[:pass]@]host[:port] or mqtts://")
    c.add_argument("--fleet", type=_fleet, default=None, help="fleet name ([A-Za-z0-9_-]{1,64})")
    c.add_argument("--bundle", type=Path, default=None, help="bundle directory of release 1")
    c.add_argument("--state", type=Path, default=None, help="state directory (releases, spool, state.sqlite)")
    c.add_argument("--min-updates", type=int, default=2, help="accepted updates that close a round (default 2)")
    c.add_argument("--round-timeout", type=float, default=60.0, help="round deadline in seconds (default 60)")
    c.add_argument("--steps", type=int, default=20, help="local SGD steps per round (default 20)")
    c.add_argument("--batch-size", type=int, default=32, help="local batch size (default 32)")
    c.add_argument("--lr", type=float, default=0.05, help="local learning rate (default 0.05)")
    c.add_argument("--max-update-norm", type=float, default=1e3, help="reject updates with a larger L2 norm")
    c.add_argument("--max-samples-per-update", type=int, default=None, help="clip n_k in FedAvg weights")
    c.add_argument("--max-rounds", type=int, default=None, help="exit after this many rounds (default: never)")
    c.add_argument("--topic-root", default="edgelearn", help="first topic segment (default edgelearn)")
    c.add_argument("--mode", choices=("sync", "async"), default="sync", help="rounds (default) or FedBuff")
    c.add_argument("--buffer-size", type=int, default=10, help="async: aggregate every K updates (default 10)")
    c.add_argument("--max-staleness", type=int, default=4, help="async: max versions behind (default 4)")
    c.add_argument(
        "--aggregator", choices=("mean", "median", "trimmed_mean"), default="mean", help="default: streaming mean"
    )
    c.add_argument("--trim-fraction", type=float, default=0.1, help="trimmed_mean: share cut at each end")
    c.add_argument("--clip-norm", type=float, default=None, help="clip each update to this L2 norm")
    c.add_argument("--dp-clip", type=float, default=None, help="central DP: clip norm C (enables DP)")
    c.add_argument("--dp-noise", type=float, default=1.0, help="central DP: noise multiplier σ (default 1)")
    c.add_argument("--server-opt", choices=("fedavg", "fedavgm", "fedadam"), default="fedavg")
    c.add_argument("--server-lr", type=float, default=1.0, help="server learning rate η (default 1)")
    c.add_argument("--server-momentum", type=float, default=0.9, help="fedavgm momentum β (default 0.9)")
    c.add_argument("--keep-releases", type=int, default=5, help="release versions kept for rollback (default 5)")
    c.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    c.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    c.add_argument("--participants", type=int, default=None, help="sync: invite this many online devices")
    c.add_argument("--over-selection", type=float, default=1.3, help="invite ⌈participants × this⌉ (default 1.3)")
    c.add_argument("--eligible", action="append", default=[], help="rule on device status, e.g. battery_percent>=20")
    c.set_defaults(func=cmd_coordinator)


def _add_ops_parsers(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fleet", help="show devices or rounds from a coordinator's state directory")
    f.add_argument("what", choices=("status", "rounds"), help="status: devices; rounds: per-round outcomes")
    f.add_argument("--state", type=Path, required=True, help="the coordinator's state directory")
    f.add_argument("--limit", type=int, default=20, help="rounds: how many recent rounds (default 20)")
    f.set_defaults(func=cmd_fleet)

    b = sub.add_parser("broker", help="write a mosquitto configuration sized for a fleet")
    b.add_argument("what", choices=("config",), help="config: print or write mosquitto.conf")
    b.add_argument("--devices", type=int, required=True, help="fleet size")
    b.add_argument("--model-bytes", type=int, required=True, help="bytes of the model's float32 weights")
    b.add_argument("--release-bytes", type=int, default=None, help="bytes of a release archive (default 4× model)")
    b.add_argument("--port", type=int, default=1883, help="listener port (default 1883)")
    b.add_argument("--bind", default="127.0.0.1", help="listener address (default 127.0.0.1; anonymous access)")
    b.add_argument("--data-dir", type=Path, default=Path("/var/lib/mosquitto"), help="persistence folder")
    b.add_argument("--out", type=Path, default=None, help="file to write (default: print)")
    b.set_defaults(func=cmd_broker)


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
        description="Train a teacher and a distilled student, quantize (PT2E int8), lower to "
        "ExecuTorch (infer.pte + train.pte) and write a bundle directory atomically.",
    )
    e.add_argument("--model", default="digits-mlp", help="model id (default: digits-mlp)")
    e.add_argument("--target", default="xnnpack-int8", help="xnnpack-int8 (default), xnnpack-fp32 or portable")
    e.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    e.add_argument(
        "--server-fraction",
        type=float,
        default=0.2,
        help="share of the training data the exporter trains on; devices hold the rest (default 0.2)",
    )
    e.add_argument("--epochs", type=int, default=60, help="training epochs for teacher and student (default 60)")
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

    _add_coordinator_parser(sub)
    _add_ops_parsers(sub)

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
    v.set_defaults(func=cmd_device)

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

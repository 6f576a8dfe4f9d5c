"""`edgelearn` command line: export, data, coordinator, device, demo."""

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


BUDGET_OPTIONS = {  # CLI option dest -> Budget field
    "max_cpu": "max_cpu_percent",
    "max_rss_mb": "max_rss_mb",
    "min_available_mb": "min_available_mb",
    "max_temp_c": "max_temperature_c",
    "min_battery": "min_battery_percent",
    "max_train_s_per_hour": "max_train_s_per_hour",
    "threads": "threads",
    "monitor_interval": "interval_s",
}


def _budget(a: argparse.Namespace):
    """The profile's budget with every option the user gave on top ('off' disables a limit)."""
    from dataclasses import replace

    from edge_runtime.budget import PROFILES

    given = {field: getattr(a, dest) for dest, field in BUDGET_OPTIONS.items() if getattr(a, dest) is not _UNSET}
    return replace(PROFILES[a.budget_profile], **{k: None if v == "off" else v for k, v in given.items()})


def cmd_device(a: argparse.Namespace) -> int:
    from edge_runtime.agent import DeviceAgent, DeviceConfig
    from edgelearn.demo import load_shard

    x = y = None
    if a.data is not None:
        try:
            shard = load_shard(a.data)
        except (OSError, ValueError) as e:
            print(f"edgelearn device: error: cannot read --data {a.data}: {e}", file=sys.stderr)
            return 2
        x, y = shard.x, shard.y
    try:
        budget = _budget(a)
    except ValueError as e:
        print(f"edgelearn device: error: {e}", file=sys.stderr)
        return 2
    cfg = DeviceConfig(
        a.broker,
        a.fleet,
        a.id,
        a.state,
        a.topic_root,
        a.encoding,
        a.ack_timeout,
        budget=budget,
        engine=a.engine,
        samples=a.samples,
        mu=a.mu,
        replay_size=a.replay_size,
        max_store_samples=a.max_store_samples,
    )
    DeviceAgent(cfg, x, y).run(_stop_on_signals())
    return 0


_UNSET = object()


def _add_budget_options(v: argparse.ArgumentParser) -> None:
    from edge_runtime.budget import PROFILES

    def limit(value: str) -> float | str:
        if value.lower() == "off":
            return "off"
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'off', got {value!r}") from None

    g = v.add_argument_group("budget (defaults from --budget-profile; a limit of 'off' disables it)")
    g.add_argument("--budget-profile", choices=sorted(PROFILES), default="default", help="base budget (default)")
    g.add_argument("--max-cpu", type=limit, default=_UNSET, help="max CPU %% used by other processes")
    g.add_argument("--max-rss-mb", type=limit, default=_UNSET, help="max RSS of this process in MB")
    g.add_argument("--min-available-mb", type=limit, default=_UNSET, help="min available memory in MB")
    g.add_argument("--max-temp-c", type=limit, default=_UNSET, help="max sensor temperature in °C")
    g.add_argument("--min-battery", type=limit, default=_UNSET, help="min battery %% unless charging")
    g.add_argument("--max-train-s-per-hour", type=limit, default=_UNSET, help="training seconds per hour")
    g.add_argument("--threads", type=int, default=_UNSET, help="training threads")
    g.add_argument("--monitor-interval", type=float, default=_UNSET, help="seconds between readings")


def cmd_learn(a: argparse.Namespace) -> int:
    import json

    from edge_runtime.local import LocalConfig, LocalRun
    from edgelearn.bundle import BundleError

    try:
        cfg = LocalConfig(
            a.bundle,
            a.state,
            a.samples,
            a.steps,
            a.batch_size,
            a.lr,
            a.mu,
            a.engine,
            _budget(a),
            checkpoint_every_s=a.checkpoint_every,
        )
        run = LocalRun(cfg)
    except (BundleError, ValueError) as e:
        print(f"edgelearn learn: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({"event": "start", "resumed_at_step": run.resumed_at, "engine": run.engine.name}), flush=True)
    job = run.run(_stop_on_signals())
    print(
        json.dumps(
            {
                "event": "end",
                "steps_done": job.steps_done,
                "loss": job.loss,
                "malformed": run.ingest.malformed,
                "stored": len(run.store),
            }
        ),
        flush=True,
    )
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
    v.add_argument("--data", type=Path, default=None, help="fixed local data: safetensors file with tensors x and y")
    v.add_argument("--samples", default=None, help="sample stream: JSON-lines file, folder of *.jsonl, or - (stdin)")
    v.add_argument(
        "--engine",
        choices=("eager", "executorch"),
        default=None,
        help="training engine (default: the faster one for the model)",
    )
    v.add_argument("--mu", type=float, default=0.0, help="proximal term μ/2‖θ − θ_global‖² (default 0)")
    v.add_argument("--replay-size", type=int, default=2000, help="replay buffer rows (default 2000)")
    v.add_argument("--max-store-samples", type=int, default=20000, help="sample store bound (default 20000)")
    _add_budget_options(v)
    v.add_argument("--encoding", choices=ENCODINGS, default="fp32", help="update encoding (default fp32)")
    v.add_argument("--ack-timeout", type=float, default=10.0, help="seconds before re-sending an unacked update")
    v.add_argument("--topic-root", default="edgelearn", help="first topic segment (default edgelearn)")
    v.set_defaults(func=cmd_device)

    n = sub.add_parser(
        "learn",
        help="learn locally from a sample stream (no coordinator)",
        description="Train a bundle's model on a JSON-lines sample stream within a resource budget, "
        "checkpointing crash-safely; writes STATE/local-weights.safetensors when done.",
    )
    n.add_argument("--bundle", type=Path, required=True, help="bundle directory")
    n.add_argument("--state", type=Path, required=True, help="state directory (sample store, checkpoint)")
    n.add_argument("--samples", default=None, help="JSON-lines file, folder of *.jsonl, or - (stdin)")
    n.add_argument("--steps", type=int, required=True, help="SGD steps to take")
    n.add_argument("--batch-size", type=int, default=32, help="batch size (default 32)")
    n.add_argument("--lr", type=float, default=0.05, help="learning rate (default 0.05)")
    n.add_argument("--mu", type=float, default=0.0, help="proximal term μ (default 0)")
    n.add_argument(
        "--engine",
        choices=("eager", "executorch"),
        default=None,
        help="training engine (default: the faster one for the model)",
    )
    n.add_argument("--checkpoint-every", type=float, default=5.0, help="seconds between checkpoints (default 5)")
    _add_budget_options(n)
    n.set_defaults(func=cmd_learn)

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

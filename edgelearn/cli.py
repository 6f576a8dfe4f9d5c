"""`edgelearn` command line: export, data, coordinator, fleet, broker, device, demo."""

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
    from edgelearn.signing import ensure_signed, load_private, signing_rebuild
    from export.pipeline import rebuild_bundle

    missing = [f"--{n}" for n in ("broker", "fleet", "bundle", "state") if getattr(a, n) is None]
    if missing:
        print(f"edgelearn coordinator: error: the following arguments are required: {', '.join(missing)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        verify_bundle(a.bundle)
        cfg = _coordinator_config(a)
        key = load_private(a.signing_key) if a.signing_key else None
        coord = Coordinator(cfg, signing_rebuild(rebuild_bundle, key) if key else rebuild_bundle)
        if key:  # release 1 (imported from --bundle) is signed too, before anything is published
            ensure_signed(coord.engine.release_dir(coord.engine.version), key)
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


def _budget(a: argparse.Namespace, profile: object | None = None):
    """The device profile's (else --budget-profile's) budget, with every option given on top ('off' disables)."""
    from devices.profiles import runtime_budget
    from edge_runtime.budget import PROFILES

    base = runtime_budget(profile) if profile is not None else PROFILES[a.budget_profile]  # type: ignore[arg-type]
    given = {field: getattr(a, dest) for dest, field in BUDGET_OPTIONS.items() if getattr(a, dest) is not _UNSET}
    return replace(base, **{k: None if v == "off" else v for k, v in given.items()})


def cmd_device(a: argparse.Namespace) -> int:
    from devices.profiles import ProfileError, load_profile
    from edge_runtime.agent import DeviceAgent, DeviceConfig
    from edgelearn.bundle import BundleError, verify_bundle
    from edgelearn.demo import load_shard
    from edgelearn.signing import load_public

    x = y = None
    if a.data is not None:
        try:
            shard = load_shard(a.data)
        except (OSError, ValueError) as e:
            print(f"edgelearn device: error: cannot read --data {a.data}: {e}", file=sys.stderr)
            return 2
        x, y = shard.x, shard.y
    try:
        profile = load_profile(a.profile, a.profile_file) if (a.profile or a.profile_file) else None
        budget = _budget(a, profile)
        if a.bundle:
            verify_bundle(a.bundle)
        if a.public_key:
            load_public(a.public_key)
    except (OSError, ValueError, ProfileError, BundleError) as e:
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
        public_key_path=a.public_key,
    )
    if profile:
        cfg = replace(
            cfg,
            ack_timeout_s=profile.outbox.ack_timeout_s,
            max_outbox=profile.outbox.max_items,
            keepalive_s=profile.mqtt.keepalive_s,
        )
    agent = DeviceAgent(cfg, x, y)
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
    c.add_argument(
        "--signing-key", type=Path, default=None, help="sign every release with this ed25519 key (edgelearn keys)"
    )
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
    v.add_argument("--bundle", type=Path, default=None, help="a local bundle to start from (e.g. the flashed one)")
    v.add_argument("--profile", default=None, help="device profile name (see `edgelearn profiles`)")
    v.add_argument("--profile-file", type=Path, default=None, help="TOML file overriding profile fields")
    v.add_argument("--public-key", type=Path, default=None, help="signed fleet: refuse releases not signed by it")
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

"""Commands of the coordinator side: `coordinator` (and `coordinator rollback`), `fleet`, `broker`."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from cli.common import (
    add_recipe_options,
    add_tls_options,
    broker_url,
    device_id,
    fleet_name,
    recipe,
    stop_on_signals,
    with_tls,
)
from edgelearn.broker import is_loopback as is_loopback_host
from edgelearn.protocol import DEFAULT_LOCAL


def _coordinator_config(a: argparse.Namespace, model_id: str = ""):
    """The coordinator's settings from its options; `model_id` (the bundle's) picks the default server optimizer."""
    from coordinator.aggregate import DpConfig
    from coordinator.config import CoordinatorConfig
    from coordinator.optim import default_server_opt
    from coordinator.rollout import CanaryConfig
    from coordinator.selection import Eligibility

    return CoordinatorConfig(
        with_tls(a.broker, a),
        a.fleet,
        a.bundle,
        a.state,
        a.topic_root,
        a.min_updates if a.min_updates is not None else (a.participants or 2),
        a.round_timeout,
        recipe(a, DEFAULT_LOCAL),
        a.max_update_norm,
        a.max_samples_per_update,
        a.max_rounds,
        mode=a.mode,
        buffer_size=a.buffer_size,
        max_staleness=a.max_staleness,
        aggregator=a.aggregator,
        trim_fraction=a.trim_fraction,
        clip_norm=a.clip_norm,
        clip_to_median=a.clip_to_median or None,
        dp=DpConfig(a.dp_clip, a.dp_noise) if a.dp_clip is not None else None,
        server_opt=default_server_opt(model_id, name=a.server_opt, lr=a.server_lr, momentum=a.server_momentum),
        keep_releases=a.keep_releases,
        metrics_port=a.metrics_port,
        metrics_addr=a.metrics_addr,
        target_participants=a.participants,
        over_selection=a.over_selection,
        eligibility=tuple(Eligibility.parse(r) for r in a.eligible),
        canary=CanaryConfig(
            max(1, a.canary),
            a.canary_hold,
            a.canary_max_loss_rise,
            a.canary_timeout,
            a.canary_share,
            tuple(a.canary_devices),
        )
        if a.canary or a.canary_share or a.canary_devices
        else None,
    )


def relower(*args: Any, **kwargs: Any) -> Any:
    """export.pipeline.rebuild_bundle, imported only when a bundle of format 1 needs its programs lowered again
    (the coordinator otherwise never loads the exporter)."""
    from export.pipeline import rebuild_bundle

    return rebuild_bundle(*args, **kwargs)


def cmd_rollback(a: argparse.Namespace) -> int:
    from coordinator.ops import OpsError, rollback
    from coordinator.release import release_builder
    from coordinator.state import StateLockedError

    if a.state is None or a.to is None:
        print("edgelearn coordinator rollback: error: --state and --to are required", file=sys.stderr)
        return 2
    try:
        m = rollback(a.state, a.to, release_builder(relower))
    except (OpsError, StateLockedError) as e:
        print(f"edgelearn coordinator rollback: error: {e}", file=sys.stderr)
        return 2
    print(f"release v{m.version} now carries the weights of v{a.to}; start the coordinator to publish it")
    return 0


def cmd_coordinator(a: argparse.Namespace) -> int:
    if a.action == "rollback":
        return cmd_rollback(a)
    from coordinator.release import release_builder, warm_up
    from coordinator.server import Coordinator
    from coordinator.state import StateLockedError
    from edgelearn.bundle import BundleError, verify_bundle
    from edgelearn.signing import ensure_signed, load_private, sign_message, signing_rebuild

    missing = [f"--{n}" for n in ("broker", "fleet", "bundle", "state") if getattr(a, n) is None]
    if missing:
        print(f"edgelearn coordinator: error: the following arguments are required: {', '.join(missing)}",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        cfg = _coordinator_config(a, verify_bundle(a.bundle).model_id)
        key = load_private(a.signing_key) if a.signing_key else None
        rebuild = release_builder(relower, delta=a.delta_releases, fleet=a.fleet)
        signer = (lambda payload, topic: sign_message(payload, topic, key)) if key else None
        coord = Coordinator(cfg, signing_rebuild(rebuild, key) if key else rebuild, sign=signer)
        warm_up(coord.rounds.release_dir(coord.rounds.version), coord.rounds.manifest.model_id)
        if key:  # release 1 (imported from --bundle) is signed too, before anything is published
            ensure_signed(coord.rounds.release_dir(coord.rounds.version), key)
    except (BundleError, ValueError, StateLockedError) as e:
        print(f"edgelearn coordinator: error: {e}", file=sys.stderr)
        return 2
    coord.run(stop_on_signals())
    return 0


def cmd_fleet(a: argparse.Namespace) -> int:
    from coordinator.ops import OpsError, fleet_rollout_lines, fleet_rounds_lines, fleet_status_lines

    try:
        if a.what == "rollout":
            lines = fleet_rollout_lines(a.state, "promote" if a.promote else "abort" if a.abort else None)
        else:
            lines = fleet_status_lines(a.state) if a.what == "status" else fleet_rounds_lines(a.state, a.limit)
    except OpsError as e:
        print(f"edgelearn fleet: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def cmd_dashboard(a: argparse.Namespace) -> int:
    from coordinator.dashboard import serve_dashboard

    if not is_loopback_host(a.bind) and not a.remote:
        print(f"edgelearn dashboard: error: --bind {a.bind} is not loopback; the page has no login "
              "(pass --remote to accept that, or put it behind your proxy)", file=sys.stderr)  # fmt: skip
        return 2
    try:
        server = serve_dashboard(a.state, a.bind, a.port)
    except (FileNotFoundError, OSError) as e:
        print(f"edgelearn dashboard: error: {e}", file=sys.stderr)
        return 2
    port = server.server_address[1]
    print(f"dashboard of {a.state} on http://{a.bind}:{port}/ (Ctrl-C stops)", flush=True)
    stop_on_signals().wait()
    server.shutdown()
    return 0


def cmd_broker(a: argparse.Namespace) -> int:
    from edgelearn.broker import MutualTls, bridge_config, fleet_acl, mosquitto_config, size_broker, write_accounts

    try:
        tls_files = (a.tls_cert, a.tls_key, a.cafile)
        if any(tls_files) and not all(tls_files):
            raise ValueError("mutual TLS needs --tls-cert, --tls-key and --cafile together (edgelearn pki makes them)")
        tls = MutualTls(a.tls_cert, a.tls_key, a.cafile) if all(tls_files) else None
        if a.acl_out and not a.fleet:
            raise ValueError("--acl-out needs --fleet (the ACL is written for one fleet's topics)")
        sizing = size_broker(a.devices, a.model_bytes, a.release_bytes)
        acl = a.acl_file or a.acl_out
        password_file = a.password_file
        if a.accounts_out:
            if not a.device_ids or a.password_file:
                raise ValueError("--accounts-out needs --device-ids FILE (one id per line) and no --password-file")
            ids = [d.strip() for d in a.device_ids.read_text().splitlines() if d.strip()]
            password_file = write_accounts(a.accounts_out, [*ids, *a.relays])
            print(f"wrote {password_file} and {a.accounts_out / 'accounts.txt'} (0600): 'coordinator' and "
                  f"{len(ids)} device and {len(a.relays)} relay accounts with random passwords")  # fmt: skip
        text = mosquitto_config(a.port, a.data_dir, sizing, a.bind, password_file, acl, tls)
        if a.bridge_to:
            if not (a.fleet and a.site):
                raise ValueError("--bridge-to needs --fleet and --site (the relay whose topics cross the bridge)")
            text += bridge_config(a.bridge_to, a.fleet, a.site, a.topic_root, sizing)
        if a.acl_out:
            a.acl_out.write_text(fleet_acl(a.fleet, a.topic_root, relays=tuple(a.relays)))
            print(f"wrote {a.acl_out}: the coordinator account 'coordinator', one account per device id"
                  + "".join(f", relay {r}" for r in a.relays))  # fmt: skip
    except (ValueError, OSError, subprocess.CalledProcessError) as e:
        print(f"edgelearn broker config: error: {e}", file=sys.stderr)
        return 2
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
    c.add_argument("--broker", type=broker_url, default=None, help="mqtt://[user[:pass]@]host[:port] or mqtts://")
    add_tls_options(c)
    c.add_argument("--fleet", type=fleet_name, default=None, help="fleet name ([A-Za-z0-9_-]{1,64})")
    c.add_argument("--bundle", type=Path, default=None, help="bundle directory of release 1")
    c.add_argument("--state", type=Path, default=None, help="state directory (releases, spool, state.sqlite)")
    c.add_argument("--min-updates", type=int, default=None,
                   help="accepted updates that close a round (default: --participants, else 2)")  # fmt: skip
    c.add_argument("--round-timeout", type=float, default=60.0, help="round deadline in seconds (default 60)")
    add_recipe_options(
        c,
        f"{DEFAULT_LOCAL.steps} steps of {DEFAULT_LOCAL.batch_size} at lr {DEFAULT_LOCAL.lr}, "
        f"{DEFAULT_LOCAL.optimizer}",
    )
    c.add_argument("--max-update-norm", type=float, default=1e3, help="reject updates with a larger L2 norm")
    c.add_argument("--max-samples-per-update", type=int, default=None, help="clip n_k in FedAvg weights")
    c.add_argument("--max-rounds", type=int, default=None, help="exit after this many rounds (default: never)")
    c.add_argument(
        "--signing-key", type=Path, default=None, help="sign every release with this ed25519 key (edgelearn keys)"
    )
    c.add_argument("--topic-root", default="edgelearn", help="first topic segment (default edgelearn)")
    c.add_argument("--mode", choices=("sync", "async"), default="sync", help="rounds (default) or FedBuff")
    c.add_argument("--buffer-size", type=int, default=10, help="async: aggregate every K updates (default 10)")
    c.add_argument("--max-staleness", type=int, default=4,
                   help="oldest accepted base, in releases behind the current one; in rounds, later updates of "
                   "earlier rounds are folded with weight n·1/√(1+s) (default 4)")  # fmt: skip
    c.add_argument(
        "--aggregator", choices=("mean", "median", "trimmed_mean"), default="mean", help="default: streaming mean"
    )
    c.add_argument("--trim-fraction", type=float, default=0.1, help="trimmed_mean: share cut at each end")
    c.add_argument("--clip-norm", type=float, default=None, help="clip each update to this L2 norm")
    c.add_argument("--clip-to-median", type=float, default=3.0, metavar="K",
                   help="clip each update to K × the last round's median update norm (default 3; 0: off)")  # fmt: skip
    g = c.add_argument_group("canary rollouts (protocol v1.3; docs/coordinator.md)")
    g.add_argument("--canary", type=int, default=0, metavar="K",
                   help="try each new release on K online devices first (default 0: off)")  # fmt: skip
    g.add_argument("--canary-share", type=float, default=0.0, metavar="F",
                   help="or this share of the online devices, if more (e.g. 0.1)")  # fmt: skip
    g.add_argument("--canary-device", dest="canary_devices", action="append", default=[], metavar="ID",
                   help="a device to try releases on first (repeatable: e.g. each board type)")  # fmt: skip
    g.add_argument("--canary-hold", type=float, default=30.0, help="seconds a healthy trial lasts (default 30)")
    g.add_argument("--canary-max-loss-rise", type=float, default=0.05,
                   help="relative rise of the canaries' loss that aborts a trial (default 0.05)")  # fmt: skip
    g.add_argument("--canary-timeout", type=float, default=300.0,
                   help="seconds for every canary to run the release, else abort (default 300)")  # fmt: skip
    c.add_argument("--dp-clip", type=float, default=None, help="central DP: clip norm C (enables DP)")
    c.add_argument("--dp-noise", type=float, default=1.0, help="central DP: noise multiplier σ (default 1)")
    c.add_argument("--server-opt", choices=("fedavg", "fedavgm", "fedadam"), default=None,
                   help="server optimizer (default per model: fedavgm β 0.6 for char-lm, else fedavg)")  # fmt: skip
    c.add_argument("--server-lr", type=float, default=None, help="server learning rate η (default 1)")
    c.add_argument("--server-momentum", type=float, default=None, help="fedavgm momentum β (default 0.9; char-lm 0.6)")
    c.add_argument("--delta-releases", action="store_true",
                   help="send release weights as an int8 delta from the last (lossy; docs/protocol.md)")  # fmt: skip
    c.add_argument("--keep-releases", type=int, default=5, help="release versions kept for rollback (default 5)")
    c.add_argument("--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port")
    c.add_argument("--metrics-addr", default="127.0.0.1", help="address for --metrics-port (default 127.0.0.1)")
    c.add_argument("--participants", type=int, default=None, help="sync: invite this many online devices")
    c.add_argument("--over-selection", type=float, default=1.3, help="invite ⌈participants × this⌉ (default 1.3)")
    c.add_argument("--eligible", action="append", default=[], help="rule on device status, e.g. battery_percent>=20")
    c.set_defaults(func=cmd_coordinator)


def _add_ops_parsers(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("fleet", help="show devices or rounds from a coordinator's state directory")
    f.add_argument("what", choices=("status", "rounds", "rollout"),
                   help="status: devices; rounds: per-round outcomes; rollout: the release on trial")  # fmt: skip
    f.add_argument("--promote", action="store_true", help="rollout: promote the release on trial now")
    f.add_argument("--abort", action="store_true", help="rollout: abort the trial now (the canaries roll back)")
    f.add_argument("--state", type=Path, required=True, help="the coordinator's state directory")
    f.add_argument("--limit", type=int, default=20, help="rounds: how many recent rounds (default 20)")
    f.set_defaults(func=cmd_fleet)

    d = sub.add_parser("dashboard", help="serve the fleet page over a coordinator's state folder",
                       description="One page: rounds, release metrics, devices, releases; refreshes itself. "
                       "Read-only: run it beside a live coordinator.")  # fmt: skip
    d.add_argument("--state", type=Path, required=True, help="the coordinator's state directory")
    d.add_argument("--port", type=int, default=8080, help="port (default 8080; 0: any free one)")
    d.add_argument("--bind", default="127.0.0.1", help="address (default 127.0.0.1)")
    d.add_argument("--remote", action="store_true", help="allow a non-loopback --bind (the page has no login)")
    d.set_defaults(func=cmd_dashboard)

    b = sub.add_parser("broker", help="write a mosquitto configuration sized for a fleet")
    b.add_argument("what", choices=("config",), help="config: print or write mosquitto.conf")
    b.add_argument("--devices", type=int, required=True, help="fleet size")
    b.add_argument("--model-bytes", type=int, required=True, help="bytes of the model's float32 weights")
    b.add_argument("--release-bytes", type=int, default=None, help="bytes of a release archive (default 4× model)")
    b.add_argument("--port", type=int, default=1883, help="listener port (default 1883)")
    b.add_argument("--bind", default="127.0.0.1", help="listener address (default 127.0.0.1: anonymous access)")
    b.add_argument("--password-file", type=Path, default=None, help="mosquitto_passwd file (needed off loopback)")
    b.add_argument("--accounts-out", type=Path, default=None,
                   help="make accounts here: passwd (hashed, used by the config), accounts.txt (0600)")  # fmt: skip
    b.add_argument("--device-ids", type=Path, default=None, help="--accounts-out: file of device ids, one per line")
    b.add_argument("--acl-file", type=Path, default=None, help="mosquitto ACL file (topics per user)")
    b.add_argument("--acl-out", type=Path, default=None,
                   help="write the fleet's ACL here (from the protocol's topics; needs --fleet), use it")  # fmt: skip
    b.add_argument("--fleet", default=None, help="the fleet whose ACL --acl-out writes")
    b.add_argument("--topic-root", default="edgelearn", help="topic root of that fleet (default edgelearn)")
    b.add_argument("--tls-cert", type=Path, default=None, help="mutual TLS: the broker's certificate (edgelearn pki)")
    b.add_argument("--tls-key", type=Path, default=None, help="mutual TLS: the broker's private key")
    b.add_argument("--cafile", type=Path, default=None, help="mutual TLS: the fleet CA clients must be signed by")
    b.add_argument("--relay", dest="relays", action="append", default=[], metavar="SITE",
                   help="core broker: a site relay's account in --acl-out / --accounts-out (repeatable)")  # fmt: skip
    b.add_argument("--bridge-to", type=broker_url, default=None, metavar="URL",
                   help="site broker: bridge to the core broker at mqtts://SITE:PASSWORD@host?cafile=…&cert=…&key=… "
                   "(needs --fleet and --site; docs/scale.md)")  # fmt: skip
    b.add_argument("--site", type=device_id, default=None, help="--bridge-to: the relay id of this site")
    b.add_argument("--data-dir", type=Path, default=Path("/var/lib/mosquitto"), help="persistence folder")
    b.add_argument("--out", type=Path, default=None, help="file to write (default: print)")
    b.set_defaults(func=cmd_broker)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_coordinator_parser(sub)
    _add_ops_parsers(sub)

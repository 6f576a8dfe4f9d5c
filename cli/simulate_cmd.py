"""`edgelearn simulate`: rehearse a heterogeneous fleet (profiles, traces, outages) on one machine."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cli.common import add_recipe_options, add_tls_options, recipe, with_tls
from coordinator.optim import SERVER_OPT_NAMES


def _outage(text: str):
    """DEVICE:ROUND:SECONDS → Outage."""
    from devices.simulate.fleet import Outage

    try:
        dev, rnd, secs = text.split(":")
        return Outage(dev, int(rnd), float(secs))
    except ValueError:
        raise argparse.ArgumentTypeError(f"outage {text!r}: expected DEVICE:ROUND:SECONDS, e.g. sim0003:1:2") from None


def _rule(text: str):
    from coordinator.selection import Eligibility

    try:
        return Eligibility.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _mix(text: str) -> tuple[tuple[str, float], ...]:
    from devices.profiles import ProfileError, load_profile
    from devices.simulate.fleet import parse_mix

    try:
        mix = parse_mix(text)
        for name, _ in mix:
            load_profile(name)
    except (ValueError, ProfileError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return tuple(mix)


def _local(a: argparse.Namespace):
    """The model's default local recipe with the options given on the command line."""
    from devices.simulate.run import LOCAL_DEFAULTS

    return recipe(a, LOCAL_DEFAULTS[a.model])


def _server_opt(a: argparse.Namespace):
    """The model's default server optimizer, with the fields given."""
    from coordinator.optim import default_server_opt

    return default_server_opt(a.model, name=a.server_opt, lr=a.server_lr, momentum=a.server_momentum)


def cmd_simulate(a: argparse.Namespace) -> int:
    from devices.simulate.run import SimConfig, simulate

    try:
        local_broker = a.broker in ("embedded", "mosquitto")
        if local_broker and (a.cafile or a.cert or a.key):
            raise ValueError(f"--cafile/--cert/--key need an mqtts:// --broker, not {a.broker!r}")
        broker = a.broker if local_broker else with_tls(a.broker, a)
        cfg = SimConfig(
            devices=a.devices, profiles=a.profiles, rounds=a.rounds, broker=broker, out=a.out, bundle=a.bundle,
            model=a.model, text=a.text, online=a.online, participants=a.participants,
            eligibility=tuple(a.eligible), min_updates=a.min_updates, alpha=a.alpha, local=_local(a),
            server_opt=_server_opt(a), clip_to_median=a.clip_to_median or None,
            round_timeout_s=a.round_timeout,
            outages=tuple(a.outage), outage_rate=a.outage_rate, hot=tuple(a.hot), seed=a.seed, sites=a.sites,
        )  # fmt: skip
    except (ValueError, OSError) as e:  # OSError: e.g. --broker mosquitto without mosquitto installed
        print(f"edgelearn simulate: error: {e}", file=sys.stderr)
        return 2
    if not a.verbose:  # budget pauses and late-update rejections are counted in the report, not logged
        for name in ("edge_runtime", "coordinator", "edgelearn.mqtt"):
            logging.getLogger(name).setLevel(logging.ERROR)
    report = simulate(cfg, say=lambda s: print(s, flush=True))
    return 0 if len(report["rounds"]) == a.rounds else 1


def _add_round_options(s: argparse.ArgumentParser) -> None:
    """Who is online, who is invited, and what closes a round."""
    s.add_argument(
        "--online",
        metavar="K",
        type=int,
        default=None,
        help="devices online per round, a random cohort (default: all devices, online all the time)",
    )
    s.add_argument(
        "--participants",
        metavar="K",
        type=int,
        default=None,
        help="the coordinator invites ⌈1.3·K⌉ eligible online devices per round (default: all online)",
    )
    s.add_argument(
        "--eligible",
        metavar="RULE",
        type=_rule,
        action="append",
        default=[],
        help="coordinator eligibility rule on device status, e.g. 'battery_percent>=30' (repeatable)",
    )
    s.add_argument("--min-updates", type=int, default=None,
                   help="updates that close a round (default ⌈0.6·K⌉ of --participants K, else of the "
                        "online devices)")  # fmt: skip


def add_parsers(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "simulate",
        help="rehearse a heterogeneous fleet on one machine and write a report",
        description="Run a coordinator and N simulated devices (profile budgets, resource traces, link "
        "delay, outages, non-IID data) for R rounds; write report.json and PNG plots to --out.",
    )
    s.add_argument("--devices", type=int, default=20, help="devices in the fleet (default 20)")
    s.add_argument("--profiles", type=_mix, default="rpi4:0.5,rpi5:0.3,jetson-orin-nano:0.2",
                   help="profile mix NAME:WEIGHT,... (default rpi4:0.5,rpi5:0.3,jetson-orin-nano:0.2)")  # fmt: skip
    s.add_argument("--model", default="digits-mlp", choices=("digits-mlp", "char-lm"),
                   help="digits-mlp (default; non-IID class mixes) or char-lm (one speaker per device)")  # fmt: skip
    s.add_argument("--text", type=Path, default=None,
                   help="char-lm text, NAME:/lines blocks (default: the shipped excerpt)")  # fmt: skip
    s.add_argument("--rounds", type=int, default=5, help="FedAvg rounds (default 5)")
    s.add_argument("--broker", default="embedded",
                   help="embedded | mosquitto | mqtt[s]://host:port (default embedded)")  # fmt: skip
    add_tls_options(s)
    s.add_argument("--sites", type=int, default=0, metavar="K",
                   help="K site brokers bridged to the core one, a relay each, devices spread over them "
                   "(needs --broker mosquitto; docs/scale.md)")  # fmt: skip
    s.add_argument("--out", type=Path, default=Path("sim-out"), help="report folder (default sim-out)")
    s.add_argument("--bundle", type=Path, default=None, help="exported bundle to start from (default: export one)")
    _add_round_options(s)
    s.add_argument("--alpha", type=float, default=None, help="Dirichlet α of the class mix (default: label skew)")
    add_recipe_options(s, "per model, see `LOCAL_DEFAULTS` in devices/simulate/run.py and docs/simulate.md")
    g = s.add_argument_group("server optimizer (default per model: fedavgm β 0.6 for char-lm, else fedavg)")
    g.add_argument("--server-opt", choices=SERVER_OPT_NAMES, default=None, help="fedavg, fedavgm or fedadam")
    g.add_argument("--server-lr", type=float, default=None, help="server learning rate η")
    g.add_argument("--server-momentum", type=float, default=None, help="fedavgm momentum β")
    s.add_argument("--clip-to-median", type=float, default=3.0, metavar="K",
                   help="clip each update to K × the last round's median update norm (default 3; 0: off)")  # fmt: skip
    s.add_argument("--round-timeout", type=float, default=60.0, help="round deadline in seconds (default 60)")
    s.add_argument("--outage", type=_outage, action="append", default=[], help="scripted outage DEVICE:ROUND:SECONDS")
    s.add_argument("--outage-rate", type=float, default=0.02, help="chance a participant drops after training")
    s.add_argument("--hot", action="append", default=[], help="device id placed in a too-hot enclosure")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(func=cmd_simulate)

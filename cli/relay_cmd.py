"""`edgelearn relay`: a site aggregator behind a site broker bridged to the core (protocol v1.4, docs/scale.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cli.common import add_tls_options, broker_url, device_id, fleet_name, stop_on_signals, with_tls


def cmd_relay(a: argparse.Namespace) -> int:
    from coordinator.relay import Relay, RelayConfig
    from coordinator.state import StateLockedError

    try:
        cfg = RelayConfig(
            with_tls(a.broker, a), a.fleet, a.site, a.state, a.topic_root, a.public_key, a.signing_key,
            a.max_update_norm, a.max_staleness, a.flush_s, a.ack_timeout,
        )  # fmt: skip
        relay = Relay(cfg)
    except (ValueError, OSError, StateLockedError) as e:
        print(f"edgelearn relay: error: {e}", file=sys.stderr)
        return 2
    relay.run(stop_on_signals())
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "relay",
        help="aggregate one site's devices behind its broker, send the coordinator one update per round",
        description="A site relay (protocol v1.4): toward the site's devices it validates, spools, dedupes and acks "
        "updates as the coordinator does; toward the coordinator (through the site broker's bridge, "
        "`edgelearn broker config --bridge-to`) it sends their combination, which the coordinator folds as the "
        "sum of those devices. Needs the coordinator's mean aggregator (with or without central DP).",
    )
    r.add_argument("--broker", type=broker_url, required=True, help="the SITE broker: mqtt://host[:port] or mqtts://")
    add_tls_options(r)
    r.add_argument("--fleet", type=fleet_name, required=True, help="fleet name")
    r.add_argument("--site", type=device_id, required=True,
                   help="this relay's id: its topics P/relays/SITE/… and its account on the core broker")  # fmt: skip
    r.add_argument("--state", type=Path, required=True, help="state directory (spool, relay parts, state.sqlite)")
    r.add_argument("--topic-root", default="edgelearn", help="first topic segment (default edgelearn)")
    r.add_argument("--public-key", type=Path, default=None,
                   help="the fleet's public key: rounds, releases and acks must be signed by it")  # fmt: skip
    r.add_argument("--signing-key", type=Path, default=None,
                   help="this relay's own ed25519 key (edgelearn keys): signs its acks to devices, which trust "
                   "it with `edgelearn device --relay-key`")  # fmt: skip
    r.add_argument("--max-update-norm", type=float, default=1e3, help="as the coordinator's (default 1000)")
    r.add_argument("--max-staleness", type=int, default=4, help="as the coordinator's (default 4)")
    r.add_argument("--flush-s", type=float, default=5.0,
                   help="send the combination at most this long after the first unsent update, sooner once every "
                   "online invited device reported (default 5)")  # fmt: skip
    r.add_argument(
        "--ack-timeout",
        type=float,
        default=10.0,
        help="re-send an unacked combined update after this many seconds, doubling (default 10)",
    )
    r.set_defaults(func=cmd_relay)

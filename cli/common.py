"""Shared pieces of the command line: argument types and signal handling."""

from __future__ import annotations

import argparse
import signal
import threading
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlencode

from edgelearn.protocol import LOCAL_OPTIMIZERS, LOCAL_SCHEDULES, LocalConfig, check_name, parse_broker_url

RECIPE_FIELDS = ("steps", "batch_size", "lr", "optimizer", "warmup_steps", "schedule", "clip_norm", "lora_rank")


def stop_on_signals() -> threading.Event:
    """An event set by SIGINT or SIGTERM, for a clean shutdown of a long-running command."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def fleet_name(value: str) -> str:
    try:
        return check_name("fleet", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def device_id(value: str) -> str:
    try:
        return check_name("device id", value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def broker_url(value: str) -> str:
    try:
        parse_broker_url(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return value


def add_tls_options(p: argparse.ArgumentParser) -> None:
    """Mutual TLS to an mqtts:// broker (certificates from `edgelearn pki`); folded into the URL by `with_tls`."""
    g = p.add_argument_group("TLS (mqtts:// brokers; hostname checked)")
    g.add_argument("--cafile", type=Path, default=None, help="the fleet CA that signed the broker's certificate")
    g.add_argument("--cert", type=Path, default=None, help="this client's certificate (mutual TLS)")
    g.add_argument("--key", type=Path, default=None, help="this client's private key (mutual TLS)")


def with_tls(url: str, a: argparse.Namespace) -> str:
    """`url` with `?cafile=…&cert=…&key=…` from --cafile/--cert/--key (edgelearn.protocol.parse_broker_url checks
    them: mqtts:// only, cert and key together)."""
    given = {k: str(v) for k, v in (("cafile", a.cafile), ("cert", a.cert), ("key", a.key)) if v is not None}
    if not given:
        return url
    url = f"{url}{'&' if '?' in url else '?'}{urlencode(given, safe='/')}"
    parse_broker_url(url)
    return url


def add_recipe_options(p: argparse.ArgumentParser, defaults: str) -> None:
    """The local recipe a round asks of each device (protocol.LocalConfig); unset options keep `defaults`."""
    g = p.add_argument_group(f"local recipe per round (defaults: {defaults})")
    g.add_argument("--steps", type=int, default=None, help="local steps")
    g.add_argument("--batch-size", type=int, default=None, help="local batch size")
    g.add_argument("--lr", type=float, default=None, help="local learning rate (peak, with a schedule)")
    g.add_argument("--optimizer", choices=LOCAL_OPTIMIZERS, default=None, help="local optimizer (fresh per round)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up steps")
    g.add_argument("--lr-schedule", dest="schedule", choices=LOCAL_SCHEDULES, default=None,
                   help="after the warm-up: constant, or cosine decay to lr/10")  # fmt: skip
    g.add_argument("--grad-clip", dest="clip_norm", type=float, default=None,
                   help="clip each local gradient to this L2 norm (0: none)")  # fmt: skip
    g.add_argument("--lora-rank", type=int, default=None,
                   help="devices train and send rank-r adapters of the 2-D weights (protocol v1.3); "
                   "0: full updates")  # fmt: skip


def recipe(a: argparse.Namespace, base: LocalConfig) -> LocalConfig:
    """`base` with the recipe options given on the command line."""
    return replace(base, **{k: getattr(a, k) for k in RECIPE_FIELDS if getattr(a, k) is not None})

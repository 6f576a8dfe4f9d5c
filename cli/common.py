"""Shared pieces of the command line: argument types and signal handling."""

from __future__ import annotations

import argparse
import signal
import threading

from edgelearn.protocol import check_name, parse_broker_url


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

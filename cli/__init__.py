"""`edgelearn` command line. One module per side of the data flow adds its subcommands:

export_cmd (export, data) → device_cmd (device, learn) → coordinator_cmd (coordinator, fleet, broker), relay_cmd,
tools_cmd (keys, profiles, flash, demo) and simulate_cmd (simulate).

The command modules import the stages (and so torch and ExecuTorch) inside the command that needs them:
`edgelearn --help` and every usage error then take ~0.6 s instead of ~6 s (measured on this 2-core machine
with `/usr/bin/time edgelearn --help`). This is the one place where function-level imports of project modules
are the rule.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from cli import coordinator_cmd, device_cmd, export_cmd, relay_cmd, simulate_cmd, tools_cmd
from cli.device_cmd import _budget  # noqa: F401  (tests build budgets the way the CLI does)


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("torch", "executorch", "torchao", "amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if quiet and not verbose:  # a fleet in one process re-lowers programs every round: hide library chatter
        import torch  # noqa: F401  (its import configures the "torch" logger: quiet it afterwards)

        for noisy in ("torch", "torchao"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)  # torch.export deprecations, per re-lowering


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edgelearn",
        description="On-device edge learning: export a model, run a "
        "fleet of learning devices and a FedAvg coordinator over MQTT (protocol v1).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for m in (export_cmd, coordinator_cmd, relay_cmd, device_cmd, tools_cmd, simulate_cmd):
        m.add_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose, quiet=args.command in ("demo", "simulate"))
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

"""Commands of the device side: `device` (the agent) and `learn` (local learning, no coordinator)."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cli.common import add_tls_options, broker_url, device_id, fleet_name, stop_on_signals, with_tls
from devices.profiles import DEFAULT_PROFILE, Profile, ProfileError, load_profile
from edge_runtime.budget import Budget
from edgelearn.bundle import BundleError, verify_bundle
from edgelearn.protocol import DEFAULT_LOCAL, ENCODINGS, LOCAL_OPTIMIZERS, LocalConfig
from edgelearn.signing import load_public

if TYPE_CHECKING:
    from edge_runtime.agent import DeviceConfig

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


def _profile(a: argparse.Namespace) -> Profile:
    """`--profile` (else `default`, or only `--profile-file` when that is a complete profile) with the file on top."""
    name = a.profile or ("" if a.profile_file else DEFAULT_PROFILE)
    return load_profile(name, a.profile_file)


def _budget(a: argparse.Namespace, profile: Profile | None = None) -> Budget:
    """The profile's budget with every budget option given on top ('off' disables a limit)."""
    base = (profile or _profile(a)).budget
    given = {field: getattr(a, dest) for dest, field in BUDGET_OPTIONS.items() if getattr(a, dest) is not _UNSET}
    return replace(base, **{k: None if v == "off" else v for k, v in given.items()})  # type: ignore[arg-type]


def _device_config(a: argparse.Namespace, profile: Profile) -> DeviceConfig:
    """The agent's config: the profile's budget, outbox and MQTT keep-alive, with the options given on top."""
    from edge_runtime.agent import DeviceConfig  # lazy, as every torch-importing module here: see cli/__init__.py

    ack_timeout_s = profile.outbox.ack_timeout_s if a.ack_timeout is _UNSET else a.ack_timeout
    return DeviceConfig(with_tls(a.broker, a), a.fleet, a.id, a.state, a.topic_root, a.encoding, ack_timeout_s,
                        max_outbox=profile.outbox.max_items, keepalive_s=profile.mqtt.keepalive_s,
                        budget=_budget(a, profile), engine=a.engine, samples=a.samples, mu=a.mu,
                        replay_size=a.replay_size, max_store_samples=a.max_store_samples,
                        public_key_path=a.public_key, relay_key_path=a.relay_key, min_release=a.min_release,
                        async_interval_s=a.async_interval,
                        async_local=LocalConfig(a.local_steps, a.local_batch_size, a.local_lr),
                        personal_adapter=a.personal_adapter)  # fmt: skip


def cmd_device(a: argparse.Namespace) -> int:
    from edge_runtime.agent import DeviceAgent
    from models.shards import load_shard

    x = y = None
    if a.data is not None:
        try:
            shard = load_shard(a.data)
        except (OSError, ValueError) as e:
            print(f"edgelearn device: error: cannot read --data {a.data}: {e}", file=sys.stderr)
            return 2
        x, y = shard.x, shard.y
    try:
        cfg = _device_config(a, _profile(a))
        if a.bundle:
            verify_bundle(a.bundle)
        for key in (a.public_key, a.relay_key):
            if key:
                load_public(key)
    except (OSError, ValueError, ProfileError, BundleError) as e:
        print(f"edgelearn device: error: {e}", file=sys.stderr)
        return 2
    agent = DeviceAgent(cfg, x, y)
    if a.serve is not None:
        from edge_runtime.serve import start_serving

        try:
            host, port = a.serve
            start_serving(agent, host, port, allow_remote=a.serve_remote)
        except (ValueError, OSError) as e:  # a taken port: the agent still learns, without the endpoint
            print(f"edgelearn device: inference endpoint not started: {e}", file=sys.stderr)
    if a.bundle:
        agent.seed(a.bundle)
    agent.run(stop_on_signals())
    return 0


_UNSET = object()


def _number(kind: type, minimum: float, inclusive: bool = True):
    """An argparse type: a finite `kind` number >= `minimum` (> when not `inclusive`), with a one-line error."""

    def parse(value: str) -> int | float:
        try:
            n = kind(value)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None
        if not math.isfinite(n) or not (n >= minimum if inclusive else n > minimum):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {minimum}, got {value!r}")
        return n

    return parse


def _serve_address(value: str) -> tuple[str, int] | None:
    """`--serve HOST:PORT` (or `off`) → (host, port) or None."""
    if value == "off":
        return None
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"--serve {value!r}: use HOST:PORT (e.g. 127.0.0.1:8000) or off")
    return host.strip("[]"), int(port)


def _add_serve_options(v: argparse.ArgumentParser) -> None:
    g = v.add_argument_group("local inference endpoint (Open Inference Protocol / KServe v2 REST; docs/serving.md)")
    g.add_argument("--serve", type=_serve_address, default="127.0.0.1:8000", metavar="HOST:PORT",
                   help="where apps on this device reach the model (default 127.0.0.1:8000; off: none)")  # fmt: skip
    g.add_argument("--personal-adapter", type=Path, default=None, metavar="FILE",
                   help="serve global + this personal adapter (`edgelearn learn --lora-rank`; never sent)")  # fmt: skip
    g.add_argument("--serve-remote", action="store_true",
                   help="allow a non-loopback --serve address (the endpoint has no authentication)")  # fmt: skip


def _add_async_options(v: argparse.ArgumentParser) -> None:
    g = v.add_argument_group("asynchronous mode (when the coordinator's status says mode=async)")
    g.add_argument("--async-interval", type=_number(float, 0.0), default=10.0,
                   help="least seconds between two queued updates (default 10)")  # fmt: skip
    g.add_argument(
        "--local-steps",
        type=_number(int, 1),
        default=DEFAULT_LOCAL.steps,
        help=f"SGD steps per update (default {DEFAULT_LOCAL.steps})",
    )
    g.add_argument(
        "--local-batch-size",
        type=_number(int, 1),
        default=DEFAULT_LOCAL.batch_size,
        help=f"batch size (default {DEFAULT_LOCAL.batch_size})",
    )
    g.add_argument("--local-lr", type=_number(float, 0.0, inclusive=False), default=DEFAULT_LOCAL.lr,
                   help=f"learning rate (default {DEFAULT_LOCAL.lr})")  # fmt: skip


class _Renamed(argparse.Action):
    """An option that was renamed: using it is a one-line usage error naming the new option."""

    def __init__(self, option_strings: list[str], dest: str, new: str = "", **kw: Any) -> None:
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kw)
        self.new = new

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        parser.error(f"{option_string} was replaced by {self.new} {values} (budget presets are profiles now)")


def _add_budget_options(v: argparse.ArgumentParser) -> None:
    def limit(value: str) -> float | str:
        if value.lower() == "off":
            return "off"
        try:
            return float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number or 'off', got {value!r}") from None

    g = v.add_argument_group("budget (defaults from the --profile; a limit of 'off' disables it)")
    g.add_argument("--profile", default=None,
                   help=f"device profile: board settings and base budget (default: {DEFAULT_PROFILE}; "
                   "see `edgelearn profiles`)")  # fmt: skip
    g.add_argument("--profile-file", type=Path, default=None, help="TOML file overriding profile fields")
    g.add_argument("--budget-profile", action=_Renamed, new="--profile")
    g.add_argument("--max-cpu", type=limit, default=_UNSET, help="max CPU %% used by other processes")
    g.add_argument("--max-rss-mb", type=limit, default=_UNSET, help="max RSS of this process in MB")
    g.add_argument("--min-available-mb", type=limit, default=_UNSET, help="min available memory in MB")
    g.add_argument(
        "--max-temperature-c",
        "--max-temp-c",
        dest="max_temp_c",
        type=limit,
        default=_UNSET,
        help="max sensor temperature in °C",
    )
    g.add_argument("--min-battery", type=limit, default=_UNSET, help="min battery %% unless charging")
    g.add_argument("--max-train-s-per-hour", type=limit, default=_UNSET, help="training seconds per hour")
    g.add_argument("--threads", type=int, default=_UNSET, help="training threads")
    g.add_argument("--monitor-interval", type=float, default=_UNSET, help="seconds between readings")


def cmd_learn(a: argparse.Namespace) -> int:
    from edge_runtime.local import LocalRun, LocalRunConfig

    try:
        cfg = LocalRunConfig(
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
            optimizer=a.optimizer,
            lora_rank=a.lora_rank,
        )
        run = LocalRun(cfg)
    except (BundleError, ValueError, ProfileError) as e:
        print(f"edgelearn learn: error: {e}", file=sys.stderr)
        return 2
    start = {"event": "start", "resumed_at_step": run.resumed_at, "engine": run.learner.engine.name}
    print(json.dumps(start), flush=True)
    job = run.run(stop_on_signals())
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


def _add_device_parser(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "device",
        help="run the device agent",
        description="Verify and activate releases, serve inference with ExecuTorch, train on "
        "local data when a round includes this device (or, when the coordinator runs in asynchronous "
        "mode, whenever the budget allows) and send each update until acked.",
    )
    v.add_argument(
        "--broker",
        type=broker_url,
        default=os.environ.get("EDGELEARN_BROKER"),
        required="EDGELEARN_BROKER" not in os.environ,
        help="mqtt://[user[:pass]@]host[:port] or mqtts:// (default: $EDGELEARN_BROKER)",
    )
    v.add_argument("--fleet", type=fleet_name, required=True, help="fleet name")
    v.add_argument("--id", type=device_id, required=True, help="device id ([A-Za-z0-9_-]{1,64})")
    add_tls_options(v)
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
    v.add_argument(
        "--ack-timeout", type=float, default=_UNSET, help="seconds before a re-send (default: the profile's)"
    )
    v.add_argument("--topic-root", default="edgelearn", help="first topic segment (default edgelearn)")
    v.add_argument("--bundle", type=Path, default=None, help="a local bundle to start from (e.g. the flashed one)")
    v.add_argument("--public-key", type=Path, default=None, help="signed fleet: refuse releases not signed by it")
    v.add_argument("--relay-key", type=Path, default=None,
                   help="signed fleet behind a site relay: acks signed by this key count too")  # fmt: skip
    _add_serve_options(v)
    v.add_argument("--min-release", type=int, default=0, metavar="V",
                   help="rollback floor: refuse any release older than V, even with no state (default 0)")  # fmt: skip
    _add_async_options(v)
    v.set_defaults(func=cmd_device)


def _add_learn_parser(sub: argparse._SubParsersAction) -> None:
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
    n.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_LOCAL.batch_size,
        help=f"batch size (default {DEFAULT_LOCAL.batch_size})",
    )
    n.add_argument("--lr", type=float, default=DEFAULT_LOCAL.lr, help=f"learning rate (default {DEFAULT_LOCAL.lr})")
    n.add_argument("--mu", type=float, default=0.0, help="proximal term μ (default 0)")
    n.add_argument("--optimizer", choices=LOCAL_OPTIMIZERS, default=DEFAULT_LOCAL.optimizer,
                   help=f"local optimizer (default {DEFAULT_LOCAL.optimizer})")  # fmt: skip
    n.add_argument("--lora-rank", type=int, default=0,
                   help="train a personal rank-r adapter of the 2-D weights instead of the weights themselves; "
                   "writes STATE/personal-adapter.safetensors too (default 0: the weights)")  # fmt: skip
    n.add_argument(
        "--engine",
        choices=("eager", "executorch"),
        default=None,
        help="training engine (default: the faster one for the model)",
    )
    n.add_argument("--checkpoint-every", type=float, default=5.0, help="seconds between checkpoints (default 5)")
    _add_budget_options(n)
    n.set_defaults(func=cmd_learn)


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_device_parser(sub)
    _add_learn_parser(sub)

"""Canary rollouts through a real mosquitto: 20 device agents, a coordinator trying each release on 2 of them.
A good release is promoted; one that raises the loss and one that cannot load are caught by the
canaries and rolled back, and no device outside the canary ever activates them."""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.ops import fleet_rollout_lines
from coordinator.release import release_builder
from coordinator.rollout import CanaryConfig, Trial, choose_canaries, judge
from coordinator.server import Coordinator
from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.budget import Budget
from edgelearn.bundle import INFER_PTD, read_bundle, write_bundle
from edgelearn.protocol import LocalConfig
from models.digits import load_digits

pytestmark = pytest.mark.slow
N, CANARIES = 20, 2
CANARY = CanaryConfig(devices=CANARIES, hold_s=2.0, max_loss_rise=0.05, timeout_s=60.0)


class Recording(DeviceAgent):
    """A device agent that remembers every release it activated."""

    def _activate(self, active) -> None:
        self.history = [*getattr(self, "history", []), active.manifest.version]
        super()._activate(active)


def broken(rebuild, loss_version: int, crash_version: int):
    """Releases as built, except `loss_version` (every weight negated: the loss rises) and `crash_version`
    (built and measured by the coordinator, then its data file cut in half, its manifest re-hashed: a program that
    cannot load on the devices, like one that crashes on a board type)."""

    def build(prev, weights, version, out, **kw):
        if version == loss_version:
            weights = {k: -v for k, v in weights.items()}
        manifest = rebuild(prev, weights, version, out, **kw)
        if version != crash_version:
            return manifest
        m, files = read_bundle(out)
        files[INFER_PTD] = files[INFER_PTD][: len(files[INFER_PTD]) // 2]
        shutil.rmtree(out)
        return write_bundle(out, replace(m, files={}), files)

    return build


def test_canaries_catch_a_worse_and_a_broken_release_and_a_good_one_reaches_the_fleet(
    mosquitto, bundle_dir, fleet, tmp_path
):
    # Prepare: 20 agents with digits shards, online; a coordinator whose releases v3 and v5 are bad
    d = load_digits()
    shards = np.array_split(np.arange(len(d.pool.y)), N)
    stop = threading.Event()
    agents = []
    for k, idx in enumerate(shards):
        cfg = DeviceConfig(mosquitto.url, fleet, f"dev{k}", tmp_path / f"dev{k}", budget=Budget(max_rss_mb=None),
                           tick_s=0.05)  # fmt: skip
        agents.append(Recording(cfg, d.pool.x[idx], d.pool.y[idx]))
    threads = [threading.Thread(target=a.run, args=(stop,), daemon=True) for a in agents]
    for t in threads:
        t.start()
    ccfg = CoordinatorConfig(mosquitto.url, fleet, bundle_dir, tmp_path / "coordinator", min_updates=N,
                             round_timeout_s=60, local=LocalConfig(5, 16, 0.1), max_rounds=4,
                             canary=CANARY)  # fmt: skip
    published: dict[int, float] = {}
    coord = Coordinator(ccfg, broken(release_builder(), loss_version=3, crash_version=5),
                        lambda s: published.setdefault(s.version, time.monotonic()))  # fmt: skip
    # Execute: rounds 1-3 and their trials (the 4th close leaves v7 on trial)
    try:
        coord.run(threading.Event())
        end = time.monotonic() + 30
        while time.monotonic() < end and not all(a.version >= 6 for a in agents):
            time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    # Assert: v2 promoted to all; v3 (loss) and v5 (cannot load) only ever reached their canaries, which rolled back
    lines = fleet_rollout_lines(tmp_path / "coordinator")
    assert lines[0].startswith("release v7 canary (stable v6)")
    promoted = next(line for line in lines if line.startswith("  v2 promoted"))
    assert "on every online device" in promoted  # the time from the trial's start to the whole fleet
    print(promoted)
    assert any(line.startswith("  v3 aborted: canary loss rose") for line in lines)
    assert any(line.startswith("  v5 aborted: dev") and "failed to load" in line for line in lines)
    history = {a.cfg.device_id: a.history for a in agents}
    assert all(2 in h and 4 in h and 6 in h for h in history.values()), history
    loss_canaries = [dev for dev, h in history.items() if 3 in h]
    assert len(loss_canaries) == CANARIES and all(5 not in h for h in history.values())
    for dev in loss_canaries:  # back on v2's weights (as v4) right after v3
        assert history[dev][history[dev].index(3) + 1] == 4
    smoke = [a for a in agents if (a.health.failed or {}).get("release") == 5]
    assert len(smoke) == CANARIES and "infer.ptd is truncated" in smoke[0].health.failed["error"]
    by_hand = fleet_rollout_lines(tmp_path / "coordinator", "abort")  # v7 is still on trial: an operator aborts it
    assert by_hand[-1].startswith("  v2 promoted") and any(line.startswith("abort: the running") for line in by_hand)
    assert {a.version for a in agents} <= {6, 7} and sum(a.version == 7 for a in agents) <= CANARIES  # v7: on trial


def test_the_verdict_rules():
    t = Trial(5, 4, ("a", "b"), started_unix_s=100.0)
    healthy = {"release": 5, "loss": {"release": 5, "value": 0.50, "previous": 4, "previous_value": 0.49, "n": 64}}
    worse = {"release": 5, "loss": {"release": 5, "value": 0.70, "previous": 4, "previous_value": 0.50, "n": 64}}
    assert judge(t, {"a": {"health": healthy}, "b": {"health": {"release": 4}}}, 150.0, CANARY)[0] == "wait"
    assert judge(t, {"a": {"health": healthy}, "b": {"health": healthy}}, 101.0, CANARY)[0] == "wait"  # hold
    assert judge(t, {"a": {"health": healthy}, "b": {"health": healthy}}, 103.0, CANARY)[0] == "promote"
    verdict, why = judge(t, {"a": {"health": healthy}, "b": {"health": worse}}, 101.0, CANARY)
    assert verdict == "abort" and "loss rose 21.0 %" in why
    verdict, why = judge(t, {"a": {"health": {"release": 4, "failed": {"release": 5, "error": "boom"}}}}, 100.5, CANARY)
    assert verdict == "abort" and "a: release v5 failed to load: boom" in why
    assert judge(t, {"a": {"health": healthy}}, 161.0, CANARY) == ("abort", "1 of 2 canaries run v5 after 61 s")
    looping = {**healthy, "starts": [90.0, 101.0, 102.0, 103.0]}  # three starts since the trial began
    assert judge(t, {"a": {"health": looping}, "b": {"health": healthy}}, 104.0, CANARY)[1].startswith("a: the agent")


def test_canaries_are_the_named_devices_first_then_a_share_of_the_online_ones():
    online = {f"d{k}": {"state": "idle"} for k in range(20)} | {"off": {"state": "offline"}}
    assert choose_canaries(online, 3, CanaryConfig(devices=2, ids=("d7", "off")))[:1] == ("d7",)
    assert len(choose_canaries(online, 3, CanaryConfig(devices=1, share=0.25))) == 5
    assert choose_canaries(online, 3, CANARY) != choose_canaries(online, 4, CANARY)  # trials spread the load
    assert "off" not in choose_canaries(online, 3, CanaryConfig(devices=30))

"""Simulated fleet: 20 real agents through mosquitto, one scripted outage and one hot device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cli import main
from devices.simulate.data import device_shards
from devices.simulate.fleet import Outage, assign_profiles, parse_mix
from devices.simulate.run import SimConfig, simulate
from devices.simulate.traces import TRACES, TraceSource, cool, next_battery
from edgelearn.protocol import LocalConfig
from models.data import Split

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)

PNG = b"\x89PNG\r\n\x1a\n"


def test_simulated_fleet_outage_and_hot_device(mosquitto, bundle_dir, fleet, tmp_path) -> None:
    # Prepare: 20 devices that stay within their budgets, except sim0005 (too hot); sim0003 drops its link
    # right after queueing its round-1 update. The quorum (19) needs every device but the hot one.
    cfg = SimConfig(
        devices=20, profiles=(("rpi5", 0.5), ("x86-dev", 0.5)), rounds=2, broker=mosquitto.url, out=tmp_path / "out",
        bundle=bundle_dir, min_updates=19, local=LocalConfig(steps=4, batch_size=16, lr=0.2), round_timeout_s=60,
        outages=(Outage("sim0003", 1, 1.5),), outage_rate=0.0, hot=("sim0005",), battery_fraction=0.0,
        max_link_delay_s=0.2, fleet=fleet,
    )  # fmt: skip
    # Execute
    report = simulate(cfg, say=lambda s: None)
    # Assert: rounds completed, each with the 19 cool devices
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and [r["version"] for r in rounds] == [2, 3]
    assert all(r["accepted"] == 19 and "sim0005" not in r["participants"] for r in rounds)
    assert all(0.0 < r["accuracy"] <= 1.0 for r in rounds)
    # the hot device paused for temperature and never delivered
    hot = report["devices"]["sim0005"]["events"]
    assert any(e["event"] == "pause" and "temperature" in e["reasons"] for e in hot)
    assert all(r["paused"].get("temperature", 0) >= 1 for r in rounds)
    # the outage device went down holding its update, came back, and the update counted once
    events = [e["event"] for e in report["devices"]["sim0003"]["events"]]
    assert events[:2] == ["outage", "reconnect"]
    assert report["devices"]["sim0003"]["events"][0]["outbox"] == 1
    assert "sim0003" in rounds[0]["participants"] and report["totals"]["accepted"] == 38
    assert report["totals"]["rejected"] == {}
    # report files
    saved = json.loads((cfg.out / "report.json").read_text())
    assert saved["totals"] == report["totals"]
    assert saved["totals"]["bytes"]["up_update"] > 0 and saved["totals"]["bytes"]["down_release"] > 0
    for name in ("accuracy.png", "participation.png", "rejected.png", "bytes.png"):
        assert (cfg.out / name).read_bytes()[:8] == PNG


def test_temperature_rises_per_training_step_and_cools_after() -> None:
    # Prepare
    spec = TRACES["rpi4"]
    clock = iter([0.0, 0.0, 1.0, 3.0]).__next__
    trace = TraceSource(spec, clock=clock)
    # Execute: ten steps, a reading at once, one a second later, one two seconds after that
    for _ in range(10):
        trace.on_step()
    hot = trace().temperature_c
    warm = trace().temperature_c
    cooled = trace().temperature_c
    # Assert
    assert hot == pytest.approx(spec.ambient_c + 10 * spec.heat_c_per_step)
    assert spec.ambient_c < cooled < warm < hot
    assert cool(hot, spec.ambient_c, spec.cool_per_s, 100.0) == spec.ambient_c


def test_battery_drains_then_charges_from_ten_percent() -> None:
    # Prepare
    spec = TRACES["jetson-nano"]
    # Execute
    low, charging = next_battery(11.0, False, 1.5, spec, 1.0)
    up, still = next_battery(low, charging, 0.0, spec, 1.0)
    # Assert
    assert low <= 10.0 and charging
    assert up > low and still


def test_dirichlet_shards_are_skewed_and_sized() -> None:
    # Prepare
    pool = Split(np.arange(1000, dtype=np.float32).reshape(-1, 1), np.repeat(np.arange(10), 100))
    # Execute
    shards = device_shards(pool, 50, 40, alpha=0.1, seed=1)
    # Assert: every device holds 40 examples, most of them from few classes
    assert all(len(s.y) == 40 for s in shards)
    top = [np.bincount(s.y, minlength=10).max() / 40 for s in shards]
    assert np.mean(top) > 0.5


def test_profile_mix_is_exact_and_bad_mix_is_an_error() -> None:
    # Prepare
    mix = parse_mix("rpi4:0.5,rpi5:0.3,jetson-orin-nano:0.2")
    # Execute
    names = assign_profiles(mix, 1000, np.random.default_rng(0))
    # Assert
    assert (names.count("rpi4"), names.count("rpi5"), names.count("jetson-orin-nano")) == (500, 300, 200)
    with pytest.raises(ValueError, match="weight must be a number"):
        parse_mix("rpi4:lots")


def test_cli_rejects_unknown_profile(capsys) -> None:
    # Execute
    with pytest.raises(SystemExit):
        main(["simulate", "--profiles", "rpi9:1", "--out", "unused"])
    # Assert
    assert "unknown profile 'rpi9'" in capsys.readouterr().err


def test_replay_draw_returns_every_row_asked_for_from_a_small_buffer() -> None:
    # Prepare: a device with fewer samples than one plan of batches (the simulate run found this)
    from edge_runtime.samples import ReplayBuffer

    r = ReplayBuffer(100, seed=0)
    r.offer(np.zeros((10, 2), np.float32), np.zeros(10, np.int64), np.arange(10))
    # Execute
    x, y, seq = r.draw(64)
    # Assert: drawn with replacement, so all 64 rows come back (the learner indexes them all)
    assert len(x) == len(y) == len(seq) == 64


def test_label_skew_partitions_the_pool_when_it_suffices() -> None:
    # Prepare: 400 examples of 10 classes
    rng = np.random.default_rng(0)
    pool = Split(rng.normal(size=(400, 3)).astype(np.float32), np.arange(400) % 10)
    # Execute: 4 devices (≥ 32 examples each possible) and 20 devices (not: drawn, 32 each)
    parts = device_shards(pool, 4, None)
    drawn = device_shards(pool, 20, None)
    # Assert: every example on exactly one device; device k only holds its own 4 classes
    assert sum(len(p.y) for p in parts) == 400
    assert {int(c) for c in parts[1].y} <= {4, 5, 6, 7}
    assert [len(p.y) for p in drawn] == [32] * 20


def test_cohort_mode_with_coordinator_selection(mosquitto, bundle_dir, fleet, tmp_path) -> None:
    # Prepare: 6 devices, 4 online per round (a cohort), the coordinator invites ⌈1.3·2⌉ = 3 of them
    cfg = SimConfig(
        devices=6, profiles=(("x86-dev", 1.0),), rounds=2, broker=mosquitto.url, out=tmp_path / "out",
        bundle=bundle_dir, online=4, participants=2, local=LocalConfig(steps=3, batch_size=8, lr=0.2),
        round_timeout_s=60, outage_rate=0.0, battery_fraction=0.0, ambient_spread_c=0.0, fleet=fleet + "-cohort",
    )  # fmt: skip
    # Execute
    report = simulate(cfg, say=lambda s: None)
    # Assert: two rounds; 4 devices online each; the quorum (⌈0.6·2⌉ = 2) met by invited devices only
    rounds = report["rounds"]
    assert [r["version"] for r in rounds] == [2, 3]
    assert all(r["online"] == 4 and 2 <= r["accepted"] <= 3 for r in rounds)


def test_adapter_rounds_send_only_adapters_and_release_their_expansion(mosquitto, bundle_dir, fleet, tmp_path) -> None:
    # Prepare: 4 real agents; the rounds ask for rank-4 adapters (protocol v1.3) of the digits MLP, whose
    # default training engine (ExecuTorch) has none: each device trains them on an eager engine
    from edgelearn.bundle import load_weights

    cfg = SimConfig(
        devices=4, profiles=(("x86-dev", 1.0),), rounds=2, broker=mosquitto.url, out=tmp_path / "out",
        bundle=bundle_dir, local=LocalConfig(steps=6, batch_size=16, lr=0.01, optimizer="adamw", lora_rank=4),
        min_updates=4, round_timeout_s=60, outage_rate=0.0, battery_fraction=0.0, ambient_spread_c=0.0,
        fleet=fleet + "-lora",
    )  # fmt: skip
    # Execute
    report = simulate(cfg, say=lambda s: None)
    # Assert: every update accepted; each carried B (out × 4 per 2-D weight), a fraction of the full weights
    rounds, totals = report["rounds"], report["totals"]
    assert [r["accepted"] for r in rounds] == [4, 4] and totals["rejected"] == {}
    w = load_weights(bundle_dir)
    full_bytes = 4 * sum(v.size for v in w.values())
    adapter_bytes = 4 * sum(v.shape[0] * 4 for v in w.values() if v.ndim == 2)
    per_update = totals["bytes"]["up_update"] / totals["accepted"]
    assert adapter_bytes <= per_update < adapter_bytes + 4096 < full_bytes
    assert rounds[-1]["accuracy"] > 0.5


def test_sites_run_the_hierarchy_every_device_counted_through_its_relay(bundle_dir, fleet, tmp_path) -> None:
    # Prepare: 9 real agents at 3 site brokers bridged to the core one, a relay each; every device must count
    cfg = SimConfig(
        devices=9, profiles=(("x86-dev", 1.0),), rounds=2, broker="mosquitto", sites=3, out=tmp_path / "out",
        bundle=bundle_dir, min_updates=9, local=LocalConfig(steps=4, batch_size=16, lr=0.2), round_timeout_s=60,
        outage_rate=0.0, battery_fraction=0.0, ambient_spread_c=0.0, fleet=fleet + "-sites",
    )  # fmt: skip
    # Execute
    report = simulate(cfg, say=lambda s: None)
    # Assert: both rounds took all nine devices, and the coordinator received three combined updates per round
    rounds = report["rounds"]
    assert [(r["version"], r["accepted"]) for r in rounds] == [(2, 9), (3, 9)] and report["totals"]["rejected"] == {}
    assert all(sorted(r["participants"]) == [f"sim{k:04d}" for k in range(9)] for r in rounds)
    for r in rounds:
        one_update = r["bytes"]["up_update"] / 9
        assert 0 < r["core_in_bytes"] <= 3 * (one_update + 4096) < r["bytes"]["up_update"], r
    with pytest.raises(ValueError, match="--broker mosquitto"):
        SimConfig(devices=4, sites=2, broker="embedded", bundle=bundle_dir)

"""The coordinator's durable core (coordinator/rounds.py) without MQTT: modes, aggregators, restarts, retention.

Releases here are written by `weights_only_rebuild` (new weights, the previous programs copied) so
that each test takes seconds; the real re-lowering runs in tests/test_e2e.py and the crash test.
"""

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coordinator import aggregate as agg
from coordinator.config import CoordinatorConfig
from coordinator.ops import OpsError, fleet_rounds_lines, rollback
from coordinator.optim import ServerOptConfig
from coordinator.rounds import Rounds
from edgelearn.bundle import Manifest, dump_weights, load_weights, utc_now, verify_bundle, write_bundle
from edgelearn.protocol import Update, encode_update


def weights_only_rebuild(prev_dir: Path, weights: dict, version: int, out: Path, created: str = "") -> Manifest:
    prev = verify_bundle(prev_dir)
    files = {name: (prev_dir / name).read_bytes() for name in prev.files}
    files["weights.safetensors"] = dump_weights(weights)
    return write_bundle(out, replace(prev, version=version, files={}, created=created), files)


def make_cfg(bundle_dir: Path, state: Path, **kw) -> CoordinatorConfig:
    return CoordinatorConfig("mqtt://127.0.0.1:1", "f", bundle_dir, state, **{"min_updates": 3, **kw})


def upd(e: Rounds, uid: str, n: int, seed: int, base: int | None = None, rnd: int | None = 0, dev: str = "") -> bytes:
    rng = np.random.default_rng(seed)
    deltas = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in e.shapes.items()}
    return encode_update(
        Update(uid, dev or f"d{uid}", e.manifest.model_id, base or e.version, n, deltas, e.round if rnd == 0 else rnd)
    )


def decoded(payload: bytes):
    from edgelearn.protocol import decode_update

    return decode_update(payload)


def test_sync_round_is_protocol_fedavg(bundle_dir, tmp_path):
    # Prepare
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    theta = load_weights(e.release_dir(1))
    payloads = [upd(e, f"u{k}", n, k) for k, n in enumerate((10, 30, 60))]
    # Execute
    verdicts = [e.handle(decoded(p).device_id, p) for p in payloads]
    assert e.ready()
    s = e.close()
    # Assert: θ2 = θ1 + Σ n_k/Σn Δ_k, release v2 on disk, spool of round 1 gone
    assert [v.status for v in verdicts] == ["accepted"] * 3 and (s.version, s.accepted) == (2, 3)
    us = [decoded(p) for p in payloads]
    new = load_weights(e.release_dir(2))
    for name in e.shapes:
        expected = theta[name] + sum(u.num_samples / 100 * u.deltas[name] for u in us)
        np.testing.assert_allclose(new[name], expected, atol=1e-6)
    assert not e.spool.log_path(1).exists() and (e.version, e.round) == (2, 2)


def test_duplicate_counted_once_and_rejections_by_reason(bundle_dir, tmp_path):
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    p = upd(e, "u1", 5, 1)
    bad_round = upd(e, "u2", 5, 2, rnd=9)
    first, second = e.handle("du1", p), e.handle("du1", p)
    e.handle("du2", bad_round)
    e.handle("dx", b"\x00" * 100)
    e.handle("du1", p[:-5])  # truncated
    e.handle("du3", b"x" * (200 * 1024 * 1024))  # a 200 MB payload is refused before parsing
    assert (first.status, second.status) == ("accepted", "duplicate")
    assert e.count == 1 and e.duplicates == 1
    assert e.rejected == {"wrong_round": 1, "not_safetensors": 2, "payload_too_large": 1}
    e.store.close()
    e2 = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)  # counts survive a restart
    assert (e2.count, e2.duplicates, e2.rejected) == (1, 1, e.rejected)


def test_restart_mid_round_gives_identical_release(bundle_dir, tmp_path):
    # Prepare: the same three updates for an uninterrupted engine and one restarted after two
    e0 = Rounds(make_cfg(bundle_dir, tmp_path / "a"), weights_only_rebuild)
    payloads = [upd(e0, f"u{k}", 7 + k, k) for k in range(3)]
    for p in payloads:
        e0.handle(decoded(p).device_id, p)
    e0.close()
    e1 = Rounds(make_cfg(bundle_dir, tmp_path / "b"), weights_only_rebuild)
    for p in payloads[:2]:
        e1.handle(decoded(p).device_id, p)
    e1.store.close()  # the process dies here: nothing else is saved
    # Execute
    e2 = Rounds(make_cfg(bundle_dir, tmp_path / "b"), weights_only_rebuild)
    again = e2.handle(decoded(payloads[1]).device_id, payloads[1])
    e2.handle(decoded(payloads[2]).device_id, payloads[2])
    e2.close()
    # Assert: recovered count, duplicate after restart, bit-identical release
    assert again.status == "duplicate" and e2.version == 2
    a, b = load_weights(e0.release_dir(2)), load_weights(e2.release_dir(2))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_spooled_but_uncommitted_update_is_dropped_then_accepted_on_resend(bundle_dir, tmp_path):
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    p = upd(e, "u1", 5, 1)
    e.spool.append(e.round, [p])  # crash between the spool fsync and the SQLite commit
    e.store.close()
    e2 = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    assert e2.count == 0 and e2.spool.log_path(1).stat().st_size == 0  # the uncommitted tail is cut
    assert e2.handle("du1", p).status == "accepted" and e2.count == 1


def test_async_fedbuff_staleness(bundle_dir, tmp_path):
    # Prepare: release v1 → close once so that v2 is current; then updates on v2 (s=0) and v1 (s=1)
    cfg = make_cfg(bundle_dir, tmp_path, mode="async", buffer_size=2, max_staleness=1)
    e = Rounds(cfg, weights_only_rebuild)
    for k in range(2):
        e.handle(f"du{k}", upd(e, f"u{k}", 4, k, rnd=None))
    e.close()
    theta = load_weights(e.release_dir(2))
    fresh, stale = upd(e, "a", 10, 5, base=2, rnd=None), upd(e, "b", 30, 6, base=1, rnd=None)
    too_old = upd(e, "c", 30, 7, base=1, rnd=None)
    e.version = 3  # pretend v3 is current for the third one: staleness 2 > 1
    assert e.handle("dc", too_old).reason == "stale_base_version"
    e.version = 2
    # Execute
    e.handle("da", fresh), e.handle("db", stale)
    e.close()
    # Assert: θ3 = θ2 + (10·1·Δa + 30·(1/√2)·Δb) / 40
    da, db = decoded(fresh).deltas, decoded(stale).deltas
    new = load_weights(e.release_dir(3))
    for n in e.shapes:
        np.testing.assert_allclose(new[n], theta[n] + (10 * da[n] + 30 / np.sqrt(2) * db[n]) / 40, atol=1e-6)


def test_batch_group_commit_detects_duplicates_within_the_batch(bundle_dir, tmp_path):
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    a, b = upd(e, "a", 5, 1), upd(e, "b", 7, 2)
    verdicts = e.handle_batch([("da", a), ("db", b), ("da", a), ("dx", b"junk")])
    assert [v.status for v in verdicts] == ["accepted", "accepted", "duplicate", "rejected"]
    rows = e.store.accepted(1)
    assert [(r.update_id, r.seq) for r in rows] == [("a", 1), ("b", 2)]
    assert e.spool.read(1, rows[1].spool_offset, rows[1].spool_bytes) == b


def test_median_and_dp_through_the_engine(bundle_dir, tmp_path):
    e = Rounds(make_cfg(bundle_dir, tmp_path / "m", aggregator="median"), weights_only_rebuild)
    ps = [upd(e, f"u{k}", 1 + k, k) for k in range(3)]
    for p in ps:
        e.handle(decoded(p).device_id, p)
    theta, delta = load_weights(e.release_dir(1)), e.aggregated_delta()
    e.close()
    n = next(iter(e.shapes))
    np.testing.assert_allclose(delta[n], np.median([decoded(p).deltas[n] for p in ps], axis=0))
    np.testing.assert_allclose(load_weights(e.release_dir(2))[n], theta[n] + delta[n], atol=1e-7)
    dp = agg.DpConfig(clip_norm=0.01, noise_multiplier=0.0)
    e2 = Rounds(make_cfg(bundle_dir, tmp_path / "d", dp=dp), weights_only_rebuild)
    for p in ps:
        e2.handle(decoded(p).device_id, p)
    clipped = [agg.clip(decoded(p).deltas, 0.01) for p in ps]  # σ=0: exactly the mean of the clipped updates
    np.testing.assert_allclose(e2.aggregated_delta()[n], sum(c[n] for c in clipped) / 3, atol=1e-7)


def test_momentum_state_survives_restart_and_releases_are_pruned(bundle_dir, tmp_path):
    cfg = make_cfg(bundle_dir, tmp_path, server_opt=ServerOptConfig("fedavgm", 1.0, 0.5), keep_releases=2)
    for r in range(3):
        e = Rounds(cfg, weights_only_rebuild)
        for k in range(3):
            e.handle(f"du{r}{k}", upd(e, f"u{r}{k}", 5, 10 * r + k))
        prev_m = dict(e.opt_state)
        delta = e.aggregated_delta()
        e.close()
        e.store.close()
        if r > 0:  # m' = β m + Δ̄ with m loaded from disk by the new engine
            n = next(iter(delta))
            np.testing.assert_allclose(e.opt_state[f"m:{n}"], 0.5 * prev_m[f"m:{n}"] + delta[n], atol=1e-7)
    kept = sorted(p.name for p in (tmp_path / "releases").glob("v*"))
    assert kept == ["v3", "v4"]
    lines = fleet_rounds_lines(tmp_path)
    assert len(lines) == 1 + 4  # header, rounds 1-3 closed, round 4 open
    assert lines[3].split()[:5] == ["3", "3", "4", "any", "3"]
    assert lines[4].split()[:5] == ["4", "4", "open", "any", "0"]


def test_rollback_publishes_old_weights_as_next_version(bundle_dir, tmp_path):
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    for k in range(3):
        e.handle(f"du{k}", upd(e, f"u{k}", 5, k))
    e.close()
    e.store.close()
    # Execute
    m = rollback(tmp_path, 1, weights_only_rebuild)
    with pytest.raises(OpsError, match="v9 is not kept"):
        rollback(tmp_path, 9, weights_only_rebuild)
    # Assert: v3 = weights of v1, and a restarted engine serves v3 in round 3
    e2 = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    assert m.version == 3 and (e2.version, e2.round) == (3, 3)
    w1, w3 = load_weights(tmp_path / "releases" / "v1"), load_weights(tmp_path / "releases" / "v3")
    assert all(np.array_equal(w1[k], w3[k]) for k in w1)
    line = fleet_rounds_lines(tmp_path)[2]
    assert "abandoned" in line and line.split()[:3] == ["2", "2", "—"]  # round 2 never closed into a release


def test_crash_after_release_written_before_commit_redoes_the_close(bundle_dir, tmp_path):
    # Prepare: three accepted updates, then a close that dies after writing v2 but before the commit
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    for k in range(3):
        e.handle(f"du{k}", upd(e, f"u{k}", 5, k))
    theta = e.aggregated_delta()
    weights_only_rebuild(e.release_dir(1), {n: a + 1 for n, a in load_weights(e.release_dir(1)).items()}, 2,
                         e.release_dir(2))  # fmt: skip
    e.store.close()
    time.sleep(1.1)  # a later close must still stamp the release with the round's time, not its own
    # Execute: restart; the round is still open with its three updates, and closes again
    e2 = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    assert (e2.version, e2.round, e2.count) == (1, 1, 3) and e2.ready()
    e2.close()
    # Assert: v2 now holds θ1 + Δ̄, not the half-finished attempt, and is stamped with the round's opening
    w1, w2 = load_weights(e2.release_dir(1)), load_weights(e2.release_dir(2))
    assert verify_bundle(e2.release_dir(2)).created == utc_now(e2.store.round_opened(1))
    for n, d in theta.items():
        np.testing.assert_allclose(w2[n], w1[n] + d, atol=1e-7)


def test_rollback_cli_errors_are_one_line(bundle_dir, tmp_path, capsys):
    from cli import main
    from coordinator.state import StateLayout

    Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild).store.close()
    assert main(["coordinator", "rollback", "--to", "7", "--state", str(tmp_path)]) == 2
    assert "release v7 is not kept (kept: v1)" in capsys.readouterr().err
    lock = StateLayout(tmp_path).lock("testing")  # a running coordinator holds the lock
    try:
        assert main(["coordinator", "rollback", "--to", "1", "--state", str(tmp_path)]) == 2
        assert "in use by another process" in capsys.readouterr().err
    finally:
        lock.close()


def test_every_invited_device_reporting_closes_a_round_only_at_its_quorum(bundle_dir, tmp_path):
    from coordinator.server import Coordinator

    c = Coordinator(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)  # not started: no broker needed
    try:
        c.participants = ["d1", "d2"]
        c.rounds.handle("d1", upd(c.rounds, "u1", 5, 1, dev="d1"))
        assert not c.ready()  # 1 of min_updates=3, d2 still missing
        c.rounds.handle("d2", upd(c.rounds, "u2", 5, 2, dev="d2"))
        assert not c.ready()  # every invitee reported, but 2 < 3: the round waits for its deadline
        c.rounds.handle("d3", upd(c.rounds, "u3", 5, 3, dev="d3"))
        assert c.ready()
    finally:
        c.rounds.store.close()
        c._lock.close()


def test_coordinator_restarted_with_a_full_round_closes_it_before_taking_more(bundle_dir, tmp_path):
    from coordinator.server import Coordinator

    # Prepare: min_updates=3 updates committed, then a crash before the close (the store is simply dropped)
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    for k in range(3):
        e.handle(f"du{k}", upd(e, f"u{k}", 5, k))
    e.store.close()
    coord = Coordinator(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)  # not started: publishes are queued
    late = upd(coord.rounds, "late", 5, 9, dev="dlate")
    # Execute: the (re)connection, then a fourth update for round 1
    coord.serve_batch([("", b"connected")])
    coord.serve_batch([(coord.topics.device("dlate", "update"), late)])
    # Assert: round 1 closed with exactly its three updates; the late one is folded into round 2, damped
    assert (coord.rounds.version, coord.rounds.round) == (2, 2)
    assert next(r for r in coord.rounds.store.rounds() if r["round"] == 1)["accepted"] == 3
    assert coord.rounds.rejected == {} and coord.rounds.count == 1
    assert coord.rounds.store.accepted(2)[0].weight == pytest.approx(5 / 2**0.5)  # n·α(1), α(s) = 1/√(1+s)
    coord.rounds.store.close()
    coord._lock.close()


def test_async_rollback_refuses_updates_computed_on_the_abandoned_releases(bundle_dir, tmp_path):
    # Prepare: async, v1 → v2 (the "bad" release); stale optimizer state left by a close that crashed
    cfg = make_cfg(bundle_dir, tmp_path, mode="async", buffer_size=2, max_staleness=5)
    e = Rounds(cfg, weights_only_rebuild)
    for k in range(2):
        e.handle(f"du{k}", upd(e, f"u{k}", 4, k, rnd=None))
    e.close()
    on_bad = upd(e, "on-v2", 4, 7, base=2, rnd=None)
    e.store.close()
    (tmp_path / "opt").mkdir(exist_ok=True)
    (tmp_path / "opt" / "v3.fedavg.safetensors").write_bytes(b"momentum of an abandoned close")
    (tmp_path / "spool" / "r0.log").write_bytes(b"left over")  # a closed round's log a crash left behind
    # Execute: roll back to v1 (published as v3), restart
    rollback(tmp_path, 1, weights_only_rebuild)
    e2 = Rounds(cfg, weights_only_rebuild)
    # Assert: an in-flight update on v2 is stale although within max_staleness; one on v3 is accepted
    assert e2.version == 3 and e2.handle("don-v2", on_bad).reason == "stale_base_version"
    assert e2.handle("don-v3", upd(e2, "on-v3", 4, 8, rnd=None)).status == "accepted"
    assert not (tmp_path / "opt" / "v3.fedavg.safetensors").exists() and e2.opt_state == {}
    assert not (tmp_path / "spool" / "r0.log").exists()


def test_a_restart_with_another_server_optimizer_starts_its_state_afresh(bundle_dir, tmp_path):
    # Prepare: FedAvgM momentum saved with v2
    e = Rounds(make_cfg(bundle_dir, tmp_path, server_opt=ServerOptConfig("fedavgm", 1.0, 0.9)), weights_only_rebuild)
    for k in range(3):
        e.handle(f"du{k}", upd(e, f"u{k}", 5, k))
    e.close()
    e.store.close()
    # Execute: the operator restarts with FedAdam
    e2 = Rounds(make_cfg(bundle_dir, tmp_path, server_opt=ServerOptConfig("fedadam", 0.1)), weights_only_rebuild)
    # Assert: FedAdam does not take FedAvgM's momentum as its first moment (with v = 0 that is a huge step)
    assert e.opt_state and e2.opt_state == {}


def test_a_restarted_coordinator_keeps_when_devices_were_last_seen(bundle_dir, tmp_path):
    from coordinator.store import Store

    # Prepare: a status seen an hour ago
    store = Store(tmp_path / "state.sqlite")
    store.see_devices([("d1", {"state": "idle", "version": 1})])
    store.db.execute("UPDATE devices SET last_seen = last_seen - 3600")
    # Execute: the broker re-delivers the same retained status after a restart, then a new one arrives
    store.see_devices([("d1", {"state": "idle", "version": 1})])
    kept = store.devices()[0]["last_seen"]
    store.see_devices([("d1", {"state": "training", "version": 1})])
    # Assert: the re-delivery did not make the device look alive now; the real change did
    assert time.time() - kept > 3500 and time.time() - store.devices()[0]["last_seen"] < 60
    store.close()


def test_selection_redraws_at_a_reannounce_and_survives_a_restart(bundle_dir, tmp_path):
    from coordinator.server import Coordinator

    # Prepare: 30 online devices, a target of 5 (6 invited)
    cfg = make_cfg(bundle_dir, tmp_path, target_participants=5, over_selection=1.2)
    coord = Coordinator(cfg, weights_only_rebuild)
    coord.statuses = {f"d{k:02d}": {"state": "idle"} for k in range(30)}
    # Execute: select, re-select in the same round (a re-announce), open the round, restart
    coord.select_participants()
    first = coord.participants
    coord.select_participants()
    coord.publish_round()  # opens the round with the invited list (publishing is queued: not connected)
    invited = coord.participants
    coord.rounds.store.close(), coord._lock.close()
    again = Coordinator(cfg, weights_only_rebuild)
    # Assert
    assert len(first) == 6 and first != invited
    assert again.participants == invited and again.selected
    again.rounds.store.close(), again._lock.close()


def test_late_updates_of_earlier_rounds_are_folded_with_a_staleness_weight_up_to_max_staleness(bundle_dir, tmp_path):
    # Prepare: round 1 closes on v1; two devices finish round 1 late, one more release later
    e = Rounds(make_cfg(bundle_dir, tmp_path, max_staleness=1), weights_only_rebuild)
    late = [upd(e, f"late{k}", 10, 10 + k) for k in range(2)]  # round 1 on v1
    for k in range(3):
        e.handle(f"d{k}", upd(e, f"a{k}", 10, k, dev=f"d{k}"))
    e.close()  # → v2, round 2
    fresh = upd(e, "b0", 30, 5)
    # Execute
    v = [e.handle(decoded(p).device_id, p) for p in (late[0], fresh)]
    e.handle("d1", upd(e, "b1", 10, 6, dev="d1"))
    e.handle("d2", upd(e, "b2", 10, 7, dev="d2"))
    e.close()  # → v3, round 3: the other late update is now 2 releases old
    too_old = e.handle(decoded(late[1]).device_id, late[1])
    # Assert: used with weight n·α(1) in round 2; beyond max_staleness it is refused; a wrong round still is
    assert [x.status for x in v] == ["accepted", "accepted"]
    assert too_old.status == "rejected" and too_old.reason == "stale_base_version"
    future = upd(e, "f", 10, 8, rnd=7, dev="df")
    assert e.handle("df", future).reason == "wrong_round"
    e.store.close()


def test_one_device_cannot_hijack_an_update_id_outweigh_the_fleet_or_fill_a_round(bundle_dir, tmp_path):
    # Prepare: min_updates 3; the default recipe (20 steps × 32) bounds a claim at 640 samples
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    stolen = upd(e, "vic-r1-v1", 5, 1, dev="att")  # the victim's next id, on the attacker's own topic
    greedy = [upd(e, f"att-{k}", 10**14, 10 + k, dev="att") for k in range(3)]
    # Execute
    first = e.handle("att", stolen)
    victim = e.handle("vic", upd(e, "vic-r1-v1", 5, 2, dev="vic"))
    more = [e.handle("att", p) for p in greedy]
    # Assert: the victim's update counts (ids belong to their device); the attacker counts once in the round,
    # and its 10^14-sample claim weighs as 640 samples; two devices do not make a round of three
    assert (first.status, victim.status) == ("accepted", "accepted")
    assert [v.reason for v in more] == ["second_update_for_base"] * 3
    assert e.devices_counted == 2 and not e.ready()
    assert max(r.weight for r in e.store.accepted(1)) == 5.0  # only the two 5-sample updates were counted
    e.handle("big", upd(e, "big-1", 10**14, 4, dev="big"))
    assert e.store.accepted(1)[-1].weight == 20 * 32 and e.ready()
    e.store.close()


def test_a_store_from_before_device_keyed_ids_is_migrated(bundle_dir, tmp_path):
    import sqlite3

    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    e.handle("d1", upd(e, "u1", 5, 1, dev="d1"))
    e.store.close()
    db = sqlite3.connect(tmp_path / "state.sqlite")  # rebuild the table as the old schema had it
    db.executescript(
        "ALTER TABLE updates RENAME TO u; CREATE TABLE updates (update_id TEXT PRIMARY KEY, round INTEGER NOT NULL, "
        "seq INTEGER NOT NULL, device_id TEXT NOT NULL, num_samples INTEGER NOT NULL, base_version INTEGER NOT NULL, "
        "weight REAL NOT NULL, spool_offset INTEGER NOT NULL, spool_bytes INTEGER NOT NULL, received REAL NOT NULL);"
        "INSERT INTO updates SELECT * FROM u; DROP TABLE u;"
    )
    db.close()
    again = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    assert again.count == 1 and ("d1", "u1") in again.store.accepted_ids
    assert again.handle("d2", upd(again, "u1", 5, 2, dev="d2")).status == "accepted"  # same id, other device
    again.store.close()


def test_an_update_far_larger_than_the_last_rounds_median_is_clipped_to_k_times_it(bundle_dir, tmp_path):
    # Prepare: round 1 of three honest updates sets the reference (their median norm)
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)
    for k in range(3):
        p = upd(e, f"h{k}", 10, k)
        e.handle(decoded(p).device_id, p)
    honest = [agg.l2_norm(decoded(upd(e, f"h{k}", 10, k)).deltas) for k in range(3)]
    e.close()
    theta = load_weights(e.release_dir(2))
    # Execute: round 2, two honest devices and one sending a 1000× larger Δ (the same sample claim)
    attack = decoded(upd(e, "evil", 10, 9))
    attack.deltas.update({k: 1000 * v for k, v in attack.deltas.items()})
    payloads = [upd(e, "h3", 10, 3), upd(e, "h4", 10, 4), encode_update(attack)]
    for p in payloads:
        assert e.handle(decoded(p).device_id, p).status == "accepted"
    e.store.close()
    e = Rounds(make_cfg(bundle_dir, tmp_path), weights_only_rebuild)  # the reference survives a restart
    e.close()
    # Assert: the attacker moved the model by at most 3 × median / 3 devices, not by its 1000×
    step = np.sqrt(sum(((load_weights(e.release_dir(3))[n] - theta[n]) ** 2).sum() for n in e.shapes))
    assert e.norm_ref > 0 and step <= (3 * float(np.median(honest)) + 2 * max(honest)) / 3 * 1.001
    assert step >= 0.5 * float(np.median(honest))  # honest updates still count

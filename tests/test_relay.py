"""Site relays without MQTT (protocol v1.4): a relay's combined updates fold exactly as its devices' updates would.

`Rounds` (the coordinator's durable core) takes the same device updates once flat and once through relays
(`RelayState`, the relay's durable core); the releases must agree within 1e-6. Also: the relay's crash safety,
and what the coordinator refuses from a relay (hostile or merely misconfigured).
"""

from dataclasses import replace

import numpy as np
import pytest

from coordinator import aggregate as agg
from coordinator.aggregate import DpConfig
from coordinator.relay_state import Part, RelayState
from coordinator.rounds import Rounds
from coordinator.validate import Rules
from edgelearn import relaying
from edgelearn.bundle import load_weights
from edgelearn.protocol import Update, decode_update, encode_update, read_metadata
from tests.test_coordinator_rounds import make_cfg, weights_only_rebuild


def device_update(e: Rounds, dev: str, n: int, seed: int, scale: float = 1.0, base: int | None = None) -> bytes:
    rng = np.random.default_rng(seed)
    deltas = {k: (scale * rng.normal(0, 0.01, s)).astype(np.float32) for k, s in e.shapes.items()}
    base = base or e.version
    return encode_update(
        Update(f"u-{dev}-{base}", dev, e.manifest.model_id, base, n, deltas, e.round - e.version + base)
    )


def relay_rules(e: Rounds) -> Rules:
    return Rules(e.manifest.model_id, e.shapes, e.version, e.round, max_staleness=4)


def through_relay(state: RelayState, e: Rounds, payloads: list[bytes]) -> list[Part]:
    verdicts = state.accept([(decode_update(p).device_id, p) for p in payloads], relay_rules(e))
    assert [v.status for v in verdicts] == ["accepted"] * len(payloads), verdicts
    terms = e.relay_terms()
    assert terms is not None
    return state.flush(terms, e.manifest.model_id, e.shapes)


def fold_flat(e: Rounds, payloads: list[bytes]) -> None:
    verdicts = e.handle_batch([(decode_update(p).device_id, p) for p in payloads])
    assert [v.status for v in verdicts] == ["accepted"] * len(payloads), verdicts


def fold_relayed(e: Rounds, parts) -> None:
    verdicts = e.handle_batch([(decode_update(p.payload).device_id, p.payload) for p in parts], relayed=True)
    assert [v.status for v in verdicts] == ["accepted"] * len(parts), verdicts


def assert_same_release(a: Rounds, b: Rounds, atol: float = 1e-6) -> None:
    wa, wb = load_weights(a.release_dir(a.version)), load_weights(b.release_dir(b.version))
    assert a.version == b.version
    worst = max(float(np.abs(wa[n] - wb[n]).max()) for n in wa)
    assert worst <= atol, f"releases differ by {worst}"


def two_rounds(bundle_dir, tmp_path, **cfg):
    """Round 1: 9 devices at 3 sites; round 2 the same plus an attacker's 1000× update (clipped to 3 × the median of
    round 1's norms) and a device claiming far more samples than a round allows (capped at n_max)."""
    flat = Rounds(make_cfg(bundle_dir, tmp_path / "flat", min_updates=9, **cfg), weights_only_rebuild)
    tree = Rounds(make_cfg(bundle_dir, tmp_path / "tree", min_updates=3, **cfg), weights_only_rebuild)
    sites = [RelayState(tmp_path / f"relay{s}", f"site{s}") for s in range(3)]
    for rnd in (1, 2):
        per_site = [[device_update(flat, f"s{s}d{k}", 10 + 7 * k + s, 100 * rnd + 10 * s + k) for k in range(3)]
                    for s in range(3)]  # fmt: skip
        if rnd == 2:
            per_site[1][2] = device_update(flat, "s1d2", 20, 999, scale=1000.0)
            per_site[2][0] = device_update(flat, "s2d0", 10**6, 998)
        fold_flat(flat, [p for site in per_site for p in site])
        for state, payloads in zip(sites, per_site, strict=True):
            fold_relayed(tree, through_relay(state, tree, payloads))
        assert flat.ready() and tree.ready() and tree.count == flat.count == 9
        assert sorted(tree.devices) == sorted(flat.devices) and np.allclose(sorted(tree.norms), sorted(flat.norms))
        flat.close(), tree.close()
    return flat, tree, sites


def test_fedavg_through_three_relays_equals_the_flat_fold_with_clipping_and_sample_caps(bundle_dir, tmp_path):
    flat, tree, sites = two_rounds(bundle_dir, tmp_path)
    assert_same_release(flat, tree)
    assert flat.norm_ref == pytest.approx(tree.norm_ref, rel=1e-6)  # the next round's clip reference too
    assert [len(s.outstanding()) for s in sites] == [2, 2, 2]  # one part per round, none acked here


def test_central_dp_through_relays_equals_the_flat_fold(bundle_dir, tmp_path):
    flat, tree, _ = two_rounds(bundle_dir, tmp_path, dp=DpConfig(0.5, 0.0))
    terms = tree.relay_terms()
    assert terms is not None and terms.weighting == "uniform" and terms.clip_norm is not None and terms.clip_norm <= 0.5
    assert_same_release(flat, tree)


def test_a_relay_combination_is_the_weighted_clipped_mean_of_its_devices():
    rng = np.random.default_rng(0)
    deltas = [{"w": rng.normal(size=(3, 4)).astype(np.float32)} for _ in range(4)]
    weights, clip = [1.0, 5.0, 2.0, 9.0], 1.5
    mean, norms = agg.partial_mean(deltas, weights, clip)
    expected = sum(w * agg.clip(d, clip)["w"] for d, w in zip(deltas, weights, strict=True)) / sum(weights)
    np.testing.assert_allclose(mean["w"], expected, rtol=1e-5)
    assert norms == [agg.l2_norm(d) for d in deltas]


def test_a_restarted_coordinator_refolds_relayed_updates_from_its_spool(bundle_dir, tmp_path):
    # Prepare: two of three sites' parts are in before the coordinator stops
    cfg = make_cfg(bundle_dir, tmp_path / "tree", min_updates=6)
    tree = Rounds(cfg, weights_only_rebuild)
    flat = Rounds(make_cfg(bundle_dir, tmp_path / "flat", min_updates=6), weights_only_rebuild)
    per_site = [[device_update(flat, f"s{s}d{k}", 10 + k, 10 * s + k) for k in range(2)] for s in range(3)]
    for s in range(2):
        fold_relayed(tree, through_relay(RelayState(tmp_path / f"r{s}", f"site{s}"), tree, per_site[s]))
    tree.store.close()
    # Execute: restart, the third site's part arrives
    tree = Rounds(cfg, weights_only_rebuild)
    assert tree.count == 4 and tree.devices_counted == 4
    fold_relayed(tree, through_relay(RelayState(tmp_path / "r2", "site2"), tree, per_site[2]))
    fold_flat(flat, [p for site in per_site for p in site])
    tree.close(), flat.close()
    # Assert
    assert_same_release(flat, tree)


def test_the_coordinator_refuses_what_a_relay_may_not_claim(bundle_dir, tmp_path):
    # Prepare: one honest part of two devices
    e = Rounds(make_cfg(bundle_dir, tmp_path / "c", min_updates=9), weights_only_rebuild)
    [part] = through_relay(RelayState(tmp_path / "r", "siteA"), e, [device_update(e, f"d{k}", 10, k) for k in (1, 2)])
    u, meta = decode_update(part.payload), read_metadata(part.payload)

    def forged(uid: str, relay: str = "siteA", **meta_changes: str) -> bytes:
        return encode_update(replace(u, update_id=uid, device_id=relay), {**meta, **meta_changes})

    cases = {
        "bad_relay_metadata": forged("p1", relay_devices='["d1","d1"]'),
        "bad_norms": forged("p2", relay_norms="[1.0]"),
        "relay_weighting_mismatch": forged("p3", relay_weighting="uniform"),
    }
    verdicts = e.handle_batch([("siteA", p) for p in cases.values()], relayed=True)
    assert [v.reason for v in verdicts] == ["bad_relay_metadata", "bad_relay_metadata", "relay_weighting_mismatch"]
    # Execute: the honest part, then a second relay claiming one of its devices, then a device sending directly
    first = e.handle_batch([("siteA", part.payload)], relayed=True)[0]
    twice = e.handle_batch([("siteB", forged("p4", "siteB", relay_devices='["d2","x9"]'))], relayed=True)[0]
    direct = e.handle("d1", device_update(e, "d1", 10, 1))
    again = e.handle_batch([("siteA", part.payload)], relayed=True)[0]
    # Assert: counted once each; a relay's update id is its own (another relay's is not a duplicate of it)
    assert first.status == "accepted" and again.status == "duplicate"
    assert (twice.status, twice.reason) == ("rejected", "device_counted_twice")
    assert (direct.status, direct.reason) == ("rejected", "second_update_for_base")
    assert e.count == 2 and e.devices_counted == 2


def test_a_rule_that_does_not_decompose_takes_no_relayed_updates(bundle_dir, tmp_path):
    e = Rounds(make_cfg(bundle_dir, tmp_path / "c", aggregator="median"), weights_only_rebuild)
    plain = Rounds(make_cfg(bundle_dir, tmp_path / "p"), weights_only_rebuild)
    [part] = through_relay(RelayState(tmp_path / "r", "siteA"), plain, [device_update(e, "d1", 10, 1)])
    v = e.handle_batch([("siteA", part.payload)], relayed=True)[0]
    assert e.relay_terms() is None and (v.status, v.reason) == ("rejected", "relay_not_supported:median")


def test_a_relay_counts_each_device_once_and_an_interrupted_flush_is_redone_with_the_same_ids(bundle_dir, tmp_path):
    # Prepare: three accepted updates, a re-send, and a second update of one device for the same base
    e = Rounds(make_cfg(bundle_dir, tmp_path / "c"), weights_only_rebuild)
    state = RelayState(tmp_path / "r", "siteA")
    payloads = [device_update(e, f"d{k}", 10, k) for k in range(3)]
    second = encode_update(replace(decode_update(payloads[0]), update_id="other"))
    verdicts = state.accept([(f"d{k}", p) for k, p in enumerate(payloads)] + [("d1", payloads[1]), ("d0", second)],
                            relay_rules(e))  # fmt: skip
    assert [v.status for v in verdicts] == ["accepted"] * 3 + ["duplicate", "rejected"]
    terms = e.relay_terms()
    assert terms is not None
    # Execute: a crash after the flush's intent was committed, before its parts were written
    state.store.set_meta({"flush_seq": state.unsent()[-1].seq})
    state.close()
    state = RelayState(tmp_path / "r", "siteA")
    late = device_update(e, "d3", 10, 3)
    state.accept([("d3", late)], relay_rules(e))
    parts = state.flush(terms, e.manifest.model_id, e.shapes)
    again = state.flush(terms, e.manifest.model_id, e.shapes)
    # Assert: the redone flush holds exactly the three it meant; the fourth comes in the next one; acks clear them
    assert [p.update_id for p in parts] == ["r1b1s1-3"] and [p.update_id for p in again] == ["r1b1s4-4"]
    assert relaying.read_relay_info(read_metadata(parts[0].payload)).devices == ("d0", "d1", "d2")
    assert [p.update_id for p in state.outstanding()] == ["r1b1s1-3", "r1b1s4-4"]
    assert state.acked("r1b1s1-3", "accepted") and not state.acked("r1b1s1-3", "accepted")
    assert state.acked("r1b1s4-4", "rejected") and (state.parts_dir / "rejected" / "r1b1s4-4.safetensors").exists()
    assert not state.outstanding() and not list(state.spool.folder.glob("*.log"))


def test_a_site_late_for_its_round_is_folded_as_its_devices_late_updates_would_be(bundle_dir, tmp_path):
    # Prepare: round 1 closes on sites A and B; site C's devices reported on release 1 but its uplink was down
    flat = Rounds(make_cfg(bundle_dir, tmp_path / "flat", min_updates=6), weights_only_rebuild)
    tree = Rounds(make_cfg(bundle_dir, tmp_path / "tree", min_updates=6), weights_only_rebuild)
    sites = [RelayState(tmp_path / f"r{s}", f"site{s}") for s in range(3)]
    r1 = [[device_update(flat, f"s{s}d{k}", 10 + k, 10 * s + k) for k in range(3)] for s in range(3)]
    late = sites[2].accept([(decode_update(p).device_id, p) for p in r1[2]], relay_rules(tree))
    assert [v.status for v in late] == ["accepted"] * 3
    fold_flat(flat, r1[0] + r1[1])
    for s in (0, 1):
        fold_relayed(tree, through_relay(sites[s], tree, r1[s]))
    flat.close(), tree.close()
    # Execute: round 2 takes A and B's fresh updates and C's late ones (flat: each device's; tree: C's one part)
    r2 = [[device_update(flat, f"s{s}d{k}", 20 + k, 100 + 10 * s + k) for k in range(3)] for s in range(2)]
    fold_flat(flat, r2[0] + r2[1] + r1[2])
    for s in (0, 1):
        fold_relayed(tree, through_relay(sites[s], tree, r2[s]))
    terms = tree.relay_terms()
    assert terms is not None
    [part] = sites[2].flush(terms, tree.manifest.model_id, tree.shapes)
    fold_relayed(tree, [part])
    assert decode_update(part.payload).base_version == 1 and tree.count == flat.count == 9
    flat.close(), tree.close()
    # Assert: the same release, staleness weight 1/√2 on the late site as on each of its devices
    assert_same_release(flat, tree)


def test_a_relay_rejects_bad_device_input_with_a_reason_and_keeps_nothing_of_it(bundle_dir, tmp_path):
    e = Rounds(make_cfg(bundle_dir, tmp_path / "c"), weights_only_rebuild)
    state = RelayState(tmp_path / "r", "siteA")
    good = decode_update(device_update(e, "d1", 10, 1))
    nan = {k: np.full_like(v, np.nan) for k, v in good.deltas.items()}
    items = [
        ("d1", b"\x00" * 40),  # not safetensors
        ("d2", device_update(e, "d1", 10, 1)),  # metadata names another device than the topic
        ("d1", encode_update(replace(good, update_id="nan", deltas=nan))),
        ("d1", encode_update(replace(good, update_id="old", base_version=1, round=None))),  # no round in a round
        ("d1", device_update(e, "d1", 10, 1)),
    ]
    verdicts = state.accept(items, relay_rules(e))
    assert [(v.status, v.reason) for v in verdicts] == [
        ("rejected", "not_safetensors"), ("rejected", "device_id_mismatch"), ("rejected", "not_finite"),
        ("rejected", "wrong_round"), ("accepted", None),
    ]  # fmt: skip
    assert [r.device_id for r in state.unsent()] == ["d1"]

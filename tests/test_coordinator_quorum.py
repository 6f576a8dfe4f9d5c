"""A round never opens smaller than its quorum (issue: selection while the fleet is still coming online).

The coordinator is driven through its own loop (`serve_batch`) without a broker: publishes are queued by
the unstarted MQTT client, statuses and updates are fed as the network thread would."""

import time

import pytest

from coordinator.selection import may_open, top_up
from coordinator.server import Coordinator
from edgelearn.protocol import RoundMsg, encode_status
from tests.test_coordinator_rounds import make_cfg, upd, weights_only_rebuild


def test_may_open_needs_the_over_selected_quorum_or_min_updates_after_the_wait():
    assert not may_open(3, 3, 1.3, waited_s=0, wait_s=60)  # ⌈3·1.3⌉ = 4 needed
    assert may_open(4, 3, 1.3, waited_s=0, wait_s=60)
    assert may_open(3, 3, 1.3, waited_s=61, wait_s=60)  # after the wait: what is there, if it meets the quorum
    assert not may_open(2, 3, 1.3, waited_s=10**6, wait_s=60)  # never below min_updates


def test_top_up_invites_newcomers_up_to_the_cap_reproducibly():
    assert top_up(["a", "b"], ["a", "b", "c", "d", "e"], 3, 1.0, "s") == top_up(["a", "b"], list("abcde"), 3, 1.0, "s")
    grown = top_up(["a", "b"], ["a", "b", "c", "d", "e"], 3, 1.0, "s")
    assert len(grown) == 3 and {"a", "b"} < set(grown)
    assert top_up(["a", "b", "c"], list("abcde"), 3, 1.0, "s") == ["a", "b", "c"]  # full


@pytest.fixture
def coord(bundle_dir, tmp_path):
    c = Coordinator(make_cfg(bundle_dir, tmp_path, target_participants=3, over_selection=1.3, selection_grace_s=0.0,
                             quorum_wait_s=3600.0), weights_only_rebuild)  # fmt: skip
    c.serve_batch([("", b"connected")])
    yield c
    c.rounds.store.close()
    c._lock.close()


def online(c: Coordinator, *devices: str) -> None:
    c.serve_batch([(c.topics.device(d, "status"), encode_status("idle")) for d in devices])


def test_devices_coming_online_one_by_one_never_open_a_round_below_its_quorum(coord):
    for k in range(3):  # 3 online: ⌈min_updates 3 · 1.3⌉ = 4 are needed
        online(coord, f"d{k}")
        time.sleep(0.01)
        assert not coord.selected and coord.participants is None
    assert coord.metrics.round_waiting._value.get() == 1  # one more device needed
    online(coord, "d3")
    assert coord.selected and coord.participants == ["d0", "d1", "d2", "d3"]
    assert RoundMsg.decode(coord.round_msg().encode()).participants == ("d0", "d1", "d2", "d3")
    assert coord.metrics.round_waiting._value.get() == 0


def test_an_under_subscribed_round_grows_as_devices_come_online(bundle_dir, tmp_path):
    c = Coordinator(make_cfg(bundle_dir, tmp_path, min_updates=2, target_participants=4, over_selection=1.0,
                             selection_grace_s=0.0, quorum_wait_s=3600.0), weights_only_rebuild)  # fmt: skip
    try:
        c.serve_batch([("", b"connected")])
        online(c, "d0", "d1")  # quorum ⌈2·1.0⌉ = 2: the round opens with two of the four it wants
        assert c.participants == ["d0", "d1"]
        online(c, "d2")
        assert c.participants == ["d0", "d1", "d2"]  # the round message's participants grow
        online(c, "d3", "d4")
        assert len(c.participants) == 4 and {"d0", "d1", "d2"} < set(c.participants)  # up to ⌈4·1.0⌉
    finally:
        c.rounds.store.close()
        c._lock.close()


def test_all_invitees_reporting_closes_a_round_only_at_its_quorum(coord):
    online(coord, "d0", "d1", "d2", "d3")
    coord.participants = ["d0", "d1"]  # e.g. a re-announce found only two of them online
    for d in ("d0", "d1"):
        coord.serve_batch([(coord.topics.device(d, "update"), upd(coord.rounds, f"u{d}", 5, 1, dev=d))])
    assert coord.rounds.count == 2 and coord.rounds.round == 1  # every invitee reported, 2 < 3: still open
    online(coord, "d4")
    coord.serve_batch([(coord.topics.device("d2", "update"), upd(coord.rounds, "ud2", 5, 2, dev="d2"))])
    assert coord.rounds.round == 2  # closed at min_updates

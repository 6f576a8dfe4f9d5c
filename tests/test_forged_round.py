"""A forged round with a huge number stops a device only until the next release (trust issue, attack 5): the device
remembers the last round it trained together with its release, and a newer release's rounds are new again."""

import time

from edge_runtime.progress import load_progress
from edge_runtime.schedule import Scheduler
from edgelearn.protocol import LocalConfig, RoundMsg


def offer_and_finish(s: Scheduler, rnd: int, base: int) -> bool:
    """Offer round `rnd` on release `base`; if the scheduler takes it, run it to done. True if it was taken."""
    s.offer_round(RoundMsg(rnd, base, time.time() + 60, 1, None, LocalConfig(1, 1, 0.1)))
    job = s.round_job(base) if s.round_ready(base) else None
    if job is None:
        return False
    s.finished(job, time.monotonic())
    return True


def test_a_forged_huge_round_blocks_only_until_the_next_release(tmp_path):
    s = Scheduler("dev1", tmp_path / "progress.json", 60.0, LocalConfig())
    assert offer_and_finish(s, 10**9, 1)  # the forgery (same release as the device runs)
    assert not offer_and_finish(s, 5, 1)  # this release's real round is lost to it...
    restarted = Scheduler("dev1", tmp_path / "progress.json", 60.0, LocalConfig())
    assert offer_and_finish(restarted, 6, 2)  # ...but the next release's round is trained, after a restart too
    assert not offer_and_finish(restarted, 6, 2)  # and each round still only once
    assert load_progress(tmp_path / "progress.json").last_round_base == 2


def test_progress_saved_before_rounds_named_their_release_still_loads(tmp_path):
    (tmp_path / "progress.json").write_text('{"last_round": 7, "async_seq": 2}')
    p = load_progress(tmp_path / "progress.json")
    assert (p.last_round, p.async_seq, p.last_round_base) == (7, 2, 0)
    assert p.is_new_round(3, 1) and not p.is_new_round(7, 0)


def test_a_signed_fleets_device_takes_only_rounds_and_acks_its_coordinator_signed(tmp_path):
    # Prepare: the fleet's key, an impostor's key, and a device agent (no broker) that knows the fleet's public key
    import numpy as np

    from edge_runtime.agent import DeviceAgent, DeviceConfig
    from edgelearn.protocol import Ack, Topics
    from edgelearn.signing import generate_keys, load_private, sign_message

    generate_keys(tmp_path / "fleet.key", tmp_path / "fleet.pub")
    generate_keys(tmp_path / "evil.key", tmp_path / "evil.pub")
    fleet, evil = load_private(tmp_path / "fleet.key"), load_private(tmp_path / "evil.key")
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 1, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    cfg = DeviceConfig("mqtt://127.0.0.1:1", "f", "dev1", tmp_path / "state", public_key_path=tmp_path / "fleet.pub")
    agent, t = DeviceAgent(cfg, x, y), Topics("f")
    rnd = RoundMsg(10**9, 1, time.time() + 60, 1, None, LocalConfig(1, 1, 0.1)).encode()
    ack_topic = t.device("dev1", "ack")
    ack = Ack("dev1-r1-v1", "accepted", None, 2).encode()
    agent.outbox.put("dev1-r1-v1", b"an update")
    # Execute / Assert: unsigned, impostor-signed, or signed for another topic: ignored
    for payload in (
        rnd,
        sign_message(rnd, t.rounds_current, evil),
        sign_message(rnd, Topics("g").rounds_current, fleet),
    ):
        agent.handle(t.rounds_current, payload)
        assert agent.schedule.pending_round is None
    week_ago = time.time() - 8 * 24 * 3600  # a signed ack recorded on the broker and replayed after it expired
    for payload in (ack, sign_message(ack, ack_topic, evil), sign_message(ack, t.device("dev2", "ack"), fleet),
                    sign_message(ack, ack_topic, fleet, now_s=week_ago)):  # fmt: skip
        agent.handle(ack_topic, payload)
        assert "dev1-r1-v1" in agent.outbox.pending
    # the coordinator's signature counts (a v1 decoder ignores the extra field)
    agent.handle(t.rounds_current, sign_message(rnd, t.rounds_current, fleet))
    assert agent.schedule.pending_round is not None and agent.schedule.pending_round.round == 10**9
    agent.handle(ack_topic, sign_message(ack, ack_topic, fleet))
    assert "dev1-r1-v1" not in agent.outbox.pending

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

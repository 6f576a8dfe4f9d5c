"""Which local job the device starts next, and what it has finished.

Synchronous mode: the round published on `P/rounds/current`, once its release is active. Asynchronous
mode (the coordinator's retained status says `"mode": "async"`; no round is published): job after job
from the active release with the device's own recipe, numbered 1, 2, … (`seq`), at most one every
`async_interval_s`. What is finished (`Progress`) is saved atomically right after the job's update is
in the outbox, so a job is never trained and sent twice under different ids.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from edge_runtime.learner import Job, JobResult
from edge_runtime.progress import async_due, load_progress, save_progress, update_id_for
from edgelearn.protocol import LocalConfig, RoundMsg, Update

log = logging.getLogger(__name__)
MODES = ("sync", "async")
_ASYNC_ID = re.compile(r"-a([0-9]{1,15})-v[0-9]+$")


DEADLINE_SHARE = 0.8  # of the time left before a round's deadline, what a sized job plans to use
MIN_STEP_SHARE = 0.25  # a sized job takes at least this share of the steps asked (then it may be late)


def sized_steps(asked: int, time_left_s: float, s_per_step: float | None, duty: float) -> int:
    """Steps a round job takes so that it ends before the deadline:
    clamp(⌊DEADLINE_SHARE · time_left · duty / s_per_step⌋, ⌈MIN_STEP_SHARE · asked⌉, asked), where `duty` is
    the share of wall time the budget lets it train (max_train_s_per_hour / 3600, or 1) and `s_per_step` the
    measured seconds per step (None before the first step: `asked`). Fewer steps touch fewer samples, so the
    update also weighs less in FedAvg (n_k)."""
    if s_per_step is None or s_per_step <= 0:
        return asked
    fits = int(DEADLINE_SHARE * max(0.0, time_left_s) * min(1.0, max(duty, 0.0)) / s_per_step)
    return max(min(asked, fits), min(asked, math.ceil(MIN_STEP_SHARE * asked)))


class Scheduler:
    def __init__(
        self, device_id: str, progress_file: Path, async_interval_s: float, async_local: LocalConfig, mu: float = 0.0
    ) -> None:
        self.device_id, self.progress_file, self.mu = device_id, progress_file, mu
        self.async_interval_s, self.async_local = async_interval_s, async_local
        self.progress = load_progress(progress_file)
        self.mode = "sync"  # until the coordinator's status says otherwise
        self.pending_round: RoundMsg | None = None  # for this device, not started yet
        self.round_deadline_unix_s: float | None = None  # of the round last turned into a job
        self.last_async_s: float | None = None  # monotonic time the last asynchronous update was queued

    def recover(self, queued_ids: Iterable[str]) -> None:
        """After a crash between queueing an asynchronous update and saving progress: count the highest
        `-a{seq}-v{base}` already in the outbox as done, so that seq is never reused on a newer base."""
        seqs = [int(m.group(1)) for uid in queued_ids if (m := _ASYNC_ID.search(uid))]
        if seqs and max(seqs) > self.progress.async_seq:
            log.info("%s: async update %d was queued before a crash; continuing after it", self.device_id, max(seqs))
            self.progress = replace(self.progress, async_seq=max(seqs))
            save_progress(self.progress_file, self.progress)

    def set_mode(self, mode: object) -> bool:
        """Follow the coordinator's mode; True if it changed (anything but `sync`/`async` is ignored)."""
        if mode not in MODES or mode == self.mode:
            return False
        self.mode = str(mode)
        return True

    def offer_round(self, rnd: RoundMsg) -> None:
        """Remember a round that includes this device and is newer than the last one it finished."""
        if rnd.includes(self.device_id) and self.progress.is_new_round(rnd.round, rnd.base_version):
            self.pending_round = rnd

    def round_ready(self, version: int) -> bool:
        """The pending round can start or be dropped: its release (or a newer one) is active."""
        return self.pending_round is not None and self.pending_round.base_version <= version

    def round_job(self, version: int) -> Job | None:
        """The pending round as a job if it is for the active release `version` (it is consumed either way)."""
        rnd, self.pending_round = self.pending_round, None
        if rnd is None or rnd.base_version != version:
            return None  # stale: its release has been replaced
        self.round_deadline_unix_s = rnd.deadline_unix_s
        return Job.of(rnd.round, rnd.base_version, rnd.local, self.mu)

    def async_job(self, version: int, now_s: float) -> Job | None:
        """The next asynchronous job from release `version`, if in asynchronous mode and the interval passed."""
        if self.mode != "async" or version < 1 or not async_due(now_s, self.last_async_s, self.async_interval_s):
            return None
        return Job.of(0, version, self.async_local, self.mu, seq=self.progress.async_seq + 1)

    def done_or_stale(self, job: Job, version: int) -> bool:
        """A round job is dropped when done or trained on another release than `version` (its round is
        gone); an asynchronous one only when done: it finishes on its base release (the coordinator
        weighs staleness) and its update is sent with that base_version."""
        if job.seq:
            return job.seq <= self.progress.async_seq
        return job.base_version != version or not self.progress.is_new_round(job.round, job.base_version)

    def update_id(self, job: Job) -> str:
        """`{device_id}-r{round}-v{base}` or `{device_id}-a{seq}-v{base}`, shortened to 64 characters."""
        tag = f"a{job.seq}-v{job.base_version}" if job.seq else f"r{job.round}-v{job.base_version}"
        return update_id_for(self.device_id, tag)

    def update_of(self, res: JobResult, model_id: str, encoding: str) -> Update:
        """The update of a finished job; its id is the same if the job is redone after a crash."""
        job = res.job
        return Update(
            update_id=self.update_id(job),
            device_id=self.device_id,
            model_id=model_id,
            base_version=job.base_version,
            num_samples=res.num_samples,
            deltas=res.deltas,
            round=None if job.seq else job.round,  # asynchronous updates carry no round
            encoding=encoding,
            loss=job.loss,
            train_seconds=job.train_s,
        )

    def finished(self, job: Job, now_s: float) -> None:
        """Record `job` as done (atomic write); call once its update is durably in the outbox."""
        if job.seq:
            self.progress = replace(self.progress, async_seq=job.seq)
            self.last_async_s = now_s
        else:
            self.progress = replace(self.progress, last_round=job.round, last_round_base=job.base_version)
        save_progress(self.progress_file, self.progress)

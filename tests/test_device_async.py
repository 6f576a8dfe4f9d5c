"""Asynchronous mode on the device: no round is published; the device follows the coordinator's retained
status, trains from the active release whenever the budget allows and nothing is unacked, and queues
round-less updates numbered so that a crash never makes it send one job twice under different ids."""

import re
import subprocess
import sys
import time

import numpy as np
import pytest

from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.budget import Budget
from edgelearn.bundle import read_lean_release
from edgelearn.protocol import OFFLINE, Ack, LocalConfig, Topics, decode_update, encode_status
from models.shards import write_shards
from tests.conftest import SERVER_FRACTION
from tests.test_device import release_with_version

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)

ASYNC = encode_status("online", version=1, round=0, mode="async")


def async_agent(tmp_path, steps: int = 3, **extra) -> DeviceAgent:
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 16, (40, 64)).astype(np.float32), rng.integers(0, 10, 40)
    cfg = DeviceConfig("mqtt://127.0.0.1:1", "f", "dev1", tmp_path / "state", budget=Budget(max_rss_mb=None),
                       async_interval_s=0.0, async_local=LocalConfig(steps, 8, 0.05), **extra)  # fmt: skip
    return DeviceAgent(cfg, x, y)


def work_until(agent: DeviceAgent, cond, timeout_s: float = 60.0) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        agent.work()


def queued(agent: DeviceAgent) -> list:
    return [decode_update(p.path.read_bytes()) for p in agent.outbox.pending.values()]


def test_async_updates_carry_no_round_and_wait_for_the_previous_ack(bundle_dir, tmp_path):
    # Prepare: v1 active, the coordinator's mode not known yet (sync until told)
    agent = async_agent(tmp_path)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    for _ in range(5):
        agent.work()
    idle_in_sync_mode = agent.learner.job is None and not agent.outbox.pending
    # Execute: the coordinator's status says async; train until an update is queued, work on, then ack it
    agent.on_coordinator_status(ASYNC)
    work_until(agent, lambda: agent.outbox.pending)
    (first,) = queued(agent)
    for _ in range(5):
        agent.work()
    held_back = agent.learner.job is None and len(agent.outbox.pending) == 1
    agent.on_coordinator_status(OFFLINE)  # the coordinator's Last Will: its mode is unchanged
    agent.on_ack(Ack(first.update_id, "accepted", None, 1).encode())
    work_until(agent, lambda: agent.outbox.pending)
    (second,) = queued(agent)
    # Assert
    assert idle_in_sync_mode and held_back
    assert (first.update_id, first.round, first.base_version) == ("dev1-a1-v1", None, 1)
    assert (second.update_id, second.round) == ("dev1-a2-v1", None)
    assert agent.status_fields()["mode"] == "async" and agent.schedule.progress.async_seq == 2


def test_async_job_resumes_after_a_crash_under_the_same_id_and_is_not_redone(bundle_dir, tmp_path):
    # Prepare: a job of 6 steps checkpointed at every step; the process "dies" after 2 steps
    crashed = async_agent(tmp_path, steps=6, checkpoint_every_s=0.0)
    crashed.on_release(release_with_version(bundle_dir, tmp_path, 1))
    crashed.on_coordinator_status(ASYNC)
    work_until(crashed, lambda: crashed.learner.job is not None and crashed.learner.job.steps_done >= 2)
    # Execute: restart, finish the job; restart again with the update still unacked
    again = async_agent(tmp_path, steps=6)
    resumed = (again.learner.job.seq, again.learner.job.steps_done >= 2)
    again.on_coordinator_status(ASYNC)
    work_until(again, lambda: again.outbox.pending)
    (update,) = queued(again)
    third = async_agent(tmp_path, steps=6)
    third.on_coordinator_status(ASYNC)
    for _ in range(5):
        third.work()
    # Assert: the same job went on under id a1 and was queued once; nothing new starts while it is unacked
    assert resumed == (1, True) and update.update_id == "dev1-a1-v1" and update.round is None
    assert third.learner.job is None and list(third.outbox.pending) == ["dev1-a1-v1"]
    assert third.schedule.progress.async_seq == 1


def test_an_async_update_queued_just_before_a_crash_keeps_its_number(bundle_dir, tmp_path):
    # Prepare: job 1 finishes and its update is queued, then the process dies before device.json is saved
    crashed = async_agent(tmp_path)
    crashed.on_release(release_with_version(bundle_dir, tmp_path, 1))
    crashed.on_coordinator_status(ASYNC)
    work_until(crashed, lambda: crashed.outbox.pending)
    (tmp_path / "state" / "device.json").unlink()  # as if the kill came between the two writes
    # Execute: restart; v2 arrives, the queued update is acked, the next job runs on v2
    again = async_agent(tmp_path)
    again.on_release(release_with_version(bundle_dir, tmp_path, 2))
    again.on_coordinator_status(ASYNC)
    again.on_ack(Ack("dev1-a1-v1", "accepted", None, 1).encode())
    work_until(again, lambda: again.outbox.pending)
    (update,) = queued(again)
    # Assert: job 1 is not trained again as a1 on v2 (counted twice under two ids): the next one is a2
    assert update.update_id == "dev1-a2-v2" and again.schedule.progress.async_seq == 2


def test_a_switch_to_sync_drops_the_running_async_job(bundle_dir, tmp_path):
    # Prepare: an asynchronous job of 50 steps, one step in
    agent = async_agent(tmp_path, steps=50)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    agent.on_coordinator_status(ASYNC)
    work_until(agent, lambda: agent.learner.job is not None)
    # Execute: the coordinator restarts in sync mode
    agent.on_coordinator_status(encode_status("online", version=1, round=1, mode="sync"))
    for _ in range(5):
        agent.work()
    # Assert: no round-less update is queued for a coordinator that would reject it as wrong_round
    assert agent.learner.job is None and not agent.outbox.pending


def test_a_newer_release_mid_job_lets_the_job_finish_on_its_base(bundle_dir, tmp_path):
    # Prepare: an asynchronous job from v1, one step in
    agent = async_agent(tmp_path, steps=4)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    agent.on_coordinator_status(ASYNC)
    work_until(agent, lambda: agent.learner.job is not None and agent.learner.job.steps_done >= 1)
    # Execute: v2 arrives; the job goes on; once acked, the next job starts from v2
    agent.on_release(release_with_version(bundle_dir, tmp_path, 2))
    work_until(agent, lambda: agent.outbox.pending)
    (update,) = queued(agent)
    agent.on_ack(Ack(update.update_id, "accepted", None, 2).encode())
    agent.work()
    # Assert: Δ against v1 sent with base_version 1 (the coordinator weighs its staleness)
    assert agent.version == 2 and (update.update_id, update.base_version) == ("dev1-a1-v1", 1)
    assert agent.learner.job is not None and (agent.learner.job.seq, agent.learner.job.base_version) == (2, 2)


def spawn(*args: str, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli", *args], stdout=log, stderr=subprocess.STDOUT)


def test_async_coordinator_and_two_device_processes_advance_the_release(
    mosquitto, bundle_dir, fleet, recorder, tmp_path
):
    # Prepare: a recorder; an async coordinator (FedBuff K=2) and two device processes with their shards
    t = Topics(fleet)
    rec = recorder([t.model_latest, t.all_devices("update"), t.all_devices("ack")])
    shards = write_shards(tmp_path / "data", 2, SERVER_FRACTION)
    coordinator = ["--bundle", str(bundle_dir), "--state", str(tmp_path / "coord"), "--mode", "async",
                   "--buffer-size", "2"]  # fmt: skip
    device = ["--async-interval", "0.5", "--local-steps", "5", "--local-batch-size", "8"]
    versions, updates, acks = set(), {}, {}
    with (tmp_path / "procs.log").open("wb") as log:
        procs = [spawn("coordinator", "--broker", mosquitto.url, "--fleet", fleet, *coordinator, log=log)]
        for k, shard in enumerate(shards):
            own = ["--id", f"dev{k}", "--state", str(tmp_path / f"dev{k}"), "--data", str(shard)]
            procs.append(spawn("device", "--broker", mosquitto.url, "--fleet", fleet, *own, *device, log=log))
        # Execute: record until release 3 is out (two aggregations of 2 updates)
        try:
            deadline = time.monotonic() + 90
            while 3 not in versions:
                message = rec.next_while_running(procs, tmp_path / "procs.log", deadline)
                if message is None:
                    continue
                topic, payload = message
                if topic == t.model_latest:
                    versions.add(read_lean_release(payload)[0].version)
                elif topic.endswith("/update"):
                    u = decode_update(payload)
                    updates[u.update_id] = u
                else:
                    a = Ack.decode(payload)
                    acks.setdefault(a.update_id, []).append(a.status)  # a re-send is acked "duplicate"
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=30)
    # Assert: the release advanced on updates without a round, from both devices, numbered per device
    accepted = [updates[uid] for uid, statuses in acks.items() if "accepted" in statuses and uid in updates]
    assert {1, 2, 3} <= versions and len(accepted) >= 4
    assert all(u.round is None for u in updates.values())
    assert {u.device_id for u in accepted} == {"dev0", "dev1"}
    assert all(re.fullmatch(rf"{u.device_id}-a[0-9]+-v{u.base_version}", u.update_id) for u in updates.values())
    assert all(p.returncode == 0 for p in procs)

"""Shared fixtures: a real mosquitto on a free loopback port, and one exported bundle per session."""

from __future__ import annotations

import os
import queue
import shutil
import sys
import time
import uuid
from pathlib import Path

import pytest

from edgelearn.broker import Mosquitto
from edgelearn.mqtt import MqttLink

SERVER_FRACTION = 0.05
EXIT_STATUS = pytest.StashKey[int]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[EXIT_STATUS] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End the test process with pytest's own exit status once everything is reported, skipping the C++ static
    destructors that run after Python's shutdown: one of them (in libstdc++, most likely ExecuTorch's or torch's
    teardown) segfaulted after all tests had passed in 2 of 7 full runs on this machine (kernel log; faulthandler is
    already gone then, so no trace), and once before these tests existed. The verdict is unchanged: every test has
    run and been reported. `EDGELEARN_TEST_CLEAN_EXIT=1` keeps the normal shutdown, to chase the crash."""
    if os.environ.get("EDGELEARN_TEST_CLEAN_EXIT") == "1" or EXIT_STATUS not in config.stash:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(config.stash[EXIT_STATUS])


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Mosquitto:
    """A mosquitto process with a generated config; under CI=true a missing mosquitto fails the run."""
    if not (shutil.which("mosquitto") or os.path.exists("/usr/sbin/mosquitto")):
        if os.environ.get("CI") == "true":
            pytest.fail("mosquitto is not installed (make test installs it): CI must run against a real broker")
        pytest.skip("mosquitto is not installed; run `make test` to install it")
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto")).start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits-mlp bundle (int8 XNNPACK), exported once for the whole session."""
    from export.pipeline import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("export") / "bundle"
    export_bundle(ExportConfig(server_fraction=SERVER_FRACTION, epochs=30), out)
    return out


@pytest.fixture
def fleet() -> str:
    """A fresh fleet name per test, so retained messages of one test never reach another."""
    return f"t{uuid.uuid4().hex[:12]}"


class Recorder:
    """Subscribes to topics and queues every (topic, payload) it receives."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.link = MqttLink(
            url, f"rec-{uuid.uuid4().hex[:8]}", topics, lambda t, p: self.messages.put((t, p)), session_expiry_s=0
        )
        assert self.link.start(wait_s=10), "recorder could not connect to the broker"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self.link.publish(topic, payload, retain)

    def next(self, timeout_s: float = 30.0) -> tuple[str, bytes]:
        return self.messages.get(timeout=timeout_s)

    def next_while_running(self, procs: list, log: Path, deadline_s: float) -> tuple[str, bytes] | None:
        """The next message within 1 s (None if none came), failing the test with the end of `log` if a process
        exited or the monotonic `deadline_s` passed."""
        assert time.monotonic() < deadline_s, log.read_text()[-3000:]
        assert all(p.poll() is None for p in procs), log.read_text()[-3000:]
        try:
            return self.messages.get(timeout=1)
        except queue.Empty:
            return None

    def close(self) -> None:
        self.link.stop()


@pytest.fixture
def recorder(mosquitto: Mosquitto):
    made: list[Recorder] = []

    def make(topics: list[str]) -> Recorder:
        made.append(Recorder(mosquitto.url, topics))
        return made[-1]

    yield make
    for r in made:
        r.close()

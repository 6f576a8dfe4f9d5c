"""Crash safety: a real `edgelearn learn` process killed with SIGKILL resumes from its last checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load

from edge_runtime.learner import CHECKPOINT
from edgelearn.protocol import read_metadata

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)

N_SAMPLES = 400


def write_samples(path: Path) -> None:
    rng = np.random.default_rng(0)
    with path.open("w") as f:
        for _ in range(N_SAMPLES):
            f.write(json.dumps({"x": rng.uniform(0, 16, 64).round(2).tolist(), "y": int(rng.integers(10))}) + "\n")


def learn(bundle_dir: Path, state: Path, samples: Path, steps: int, every_s: float) -> subprocess.Popen:
    args = ["--bundle", str(bundle_dir), "--state", str(state), "--samples", str(samples), "--steps", str(steps)]
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "learn",
            *args,
            "--checkpoint-every",
            str(every_s),
            "--batch-size",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def checkpoint_meta(state: Path) -> dict:
    data = (state / CHECKPOINT).read_bytes()
    load(data)  # parses: not torn
    return json.loads(read_metadata(data)["meta"])


def wait_for(cond, timeout_s: float = 120.0, poll_s: float = 0.05) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(poll_s)


def steps_in_checkpoint(state: Path) -> int:
    try:
        meta = checkpoint_meta(state)
    except FileNotFoundError:
        return 0
    return meta["job"]["steps_done"] if meta["job"] else 0


def tmp_files(state: Path) -> list[str]:
    return [n for n in os.listdir(state) if n.endswith(".tmp")]


def resume_and_finish(bundle_dir: Path, state: Path, samples: Path, killed_at: int) -> list[dict]:
    p = learn(bundle_dir, state, samples, killed_at + 10, every_s=5.0)
    out, _ = p.communicate(timeout=180)
    assert p.returncode == 0, out
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_sigkill_during_training_resumes_from_the_last_checkpoint(bundle_dir, tmp_path):
    # Prepare: a learner that checkpoints every 0.2 s and has taken ≥ 30 steps
    samples, state = tmp_path / "s.jsonl", tmp_path / "state"
    write_samples(samples)
    p = learn(bundle_dir, state, samples, 10**6, every_s=0.2)
    wait_for(lambda: steps_in_checkpoint(state) >= 30)
    # Execute: kill -9 mid-training, then restart it
    p.send_signal(signal.SIGKILL)
    p.wait()
    killed_at = steps_in_checkpoint(state)
    events = resume_and_finish(bundle_dir, state, samples, killed_at)
    # Assert: resumed exactly at the checkpoint, finished, every sample stored once, no temp file left
    assert events[0]["resumed_at_step"] == killed_at
    assert events[-1]["steps_done"] == killed_at + 10
    assert events[-1]["stored"] == N_SAMPLES
    assert (state / "local-weights.safetensors").exists() and not tmp_files(state)


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_intact(bundle_dir, tmp_path):
    # Prepare: a learner that writes a checkpoint after every step
    samples, state = tmp_path / "s.jsonl", tmp_path / "state"
    write_samples(samples)
    torn = False
    for _attempt in range(5):
        p = learn(bundle_dir, state, samples, 10**6, every_s=0.0)
        wait_for(lambda: steps_in_checkpoint(state) >= 5)
        # Execute: kill -9 the moment a temp checkpoint exists
        end = time.monotonic() + 30
        while time.monotonic() < end and not any(n.startswith(f".{CHECKPOINT}") for n in tmp_files(state)):
            pass
        p.send_signal(signal.SIGKILL)
        p.wait()
        torn = any(n.startswith(f".{CHECKPOINT}") for n in tmp_files(state))
        if torn:
            break
    # Assert: the kill hit a write in progress; the checkpoint is the previous whole one; restart resumes from it
    assert torn, "never killed during a checkpoint write"
    killed_at = steps_in_checkpoint(state)
    assert killed_at >= 5
    events = resume_and_finish(bundle_dir, state, samples, killed_at)
    assert events[0]["resumed_at_step"] == killed_at
    assert events[-1]["steps_done"] == killed_at + 10 and events[-1]["stored"] == N_SAMPLES
    assert not tmp_files(state)

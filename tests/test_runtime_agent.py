"""The agent learns a round from a sample stream only (no fixed data), with malformed lines skipped."""

import json
import time

import numpy as np

from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.budget import Budget
from edgelearn.protocol import LocalConfig, RoundMsg, decode_update
from tests.test_device import release_with_version


def test_round_trained_from_a_stream_file_yields_an_update_in_the_outbox(bundle_dir, tmp_path):
    # Prepare: 100 good lines and 3 bad ones; an agent with no fixed data and no broker
    rng = np.random.default_rng(0)
    stream = tmp_path / "stream.jsonl"
    lines = [
        json.dumps({"x": rng.uniform(0, 16, 64).round(2).tolist(), "y": int(rng.integers(10))}) for _ in range(100)
    ]
    stream.write_text("\n".join([*lines[:50], "oops", '{"y": 1}', '{"x": [1], "y": 2}', *lines[50:]]) + "\n")
    no_rss_limit = Budget(max_rss_mb=None)  # the test process holds torch and many programs: not what is tested
    cfg = DeviceConfig("mqtt://127.0.0.1:1", "f", "dev1", tmp_path / "state", samples=str(stream), budget=no_rss_limit)
    agent = DeviceAgent(cfg)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    # Execute: a round of 6 steps of 16
    agent.on_round(RoundMsg(1, 1, time.time() + 60, 1, None, LocalConfig(6, 16, 0.05)).encode())
    end = time.monotonic() + 60
    while agent.last_round < 1 and time.monotonic() < end:
        agent.work()
    # Assert: the update is in the outbox with the samples it used; the bad lines were counted
    assert agent.last_round == 1 and agent.ingest.malformed == 3 and len(agent.store) == 100
    (item,) = agent.outbox.pending.values()
    update = decode_update(item.path.read_bytes())
    assert update.update_id == "dev1-r1-v1" and 16 <= update.num_samples <= 6 * 16
    assert any(np.abs(d).max() > 0 for d in update.deltas.values())
    assert agent.status_fields()["samples"] == {"stored": 100, "accepted": 100, "malformed": 3}

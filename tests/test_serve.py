"""The device's local inference endpoint, driven by a client nobody here wrote (tritonclient's
InferenceServerClient, the Open Inference Protocol's reference client) and by plain HTTP for the rest."""

from __future__ import annotations

import http.client
import json
import threading
import time

import numpy as np
import pytest

from edge_runtime.agent import DeviceAgent, DeviceConfig
from edge_runtime.budget import Budget
from edge_runtime.serve import YIELD_S, start_serving
from edgelearn.protocol import LocalConfig, RoundMsg
from tests.test_device import release_with_version

httpclient = pytest.importorskip("tritonclient.http", reason="tritonclient[http] is a dev dependency (make venv)")
MODEL = "digits-mlp"


@pytest.fixture
def served(bundle_dir, tmp_path):
    cfg = DeviceConfig("mqtt://127.0.0.1:1", "f", "dev1", tmp_path / "state", budget=Budget(max_rss_mb=None))
    agent = DeviceAgent(cfg)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 1))
    server = start_serving(agent, "127.0.0.1", 0)
    yield agent, server.server_address[1]
    server.shutdown()
    server.server_close()


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request(method, path, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


def test_tritonclient_reads_metadata_and_infers_in_json_and_binary(served):
    agent, port = served
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
    meta = client.get_model_metadata(MODEL)
    assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == [-1, 64]
    assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    x = np.random.default_rng(0).uniform(0, 16, (3, 64)).astype(np.float32)
    want = np.stack([agent.active.infer.predict(x[i : i + 1])[0] for i in range(3)])
    for binary in (False, True):
        inp = httpclient.InferInput("input", [3, 64], "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        out = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
        res = client.infer(MODEL, [inp], outputs=out, request_id="r1")
        np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
        assert res.get_response()["model_version"] == "1" and res.get_response()["id"] == "r1"
    res = client.infer(MODEL, [inp])  # no outputs named: tritonclient asks for binary output
    np.testing.assert_allclose(res.as_numpy("logits"), want, atol=1e-5)
    client.close()


@pytest.mark.parametrize(
    "path, body, status, says",
    [
        (f"/v2/models/{MODEL}/infer", b"{not json", 400, "not JSON"),
        (f"/v2/models/{MODEL}/infer", b'{"inputs": []}', 400, "exactly one tensor"),
        (f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 63],
                                                              "data": [0.0] * 63}]}).encode(), 400, "does not match"),
        (f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [{"name": "input", "datatype": "BYTES", "shape": [1, 64],
                                                              "data": [0] * 64}]}).encode(), 400, "datatype"),
        (f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                              "data": ["a"] * 64}]}).encode(), 400, "not a number"),
        (f"/v2/models/{MODEL}/infer", json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 64],
                                                              "data": [1e39] * 64}]}).encode(), 400, "non-finite"),
        ("/v2/models/gpt-9/infer", b"{}", 404, "unknown model"),
        (f"/v2/models/{MODEL}/versions/7/infer", b"{}", 404, "not served"),
        (f"/v2/models/{MODEL}/generate", b"{}", 400, "not a language model"),
        ("/v2/nothing", b"{}", 404, "no route"),
    ],
)  # fmt: skip
def test_bad_requests_get_one_line_errors_and_the_endpoint_keeps_serving(served, path, body, status, says):
    _, port = served
    code, out = request(port, "POST", path, body, {"Content-Type": "application/json"})
    assert code == status and says in json.loads(out)["error"] and "\n" not in json.loads(out)["error"]
    assert request(port, "GET", "/v2/health/live")[0] == 200


def test_a_huge_body_is_refused_unread(served):
    _, port = served
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.putrequest("POST", f"/v2/models/{MODEL}/infer")
    conn.putheader("Content-Length", str(200 * 2**20))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "over" in json.loads(r.read())["error"]
    conn.close()
    assert request(port, "GET", "/v2/health/ready")[0] == 200


def test_feedback_becomes_a_stored_sample_and_bad_feedback_never_does(served):
    agent, port = served
    before = len(agent.store)
    good = json.dumps({"x": [1.0] * 64, "y": 3}).encode()
    code, out = request(port, "POST", f"/v2/models/{MODEL}/feedback", good)
    assert code == 200 and json.loads(out) == {"accepted": True, "stored": before + 1}
    for bad in (
        b'{"x": [1.0], "y": 3}',
        b'{"x": [1.0] * 64, "y": 99}',
        b"\xff\xfe",
        json.dumps({"x": [1.0] * 64, "y": 10}).encode(),
    ):
        code, out = request(port, "POST", f"/v2/models/{MODEL}/feedback", bad)
        assert code == 400 and json.loads(out)["error"].startswith("bad feedback")
    assert len(agent.store) == before + 1
    x, y, _ = agent.store.read(before, 1)
    assert int(y[0]) == 3 and float(x[0][0]) == 1.0


def test_a_new_release_takes_over_without_dropping_a_request(served, bundle_dir, tmp_path):
    agent, port = served
    client = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
    x = np.zeros((1, 64), np.float32)
    versions, errors, stop = [], [], threading.Event()

    def hammer() -> None:
        c = httpclient.InferenceServerClient(url=f"127.0.0.1:{port}")
        while not stop.is_set():
            inp = httpclient.InferInput("input", [1, 64], "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            try:
                versions.append(c.infer(MODEL, [inp]).get_response()["model_version"])
            except Exception as e:  # any failure is what this test is about
                errors.append(e)
        c.close()

    t = threading.Thread(target=hammer)
    t.start()
    time.sleep(0.3)
    agent.on_release(release_with_version(bundle_dir, tmp_path, 2))
    time.sleep(0.3)
    stop.set()
    t.join(10)
    assert errors == [] and versions[0] == "1" and versions[-1] == "2" and len(versions) > 20
    assert client.get_model_metadata(MODEL)["versions"] == ["2"]
    text = request(port, "GET", "/metrics")[1].decode()
    assert f"edgelearn_device_inference_seconds_count {float(len(versions))}" in text
    client.close()


def test_training_waits_while_requests_are_served(served):
    agent, port = served
    rng = np.random.default_rng(1)
    for _ in range(32):
        agent.add_feedback(rng.uniform(0, 16, 64).astype(np.float32), np.int64(rng.integers(10)))
    agent.on_round(RoundMsg(1, 1, time.time() + 60, 1, None, LocalConfig(50, 8, 0.01)).encode())
    for _ in range(3):
        agent.work()
    assert agent.learner.job is not None and agent.learner.job.steps_done >= 1
    done = agent.learner.job.steps_done
    request(port, "GET", f"/v2/models/{MODEL}")
    assert agent.work() is False and agent.learner.job.steps_done == done  # a request just came: inference first
    time.sleep(2 * YIELD_S)
    assert agent.work() is True and agent.learner.job.steps_done == done + 1
    assert agent.status_fields()["serving"] == {} or "p99_ms" in agent.status_fields()["serving"]


def test_a_remote_address_needs_the_explicit_flag(served):
    agent, _ = served
    with pytest.raises(ValueError, match="not a loopback address"):
        start_serving(agent, "0.0.0.0", 0)

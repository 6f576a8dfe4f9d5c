"""The device's local inference endpoint (`edgelearn device --serve HOST:PORT`): the Open Inference Protocol
(KServe v2 REST) over the active release's `infer.pte`, run by the ExecuTorch runtime, plus feedback (a
correction becomes a training sample), text generation for language models and Prometheus metrics.

    GET  /v2/health/live | /v2/health/ready | /v2            server liveness, readiness, metadata
    GET  /v2/models/{name}[/versions/{v}][/ready]            model metadata (v = the active release)
    POST /v2/models/{name}[/versions/{v}]/infer              tensors in, logits out (JSON or binary tensors)
    POST /v2/models/{name}/generate                          lm: {"text_input", "parameters"} → text_output
    POST /v2/models/{name}/feedback                          a sample line's JSON → the device's sample store
    GET  /metrics                                            Prometheus text

Each request reads the active release once, so a release activated meanwhile takes the next request and no
request is dropped. Inference comes first: the agent skips training steps while a request is in flight or came
within `YIELD_S` (`Serving.busy`). The stdlib `ThreadingHTTPServer` (HTTP/1.1 keep-alive) serves; one lock
serializes calls into the ExecuTorch runtime.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from edge_runtime.oip import OipError, decode_infer, encode_infer, model_metadata, split_body
from edgelearn.broker import is_loopback
from models.quality import program_logits

if TYPE_CHECKING:
    from edge_runtime.agent import DeviceAgent
    from edge_runtime.release import Active

log = logging.getLogger(__name__)
YIELD_S = 0.05  # training waits this long after the last inference request
MAX_BODY_BYTES = 4 * 2**20
MAX_GENERATE_BYTES = 512
LATENCY_WINDOW = 2048  # recent requests kept for p50/p99 in the device status
MODEL = r"/v2/models/(?P<name>[^/]+)(?:/versions/(?P<version>[^/]+))?"
Response = tuple[int, bytes, dict[str, str]]


class DeviceMetrics:
    """The endpoint's Prometheus metrics, in their own registry; recent latencies for the status' p50/p99."""

    def __init__(self, agent: DeviceAgent) -> None:
        r = self.registry = CollectorRegistry()
        self.latency = Histogram("edgelearn_device_inference_seconds", "Inference request seconds (HTTP in to out)",
                                 buckets=(1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.1, 1.0),
                                 registry=r)  # fmt: skip
        self.requests = Counter("edgelearn_device_requests", "HTTP requests by route and status", ["route", "code"],
                                registry=r)  # fmt: skip
        steps = Gauge("edgelearn_device_training_steps", "Training steps taken since start", registry=r)
        steps.set_function(lambda: agent.steps_total)
        pauses = Gauge("edgelearn_device_budget_pauses", "Training steps the budget paused since start", registry=r)
        pauses.set_function(lambda: agent.pauses_total)
        self.recent: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def observe(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        if route in ("infer", "generate"):
            self.latency.observe(seconds)
            self.recent.append(seconds)

    def summary(self) -> dict[str, float]:
        """p50/p99 (ms) over the last LATENCY_WINDOW inference requests."""
        if not self.recent:
            return {}
        p50, p99 = np.percentile(np.fromiter(self.recent, float), [50, 99])
        return {"p50_ms": round(1e3 * float(p50), 3), "p99_ms": round(1e3 * float(p99), 3), "n": len(self.recent)}


class Serving:
    """The routes' logic, on the agent's active release and sample store (sockets live in `_Handler`)."""

    def __init__(self, agent: DeviceAgent) -> None:
        self.agent = agent
        self.metrics = DeviceMetrics(agent)
        self._run_lock = threading.Lock()  # the ExecuTorch runtime is not called from two threads at once
        self._state_lock = threading.Lock()
        self.in_flight = 0
        self.last_request_s = 0.0

    def busy(self) -> bool:
        """A request is in flight or came within YIELD_S: training should wait (inference has priority)."""
        return self.in_flight > 0 or time.monotonic() - self.last_request_s < YIELD_S

    def summary(self) -> dict[str, float]:
        return self.metrics.summary()

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[str, Response]:
        """(route name, (status, body, headers)) for one request; never raises for anything a client sends."""
        with self._state_lock:
            self.in_flight += 1
            self.last_request_s = time.monotonic()
        try:
            return self._route(method, path.split("?", 1)[0], headers, body)
        except OipError as e:
            return "error", _json(e.status, {"error": e.message})
        except Exception as e:  # a bug must not take the endpoint down: 500 with its name, logged
            log.exception("inference endpoint failed on %s %s", method, path)
            return "error", _json(500, {"error": f"internal error: {type(e).__name__}"})
        finally:
            with self._state_lock:
                self.in_flight -= 1
                self.last_request_s = time.monotonic()

    def _route(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[str, Response]:
        if method == "GET":
            if path == "/v2/health/live":
                return "live", _json(200, {"live": True})
            if path in ("/v2/health/ready", "/v2"):
                ready = self.agent.active is not None
                doc = {"name": "edgelearn", "version": "1", "extensions": ["binary_tensor_data"]}
                return "ready", _json(200 if ready else 503, doc if path == "/v2" else {"ready": ready})
            if path == "/metrics":
                return "metrics", (200, generate_latest(self.metrics.registry), {"Content-Type": CONTENT_TYPE_LATEST})
            if m := re.fullmatch(MODEL + r"(?P<ready>/ready)?", path):
                active = self._model(m["name"], m["version"])
                return "metadata", _json(200, {"ready": True} if m["ready"] else self._metadata(active))
        elif method == "POST" and (m := re.fullmatch(MODEL + r"/(?P<op>infer|generate|feedback)", path)):
            active = self._model(m["name"], m["version"])
            op = {"infer": self._infer, "generate": self._generate, "feedback": self._feedback}[m["op"]]
            return m["op"], op(active, headers, body)
        raise OipError(404 if method in ("GET", "POST") else 405, f"no route {method} {path[:80]}")

    def _model(self, name: str, version: str | None) -> Active:
        active = self.agent.active
        if active is None:
            raise OipError(503, "no release is active yet")
        if name != active.manifest.model_id:
            raise OipError(404, f"unknown model {name[:64]!r}: this device serves {active.manifest.model_id!r}")
        if version not in (None, str(active.manifest.version)):
            raise OipError(404, f"version {version[:16]!r} is not served (active release: {active.manifest.version})")
        return active

    @staticmethod
    def _metadata(active: Active) -> dict:
        m = active.manifest
        classes = active.classes if active.classes is not None else 256
        return model_metadata(m.model_id, m.version, list(m.input["shape"]), classes, m.task)

    def _run(self, active: Active, x: np.ndarray) -> np.ndarray:
        """Logits of each row, one program call per row (the program's batch is its exported one)."""
        with self._run_lock:
            return program_logits(active.infer, x)

    def _infer(self, active: Active, headers: dict[str, str], body: bytes) -> Response:
        obj, tail = split_body(body, headers.get("inference-header-content-length"))
        req = decode_infer(obj, tail, tuple(active.manifest.input["shape"][1:]))
        y = self._run(active, req.x)
        data, extra = encode_infer(active.manifest.model_id, active.manifest.version, req, y, "logits")
        return 200, data, {"Content-Type": "application/json", **extra}

    def _generate(self, active: Active, headers: dict[str, str], body: bytes) -> Response:
        """Language models: `text_input` and up to MAX_GENERATE_BYTES sampled bytes (`parameters`: max_tokens,
        temperature ≥ 0 (0: the most likely byte), seed), from the program's fixed window of the last bytes."""
        if active.manifest.task != "lm":
            raise OipError(400, f"{active.manifest.model_id} is not a language model: use infer")
        obj, _ = split_body(body, None)
        prompt, params = obj.get("text_input", ""), obj.get("parameters", {})
        if not isinstance(prompt, str) or not isinstance(params, dict):
            raise OipError(400, "needs `text_input` (a string) and optional `parameters` (an object)")
        n, temp, seed = params.get("max_tokens", 64), params.get("temperature", 0.8), params.get("seed", 0)
        if not isinstance(n, int) or not 0 <= n <= MAX_GENERATE_BYTES:
            raise OipError(400, f"max_tokens must be an integer in 0..{MAX_GENERATE_BYTES}")
        if not isinstance(temp, int | float) or not 0 <= temp <= 10 or not isinstance(seed, int):
            raise OipError(400, "temperature must be a number in 0..10 and seed an integer")
        window = int(active.manifest.input["shape"][-1])
        ids, rng = list(prompt.encode()) or [ord("\n")], np.random.default_rng(seed)
        for _ in range(n):
            x = np.asarray([ord(" ")] * max(0, window - len(ids)) + ids[-window:], np.float32)[None]
            logits = self._run(active, x)[0].astype(np.float64)
            if temp <= 0:
                ids.append(int(logits.argmax()))
            else:
                p = np.exp((logits - logits.max()) / temp)
                ids.append(int(rng.choice(len(p), p=p / p.sum())))
        text = bytes(ids[len(prompt.encode()) :]).decode("utf-8", errors="replace")
        return _json(200, {"model_name": active.manifest.model_id, "model_version": str(active.manifest.version),
                           "text_output": text})  # fmt: skip

    def _feedback(self, active: Active, headers: dict[str, str], body: bytes) -> Response:
        """The body is one sample as a JSON line would give it ({"x", "y"} or {"text"}); validated by the release's
        sample format, then added to the store and flushed (fsync) before the 200."""
        try:
            x, y = active.sample_format().parse(body.decode("utf-8", errors="strict"))
        except (ValueError, UnicodeDecodeError) as e:
            raise OipError(400, f"bad feedback: {e}") from None
        stored = self.agent.add_feedback(x, y)
        return _json(200, {"accepted": True, "stored": stored})


def _json(status: int, doc: dict) -> Response:
    return status, json.dumps(doc).encode(), {"Content-Type": "application/json"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client's connection serves many requests
    serving: Serving

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle wait on keep-alive

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def _serve(self, method: str) -> None:
        t0 = time.perf_counter()
        body, refused = self._body(method)
        route, (status, data, headers) = refused or self.serving.handle(
            method, self.path, {k.lower(): v for k, v in self.headers.items()}, body
        )
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.serving.metrics.observe(route, status, time.perf_counter() - t0)

    def _body(self, method: str) -> tuple[bytes, tuple[str, Response] | None]:
        """The request body, or a refusal (411/413) that closes the connection without reading it."""
        if method != "POST":
            return b"", None
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            return b"", ("error", _json(411, {"error": "a POST needs a Content-Length"}))
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            return b"", ("error", _json(413, {"error": f"body of {length} bytes is over {MAX_BODY_BYTES}"}))
        return self.rfile.read(int(length)), None

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def start_serving(agent: DeviceAgent, host: str, port: int, allow_remote: bool = False) -> ThreadingHTTPServer:
    """Serve `agent` on host:port in a daemon thread; the agent's training then yields to requests. A
    non-loopback address needs `allow_remote` (the endpoint has no authentication: anyone who reaches it can
    query the model and add training samples). OSError if the port is taken."""
    if not allow_remote and not is_loopback(host):
        raise ValueError(f"--serve {host}: not a loopback address; the endpoint has no authentication "
                         "(pass --serve-remote to accept that)")  # fmt: skip
    serving = Serving(agent)
    handler: Callable[..., _Handler] = type("Handler", (_Handler,), {"serving": serving})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    agent.serving = serving
    threading.Thread(target=server.serve_forever, name="edgelearn-serve", daemon=True).start()
    log.info("%s: serving the Open Inference Protocol on http://%s:%d/v2", agent.cfg.device_id, host,
             server.server_address[1])  # fmt: skip
    return server

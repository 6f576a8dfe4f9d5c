"""The Open Inference Protocol's tensors (KServe v2 REST, as Triton, KServe and Seldon speak it): decode an infer
request's input and encode the response, in JSON or with the binary tensor extension.

A request body is JSON, or (binary extension) JSON of `Inference-Header-Content-Length` bytes followed by the raw
tensor bytes each input names in `parameters.binary_data_size`. Pure functions; `OipError(status, message)` names
what is wrong in one line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8}
MAX_BATCH = 256


class OipError(Exception):
    """A request the endpoint refuses: HTTP `status` and a one-line `message` (the v2 `{"error": ...}` body)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class InferRequest:
    x: np.ndarray  # float32 (B, *sample shape)
    request_id: str | None
    binary_output: bool  # answer the output with the binary tensor extension


def split_body(body: bytes, header_length: str | None) -> tuple[dict, bytes]:
    """(JSON object, binary tail) of a request body; `header_length` is the Inference-Header-Content-Length."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise OipError(400, "Inference-Header-Content-Length is not an integer") from None
        if not 0 < n <= len(body):
            raise OipError(400, f"Inference-Header-Content-Length {n} is outside the body ({len(body)} bytes)")
        head, tail = body[:n], body[n:]
    else:
        head, tail = body, b""
    try:
        obj = json.loads(head)
    except (ValueError, RecursionError):
        raise OipError(400, "the request body is not JSON") from None
    if not isinstance(obj, dict):
        raise OipError(400, "the request body is not a JSON object")
    return obj, tail


def decode_infer(obj: dict, tail: bytes, sample_shape: tuple[int, ...]) -> InferRequest:
    """The one input tensor of an infer request: datatype any of DTYPES (cast to float32), shape
    (B, *sample_shape) with 1 ≤ B ≤ MAX_BATCH, finite values, data as a JSON list or binary bytes."""
    inputs = obj.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise OipError(400, "the request needs exactly one tensor in `inputs`")
    t = inputs[0]
    dtype = DTYPES.get(t.get("datatype"))  # type: ignore[arg-type]
    if dtype is None:
        raise OipError(400, f"datatype {str(t.get('datatype'))[:16]!r} is not one of {', '.join(DTYPES)}")
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise OipError(400, "`shape` is not a list of integers")
    if tuple(shape[1:]) != sample_shape or len(shape) < 1 or not 1 <= shape[0] <= MAX_BATCH:
        want = [f"1..{MAX_BATCH}", *sample_shape]
        raise OipError(400, f"shape {str(shape)[:40]} does not match [{', '.join(map(str, want))}]")
    x = _tensor_data(t, tail, dtype, int(np.prod(shape)))
    if not np.isfinite(x).all():
        raise OipError(400, "the input has non-finite values")
    request_id = obj.get("id")
    return InferRequest(x.reshape(shape), request_id if isinstance(request_id, str) else None, _wants_binary(obj))


def _tensor_data(t: dict, tail: bytes, dtype: type, count: int) -> np.ndarray:
    size = _params(t).get("binary_data_size")
    if size is not None:
        if size != count * np.dtype(dtype).itemsize or size > len(tail):
            raise OipError(400, f"binary_data_size {str(size)[:16]} does not hold {count} {np.dtype(dtype).name}")
        return np.frombuffer(tail[:size], dtype=dtype).astype(np.float32)
    data = t.get("data")
    if not isinstance(data, list):
        raise OipError(400, "the input has no `data` list (nor binary data)")
    try:
        x = np.asarray(data, dtype=np.float64).ravel()
    except (TypeError, ValueError, OverflowError):
        raise OipError(400, "`data` holds something that is not a number") from None
    if x.size != count:
        raise OipError(400, f"`data` has {x.size} values, the shape needs {count}")
    with np.errstate(over="ignore"):  # beyond float32: inf, refused as non-finite
        return x.astype(np.float32)


def _wants_binary(obj: dict) -> bool:
    """Binary output if the request says so for its output or, naming no outputs, in its parameters."""
    outputs = obj.get("outputs")
    if isinstance(outputs, list) and outputs:
        first = outputs[0] if isinstance(outputs[0], dict) else {}
        return bool(_params(first).get("binary_data", False))
    return bool(_params(obj).get("binary_data_output", False))


def _params(d: dict) -> dict:
    p = d.get("parameters")
    return p if isinstance(p, dict) else {}


def encode_infer(
    model: str, version: int, req: InferRequest, y: np.ndarray, output_name: str
) -> tuple[bytes, dict[str, str]]:
    """Response body and extra headers: JSON, or JSON + raw float32 bytes with Inference-Header-Content-Length."""
    y = np.ascontiguousarray(y, dtype=np.float32)
    out: dict[str, object] = {"name": output_name, "datatype": "FP32", "shape": list(y.shape)}
    doc: dict[str, object] = {"model_name": model, "model_version": str(version), "outputs": [out]}
    if req.request_id is not None:
        doc["id"] = req.request_id
    if not req.binary_output:
        out["data"] = [round(float(v), 6) for v in y.ravel()]
        return json.dumps(doc).encode(), {}
    raw = y.tobytes()
    out["parameters"] = {"binary_data_size": len(raw)}
    head = json.dumps(doc).encode()
    return head + raw, {"Inference-Header-Content-Length": str(len(head))}


def model_metadata(name: str, version: int, input_shape: list[int], classes: int, task: str) -> dict:
    """GET /v2/models/{name}: the release version is the model version; −1 is the free batch dimension."""
    return {
        "name": name,
        "versions": [str(version)],
        "platform": "executorch",
        "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, *input_shape[1:]]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, classes]}],
        "parameters": {"task": task, "release": version},
    }

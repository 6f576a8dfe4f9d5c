"""Runs inside the guest: import timings, the machine it sees, and the bundle's inference outputs on a few rows.

`python -m devices.qemu.probe --bundle DIR --data FILE --rows N --out FILE` prints one JSON line and writes the
logits (batch-1 calls of `infer.pte`) as safetensors, so the host can compare them with its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from edgelearn.programs import bundle_program


def probe_logits(bundle: Path, x: np.ndarray) -> np.ndarray:
    """Logits of `infer.pte` (with its `infer.ptd`) for each row of `x`, one batch-1 call per row (as the agent
    serves them)."""
    prog = bundle_program(bundle)
    return np.concatenate([prog.predict(x[i : i + 1]) for i in range(len(x))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    t0 = time.monotonic()
    import torch

    t1 = time.monotonic()
    import executorch.runtime  # noqa: F401

    t2 = time.monotonic()
    from safetensors.numpy import load_file, save_file

    x = load_file(str(a.data))["x"][: a.rows]
    save_file({"logits": probe_logits(a.bundle, x)}, str(a.out))
    t3 = time.monotonic()
    facts = {"machine": platform.machine(), "torch": torch.__version__, "import_torch_s": round(t1 - t0, 1)}
    facts |= {"import_executorch_runtime_s": round(t2 - t1, 1), "inference_s": round(t3 - t2, 1), "rows": len(x)}
    print(json.dumps(facts))


if __name__ == "__main__":
    main()

"""Scale-out benchmark (protocol v1.4): what one update costs the coordinator and a site relay on this machine.

    .venv/bin/python bench/relay_bench.py [--updates 120]

For a model of P float32 trainable parameters (the char-lm's 137k and 1M), on the real code paths:
- collect ms / update: the coordinator's `Rounds.handle_batch` on batches of 64 device updates (validate, spool
  with one fsync per batch, one SQLite commit per batch, fold); validate alone; spool + commit = the relay's accept
  (validate, spool, commit: no fold) − validate; fold in place = collect − the relay's accept (the fold alone, on
  warm data between nothing else, is also given: `fold_alone_ms`);
- ack µs: encode + ed25519-sign one ack, and publishing acks through a real mosquitto (QoS 1, until every PUBACK);
- relay: accepting an update (validate, spool, commit; no fold), combining its devices into one part (ms per
  device), and the coordinator taking one part of 1000 devices (validate, spool, fold, the device list);
- bytes into the coordinator per round: 30 devices flat vs 3 relays (one part each), from the payloads' sizes.
Writes bench/results/relay.json and relay.md; docs/scale.md builds its 100k-device plan on them.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator import aggregate as agg  # noqa: E402
from coordinator.config import CoordinatorConfig  # noqa: E402
from coordinator.relay_state import RelayState  # noqa: E402
from coordinator.rounds import Rounds  # noqa: E402
from coordinator.validate import Rules, check_update  # noqa: E402
from edgelearn.bundle import Manifest, dump_weights, verify_bundle, write_bundle  # noqa: E402
from edgelearn.protocol import Ack, Update, encode_update  # noqa: E402
from edgelearn.signing import sign_message  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SIZES = (137_216, 1_000_000)  # the char-lm's trainable parameters (536 KiB updates), and 1M (4 MB)
BATCH = 64
REPEATS = 3


def bundle(out: Path, params: int) -> Path:
    """A bundle of 4 trainable tensors of params/4 float32 each (the programs are placeholders: no release is
    built here, so nothing runs them)."""
    w = {f"t{i}": np.zeros((params // 4,), np.float32) for i in range(4)}
    m = Manifest("bench", 1, "classify", "xnnpack-int8", {"shape": [1, 4]}, sorted(w))
    write_bundle(out, m, {"weights.safetensors": dump_weights(w), "infer.pte": b"\0" * 64})
    return out


def updates(e_shapes: dict, n: int, model_id: str = "bench", base: int = 1, rnd: int = 1) -> list[bytes]:
    rng = np.random.default_rng(0)
    one = {k: rng.normal(0, 0.01, s).astype(np.float32) for k, s in e_shapes.items()}
    return [encode_update(Update(f"u{k}", f"d{k}", model_id, base, 20, one, rnd)) for k in range(n)]


def per_update_ms(seconds: float, n: int) -> float:
    return round(1000 * seconds / n, 3)


def coordinator_costs(work: Path, params: int, n: int) -> dict:
    b = bundle(work / f"b{params}", params)
    cfg = CoordinatorConfig("mqtt://127.0.0.1:1", "bench", b, work / f"c{params}", min_updates=10**6)
    e = Rounds(cfg, lambda *a, **k: verify_bundle(b))
    payloads = updates(e.shapes, n)
    t0 = time.perf_counter()
    for k in range(0, n, BATCH):
        e.handle_batch([(f"d{j}", p) for j, p in enumerate(payloads[k : k + BATCH], k)])
    collect = time.perf_counter() - t0
    rules = e.rules()
    t0 = time.perf_counter()
    for j, p in enumerate(payloads):
        check_update(f"d{j}", p, rules, set())
    validate = time.perf_counter() - t0
    acc = agg.StreamingMean(e.shapes)
    flat = [np.frombuffer(p, np.float32, count=params, offset=len(p) - 4 * params) for p in payloads]
    t0 = time.perf_counter()
    for f in flat:
        acc.add_flat(f, 20.0)
    fold = time.perf_counter() - t0
    e.close_state()
    return {"collect_ms": per_update_ms(collect, n), "validate_ms": per_update_ms(validate, n),
            "fold_alone_ms": per_update_ms(fold, n), "update_bytes": len(payloads[0])}  # fmt: skip


def relay_costs(work: Path, params: int, n: int, part_devices: int = 1000) -> dict:
    b = bundle(work / f"rb{params}", params)
    cfg = CoordinatorConfig("mqtt://127.0.0.1:1", "bench", b, work / f"rc{params}", min_updates=10**6)
    e = Rounds(cfg, lambda *a, **k: verify_bundle(b))
    state = RelayState(work / f"relay{params}", "siteA")
    payloads = updates(e.shapes, n)
    rules = Rules("bench", e.shapes, 1, 1)
    t0 = time.perf_counter()
    for k in range(0, n, BATCH):
        state.accept([(f"d{j}", p) for j, p in enumerate(payloads[k : k + BATCH], k)], rules)
    accept = time.perf_counter() - t0
    terms = e.relay_terms()
    assert terms is not None
    t0 = time.perf_counter()
    [part] = state.flush(terms, "bench", e.shapes)
    combine = time.perf_counter() - t0
    big = _part_of(part.payload, part_devices)  # the same part, as if it stood for 1000 devices
    t0 = time.perf_counter()
    v = e.handle_batch([("siteA", big)], relayed=True)[0]
    take = time.perf_counter() - t0
    assert v.status == "accepted", v
    e.close_state()
    state.close()
    return {"relay_accept_ms": per_update_ms(accept, n), "relay_combine_ms_per_device": per_update_ms(combine, n),
            "core_take_part_ms": round(1000 * take, 3), "part_bytes_1000_devices": len(big),
            "part_bytes_10_devices": len(part.payload)}  # fmt: skip


def _part_of(payload: bytes, k: int) -> bytes:
    from edgelearn import relaying
    from edgelearn.protocol import decode_update, read_metadata

    u, meta = decode_update(payload), read_metadata(payload)
    info = relaying.RelayInfo(tuple(f"device{i:06d}" for i in range(k)), tuple(0.1 for _ in range(k)))
    return encode_update(u.__class__(**{**u.__dict__, "update_id": "big"}), {**meta, **info.metadata()})


def ack_costs(n: int = 2000) -> dict:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from edgelearn.broker import Mosquitto
    from edgelearn.mqtt import MqttLink

    key = Ed25519PrivateKey.generate()
    t0 = time.perf_counter()
    acks = [sign_message(Ack(f"u{k}", "accepted", None, 7).encode(), f"edgelearn/f/devices/d{k}/ack", key)
            for k in range(n)]  # fmt: skip
    sign = time.perf_counter() - t0
    work = Path(tempfile.mkdtemp(prefix="ackbench"))
    broker = Mosquitto(work / "mosquitto").start()
    link = MqttLink(broker.url, "bench-acks", [], lambda t, p: None, session_expiry_s=0)
    try:
        assert link.start(wait_s=10)
        t0 = time.perf_counter()
        infos = [link.client.publish(f"edgelearn/f/devices/d{k}/ack", a, qos=1) for k, a in enumerate(acks)]
        for info in infos:
            info.wait_for_publish(timeout=30)
        publish = time.perf_counter() - t0
    finally:
        link.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    return {"ack_sign_us": round(1e6 * sign / n, 1), "ack_publish_us": round(1e6 * publish / n, 1),
            "ack_bytes": len(acks[0])}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--updates", type=int, default=120, help="device updates per measurement (default 120)")
    a = p.parse_args()
    rows = []
    for params in SIZES:
        runs = []
        for _ in range(REPEATS):  # fresh state each time; the median of each figure
            work = Path(tempfile.mkdtemp(prefix="relaybench"))
            try:
                runs.append({**coordinator_costs(work, params, a.updates), **relay_costs(work, params, a.updates)})
            finally:
                shutil.rmtree(work, ignore_errors=True)
        row = {"params": params, **{k: float(np.median([r[k] for r in runs])) for k in runs[0]}}
        row["spool_commit_ms"] = round(row["relay_accept_ms"] - row["validate_ms"], 3)
        row["fold_ms"] = round(row["collect_ms"] - row["relay_accept_ms"], 3)
        row["round_bytes_flat_30"] = int(30 * row["update_bytes"])
        row["round_bytes_3_relays"] = int(3 * row["part_bytes_10_devices"])
        rows.append(row)
        print(json.dumps(row), flush=True)
    acks = ack_costs()
    result = {"machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores", "updates": a.updates,
              "batch": BATCH, "sizes": rows, "acks": acks}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "relay.json").write_text(json.dumps(result, indent=1) + "\n")
    (RESULTS / "relay.md").write_text(markdown(result))
    print(markdown(result))


def markdown(r: dict) -> str:
    lines = [
        f"Per-update costs of the coordinator and a site relay ({r['machine']}; {r['updates']} updates, batches of "
        f"{r['batch']}, median of {REPEATS} runs; `bench/relay_bench.py`). Collect = validate + spool+commit + fold, "
        "as `Rounds.handle_batch` runs them; spool+commit from the relay's accept (the same minus the fold); "
        "fold alone: the same fold on warm data with nothing between.",
        "",
        "| params | update KiB | collect ms | = validate | + spool+commit | + fold | fold alone | relay accept ms | "
        "relay combine ms/device | core takes a 1000-device part ms | bytes in/round: 30 flat | 3 relays |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in r["sizes"]:
        lines.append(
            f"| {s['params']:,} | {s['update_bytes'] / 1024:.0f} | {s['collect_ms']} | {s['validate_ms']} | "
            f"{s['spool_commit_ms']} | {s['fold_ms']} | {s['fold_alone_ms']} | {s['relay_accept_ms']} | "
            f"{s['relay_combine_ms_per_device']} | "
            f"{s['core_take_part_ms']} | {s['round_bytes_flat_30']:,} | {s['round_bytes_3_relays']:,} |"
        )
    a = r["acks"]
    lines += ["", f"Acks: encode + ed25519 sign {a['ack_sign_us']} µs, publish through mosquitto (QoS 1, until every "
              f"PUBACK) {a['ack_publish_us']} µs each, {a['ack_bytes']} bytes signed.", ""]  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()

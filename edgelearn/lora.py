"""Low-rank adapter updates (protocol v1.3): a device sends B_t (out × r) for each 2-D trainable tensor t and
the update means ΔW_t = B_t · A_t, with A_t (r × in) a fixed random matrix both sides derive from
(t, base version, r). Only B travels; the coordinator expands it and folds ΔW as any full update, so FedAvg
over adapters is exact: Σ (n_k/n) B_k A = (Σ (n_k/n) B_k) A (A is shared, frozen, as in FFA-LoRA, Sun et al.
2024). A new A per release lets the updates of successive rounds span more than r directions.

Pure numpy; the device's training side is `edge_runtime.lora`.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

from edgelearn.protocol import MAX_LORA_RANK

SUFFIX = ".lora_b"  # an adapter's tensor name: the target's name + SUFFIX


def targets(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The tensors that get an adapter: every 2-D one (linear weights, embedding tables); others stay fixed."""
    return sorted(n for n, s in shapes.items() if len(s) == 2)


def adapter_shapes(shapes: dict[str, tuple[int, ...]], rank: int) -> dict[str, tuple[int, ...]]:
    """`{t + SUFFIX: (out, r)}` for each target t of shape (out, in)."""
    check_rank(rank)
    return {t + SUFFIX: (shapes[t][0], rank) for t in targets(shapes)}


def check_rank(rank: int) -> int:
    if not isinstance(rank, int) or not 1 <= rank <= MAX_LORA_RANK:
        raise ValueError(f"LoRA rank {rank!r}: use an integer in 1..{MAX_LORA_RANK} (0 means full updates)")
    return rank


def projection(name: str, in_features: int, rank: int, version: int) -> np.ndarray:
    """A (r × in), float32: A_ij ~ U(−√(3/r), √(3/r)) (variance 1/r, so ΔW = B·A moves each weight about as
    far as B moves: an optimizer's learning rate means the same as for full updates).

    Bits: PCG64 seeded with the first 16 bytes of SHA-256(f"{name}|{version}|{rank}"), `random_raw()` words,
    u = (word >> 11) · 2⁻⁵³: a bit stream numpy keeps stable across releases and platforms."""
    digest = hashlib.sha256(f"{name}|{version}|{rank}".encode()).digest()
    gen = np.random.PCG64(int.from_bytes(digest[:16], "little"))
    words = np.asarray(gen.random_raw(rank * in_features), dtype=np.uint64)
    u = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
    bound = math.sqrt(3.0 / rank)
    return ((2.0 * u - 1.0) * bound).astype(np.float32).reshape(rank, in_features)


def expand(adapters: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]], version: int) -> dict[str, np.ndarray]:
    """The full update an adapter update means: ΔW_t = B_t · A_t for each target, 0 for every other tensor; the
    rank r is the adapters' own (B_t is rows × r).

    `adapters` must hold exactly `adapter_shapes(shapes, r)` (the caller validated names and shapes)."""
    out = {n: np.zeros(s, np.float32) for n, s in shapes.items() if len(s) != 2}
    for t in targets(shapes):
        b = np.asarray(adapters[t + SUFFIX], np.float32)
        out[t] = b @ projection(t, shapes[t][1], b.shape[1], version)
    return out


def is_adapter_update(names: set[str] | list[str]) -> bool:
    """Whether an update's tensor names are adapters (all end in SUFFIX)."""
    return bool(names) and all(n.endswith(SUFFIX) for n in names)

"""Device shards on disk: safetensors files {x, y}, what `edgelearn data` writes and `device --data` reads."""

from __future__ import annotations

from pathlib import Path

from safetensors.numpy import load_file, save_file

from models.data import Split
from models.digits import load_digits, shard_non_iid


def write_shards(
    out: Path, n_devices: int, server_fraction: float, classes_per_device: int = 4, seed: int = 0
) -> list[Path]:
    """Non-IID device shards of the digits pool (+ test.safetensors) as safetensors files {x, y}."""
    data = load_digits(server_fraction, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, shard in enumerate(shard_non_iid(data.pool, n_devices, classes_per_device, seed)):
        paths.append(out / f"device-{k}.safetensors")
        save_file({"x": shard.x, "y": shard.y}, str(paths[-1]))
    save_file({"x": data.test.x, "y": data.test.y}, str(out / "test.safetensors"))
    return paths


def load_shard(path: Path) -> Split:
    """A shard file as a Split; ValueError when it lacks equal-length, non-empty tensors x and y."""
    t = load_file(str(path))
    if "x" not in t or "y" not in t or len(t["x"]) != len(t["y"]) or len(t["y"]) == 0:
        raise ValueError(f"{path}: expected non-empty tensors 'x' and 'y' of equal length")
    return Split(t["x"].astype("float32"), t["y"].astype("int64"))

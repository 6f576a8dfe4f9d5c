"""Training text for `char-lm`: a UTF-8 file or directory (or the corpus shipped with the package) → byte windows."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from models import ModelError
from models.data import Split

DEFAULT_CORPUS = "tinyshakespeare.txt"  # first 200 kB of Tiny Shakespeare (public domain), shipped in models/corpus
MAX_TEXT_BYTES = 64 * 1024 * 1024


def default_corpus() -> bytes:
    return resources.files("models").joinpath("corpus", DEFAULT_CORPUS).read_bytes()


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise ModelError(f"text directory {path} holds no files")
        return files
    if not path.is_file():
        raise ModelError(f"text {path} does not exist")
    return [path]


def read_text(path: str | Path | None) -> bytes:
    """The UTF-8 bytes of `path` (a file, or every file under a directory joined by newlines); None → default."""
    if path is None:
        return default_corpus()
    parts = []
    for f in _files(Path(path)):
        data = f.read_bytes()
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ModelError(f"text {f} is not UTF-8 (byte {e.start}: {data[e.start : e.start + 1]!r})") from None
        parts.append(data)
    text = b"\n".join(parts)
    if not text.strip():
        raise ModelError(f"text {path} is empty")
    if len(text) > MAX_TEXT_BYTES:
        raise ModelError(f"text {path} is {len(text)} bytes; at most {MAX_TEXT_BYTES} are used for training")
    return text


def windows(tokens: np.ndarray, context: int, stride: int) -> Split:
    """Windows x[i] = tokens[s : s+T] (as float32 ids) and targets y[i] = tokens[s+1 : s+T+1], s = i·stride."""
    if len(tokens) < context + 1:
        raise ModelError(f"text has {len(tokens)} bytes; char-lm needs at least {context + 1}")
    starts = np.arange(0, len(tokens) - context, stride)
    idx = starts[:, None] + np.arange(context)[None, :]  # (N, T)
    return Split(tokens[idx].astype(np.float32), tokens[idx + 1].astype(np.int64))


def text_splits(text: bytes, context: int, test_fraction: float = 0.1, max_test: int = 200) -> tuple[Split, Split]:
    """Train windows from the first 1 − f of the bytes, test windows (at most `max_test`) from the rest."""
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    cut = int(len(tokens) * (1.0 - test_fraction))
    if cut < context + 1 or len(tokens) - cut < context + 1:
        raise ModelError(f"text has {len(tokens)} bytes; char-lm needs at least {20 * (context + 1)}")
    train = windows(tokens[:cut], context, stride=context // 2)
    test = windows(tokens[cut:], context, stride=context // 2)
    step = max(1, len(test.y) // max_test)
    return train, Split(test.x[::step][:max_test], test.y[::step][:max_test])

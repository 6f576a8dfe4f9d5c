"""char-lm fleet data: one speaker per device (devices/simulate/speakers.py) and simulate's char-lm set-up."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from devices.simulate.speakers import (
    EXPORT_TEXT,
    SHARDS_JSON,
    SpeakerShard,
    assign_speakers,
    check_text,
    cut_parts,
    head_bytes,
    shard_windows,
    speaker_blocks,
    speaker_texts,
    split_point,
)
from models.text import text_splits, windows

PLAY = (
    b"a stage direction before anyone speaks\n\n"
    b"ALICE:\nHello there.\nHow are you?\n\n"
    b"BOB:\nFine.\n\n"
    b"ALICE:\nGood to hear.\n\n"
    b"First Citizen:\nSpeak, speak.\n"
)


def _play(n_blocks: int, seed: int = 0) -> bytes:
    """A long hand-made play: speakers with very different amounts of text, ~40 bytes per line."""
    rng = np.random.default_rng(seed)
    names = ["HAMLET", "OPHELIA", "GHOST", "First Player", "OSRIC", "GUARD"]
    weights = np.array([0.4, 0.25, 0.15, 0.1, 0.07, 0.03])
    blocks = []
    for i in range(n_blocks):
        name = names[rng.choice(len(names), p=weights)]
        lines = "".join(f"line {i}.{j} of {name.lower()} says words\n" for j in range(rng.integers(1, 5)))
        blocks.append(f"{name}:\n{lines}\n")
    return "".join(blocks).encode()


def test_speaker_blocks_run_from_a_name_line_to_the_next() -> None:
    # Execute
    blocks = speaker_blocks(PLAY)
    texts = speaker_texts(PLAY)
    # Assert: the preface belongs to nobody; a speaker's blocks are joined in order, header lines kept
    assert [b[0] for b in blocks] == ["ALICE", "BOB", "ALICE", "First Citizen"]
    assert texts["ALICE"] == b"ALICE:\nHello there.\nHow are you?\n\nALICE:\nGood to hear.\n\n"
    assert texts["First Citizen"] == b"First Citizen:\nSpeak, speak.\n"
    assert b"stage direction" not in b"".join(texts.values())
    assert [b[0] for b in speaker_blocks(b"BOB:\nsays:\n\n    Args:\nx\n\nEVE:\nhi\n")] == ["BOB", "EVE"]


def test_speaker_texts_keep_only_blocks_inside_the_range() -> None:
    # Prepare: a range that starts inside ALICE's first block and ends inside the second ALICE block
    lo = PLAY.index(b"How are")
    hi = PLAY.index(b"Good to")
    # Execute
    texts = speaker_texts(PLAY, lo, hi)
    # Assert
    assert texts == {"BOB": b"BOB:\nFine.\n\n"}


@pytest.mark.parametrize("held_out", [100, 333, 1000, 6465])
def test_export_text_is_head_plus_tail_and_the_exporter_tests_on_the_tail(held_out: int) -> None:
    # Prepare
    text = _play(2000)
    # Execute
    parts = cut_parts(text, held_out)
    _, test = text_splits(parts.server, context=16, max_test=10_000)
    # Assert: the exporter's 90/10 cut falls exactly between head and tail; the tail is the held-out text
    assert parts.server == text[: parts.lo] + text[parts.hi :] and len(text) - parts.hi == held_out
    tail = np.frombuffer(text[parts.hi :], np.uint8).astype(np.int64)
    assert np.array_equal(test.x, windows(tail, 16, 8).x)


def test_head_is_where_the_exporter_cuts_for_every_held_out_size() -> None:
    # Execute
    heads = {h: head_bytes(h) for h in range(1, 20_000)}
    # Assert: text_splits cuts H + h bytes at ⌊0.9 (H + h)⌋ = H, with H within a byte of 9h
    assert all(int((hd + h) * 0.9) == hd and 9 * h - 1 <= hd <= 9 * h for h, hd in heads.items())


def test_text_too_short_for_head_devices_and_tail_is_an_error() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="text has 300 bytes"):
        cut_parts(b"x" * 300, held_out_bytes=100)


def test_fewer_devices_than_speakers_get_the_largest_speakers_whole() -> None:
    # Prepare: C is shorter than one window and is dropped
    speakers = {"A": b"a" * 100, "B": b"b" * 300, "C": b"c" * 10, "D": b"d" * 200}
    # Execute
    shards = assign_speakers(speakers, 2, min_bytes=20)
    everyone = assign_speakers(speakers, 3, min_bytes=20)
    # Assert
    assert shards == [SpeakerShard("B", b"b" * 300), SpeakerShard("D", b"d" * 200)]
    assert [s.speaker for s in everyone] == ["B", "D", "A"]


def test_more_devices_than_speakers_split_the_largest_at_line_breaks() -> None:
    # Prepare
    speakers = speaker_texts(_play(300))
    n = 3 * len(speakers)
    # Execute
    shards = assign_speakers(speakers, n, min_bytes=65)
    # Assert: n shards, each one speaker's piece of ≥ one window; a speaker's pieces rebuild its text
    assert len(shards) == n and all(len(s.text) >= 65 for s in shards)
    for name, text in speakers.items():
        pieces = sorted(
            (int((s.speaker + "#0").split("#")[1]), s.text) for s in shards if s.speaker.split("#")[0] == name
        )
        assert b"".join(p for _, p in pieces) == text
        assert all(at == 0 or text[at - 1 : at] == b"\n" for at, _ in pieces)  # cut after a line break
    sizes = [len(s.text) for s in shards]
    assert max(sizes) < 3 * min(sizes)  # halving the largest piece first keeps shards comparable


def test_split_point_prefers_the_line_break_nearest_the_middle() -> None:
    # Execute / Assert
    assert split_point(b"aaaa\nbbbbbbbbb\ncc\n", 4) == 5  # breaks after 5 and 15; middle 9
    assert split_point(b"abcdefgh", 2) == 4  # no line break: the middle


def test_too_many_devices_for_the_text_is_an_error() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="5 devices: .* give fewer devices or a longer --text"):
        assign_speakers({"A": b"a" * 50, "B": b"b" * 30}, 5, min_bytes=20)
    with pytest.raises(ValueError, match="no speaker has 20 bytes"):
        assign_speakers({"A": b"a" * 5}, 1, min_bytes=20)


def test_shard_windows_are_next_byte_targets() -> None:
    # Prepare
    shard = SpeakerShard("A", bytes(range(40, 140)))
    # Execute
    w = shard_windows(shard, context=16)
    capped = shard_windows(shard, context=16, max_windows=3)
    # Assert: x float32 ids (N, T), y int64 = x shifted by one byte, stride T/2
    assert w.x.dtype == np.float32 and w.y.dtype == np.int64 and w.x.shape == (11, 16)
    assert np.array_equal(w.y[:, :-1], w.x[:, 1:].astype(np.int64))
    assert w.x[1, 0] == 48 and w.y[0, -1] == 56
    assert len(capped.y) == 3


def test_bundle_not_exported_from_this_text_is_refused(tmp_path) -> None:
    # Prepare: a bundle whose export.json names another text (e.g. `edgelearn export --model char-lm`)
    (tmp_path / "other.txt").write_bytes(b"some other text")
    (tmp_path / "export.json").write_text(json.dumps({"model_id": "char-lm", "text": str(tmp_path / "other.txt")}))
    # Execute / Assert
    with pytest.raises(ValueError, match="was not exported by `edgelearn simulate --model char-lm` from this text"):
        check_text(None, 20, tmp_path)


def test_simulate_rejects_a_bundle_of_another_model(bundle_dir, tmp_path, capsys) -> None:
    # Prepare
    from cli import main

    # Execute
    rc = main(["simulate", "--model", "char-lm", "--bundle", str(bundle_dir), "--out", str(tmp_path / "o")])
    # Assert: one line, nothing written
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1
    assert f"bundle {bundle_dir} holds digits-mlp, not char-lm: give --model digits-mlp" in err
    assert not (tmp_path / "o").exists()


def test_text_is_for_char_lm_and_alpha_for_digits(tmp_path) -> None:
    # Prepare
    from devices.simulate.run import SimConfig

    # Execute / Assert
    with pytest.raises(ValueError, match="only char-lm trains on text"):
        SimConfig(text=tmp_path / "t.txt")
    with pytest.raises(ValueError, match="alpha: char-lm devices hold one speaker each"):
        SimConfig(model="char-lm", alpha=0.5)
    local = SimConfig(model="char-lm").local  # the char-lm local recipe when none is given
    assert local is not None and (local.optimizer, local.lr, local.steps) == ("adamw", 1e-3, 50)


def test_prepare_data_path_gives_each_device_one_speakers_windows_outside_the_export_text(tmp_path) -> None:
    # Prepare: the full text from a file, 100 devices (more than its speakers: the largest are split)
    from devices.simulate.fleet import make_devices
    from devices.simulate.speakers import lm_shards
    from models.charlm import CONTEXT

    text = _play(3000)
    (tmp_path / "play.txt").write_bytes(text)
    # Execute
    text_file, shards = lm_shards(tmp_path / "play.txt", 100, tmp_path, max_windows=None)
    devices = make_devices(shards, [("rpi4", 1.0)], set(), 0.0, 0.1, seed=0)
    # Assert: the export text is head + tail; each device's windows come from one speaker's blocks in the
    # device part (each line of the play names its speaker)
    parts = cut_parts(text)
    assert text_file == (tmp_path / EXPORT_TEXT).resolve() and text_file.read_bytes() == parts.server
    rows = json.loads((tmp_path / SHARDS_JSON).read_text())
    assert len(rows) == len(devices) == 100 and [r["windows"] for r in rows] == [len(d.data.y) for d in devices]
    speakers = speaker_texts(text, parts.lo, parts.hi)
    for row, dev in zip(rows, devices, strict=True):
        assert dev.data.x.shape[1] == CONTEXT and dev.data.x.dtype == np.float32
        window = dev.data.x[0].astype(np.uint8).tobytes() + dev.data.y[0, -1:].astype(np.uint8).tobytes()
        assert window in speakers[row["speaker"].split("#")[0]] and window not in parts.server
        said = {m.decode() for w in dev.data.x.astype(np.uint8) for m in re.findall(rb"of ([a-z ]+) says", w.tobytes())}
        assert said == {row["speaker"].split("#")[0].lower()}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seed", "3"], "was exported with seed 0: its test split would overlap"),
        (["--hot", "sim9999"], "device 'sim9999' is not in this fleet (sim0000 … sim0019)"),
        (["--outage", "sim0001:9:2"], "outage of sim0001 in round 9: rounds are 1 … 5"),
        (["--broker", "bogus"], "bogus"),
    ],
)
def test_simulate_mistakes_are_one_line_before_anything_runs(bundle_dir, tmp_path, capsys, argv, message) -> None:
    from cli import main

    rc = main(["simulate", "--bundle", str(bundle_dir), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "o").exists()


def test_a_release_is_not_relowered_from_a_changed_text(tmp_path) -> None:
    from export.pipeline import ExportConfig, rebuild_bundle, text_digest
    from models import ModelError

    # Prepare: a bundle folder whose export.json names a text and its hash; then the text is edited
    text = tmp_path / "t.txt"
    text.write_text("ALICE:\nhello there\n" * 50)
    cfg = ExportConfig(model_id="char-lm", text=str(text), text_sha256=text_digest(str(text)))
    small_bundle = tmp_path / "b"
    from tests.test_bundle import small_bundle as make

    make(small_bundle)
    (small_bundle / "export.json").write_text(json.dumps(cfg.__dict__))
    text.write_text("BOB:\nsomething else\n" * 50)
    # Execute / Assert
    with pytest.raises(ModelError, match="changed since release 1 was exported"):
        rebuild_bundle(small_bundle, {}, 2, tmp_path / "v2")

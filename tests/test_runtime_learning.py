"""Learning from a sample stream: parsing, the bounded crash-safe store, replay, proximal SGD, engines."""

import io
import json
import logging
import time

import numpy as np
import pytest
import torch

from edge_runtime.budget import PAUSE, Budget, Governor, Reading
from edge_runtime.engines import make_engine, proximal_sgd_
from edge_runtime.ingest import FileTail, Ingestor, StdinLines
from edge_runtime.learner import Job, Learner, mix_counts
from edge_runtime.release import example_batch
from edge_runtime.samples import ReplayBuffer, SampleFormat, SampleStore
from edgelearn.bundle import load_weights, verify_bundle
from edgelearn.protocol import LocalConfig

FMT = SampleFormat("classify", (64,))


def line(k: int) -> str:
    return json.dumps({"x": [float(k % 16)] * 64, "y": k % 10}) + "\n"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ('{"x": [1]}', 'needs "x" and "y"'),
        ('{"x": [1, 2], "y": 1}', "bad x or y"),
        ('{"x": ' + json.dumps([float("nan")] * 64).replace("NaN", "NaN") + ', "y": 1}', "non-finite"),
    ],
)
def test_malformed_lines_are_counted_and_skipped_with_a_warning(tmp_path, caplog, bad, why):
    ing = Ingestor(SampleStore(tmp_path / "s"), FMT)
    with caplog.at_level(logging.WARNING):
        assert ing.add_line(line(1)) and not ing.add_line(bad) and ing.add_line(line(2))
    assert (ing.accepted, ing.malformed) == (2, 1)
    assert why in caplog.text


def test_lm_text_is_its_own_label():
    x, y = SampleFormat("lm", (8,), vocab=96).parse(json.dumps({"text": "hello world"}))
    assert x.shape == y.shape == (8,) and (x[1:] == y[:-1]).all() and x.max() < 96


def test_appended_file_is_read_once_and_partial_lines_wait(tmp_path):
    # Prepare: a stream file with 3 lines and a 4th being written
    src = tmp_path / "stream.jsonl"
    src.write_text(line(0) + line(1) + line(2) + line(3)[:10])
    store = SampleStore(tmp_path / "s")
    ing = Ingestor(store, FMT, FileTail(src))
    # Execute: poll, finish the line, poll again; then reopen everything (a restart) and poll
    assert ing.poll() == 3
    with src.open("a") as f:
        f.write(line(3)[10:] + line(4))
    assert ing.poll() == 2
    again = Ingestor(SampleStore(tmp_path / "s"), FMT, FileTail(src))
    # Assert: nothing is read twice after the restart; samples keep their order
    assert again.poll() == 0 and len(again.store) == 5
    assert again.store.read(0, 10)[1].tolist() == [0, 1, 2, 3, 4]


def test_folder_source_reads_every_jsonl_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(line(1) + line(2))
    (tmp_path / "in" / "b.jsonl").write_text(line(3))
    (tmp_path / "in" / "ignored.txt").write_text(line(4))
    ing = Ingestor(SampleStore(tmp_path / "s"), FMT, FileTail(tmp_path / "in"))
    assert ing.poll() == 3 and len(ing.store) == 3


def test_stdin_lines_are_ingested_without_blocking(tmp_path):
    ing = Ingestor(SampleStore(tmp_path / "s"), FMT, StdinLines(io.StringIO(line(5) + "junk\n" + line(6))))
    end = time.monotonic() + 5
    while ing.accepted + ing.malformed < 3 and time.monotonic() < end:
        ing.poll()
    assert (ing.accepted, ing.malformed, len(ing.store)) == (2, 1, 2)


def test_store_is_bounded_and_drops_oldest_segments(tmp_path):
    store = SampleStore(tmp_path / "s", max_samples=10, segment_size=4)
    for k in range(20):
        store.add(np.full(64, k, np.float32), np.int64(k))
    store.flush()
    seqs = store.read(0, 100)[2]
    assert len(store) <= 10 + 4 and seqs[-1] == 19 and seqs[0] > 0


def test_orphan_segment_from_a_crash_is_removed(tmp_path):
    store = SampleStore(tmp_path / "s")
    store.add(np.zeros(64, np.float32), np.int64(1))
    store.flush()
    (tmp_path / "s" / "seg-00000007.safetensors").write_bytes(b"half written")  # not in the index
    again = SampleStore(tmp_path / "s")
    assert len(again) == 1 and not (tmp_path / "s" / "seg-00000007.safetensors").exists()


def test_reservoir_keeps_a_uniform_sample_within_capacity():
    buf = ReplayBuffer(capacity=500, seed=1)
    for start in range(0, 20000, 32):
        seq = np.arange(start, min(start + 32, 20000))
        buf.offer(np.zeros((len(seq), 2), np.float32), seq % 10, seq)
    kept = buf.seq[: len(buf)]
    assert len(buf) == 500 and len(set(kept.tolist())) == 500
    # uniform over 0..19999: mean ≈ 10000 (σ of the mean ≈ 258), each quarter ≈ 125 (σ ≈ 10)
    assert abs(kept.mean() - 10000) < 1000
    assert all(abs(int(((kept >= q * 5000) & (kept < (q + 1) * 5000)).sum()) - 125) < 40 for q in range(4))


def test_proximal_sgd_follows_the_formula():
    p, g, a = [torch.tensor([1.0, 2.0])], [torch.tensor([0.5, -1.0])], [torch.tensor([0.0, 1.0])]
    proximal_sgd_(p, g, a, lr=0.1, mu=2.0)  # θ − η(g + μ(θ − θ_g)) = [1 − .1(.5 + 2), 2 − .1(−1 + 2)]
    assert torch.allclose(p[0], torch.tensor([0.75, 1.9]))


@pytest.mark.parametrize(
    ("bs", "new", "rep", "want"),
    [(32, 100, 0, (32, 0)), (32, 100, 50, (16, 16)), (32, 0, 50, (0, 32)), (32, 5, 50, (5, 27))],
)
def test_mix_counts_half_new_half_replay(bs, new, rep, want):
    assert mix_counts(bs, new, rep) == want


def filled_store(tmp_path, n=256) -> SampleStore:
    rng = np.random.default_rng(0)
    store = SampleStore(tmp_path / "s")
    for _ in range(n):
        store.add(rng.uniform(0, 16, 64).astype(np.float32), np.int64(rng.integers(10)), flush_when_full=False)
    store.flush()
    return store


def test_engines_agree_and_the_proximal_term_pulls_toward_the_global_model(bundle_dir, tmp_path):
    m, w = verify_bundle(bundle_dir), load_weights(bundle_dir)
    pte = (bundle_dir / "train.pte").read_bytes()
    x, y = filled_store(tmp_path).read(0, 32)[:2]
    engines = {k: make_engine(k, m.model_id, m.task, w, pte, example_batch(m)) for k in ("eager", "executorch")}
    for e in engines.values():
        for _ in range(5):
            e.step(x, y, lr=0.1, mu=0.0)
    for name, v in engines["eager"].state().items():
        np.testing.assert_allclose(v, engines["executorch"].state()[name], atol=1e-5)
    drift = {}
    for mu in (0.0, 5.0):
        e = make_engine("eager", m.model_id, m.task, w, pte, example_batch(m))
        for _ in range(20):
            e.step(x, y, lr=0.1, mu=mu)
        drift[mu] = sum(float(np.sum((e.state()[n] - w[n]) ** 2)) for n in e.state())
    assert drift[5.0] < 0.8 * drift[0.0]


def test_learner_pauses_within_one_step_and_shrinks_the_batch_first(bundle_dir, tmp_path):
    # Prepare: a learner whose readings the test sets
    m, w = verify_bundle(bundle_dir), load_weights(bundle_dir)
    now = {"r": Reading(0.0, 100.0, 4000.0, temperature_c=40.0)}
    gov = Governor(Budget(max_temperature_c=70.0, interval_s=1e-9), lambda: now["r"])
    learner = Learner(
        make_engine("eager", m.model_id, m.task, w, None, example_batch(m)), filled_store(tmp_path), tmp_path, gov
    )
    learner.start(Job(1, 1, 100, 32, 0.05), w)
    # Execute / Assert: warm (64 °C, soft zone) → half batch: 8 new + 8 replay rows
    now["r"] = Reading(0.0, 100.0, 4000.0, temperature_c=64.0)
    assert learner.step() == "stepped" and learner.cursor == 8
    now["r"] = Reading(0.0, 100.0, 4000.0, temperature_c=80.0)  # hot: the very next step is not taken
    assert learner.step() == "paused" and learner.job.steps_done == 1 and gov.decision.action == PAUSE
    now["r"] = Reading(0.0, 100.0, 4000.0, temperature_c=40.0)
    assert learner.step() == "stepped" and learner.job.steps_done == 2 and learner.cursor == 8 + 16


@pytest.mark.parametrize(
    "bad",
    [
        '{"x": ' + json.dumps([1.0] * 64) + ', "y": 1e400}',
        '{"x": ' + json.dumps([1.0] * 64) + ', "y": 1' + "0" * 30 + "}",
        '{"x": [1' + "0" * 400 + "] , " + '"y": 1}',
        "[" * 100_000,
        '{"x": ' + json.dumps([1.0] * 64) + ', "y": 10}',  # 10 classes: labels 0..9
        '{"x": ' + json.dumps([1.0] * 64) + ', "y": -100}',  # torch's ignore_index
        '{"x": ' + json.dumps([1.0] * 64) + ', "y": 2.5}',
    ],
)
def test_hostile_lines_are_malformed_samples_not_crashes(tmp_path, bad):
    ing = Ingestor(SampleStore(tmp_path / "s"), SampleFormat("classify", (64,), classes=10))
    assert not ing.add_line(bad) and ing.add_line(line(9)) and (ing.accepted, ing.malformed) == (1, 1)


def test_a_crash_while_dropping_old_segments_loses_nothing_still_indexed(tmp_path, monkeypatch):
    # Prepare: a full store; the next flush must drop its oldest segment
    import edge_runtime.samples as samples

    store = SampleStore(tmp_path / "s", max_samples=8, segment_size=4)
    for k in range(8):
        store.add(np.full(64, k, np.float32), np.int64(k % 10))
    store.add(np.zeros(64, np.float32), np.int64(0), flush_when_full=False)
    real = samples.write_bytes

    def die_at_index(path, data):
        if path.name == samples.INDEX:
            raise KeyboardInterrupt("killed before the index was written")
        real(path, data)

    monkeypatch.setattr(samples, "write_bytes", die_at_index)
    # Execute: the process dies between writing the new segment and the index
    with pytest.raises(KeyboardInterrupt):
        store.flush()
    monkeypatch.setattr(samples, "write_bytes", real)
    again = SampleStore(tmp_path / "s", max_samples=8, segment_size=4)
    # Assert: every indexed segment is still there and readable
    assert len(again) == 8 and list(again.read(0, 100)[2]) == list(range(8))


def test_file_source_skips_overlong_lines_and_rereads_truncated_and_rotated_files(tmp_path, monkeypatch):
    import edge_runtime.ingest as ingest

    monkeypatch.setattr(ingest, "MAX_LINE_BYTES", 1024)
    f = tmp_path / "in.jsonl"
    f.write_text(line(1) + "{" + "x" * 3000 + "}\n" + line(2))
    ing = Ingestor(SampleStore(tmp_path / "s"), FMT, FileTail(f))
    read_all = ing.poll()
    f.write_text(line(3))  # truncated below the saved offset (e.g. by `> in.jsonl`)
    after_truncation = ing.poll()
    f.rename(tmp_path / "old.jsonl")
    f.write_text(line(4) + line(5))  # rotated: a new file under the same name, longer than the old offset
    after_rotation = ing.poll()
    assert (read_all, after_truncation, after_rotation) == (3, 1, 2)
    assert (ing.accepted, ing.malformed) == (5, 1) and len(ing.store.offsets) == 1  # the old file is forgotten


def test_invalid_utf8_on_stdin_is_one_malformed_line(tmp_path, monkeypatch):
    raw = line(5).encode() + b"\xff\xfe junk\n" + line(6).encode()
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8"))  # as a pipe is
    ing = Ingestor(SampleStore(tmp_path / "s"), FMT, StdinLines())
    end = time.monotonic() + 5
    while ing.accepted + ing.malformed < 3 and time.monotonic() < end:
        ing.poll()
    assert (ing.accepted, ing.malformed) == (2, 1)


@pytest.mark.parametrize(
    "local",
    [LocalConfig(20, 8, 0.05), LocalConfig(20, 8, 3e-3, "adamw", warmup_steps=3, schedule="cosine", clip_norm=1.0)],
    ids=["sgd", "adamw-cosine-clip"],
)
def test_resume_after_a_crash_mid_plan_gives_the_same_weights(bundle_dir, tmp_path, local):
    # Prepare: the same store and job twice; checkpoints as often as allowed (between plans)
    m, w = verify_bundle(bundle_dir), load_weights(bundle_dir)

    stores = {}

    def learner(state):
        if state not in stores:
            state.mkdir()
            stores[state] = filled_store(state)  # the same 256 samples in each store
        eng = make_engine("eager", m.model_id, m.task, w, None, example_batch(m))
        return Learner(eng, SampleStore(state / "s"), state, None, replay_size=16, checkpoint_every_s=0.0)

    straight = learner(tmp_path / "a")
    straight.start(Job.of(1, 1, local), w)
    while straight.step() == "stepped":
        pass
    crashed = learner(tmp_path / "b")
    crashed.start(Job.of(1, 1, local), w)
    for _ in range(13):  # dies in the middle of its second plan of 8 batches
        crashed.step()
    # Execute: a new process resumes from the checkpoint
    resumed = learner(tmp_path / "b")
    resumed.restore()
    resumed.start(Job.of(1, 1, local), w)
    while resumed.step() == "stepped":
        pass
    # Assert: bit-identical to the uninterrupted run, and no sample offered to the reservoir twice
    for name, v in straight.engine.state().items():
        np.testing.assert_array_equal(resumed.engine.state()[name], v)
    assert resumed.replay.n_seen == straight.replay.n_seen

"""Releases without lowering (bundle format 1.1): the coordinator rewrites infer.ptd in numpy, keeps the programs,
and the result runs like a freshly lowered program on the same weights."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from coordinator.release import release_builder
from edgelearn.bundle import INFER_PTD, INFER_PTE, TRAIN_PTE, BundleError, load_weights, verify_bundle, write_bundle
from edgelearn.datafile import DATA_LAYOUT, DataFileError, Segment, load_layout, patch_data
from edgelearn.programs import bundle_program
from models.charlm import CharLM, LMConfig
from models.quality import program_logits
from models.registry import get_spec

ROOT = Path(__file__).resolve().parents[1]
CREATED = "2026-12-01T00:00:00Z"


def moved(weights: dict[str, np.ndarray], scale: float = 0.05, seed: int = 0) -> dict[str, np.ndarray]:
    """Weights after a (large) federated step: every tensor moved by N(0, scale²)."""
    rng = np.random.default_rng(seed)
    return {k: (v + scale * rng.standard_normal(v.shape)).astype(np.float32) for k, v in weights.items()}


def test_patch_rewrites_only_the_listed_segments_and_refuses_what_does_not_fit():
    w = {"b": np.arange(4, dtype=np.float32)}
    data = bytes(range(32))
    out = patch_data(data, [Segment(8, 16, "b", "f32")], w)
    assert out[:8] == data[:8] and out[24:] == data[24:] and out[8:24] == w["b"].tobytes()
    with pytest.raises(DataFileError, match="does not fit"):
        patch_data(data, [Segment(24, 16, "b", "f32")], w)
    with pytest.raises(DataFileError, match="weights lack 'c'"):
        patch_data(data, [Segment(0, 16, "c", "f32")], w)
    with pytest.raises(DataFileError, match="unknown encoding"):
        load_layout(json.dumps({"segments": [{"offset": 0, "nbytes": 4, "param": "b", "encoding": "q4"}]}).encode())


def test_export_writes_a_data_file_and_where_each_trainable_parameter_lives(bundle_dir):
    m = verify_bundle(bundle_dir)
    layout = load_layout((bundle_dir / DATA_LAYOUT).read_bytes())
    # static int8 digits: int8 weights + their scales, int32 biases + their scales, for every layer
    assert {s.param for s in layout} == set(m.trainable)
    assert {s.encoding for s in layout} == {"q8c", "q8c_scale", "q32b", "q32b_scale"}
    assert (
        patch_data((bundle_dir / INFER_PTD).read_bytes(), layout, load_weights(bundle_dir))
        == (bundle_dir / INFER_PTD).read_bytes()
    )


def test_a_release_changes_only_the_data_and_runs_like_a_fresh_lowering(bundle_dir, tmp_path):
    # Prepare
    from export.lower import lower_infer
    from export.metrics import pte_logits

    new = moved(load_weights(bundle_dir))
    x = get_spec("digits-mlp").load_data(type("C", (), {"server_fraction": 0.05, "seed": 0})()).test.x
    student = get_spec("digits-mlp").make_student()
    student.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
    # Execute
    m = release_builder()(bundle_dir, new, 2, tmp_path / "v2", created=CREATED)
    # Assert: same programs, new data; outputs as a program lowered (and calibrated) afresh from the new weights
    for name in (INFER_PTE, TRAIN_PTE, DATA_LAYOUT):
        assert (tmp_path / "v2" / name).read_bytes() == (bundle_dir / name).read_bytes()
    assert (tmp_path / "v2" / INFER_PTD).read_bytes() != (bundle_dir / INFER_PTD).read_bytes()
    assert m.version == 2 and m.format == "edgelearn.bundle/1.1" and 0 < m.metrics["accuracy_pte"] <= 1
    got = program_logits(bundle_program(tmp_path / "v2"), x)
    fresh = pte_logits(lower_infer(student, (torch.zeros(1, 64),), "xnnpack-int8", torch.from_numpy(x[:128])), x)
    with torch.no_grad():
        eager = student(torch.from_numpy(x)).numpy()
    assert (got.argmax(1) == fresh.argmax(1)).mean() >= 0.97  # activation scales stay those of release 1
    assert np.abs(got - eager).max() <= 3 * np.abs(fresh - eager).max() + 0.05
    assert (got.argmax(1) == eager.argmax(1)).mean() >= 0.95


def test_a_release_is_the_same_bytes_when_built_twice(bundle_dir, tmp_path):
    new, rebuild = moved(load_weights(bundle_dir), seed=1), release_builder()
    a = rebuild(bundle_dir, new, 2, tmp_path / "a", created=CREATED)
    b = rebuild(bundle_dir, new, 2, tmp_path / "b", created=CREATED)
    assert a == b and all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in a.files)


def test_a_format_1_bundle_needs_the_exporter_and_says_so(bundle_dir, tmp_path):
    m = verify_bundle(bundle_dir)
    files = {n: (bundle_dir / n).read_bytes() for n in m.files if n not in (INFER_PTD, DATA_LAYOUT)}
    old = write_bundle(tmp_path / "old", m, files)
    assert old.format == "edgelearn.bundle/1"
    with pytest.raises(BundleError, match="must be lowered again"):
        release_builder()(tmp_path / "old", load_weights(bundle_dir), 2, tmp_path / "v2")
    calls = []
    release_builder(lambda *a, **k: calls.append(a))(tmp_path / "old", {}, 2, tmp_path / "v2")
    assert len(calls) == 1


def test_the_coordinator_builds_a_release_without_loading_the_exporter(bundle_dir, tmp_path):
    code = (
        "import sys; from pathlib import Path\n"
        "from coordinator.release import release_builder\n"
        "from edgelearn.bundle import load_weights\n"
        f"b = Path({str(bundle_dir)!r})\n"
        f"release_builder()(b, load_weights(b), 2, Path({str(tmp_path / 'v2')!r}))\n"
        "heavy = ('executorch.exir', 'executorch.backends', 'torchao', 'export')\n"
        "print(sorted(m for m in sys.modules if m in heavy or m.startswith(tuple(h + '.' for h in heavy))\n"
        "             and m != 'executorch.exir._warnings'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.slow
@pytest.mark.parametrize("target,quant", [("xnnpack-int8", "dynamic"), ("xnnpack-fp32", "static")])
def test_a_language_model_release_equals_a_fresh_lowering_exactly(target, quant):
    # Prepare: a small LM with distinct values everywhere (trained weights never tie)
    from export.datamap import find_layout
    from export.lower import lower_infer, lower_infer_split
    from export.metrics import pte_logits

    torch.manual_seed(0)
    lm = CharLM(LMConfig(n_layer=1, n_head=2, d_model=32, context=16)).eval()
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randint(0, 256, (24, 16)).float()
    example = (torch.zeros(1, 16),)
    pte, ptd = lower_infer_split(lm, example, target, x, quant)
    weights = {k: v.detach().numpy().copy() for k, v in lm.state_dict().items()}
    layout = find_layout(ptd, weights, [n for n, _ in lm.named_parameters()])
    new = moved(weights, seed=2)
    lm.load_state_dict({k: torch.from_numpy(v) for k, v in new.items()})
    # Execute
    got = pte_logits(pte, x.numpy(), patch_data(ptd, layout, new))
    # Assert: the very outputs of a program lowered from the new weights
    fresh = pte_logits(lower_infer(lm, example, target, x, quant), x.numpy())
    np.testing.assert_array_equal(got, fresh)

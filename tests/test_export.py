"""The export stage: KD loss, failed exports leave nothing, and every .pte runs in ExecuTorch close to eager."""

import json
import time

import numpy as np
import pytest
import torch

from edgelearn.bundle import INFER_PTD, INFER_PTE, TRAIN_PTE, load_weights, verify_bundle
from edgelearn.datafile import DATA_LAYOUT
from export.distill import kd_loss
from models import ModelError
from models.registry import get_spec


def test_kd_loss_hand_computed():
    # Prepare: one example, two classes; student logits [0, 0], teacher [ln 3, 0], label 0, α = 0.5, T = 1
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[np.log(3.0), 0.0]])
    y = torch.tensor([0])
    # Execute
    loss = kd_loss(s, t, y, alpha=0.5, temperature=1.0)
    # Assert: CE = ln 2; p_t = [3/4, 1/4], p_s = [1/2, 1/2]; KL = 3/4 ln(3/2) + 1/4 ln(1/2)
    ce = np.log(2.0)
    kl = 0.75 * np.log(1.5) + 0.25 * np.log(0.5)
    assert loss.item() == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-6)


def test_kd_loss_temperature_scales_by_t_squared():
    s, t, y = torch.tensor([[1.0, -1.0]]), torch.tensor([[-2.0, 2.0]]), torch.tensor([0])
    soft_only = kd_loss(s, t, y, alpha=0.0, temperature=2.0)
    ps = torch.log_softmax(s / 2, -1)
    pt = torch.softmax(t / 2, -1)
    expected = 4.0 * (pt * (pt.log() - ps)).sum()
    assert soft_only.item() == pytest.approx(expected.item(), rel=1e-6)


def test_bundle_has_protocol_files(bundle_dir):
    m = verify_bundle(bundle_dir)
    assert m.format == "edgelearn.bundle/1.1" and m.version == 1 and m.model_id == "digits-mlp"
    assert {"weights.safetensors", INFER_PTE, INFER_PTD, DATA_LAYOUT, TRAIN_PTE} <= set(m.files)
    assert m.target == "xnnpack-int8" and m.input == {"shape": [1, 64], "dtype": "float32"}
    raw = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(raw) >= {
        "format",
        "model_id",
        "version",
        "task",
        "target",
        "input",
        "trainable",
        "files",
        "metrics",
        "created",
        "signature",
    }
    assert m.metrics["student_params"] <= 0.25 * m.metrics["teacher_params"]


def test_infer_pte_matches_eager(bundle_dir):
    from edgelearn.programs import bundle_program

    student = get_spec("digits-mlp").make_student()
    student.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(bundle_dir).items()})
    prog = bundle_program(bundle_dir)
    x = np.random.default_rng(0).uniform(0, 1, size=(20, 64)).astype(np.float32)
    with torch.no_grad():
        eager = student(torch.from_numpy(x)).numpy()
    pte = np.concatenate([prog.predict(x[i : i + 1]) for i in range(len(x))])
    cos = (eager * pte).sum(1) / (np.linalg.norm(eager, axis=1) * np.linalg.norm(pte, axis=1))
    assert cos.min() > 0.99  # int8 vs fp32
    assert (eager.argmax(1) == pte.argmax(1)).mean() >= 0.9


def test_train_pte_loss_and_step_match_eager(bundle_dir):
    from edge_runtime.trainer import TrainProgram

    weights = load_weights(bundle_dir)
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, (16, 64)).astype(np.float32), rng.integers(0, 10, 16)
    prog = TrainProgram((bundle_dir / TRAIN_PTE).read_bytes(), weights, (x[:1], y[:1]))
    student = get_spec("digits-mlp").make_student()
    student.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    eager_loss = torch.nn.functional.cross_entropy(student(torch.from_numpy(x)), torch.from_numpy(y))
    eager_loss.backward()
    loss = prog.step(x, y, lr=0.1)
    assert loss == pytest.approx(eager_loss.item(), abs=1e-5)
    after = prog.state()
    for name, p in student.named_parameters():
        np.testing.assert_allclose(after[name], (p - 0.1 * p.grad).detach().numpy(), atol=1e-5)


@pytest.mark.parametrize(
    ("kw", "message"), [({"model_id": "nope"}, "unknown model 'nope'"), ({"target": "tpu"}, "unknown target 'tpu'")]
)
def test_bad_request_writes_no_bundle(tmp_path, kw, message):
    from export.pipeline import ExportConfig, export_bundle

    with pytest.raises(ModelError, match=message):
        export_bundle(ExportConfig(**kw), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_folder_that_is_not_a_bundle_before_training(tmp_path):
    from export.pipeline import ExportConfig, export_bundle

    (tmp_path / "notes.txt").write_text("mine")
    t0 = time.monotonic()
    with pytest.raises(ModelError, match="non-empty folder that is not a bundle"):
        export_bundle(ExportConfig(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine" and time.monotonic() - t0 < 5  # no training ran


def test_cli_reports_bad_target_in_one_line(tmp_path, capsys):
    from cli import main

    assert main(["export", "--target", "tpu", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown target 'tpu'" in err[0]
    assert not (tmp_path / "o").exists()


def test_train_pte_takes_integer_inputs_in_its_declared_dtype(bundle_dir):
    # Token ids (or pixel counts) arrive as integers; the program declares float32 inputs (manifest input.dtype)
    from edge_runtime.trainer import TrainProgram

    weights = load_weights(bundle_dir)
    rng = np.random.default_rng(2)
    x, y = rng.integers(0, 16, (8, 64)), rng.integers(0, 10, 8)
    prog = TrainProgram((bundle_dir / TRAIN_PTE).read_bytes(), weights, (x[:1].astype(np.float32), y[:1]))
    as_int = prog.forward_backward(x, y)[0]
    as_float = prog.forward_backward(x.astype(np.float32), y)[0]
    assert as_int == pytest.approx(as_float)

"""User models (`package.module:factory`) and bad export input: one error line, exit ≠ 0, no bundle."""

import numpy as np
import pytest
import torch

from edgelearn.bundle import load_weights, verify_bundle
from export.examples.iris import make
from models import ModelError
from models.data import Split
from models.user import UserModel

HERE = "tests.test_export_user"


def raising_factory():
    raise RuntimeError("no GPU in this lab")


def wrong_type_factory():
    return {"teacher": None}


class Inverse(torch.nn.Module):
    """A student with an operator no ExecuTorch target lowers (not in the Core ATen opset)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.inv(self.fc(x).reshape(-1, 2, 2)).reshape(-1, 4)


def unlowerable_factory():
    iris = make()
    return UserModel(None, Inverse(), (torch.zeros(1, 4),), iris.train, iris.test, epochs=1)


def empty_data_factory():
    iris = make()
    empty = Split(np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
    return UserModel(iris.teacher, iris.student, (torch.zeros(1, 4),), empty, iris.test)


def float_labels_factory():
    iris = make()
    return UserModel(iris.teacher, iris.student, (torch.zeros(1, 4),), Split(iris.train.x, iris.train.y * 1.0),
                     iris.test)  # fmt: skip


def unknown_trainable_factory():
    iris = make()
    return UserModel(iris.teacher, iris.student, (torch.zeros(1, 4),), iris.train, iris.test, trainable=["fc9.w"])


def scalar_example_factory():
    iris = make()
    return UserModel(iris.teacher, iris.student, (torch.tensor(1.0),), iris.train, iris.test)


def test_user_model_exports_and_runs_like_eager(tmp_path):
    # Prepare
    from edgelearn.programs import bundle_program
    from export.pipeline import ExportConfig, export_bundle
    from models.quality import program_logits

    cfg = ExportConfig(model_id="export.examples.iris:make", target="xnnpack-fp32", epochs=30, compare=False)
    # Execute
    m = export_bundle(cfg, tmp_path / "iris")
    # Assert
    assert verify_bundle(tmp_path / "iris").model_id == "export.examples.iris:make"
    assert m.metrics["student_params"] < 0.25 * m.metrics["teacher_params"] and m.metrics["accuracy_pte"] > 0.8
    student = make().student
    student.load_state_dict({k: torch.from_numpy(v) for k, v in load_weights(tmp_path / "iris").items()})
    x = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    with torch.no_grad():
        eager = student(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(program_logits(bundle_program(tmp_path / "iris"), x), eager, atol=1e-5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "nope"], "unknown model 'nope'"),
        (["--target", "tpu"], "unknown target 'tpu'"),
        (["--target", "vulkan"], "target 'vulkan' is not supported: the packaged executorch runtime has no Vulkan"),
        (["--target", "cuda"], "target 'cuda' is not supported: the packaged executorch runtime has no CudaBackend"),
        (["--model", f"{HERE}:raising_factory"], "raised RuntimeError: no GPU in this lab"),
        (["--model", f"{HERE}:wrong_type_factory"], "returned dict, not models.user.UserModel"),
        (["--model", f"{HERE}:empty_data_factory"], "train split must be non-empty"),
        (["--model", f"{HERE}:float_labels_factory"], "train split y must be 1-D integer class ids"),
        (["--model", f"{HERE}:unknown_trainable_factory"], "trainable is names no student parameter has: fc9.w"),
        (["--model", f"{HERE}:scalar_example_factory"], "example_inputs must be a tuple of one batch-1 tensor"),
        (["--model", "export.examples.iris:make", "--train-subset", "last"], "only the trainable subset 'all'"),
        (["--model", "no_such_pkg.mod:make"], "cannot load model factory 'no_such_pkg.mod:make'"),
        (["--model", f"{HERE}:unlowerable_factory", "--sparsity", "0"], "operator aten.linalg_inv_ex.default to "),
        (["--model", "char-lm", "--text", "EMPTY"], "is empty"),
        (["--model", "char-lm", "--text", "LATIN1"], "is not UTF-8"),
        (["--sparsity", "1.5"], "sparsity 1.5 must be in"),
        (["--train-subset", "odd"], "unknown trainable subset 'odd'"),
    ],
)
def test_bad_input_is_one_line_exit_2_no_bundle(tmp_path, capsys, argv, message):
    # Prepare
    from cli import main

    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    argv = [{"EMPTY": str(tmp_path / "empty.txt"), "LATIN1": str(tmp_path / "latin1.txt")}.get(a, a) for a in argv]
    out = tmp_path / "out"
    # Execute
    rc = main(["export", *argv, "--no-compare", "--out", str(out)])
    # Assert
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_unlowerable_operator_names_op_and_target():
    from export.lower import lower_infer

    with pytest.raises(ModelError, match=r"cannot lower operator aten\.linalg_inv_ex\.default to portable"):
        lower_infer(Inverse(), (torch.zeros(1, 4),), "portable", torch.zeros(4, 4))

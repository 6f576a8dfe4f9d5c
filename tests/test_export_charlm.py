"""char-lm: causal mask, byte windows, text errors, and tiny LMs lowered to every target and trained by ExecuTorch."""

import numpy as np
import pytest
import torch

from export.lower import TARGETS
from models import ModelError
from models.charlm import MASK_VALUE, CharLM, LMConfig, causal_mask, trainable_names
from models.registry import get_spec, param_count
from models.text import read_text, text_splits, windows

pytestmark = pytest.mark.slow  # real processes, brokers or exports: minutes in all (make test-fast skips)

TINY = LMConfig(n_layer=1, n_head=2, d_model=32, context=16)


def test_causal_mask_hides_only_the_future():
    m = causal_mask(3)
    assert m.tolist() == [[0, MASK_VALUE, MASK_VALUE], [0, 0, MASK_VALUE], [0, 0, 0]]
    assert torch.isfinite(m).all()


def test_changing_future_tokens_leaves_earlier_logits_unchanged():
    # Prepare
    torch.manual_seed(0)
    lm = CharLM(TINY).eval()
    x = torch.randint(0, 256, (1, 16)).float()
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 7) % 256
    # Execute
    with torch.no_grad():
        a, b = lm.sequence_logits(x), lm.sequence_logits(y)
    # Assert
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_student_is_at_most_a_quarter_of_the_teacher():
    spec = get_spec("char-lm")
    assert param_count(spec.make_student()) <= 0.25 * param_count(spec.make_teacher())


def test_trainable_subsets():
    lm = CharLM(LMConfig(n_layer=2, n_head=2, d_model=32, context=16))
    everything = trainable_names(lm, "all")
    assert trainable_names(lm, "head") == ["head.weight", "head.bias"]
    last = trainable_names(lm, "last")
    assert all(n.startswith(("blocks.1.", "ln_f.", "head.")) for n in last) and "blocks.1.attn.qkv.weight" in last
    assert len(everything) == len([*lm.parameters()]) > len(last) > 2


def test_windows_predict_the_next_byte():
    tokens = np.arange(10)
    s = windows(tokens, context=4, stride=2)
    assert s.x.dtype == np.float32 and s.x[1].tolist() == [2, 3, 4, 5] and s.y[1].tolist() == [3, 4, 5, 6]
    assert len(s.y) == 3  # starts 0, 2, 4 (a window needs its next byte)


def test_default_corpus_ships_with_the_package():
    text = read_text(None)
    train, test = text_splits(text, 64)
    assert len(text) > 100_000 and text.decode("utf-8")
    assert train.x.shape[1] == 64 and 0 < len(test.y) <= 200


def test_text_directory_is_joined(tmp_path):
    (tmp_path / "a.txt").write_text("héllo")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("world")
    assert read_text(tmp_path) == "héllo\nworld".encode()


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b"  \n", "is empty"), (b"ok \xff\xfe", "is not UTF-8 \\(byte 3")],
)
def test_bad_text_is_one_clear_error(tmp_path, content, message):
    f = tmp_path / "t.txt"
    f.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        read_text(f)


def test_missing_text_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        read_text(tmp_path / "nope.txt")


@pytest.mark.parametrize("target", TARGETS)
def test_tiny_lm_runs_in_executorch_close_to_eager(target):
    # Prepare
    from export.lower import lower_infer
    from export.metrics import pte_logits

    torch.manual_seed(0)
    lm = CharLM(TINY).eval()
    x = torch.randint(0, 256, (24, 16)).float()
    # Execute
    pte = lower_infer(lm, (torch.zeros(1, 16),), target, x, "dynamic" if target == "xnnpack-int8" else "static")
    got = pte_logits(pte, x.numpy())
    # Assert
    with torch.no_grad():
        eager = lm(x).numpy()
    if target == "xnnpack-int8":
        cos = (got * eager).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(eager, axis=1))
        assert cos.min() > 0.99
    else:
        np.testing.assert_allclose(got, eager, atol=1e-4)


def test_lm_train_program_scores_every_position_and_trains_the_subset():
    # Prepare
    from edge_runtime.trainer import TrainProgram
    from export.lower import export_train

    torch.manual_seed(0)
    lm = CharLM(TINY)
    x, y = torch.randint(0, 256, (4, 16)).float(), torch.randint(0, 256, (4, 16))
    weights = {k: v.numpy().copy() for k, v in lm.state_dict().items()}
    # Execute
    pte = export_train(lm, (x, y), trainable_names(lm, "head"), max_batch=64)
    prog = TrainProgram(pte, weights, (x[:1].numpy(), y[:1].numpy()))
    loss = prog.step(x.numpy(), y.numpy(), lr=0.1)
    # Assert: loss = mean CE over all B·T positions; only the head is trainable
    eager = torch.nn.functional.cross_entropy(lm.sequence_logits(x).flatten(0, 1), y.reshape(-1))
    assert loss == pytest.approx(eager.item(), abs=1e-5)
    assert prog.names == ["head.bias", "head.weight"]
    assert not np.allclose(prog.state()["head.weight"], weights["head.weight"])

"""Pure pieces of the export steps: metrics against hand-computed values, and magnitude pruning."""

import numpy as np
import pytest
import torch

from export.metrics import sparsity
from export.prune import magnitude_prune
from models import ModelError
from models.quality import perplexity, quality, top1


def test_perplexity_is_exp_of_mean_cross_entropy():
    # Prepare: two rows; p(y) = 1/2 and 1/4 under the softmax of these logits
    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    y = np.array([0, 1])
    # Execute / Assert: exp(−(ln ½ + ln ¼) / 2) = √8
    assert perplexity(logits, y) == pytest.approx(np.sqrt(8.0), rel=1e-9)


def test_sequence_targets_score_the_last_position():
    logits = np.array([[0.1, 0.9], [0.8, 0.2]])
    y = np.array([[1, 1, 1], [0, 1, 0]])  # (N, T): only y[:, -1] = [1, 0] is what forward predicts
    assert top1(logits, y) == 1.0
    assert set(quality(logits, y, "lm")) == {"accuracy", "perplexity"}
    assert set(quality(logits, y[:, -1], "classify")) == {"accuracy"}


def test_magnitude_pruning_zeroes_smallest_weights_and_keeps_them_zero_through_fine_tuning():
    # Prepare
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    before = torch.cat([net[0].weight.detach().flatten(), net[2].weight.detach().flatten()]).abs()
    threshold = before.sort().values[int(0.6 * before.numel()) - 1]
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

    def fine_tune(m):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    # Execute
    pruned = magnitude_prune(net, 0.6, fine_tune)
    # Assert: 60 % zeros, exactly where |w| was smallest, masks folded into plain parameters
    assert sparsity(pruned) == pytest.approx(0.6, abs=1 / 192)  # round(0.6 · 192) = 115 of 192 weights
    after = torch.cat([pruned[0].weight.detach().flatten(), pruned[2].weight.detach().flatten()])
    assert torch.all(after[before <= threshold] == 0)
    assert {n for n, _ in pruned.named_parameters()} == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_sparsity_out_of_range_is_refused():
    with pytest.raises(ModelError, match="sparsity 1.0 must be in"):
        magnitude_prune(torch.nn.Linear(2, 2), 1.0, lambda m: None)

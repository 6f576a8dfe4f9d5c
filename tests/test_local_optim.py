"""The device's local optimizer, schedule and clipping (edge_runtime/optim.py) against references:
torch.optim.AdamW, the schedule's formula, the clipped norm; and the round's recipe on the wire (v1.1)."""

import math

import numpy as np
import pytest
import torch

from edge_runtime.optim import LocalOptimizer, clip_grads_
from edgelearn.protocol import LocalConfig, ProtocolError, RoundMsg
from edgelearn.schedule import FINAL_LR_FRACTION, lr_at


def test_adamw_matches_torch_optim_adamw():
    torch.manual_seed(0)
    ours, ref = [torch.randn(5, 3), torch.randn(7)], None
    ref = [p.clone().requires_grad_(True) for p in ours]
    opt = LocalOptimizer("adamw", ours, weight_decay=0.01)
    torch_opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)
    for _ in range(5):
        grads = [torch.randn_like(p) for p in ours]
        opt.step(ours, grads, ours, lr=1e-2)
        for p, g in zip(ref, grads, strict=True):
            p.grad = g.clone()
        torch_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b.detach(), rtol=1e-5, atol=1e-6)


def test_sgd_with_the_proximal_term():
    p, anchor = [torch.tensor([1.0, 2.0])], [torch.tensor([0.0, 0.0])]
    LocalOptimizer("sgd", p).step(p, [torch.tensor([1.0, 1.0])], anchor, lr=0.1, mu=0.5)
    torch.testing.assert_close(p[0], torch.tensor([1.0 - 0.1 * 1.5, 2.0 - 0.1 * 2.0]))


def test_state_round_trips_so_a_resumed_job_continues_exactly():
    p1, p2 = [torch.ones(4)], [torch.ones(4)]
    a, b = LocalOptimizer("adamw", p1), LocalOptimizer("adamw", p2)
    g = [torch.tensor([0.1, -0.2, 0.3, 0.0])]
    a.step(p1, g, p1, 1e-2)
    b.step(p2, g, p2, 1e-2)
    c = LocalOptimizer("adamw", p2)
    c.load_state(b.state())  # b "crashed"; c resumes from its checkpointed state
    a.step(p1, g, p1, 1e-2)
    c.step(p2, g, p2, 1e-2)
    torch.testing.assert_close(p1[0], p2[0], rtol=0, atol=0)


def test_warmup_then_cosine_to_a_tenth():
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10, "cosine") == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, 10, "cosine") == pytest.approx(FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) / 2)
    assert lr_at(100, 100, 1.0, 10, "cosine") == pytest.approx(FINAL_LR_FRACTION)
    assert lr_at(50, 100, 0.3) == 0.3  # constant after the warm-up


def test_clipping_scales_all_gradients_together():
    g = [torch.tensor([3.0]), torch.tensor([4.0])]
    assert clip_grads_(g, 1.0) == pytest.approx(5.0)
    assert math.hypot(float(g[0]), float(g[1])) == pytest.approx(1.0, rel=1e-5)
    small = [torch.tensor([0.3])]
    clip_grads_(small, 1.0)
    assert float(small[0]) == pytest.approx(0.3)


def test_round_carries_the_recipe_and_a_v1_round_means_plain_sgd():
    local = LocalConfig(50, 16, 2e-3, "adamw", warmup_steps=5, schedule="cosine", clip_norm=1.0)
    got = RoundMsg.decode(RoundMsg(3, 2, 0.0, 1, None, local).encode())
    assert got.local == local
    v1 = b'{"round": 1, "base_version": 1, "deadline": 0, "min_updates": 1, '
    v1 += b'"local": {"steps": 5, "batch_size": 4, "lr": 0.1}}'
    assert RoundMsg.decode(v1).local == LocalConfig(5, 4, 0.1)  # optimizer sgd, constant, no clip
    with pytest.raises(ProtocolError, match="bad_round"):
        RoundMsg.decode(v1.replace(b'"lr": 0.1', b'"lr": 0.1, "optimizer": "lion"'))


def test_unknown_recipe_values_are_caller_errors():
    with pytest.raises(ValueError, match="optimizer"):
        LocalConfig(optimizer="lion")
    with pytest.raises(ValueError, match="unknown local optimizer"):
        LocalOptimizer("lion", [torch.zeros(1)])
    assert np.isfinite(lr_at(0, 1, 1.0, 0, "cosine"))


def test_round_jobs_are_sized_to_end_before_the_deadline():
    from edge_runtime.budget import Budget
    from edge_runtime.schedule import sized_steps

    assert sized_steps(50, 60.0, None, 1.0) == 50  # no step measured yet: as asked
    assert sized_steps(50, 60.0, 0.01, 1.0) == 50  # 4800 would fit
    assert sized_steps(50, 10.0, 0.4, 1.0) == 20  # ⌊0.8 · 10 / 0.4⌋
    assert sized_steps(50, 10.0, 0.4, Budget(max_train_s_per_hour=1800).train_duty) == 13  # half the time: 10 → 13
    assert sized_steps(50, -5.0, 0.4, 1.0) == 13  # past the deadline: the floor, ⌈0.25 · 50⌉, and a late update
    assert Budget().train_duty == 1.0 and Budget(max_train_s_per_hour=7200).train_duty == 1.0

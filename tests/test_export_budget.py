"""The exporter's wall-time budget (export/distill.py: fit_for; export/pipeline.py: train_plan)."""

import logging
import time

import numpy as np
import pytest
import torch

from export.distill import Budget, fit_for
from export.pipeline import ExportConfig, train_plan
from models.registry import get_spec


def test_fit_for_stops_at_its_budget_learns_and_reports_progress(caplog):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(512, 8)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    model = torch.nn.Linear(8, 2)
    before = float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    t0 = time.perf_counter()
    with caplog.at_level(logging.INFO, logger="export.distill"):
        model, steps = fit_for(model, x, y, Budget(1.5, lr=1e-2, warmup_steps=5, calibration_steps=10), name="t")
    took = time.perf_counter() - t0
    after = float(torch.nn.functional.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)))
    assert 1.5 <= took < 3.0 and steps > 50 and after < before
    assert any("left" in r.getMessage() and r.getMessage().startswith("[t]") for r in caplog.records)


@pytest.mark.parametrize(
    ("kw", "stages"),
    [({}, ("student-no-kd",)),  # char-lm's defaults: no teacher, no pruning
     ({"distill": True, "sparsity": 0.5}, ("teacher", "student-no-kd", "student-kd", "pruned")),
     ({"distill": True, "compare": False}, ("teacher", "student-kd"))],
)  # fmt: skip
def test_budget_shares_cover_the_stages_that_run(kw, stages):
    from export.pipeline import with_model_defaults

    spec = get_spec("char-lm")
    cfg = with_model_defaults(ExportConfig(model_id="char-lm", train_minutes=2.0, **kw), spec)
    plan = train_plan(spec, cfg, cfg.distill is True)
    assert plan.stages == stages
    seconds = [plan.budget(spec, s).seconds for s in stages]  # type: ignore[union-attr]
    assert sum(seconds) == pytest.approx(120.0)


def test_epochs_win_over_minutes():
    spec = get_spec("char-lm")
    plan = train_plan(spec, ExportConfig(model_id="char-lm", epochs=2, train_minutes=5.0), False)
    assert plan.minutes is None and plan.budget(spec, "student-no-kd") is None and plan.epochs == 2

"""Each aggregation strategy against hand-computed cases, called directly (coordinator/strategies.py), and
the coordinator's streaming fold checked against the strategy's one-call `aggregate`."""

import numpy as np
import pytest

from coordinator import aggregate as agg
from coordinator.rounds import Rounds
from coordinator.strategies import DpMean, FedBuff, Median, TrimmedMean, WeightedMean, make_strategy
from edgelearn.protocol import Update, decode_update
from tests.test_coordinator_rounds import make_cfg, upd, weights_only_rebuild


def u(values, n: int = 1, base: int = 1) -> Update:
    return Update("id", "dev", "m", base, n, {"w": np.array(values, np.float32)})


def test_weighted_mean_weights_by_samples_capped_at_n_max():
    got = WeightedMean().aggregate([u([1, 0], n=1), u([0, 4], n=3)], version=1)
    np.testing.assert_allclose(got["w"], [0.25, 3.0])
    capped = WeightedMean(max_samples=1).aggregate([u([1, 0], n=1), u([0, 4], n=10**14)], version=1)
    np.testing.assert_allclose(capped["w"], [0.5, 2.0])  # the huge claim counts as 1 sample


def test_fedbuff_damps_stale_updates_by_one_over_sqrt_one_plus_s():
    got = FedBuff().aggregate([u([2.0], n=1, base=4), u([2.0], n=1, base=1)], version=4)  # s = 0 and 3
    np.testing.assert_allclose(got["w"], [(2.0 * 1.0 + 2.0 * 0.5) / 2])


def test_robust_rules_ignore_weights():
    ups = [u([1.0], n=1), u([2.0], n=1), u([100.0], n=10**6)]
    np.testing.assert_allclose(Median().aggregate(ups, version=1)["w"], [2.0])
    five = [*ups, u([3.0]), u([-50.0])]
    np.testing.assert_allclose(TrimmedMean(trim_fraction=0.2).aggregate(five, version=1)["w"], [2.0])  # 1, 2, 3


def test_clipping_before_the_fold():
    got = WeightedMean(clip_norm=1.0).aggregate([u([3.0, 4.0], n=1), u([0.0, 0.0], n=1)], version=1)
    np.testing.assert_allclose(got["w"], [0.3, 0.4], rtol=1e-6)


def test_dp_mean_is_the_uniform_mean_of_clipped_updates_plus_seeded_noise():
    dp = agg.DpConfig(clip_norm=1.0, noise_multiplier=0.0)
    got = DpMean(clip_norm=1.0, dp=dp).aggregate([u([3.0, 4.0], n=1), u([0.0, 0.5], n=99)], version=1)
    np.testing.assert_allclose(got["w"], [0.3, 0.65], rtol=1e-6)
    noisy = DpMean(clip_norm=1.0, dp=agg.DpConfig(1.0, 1.0), secret=7)
    a, b = (noisy.aggregate([u([0.0, 0.0])], version=1, rnd=r)["w"] for r in (1, 2))
    assert not np.array_equal(a, b) and np.array_equal(a, noisy.aggregate([u([0.0, 0.0])], version=1, rnd=1)["w"])


@pytest.mark.parametrize(
    ("settings", "cls"),
    [({}, WeightedMean), ({"mode": "async"}, FedBuff), ({"aggregator": "median"}, Median),
     ({"aggregator": "trimmed_mean"}, TrimmedMean), ({"dp": agg.DpConfig(1.0, 0.0)}, DpMean)],
)  # fmt: skip
def test_config_picks_the_strategy(settings, cls):
    kw = {"aggregator": "mean", "mode": "sync", **settings}
    assert type(make_strategy(**kw)) is cls


@pytest.mark.parametrize(
    "settings",
    [{}, {"mode": "async", "buffer_size": 3}, {"aggregator": "median"}, {"aggregator": "trimmed_mean"},
     {"clip_norm": 0.05}, {"dp": agg.DpConfig(0.05, 0.0)}, {"max_samples_per_update": 20}],
)  # fmt: skip
def test_the_coordinators_streaming_fold_equals_the_strategys_aggregate(bundle_dir, tmp_path, settings):
    rounds = Rounds(make_cfg(bundle_dir, tmp_path, **settings), weights_only_rebuild)
    payloads = [upd(rounds, f"u{k}", n, k) for k, n in enumerate((10, 30, 60))]
    for p in payloads:
        assert rounds.handle(decode_update(p).device_id, p).status == "accepted"
    expected = rounds.strategy.aggregate([decode_update(p) for p in payloads], rounds.version, rounds.round)
    for name, d in rounds.aggregated_delta().items():
        np.testing.assert_allclose(d, expected[name], atol=1e-7)
    rounds.store.close()

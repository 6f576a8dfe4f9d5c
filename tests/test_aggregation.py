"""Aggregation math against hand-computed cases (coordinator/aggregate.py, coordinator/optim.py)."""

import math

import numpy as np
import pytest

from coordinator import aggregate as agg
from coordinator import optim

SHAPES = {"w": (2,)}


def d(*xs: float) -> dict[str, np.ndarray]:
    return {"w": np.array(xs, np.float32)}


def test_streaming_mean_is_weighted_average():
    # Prepare: Δ1 = [1, 2] with n=1, Δ2 = [4, 8] with n=3
    m = agg.StreamingMean(SHAPES)
    # Execute
    m.add(d(1, 2), 1.0)
    m.add(d(4, 8), 3.0)
    # Assert: (1·[1,2] + 3·[4,8]) / 4 = [3.25, 6.5]
    np.testing.assert_allclose(m.result()["w"], [3.25, 6.5])
    assert m.count == 2 and m.total_weight == 4.0


def test_streaming_mean_matches_protocol_formula_on_random_updates():
    rng = np.random.default_rng(0)
    deltas = [rng.normal(size=(5, 3)).astype(np.float32) for _ in range(7)]
    ns = [3, 10, 1, 7, 2, 9, 4]
    m = agg.StreamingMean({"w": (5, 3)})
    for x, n in zip(deltas, ns, strict=True):
        m.add({"w": x}, float(n))
    expected = sum(n / sum(ns) * x for x, n in zip(deltas, ns, strict=True))
    np.testing.assert_allclose(m.result()["w"], expected, atol=1e-6)


def test_empty_aggregation_raises():
    with pytest.raises(ValueError, match="no updates"):
        agg.StreamingMean(SHAPES).result()


def test_clip_scales_to_the_norm_bound():
    # ‖[3, 4]‖ = 5; clipped to C=1 → [0.6, 0.8]; a small update is untouched
    np.testing.assert_allclose(agg.clip(d(3, 4), 1.0)["w"], [0.6, 0.8], rtol=1e-6)
    small = d(0.3, 0.4)
    assert agg.clip(small, 1.0)["w"] is small["w"]


def test_median_is_coordinatewise_and_ignores_weights():
    m = agg.Median(SHAPES)
    for x, w in (((1, 100), 1.0), ((2, -5), 50.0), ((30, 0), 1.0)):
        m.add(d(*x), w)
    np.testing.assert_array_equal(m.result()["w"], [2, 0])


def test_trimmed_mean_drops_extremes():
    # K=5, β=0.2 → drop 1 smallest and 1 largest per coordinate: mean of [2,3,4] = 3, of [0,1,2] = 1
    m = agg.TrimmedMean(SHAPES, 0.2)
    for x in ((1, 2), (2, 1), (3, 0), (4, -100), (1000, 100)):
        m.add(d(*x), 1.0)
    np.testing.assert_allclose(m.result()["w"], [3.0, 1.0])


def test_trim_fraction_out_of_range_is_refused():
    with pytest.raises(ValueError, match="trim fraction"):
        agg.TrimmedMean(SHAPES, 0.5)


def test_staleness_weight():
    assert agg.staleness_weight(0) == 1.0
    assert agg.staleness_weight(3) == 0.5
    with pytest.raises(ValueError):
        agg.staleness_weight(-1)


def test_dp_mean_adds_seeded_noise_of_sigma_c():
    # Prepare: sum of clipped updates [2, 2] over K=2, C=1, σ=0.5 → noise std 0.5
    dp = agg.DpConfig(clip_norm=1.0, noise_multiplier=0.5)
    z = agg.gaussian_noise({"w": (2,)}, 0.5, seed=7)["w"]
    # Execute
    out = agg.dp_mean(d(2, 2), 2, dp, seed=7)
    # Assert: (sum + z) / K, and a big sample of the noise has std σ·C
    np.testing.assert_allclose(out["w"], (np.array([2, 2]) + z) / 2, rtol=1e-6)
    big = agg.gaussian_noise({"w": (200_000,)}, 0.5, seed=1)["w"]
    assert abs(float(big.std()) - 0.5) < 0.01


def test_fedavg_step():
    out = optim.fedavg_step({"w": np.array([1.0, 1.0], np.float32), "b": np.array([5.0], np.float32)}, d(0.5, -1))
    np.testing.assert_allclose(out["w"], [1.5, 0.0])
    np.testing.assert_array_equal(out["b"], [5.0])  # not in Δ̄: unchanged


def test_fedavgm_two_steps():
    # m1 = Δ = [1, 0]; θ1 = 0 + 1·m1; m2 = 0.5·[1,0] + [0,2] = [0.5, 2]; θ2 = θ1 + m2 = [1.5, 2]
    cfg = optim.ServerOptConfig("fedavgm", lr=1.0, momentum=0.5)
    theta, st = optim.make_server_opt(cfg).step({"w": np.zeros(2, np.float32)}, d(1, 0), {})
    theta, st = optim.make_server_opt(cfg).step(theta, d(0, 2), st)
    np.testing.assert_allclose(theta["w"], [1.5, 2.0])
    np.testing.assert_allclose(st["m:w"], [0.5, 2.0])


def test_fedadam_one_step():
    # β1=0.9, β2=0.99, τ=0.01, η=0.1, Δ=[1, -2]: m=[0.1,-0.2], v=[0.01,0.04], step = m/(√v+τ)
    cfg = optim.ServerOptConfig("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.01)
    theta, st = optim.make_server_opt(cfg).step({"w": np.zeros(2, np.float32)}, d(1, -2), {})
    np.testing.assert_allclose(st["m:w"], [0.1, -0.2], rtol=1e-5)
    np.testing.assert_allclose(st["v:w"], [0.01, 0.04], rtol=1e-5)
    np.testing.assert_allclose(theta["w"], [0.1 * 0.1 / 0.11, 0.1 * -0.2 / 0.21], rtol=1e-5)


def test_unknown_server_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown server optimizer"):
        optim.ServerOptConfig("sgd")


def test_sample_weight_clips():
    assert agg.sample_weight(500, 100) == 100.0
    assert agg.sample_weight(50, None) == 50.0
    assert math.isclose(agg.l2_norm(d(3, 4)), 5.0)


@pytest.mark.parametrize(("clip", "sigma"), [(0.0, 1.0), (-1.0, 1.0), (1.0, -0.5), (float("nan"), 1.0)])
def test_dp_settings_that_would_disable_or_reverse_it_are_refused(clip, sigma):
    with pytest.raises(ValueError, match="DP"):
        agg.DpConfig(clip, sigma)


def test_dp_noise_seed_is_secret_stable_and_fresh_per_round(tmp_path):
    from coordinator.state import StateLayout

    def dp_secret(path):
        return StateLayout(path).dp_secret()

    # Prepare / Execute: two fleets' secrets, and the seeds of rounds 1, 1 again and 2 of one of them
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    a, b = dp_secret(tmp_path / "a"), dp_secret(tmp_path / "b")
    z = [agg.gaussian_noise({"w": (4,)}, 1.0, agg.noise_seed(a, r))["w"] for r in (1, 1, 2)]
    # Assert: 256 random bits per fleet, kept owner-only; the same round gives the same noise (a redone close),
    # another round or fleet other noise
    assert a != b and a.bit_length() > 200 and dp_secret(tmp_path / "a") == a
    assert (tmp_path / "a" / "dp.secret").stat().st_mode & 0o777 == 0o600
    assert np.array_equal(z[0], z[1]) and not np.array_equal(z[0], z[2])

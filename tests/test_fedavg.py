"""Protocol v1 FedAvg, θ_{v+1} = θ_v + Σ_k (min(n_k, n_max) / Σ_j min(n_j, n_max)) · Δ_k, through the
coordinator's production path: sample_weight → StreamingMean → fedavg_step."""

import numpy as np

from coordinator import aggregate as agg
from coordinator.optim import fedavg_step


def fedavg(base, deltas, num_samples, max_samples=None):
    acc = agg.StreamingMean({n: base[n].shape for n in deltas[0]})
    for delta, n in zip(deltas, num_samples, strict=True):
        acc.add(delta, agg.sample_weight(n, max_samples))
    return fedavg_step(base, acc.result())


def test_release_is_theta_plus_sample_weighted_deltas():
    # Prepare: θ = [1, 2], Δ1 = [4, 0] (n=1), Δ2 = [0, 8] (n=3), frozen b = [5]
    base = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([5.0], np.float32)}
    deltas = [{"w": np.array([4.0, 0.0], np.float32)}, {"w": np.array([0.0, 8.0], np.float32)}]
    # Execute
    out = fedavg(base, deltas, [1, 3])
    # Assert: θ' = θ + 1/4·Δ1 + 3/4·Δ2 = [2, 8]; b unchanged; base not modified
    np.testing.assert_allclose(out["w"], [2.0, 8.0])
    np.testing.assert_array_equal(out["b"], [5.0])
    np.testing.assert_array_equal(base["w"], [1.0, 2.0])


def test_claimed_samples_are_capped():
    # Prepare: one device claims 1000 samples; the cap is 30 → weights 10/40 and 30/40
    base = {"w": np.zeros(1, np.float32)}
    deltas = [{"w": np.array([4.0], np.float32)}, {"w": np.array([8.0], np.float32)}]
    # Execute
    out = fedavg(base, deltas, [10, 1000], max_samples=30)
    # Assert: 0.25·4 + 0.75·8 = 7
    np.testing.assert_allclose(out["w"], [7.0])

import numpy as np
import pytest

from coordinator.fedavg import aggregate, fedavg_weights


def test_weights_are_sample_shares():
    assert fedavg_weights([10, 30]) == [0.25, 0.75]


def test_weights_clip_num_samples():
    # Prepare: one device claims 1000 samples; the cap is 30
    # Execute
    w = fedavg_weights([10, 1000], max_samples_per_update=30)
    # Assert: 10/(10+30), 30/(10+30)
    assert w == [0.25, 0.75]


def test_aggregate_hand_computed():
    # Prepare: θ = [1, 2], Δ1 = [4, 0] (n=1), Δ2 = [0, 8] (n=3), frozen b = [5]
    base = {"w": np.array([1.0, 2.0], np.float32), "b": np.array([5.0], np.float32)}
    deltas = [{"w": np.array([4.0, 0.0], np.float32)}, {"w": np.array([0.0, 8.0], np.float32)}]
    # Execute
    out = aggregate(base, deltas, [1, 3])
    # Assert: θ' = θ + 1/4·Δ1 + 3/4·Δ2 = [2, 8]; b unchanged; base not modified
    np.testing.assert_allclose(out["w"], [2.0, 8.0])
    np.testing.assert_array_equal(out["b"], [5.0])
    np.testing.assert_array_equal(base["w"], [1.0, 2.0])


def test_aggregate_needs_an_update():
    with pytest.raises(ValueError, match="at least one update"):
        aggregate({"w": np.zeros(2, np.float32)}, [], [])

"""Hidden tests of exercise bias-update (left out of handouts made with --hide-tests)."""
import numpy as np
import pytest

from tinymoe.layers.router import update_bias


@pytest.mark.balance
def test_update_bias_float32_and_fractional_mean():
    bias = np.zeros(3, dtype=np.float32)
    load = np.array([1, 2, 4])                        # mean 7/3: only expert 2 is above it
    new = update_bias(bias, load, 0.25)
    assert new.dtype == np.float32
    assert new.tolist() == [0.25, 0.25, -0.25]
    assert update_bias(bias, np.array([3, 3, 3]), 0.25).tolist() == [0.0, 0.0, 0.0]

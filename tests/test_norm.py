"""RMSNorm: loop-level values, gradients, dtypes, errors."""
import math

import numpy as np
import pytest

from tinymoe.gradcheck import gradcheck
from tinymoe.layers.norm import rmsnorm_backward, rmsnorm_forward


@pytest.mark.norm
def test_rmsnorm_matches_loops(rng, tol):
    x, w = rng.standard_normal((2, 3, 5)), rng.standard_normal(5)
    eps = 1e-5
    y, _ = rmsnorm_forward(x, w, eps)
    for b in range(2):
        for t in range(3):
            ms = sum(v * v for v in x[b, t]) / 5
            for d in range(5):
                assert abs(y[b, t, d] - w[d] * x[b, t, d] / math.sqrt(ms + eps)) < tol["f64_close"]


@pytest.mark.norm
def test_rmsnorm_unit_weight_gives_unit_rms(rng, tol):
    x = rng.standard_normal((4, 8)) * 100
    y, _ = rmsnorm_forward(x, np.ones(8), eps=0.0 + 1e-12)
    np.testing.assert_allclose(np.sqrt(np.mean(y * y, axis=-1)), 1.0, rtol=100 * tol["f64_close"])


@pytest.mark.norm
def test_gradcheck_rmsnorm(rng, tol):
    gradcheck(lambda x, w: rmsnorm_forward(x, w, 1e-6),
              lambda dy, c: dict(zip(("x", "w"), rmsnorm_backward(dy, c))),
              {"x": rng.standard_normal((2, 3, 5)), "w": rng.standard_normal(5)}
              ).assert_ok(tol["grad_rel"])


@pytest.mark.norm
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rmsnorm_dtype(rng, tol, dtype):
    x, w = rng.standard_normal((3, 6)), rng.standard_normal(6)
    y, c = rmsnorm_forward(x.astype(dtype), w.astype(dtype))
    dx, dw = rmsnorm_backward(y, c)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    y64, _ = rmsnorm_forward(x, w)
    np.testing.assert_allclose(y, y64, rtol=0, atol=tol["f32_vs_f64"] * np.abs(y64).max())


@pytest.mark.norm
def test_rmsnorm_bad_inputs():
    with pytest.raises(ValueError, match="x: last dimension 4 does not match w's size 5"):
        rmsnorm_forward(np.zeros((2, 4)), np.ones(5))
    with pytest.raises(ValueError, match="w: expected 1 dimensions"):
        rmsnorm_forward(np.zeros((2, 4)), np.ones((1, 4)))
    with pytest.raises(TypeError, match="x: dtype int64"):
        rmsnorm_forward(np.zeros((2, 4), dtype=np.int64), np.ones(4))
    with pytest.raises(TypeError, match="dtype mismatch"):
        rmsnorm_forward(np.zeros((2, 4), dtype=np.float32), np.ones(4))

"""Hidden tests of exercise rmsnorm-backward (left out of handouts made with --hide-tests)."""
import numpy as np
import pytest

from tinymoe.gradcheck import gradcheck
from tinymoe.layers.norm import rmsnorm_backward, rmsnorm_forward


@pytest.mark.norm
def test_rmsnorm_backward_3d_large_eps_against_closed_form(tol):
    # expected from the closed form written out per row: dx_i = r g_i - x_i r^3 (1/D) sum_j g_j x_j
    rng = np.random.default_rng(11)
    x, w, dy = rng.standard_normal((2, 3, 5)), rng.standard_normal(5), rng.standard_normal((2, 3, 5))
    eps = 0.7                                        # a large eps: r must include it
    _, cache = rmsnorm_forward(x, w, eps)
    dx, dw = rmsnorm_backward(dy, cache)
    ex, ew = np.zeros_like(x), np.zeros_like(w)
    for b in range(2):
        for t in range(3):
            row, g = x[b, t], dy[b, t] * w
            r = 1.0 / np.sqrt(np.mean(row ** 2) + eps)
            ex[b, t] = r * g - row * r ** 3 * np.dot(g, row) / 5
            ew += dy[b, t] * row * r
    np.testing.assert_allclose(dx, ex, rtol=0, atol=tol["f64_close"])
    np.testing.assert_allclose(dw, ew, rtol=0, atol=tol["f64_close"])
    gradcheck(lambda x, w: rmsnorm_forward(x, w, eps),
              lambda d, c: dict(zip("xw", rmsnorm_backward(d, c))),
              {"x": x, "w": w}).assert_ok(tol["grad_rel"])

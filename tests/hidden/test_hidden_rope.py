"""Hidden tests of exercise rope (left out of handouts made with --hide-tests)."""
import numpy as np
import pytest

from tinymoe.layers.rope import rope_backward, rope_forward


@pytest.mark.rope
def test_rope_two_head_axes_and_adjoint(tol):
    # <R x, d> = <x, R^T d> for every x, d: the backward is the adjoint of the forward
    rng = np.random.default_rng(12)
    T, half = 4, 3
    phi = rng.uniform(-3, 3, size=(T, half))
    cos, sin = np.cos(phi), np.sin(phi)
    x, d = rng.standard_normal((2, T, 2, 3, 2 * half)), rng.standard_normal((2, T, 2, 3, 2 * half))
    y = rope_forward(x, cos, sin)
    # an explicit rotation of the pair (x[2j], x[2j+1]) of entry [1, 2, 0, 1]
    j = 2
    a, b = x[1, 2, 0, 1, 2 * j], x[1, 2, 0, 1, 2 * j + 1]
    assert abs(y[1, 2, 0, 1, 2 * j] - (a * cos[2, j] - b * sin[2, j])) < tol["f64_close"]
    assert abs(y[1, 2, 0, 1, 2 * j + 1] - (a * sin[2, j] + b * cos[2, j])) < tol["f64_close"]
    assert abs(np.sum(y * d) - np.sum(x * rope_backward(d, cos, sin))) < tol["f64_close"] * 100

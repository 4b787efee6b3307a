"""RoPE in DeepSeek's interleaved-pair layout (YaRN numbers are tested with MLA)."""
import math

import numpy as np
import pytest

from tinymoe import ModelConfig
from tinymoe.gradcheck import gradcheck
from tinymoe.layers.rope import (rope_angles, rope_backward, rope_forward, rope_inv_freq,
                                 softmax_scale)

CFG = ModelConfig.preset("toy", qk_rope_head_dim=6)       # Dr = 6: three pairs, no YaRN


@pytest.mark.rope
def test_rope_inv_freq_and_scale_closed_form(tol):
    inv = rope_inv_freq(CFG)
    for j in range(3):
        assert abs(inv[j] - 10000.0 ** (-2 * j / 6)) < tol["f64_close"]
    assert abs(softmax_scale(CFG) - 1 / math.sqrt(8 + 6)) < tol["f64_close"]


@pytest.mark.rope
def test_rope_matches_pairwise_rotation_loop(rng, tol):
    B, T, H, Dr = 2, 5, 3, 6
    x = rng.standard_normal((B, T, H, Dr))
    pos = np.arange(7, 7 + T)
    cos, sin = rope_angles(CFG, pos)
    y = rope_forward(x, cos, sin)
    for b in range(B):
        for t in range(T):
            for h in range(H):
                for j in range(Dr // 2):
                    phi = pos[t] * 10000.0 ** (-2 * j / Dr)
                    a, c = x[b, t, h, 2 * j], x[b, t, h, 2 * j + 1]
                    assert abs(y[b, t, h, 2 * j] - (a * math.cos(phi) - c * math.sin(phi))) < tol["f64_close"]
                    assert abs(y[b, t, h, 2 * j + 1] - (a * math.sin(phi) + c * math.cos(phi))) < tol["f64_close"]


@pytest.mark.rope
def test_rope_position_zero_is_identity_and_norm_preserved(rng, tol):
    x = rng.standard_normal((2, 4, 3, 6))
    cos, sin = rope_angles(CFG, np.arange(4))
    y = rope_forward(x, cos, sin)
    np.testing.assert_array_equal(y[:, 0], x[:, 0])
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1),
                               rtol=tol["f64_close"])
    # and per pair: rotation keeps each 2-d pair's length
    np.testing.assert_allclose(y[..., 0::2] ** 2 + y[..., 1::2] ** 2,
                               x[..., 0::2] ** 2 + x[..., 1::2] ** 2, rtol=tol["f64_exact"], atol=tol["f64_roundoff"])


@pytest.mark.rope
def test_rope_dot_product_depends_only_on_offset(rng, tol):
    q, k = rng.standard_normal(6), rng.standard_normal(6)

    def rot(v, pos):
        c, s = rope_angles(CFG, np.array([pos]))
        return rope_forward(v.reshape(1, 1, 6), c, s).reshape(6)

    for offset in (0, 3, 11):
        dots = [rot(q, m + offset) @ rot(k, m) for m in (0, 5, 20, 40)]
        np.testing.assert_allclose(dots, dots[0], rtol=0, atol=tol["f64_close"])
    assert abs(rot(q, 3) @ rot(k, 0) - rot(q, 4) @ rot(k, 0)) > 1e-6   # but it does depend on it


@pytest.mark.rope
def test_rope_backward_inverts_forward(rng, tol):
    x = rng.standard_normal((1, 3, 2, 6))
    cos, sin = rope_angles(CFG, np.arange(3) + 9)
    np.testing.assert_allclose(rope_backward(rope_forward(x, cos, sin), cos, sin), x,
                               rtol=0, atol=tol["f64_close"])


@pytest.mark.rope
def test_gradcheck_rope(rng, tol):
    cos, sin = rope_angles(CFG, np.arange(4) + 2)
    gradcheck(lambda x: (rope_forward(x, cos, sin), None),
              lambda dy, _: {"x": rope_backward(dy, cos, sin)},
              {"x": rng.standard_normal((2, 4, 3, 6))}).assert_ok(tol["grad_rel"])


@pytest.mark.rope
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rope_dtype(rng, tol, dtype):
    x = rng.standard_normal((2, 3, 6))
    cos, sin = rope_angles(CFG, np.arange(3), dtype)
    assert cos.dtype == sin.dtype == dtype
    y = rope_forward(x.astype(dtype), cos, sin)
    assert y.dtype == dtype and rope_backward(y, cos, sin).dtype == dtype
    c64, s64 = rope_angles(CFG, np.arange(3))
    np.testing.assert_allclose(y, rope_forward(x, c64, s64), atol=tol["f32_vs_f64"])


@pytest.mark.rope
def test_rope_bad_inputs():
    cos, sin = rope_angles(CFG, np.arange(3))
    with pytest.raises(ValueError, match="x: expected"):
        rope_forward(np.zeros((2, 3, 4)), cos, sin)            # Dr = 4, angles for 6
    with pytest.raises(ValueError, match="x: expected"):
        rope_forward(np.zeros((2, 5, 6)), cos, sin)            # T = 5, angles for 3
    with pytest.raises(TypeError, match="x: dtype int64"):
        rope_forward(np.zeros((2, 3, 6), dtype=np.int64), cos, sin)
    with pytest.raises(ValueError, match="cos, sin"):
        rope_forward(np.zeros((2, 3, 6)), cos, sin[:2])
    with pytest.raises(ValueError, match="positions: range"):
        rope_angles(CFG, np.array([0, CFG.max_seq_len]))
    with pytest.raises(TypeError, match="positions: expected a 1-d integer"):
        rope_angles(CFG, np.array([0.5]))

"""YaRN (deepseek.md 4.1 and 4.4): ramp bounds, ramp, corrected frequencies and the softmax-scale
mscale, against DeepSeek-V3's published numbers and an independent evaluation of the formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tinymoe.config import ModelConfig
from tinymoe.layers.rope import (rope_inv_freq, softmax_scale, yarn_bounds, yarn_mscale,
                                 yarn_ramp)


def correction_dim(dim, theta, L, n_rot):
    """Independent: the slot j at which a frequency completes n_rot rotations over L tokens."""
    # theta^(-2j/dim) * L = 2 pi n_rot  <=>  j = dim * ln(L / (2 pi n_rot)) / (2 ln theta)
    return dim * math.log(L / (2 * math.pi * n_rot)) / (2 * math.log(theta))


@pytest.mark.rope
def test_v3_ramp_bounds_are_10_and_23():
    cfg = ModelConfig.preset("deepseek-v3")
    assert cfg.yarn                                     # 163840 > 4096
    assert abs(correction_dim(64, 1e4, 4096, 32) - 10.47) < 0.005      # deepseek.md 4.1
    assert abs(correction_dim(64, 1e4, 4096, 1) - 22.51) < 0.005
    assert yarn_bounds(64, 1e4, 4096, cfg.beta_fast, cfg.beta_slow) == (10, 23)


@pytest.mark.rope
def test_v3_ramp_shape(tol):
    ramp = yarn_ramp(64, 10, 23)
    assert ramp.shape == (32,)
    assert np.all(ramp[:11] == 0) and np.all(ramp[23:] == 1)
    np.testing.assert_allclose(np.diff(ramp[10:24]), np.full(13, 1 / 13), rtol=0, atol=tol["f64_ulp"])


@pytest.mark.rope
def test_v3_corrected_frequencies(tol):
    cfg = ModelConfig.preset("deepseek-v3")
    inv = rope_inv_freq(cfg)
    for j in range(32):
        f = 10000.0 ** (-2 * j / 64)
        if j <= 10:
            want = f                                    # high frequencies kept
        elif j >= 23:
            want = f / 40                               # low frequencies divided by s = 40
        else:
            r = (j - 10) / 13
            want = f / 40 * r + f * (1 - r)
        assert abs(inv[j] - want) <= tol["f64_close"] * f, j


@pytest.mark.rope
def test_softmax_scales_published(tol):
    v3 = ModelConfig.preset("deepseek-v3")
    m = 0.1 * 1.0 * math.log(40) + 1
    assert abs(yarn_mscale(40, 1.0) - 1.368888) < 5e-7 and abs(m * m - 1.873854) < 5e-7
    assert abs(softmax_scale(v3) - 0.1352338) < 5e-8
    assert abs(softmax_scale(v3) - 192 ** -0.5 * m * m) < tol["f64_ulp"]
    assert abs(softmax_scale(ModelConfig.preset("deepseek-v2")) - 0.1147214) < 5e-8
    # YaRN off (max_seq_len <= original_seq_len): plain (Dn + Dr)^(-1/2) and plain frequencies
    off = v3.replace(max_seq_len=4096)
    assert not off.yarn
    assert abs(softmax_scale(off) - 0.0721688) < 5e-8
    np.testing.assert_allclose(rope_inv_freq(off), [1e4 ** (-2 * j / 64) for j in range(32)],
                               rtol=tol["f64_ulp"], atol=0)
    assert yarn_mscale(1.0, 1.0) == 1.0 and yarn_mscale(0.5, 1.0) == 1.0


@pytest.mark.rope
def test_mscale_field_selects_v2_factor(tol):
    cfg = ModelConfig.preset("toy", max_seq_len=64, original_seq_len=16, rope_factor=4.0,
                             mscale=0.707)
    want = (8 + 4) ** -0.5 * (0.0707 * math.log(4.0) + 1) ** 2        # V2's sqrt(t) form
    assert abs(softmax_scale(cfg) - want) < tol["f64_ulp"]


@pytest.mark.rope
def test_zero_width_ramp_is_widened():
    # dim 4, L 16: cd(32) < 0 -> low 0; cd(1) = 0.2 -> high 1
    assert yarn_bounds(4, 1e4, 16, 32, 1) == (0, 1)
    # dim 4, L 2.1e8: cd(32) = 3.01 -> low 3; cd(1) = 3.76 -> ceil 4, capped at dim - 1 = 3
    L = 210_000_000
    assert math.floor(correction_dim(4, 1e4, L, 32)) == 3 < correction_dim(4, 1e4, L, 1)
    low, high = yarn_bounds(4, 1e4, L, 32, 1)
    assert low == 3 and high == pytest.approx(3.001)
    ramp = yarn_ramp(4, low, high)
    assert np.all(np.isfinite(ramp)) and np.all((ramp >= 0) & (ramp <= 1))

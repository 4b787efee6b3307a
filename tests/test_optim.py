"""AdamW, clipping and the schedule against hand-written reference formulas."""
import math

import numpy as np
import pytest

from tinymoe.optim import AdamW, clip_grad_norm, global_norm, lr_schedule

pytestmark = pytest.mark.optim


def _adamw_reference(p, grads, lr, b1, b2, eps, wd, decay):
    """Scalar loop over every entry: the textbook AdamW (Loshchilov & Hutter, Algorithm 2)."""
    p = p.astype(np.float64).ravel().copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.astype(np.float64).ravel()
        for i in range(p.size):
            m[i] = b1 * m[i] + (1 - b1) * g[i]
            v[i] = b2 * v[i] + (1 - b2) * g[i] ** 2
            mh = m[i] / (1 - b1 ** t)
            vh = v[i] / (1 - b2 ** t)
            p[i] -= lr * (mh / (math.sqrt(vh) + eps) + (wd * p[i] if decay else 0.0))
    return p


def test_adamw_matches_reference_loop(rng, tol):
    w = rng.standard_normal((3, 4))
    n = rng.standard_normal(4)
    grads = [{"layers.0.attn.wo": rng.standard_normal((3, 4)), "layers.0.attn_norm": rng.standard_normal(4)}
             for _ in range(5)]
    params = {"layers.0.attn.wo": w.copy(), "layers.0.attn_norm": n.copy()}
    opt = AdamW(params, lr=0.01, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for g in grads:
        opt.step(g)
    ref_w = _adamw_reference(w, [g["layers.0.attn.wo"] for g in grads], 0.01, 0.9, 0.95, 1e-8, 0.1, True)
    ref_n = _adamw_reference(n, [g["layers.0.attn_norm"] for g in grads], 0.01, 0.9, 0.95, 1e-8, 0.1, False)
    np.testing.assert_allclose(params["layers.0.attn.wo"].ravel(), ref_w, rtol=tol["f64_close"],
                               atol=tol["f64_roundoff"])
    np.testing.assert_allclose(params["layers.0.attn_norm"], ref_n, rtol=tol["f64_close"],
                               atol=tol["f64_roundoff"])


def test_adamw_updates_in_place_and_rejects_wrong_keys(rng):
    w = rng.standard_normal(3)
    params = {"a": w}
    opt = AdamW(params, lr=0.1)
    opt.step({"a": np.ones(3)})
    assert params["a"] is w and not np.allclose(w, 0)
    with pytest.raises(ValueError, match="keys differ"):
        opt.step({"b": np.ones(3)})
    with pytest.raises(ValueError, match="lr"):
        AdamW(params, lr=0.0)


def test_first_adam_step_is_lr_times_sign(tol):
    # With zero moments, m_hat = g and v_hat = g^2, so the first update is lr * g / (|g| + eps).
    params = {"w": np.array([1.0, -2.0, 3.0])}
    opt = AdamW(params, lr=0.5, eps=0.0)
    opt.step({"w": np.array([4.0, -0.25, 1e-3])})
    np.testing.assert_allclose(params["w"], [0.5, -1.5, 2.5], rtol=0, atol=tol["f64_close"])


def test_clip_grad_norm(tol):
    g = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert global_norm(g) == pytest.approx(5.0)
    clipped, norm = clip_grad_norm(g, 1.0)
    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["a"], [0.6, 0.0], atol=tol["f64_close"])
    np.testing.assert_allclose(clipped["b"], [[0.8]], atol=tol["f64_close"])
    same, _ = clip_grad_norm(g, 10.0)
    np.testing.assert_array_equal(same["a"], g["a"])


def test_lr_schedule_warmup_and_cosine():
    assert lr_schedule(1, 1.0, 10, 110) == pytest.approx(0.1)
    assert lr_schedule(10, 1.0, 10, 110) == pytest.approx(1.0)
    # halfway through the cosine: min + (1 - min) * 0.5
    assert lr_schedule(60, 1.0, 10, 110, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_schedule(110, 1.0, 10, 110, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_schedule(500, 1.0, 10, 110, min_ratio=0.1) == pytest.approx(0.1)


def test_state_dict_round_trip(rng):
    params = {"w": rng.standard_normal(4)}
    opt = AdamW(params, lr=0.1)
    opt.step({"w": rng.standard_normal(4)})
    state = opt.state_dict()
    params2 = {"w": params["w"].copy()}
    opt2 = AdamW(params2, lr=0.1)
    opt2.load_state_dict(state)
    g = rng.standard_normal(4)
    opt.step({"w": g})
    opt2.step({"w": g})
    np.testing.assert_array_equal(params["w"], params2["w"])
    with pytest.raises(ValueError, match="m/w"):
        opt2.load_state_dict({"t": np.array(1)})

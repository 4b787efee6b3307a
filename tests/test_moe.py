"""DeepSeekMoE layer: dense equivalence, explicit per-token loop, gradient check, capacity,
edge cases, and the dispatch/combine kernels (numba vs NumPy twins)."""
from __future__ import annotations


import numpy as np
import pytest

from tinymoe import ModelConfig, gradcheck
from tinymoe.kernels import get
from tinymoe.layers.basic import swiglu_forward
from tinymoe.layers.moe import capacity_keep, init_moe_params, moe_backward, moe_forward


def make_cfg(**kw):
    base = dict(dim=6, moe_inter_dim=4, n_routed_experts=6, n_activated_experts=2,
                n_shared_experts=1, score_func="sigmoid", route_scale=2.5)
    base.update(kw)
    return ModelConfig(**base).validate()


def loop_moe(x, p, weights, keep, indices):
    """y_t = Shared(x_t) + sum_{k kept} w_{t,k} Expert_{idx_{t,k}}(x_t), one token at a time."""
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        xt = x[t:t + 1]
        if "shared.w1" in p:
            y[t] += swiglu_forward(xt, p["shared.w1"], p["shared.w2"], p["shared.w3"])[0][0]
        for k in range(indices.shape[1]):
            if keep[t, k]:
                e = indices[t, k]
                out = swiglu_forward(xt, p["experts.w1"][e], p["experts.w2"][e], p["experts.w3"][e])
                y[t] += weights[t, k] * out[0][0]
    return y


@pytest.mark.moe
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_one_expert_top1_equals_dense_swiglu(score_func, rng, tol):
    cfg = make_cfg(n_routed_experts=1, n_activated_experts=1, n_shared_experts=0,
                   score_func=score_func, route_scale=1.0)
    p = init_moe_params(cfg, rng, np.float64)
    x = rng.standard_normal((5, 6))
    y, aux, c = moe_forward(x, p, np.zeros(1), cfg, 5)
    assert np.all(c.weights == 1.0)
    dense, _ = swiglu_forward(x, p["experts.w1"][0], p["experts.w2"][0], p["experts.w3"][0])
    np.testing.assert_allclose(y, dense, rtol=tol["f64_exact"], atol=tol["f64_exact"])


@pytest.mark.moe
@pytest.mark.parametrize("kw", [dict(), dict(n_expert_groups=3, n_limited_groups=2),
                                dict(score_func="softmax", n_shared_experts=0),
                                dict(capacity_factor=0.75), dict(n_activated_experts=6)])
def test_moe_matches_per_token_loop(kw, rng, tol):
    cfg = make_cfg(**kw)
    p = init_moe_params(cfg, rng, np.float64)
    x = rng.standard_normal((10, 6))
    bias = 0.2 * rng.standard_normal(6)
    y, _, c = moe_forward(x, p, bias, cfg, 5)
    ref = loop_moe(x, p, c.weights, c.keep, c.indices)
    np.testing.assert_allclose(y, ref, rtol=tol["f64_exact"], atol=tol["f64_exact"])
    assert c.load.sum() + c.dropped == 10 * cfg.n_activated_experts


@pytest.mark.moe
@pytest.mark.parametrize("kw", [dict(n_expert_groups=3, n_limited_groups=2),
                                dict(score_func="softmax", n_shared_experts=2)])
def test_moe_gradcheck(kw, tol):
    rng = np.random.default_rng(5)
    cfg = make_cfg(**kw)
    p = {k: v * 20 for k, v in init_moe_params(cfg, rng, np.float64).items()}
    x = rng.standard_normal((7, 6))
    bias = 0.05 * rng.standard_normal(6)
    _, _, c0 = moe_forward(x, p, bias, cfg, 7)

    def fwd(x, **pp):
        y, _, c = moe_forward(x, pp, bias, cfg, 7)
        assert np.array_equal(c.indices, c0.indices), "selection changed under the perturbation"
        return y, c

    def bwd(dy, c):
        dx, g = moe_backward(dy, c)
        return {"x": dx, **g}

    gradcheck(fwd, bwd, {"x": x, **p}, max_entries=60).assert_ok(tol["grad_rel"])


@pytest.mark.moe
def test_capacity_drop_order_and_counts():
    # 4 tokens, K = 2, E = 4, C = ceil(0.5 * 4 * 2 / 4) = 1.
    idx = np.array([[1, 0], [0, 1], [0, 2], [1, 3]])
    keep = capacity_keep(idx, 4, 1)
    # expert 0: first choices t1 (k0), t2 (k0); second choice t0 (k1) -> keeps t1 only
    # expert 1: first choices t0, t3; second t1 -> keeps t0 ; expert 2: t2 (k1) ; expert 3: t3 (k1)
    assert keep.tolist() == [[True, False], [True, False], [False, True], [False, True]]
    cfg = make_cfg(n_routed_experts=4, capacity_factor=0.5)
    rng = np.random.default_rng(0)
    p = init_moe_params(cfg, rng, np.float64)
    _, _, c = moe_forward(rng.standard_normal((4, 6)), p, np.zeros(4), cfg, 4)
    assert c.capacity == 1 and np.all(c.load <= 1)
    assert c.dropped == 8 - int(c.keep.sum()) == 8 - int(c.load.sum())


@pytest.mark.moe
def test_empty_experts_get_zero_gradients_and_single_token(rng):
    cfg = make_cfg(n_routed_experts=6, n_activated_experts=2)
    p = init_moe_params(cfg, rng, np.float64)
    x = rng.standard_normal((1, 6))                       # one token: 4 of 6 experts get nothing
    y, _, c = moe_forward(x, p, np.zeros(6), cfg, 1)
    dx, g = moe_backward(rng.standard_normal((1, 6)), c)
    assert set(g) == set(p) and all(g[k].shape == p[k].shape for k in p)
    used = set(c.indices[0].tolist())
    for e in range(6):
        nz = np.any(g["experts.w1"][e] != 0)
        assert nz == (e in used)
    assert dx.shape == (1, 6) and np.all(np.isfinite(dx))


@pytest.mark.moe
def test_float32_runs_and_matches_float64(rng, tol):
    cfg = make_cfg()
    p64 = init_moe_params(cfg, rng, np.float64)
    p32 = {k: v.astype(np.float32) for k, v in p64.items()}
    x = rng.standard_normal((6, 6))
    y64, _, c64 = moe_forward(x, p64, np.zeros(6), cfg, 3)
    y32, _, c32 = moe_forward(x.astype(np.float32), p32, np.zeros(6, np.float32), cfg, 3)
    dx32, g32 = moe_backward(np.ones((6, 6), np.float32), c32)
    assert y32.dtype == dx32.dtype == np.float32 and all(v.dtype == np.float32 for v in g32.values())
    np.testing.assert_array_equal(c32.indices, c64.indices)
    np.testing.assert_allclose(y32, y64, atol=tol["f32_vs_f64"])


@pytest.mark.moe
def test_bad_moe_input(rng):
    cfg = make_cfg()
    p = init_moe_params(cfg, rng, np.float64)
    x = rng.standard_normal((6, 6))
    with pytest.raises(ValueError, match="seq_len"):
        moe_forward(x, p, np.zeros(6), cfg, 4)
    q = dict(p)
    del q["shared.w1"]
    with pytest.raises(ValueError, match="keys"):
        moe_forward(x, q, np.zeros(6), cfg, 6)
    with pytest.raises(TypeError, match="dtype"):
        moe_forward(x.astype(np.float32), p, np.zeros(6), cfg, 6)


# ------------------------------------------------------------------------------------------------
# kernels: numba vs NumPy twins
# ------------------------------------------------------------------------------------------------

KERNEL_CASES = [(17, 3, 5, 2, 0.0), (1, 4, 3, 2, 0.0),      # random; single token
                (9, 4, 4, 4, 0.0), (12, 8, 3, 2, 0.3),      # K = E; drops
                (6, 10, 5, 2, 0.0)]                          # E > tokens: empty experts


@pytest.mark.kernels
@pytest.mark.parametrize("N,E,D,K,drop", KERNEL_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dispatch_combine_kernels_numba_equals_numpy(N, E, D, K, drop, dtype, tol):
    rng = np.random.default_rng(N * 100 + E)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64).reshape(-1)
    keep = rng.random(N * K) >= drop
    out = {}
    for which in ("numba", "numpy"):
        order, pos, off = get("moe_sort", which)(idx, keep, E)
        x = rng.standard_normal((N, D)).astype(dtype) if which == "numba" else out["x"]
        tok = order // K
        xs = get("moe_gather", which)(x, tok)
        w_s = np.linspace(0.5, 1.5, order.shape[0]).astype(dtype)
        y = get("moe_combine", which)(xs * 2, w_s, pos, N, K)
        dys, dw = get("moe_combine_backward", which)(np.ones((N, D), dtype) * x, xs, w_s, tok)
        out.update({"x": x} if which == "numba" else {})
        out[which] = (order, pos, off, xs, y, dys, dw)
    a, b = out["numba"], out["numpy"]
    for i in range(3):                                        # integer outputs: identical
        np.testing.assert_array_equal(a[i], b[i])
    r, t = (tol["f32_rtol"], tol["f32_atol"]) if dtype == np.float32 else (tol["f64_close"],) * 2
    for i in range(3, 7):
        assert a[i].dtype == dtype
        np.testing.assert_allclose(a[i], b[i], rtol=r, atol=t)
    # independent check of the sort: every expert block holds exactly its kept assignments, stable
    order, pos, off = b[:3]
    for e in range(E):
        expect = [j for j in range(N * K) if keep[j] and idx[j] == e]
        assert order[off[e]:off[e + 1]].tolist() == expect
    assert np.all(pos[~keep] == -1) and np.all(order[pos[keep]] == np.nonzero(keep)[0])


@pytest.mark.kernels
@pytest.mark.parametrize("kw", [dict(), dict(n_activated_experts=6, capacity_factor=0.8)])
def test_moe_layer_same_under_both_backends(kw, monkeypatch, tol):
    cfg = make_cfg(**kw)
    rng = np.random.default_rng(2)
    p = init_moe_params(cfg, rng, np.float64)
    x, dy = rng.standard_normal((9, 6)), rng.standard_normal((9, 6))
    res = {}
    for which in ("numba", "numpy"):
        monkeypatch.setenv("TINYMOE_BACKEND", which)
        y, _, c = moe_forward(x, p, np.zeros(6), cfg, 3)
        res[which] = (y,) + moe_backward(dy, c)
    (ya, dxa, ga), (yb, dxb, gb) = res["numba"], res["numpy"]
    np.testing.assert_allclose(ya, yb, rtol=tol["f64_close"], atol=tol["f64_close"])
    np.testing.assert_allclose(dxa, dxb, rtol=tol["f64_close"], atol=tol["f64_close"])
    for k in ga:
        np.testing.assert_allclose(ga[k], gb[k], rtol=tol["f64_close"], atol=tol["f64_close"])

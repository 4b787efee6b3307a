"""Router: forward vs an explicit per-token loop of deepseek.md 7.1/7.2, gradient checks, bias and
group semantics, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tinymoe import ModelConfig, gradcheck
from tinymoe.layers.router import router_backward, router_forward


def make_cfg(score_func="sigmoid", E=8, K=2, G=1, Gk=1, renorm=None, scale=1.0, D=6):
    return ModelConfig(dim=D, n_routed_experts=E, n_activated_experts=K, n_expert_groups=G,
                       n_limited_groups=Gk, score_func=score_func, route_scale=scale,
                       norm_topk_prob=renorm).validate()


def loop_router(x, gate_w, bias, cfg):
    """deepseek.md 7.1 / 7.2, step by step, one token at a time in plain Python."""
    N, E = x.shape[0], gate_w.shape[0]
    G, Gk, K = cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_activated_experts
    per = E // G
    renorm = cfg.norm_topk_prob if cfg.norm_topk_prob is not None else cfg.score_func == "sigmoid"
    W, I = np.zeros((N, K)), np.zeros((N, K), dtype=np.int64)
    for t in range(N):
        z = [sum(float(x[t, d]) * float(gate_w[e, d]) for d in range(x.shape[1])) for e in range(E)]
        if cfg.score_func == "sigmoid":
            s = [1.0 / (1.0 + math.exp(-v)) for v in z]
        else:
            m = max(z)
            ex = [math.exp(v - m) for v in z]
            s = [v / sum(ex) for v in ex]
        sel = [s[e] + float(bias[e]) for e in range(E)]
        if G > 1:
            gs = []
            for g in range(G):
                members = sorted((sel[e] for e in range(g * per, (g + 1) * per)), reverse=True)
                gs.append(members[0] + members[1] if cfg.score_func == "sigmoid" else members[0])
            kept = sorted(range(G), key=lambda g: (-gs[g], g))[:Gk]
            sel = [sel[e] if e // per in kept else -math.inf for e in range(E)]
        chosen = sorted(range(E), key=lambda e: (-sel[e], e))[:K]
        w = [s[e] for e in chosen]
        if renorm:
            tot = sum(w)
            w = [v / tot for v in w]
        W[t] = [v * cfg.route_scale for v in w]
        I[t] = chosen
    return W, I


def selection_margin(cache, K):
    """Smallest gap between the K-th and (K+1)-th selection score (group changes are caught by
    the selection assertion inside the perturbed forward)."""
    sel = np.sort(cache.sel, axis=1)[:, ::-1]
    return float(np.min(sel[:, K - 1] - sel[:, K])) if sel.shape[1] > K else np.inf


CASES = [("sigmoid", 1, 1, None), ("sigmoid", 4, 2, None), ("sigmoid", 4, 2, False),
         ("softmax", 1, 1, None), ("softmax", 4, 2, None), ("softmax", 4, 2, True),
         ("softmax", 1, 1, True)]


@pytest.mark.router
@pytest.mark.parametrize("score_func,G,Gk,renorm", CASES)
def test_router_matches_explicit_loop(score_func, G, Gk, renorm, tol):
    rng = np.random.default_rng(7)
    cfg = make_cfg(score_func, G=G, Gk=Gk, renorm=renorm, scale=2.5)
    x = rng.standard_normal((9, 6))
    gate_w = rng.standard_normal((8, 6))
    bias = rng.standard_normal(8) - 3.0           # negative biased scores: -inf masking matters
    w, idx, cache = router_forward(x, gate_w, bias, cfg)
    w_ref, idx_ref = loop_router(x, gate_w, bias, cfg)
    np.testing.assert_array_equal(idx, idx_ref)
    np.testing.assert_allclose(w, w_ref, rtol=tol["f64_close"], atol=tol["f64_close"])
    assert idx.dtype == np.int64 and cache.scores.shape == (9, 8)


@pytest.mark.router
@pytest.mark.parametrize("score_func,G,Gk,renorm", CASES)
def test_router_gradcheck(score_func, G, Gk, renorm, tol):
    rng = np.random.default_rng(3)
    cfg = make_cfg(score_func, G=G, Gk=Gk, renorm=renorm, scale=1.7)
    x = rng.standard_normal((6, 6))
    gate_w = rng.standard_normal((8, 6))
    bias = 0.1 * rng.standard_normal(8)
    _, idx0, cache0 = router_forward(x, gate_w, bias, cfg)
    assert selection_margin(cache0, cfg.n_activated_experts) > 1e-4    # clear top-k margin

    def fwd(x, gate_w):
        w, idx, cache = router_forward(x, gate_w, bias, cfg)
        assert np.array_equal(idx, idx0), "selection changed under the perturbation"
        return w, cache

    def bwd(dw, cache):
        dx, dg = router_backward(dw, cache)
        return {"x": dx, "gate_w": dg}

    gradcheck(fwd, bwd, {"x": x, "gate_w": gate_w}).assert_ok(tol["grad_rel"])


@pytest.mark.router
def test_group_score_top2_sum_vs_max_and_neg_inf_mask():
    # x = 0: sigmoid scores all 0.5, softmax scores all 1/4; the bias alone decides.
    x = np.zeros((1, 6))
    gate_w = np.zeros((4, 6))
    b = np.array([0.5, -0.4, 0.3, 0.3])
    # sigmoid (V3): group sums 1.0 + 0.1 = 1.1 < 0.8 + 0.8 = 1.6 -> group 1 -> expert 2 (tie -> lower)
    _, idx, _ = router_forward(x, gate_w, b, make_cfg("sigmoid", E=4, K=1, G=2, Gk=1))
    assert idx.tolist() == [[2]]
    # softmax (V2): group max 0.75 > 0.55 -> group 0 -> expert 0
    _, idx, _ = router_forward(x, gate_w, b, make_cfg("softmax", E=4, K=1, G=2, Gk=1))
    assert idx.tolist() == [[0]]
    # all biased scores negative: the excluded group must be -inf, not 0 (deepseek.md pitfall 9)
    b = np.array([-5.0, -5.0, -9.0, -9.0])
    _, idx, cache = router_forward(x, gate_w, b, make_cfg("sigmoid", E=4, K=2, G=2, Gk=1))
    assert idx.tolist() == [[0, 1]]
    assert np.all(np.isneginf(cache.sel[0, 2:]))


@pytest.mark.router
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_one_group_equals_plain_topk(score_func, rng):
    x, gate_w, bias = rng.standard_normal((20, 6)), rng.standard_normal((8, 6)), rng.standard_normal(8)
    w1, i1, c1 = router_forward(x, gate_w, bias, make_cfg(score_func, K=3))
    w2, i2, _ = router_forward(x, gate_w, bias, make_cfg(score_func, K=3, G=4, Gk=4))
    plain = np.argsort(-(c1.scores + bias), axis=1, kind="stable")[:, :3]
    np.testing.assert_array_equal(i1, plain)
    np.testing.assert_array_equal(i2, plain)
    np.testing.assert_array_equal(w1, w2)


@pytest.mark.router
def test_bias_changes_choice_not_weights(rng, tol):
    cfg = make_cfg("sigmoid", K=2, scale=2.5)
    x, gate_w = rng.standard_normal((10, 6)), rng.standard_normal((8, 6))
    w0, i0, c0 = router_forward(x, gate_w, np.zeros(8), cfg)
    big = np.zeros(8)
    big[5] = 10.0                                  # expert 5 becomes everyone's first choice
    w1, i1, c1 = router_forward(x, gate_w, big, cfg)
    assert np.all(i1[:, 0] == 5) and not np.all(i0[:, 0] == 5)
    # the weights are the unbiased scores of the chosen experts, renormalised, times 2.5
    s = c1.scores
    chosen = np.take_along_axis(s, i1, axis=1)
    np.testing.assert_allclose(w1, 2.5 * chosen / chosen.sum(1, keepdims=True), rtol=tol["f64_close"])
    # a bias that keeps the same choice (a constant shift of all experts) leaves w bit-identical
    w2, i2, _ = router_forward(x, gate_w, np.full(8, 0.25), cfg)
    np.testing.assert_array_equal(i2, i0)
    np.testing.assert_array_equal(w2, w0)
    np.testing.assert_array_equal(c1.scores, c0.scores)


@pytest.mark.router
def test_k_equals_e_and_single_token(rng, tol):
    cfg = make_cfg("softmax", E=4, K=4, renorm=False)
    x, gate_w = rng.standard_normal((1, 6)), rng.standard_normal((4, 6))
    w, idx, c = router_forward(x, gate_w, np.zeros(4), cfg)
    assert sorted(idx[0].tolist()) == [0, 1, 2, 3]
    np.testing.assert_allclose(w.sum(), 1.0, rtol=tol["f64_close"])   # all of the softmax


@pytest.mark.router
def test_bad_input_errors(rng):
    cfg = make_cfg("sigmoid")
    x, gate_w = rng.standard_normal((3, 6)), rng.standard_normal((8, 6))
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        router_forward(x, gate_w, np.zeros(8), cfg)
    # top-k larger than the experts reachable under the group limit (1 group of 2 experts)
    bad = ModelConfig(dim=6, n_routed_experts=8, n_activated_experts=3, n_expert_groups=4,
                      n_limited_groups=1)
    with pytest.raises(ValueError, match="n_activated_experts"):
        bad.validate()
    with pytest.raises(ValueError, match="group limit"):
        router_forward(rng.standard_normal((3, 6)), gate_w, np.zeros(8), bad)
    with pytest.raises(ValueError, match="bias"):
        router_forward(rng.standard_normal((3, 6)), gate_w, np.zeros(7), cfg)

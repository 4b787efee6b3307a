"""Balance losses (values vs explicit loops of the paper formulas, gradients), the
auxiliary-loss-free bias update, and the router statistics."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tinymoe import ModelConfig, gradcheck_scalar
from tinymoe.layers.moe import init_moe_params, moe_backward, moe_forward
from tinymoe.layers.router import (dead_experts, expert_balance_backward, expert_balance_forward,
                                   expert_load, load_cv, maxvio, router_forward, router_stats,
                                   routing_entropy, seq_balance_backward, seq_balance_forward,
                                   update_bias, z_loss_backward, z_loss_forward)


def routed(rng, N=12, E=6, K=2, score_func="sigmoid"):
    cfg = ModelConfig(dim=5, n_routed_experts=E, n_activated_experts=K, score_func=score_func)
    x, gw = rng.standard_normal((N, 5)), rng.standard_normal((E, 5))
    _, idx, cache = router_forward(x, gw, np.zeros(E), cfg)
    return cache.scores.copy(), idx


def loop_seq_loss(s, idx, T, E, K):
    """V3 eqs. 17-20 per sequence (s' = s / sum_j s), mean over sequences; plain loops."""
    N = s.shape[0]
    B = N // T
    total = 0.0
    for b in range(B):
        L = 0.0
        for i in range(E):
            f = E / (K * T) * sum(1 for t in range(b * T, (b + 1) * T) if i in idx[t])
            P = sum(s[t, i] / sum(s[t]) for t in range(b * T, (b + 1) * T)) / T
            L += f * P
        total += L
    return total / B


@pytest.mark.balance
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_expert_balance_loss_matches_paper_loop(score_func, rng, tol):
    s, idx = routed(rng, score_func=score_func)
    N, E, K = 12, 6, 2
    loss, _ = expert_balance_forward(s, idx)
    # DeepSeekMoE eq. 12-14: f_i = N'/(K' T) sum_t 1(t selects i), P_i = (1/T) sum_t s'_{i,t}
    f = [E / (K * N) * sum(1 for t in range(N) if i in idx[t]) for i in range(E)]
    P = [sum(s[t, i] / sum(s[t]) for t in range(N)) / N for i in range(E)]
    assert abs(loss - sum(fi * pi for fi, pi in zip(f, P))) < tol["f64_close"]


@pytest.mark.balance
def test_seq_balance_loss_matches_paper_loop(rng, tol):
    s, idx = routed(rng)
    loss, _ = seq_balance_forward(s, idx, 4)
    assert abs(loss - loop_seq_loss(s, idx, 4, 6, 2)) < tol["f64_close"]


@pytest.mark.balance
def test_balance_loss_uniform_is_one_and_collapse_is_e_over_k(tol):
    # E = 4, K = 2, T = 2: token 0 picks {0,1}, token 1 picks {2,3}, equal scores -> f = P*E = 1
    s = np.full((2, 4), 0.3)
    idx = np.array([[0, 1], [2, 3]])
    assert abs(seq_balance_forward(s, idx, 2)[0] - 1.0) < tol["f64_close"]
    # collapse: both tokens pick {0,1} and put all affinity there -> E/K = 2
    s = np.array([[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    idx = np.array([[0, 1], [0, 1]])
    assert abs(expert_balance_forward(s, idx)[0] - 2.0) < tol["f64_close"]


@pytest.mark.balance
def test_z_loss_matches_loop(rng, tol):
    z = rng.standard_normal((5, 4)) * 3
    loss, _ = z_loss_forward(z)
    ref = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in z) / 5
    assert abs(loss - ref) < tol["f64_close"]


@pytest.mark.balance
@pytest.mark.parametrize("which", ["expert", "seq", "z"])
def test_balance_loss_gradcheck(which, rng, tol):
    s, idx = routed(rng)
    fwd, bwd = {"expert": (expert_balance_forward, expert_balance_backward),
                "seq": (lambda a, i: seq_balance_forward(a, i, 3), seq_balance_backward),
                "z": (lambda a, i: z_loss_forward(a), z_loss_backward)}[which]
    inputs = {"s": s}
    loss0, cache = fwd(s, idx)
    grads = {"s": bwd(0.7, cache)}
    gradcheck_scalar(lambda: 0.7 * fwd(inputs["s"], idx)[0], inputs, grads).assert_ok(tol["grad_rel"])


@pytest.mark.balance
@pytest.mark.parametrize("score_func,G,Gk", [("sigmoid", 2, 1), ("softmax", 1, 1)])
def test_moe_aux_losses_gradcheck(score_func, G, Gk, tol):
    """All three aux terms on, through the router into x and gate; selection must not move."""
    rng = np.random.default_rng(11)
    cfg = ModelConfig(dim=6, moe_inter_dim=4, n_routed_experts=6, n_activated_experts=2,
                      n_shared_experts=1, n_expert_groups=G, n_limited_groups=Gk,
                      score_func=score_func, route_scale=1.5, aux_loss_alpha=0.3,
                      seq_aux_loss_alpha=0.2, z_loss_alpha=0.05).validate()
    p = {k: v * 20 for k, v in init_moe_params(cfg, rng, np.float64).items()}
    x = rng.standard_normal((8, 6))
    bias = 0.05 * rng.standard_normal(6)
    dy = rng.standard_normal((8, 6))
    _, aux0, c0 = moe_forward(x, p, bias, cfg, 4)
    assert aux0 > 0 and set(c0.aux) == {"expert", "seq", "z"}
    inputs = {"x": x, **p}

    def loss():
        y, aux, c = moe_forward(inputs["x"], {k: inputs[k] for k in p}, bias, cfg, 4)
        assert np.array_equal(c.indices, c0.indices), "selection changed under the perturbation"
        return float(np.sum(dy * y)) + 2.0 * aux

    dx, g = moe_backward(dy, c0, daux=2.0)
    gradcheck_scalar(loss, inputs, {"x": dx, **g}, names=["x", "gate", "experts.w1"],
                     max_entries=40).assert_ok(tol["grad_rel"])


@pytest.mark.balance
def test_aux_loss_is_sum_of_alpha_terms(rng, tol):
    cfg = ModelConfig(dim=6, moe_inter_dim=4, n_routed_experts=6, n_activated_experts=2,
                      aux_loss_alpha=0.3, seq_aux_loss_alpha=0.2, z_loss_alpha=0.05).validate()
    p = init_moe_params(cfg, rng, np.float64)
    x = rng.standard_normal((8, 6))
    _, aux, c = moe_forward(x, p, np.zeros(6), cfg, 2)
    s, idx, z = c.scores, c.indices, c.router.logits
    ref = 0.3 * loop_seq_loss(s, idx, 8, 6, 2) + 0.2 * loop_seq_loss(s, idx, 2, 6, 2) \
        + 0.05 * float(np.mean(np.log(np.exp(z).sum(1)) ** 2))
    assert abs(aux - ref) < tol["f64_close"]
    _, aux_off, c_off = moe_forward(x, p, np.zeros(6), cfg.replace(
        aux_loss_alpha=0.0, seq_aux_loss_alpha=0.0, z_loss_alpha=0.0), 2)
    assert aux_off == 0.0 and c_off.aux == {}


@pytest.mark.balance
def test_update_bias_moves_by_exactly_gamma():
    bias = np.array([0.1, -0.2, 0.0, 0.3])
    load = np.array([4, 0, 2, 2])                     # mean 2: overloaded, underloaded, even, even
    new = update_bias(bias, load, 0.001)
    assert new[0] == 0.1 - 0.001 and new[1] == -0.2 + 0.001
    assert new[2] == 0.0 and new[3] == 0.3
    assert new is not bias and bias[0] == 0.1        # fresh array, input untouched


@pytest.mark.balance
def test_router_statistics_hand_values(tol):
    idx = np.array([[0, 2], [0, 3], [0, 2], [4, 3]])
    load = expert_load(idx, 5)
    assert load.tolist() == [3, 0, 2, 2, 1] and load.dtype == np.int64
    mean = 8 / 5
    assert abs(maxvio(load) - (3 - mean) / mean) < tol["f64_close"]
    std = math.sqrt(sum((c - mean) ** 2 for c in [3, 0, 2, 2, 1]) / 5)
    assert abs(load_cv(load) - std / mean) < tol["f64_close"]
    assert dead_experts(load) == 1 and dead_experts(load, threshold=0.7) == 2   # 0 and 1 <= 1.12
    assert abs(routing_entropy(np.full((3, 4), 0.2)) - math.log(4)) < tol["f64_close"]
    assert routing_entropy(np.array([[1.0, 0.0, 0.0]])) == 0.0
    assert abs(routing_entropy(np.full((2, 4), 1.0), normalized=True) - 1.0) < tol["f64_close"]
    with pytest.raises(ValueError, match="all counts are zero"):
        maxvio(np.zeros(4))


@pytest.mark.balance
def test_router_stats_of_a_moe_cache_reports_drops(rng):
    cfg = ModelConfig(dim=6, moe_inter_dim=4, n_routed_experts=4, n_activated_experts=2,
                      capacity_factor=0.5).validate()
    p = init_moe_params(cfg, rng, np.float64)
    bias = np.array([5.0, 5.0, 0.0, 0.0])            # every token wants experts 0 and 1
    _, _, c = moe_forward(rng.standard_normal((8, 6)), p, bias, cfg, 8)
    st = router_stats(c)
    assert set(st) == {"load", "maxvio", "cv", "entropy", "dead", "dropped"}
    # capacity ceil(0.5 * 8 * 2 / 4) = 2: experts 0, 1 keep 2 each, 16 - 4 = 12 dropped
    assert st["load"].tolist() == [2, 2, 0, 0] and st["dropped"] == 12 and st["dead"] == 2


@pytest.mark.balance
def test_bias_update_moves_against_the_load_and_balances_a_model():
    """V3 2.1.2 in a model, as training runs it (loads from loss_and_grads, then
    update_router_biases): every expert above the mean load moves down by gamma, every one below
    moves up, and a router pushed onto two experts (bias +0.5: every token picks them, MaxVio
    = E/K - 1 = 3) is brought back to balance by the rule alone (no parameter changes). A flipped
    sign in update_bias or in the model's call of it keeps MaxVio at 3."""
    from tinymoe.model import Model
    cfg = ModelConfig.preset("toy")
    model = Model(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 16))
    names = sorted(model.buffers)
    for n in names:
        model.buffers[n][:2] += 0.5
    gamma, history = 0.03, []
    for _ in range(14):
        model.loss_and_grads(tokens[:, :-1], tokens[:, 1:])
        loads = model.last_stats["loads"]
        history.append([maxvio(loads[n]) for n in names])
        before = {n: model.buffers[n].astype(np.float64) for n in names}
        model.update_router_biases(loads, gamma)
        for n in names:
            c = loads[n].astype(np.float64)
            move = model.buffers[n] - before[n]                  # float32 buffers: ~1e-8 off
            over, under = c > c.mean(), c < c.mean()
            assert over.any() and np.allclose(move[over], -gamma, atol=1e-6), n
            assert np.allclose(move[under], gamma, atol=1e-6), n
    assert history[0] == [3.0] * len(names)
    assert max(max(h) for h in history[-4:]) < 2.0, history      # measured: 0.93 .. 1.4

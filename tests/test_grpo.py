"""GRPO: advantages, the clipped + KL objective and its hand-written backward, tasks and rewards.

Expected values come from closed forms (hand-computed group statistics), explicit Python loops
over sequences and tokens (deepseek.md §12's formula) and finite differences.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from tinymoe import gradcheck, gradcheck_scalar
from tinymoe.grpo import (BOS, EOS, PAD, VOCAB_SIZE, AdditionTask, GRPOConfig, SortTask, decode,
                          encode, group_advantages, grpo_loss, grpo_loss_backward, make_prompts,
                          response_mask, reward, rewards, sample_problems, sft_examples,
                          token_logprobs, token_logprobs_backward, token_logprobs_forward,
                          zero_variance_groups)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _batch(rng, M=4, L=5, V=7):
    """Random float64 logits/tokens with a mask that pads the tails of some sequences."""
    logits = rng.standard_normal((M, L, V))
    tokens = rng.integers(0, V, size=(M, L))
    lengths = np.array([L, 3, 1, 4][:M] + [L] * max(0, M - 4))
    mask = (np.arange(L)[None, :] < lengths[:, None]).astype(np.float64)
    return logits, tokens, mask


def _loop_loss(logits, tokens, mask, old, ref, adv, eps_lo, eps_hi, beta, length_norm,
               max_len=None, tau=1.0):
    """deepseek.md §12 written as loops: -(1/M) sum_i w_i sum_t m (min(rho A, clip(rho) A) - beta KL).

    Also returns the loop-counted clip fraction (share of tokens where the clipped branch binds)
    and the mean KL over response tokens.
    """
    M, L, V = logits.shape
    total, n_tok, n_clip, kl_sum = 0.0, 0, 0, 0.0
    for i in range(M):
        seq, length = 0.0, 0
        for t in range(L):
            if mask[i, t] == 0:
                continue
            length += 1
            z = [float(logits[i, t, v]) / tau for v in range(V)]
            mx = max(z)
            lse = mx + math.log(sum(math.exp(zv - mx) for zv in z))
            logp = z[int(tokens[i, t])] - lse
            rho = math.exp(logp - float(old[i, t]))
            clipped = min(max(rho, 1.0 - eps_lo), 1.0 + eps_hi)
            A = float(adv[i])
            s = min(rho * A, clipped * A)
            n_clip += int(clipped * A < rho * A)          # the clipped branch is the min
            d = (float(ref[i, t]) - logp) if ref is not None else 0.0
            kl = math.exp(d) - d - 1.0
            kl_sum += kl
            n_tok += 1
            seq += s - beta * kl
        if length_norm:
            total += seq / max(length, 1)
        else:
            total += seq / (L if max_len is None else max_len)
    return -total / M, n_clip / n_tok, kl_sum / n_tok


def _old_with_ratios(logits, tokens, ratios, tau=1.0):
    """old log-probs that make rho = exp(l - l_old) equal the requested ratios."""
    return token_logprobs(logits, tokens, tau) - np.log(ratios)


def _check_loss_grad(logits, tokens, mask, old, ref, adv, tol, **kw):
    loss, stats, cache = grpo_loss(logits, tokens, mask, old, ref, adv, **kw)
    dlogits = grpo_loss_backward(cache)
    rep = gradcheck_scalar(lambda: grpo_loss(logits, tokens, mask, old, ref, adv, **kw)[0],
                           {"logits": logits}, {"logits": dlogits})
    rep.assert_ok(tol["grad_rel"])
    return stats, dlogits


# ------------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------------

@pytest.mark.grpo
def test_group_advantages_closed_form(tol):
    # group [1, 0, 0, 0]: mean 1/4; sample std sqrt((9/16 + 3/16) / 3) = 1/2;
    # population std sqrt((9/16 + 3/16) / 4) = sqrt(3)/4
    r = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    a = group_advantages(r)                                     # sample std + 1e-4 (TRL)
    np.testing.assert_allclose(a[0], np.array([0.75, -0.25, -0.25, -0.25]) / (0.5 + 1e-4),
                               rtol=0, atol=tol["f64_close"])
    s2 = math.sqrt(4 * 0.25 / 3)                                # [0,1,1,0]: mean 1/2, sample std
    np.testing.assert_allclose(a[1], np.array([-0.5, 0.5, 0.5, -0.5]) / (s2 + 1e-4),
                               rtol=0, atol=tol["f64_close"])
    ap = group_advantages(r, std="population", eps=0.0)
    np.testing.assert_allclose(ap[0], np.array([0.75, -0.25, -0.25, -0.25]) / (math.sqrt(3) / 4),
                               rtol=0, atol=tol["f64_close"])
    an = group_advantages(r, scale_std=False)                   # Dr. GRPO: r - mean only
    np.testing.assert_allclose(an, np.array([[0.75, -0.25, -0.25, -0.25], [-0.5, 0.5, 0.5, -0.5]]),
                               rtol=0, atol=tol["f64_close"])
    assert np.all(np.abs(a.sum(axis=1)) < tol["f64_close"])     # advantages are centred per group
    with pytest.raises(ValueError, match="std"):
        group_advantages(r, std="bessel")
    with pytest.raises(ValueError, match="rewards"):
        group_advantages(r[0])


@pytest.mark.grpo
def test_identical_rewards_give_exactly_zero_advantages_and_gradient(rng):
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not come from r - mean by luck
    r = np.array([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.3, 0.3, 0.3]])
    for kw in (dict(), dict(std="population"), dict(scale_std=False), dict(eps=0.0)):
        a = group_advantages(r, **kw)
        assert np.array_equal(a, np.zeros_like(r)), kw
    assert zero_variance_groups(r).all()
    assert not zero_variance_groups(np.array([[0.0, 1.0, 1.0]])).any()
    # zero advantages with beta = 0: the loss and its gradient are exactly zero, even off-policy
    P, G = r.shape
    logits, tokens, mask = _batch(rng, M=P * G, L=4, V=6)
    old = _old_with_ratios(logits, tokens, rng.uniform(0.5, 1.5, size=tokens.shape))
    adv = group_advantages(r).reshape(-1)
    loss, stats, cache = grpo_loss(logits, tokens, mask, old, None, adv, beta=0.0)
    assert loss == 0.0
    assert np.all(grpo_loss_backward(cache) == 0.0)
    assert stats["clip_fraction"] == 0.0


# ------------------------------------------------------------------------------------------------
# token log-probs and the loss: gradient checks
# ------------------------------------------------------------------------------------------------

@pytest.mark.grpo
def test_token_logprobs_gradcheck_and_loops(rng, tol):
    logits = rng.standard_normal((2, 3, 5)) * 3
    tokens = rng.integers(0, 5, size=(2, 3))
    for tau in (1.0, 0.7):
        lp = token_logprobs(logits, tokens, tau)
        for i in range(2):
            for t in range(3):
                z = logits[i, t] / tau
                want = z[tokens[i, t]] - math.log(sum(math.exp(v) for v in z))
                assert abs(lp[i, t] - want) < tol["f64_close"]
        rep = gradcheck(lambda logits: token_logprobs_forward(logits, tokens, tau),
                        lambda d, c: {"logits": token_logprobs_backward(d, c)},
                        {"logits": logits.copy()})
        rep.assert_ok(tol["grad_rel"])


@pytest.mark.grpo
def test_grpo_loss_gradcheck_clip_inactive_with_kl(rng, tol):
    logits, tokens, mask = _batch(rng)
    old = _old_with_ratios(logits, tokens, rng.uniform(0.9, 1.1, size=tokens.shape))  # inside [0.8, 1.2]
    ref = token_logprobs(logits, tokens) + rng.normal(0, 0.5, size=tokens.shape)
    adv = np.array([1.2, -0.7, 0.4, -1.5])
    stats, _ = _check_loss_grad(logits, tokens, mask, old, ref, adv, tol, clip_eps=0.2, beta=0.3)
    assert stats["clip_fraction"] == 0.0
    assert stats["kl"] > 0.0


@pytest.mark.grpo
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_gradcheck_clip_active(rng, tol, beta):
    logits, tokens, mask = _batch(rng)
    # ratios well away from the kinks at 0.8 and 1.2, on both sides of the clip range
    choices = np.array([0.5, 0.65, 0.9, 1.1, 1.4, 1.7])
    ratios = choices[rng.integers(0, len(choices), size=tokens.shape)]
    ratios[0, :4] = [0.5, 1.7, 0.9, 1.4]                 # A > 0: 0.5 unclipped, 1.7 / 1.4 clipped
    ratios[1, :3] = [0.5, 1.7, 1.1]                      # A < 0: 0.5 clipped, 1.7 unclipped
    old = _old_with_ratios(logits, tokens, ratios)
    ref = token_logprobs(logits, tokens) + rng.normal(0, 0.3, size=tokens.shape)
    adv = np.array([0.9, -1.1, 0.5, -0.3])
    stats, _ = _check_loss_grad(logits, tokens, mask, old, ref, adv, tol, clip_eps=0.2, beta=beta)
    assert 0.0 < stats["clip_fraction"] < 1.0
    assert stats["clip_high"] > 0.0 and stats["clip_low"] > 0.0


@pytest.mark.grpo
def test_grpo_loss_gradcheck_variants(rng, tol):
    """Dr. GRPO's constant normaliser, DAPO's asymmetric clip, a sampling temperature."""
    logits, tokens, mask = _batch(rng, M=3, L=4, V=6)
    ratios = np.array([[0.6, 1.25, 1.0, 1.5], [0.7, 1.35, 0.95, 1.1], [1.0, 0.5, 1.6, 1.0]])
    for kw in (dict(length_norm=False), dict(length_norm=False, max_len=9),
               dict(clip_eps_high=0.28), dict(temperature=0.6)):
        tau = kw.get("temperature", 1.0)
        old = _old_with_ratios(logits, tokens, ratios, tau)
        ref = token_logprobs(logits, tokens, tau) + 0.2
        _check_loss_grad(logits, tokens, mask, old, ref, np.array([1.0, -0.5, 0.3]), tol,
                         beta=0.1, **kw)


@pytest.mark.grpo
def test_grpo_loss_gradient_zero_where_masked(rng):
    logits, tokens, mask = _batch(rng)
    old = _old_with_ratios(logits, tokens, rng.uniform(0.5, 1.5, size=tokens.shape))
    ref = token_logprobs(logits, tokens) - 0.4
    loss, _, cache = grpo_loss(logits, tokens, mask, old, ref, np.array([1.0, -1.0, 0.5, 2.0]))
    d = grpo_loss_backward(cache)
    assert np.all(d[mask == 0] == 0.0)
    assert np.all(np.any(d[mask == 1] != 0.0, axis=-1))
    # masked positions do not influence the loss either (any tokens / old log-probs there)
    tokens2, old2 = tokens.copy(), old.copy()
    tokens2[mask == 0] = 0
    old2[mask == 0] = 1e3                                # would overflow exp if it were used
    loss2 = grpo_loss(logits, tokens2, mask, old2, ref, np.array([1.0, -1.0, 0.5, 2.0]))[0]
    assert loss2 == loss


# ------------------------------------------------------------------------------------------------
# the loss against loops
# ------------------------------------------------------------------------------------------------

@pytest.mark.grpo
@pytest.mark.parametrize("length_norm", [True, False])
def test_grpo_loss_matches_loop_formula(tol, length_norm):
    # hand-built batch: P = 1 prompt, G = 3 responses, L = 4, V = 5
    logits = np.array([[[0.5, -1.0, 2.0, 0.0, 0.3], [1.0, 1.0, -2.0, 0.5, 0.0],
                        [0.0, 0.2, 0.4, 0.6, 0.8], [3.0, -3.0, 0.0, 1.0, -1.0]],
                       [[-0.5, 0.5, 1.5, -1.5, 0.0], [2.0, 0.0, 0.0, 0.0, -2.0],
                        [0.1, 0.1, 0.1, 0.1, 0.1], [1.0, 2.0, 3.0, 4.0, 5.0]],
                       [[0.0, 0.0, 1.0, 0.0, 0.0], [-1.0, -2.0, -3.0, 0.0, 1.0],
                        [0.7, -0.7, 0.3, -0.3, 0.0], [0.0, 1.0, 0.0, 1.0, 0.0]]])
    tokens = np.array([[2, 0, 4, 1], [1, 0, 3, 4], [2, 4, 0, 3]])
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=np.float64)
    old = np.array([[-0.6, -1.9, -1.1, 0.0], [-2.3, -0.1, -1.7, -0.3], [-1.0, -0.5, -2.5, 0.0]])
    ref = np.array([[-0.4, -1.2, -1.6, 0.0], [-1.9, -0.4, -1.6, -0.5], [-1.3, -0.9, -1.0, 0.0]])
    r = np.array([[1.0, 0.0, 0.1]])
    adv = group_advantages(r).reshape(-1)
    for beta, eps_hi in ((0.04, None), (0.5, 0.28), (0.0, None)):
        kw = dict(clip_eps=0.2, clip_eps_high=eps_hi, beta=beta, length_norm=length_norm)
        loss, stats, _ = grpo_loss(logits, tokens, mask, old, ref, adv, **kw)
        want, clip_frac, kl_mean = _loop_loss(logits, tokens, mask, old, ref, adv, 0.2,
                                              0.2 if eps_hi is None else eps_hi, beta, length_norm)
        assert abs(loss - want) < tol["f64_close"]
        assert stats["clip_fraction"] == clip_frac
        assert abs(stats["kl"] - kl_mean) < tol["f64_close"]
        assert stats["n_tokens"] == 9
    # this batch really exercises the clip (otherwise the comparison would be weaker)
    assert 0.0 < grpo_loss(logits, tokens, mask, old, ref, adv)[1]["clip_fraction"] < 1.0


@pytest.mark.grpo
def test_clip_fraction_zero_on_policy(rng):
    """One update per batch: old log-probs are the current ones, rho == 1, nothing is clipped."""
    logits, tokens, mask = _batch(rng, M=6, L=5, V=9)
    old = token_logprobs(logits, tokens)
    adv = rng.standard_normal(6)
    for eps in (0.2, 10.0):
        _, stats, cache = grpo_loss(logits, tokens, mask, old, old.copy(), adv, clip_eps=eps)
        assert stats["clip_fraction"] == 0.0
        assert stats["ratio"] == 1.0 and stats["ratio_min"] == 1.0 and stats["ratio_max"] == 1.0
        assert stats["kl"] == 0.0                       # ref == current: k3 KL exactly 0
    # eps = 0.2 and eps = 10 give identical gradients when rho == 1
    d1 = grpo_loss_backward(grpo_loss(logits, tokens, mask, old, old, adv, clip_eps=0.2)[2])
    d2 = grpo_loss_backward(grpo_loss(logits, tokens, mask, old, old, adv, clip_eps=10.0)[2])
    assert np.array_equal(d1, d2)


@pytest.mark.grpo
def test_grpo_loss_float32_and_bad_inputs(rng, tol):
    logits, tokens, mask = _batch(rng)
    old = token_logprobs(logits, tokens) + 0.05
    adv = np.array([1.0, -1.0, 0.5, 0.0])
    l64, _, c64 = grpo_loss(logits, tokens, mask, old, old, adv)
    l32, _, c32 = grpo_loss(logits.astype(np.float32), tokens, mask, old.astype(np.float32),
                            old.astype(np.float32), adv)
    d32 = grpo_loss_backward(c32)
    assert d32.dtype == np.float32
    assert abs(l32 - l64) < tol["f32_vs_f64"]
    np.testing.assert_allclose(d32, grpo_loss_backward(c64), atol=tol["f32_vs_f64"])
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logits, tokens, mask, old, old, adv[:3])
    with pytest.raises(ValueError, match="ref_logprobs"):
        grpo_loss(logits, tokens, mask, old, None, adv, beta=0.04)
    with pytest.raises(TypeError, match="dtype mismatch"):
        grpo_loss(logits, tokens, mask, old.astype(np.float32), old, adv)
    with pytest.raises(ValueError, match="mask"):
        grpo_loss(logits, tokens, mask * 2, old, old, adv)
    with pytest.raises(ValueError, match="tokens"):
        grpo_loss(logits, tokens + 7, mask, old, old, adv)


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------

@pytest.mark.grpo
def test_config_variants_and_validation():
    g, dr, dapo = GRPOConfig.grpo(), GRPOConfig.dr_grpo(), GRPOConfig.dapo()
    assert (g.std_normalise, g.length_norm, g.beta, g.drop_zero_variance_groups) == (True, True, 0.04, False)
    assert (dr.std_normalise, dr.length_norm, dr.beta) == (False, False, 0.0)
    assert (dapo.drop_zero_variance_groups, dapo.clip_eps_high, dapo.beta) == (True, 0.28, 0.0)
    assert GRPOConfig.dr_grpo(beta=0.01).beta == 0.01
    r = np.array([[1.0, 0.0, 0.0, 0.0]])
    assert np.array_equal(dr.advantages(r), np.array([[0.75, -0.25, -0.25, -0.25]]))
    assert set(g.loss_kwargs()) <= set(grpo_loss.__code__.co_varnames)
    for field, bad in (("std", "bessel"), ("clip_eps", 0.0), ("beta", -1.0), ("group_size", 1)):
        with pytest.raises(ValueError, match=field):
            GRPOConfig(**{field: bad})


# ------------------------------------------------------------------------------------------------
# tasks and rewards
# ------------------------------------------------------------------------------------------------

@pytest.mark.grpo
def test_vocab_encode_decode():
    assert VOCAB_SIZE == 17
    s = "^12+34=46$__"
    ids = encode(s)
    assert list(ids[:3]) == [BOS, 1, 2] and ids[-3] == EOS and ids[-1] == PAD
    assert decode(ids) == s
    assert decode([99, -1]) == "??"
    with pytest.raises(ValueError, match="text"):
        encode("12a")


@pytest.mark.grpo
def test_addition_rewards_hand_cases():
    task = AdditionTask()                                       # format reward 0.1
    p = encode("^12+34=")
    assert reward(task, p, encode("46$")) == 1.0                # right
    assert reward(task, p, encode("46$7_")) == 1.0              # tokens after EOS ignored
    assert reward(task, p, encode("47$")) == 0.1                # wrong but well formed
    assert reward(task, p, encode("046$")) == 0.1               # not the canonical answer
    assert reward(task, p, encode("46")) == 0.0                 # missing EOS (truncated)
    assert reward(task, p, encode("4+6$")) == 0.0               # malformed
    assert reward(task, p, encode("$46")) == 0.0                # empty answer
    assert reward(task, p, encode("1046$")) == 0.0              # too many digits for 2+2
    assert reward(task, p, encode("^46$")) == 0.0
    assert reward(task, p, np.array([4, 6, 99])) == 0.0         # junk ids: 0, no exception
    assert reward(task, p, np.array([4.0, 6.0, 16.0])) == 0.0   # not integer tokens
    assert reward(task, p, np.zeros((2, 2), dtype=int)) == 0.0
    assert reward(task, encode("^00+00="), encode("0$")) == 1.0
    assert reward(task, encode("^99+99="), encode("198$")) == 1.0
    assert reward(AdditionTask(format_reward=0.0), p, encode("47$")) == 0.0
    with pytest.raises(ValueError, match="prompt"):
        reward(task, encode("^12+3="), encode("15$"))
    got = rewards(task, np.stack([p, p, p]), np.stack([encode("46$_"), encode("45$_"), encode("4646")]))
    assert np.array_equal(got, [1.0, 0.1, 0.0])


@pytest.mark.grpo
def test_sort_rewards_hand_cases():
    task = SortTask(length=4)
    p = encode("^3,1,4,1>")
    assert task.parse_prompt(p) == (3, 1, 4, 1)
    assert reward(task, p, encode("1134$")) == 1.0
    assert reward(task, p, encode("1143$")) == 0.1              # all four must be right together
    assert reward(task, p, encode("113$")) == 0.0               # wrong length
    assert reward(task, p, encode("1134")) == 0.0               # missing EOS
    assert reward(task, p, encode("1,134$")) == 0.0


@pytest.mark.grpo
def test_task_generation_deterministic_and_heldout_disjoint():
    add = AdditionTask()                                        # held out: 60..79 x 20..39
    sort = SortTask()
    for task in (add, sort):
        a = make_prompts(task, 300, "train", np.random.default_rng(7))
        b = make_prompts(task, 300, "train", np.random.default_rng(7))
        assert a.shape == (300, task.prompt_len) and np.array_equal(a, b)
        h = make_prompts(task, 300, "heldout", np.random.default_rng(7))
        train_set = {tuple(r) for r in a}
        held_set = {tuple(r) for r in h}
        assert not train_set & held_set
        assert all(task.is_heldout(task.parse_prompt(r)) for r in h)
        assert not any(task.is_heldout(task.parse_prompt(r)) for r in a)
    # the addition box, checked from the operands themselves (independent of is_heldout)
    for a_, b_ in (add.parse_prompt(r) for r in make_prompts(add, 500, "heldout", np.random.default_rng(1))):
        assert 60 <= a_ <= 79 and 20 <= b_ <= 39
    for a_, b_ in (add.parse_prompt(r) for r in make_prompts(add, 2000, "train", np.random.default_rng(2))):
        assert not (60 <= a_ <= 79 and 20 <= b_ <= 39)
    # full enumeration partitions the problem space
    tr, he = add.all_problems("train"), add.all_problems("heldout")
    assert len(he) == 20 * 20 and len(tr) + len(he) == 100 * 100 and not set(tr) & set(he)
    st, sh = sort.all_problems("train"), sort.all_problems("heldout")
    assert len(st) + len(sh) == 10 ** 4 and all(sum(p) % 5 == 0 for p in sh)
    # a subset restricts the draw (partial warm start) and an empty subset is an error
    sub = sample_problems(add, 200, "train", np.random.default_rng(3), subset=lambda p: p[1] % 10 <= 4)
    assert all(b_ % 10 <= 4 for _, b_ in sub)
    with pytest.raises(ValueError, match="subset"):
        sample_problems(add, 5, "train", np.random.default_rng(3), subset=lambda p: False)
    with pytest.raises(ValueError, match="split"):
        make_prompts(add, 5, "test", np.random.default_rng(3))


@pytest.mark.grpo
@pytest.mark.parametrize("task", [AdditionTask(), AdditionTask(n_digits=1), SortTask(length=3)])
def test_sft_examples_targets_masked(task):
    x, y = sft_examples(task, 64, "train", np.random.default_rng(5))
    T = task.prompt_len + task.max_response_len
    assert x.shape == y.shape == (64, T)
    Tp = task.prompt_len
    for row_x, row_y in zip(x, y):
        text = decode(row_x)
        prob = task.parse_prompt(row_x[:Tp])
        if isinstance(task, AdditionTask):
            answer = str(prob[0] + prob[1])
        else:
            answer = "".join(str(d) for d in sorted(prob))
        assert text == decode(task.prompt_tokens(prob)) + answer + "$" + "_" * (T - Tp - len(answer) - 1)
        # the logits at position t predict token t+1: targets exist exactly for answer + EOS
        for t in range(T):
            nxt = t + 1
            if Tp <= nxt <= Tp + len(answer):
                assert row_y[t] == row_x[nxt]
            else:
                assert row_y[t] == -100
        assert (row_y != -100).sum() == len(answer) + 1
        # the canonical answer earns the full reward
        assert reward(task, row_x[:Tp], row_x[Tp:]) == 1.0


@pytest.mark.grpo
def test_response_mask():
    resp = np.array([[4, 6, EOS, PAD, PAD], [EOS, 3, EOS, 1, 1], [1, 2, 3, 4, 5]])
    want = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=bool)
    assert np.array_equal(response_mask(resp), want)

"""Fused kernels (tinymoe/kernels/{attention,swiglu,norm,optim,_math}.py) against the plain layers.

Each fused path is compared with the plain NumPy function it replaces (float32, the TOL table's
twin tolerances), each numba loop with its NumPy twin, and the helpers with NumPy / math. Edge
cases: a single row or token, a query block after a cache (q_offset), non-causal attention,
grouped kv heads, huge sigmoid inputs, an expert with no rows, an RMSNorm row that overflows.
Either backward must consume either forward's cache.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from tinymoe import kernels
from tinymoe.kernels import attention as fa
from tinymoe.kernels import norm as fn
from tinymoe.kernels import swiglu as fs
from tinymoe.layers.attention import sdpa_backward, sdpa_forward
from tinymoe.layers.basic import swiglu_backward, swiglu_forward
from tinymoe.layers.norm import rmsnorm_backward, rmsnorm_forward

pytestmark = [pytest.mark.kernels,
              pytest.mark.skipif(not kernels.FUSED_KERNELS,
                                 reason="a student copy: its fused twins are cut and switched off")]
F32 = np.float32


@pytest.fixture(autouse=True)
def fuse_every_size(monkeypatch):
    """The fused paths take over from FUSED_MIN_WORK elements; the small cases here must reach them."""
    monkeypatch.setattr(kernels, "FUSED_MIN_WORK", 0)


def close(a, b, tol, scale=None):
    """float32 agreement: |a - b| <= atol + rtol * max|b| (the error of a sum of many terms)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    if b.size == 0:
        return
    bound = tol["f32_atol"] + tol["f32_rtol"] * (scale if scale is not None else np.abs(b).max())
    assert np.abs(a - b).max() <= bound, (np.abs(a - b).max(), bound)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def test_exp_nonpositive_matches_exp(tol):
    f = kernels._jit_helper("exp_nonpositive")
    xs = np.concatenate([-np.logspace(-8, np.log10(87.9), 400), [0.0, -1e-30, -0.6875 * 128]])
    got = np.array([f(x) for x in xs])
    np.testing.assert_allclose(got, np.exp(xs), rtol=1e-9, atol=0)     # 128 x the Taylor error
    # below exp(-88) (far under float32's normal range) it stays at exp(-88), also for -inf
    for x in (-88.0, -100.0, -1e30, -np.inf):
        assert f(x) == pytest.approx(math.exp(-88.0), rel=1e-9)


@pytest.mark.parametrize("n", [1, 15, 16, 17, 50])
def test_row_sum_and_max(rng, n, tol):
    x = rng.standard_normal(n + 3)
    assert kernels._jit_helper("row_sum")(x, n) == pytest.approx(math.fsum(x[:n]),
                                                                 rel=tol["f64_roundoff"], abs=1e-15)
    assert kernels._jit_helper("row_max")(x, n) == x[:n].max()


# ------------------------------------------------------------------------------------------------
# attention: causal softmax and its backward
# ------------------------------------------------------------------------------------------------

def _softmax_rows_loop(z, q_offset, causal):
    """Independent derivation: explicit loops over rows and visible keys, in float64."""
    B, H, T, S = z.shape
    out = np.zeros(z.shape)
    for b, h, t in np.ndindex(B, H, T):
        n = min(S, q_offset + t + 1) if causal else S
        e = [math.exp(float(z[b, h, t, s]) - max(z[b, h, t, :n])) for s in range(n)]
        out[b, h, t, :n] = np.array(e) / math.fsum(e)
    return out


@pytest.mark.parametrize("T,S,q_offset,causal", [(5, 5, 0, True), (3, 7, 4, True),
                                                 (1, 6, 5, True), (4, 6, 0, False),
                                                 (2, 40, 38, True)])
def test_causal_softmax_twins_equal_loops(rng, T, S, q_offset, causal, tol):
    z = (3 * rng.standard_normal((2, 3, T, S))).astype(F32)
    want = _softmax_rows_loop(z, q_offset, causal)
    for which in ("numba", "numpy"):
        p = kernels.get("causal_softmax", which)(z.copy(), q_offset, causal)
        close(p, want, tol, scale=1.0)
        if causal:                                    # masked keys: exactly zero
            mask = np.arange(S)[None, :] > (q_offset + np.arange(T))[:, None]
            assert np.all(p[..., mask] == 0)


def test_softmax_scores_backward_twins(rng, tol):
    p = kernels.get("causal_softmax", "numpy")(rng.standard_normal((2, 2, 4, 6)).astype(F32), 2,
                                                True)
    dp = rng.standard_normal(p.shape).astype(F32)
    want = 0.3 * p * (dp - (dp * p).sum(-1, keepdims=True))            # the softmax Jacobian
    for which in ("numba", "numpy"):
        close(kernels.get("softmax_scores_backward", which)(dp.copy(), p, F32(0.3)), want, tol)


@pytest.mark.parametrize("H,Hkv,T,S,q_offset,causal", [(4, 4, 6, 6, None, True),
                                                       (4, 2, 5, 5, None, True),
                                                       (4, 1, 3, 8, None, True),
                                                       (2, 2, 1, 1, None, True),
                                                       (2, 2, 4, 4, 0, False)])
def test_sdpa_fused_equals_plain_and_caches_interchange(rng, H, Hkv, T, S, q_offset, causal, tol):
    q = rng.standard_normal((2, T, H, 5)).astype(F32)
    k = rng.standard_normal((2, S, Hkv, 5)).astype(F32)
    v = rng.standard_normal((2, S, Hkv, 3)).astype(F32)
    do = rng.standard_normal((2, T, H, 3)).astype(F32)
    o1, c1 = sdpa_forward(q, k, v, 0.4, causal=causal, q_offset=q_offset)
    o2, c2 = fa.sdpa_forward_fused(q, k, v, 0.4, causal=causal, q_offset=q_offset)
    close(o2, o1, tol)
    close(c2.p, c1.p, tol, scale=1.0)
    assert c2.n_kv_heads == Hkv and c2.k.shape == c1.k.shape and c2.scale == c1.scale
    want = sdpa_backward(do, c1)
    for got in (fa.sdpa_backward_fused(do, c2), fa.sdpa_backward_fused(do, c1),
                sdpa_backward(do, c2)):
        for g, w in zip(got, want):
            close(g, w, tol)


def test_sdpa_fused_keeps_plain_errors_and_float64():
    q = np.zeros((1, 2, 2, 4), F32)
    with pytest.raises(ValueError, match="q_offset"):
        fa.sdpa_forward_fused(q, q, q, 1.0, q_offset=-1)
    with pytest.raises(ValueError, match="do not divide"):
        fa.sdpa_forward_fused(np.zeros((1, 2, 3, 4), F32), q, q, 1.0)
    q64 = np.random.default_rng(0).standard_normal((1, 3, 2, 4))
    o, c = fa.sdpa_forward_fused(q64, q64, q64, 0.5)                    # float64: the plain path
    np.testing.assert_array_equal(o, sdpa_forward(q64, q64, q64, 0.5)[0])


# ------------------------------------------------------------------------------------------------
# SwiGLU
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("N", [0, 1, 9])
def test_swiglu_fused_equals_plain(rng, N, tol):
    D, F = 6, 5
    x = rng.standard_normal((N, D)).astype(F32)
    w1, w3 = (rng.standard_normal((F, D)).astype(F32) for _ in range(2))
    w2 = rng.standard_normal((D, F)).astype(F32)
    if N:
        x[0] *= 60                                    # |h1| ~ 100: sigmoid saturates, no overflow
    dy = rng.standard_normal((N, D)).astype(F32)
    y1, c1 = swiglu_forward(x, w1, w2, w3)
    y2, c2 = fs.swiglu_forward_fused(x, w1, w2, w3)
    assert np.all(np.isfinite(y2))
    for a, b in zip((y2, c2.sg, c2.g), (y1, c1.sg, c1.g)):
        close(a, b, tol, scale=max(1.0, float(np.abs(b).max(initial=0))))
    want = swiglu_backward(dy, c1)
    for got in (fs.swiglu_backward_fused(dy, c2), fs.swiglu_backward_fused(dy, c1),
                swiglu_backward(dy, c2)):
        for g, w in zip(got, want):
            assert g.shape == w.shape
            close(g, w, tol, scale=max(1.0, float(np.abs(w).max(initial=0))))


def test_swiglu_gate_twins(rng, tol):
    h1 = (10 * rng.standard_normal((4, 7))).astype(F32)
    h3 = rng.standard_normal((4, 7)).astype(F32)
    sg = 1 / (1 + np.exp(-h1.astype(np.float64)))                      # closed form, float64
    for which in ("numba", "numpy"):
        s, g = kernels.get("swiglu_gate", which)(h1, h3)
        close(s, sg, tol, scale=1.0)
        close(g, h1 * sg * h3, tol)
        dg = rng.standard_normal((4, 7)).astype(F32)
        dh = kernels.get("swiglu_gate_backward", which)(dg, h1, h3, s)
        close(dh[:, 7:], dg * h1 * sg, tol)
        close(dh[:, :7], dg * h3 * (sg + h1 * sg * (1 - sg)), tol)      # d/da [a s(a)] h3


def test_swiglu_fused_plain_errors():
    x = np.zeros((2, 3), F32)
    with pytest.raises(ValueError, match="does not match w1"):
        fs.swiglu_forward_fused(x, np.zeros((4, 5), F32), np.zeros((5, 4), F32),
                                np.zeros((4, 5), F32))


# ------------------------------------------------------------------------------------------------
# RMSNorm
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 4), (3, 5, 8), (130, 16)])
def test_rmsnorm_fused_equals_plain(rng, shape, tol):
    x = (rng.standard_normal(shape) * 3).astype(F32)
    w = rng.standard_normal(shape[-1]).astype(F32)
    dy = rng.standard_normal(shape).astype(F32)
    y1, c1 = rmsnorm_forward(x, w, 1e-5)
    y2, c2 = fn.rmsnorm_forward_fused(x, w, 1e-5)
    close(y2, y1, tol)
    close(c2.r, c1.r, tol)
    assert c2.r.shape == c1.r.shape and c2.r.dtype == c1.r.dtype
    want = rmsnorm_backward(dy, c1)
    for got in (fn.rmsnorm_backward_fused(dy, c2), fn.rmsnorm_backward_fused(dy, c1),
                rmsnorm_backward(dy, c2)):
        for g, wnt in zip(got, want):
            assert g.shape == wnt.shape and g.dtype == wnt.dtype
            close(g, wnt, tol)


def test_rmsnorm_fused_keeps_eps_and_overflow_checks():
    w = np.ones(3, F32)
    with pytest.raises(ValueError, match="eps"):
        fn.rmsnorm_forward_fused(np.ones((2, 3), F32), w, -1.0)
    with pytest.raises(FloatingPointError, match="cannot be normalised"):
        fn.rmsnorm_forward_fused(np.full((2, 3), 3e19, F32), w)
    with pytest.raises(FloatingPointError, match="NaN or inf"):
        fn.rmsnorm_forward_fused(np.array([[1.0, np.nan, 0.0]], F32), w)


def test_rmsnorm_dw_blocks_do_not_depend_on_threads(rng):
    import numba
    x = rng.standard_normal((300, 8)).astype(F32)
    dy = rng.standard_normal((300, 8)).astype(F32)
    r = (1 / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-6)).astype(F32)
    w = np.ones(8, F32)
    k = kernels.get("rmsnorm_backward", "numba")
    old = numba.get_num_threads()
    try:
        outs = []
        for n in sorted({1, numba.config.NUMBA_NUM_THREADS}):
            numba.set_num_threads(n)
            outs.append(k(dy, x, r, w))
    finally:
        numba.set_num_threads(old)
    for a, b in zip(outs[0], outs[-1]):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# RoPE
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (1, 5, 8), (2, 1, 2, 3, 4)])
def test_rope_fused_is_bitwise_the_plain_rotation(rng, shape):
    from tinymoe.kernels.rope import rope_backward_fused, rope_forward_fused
    from tinymoe.layers.rope import rope_backward, rope_forward
    x = rng.standard_normal(shape).astype(F32)
    phi = rng.uniform(0, 6, size=(shape[1], shape[-1] // 2))
    cos, sin = np.cos(phi).astype(F32), np.sin(phi).astype(F32)
    y = rope_forward_fused(x, cos, sin)
    np.testing.assert_array_equal(y, rope_forward(x, cos, sin))      # same float32 operations
    np.testing.assert_array_equal(rope_backward_fused(y, cos, sin), rope_backward(y, cos, sin))
    # a rotation: the norm of every pair is kept, and the backward undoes the forward
    pairs = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])           # noqa: E731
    np.testing.assert_allclose(pairs(y), pairs(x), rtol=1e-6)
    np.testing.assert_allclose(rope_backward_fused(y, cos, sin), x, rtol=1e-5, atol=1e-6)
    assert np.array_equal(kernels.get("rope", "numba")(x.reshape(shape[0], shape[1], -1, shape[-1]),
                                                       cos, sin).reshape(shape), y)


# ------------------------------------------------------------------------------------------------
# cross-entropy
# ------------------------------------------------------------------------------------------------

def test_cross_entropy_fused_equals_plain(rng, tol):
    from tinymoe.kernels.loss import cross_entropy_backward_fused, cross_entropy_forward_fused
    from tinymoe.layers.basic import cross_entropy_backward, cross_entropy_forward
    z = (rng.standard_normal((6, 9)) * 3).astype(F32)
    z[1, 4] = 1e4                                     # a huge logit: no overflow
    z[2] = -1e4
    t = np.array([4, 4, 0, -100, 8, 3])
    l1, c1 = cross_entropy_forward(z, t)
    l2, c2 = cross_entropy_forward_fused(z, t)
    assert l2 == pytest.approx(l1, rel=tol["f32_rtol"])
    close(c2.p, c1.p, tol, scale=1.0)
    assert c2.n_valid == c1.n_valid == 5 and np.array_equal(c2.valid, c1.valid)
    want = cross_entropy_backward(0.7, c1)
    for got in (cross_entropy_backward_fused(0.7, c2), cross_entropy_backward_fused(0.7, c1)):
        close(got, want, tol, scale=1.0)
        assert np.all(got[3] == 0)                    # the ignored row gets no gradient
    # every row ignored: loss 0, zero gradient
    l0, c0 = cross_entropy_forward_fused(z, np.full(6, -100))
    assert l0 == 0.0 and not cross_entropy_backward_fused(1.0, c0).any()
    with pytest.raises(ValueError, match="token id 9 is outside"):
        cross_entropy_forward_fused(z, np.array([0, 1, 2, 3, 4, 9]))


def test_cross_entropy_twins(rng, tol):
    z = rng.standard_normal((5, 7)).astype(F32)
    t, valid = np.array([1, 0, 6, 2, 0]), np.array([True, True, True, False, True])
    lse = np.log(np.exp(z.astype(np.float64)).sum(1))
    for which in ("numba", "numpy"):
        p, nll = kernels.get("cross_entropy", which)(z, t, valid)
        close(p, np.exp(z - lse[:, None]), tol, scale=1.0)
        close(nll, np.where(valid, lse - z[np.arange(5), t], 0), tol)
        dz = kernels.get("cross_entropy_backward", which)(p, t, valid, F32(0.5))
        onehot = np.eye(7)[t]
        close(dz, np.where(valid[:, None], 0.5 * (p - onehot), 0), tol, scale=1.0)


# ------------------------------------------------------------------------------------------------
# AdamW, backends, the whole model
# ------------------------------------------------------------------------------------------------

def test_fused_adamw_is_bitwise_the_plain_update(rng, monkeypatch):
    from tinymoe.optim import AdamW
    params = {"a.w": rng.standard_normal((3, 4)).astype(F32), "norm": np.ones(5, F32)}
    runs = {}
    for be in ("numpy", "numba"):
        monkeypatch.setenv("TINYMOE_BACKEND", be)
        ps = {k: v.copy() for k, v in params.items()}
        opt = AdamW(ps, lr=1e-2, weight_decay=0.1)
        g = np.random.default_rng(5)
        for step in range(3):
            opt.step({k: g.standard_normal(v.shape).astype(F32) for k, v in ps.items()},
                     lr=None if step else 3e-3)
        runs[be] = (ps, opt.m, opt.v, opt.t)
    for k in params:
        for i in range(3):
            np.testing.assert_array_equal(runs["numba"][i][k], runs["numpy"][i][k])
    assert runs["numba"][3] == runs["numpy"][3] == 3
    assert not np.array_equal(runs["numba"][0]["a.w"], params["a.w"])


# ------------------------------------------------------------------------------------------------
# MoE experts as one padded stack (tinymoe/kernels/experts.py)
# ------------------------------------------------------------------------------------------------

def _experts_by_loop(xs, offsets, w1, w2, w3, dys):
    """The per-expert loop of moe_forward/moe_backward, written out with the plain SwiGLU."""
    ys, dxs = np.zeros_like(xs), np.zeros_like(xs)
    g1, g2, g3 = np.zeros_like(w1), np.zeros_like(w2), np.zeros_like(w3)
    for e in range(w1.shape[0]):
        a, b = offsets[e], offsets[e + 1]
        if a < b:
            ys[a:b], c = swiglu_forward(xs[a:b], w1[e], w2[e], w3[e])
            dxs[a:b], g1[e], g2[e], g3[e] = swiglu_backward(dys[a:b], c)
    return ys, dxs, g1, g2, g3


@pytest.mark.parametrize("dtype", [np.float64, F32])
def test_padded_experts_equal_the_per_expert_loop(rng, dtype, tol):
    from tinymoe.kernels.experts import experts_backward_batched, experts_forward_batched
    E, F, D = 6, 3, 8
    loads = np.array([5, 0, 1, 7, 2, 0])          # unequal, two experts without rows, last empty
    offsets = np.concatenate([[0], np.cumsum(loads)])
    M = int(offsets[-1])
    xs, dys = (rng.standard_normal((M, D)).astype(dtype) for _ in range(2))
    w1, w3 = (rng.standard_normal((E, F, D)).astype(dtype) for _ in range(2))
    w2 = rng.standard_normal((E, D, F)).astype(dtype)
    ys, cache = experts_forward_batched(xs, offsets, w1, w2, w3)
    got = (ys,) + experts_backward_batched(dys, cache)
    want = _experts_by_loop(xs, offsets, w1, w2, w3, dys)
    for name, a, b in zip(("ys", "dxs", "dw1", "dw2", "dw3"), got, want):
        assert a.dtype == dtype and a.shape == b.shape, name
        if dtype == np.float64:
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12, err_msg=name)
        else:
            close(a, b, tol)
    for e in (1, 5):                              # no rows: exactly zero gradients
        assert not np.any(got[2][e]) and not np.any(got[3][e]) and not np.any(got[4][e])


def test_padded_experts_backward_passes_a_float64_gradient_check(rng):
    from tinymoe.gradcheck import gradcheck
    from tinymoe.kernels.experts import experts_backward_batched, experts_forward_batched
    E, F, D = 4, 3, 5
    offsets = np.array([0, 3, 3, 7, 8])            # loads 3, 0, 4, 1
    inputs = {"xs": rng.standard_normal((8, D)), "w1": rng.standard_normal((E, F, D)),
              "w2": rng.standard_normal((E, D, F)), "w3": rng.standard_normal((E, F, D))}
    report = gradcheck(
        lambda xs, w1, w2, w3: experts_forward_batched(xs, offsets, w1, w2, w3),
        lambda dy, cache: dict(zip(("xs", "w1", "w2", "w3"), experts_backward_batched(dy, cache))),
        inputs)
    report.assert_ok(1e-6)


def test_moe_layer_takes_the_padded_stack_only_for_small_float32_experts(rng, monkeypatch, tol):
    from tinymoe.config import ModelConfig
    from tinymoe.kernels.experts import ExpertsCache, use_batched
    from tinymoe.layers.moe import init_moe_params, moe_backward, moe_forward
    cfg = ModelConfig.preset("toy", n_routed_experts=16, n_activated_experts=4, n_expert_groups=1,
                             n_limited_groups=1)
    x = rng.standard_normal((24, cfg.dim)).astype(F32)
    p = init_moe_params(cfg, rng, F32)
    bias = np.zeros(cfg.n_routed_experts, F32)
    dy = rng.standard_normal(x.shape).astype(F32)
    y, _, c = moe_forward(x, p, bias, cfg, 8)
    assert isinstance(c.experts, ExpertsCache)
    dx, g = moe_backward(dy, c)
    monkeypatch.setattr(kernels, "FUSED_KERNELS", False)    # the per-expert loop
    y2, _, c2 = moe_forward(x, p, bias, cfg, 8)
    assert isinstance(c2.experts, tuple)
    dx2, g2 = moe_backward(dy, c2)
    close(y, y2, tol)
    close(dx, dx2, tol)
    for k in g2:
        close(g[k], g2[k], tol)
    monkeypatch.setattr(kernels, "FUSED_KERNELS", True)
    # float64 (gradient checks) and the bench preset's experts (128 rows x 64 x 128) keep the loop
    off = np.array([0, 3, 5])
    assert not use_batched(x[:5].astype(np.float64), off, np.zeros((2, 4, cfg.dim)))
    big_rows, big_w = np.zeros((2048, 128), F32), np.zeros((16, 64, 128), F32)
    assert not use_batched(big_rows, np.arange(0, 2049, 128), big_w)
    assert use_batched(big_rows[:512, :32], np.arange(0, 513, 8), np.zeros((64, 1, 32), F32))


def test_numpy_backend_runs_the_plain_functions(rng, monkeypatch):
    monkeypatch.setenv("TINYMOE_BACKEND", "numpy")
    x = rng.standard_normal((4, 6)).astype(F32)
    w = rng.standard_normal(6).astype(F32)
    np.testing.assert_array_equal(fn.rmsnorm_forward_fused(x, w)[0], rmsnorm_forward(x, w)[0])
    q = rng.standard_normal((1, 3, 2, 4)).astype(F32)
    np.testing.assert_array_equal(fa.sdpa_forward_fused(q, q, q, 0.5)[0],
                                  sdpa_forward(q, q, q, 0.5)[0])


def _tiny_step(backend_name):
    from tinymoe.config import ModelConfig
    from tinymoe.model import Model
    os.environ["TINYMOE_BACKEND"] = backend_name
    cfg = ModelConfig.preset("toy")
    model = Model(cfg, seed=0, dtype=np.float32)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 8))
    return model.loss_and_grads(tokens, np.roll(tokens, -1, axis=1))


def test_model_fused_equals_plain(monkeypatch, tol):
    monkeypatch.setenv("TINYMOE_BACKEND", "numba")
    (l1, g1), (l2, g2) = _tiny_step("numba"), _tiny_step("numpy")
    assert l1 == pytest.approx(l2, rel=tol["f32_rtol"])
    for k in g2:
        close(g1[k], g2[k], tol, scale=max(1e-3, float(np.abs(g2[k]).max())))


def test_training_step_is_bitwise_the_same_at_1_and_2_threads(monkeypatch):
    """The auto thread policy may change the count between steps: results must not depend on it."""
    import numba

    from tinymoe import threads
    monkeypatch.setenv("TINYMOE_BACKEND", "numba")
    monkeypatch.setenv("TINYMOE_THREADS", "1")       # adapt() leaves the count to this test
    monkeypatch.setattr(kernels, "PARALLEL_MIN_WORK", 0)   # the parallel kernels at 2 threads
    old = numba.get_num_threads()
    outs = []
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            threads.set_blas_threads(n)
            numba.set_num_threads(n)
            outs.append(_tiny_step("numba"))
    finally:
        numba.set_num_threads(old)
        threads.reset()                               # the next step decides afresh
    assert outs[0][0] == outs[1][0]
    for k in outs[0][1]:
        np.testing.assert_array_equal(outs[0][1][k], outs[1][1][k])


def test_numba_disable_jit_runs_the_fused_loop_source():
    code = ("import numpy as np, tinymoe.kernels as k, tests.test_fused as t; "
            "k.FUSED_MIN_WORK = 0; a = t._tiny_step('numba'); b = t._tiny_step('numpy'); "
            "print(type(k.get('causal_softmax', 'numba')).__name__, abs(a[0] - b[0]) / abs(b[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(__file__)),
                         env={**os.environ, "NUMBA_DISABLE_JIT": "1", "TINYMOE_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    kind, rel = out.stdout.split()[-2:]
    assert kind == "function" and float(rel) < 1e-5  # the loop source itself, interpreted

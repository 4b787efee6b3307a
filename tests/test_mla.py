"""Multi-head latent attention: forward against an explicit-loop reference, gradient checks,
cached decoding (absorbed latent cache and naive per-head cache) against the full forward,
the coupled-RoPE counterexample, and bad input."""
from __future__ import annotations

import cmath
import math

import numpy as np
import pytest

from tinymoe.config import ModelConfig
from tinymoe.gradcheck import gradcheck
from tinymoe.layers.mla import (LatentKVCache, NaiveKVCache, init_mla_params, mla_backward,
                                mla_decode, mla_decode_coupled_rope, mla_forward,
                                mla_forward_coupled_rope)


def make_cfg(q_lora_rank=16, yarn=False, **kw):
    """The toy attention shape (D 32, H 4, Dn 8, Dr 4, Dv 8, Dc 8, max_seq_len 64); YaRN on by
    lowering original_seq_len below max_seq_len. init_std 0.3 gives non-trivial attention."""
    return ModelConfig.preset("toy", q_lora_rank=q_lora_rank, init_std=0.3,
                              original_seq_len=16 if yarn else 4096, **kw)


def make_inputs(cfg, rng, B=2, T=7, dtype=np.float64):
    p = init_mla_params(cfg, rng, np.float64)
    p = {k: (v + 0.1 * rng.standard_normal(v.shape) if k.endswith("norm") else v).astype(dtype)
         for k, v in p.items()}                       # norm weights away from 1 so they matter
    x = rng.standard_normal((B, T, cfg.dim)).astype(dtype)
    return x, p


# ------------------------------------------------------------------------------------------------
# independent reference: per token, per head, per key, written from reference/deepseek.md 4-5
# ------------------------------------------------------------------------------------------------

def ref_inv_freq(cfg, dim):
    theta = cfg.rope_theta
    inv = [theta ** (-2.0 * j / dim) for j in range(dim // 2)]
    if cfg.max_seq_len > cfg.original_seq_len:          # YaRN, deepseek.md 4.1
        cd = lambda n: dim * math.log(cfg.original_seq_len / (2 * math.pi * n)) / (2 * math.log(theta))
        low = max(math.floor(cd(cfg.beta_fast)), 0)
        high = min(math.ceil(cd(cfg.beta_slow)), dim - 1)
        if low == high:
            high += 0.001
        ramp = [min(max((j - low) / (high - low), 0.0), 1.0) for j in range(dim // 2)]
        inv = [f / cfg.rope_factor * r + f * (1 - r) for f, r in zip(inv, ramp)]
    return inv


def ref_scale(cfg):
    s = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.max_seq_len > cfg.original_seq_len:          # deepseek.md 4.4
        s *= (0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1) ** 2
    return s


def ref_rope(vec, pos, inv):
    out = np.empty(len(vec))
    for j, f in enumerate(inv):
        z = complex(vec[2 * j], vec[2 * j + 1]) * cmath.exp(1j * pos * f)
        out[2 * j], out[2 * j + 1] = z.real, z.imag
    return out


def ref_rms(v, w, eps):
    return w * v / math.sqrt(float(np.mean(v * v)) + eps)


def ref_token(xt, p, cfg, pos, coupled=False):
    """One token: per-head q_nope, q_pe; latent c; rope key k_pe; per-head k_nope, v."""
    H, Dn, Dr, Dv, Dc = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                         cfg.v_head_dim, cfg.kv_lora_rank)
    inv, inv_n = ref_inv_freq(cfg, Dr), ref_inv_freq(cfg, Dn)
    if cfg.q_lora_rank:
        q = p["wq_b"] @ ref_rms(p["wq_a"] @ xt, p["q_norm"], cfg.latent_norm_eps)
    else:
        q = p["wq"] @ xt
    kv_a = p["wkv_a"] @ xt
    c = ref_rms(kv_a[:Dc], p["kv_norm"], cfg.latent_norm_eps)
    k_pe = ref_rope(kv_a[Dc:], pos, inv)
    heads = []
    for h in range(H):
        qh = q[h * (Dn + Dr):(h + 1) * (Dn + Dr)]
        wb = p["wkv_b"][h * (Dn + Dv):(h + 1) * (Dn + Dv)]
        k_nope, v = wb[:Dn] @ c, wb[Dn:] @ c
        q_nope = qh[:Dn]
        if coupled:
            q_nope, k_nope = ref_rope(q_nope, pos, inv_n), ref_rope(k_nope, pos, inv_n)
        heads.append((q_nope, ref_rope(qh[Dn:], pos, inv), k_nope, v))
    return heads, c, k_pe


def ref_mla(x, p, cfg, start_pos=0, coupled=False):
    """Explicit loops over batch, query token, head and key token, in float64."""
    x = x.astype(np.float64)
    p = {k: v.astype(np.float64) for k, v in p.items()}
    B, T, D = x.shape
    H, Dv = cfg.n_heads, cfg.v_head_dim
    scale = ref_scale(cfg)
    y = np.zeros((B, T, D))
    for b in range(B):
        toks = [ref_token(x[b, t], p, cfg, start_pos + t, coupled)[0] for t in range(T)]
        for t in range(T):
            o = np.zeros(H * Dv)
            for h in range(H):
                q_nope, q_pe = toks[t][h][0], toks[t][h][1]
                s = [scale * (q_nope @ toks[u][h][2] + q_pe @ ref_token(x[b, u], p, cfg, start_pos + u)[2])
                     for u in range(t + 1)]
                m = max(s)
                e = [math.exp(si - m) for si in s]
                o[h * Dv:(h + 1) * Dv] = sum(ei / sum(e) * toks[u][h][3] for u, ei in enumerate(e))
            y[b, t] = p["wo"] @ o
    return y


# ------------------------------------------------------------------------------------------------
# forward and backward
# ------------------------------------------------------------------------------------------------

@pytest.mark.mla
@pytest.mark.parametrize("q_lora_rank", [16, 0])
@pytest.mark.parametrize("yarn, start_pos, eps", [(False, 0, 1e-6), (True, 5, 0.5)])
def test_forward_matches_loop_reference_f64(q_lora_rank, yarn, start_pos, eps, rng, tol):
    # eps 0.5: the inner norms must use cfg.latent_norm_eps (not the block norms' norm_eps)
    cfg = make_cfg(q_lora_rank, yarn, latent_norm_eps=eps)
    x, p = make_inputs(cfg, rng, B=2, T=5)
    y, _ = mla_forward(x, p, cfg, start_pos=start_pos)
    ref = ref_mla(x, p, cfg, start_pos)
    assert y.dtype == np.float64 and y.shape == x.shape
    assert np.max(np.abs(ref)) > 0.1                    # a real signal, not all ~0
    np.testing.assert_allclose(y, ref, rtol=0, atol=tol["f64_close"])


@pytest.mark.mla
@pytest.mark.parametrize("q_lora_rank", [16, 0])
def test_forward_float32_against_float64_reference(q_lora_rank, rng, tol):
    cfg = make_cfg(q_lora_rank, yarn=True)
    x, p = make_inputs(cfg, rng, B=2, T=5, dtype=np.float32)
    y, cache = mla_forward(x, p, cfg, start_pos=2)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, ref_mla(x, p, cfg, 2), rtol=0, atol=tol["f32_vs_f64"])
    dx, grads = mla_backward(np.ones_like(y), cache)
    assert dx.dtype == np.float32 and all(g.dtype == np.float32 for g in grads.values())


@pytest.mark.mla
@pytest.mark.parametrize("q_lora_rank, yarn", [(16, False), (0, True)])
def test_gradcheck_float64(q_lora_rank, yarn, rng, tol):
    cfg = make_cfg(q_lora_rank, yarn)
    x, p = make_inputs(cfg, rng, B=2, T=4)
    inputs = {"x": x, **p}

    def forward(x, **params):
        return mla_forward(x, params, cfg, start_pos=3)

    def backward(dy, cache):
        dx, grads = mla_backward(dy, cache)
        assert set(grads) == set(p)                     # exactly p's keys
        for k in p:
            assert grads[k].shape == p[k].shape
        return {"x": dx, **grads}

    gradcheck(forward, backward, inputs, max_entries=40).assert_ok(tol["grad_rel"])


@pytest.mark.mla
def test_init_params_shapes_and_values(rng):
    cfg = make_cfg(16)
    H, Dn, Dr, Dv = 4, 8, 4, 8
    p = init_mla_params(cfg, rng, np.float32)
    assert {k: v.shape for k, v in p.items()} == {
        "wq_a": (16, 32), "q_norm": (16,), "wq_b": (H * (Dn + Dr), 16), "wkv_a": (8 + Dr, 32),
        "kv_norm": (8,), "wkv_b": (H * (Dn + Dv), 8), "wo": (32, H * Dv)}
    assert all(v.dtype == np.float32 for v in p.values())
    assert np.all(p["q_norm"] == 1) and np.all(p["kv_norm"] == 1)
    assert abs(float(np.std(p["wo"])) - 0.3) < 0.05
    p0 = init_mla_params(make_cfg(0), rng)
    assert set(p0) == {"wq", "wkv_a", "kv_norm", "wkv_b", "wo"}
    assert p0["wq"].shape == (H * (Dn + Dr), 32)


# ------------------------------------------------------------------------------------------------
# cached decoding
# ------------------------------------------------------------------------------------------------

def decode_all(decode, x, p, cfg, cache, chunks):
    """Feed x [B, T, D] through `decode` in chunks of the given sizes; concatenate the outputs."""
    out, t = [], 0
    for n in chunks:
        out.append(decode(x[:, t:t + n], p, cfg, cache))
        t += n
    assert t == x.shape[1] and cache.length == t
    return np.concatenate(out, axis=1)


@pytest.mark.mla
@pytest.mark.parametrize("q_lora_rank, yarn", [(16, False), (0, True)])
def test_prefill_then_decode_equals_full_forward_f64(q_lora_rank, yarn, rng, tol):
    cfg = make_cfg(q_lora_rank, yarn)
    x, p = make_inputs(cfg, rng, B=2, T=9)
    full, _ = mla_forward(x, p, cfg)
    chunks = [4, 1, 1, 2, 1]                            # prefill, decode, a 2-token chunk, decode
    absorbed = decode_all(mla_decode, x, p, cfg, LatentKVCache(cfg, 2, np.float64), chunks)
    naive = decode_all(mla_decode, x, p, cfg, NaiveKVCache(cfg, 2, np.float64), chunks)
    assert np.max(np.abs(full)) > 0.1
    assert np.max(np.abs(absorbed - full)) < tol["f64_exact"]
    assert np.max(np.abs(naive - full)) < tol["f64_exact"]
    assert np.max(np.abs(absorbed - naive)) < tol["f64_exact"]


@pytest.mark.mla
def test_prefill_then_decode_float32(rng, tol):
    cfg = make_cfg(16)
    x, p = make_inputs(cfg, rng, B=2, T=6, dtype=np.float32)
    full, _ = mla_forward(x, p, cfg)
    absorbed = decode_all(mla_decode, x, p, cfg, LatentKVCache(cfg, 2, np.float32), [3, 1, 1, 1])
    naive = decode_all(mla_decode, x, p, cfg, NaiveKVCache(cfg, 2, np.float32), [3, 1, 1, 1])
    assert absorbed.dtype == naive.dtype == np.float32
    np.testing.assert_allclose(absorbed, full, rtol=tol["f32_rtol"], atol=tol["f32_atol"])
    np.testing.assert_allclose(naive, full, rtol=tol["f32_rtol"], atol=tol["f32_atol"])


@pytest.mark.mla
def test_latent_cache_holds_normalised_latent_and_rotated_rope_key(rng, tol):
    cfg = make_cfg(16, yarn=True)
    x, p = make_inputs(cfg, rng, B=2, T=5)
    cache = LatentKVCache(cfg, 2, np.float64)
    assert cache.kv.shape == (2, 64, 8) and cache.pe.shape == (2, 64, 4) and cache.length == 0
    decode_all(mla_decode, x, p, cfg, cache, [3, 1, 1])
    for b in range(2):
        for t in range(5):
            _, c, k_pe = ref_token(x[b, t], p, cfg, t)
            np.testing.assert_allclose(cache.kv[b, t], c, rtol=0, atol=tol["f64_close"])
            np.testing.assert_allclose(cache.pe[b, t], k_pe, rtol=0, atol=tol["f64_close"])
    assert np.all(cache.kv[:, 5:] == 0) and np.all(cache.pe[:, 5:] == 0)


# ------------------------------------------------------------------------------------------------
# why RoPE is decoupled
# ------------------------------------------------------------------------------------------------

@pytest.mark.mla
def test_rope_on_compressed_key_cannot_be_absorbed(rng, tol):
    cfg = make_cfg(16)
    x, p = make_inputs(cfg, rng, B=2, T=8)
    coupled = mla_forward_coupled_rope(x, p, cfg)
    # the coupled model is a real model: its forward matches the loop reference with rotated keys
    np.testing.assert_allclose(coupled, ref_mla(x, p, cfg, coupled=True), rtol=0,
                               atol=tol["f64_close"])
    chunks = [3, 1, 1, 1, 1, 1]
    attempt = decode_all(mla_decode_coupled_rope, x, p, cfg, LatentKVCache(cfg, 2, np.float64), chunks)
    per_head = decode_all(mla_decode_coupled_rope, x, p, cfg, NaiveKVCache(cfg, 2, np.float64), chunks)
    # a full per-head cache of rotated keys reproduces it; the absorbed latent cache cannot
    assert np.max(np.abs(per_head - coupled)) < tol["f64_exact"]
    assert np.max(np.abs(attempt - coupled)) > 1e-3
    # the first token attends only to itself at position 0 (R_0 = I), so it still agrees there
    assert np.max(np.abs(attempt[:, 0] - coupled[:, 0])) < tol["f64_exact"]
    # ...while the decoupled design stays exact on the same inputs
    full, _ = mla_forward(x, p, cfg)
    absorbed = decode_all(mla_decode, x, p, cfg, LatentKVCache(cfg, 2, np.float64), chunks)
    assert np.max(np.abs(absorbed - full)) < tol["f64_exact"]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

@pytest.mark.mla
@pytest.mark.parametrize("kind", [LatentKVCache, NaiveKVCache])
def test_decode_errors_name_the_limit_and_leave_cache_untouched(kind, rng):
    cfg = make_cfg(16, max_seq_len=8)
    x, p = make_inputs(cfg, rng, B=2, T=8)
    cache = kind(cfg, 2, np.float64)
    mla_decode(x[:, :6], p, cfg, cache)
    snapshot = [a.copy() for a in vars(cache).values() if isinstance(a, np.ndarray)]
    with pytest.raises(ValueError, match=r"max_seq_len = 8"):
        mla_decode(x[:, :3], p, cfg, cache)             # positions 6, 7, 8: one past the end
    with pytest.raises(ValueError, match=r"batch size 1 .*batch = 2"):
        mla_decode(x[:1, :1], p, cfg, cache)
    with pytest.raises(ValueError, match=r"float32 .*float64"):
        mla_decode(x[:, :1].astype(np.float32), {k: v.astype(np.float32) for k, v in p.items()},
                   cfg, cache)
    assert cache.length == 6                           # nothing was appended by a failed call
    after = [a for a in vars(cache).values() if isinstance(a, np.ndarray)]
    assert all(np.array_equal(a, b) for a, b in zip(snapshot, after))
    mla_decode(x[:, 6:8], p, cfg, cache)               # exactly up to the limit is fine
    assert cache.length == 8
    with pytest.raises(ValueError, match=r"max_seq_len = 8"):
        mla_decode(x[:, :1], p, cfg, cache)


@pytest.mark.mla
def test_bad_arguments(rng):
    cfg = make_cfg(16)
    x, p = make_inputs(cfg, rng, B=1, T=3)
    with pytest.raises(ValueError, match="keys"):
        mla_forward(x, {k: v for k, v in p.items() if k != "wq_a"}, cfg)
    with pytest.raises(ValueError, match=r"p\['wo'\]"):
        mla_forward(x, {**p, "wo": p["wo"][:, :-1]}, cfg)
    with pytest.raises(ValueError, match="cfg.dim"):
        mla_forward(x[..., :-1], p, cfg)
    with pytest.raises(TypeError, match="dtype"):
        mla_forward(x.astype(np.float32), p, cfg)
    with pytest.raises(ValueError, match="max_seq_len"):
        mla_forward(x, p, cfg, start_pos=62)
    with pytest.raises(TypeError, match="LatentKVCache"):
        mla_decode(x, p, cfg, cache={})
    with pytest.raises(ValueError, match="batch"):
        LatentKVCache(cfg, 0, np.float64)
    with pytest.raises(TypeError, match="float16"):
        NaiveKVCache(cfg, 1, np.float16)
    with pytest.raises(ValueError, match="another config"):
        mla_decode(x, p, cfg, LatentKVCache(make_cfg(16, kv_lora_rank=4), 1, np.float64))

"""Causal SDPA (MHA / GQA / MQA) and the baseline attention block with its KV cache."""
import math

import numpy as np
import pytest

from tinymoe import ModelConfig
from tinymoe.gradcheck import gradcheck
from tinymoe.layers.attention import (KVCache, causal_mask, init_mha_params, mha_backward,
                                      mha_decode, mha_forward, sdpa_backward, sdpa_forward)


def _sdpa_loops(q, k, v, scale, q_offset):
    """o[b,t,h] by explicit loops over b, h, t, s with the causal mask s <= q_offset + t."""
    B, T, H, _ = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[3]
    rep = H // Hkv
    o = np.zeros((B, T, H, Dv))
    for b in range(B):
        for h in range(H):
            j = h // rep
            for t in range(T):
                scores = [scale * float(q[b, t, h] @ k[b, s, j]) for s in range(S)
                          if s <= q_offset + t]
                m = max(scores)
                e = [math.exp(x - m) for x in scores]
                for s in range(len(scores)):
                    o[b, t, h] += e[s] / sum(e) * v[b, s, j]
    return o


def _qkv(rng, B=2, T=3, S=5, H=4, Hkv=2, Dk=3, Dv=2):
    return (rng.standard_normal((B, T, H, Dk)), rng.standard_normal((B, S, Hkv, Dk)),
            rng.standard_normal((B, S, Hkv, Dv)))


# ---------------------------------------------------------------------------- sdpa

@pytest.mark.attention
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_loops(rng, tol, H, Hkv):
    q, k, v = _qkv(rng, H=H, Hkv=Hkv)
    o, _ = sdpa_forward(q, k, v, 0.7)                     # default q_offset = S - T = 2
    np.testing.assert_allclose(o, _sdpa_loops(q, k, v, 0.7, 2), rtol=0, atol=tol["f64_close"])
    o, _ = sdpa_forward(q, k, v, 0.7, q_offset=0)
    np.testing.assert_allclose(o, _sdpa_loops(q, k, v, 0.7, 0), rtol=0, atol=tol["f64_close"])


@pytest.mark.attention
def test_causal_mask_and_masked_weights_exactly_zero(rng, tol):
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    q, k, v = _qkv(rng, T=4, S=4)
    _, cache = sdpa_forward(q * 30, k, v, 1.0)
    mask = causal_mask(4, 4)
    assert np.all(cache.p[..., ~mask] == 0.0)
    assert np.all(cache.p[..., mask] > 0.0)
    np.testing.assert_allclose(cache.p.sum(-1), 1.0, rtol=0, atol=tol["f64_close"])
    with pytest.raises(ValueError, match="q_offset: -1"):
        causal_mask(4, 3)


@pytest.mark.attention
def test_mqa_equals_mha_with_identical_kv_heads(rng, tol):
    q, k, v = _qkv(rng, H=4, Hkv=1)
    o1, _ = sdpa_forward(q, k, v, 0.5)
    o4, _ = sdpa_forward(q, np.repeat(k, 4, axis=2), np.repeat(v, 4, axis=2), 0.5)
    np.testing.assert_allclose(o1, o4, rtol=0, atol=tol["f64_exact"])


@pytest.mark.attention
@pytest.mark.parametrize("H,Hkv,q_offset", [(4, 4, None), (4, 2, 0), (4, 1, 1), (2, 1, None)])
def test_gradcheck_sdpa(rng, tol, H, Hkv, q_offset):
    q, k, v = _qkv(rng, H=H, Hkv=Hkv)
    gradcheck(lambda q, k, v: sdpa_forward(q, k, v, 0.6, q_offset=q_offset),
              lambda do, c: dict(zip("qkv", sdpa_backward(do, c))),
              {"q": q, "k": k, "v": v}).assert_ok(tol["grad_rel"])


@pytest.mark.attention
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sdpa_dtype(rng, tol, dtype):
    q, k, v = _qkv(rng)
    o, c = sdpa_forward(*(a.astype(dtype) for a in (q, k, v)), np.float64(0.5))
    assert o.dtype == dtype and all(g.dtype == dtype for g in sdpa_backward(o, c))
    o64, _ = sdpa_forward(q, k, v, 0.5)
    np.testing.assert_allclose(o, o64, rtol=0, atol=tol["f32_vs_f64"])


@pytest.mark.attention
def test_sdpa_bad_inputs(rng):
    q, k, v = _qkv(rng, H=4, Hkv=3)
    with pytest.raises(ValueError, match="3 key/value heads do not divide the 4"):
        sdpa_forward(q, k, v, 1.0)
    q, k, v = _qkv(rng)
    with pytest.raises(ValueError, match="k, v: expected"):
        sdpa_forward(q, k[:, :4], v, 1.0)
    with pytest.raises(TypeError, match="dtype mismatch"):
        sdpa_forward(q, k.astype(np.float32), v, 1.0)
    with pytest.raises(ValueError, match="q: expected 4 dimensions"):
        sdpa_forward(q[0], k, v, 1.0)


# ---------------------------------------------------------------------------- the block

def _cfg(attn_type, **kw):
    return ModelConfig.preset("toy", attn_type=attn_type, n_heads=4, dim=12, qk_nope_head_dim=2,
                              qk_rope_head_dim=4, v_head_dim=3, max_seq_len=16, **kw)


BLOCKS = [("mha", {}), ("gqa", {"n_kv_heads": 2}), ("mqa", {})]


@pytest.mark.attention
def test_mha_param_shapes():
    for attn_type, kw in BLOCKS:
        cfg = _cfg(attn_type, **kw)
        p = init_mha_params(cfg, np.random.default_rng(0), np.float32)
        Hkv = {"mha": 4, "gqa": 2, "mqa": 1}[attn_type]
        assert {n: a.shape for n, a in p.items()} == {
            "wq": (4 * 6, 12), "wk": (Hkv * 6, 12), "wv": (Hkv * 3, 12), "wo": (12, 4 * 3)}
        assert all(a.dtype == np.float32 for a in p.values())


@pytest.mark.attention
def test_mha_forward_matches_loops(rng, tol):
    cfg = _cfg("gqa", n_kv_heads=2)
    p = init_mha_params(cfg, rng)
    p = {n: a * 20 for n, a in p.items()}                  # attention that is not near-uniform
    x = rng.standard_normal((1, 4, 12))
    start = 3
    y, _ = mha_forward(x, p, cfg, start_pos=start)
    Dn, Dr, Dv, H, Hkv = 2, 4, 3, 4, 2

    def rope_loop(vec, pos):
        out = vec.copy()
        for j in range(Dr // 2):
            phi = pos * 10000.0 ** (-2 * j / Dr)
            a, b = vec[Dn + 2 * j], vec[Dn + 2 * j + 1]
            out[Dn + 2 * j] = a * math.cos(phi) - b * math.sin(phi)
            out[Dn + 2 * j + 1] = a * math.sin(phi) + b * math.cos(phi)
        return out

    q = [[rope_loop((p["wq"] @ x[0, t])[h * 6:(h + 1) * 6], start + t) for h in range(H)]
         for t in range(4)]
    k = [[rope_loop((p["wk"] @ x[0, t])[j * 6:(j + 1) * 6], start + t) for j in range(Hkv)]
         for t in range(4)]
    v = [[(p["wv"] @ x[0, t])[j * 3:(j + 1) * 3] for j in range(Hkv)] for t in range(4)]
    o = _sdpa_loops(np.array([q]), np.array([k]), np.array([v]), 1 / math.sqrt(6), 0)
    want = o.reshape(1, 4, H * Dv) @ p["wo"].T
    np.testing.assert_allclose(y, want, rtol=0, atol=10 * tol["f64_close"] * max(1.0, np.abs(want).max()))


@pytest.mark.attention
@pytest.mark.parametrize("attn_type,kw", BLOCKS)
def test_gradcheck_mha_block(rng, tol, attn_type, kw):
    cfg = _cfg(attn_type, **kw)
    p = {n: a * 10 for n, a in init_mha_params(cfg, rng).items()}
    inputs = dict(p, x=rng.standard_normal((2, 3, 12)))

    def fwd(x, **p):
        return mha_forward(x, p, cfg, start_pos=2)

    def bwd(dy, c):
        dx, g = mha_backward(dy, c)
        return dict(g, x=dx)

    gradcheck(fwd, bwd, inputs, max_entries=40).assert_ok(tol["grad_rel"])


@pytest.mark.attention
@pytest.mark.parametrize("attn_type,kw", BLOCKS)
def test_mha_decode_matches_full_forward(rng, tol, attn_type, kw):
    cfg = _cfg(attn_type, **kw)
    p = {n: a * 10 for n, a in init_mha_params(cfg, rng).items()}
    x = rng.standard_normal((2, 7, 12))
    y_full, _ = mha_forward(x, p, cfg)
    cache = KVCache(cfg, 2, np.float64)
    ys = [mha_decode(x[:, :4], p, cfg, cache)]             # prefill
    for t in range(4, 7):                                  # then one token at a time
        ys.append(mha_decode(x[:, t:t + 1], p, cfg, cache))
    assert cache.length == 7
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_full, rtol=0,
                               atol=tol["f64_exact"] * max(1.0, np.abs(y_full).max()))
    Hkv = cfg.kv_heads
    assert cache.k.shape == (2, 16, Hkv, 6) and cache.v.shape == (2, 16, Hkv, 3)


@pytest.mark.attention
def test_mqa_block_equals_mha_block_with_identical_kv_heads(rng, tol):
    mqa, mha = _cfg("mqa"), _cfg("mha")
    p = init_mha_params(mqa, rng)
    p_mha = dict(p, wk=np.tile(p["wk"], (4, 1)), wv=np.tile(p["wv"], (4, 1)))
    x = rng.standard_normal((2, 5, 12))
    y1, _ = mha_forward(x, p, mqa)
    y4, _ = mha_forward(x, p_mha, mha)
    np.testing.assert_allclose(y1, y4, rtol=0, atol=tol["f64_exact"])


@pytest.mark.attention
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mha_block_dtype(rng, tol, dtype):
    cfg = _cfg("gqa", n_kv_heads=2)
    p = init_mha_params(cfg, rng, dtype)
    x = rng.standard_normal((1, 3, 12)).astype(dtype)
    y, c = mha_forward(x, p, cfg)
    dx, g = mha_backward(y, c)
    assert y.dtype == dx.dtype == dtype and all(a.dtype == dtype for a in g.values())
    cache = KVCache(cfg, 1, dtype)
    assert mha_decode(x, p, cfg, cache).dtype == dtype


@pytest.mark.attention
def test_mha_block_bad_inputs(rng):
    cfg = _cfg("mha")
    p = init_mha_params(cfg, rng)
    x = rng.standard_normal((2, 3, 12))
    with pytest.raises(ValueError, match="x: last dimension 11 does not match cfg.dim"):
        mha_forward(x[..., :11], p, cfg)
    with pytest.raises(ValueError, match=r"p\['wk'\]: expected shape"):
        mha_forward(x, dict(p, wk=p["wk"][:-1]), cfg)
    with pytest.raises(ValueError, match="missing baseline-attention weight"):
        mha_forward(x, {n: a for n, a in p.items() if n != "wo"}, cfg)
    with pytest.raises(ValueError, match="exceeds cfg.max_seq_len = 16"):
        mha_forward(x, p, cfg, start_pos=14)
    cache = KVCache(cfg, 2, np.float64)
    with pytest.raises(ValueError, match="batch 1 does not match the cache's batch 2"):
        mha_decode(x[:1], p, cfg, cache)
    with pytest.raises(TypeError, match="dtype float32 does not match the cache's dtype float64"):
        mha_decode(x.astype(np.float32), {n: a.astype(np.float32) for n, a in p.items()}, cfg,
                   cache)
    mha_decode(rng.standard_normal((2, 15, 12)), p, cfg, cache)
    with pytest.raises(ValueError, match="would pass max_seq_len = 16"):
        mha_decode(x[:, :2], p, cfg, cache)
    assert cache.length == 15                               # a refused call changes nothing
    with pytest.raises(ValueError, match="batch: 0"):
        KVCache(cfg, 0)

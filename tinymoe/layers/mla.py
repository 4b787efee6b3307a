"""Multi-head Latent Attention (MLA): DeepSeek-V2 2.1.1-2.1.3, DeepSeek-V3 2.1.1.

Shapes: x [B, T, D] -> y [B, T, D]. Letters: B batch, T query tokens, S keys (cache length),
D dim, H heads, Dn qk_nope_head_dim, Dr qk_rope_head_dim, Dv v_head_dim, Dq q_lora_rank,
Dc kv_lora_rank. Linear weights are [out, in], applied as x @ W.T (no biases).

Query (V2 eqs. 12-13, 15-16; low-rank when Dq > 0, one matrix when Dq == 0):
    c_q   = RMSNorm(x Wq_a^T)                      [B, T, Dq]        (W^DQ, q_norm)
    q     = c_q Wq_b^T                             [B, T, H, Dn+Dr]  (W^UQ | W^QR rows, per head)
    q     = x Wq^T                                 [B, T, H, Dn+Dr]  (when q_lora_rank == 0)
    q_nope, q_pe = q[..., :Dn], RoPE(q[..., Dn:])  per head

Both inner RMSNorms (q_norm, kv_norm) use cfg.latent_norm_eps (HF fixes them at 1e-6).

Joint key/value compression (V2 eqs. 9-11, 14; kv_a = [latent | shared rope key]):
    kv_a  = x Wkv_a^T                              [B, T, Dc+Dr]     (W^DKV and W^KR)
    c     = RMSNorm(kv_a[..., :Dc])                [B, T, Dc]        the latent the cache keeps
    k_pe  = RoPE(kv_a[..., Dc:])                   [B, T, Dr]        ONE rope key shared by all heads
    k_nope_h = W_UK[h] c,  v_h = W_UV[h] c         Wkv_b = per head [W_UK[h] (Dn rows) | W_UV[h] (Dv rows)]

Attention (V2 eqs. 17-19, V3 eq. 10), causal, scale = (Dn + Dr)^(-1/2) [* m^2 with YaRN]:
    s[h,t,u] = scale * (q_nope[t,h] . k_nope[u,h] + q_pe[t,h] . k_pe[u])
    o[t,h]   = sum_u softmax_u(s[h,t,:]) v[u,h]
    y        = concat_h(o[t,h]) Wo^T

Absorbed decoding (V2 2.1.2; reference/deepseek.md section 6). Since k_nope[u,h] = W_UK[h] c_u,
    q_nope[t,h] . k_nope[u,h] = (W_UK[h]^T q_nope[t,h]) . c_u = q~[t,h] . c_u
and o[t,h] = W_UV[h] (sum_u p[h,t,u] c_u), so attention runs directly over the cached latent c_u
and rope key k_pe[u]: an MQA with one shared "head" of key width Dc+Dr and value width Dc. The
cache stores Dc + Dr values per token and layer (576 for V2/V3), instead of H(Dn+Dr) + H Dv
(40,960 for V3) for full per-head keys and values.

Why RoPE is decoupled (V2 2.1.3). If RoPE were applied to the compressed key itself,
k_nope[u,h] = R_u W_UK[h] c_u, the score becomes q_t^T R_t^T R_u W_UK[h] c_u = q_t^T R_{u-t} W_UK[h] c_u:
a position-dependent rotation sits between the query and W_UK, so W_UK can no longer be folded into
the query once for all cached tokens. `mla_forward_coupled_rope` is that model and
`mla_decode_coupled_rope` shows that the absorbed attempt is wrong while a full per-head cache works.

API:
    y, cache = mla_forward(x, p, cfg, start_pos=0)     training / prefill, with a backward
    dx, grads = mla_backward(dy, cache)                grads has exactly p's keys
    cache = LatentKVCache(cfg, batch, dtype)           or NaiveKVCache(cfg, batch, dtype)
    y = mla_decode(x, p, cfg, cache)                   appends x's T tokens at cache.length
reference/deepseek.md sections 4-6 and 14.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from tinymoe.checks import check_float, check_same_dtype
from tinymoe.layers.attention import (DecodeCache, SDPACache, causal_mask, sdpa_backward,
                                      sdpa_forward)
from tinymoe.layers.basic import LinearCache, linear_backward, linear_forward, softmax_forward
from tinymoe.layers.norm import RMSNormCache, rmsnorm_backward, rmsnorm_forward
from tinymoe.layers.rope import rope_angles, rope_backward, rope_forward, softmax_scale
# The fused twins of the attention core, RMSNorm and RoPE (tinymoe/kernels/): same arguments,
# same caches, and the plain functions above for float64 or under TINYMOE_BACKEND=numpy.
from tinymoe.kernels.attention import sdpa_backward_fused as sdpa_backward  # noqa: E402,F811
from tinymoe.kernels.attention import sdpa_forward_fused as sdpa_forward  # noqa: E402,F811
from tinymoe.kernels.norm import rmsnorm_backward_fused as rmsnorm_backward  # noqa: E402,F811
from tinymoe.kernels.norm import rmsnorm_forward_fused as rmsnorm_forward  # noqa: E402,F811
from tinymoe.kernels.rope import rope_backward_fused as rope_backward  # noqa: E402,F811
from tinymoe.kernels.rope import rope_forward_fused as rope_forward  # noqa: E402,F811


# ================================================================================================
# parameters
# ================================================================================================

def mla_param_shapes(cfg) -> dict:
    """{name: shape} of one MLA layer's local parameters (wq instead of wq_a/q_norm/wq_b iff Dq == 0)."""
    D, H = cfg.dim, cfg.n_heads
    Dn, Dr, Dv, Dq, Dc = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                          cfg.q_lora_rank, cfg.kv_lora_rank)
    shapes = {}
    if Dq > 0:
        shapes["wq_a"] = (Dq, D)
        shapes["q_norm"] = (Dq,)
        shapes["wq_b"] = (H * (Dn + Dr), Dq)
    else:
        shapes["wq"] = (H * (Dn + Dr), D)
    shapes["wkv_a"] = (Dc + Dr, D)
    shapes["kv_norm"] = (Dc,)
    shapes["wkv_b"] = (H * (Dn + Dv), Dc)
    shapes["wo"] = (D, H * Dv)
    return shapes


def init_mla_params(cfg, rng: np.random.Generator, dtype=np.float64) -> dict:
    """Local MLA parameters: matrices ~ normal(0, cfg.init_std), norm weights = 1."""
    p = {}
    for name, shape in mla_param_shapes(cfg).items():
        if name in ("q_norm", "kv_norm"):
            p[name] = np.ones(shape, dtype=dtype)
        else:
            p[name] = (rng.standard_normal(shape) * cfg.init_std).astype(dtype)
    return p


def _check_inputs(x: np.ndarray, p: dict, cfg) -> None:
    """x [B, T, D] float; p has exactly the expected keys, shapes and x's dtype."""
    check_float("x", x, ndim=3)
    if x.shape[2] != cfg.dim:
        raise ValueError(f"x: last dimension {x.shape[2]} does not match cfg.dim = {cfg.dim}")
    if x.shape[1] < 1:
        raise ValueError(f"x: needs at least one token, got shape {list(x.shape)}")
    shapes = mla_param_shapes(cfg)
    if set(p) != set(shapes):
        raise ValueError(f"p: keys {sorted(p)} do not match the MLA parameters {sorted(shapes)} "
                         f"for q_lora_rank = {cfg.q_lora_rank}")
    for name, shape in shapes.items():
        check_float(f"p[{name!r}]", p[name])
        if p[name].shape != shape:
            raise ValueError(f"p[{name!r}]: expected shape {list(shape)}, got {list(p[name].shape)}")
    names = ["x"] + [f"p[{n!r}]" for n in shapes]
    check_same_dtype(names, x, *(p[n] for n in shapes))


# ================================================================================================
# shared steps: query and compressed key/value (used by training, decoding and the coupled variant)
# ================================================================================================

class QueryCache(NamedTuple):
    a: Optional[LinearCache]     # x [B, T, D], wq_a [Dq, D]     (None when Dq == 0)
    norm: Optional[RMSNormCache] # c_q before q_norm [B, T, Dq]  (None when Dq == 0)
    b: LinearCache               # c_q [B, T, Dq] and wq_b, or x [B, T, D] and wq


def _query_forward(x, p, cfg, cos, sin):
    """x [B, T, D] -> q_nope [B, T, H, Dn], q_pe [B, T, H, Dr] (rotated), QueryCache."""
    # BEGIN EXERCISE mla-compress
    B, T, _ = x.shape
    H, Dn = cfg.n_heads, cfg.qk_nope_head_dim
    if cfg.q_lora_rank > 0:
        # 1a. down-projection and norm of the compressed query: c_q = RMSNorm(x Wq_a^T)
        cq_raw, a_cache = linear_forward(x, p["wq_a"])                       # [B, T, Dq]
        cq, n_cache = rmsnorm_forward(cq_raw, p["q_norm"], cfg.latent_norm_eps)  # [B, T, Dq]
        # 1b. up-projection to all heads: q = c_q Wq_b^T
        q, b_cache = linear_forward(cq, p["wq_b"])                           # [B, T, H(Dn+Dr)]
    else:
        # 1. one projection: q = x Wq^T
        a_cache = n_cache = None
        q, b_cache = linear_forward(x, p["wq"])                              # [B, T, H(Dn+Dr)]
    q = q.reshape(B, T, H, cfg.qk_head_dim)                                  # [B, T, H, Dn+Dr]
    # 1c. per head: nope part first, then the rope part, which is rotated
    q_nope = q[..., :Dn]                                                     # [B, T, H, Dn]
    q_pe = rope_forward(np.ascontiguousarray(q[..., Dn:]), cos, sin)         # [B, T, H, Dr]
    return q_nope, q_pe, QueryCache(a_cache, n_cache, b_cache)
    # END EXERCISE


def _query_backward(dq_nope, dq_pe, cache: QueryCache, cos, sin):
    """dq_nope [B, T, H, Dn], dq_pe [B, T, H, Dr] -> dx [B, T, D], {wq_a, q_norm, wq_b} or {wq}."""
    B, T, H, _ = dq_nope.shape
    # 1c. forward: q_pe = RoPE(q[..., Dn:]);  q_nope = q[..., :Dn]
    dq = np.concatenate([dq_nope, rope_backward(dq_pe, cos, sin)], axis=-1)  # [B, T, H, Dn+Dr]
    dq = dq.reshape(B, T, -1)                                                # [B, T, H(Dn+Dr)]
    if cache.a is None:
        # 1. forward: q = x Wq^T
        dx, dwq = linear_backward(dq, cache.b)
        return dx, {"wq": dwq}
    # 1b. forward: q = c_q Wq_b^T
    dcq, dwq_b = linear_backward(dq, cache.b)                                # [B, T, Dq]
    # 1a. forward: c_q = RMSNorm(cq_raw);  cq_raw = x Wq_a^T
    dcq_raw, dq_norm = rmsnorm_backward(dcq, cache.norm)                     # [B, T, Dq], [Dq]
    dx, dwq_a = linear_backward(dcq_raw, cache.a)                            # [B, T, D]
    return dx, {"wq_a": dwq_a, "q_norm": dq_norm, "wq_b": dwq_b}


class LatentCache(NamedTuple):
    a: LinearCache               # x [B, T, D], wkv_a [Dc+Dr, D]
    norm: RMSNormCache           # latent before kv_norm [B, T, Dc]


def _latent_forward(x, p, cfg, cos, sin):
    """x [B, T, D] -> c [B, T, Dc] (normalised latent), k_pe [B, T, Dr] (rotated), LatentCache."""
    # BEGIN EXERCISE mla-compress
    Dc = cfg.kv_lora_rank
    # 2a. joint down-projection: kv_a = x Wkv_a^T = [latent (Dc) | rope key (Dr)]
    kv_a, a_cache = linear_forward(x, p["wkv_a"])                            # [B, T, Dc+Dr]
    # 2b. normalise the latent only (the rope key is never normalised)
    c, n_cache = rmsnorm_forward(np.ascontiguousarray(kv_a[..., :Dc]), p["kv_norm"],
                                 cfg.latent_norm_eps)                         # [B, T, Dc]
    # 2c. rotate the one rope key every head shares
    k_pe = rope_forward(np.ascontiguousarray(kv_a[..., Dc:]), cos, sin)      # [B, T, Dr]
    return c, k_pe, LatentCache(a_cache, n_cache)
    # END EXERCISE


def _latent_backward(dc, dk_pe, cache: LatentCache, cos, sin):
    """dc [B, T, Dc], dk_pe [B, T, Dr] -> dx [B, T, D], dwkv_a, dkv_norm."""
    # 2c. forward: k_pe = RoPE(kv_a[..., Dc:])
    dk_pe_raw = rope_backward(dk_pe, cos, sin)                               # [B, T, Dr]
    # 2b. forward: c = RMSNorm(kv_a[..., :Dc])
    dc_raw, dkv_norm = rmsnorm_backward(dc, cache.norm)                      # [B, T, Dc], [Dc]
    # 2a. forward: kv_a = x Wkv_a^T
    dkv_a = np.concatenate([dc_raw, dk_pe_raw], axis=-1)                     # [B, T, Dc+Dr]
    dx, dwkv_a = linear_backward(dkv_a, cache.a)                             # [B, T, D]
    return dx, dwkv_a, dkv_norm


def _split_wkv_b(wkv_b, cfg):
    """Wkv_b [H(Dn+Dv), Dc] -> W_UK [H, Dn, Dc], W_UV [H, Dv, Dc] (per head: key rows, then value rows)."""
    w = wkv_b.reshape(cfg.n_heads, cfg.qk_nope_head_dim + cfg.v_head_dim, cfg.kv_lora_rank)
    return w[:, :cfg.qk_nope_head_dim], w[:, cfg.qk_nope_head_dim:]


# ================================================================================================
# training / prefill form (reference/deepseek.md section 5)
# ================================================================================================

class MLACache(NamedTuple):
    query: QueryCache            # step 1 caches
    latent: LatentCache          # step 2 caches
    up: LinearCache              # c [B, T, Dc], wkv_b [H(Dn+Dv), Dc]
    attn: SDPACache              # per-head q [B,H,T,Dn+Dr], k, v, p [B,H,T,T]
    out: LinearCache             # o [B, T, H*Dv], wo [D, H*Dv]
    cos: np.ndarray              # [T, Dr/2] angles of positions start_pos..start_pos+T-1
    sin: np.ndarray              # [T, Dr/2]
    dims: tuple                  # (H, Dn, Dr, Dv)


def mla_forward(x: np.ndarray, p: dict, cfg, start_pos: int = 0):
    """x [B, T, D], local params p -> y [B, T, D], MLACache. Tokens sit at start_pos..start_pos+T-1.

    The naive form: per-head keys k = [W_UK c | k_pe] and values v = W_UV c are materialised and
    fed to causal scaled-dot-product attention with scale = softmax_scale(cfg). start_pos only
    shifts the RoPE angles (the T tokens attend to each other, causally).
    """
    _check_inputs(x, p, cfg)
    B, T, _ = x.shape
    H, Dn, Dr, Dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    cos, sin = rope_angles(cfg, np.arange(start_pos, start_pos + T), x.dtype)  # [T, Dr/2] each
    # 1. query: q_nope [B, T, H, Dn], rotated q_pe [B, T, H, Dr]
    q_nope, q_pe, q_cache = _query_forward(x, p, cfg, cos, sin)
    # 2. compressed key/value: normalised latent c [B, T, Dc], rotated shared key k_pe [B, T, Dr]
    c, k_pe, l_cache = _latent_forward(x, p, cfg, cos, sin)
    # BEGIN EXERCISE mla-compress
    # 3. up-projection of the latent: kv = c Wkv_b^T, per head [k_nope (Dn) | v (Dv)]
    kv, up_cache = linear_forward(c, p["wkv_b"])                             # [B, T, H(Dn+Dv)]
    kv = kv.reshape(B, T, H, Dn + Dv)                                        # [B, T, H, Dn+Dv]
    k_nope, v = kv[..., :Dn], np.ascontiguousarray(kv[..., Dn:])             # [B,T,H,Dn], [B,T,H,Dv]
    # 4. assemble per-head queries and keys, nope first; k_pe is broadcast to all H heads
    q = np.concatenate([q_nope, q_pe], axis=-1)                              # [B, T, H, Dn+Dr]
    k = np.concatenate([k_nope, np.broadcast_to(k_pe[:, :, None, :], (B, T, H, Dr))],
                       axis=-1)                                              # [B, T, H, Dn+Dr]
    # END EXERCISE
    # 5. causal attention, scale (Dn+Dr)^(-1/2) [* YaRN m^2]
    o, attn_cache = sdpa_forward(q, k, v, softmax_scale(cfg), causal=True)  # [B, T, H, Dv]
    # 6. output projection
    y, out_cache = linear_forward(o.reshape(B, T, H * Dv), p["wo"])          # [B, T, D]
    return y, MLACache(q_cache, l_cache, up_cache, attn_cache, out_cache, cos, sin, (H, Dn, Dr, Dv))


def mla_backward(dy: np.ndarray, cache: MLACache):
    """dy [B, T, D] -> dx [B, T, D], grads {name: array} with exactly the forward's p keys."""
    H, Dn, Dr, Dv = cache.dims
    B, T, _ = dy.shape
    cos, sin = cache.cos, cache.sin
    # 6. forward: y = o Wo^T
    do, dwo = linear_backward(dy, cache.out)                                 # [B, T, H*Dv]
    # 5. forward: o = sdpa(q, k, v)
    dq, dk, dv = sdpa_backward(do.reshape(B, T, H, Dv), cache.attn)          # per head
    # 4. forward: k = [k_nope | broadcast_H(k_pe)];  q = [q_nope | q_pe]
    dk_nope = dk[..., :Dn]                                                   # [B, T, H, Dn]
    dk_pe = dk[..., Dn:].sum(axis=2)                                         # [B, T, Dr] (sum over heads)
    dq_nope, dq_pe = dq[..., :Dn], dq[..., Dn:]                              # [B,T,H,Dn], [B,T,H,Dr]
    # 3. forward: kv = c Wkv_b^T;  k_nope, v = kv[..., :Dn], kv[..., Dn:]
    dkv = np.concatenate([dk_nope, dv], axis=-1).reshape(B, T, H * (Dn + Dv))
    dc, dwkv_b = linear_backward(dkv, cache.up)                              # [B, T, Dc]
    # 2. forward: c = RMSNorm(latent), k_pe = RoPE(rope key), [latent | rope key] = x Wkv_a^T
    dx_kv, dwkv_a, dkv_norm = _latent_backward(dc, dk_pe, cache.latent, cos, sin)
    # 1. forward: q_nope, q_pe from x
    dx_q, q_grads = _query_backward(dq_nope, dq_pe, cache.query, cos, sin)
    # x feeds both the query and the latent branch
    dx = dx_q + dx_kv                                                        # [B, T, D]
    grads = dict(q_grads)
    grads.update(wkv_a=dwkv_a, kv_norm=dkv_norm, wkv_b=dwkv_b, wo=dwo)
    return dx, grads


# ================================================================================================
# KV caches for decoding
# ================================================================================================

class LatentKVCache(DecodeCache):
    """The compressed MLA cache of one layer: Dc + Dr values per token (V2 2.1.2).

    kv     [B, max_seq_len, Dc]   RMSNorm'd latent c_u (post kv_norm)
    pe     [B, max_seq_len, Dr]   rotated shared rope key k_pe[u] (post RoPE)
    length int                    tokens stored so far (positions 0..length-1)
    """
    ARRAYS = ("kv", "pe")

    def trailing(self, cfg) -> tuple:
        return (cfg.kv_lora_rank,), (cfg.qk_rope_head_dim,)


class NaiveKVCache(DecodeCache):
    """Full per-head keys and values of one layer, as a standard MHA cache (HF's DynamicCache).

    k      [B, max_seq_len, H, Dn+Dr]   per-head keys [W_UK c | k_pe] (rope part rotated)
    v      [B, max_seq_len, H, Dv]      per-head values W_UV c
    length int                          tokens stored so far
    """
    ARRAYS = ("k", "v")

    def trailing(self, cfg) -> tuple:
        return (cfg.n_heads, cfg.qk_head_dim), (cfg.n_heads, cfg.v_head_dim)


def _check_decode(x, p, cfg, cache) -> tuple[int, int]:
    """Validate a decode call before anything is written; return (start, end) positions."""
    if not isinstance(cache, (LatentKVCache, NaiveKVCache)):
        raise TypeError(f"cache: expected a LatentKVCache or NaiveKVCache, got {type(cache).__name__}")
    _check_inputs(x, p, cfg)
    B, T, _ = x.shape
    kind = type(cache).__name__
    if B != cache.batch:
        raise ValueError(f"x: batch size {B} does not match the {kind}, which was created with "
                         f"batch = {cache.batch}")
    if x.dtype != cache.dtype:
        raise ValueError(f"x: dtype {x.dtype} does not match the {kind}, which was created with "
                         f"dtype = {cache.dtype}")
    if cache.max_seq_len != cfg.max_seq_len or not cache._shape_ok(cfg):
        raise ValueError(f"cache: this {kind} was created for another config (shapes or "
                         f"max_seq_len = {cache.max_seq_len} differ from cfg)")
    start, end = cache.length, cache.length + T
    if end > cfg.max_seq_len:
        raise ValueError(f"x: appending {T} token(s) at position {start} would need positions up "
                         f"to {end - 1}, past the limit max_seq_len = {cfg.max_seq_len} "
                         f"(cache holds {start} tokens)")
    return start, end


# ================================================================================================
# decoding: absorbed (latent cache) and naive (full per-head cache)
# ================================================================================================

def _attend_absorbed(q_nope, q_pe, kv, pe, W_UK, W_UV, scale, start):
    """Absorbed attention over a latent cache (reference/deepseek.md section 6).

    q_nope [B, T, H, Dn], q_pe [B, T, H, Dr], kv [B, S, Dc], pe [B, S, Dr] -> o [B, T, H, Dv].
    Query t is at absolute position start + t and sees keys u <= start + t.
    """
    # BEGIN EXERCISE mla-absorbed
    B, T, H, _ = q_nope.shape
    S, Dc = kv.shape[1], kv.shape[2]
    # a. absorb W_UK into the query: q~[t,h] = W_UK[h]^T q_nope[t,h]
    q_lat = np.matmul(q_nope.transpose(0, 2, 1, 3), W_UK)                   # [B, H, T, Dc]
    # b. scores against the cache directly: one shared key of width Dc + Dr (an MQA)
    s = q_lat.reshape(B, H * T, Dc) @ kv.transpose(0, 2, 1)                  # [B, H*T, S]
    s += q_pe.transpose(0, 2, 1, 3).reshape(B, H * T, -1) @ pe.transpose(0, 2, 1)
    s = (s * scale).reshape(B, H, T, S)                                      # [B, H, T, S]
    # c. causal mask (keys after the query's position) and softmax over the keys
    if T > 1:
        s = np.where(causal_mask(T, S, start), s, -np.inf)
    prob, _ = softmax_forward(s)                                             # [B, H, T, S]
    # d. weighted sum of the cached latents: o_lat[t,h] = sum_u p[h,t,u] c_u
    o_lat = (prob.reshape(B, H * T, S) @ kv).reshape(B, H, T, Dc)            # [B, H, T, Dc]
    # e. W_UV on the output side: o[t,h] = W_UV[h] o_lat[t,h]
    o = np.matmul(o_lat, W_UV.transpose(0, 2, 1))                            # [B, H, T, Dv]
    return o.transpose(0, 2, 1, 3)                                           # [B, T, H, Dv]
    # END EXERCISE


def _attend_naive(q, k, v, scale, start):
    """q [B, T, H, Dk], cached k [B, S, H, Dk], v [B, S, H, Dv] -> o [B, T, H, Dv] (plain MHA)."""
    T, S = q.shape[1], k.shape[1]
    s = np.matmul(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 3, 1)) * scale  # [B, H, T, S]
    if T > 1:
        s = np.where(causal_mask(T, S, start), s, -np.inf)
    prob, _ = softmax_forward(s)                                             # [B, H, T, S]
    o = np.matmul(prob, v.transpose(0, 2, 1, 3))                             # [B, H, T, Dv]
    return o.transpose(0, 2, 1, 3)                                           # [B, T, H, Dv]


def mla_decode(x: np.ndarray, p: dict, cfg, cache) -> np.ndarray:
    """x [B, T, D] -> y [B, T, D]; appends the T tokens to `cache` at positions cache.length...

    T > 1 is a prefill (causal inside the chunk), T == 1 one decoding step. With a LatentKVCache the
    attention is absorbed (W_UK folded into the query, W_UV applied after the weighted sum of
    latents); with a NaiveKVCache full per-head keys/values are stored and attended. Both equal
    mla_forward over the whole sequence. Raises ValueError, before touching the cache, when the
    batch or dtype differ from the cache's or when the tokens would run past cfg.max_seq_len.
    """
    start, end = _check_decode(x, p, cfg, cache)
    B, T, _ = x.shape
    H, Dn, Dr, Dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    cos, sin = rope_angles(cfg, np.arange(start, end), x.dtype)              # [T, Dr/2]
    scale = softmax_scale(cfg)
    # 1. query, 2. compressed key/value of the new tokens (as in mla_forward)
    q_nope, q_pe, _ = _query_forward(x, p, cfg, cos, sin)                    # [B,T,H,Dn], [B,T,H,Dr]
    c, k_pe, _ = _latent_forward(x, p, cfg, cos, sin)                        # [B,T,Dc], [B,T,Dr]
    W_UK, W_UV = _split_wkv_b(p["wkv_b"], cfg)                               # [H,Dn,Dc], [H,Dv,Dc]
    if isinstance(cache, LatentKVCache):
        # 3. store the normalised latent and the rotated rope key: Dc + Dr values per token
        cache.kv[:, start:end] = c
        cache.pe[:, start:end] = k_pe
        cache.length = end
        # 4-5. absorbed attention over the whole cache
        o = _attend_absorbed(q_nope, q_pe, cache.kv[:, :end], cache.pe[:, :end], W_UK, W_UV,
                             scale, start)                                   # [B, T, H, Dv]
    else:
        # 3. up-project the new tokens to per-head keys/values and store them: H(Dn+Dr+Dv) values
        k_nope = np.einsum("btc,hnc->bthn", c, W_UK)                         # [B, T, H, Dn]
        v = np.einsum("btc,hvc->bthv", c, W_UV)                              # [B, T, H, Dv]
        cache.k[:, start:end, :, :Dn] = k_nope
        cache.k[:, start:end, :, Dn:] = k_pe[:, :, None, :]                  # shared, copied per head
        cache.v[:, start:end] = v
        cache.length = end
        # 4-5. standard attention over the per-head cache
        q = np.concatenate([q_nope, q_pe], axis=-1)                          # [B, T, H, Dn+Dr]
        o = _attend_naive(q, cache.k[:, :end], cache.v[:, :end], scale, start)
    # 6. output projection
    y = o.reshape(B, T, H * Dv) @ p["wo"].T                                  # [B, T, D]
    return y.astype(x.dtype, copy=False)


# ================================================================================================
# why RoPE is decoupled (V2 2.1.3): RoPE on the compressed key
# ================================================================================================

def _nope_angles(cfg, positions, dtype):
    """cos, sin [T, Dn/2] for rotating the Dn-wide nope parts (same theta/YaRN as the rope part)."""
    if cfg.qk_nope_head_dim % 2:
        raise ValueError(f"cfg.qk_nope_head_dim = {cfg.qk_nope_head_dim}: the coupled-RoPE variant "
                         f"rotates the nope parts, so it must be even")
    return rope_angles(cfg.replace(qk_rope_head_dim=cfg.qk_nope_head_dim), positions, dtype)


def mla_forward_coupled_rope(x: np.ndarray, p: dict, cfg, start_pos: int = 0) -> np.ndarray:
    """x [B, T, D] -> y [B, T, D]: MLA with RoPE ALSO applied to the compressed key (forward only).

    Same parameters and steps as mla_forward, except that the key reconstructed from the latent is
    rotated, k_nope[u,h] = R_u W_UK[h] c_u, and so is the matching query part, q_nope[t,h] -> R_t q_nope.
    The scores then contain q_nope^T R_{u-t} W_UK[h] c_u: position-dependent, so W_UK cannot be
    absorbed into the query (see mla_decode_coupled_rope). No backward: it exists for the lesson.
    """
    _check_inputs(x, p, cfg)
    B, T, _ = x.shape
    H, Dn, Dr, Dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    positions = np.arange(start_pos, start_pos + T)
    cos, sin = rope_angles(cfg, positions, x.dtype)
    ncos, nsin = _nope_angles(cfg, positions, x.dtype)                       # [T, Dn/2]
    q_nope, q_pe, _ = _query_forward(x, p, cfg, cos, sin)
    c, k_pe, _ = _latent_forward(x, p, cfg, cos, sin)
    W_UK, W_UV = _split_wkv_b(p["wkv_b"], cfg)
    k_nope = np.einsum("btc,hnc->bthn", c, W_UK)                             # [B, T, H, Dn]
    v = np.einsum("btc,hvc->bthv", c, W_UV)                                  # [B, T, H, Dv]
    # the one change: RoPE on the compressed key W_UK c (and on the matching query part)
    k_nope = rope_forward(k_nope, ncos, nsin)
    q_nope = rope_forward(np.ascontiguousarray(q_nope), ncos, nsin)
    q = np.concatenate([q_nope, q_pe], axis=-1)
    k = np.concatenate([k_nope, np.broadcast_to(k_pe[:, :, None, :], (B, T, H, Dr))], axis=-1)
    o, _ = sdpa_forward(q, k, v, softmax_scale(cfg), causal=True)
    return (o.reshape(B, T, H * Dv) @ p["wo"].T).astype(x.dtype, copy=False)


def mla_decode_coupled_rope(x: np.ndarray, p: dict, cfg, cache) -> np.ndarray:
    """x [B, T, D] -> y [B, T, D]: cached decoding of mla_forward_coupled_rope.

    NaiveKVCache: stores the rotated per-head keys R_u W_UK c_u, so it equals the full forward.
    LatentKVCache: the ATTEMPTED absorption. It folds W_UK into the rotated query once,
    q~ = W_UK^T R_t q_nope, and dots it with the cached c_u, which computes q^T R_t^T W_UK c_u instead
    of q^T R_t^T R_u W_UK c_u: the key's own rotation R_u is lost, and it cannot be put back without
    recomputing every cached key per head (the naive cache). The result is wrong, by design.
    """
    start, end = _check_decode(x, p, cfg, cache)
    B, T, _ = x.shape
    H, Dn, Dr, Dv = cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    positions = np.arange(start, end)
    cos, sin = rope_angles(cfg, positions, x.dtype)
    ncos, nsin = _nope_angles(cfg, positions, x.dtype)
    scale = softmax_scale(cfg)
    q_nope, q_pe, _ = _query_forward(x, p, cfg, cos, sin)
    q_nope = rope_forward(np.ascontiguousarray(q_nope), ncos, nsin)          # R_t q_nope
    c, k_pe, _ = _latent_forward(x, p, cfg, cos, sin)
    W_UK, W_UV = _split_wkv_b(p["wkv_b"], cfg)
    if isinstance(cache, LatentKVCache):
        cache.kv[:, start:end] = c
        cache.pe[:, start:end] = k_pe
        cache.length = end
        # the attempted absorption: there is no place left for the key rotation R_u
        o = _attend_absorbed(q_nope, q_pe, cache.kv[:, :end], cache.pe[:, :end], W_UK, W_UV,
                             scale, start)
    else:
        k_nope = rope_forward(np.einsum("btc,hnc->bthn", c, W_UK), ncos, nsin)  # R_u W_UK c_u
        cache.k[:, start:end, :, :Dn] = k_nope
        cache.k[:, start:end, :, Dn:] = k_pe[:, :, None, :]
        cache.v[:, start:end] = np.einsum("btc,hvc->bthv", c, W_UV)
        cache.length = end
        q = np.concatenate([q_nope, q_pe], axis=-1)
        o = _attend_naive(q, cache.k[:, :end], cache.v[:, :end], scale, start)
    y = o.reshape(B, T, H * Dv) @ p["wo"].T
    return y.astype(x.dtype, copy=False)

"""Causal scaled-dot-product attention with grouped key/value heads (MHA, GQA, MQA), and the
baseline attention block built on it.

    scores[b,h,t,s] = scale * q[b,t,h] . k[b,s,h // (H/Hkv)]
    scores[b,h,t,s] = -inf                 where key s is in the future of query t
    p = softmax_s(scores);  o[b,t,h] = sum_s p[b,h,t,s] v[b,s,h // (H/Hkv)]

MHA has Hkv = H, GQA 1 < Hkv < H, MQA Hkv = 1 (Shazeer 2019; Ainslie et al. 2023). This is the
baseline MLA is measured against, and MLA's own training path (reference/deepseek.md section 5)
calls `sdpa_forward` with per-head keys built from its latent. Queries may sit after a cache:
query t is at absolute position q_offset + t and keys are at 0..S-1, so key s is visible to query t
iff s <= q_offset + t. Shape letters: B batch, T queries, S keys, H query heads, Hkv key/value
heads, Dk query/key width, Dv value width.

The block (`mha_forward` / `mha_backward` / `KVCache` / `mha_decode`) is at the bottom of the file.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from tinymoe.checks import check_float, check_same_dtype, check_shape
from tinymoe.layers.basic import softmax_forward
from tinymoe.layers.rope import rope_angles, rope_backward, rope_forward, softmax_scale


class SDPACache(NamedTuple):
    q: np.ndarray    # [B, H, T, Dk]   queries, heads first
    k: np.ndarray    # [B, H, S, Dk]   keys repeated to H heads
    v: np.ndarray    # [B, H, S, Dv]   values repeated to H heads
    p: np.ndarray    # [B, H, T, S]    attention weights (exact zeros where masked)
    scale: float     # softmax scale
    n_kv_heads: int  # Hkv, to sum the repeated heads' gradients back


def causal_mask(T: int, S: int, q_offset: Optional[int] = None) -> np.ndarray:
    """[T, S] bool, True where key s is visible to query t: s <= q_offset + t (default S - T).

    The default puts the T queries at the end of the S keys (the last T keys are the queries'
    own tokens, the rest a cache). q_offset must be >= 0, so every query sees at least key 0
    (a row with no visible key would give a softmax of 0/0).
    """
    q_offset = S - T if q_offset is None else q_offset
    if q_offset < 0:
        raise ValueError(f"q_offset: {q_offset} must be >= 0 (with T={T} queries and S={S} keys "
                         f"the default is S - T); a query with no visible key has no softmax")
    return np.arange(S)[None, :] <= (q_offset + np.arange(T))[:, None]


def sdpa_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                 causal: bool = True, q_offset: Optional[int] = None):
    """q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv] -> o [B, T, H, Dv], cache.

        s = scale * q k^T  (-inf where s > q_offset + t if causal);  p = softmax(s);  o = p v

    H must be a multiple of Hkv; query head h reads key/value head h // (H / Hkv), so Hkv = H is
    MHA, Hkv = 1 MQA and anything between GQA. Masked weights are exactly 0. Returns q's dtype.
    Cache holds: q, k, v (heads first, k/v repeated to H), p, scale, Hkv.
    """
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float(name, a, ndim=4)
    check_same_dtype(("q", "k", "v"), q, k, v)
    B, T, H, Dk = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    if k.shape != (B, S, Hkv, Dk) or v.shape[:3] != (B, S, Hkv):
        raise ValueError(f"k, v: expected k [B={B}, S, Hkv, Dk={Dk}] and v [B, S, Hkv, Dv] with "
                         f"the same S and Hkv, got k {list(k.shape)}, v {list(v.shape)}")
    if H % Hkv:
        raise ValueError(f"k: {Hkv} key/value heads do not divide the {H} query heads")
    rep = H // Hkv
    scale = float(scale)        # a Python float keeps float32 inputs float32 (NEP 50)
    # 1. heads first; repeat each key/value head for the rep query heads that share it
    qh = q.transpose(0, 2, 1, 3)                                     # [B, H, T, Dk]
    kh = k.transpose(0, 2, 1, 3)                                     # [B, Hkv, S, Dk]
    vh = v.transpose(0, 2, 1, 3)                                     # [B, Hkv, S, Dv]
    if rep > 1:
        kh = np.repeat(kh, rep, axis=1)                              # [B, H, S, Dk]
        vh = np.repeat(vh, rep, axis=1)                              # [B, H, S, Dv]
    # 2. scaled scores, future keys masked with -inf (the scale is applied to the narrower q)
    s = (qh * scale) @ kh.transpose(0, 1, 3, 2)                      # [B, H, T, S]
    if causal:
        s += np.where(causal_mask(T, S, q_offset), 0.0, -np.inf).astype(s.dtype)   # [T, S] broadcast
    # 3. attention weights
    p, _ = softmax_forward(s)                                        # [B, H, T, S]
    # 4. weighted sum of values, back to tokens first
    o = (p @ vh).transpose(0, 2, 1, 3)                               # [B, T, H, Dv]
    return np.ascontiguousarray(o), SDPACache(qh, kh, vh, p, scale, Hkv)


def sdpa_backward(do: np.ndarray, cache: SDPACache):
    """do [B, T, H, Dv] -> dq [B, T, H, Dk], dk [B, S, Hkv, Dk], dv [B, S, Hkv, Dv].

    dp = do v^T;  ds = p * (dp - rowsum(dp * p)) * scale;  dq = ds k;  dk = ds^T q;  dv = p^T do,
    then the gradients of repeated key/value heads are summed over their rep query heads.
    """
    qh, kh, vh, p, scale, Hkv = cache
    B, H, T, Dk = qh.shape
    S = kh.shape[2]
    check_shape("do", do, (B, T, H, vh.shape[-1]))
    # BEGIN EXERCISE attention-backward
    doh = do.transpose(0, 2, 1, 3)                                   # [B, H, T, Dv]
    # 4. forward: o = p @ v
    dp = doh @ vh.transpose(0, 1, 3, 2)                              # [B, H, T, S]
    dvh = p.transpose(0, 1, 3, 2) @ doh                              # [B, H, S, Dv]
    # 3. forward: p = softmax(s)   (masked entries have p = 0, so they get ds = 0)
    #    ds = p * (dp - rowsum(dp * p)), computed in dp's buffer (softmax_backward, fused)
    ds = dp
    ds -= np.einsum("bhts,bhts->bht", dp, p)[..., None]
    ds *= p                                                          # [B, H, T, S]
    # 2. forward: s = (q * scale) @ k^T
    dqh = (ds @ kh) * scale                                          # [B, H, T, Dk]
    dkh = (ds.transpose(0, 1, 3, 2) @ qh) * scale                    # [B, H, S, Dk]
    # 1. forward: repeat kv heads; heads first
    rep = H // Hkv
    dk = dkh.reshape(B, Hkv, rep, S, Dk).sum(axis=2).transpose(0, 2, 1, 3)            # [B, S, Hkv, Dk]
    dv = dvh.reshape(B, Hkv, rep, S, dvh.shape[-1]).sum(axis=2).transpose(0, 2, 1, 3)  # [B, S, Hkv, Dv]
    dq = dqh.transpose(0, 2, 1, 3)                                   # [B, T, H, Dk]
    return np.ascontiguousarray(dq), np.ascontiguousarray(dk), np.ascontiguousarray(dv)
    # END EXERCISE


# ================================================================================================
# the baseline attention block: MHA / GQA / MQA with RoPE on the last Dr values of every head
# ================================================================================================
#
# The block MLA is compared against (reference/deepseek.md section 5; DeepSeek-V2 section 2.1.1
# and Table 1). Parameters (local dict, linear weights [out, in], applied x @ W.T):
#
#     wq [H*(Dn+Dr), D]   wk [Hkv*(Dn+Dr), D]   wv [Hkv*Dv, D]   wo [D, H*Dv]
#
# with Hkv = cfg.kv_heads (H for "mha", cfg.n_kv_heads for "gqa", 1 for "mqa"). Every query and
# key head has the MLA layout [Dn "nope" values | Dr "rope" values], so the two blocks differ only
# in how keys and values are produced and cached, and the softmax scale is the same
# softmax_scale(cfg) = (Dn + Dr)^(-1/2) (times YaRN's m^2 when YaRN is on).
#
#     1. q = x Wq^T -> [B,T,H,Dn+Dr];  k = x Wk^T -> [B,T,Hkv,Dn+Dr];  v = x Wv^T -> [B,T,Hkv,Dv]
#     2. q[..., Dn:] = RoPE(q[..., Dn:], pos);  k[..., Dn:] = RoPE(k[..., Dn:], pos)
#     3. o = causal_sdpa(q, k, v)                                   [B,T,H,Dv]
#     4. y = o.reshape(B, T, H*Dv) Wo^T                             [B,T,D]
#
# The inference cache stores the rotated keys and the values of every kv head:
# Hkv * (Dn + Dr + Dv) numbers per token and layer, against MLA's Dc + Dr.

MHA_PARAM_NAMES = ("wq", "wk", "wv", "wo")


def _mha_dims(cfg):
    """(H, Hkv, Dn, Dr, Dv) of the baseline block."""
    return cfg.n_heads, cfg.kv_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim


def _mha_param_shapes(cfg) -> dict:
    H, Hkv, Dn, Dr, Dv = _mha_dims(cfg)
    D = cfg.dim
    return {"wq": (H * (Dn + Dr), D), "wk": (Hkv * (Dn + Dr), D), "wv": (Hkv * Dv, D),
            "wo": (D, H * Dv)}


def init_mha_params(cfg, rng: np.random.Generator, dtype=np.float64) -> dict:
    """-> {"wq", "wk", "wv", "wo"}: every weight ~ N(0, cfg.init_std^2), shapes as above."""
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    return {name: rng.normal(0.0, cfg.init_std, size=shape).astype(dtype)
            for name, shape in _mha_param_shapes(cfg).items()}


def _check_mha_inputs(x: np.ndarray, p: dict, cfg) -> None:
    check_float("x", x, ndim=3)
    if x.shape[2] != cfg.dim:
        raise ValueError(f"x: last dimension {x.shape[2]} does not match cfg.dim = {cfg.dim}")
    missing = [n for n in MHA_PARAM_NAMES if n not in p]
    if missing:
        raise ValueError(f"p: missing baseline-attention weight(s) {missing}; "
                         f"expected keys {list(MHA_PARAM_NAMES)}")
    for name, shape in _mha_param_shapes(cfg).items():
        check_float(f"p[{name!r}]", p[name], ndim=2)
        check_shape(f"p[{name!r}]", p[name], shape)
    check_same_dtype(("x",) + tuple(f"p[{n!r}]" for n in MHA_PARAM_NAMES),
                     x, *(p[n] for n in MHA_PARAM_NAMES))


def _project_qkv(x: np.ndarray, p: dict, cfg, cos: np.ndarray, sin: np.ndarray):
    """Steps 1-2: x [B,T,D] -> rotated q [B,T,H,Dn+Dr], rotated k [B,T,Hkv,Dn+Dr], v [B,T,Hkv,Dv]."""
    H, Hkv, Dn, Dr, Dv = _mha_dims(cfg)
    B, T, _ = x.shape
    # 1. projections, split into heads
    q = (x @ p["wq"].T).reshape(B, T, H, Dn + Dr)                    # [B, T, H, Dn+Dr]
    k = (x @ p["wk"].T).reshape(B, T, Hkv, Dn + Dr)                  # [B, T, Hkv, Dn+Dr]
    v = (x @ p["wv"].T).reshape(B, T, Hkv, Dv)                       # [B, T, Hkv, Dv]
    # 2. RoPE on the last Dr values of every query and key head (the first Dn stay as they are)
    q[..., Dn:] = rope_forward(q[..., Dn:], cos, sin)
    k[..., Dn:] = rope_forward(k[..., Dn:], cos, sin)
    return q, k, v


class MHACache(NamedTuple):
    x: np.ndarray        # [B, T, D]       block input
    cos: np.ndarray      # [T, Dr/2]       RoPE angles of positions start_pos..start_pos+T-1
    sin: np.ndarray      # [T, Dr/2]
    attn: SDPACache      # the attention core's cache (rotated q, k, v, weights p)
    o: np.ndarray        # [B, T, H*Dv]    attention output, heads flattened (input of wo)
    p: dict              # the weights {"wq", "wk", "wv", "wo"} (references, not copies)
    dims: tuple          # (H, Hkv, Dn, Dr, Dv)


def mha_forward(x: np.ndarray, p: dict, cfg, start_pos: int = 0):
    """x [B, T, D], p {wq, wk, wv, wo} -> y [B, T, D], cache.  Steps 1-4 above.

    Causal self-attention over the T tokens of x, which sit at absolute positions
    start_pos..start_pos+T-1 (start_pos only moves the RoPE angles; use mha_decode to attend
    to earlier tokens through a KVCache). Hkv = cfg.kv_heads gives MHA, GQA or MQA.
    """
    _check_mha_inputs(x, p, cfg)
    if not isinstance(start_pos, (int, np.integer)) or start_pos < 0:
        raise ValueError(f"start_pos: {start_pos!r} must be a non-negative integer")
    B, T, _ = x.shape
    if start_pos + T > cfg.max_seq_len:
        raise ValueError(f"start_pos + T = {start_pos} + {T} exceeds cfg.max_seq_len = "
                         f"{cfg.max_seq_len}")
    H, Hkv, Dn, Dr, Dv = _mha_dims(cfg)
    cos, sin = rope_angles(cfg, start_pos + np.arange(T), x.dtype)   # [T, Dr/2] each
    # 1-2. projections and RoPE
    q, k, v = _project_qkv(x, p, cfg, cos, sin)
    # 3. causal attention; kv head j serves query heads j*H/Hkv .. (j+1)*H/Hkv - 1
    o, attn = sdpa_forward(q, k, v, softmax_scale(cfg), causal=True, q_offset=0)  # [B, T, H, Dv]
    o = o.reshape(B, T, H * Dv)                                      # [B, T, H*Dv]
    # 4. output projection
    y = o @ p["wo"].T                                                # [B, T, D]
    return y, MHACache(x, cos, sin, attn, o, p, (H, Hkv, Dn, Dr, Dv))


def mha_backward(dy: np.ndarray, cache: MHACache):
    """dy [B, T, D] -> dx [B, T, D], grads {wq, wk, wv, wo} (same shapes as the weights)."""
    x, cos, sin, attn, o, p, (H, Hkv, Dn, Dr, Dv) = cache
    B, T, D = x.shape
    check_shape("dy", dy, (B, T, D))
    x2 = x.reshape(B * T, D)                                         # [N, D]
    # 4. forward: y = o @ wo.T
    dwo = dy.reshape(B * T, D).T @ o.reshape(B * T, H * Dv)          # [D, H*Dv]
    do = (dy @ p["wo"]).reshape(B, T, H, Dv)                         # [B, T, H, Dv]
    # 3. forward: o = causal_sdpa(q, k, v)
    dq, dk, dv = sdpa_backward(do, attn)                             # [B,T,H,Dn+Dr], [B,T,Hkv,Dn+Dr], [B,T,Hkv,Dv]
    # 2. forward: q[..., Dn:] = rope(q[..., Dn:]);  k[..., Dn:] = rope(k[..., Dn:])
    dq[..., Dn:] = rope_backward(dq[..., Dn:], cos, sin)
    dk[..., Dn:] = rope_backward(dk[..., Dn:], cos, sin)
    dq2 = dq.reshape(B * T, H * (Dn + Dr))                           # [N, H*(Dn+Dr)]
    dk2 = dk.reshape(B * T, Hkv * (Dn + Dr))                         # [N, Hkv*(Dn+Dr)]
    dv2 = dv.reshape(B * T, Hkv * Dv)                                # [N, Hkv*Dv]
    # 1. forward: q = x @ wq.T ; k = x @ wk.T ; v = x @ wv.T   (x feeds three branches: add)
    dwq = dq2.T @ x2                                                 # [H*(Dn+Dr), D]
    dwk = dk2.T @ x2                                                 # [Hkv*(Dn+Dr), D]
    dwv = dv2.T @ x2                                                 # [Hkv*Dv, D]
    dx = (dq2 @ p["wq"] + dk2 @ p["wk"] + dv2 @ p["wv"]).reshape(B, T, D)   # [B, T, D]
    return dx, {"wq": dwq, "wk": dwk, "wv": dwv, "wo": dwo}


class DecodeCache:
    """Preallocated per-token arrays [B, max_seq_len, ...] of one attention layer, filled up to `length`.

    A subclass names its two arrays in ARRAYS and gives their trailing shapes in `trailing(cfg)`.
    `length` is the position of the next token; setting it back (the rollback of speculative
    decoding) forgets the tokens after it, whose rows the next call overwrites.
    """
    ARRAYS: tuple = ()

    def __init__(self, cfg, batch: int, dtype=np.float64):
        if not isinstance(batch, (int, np.integer)) or isinstance(batch, bool) or batch < 1:
            raise ValueError(f"batch: {batch!r} must be a positive integer")
        dtype = np.dtype(dtype)
        if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise TypeError(f"dtype: {dtype} is not supported; use float32 or float64")
        self.batch, self.dtype, self.max_seq_len = int(batch), dtype, cfg.max_seq_len
        for name, tail in zip(self.ARRAYS, self.trailing(cfg)):
            setattr(self, name, np.zeros((self.batch, cfg.max_seq_len) + tail, dtype=dtype))
        self.length = 0

    def trailing(self, cfg) -> tuple:
        """The per-token shape of each array in ARRAYS, for this config."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget every stored token (the arrays are reused)."""
        self.length = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the filled part (length tokens); the allocation is the arrays' nbytes."""
        return sum(getattr(self, n)[:, :self.length].nbytes for n in self.ARRAYS)

    def _shape_ok(self, cfg) -> bool:
        """Whether this cache was built for cfg's shapes."""
        return all(getattr(self, n).shape[2:] == t for n, t in zip(self.ARRAYS, self.trailing(cfg)))

    def __repr__(self) -> str:
        arrays = ", ".join(f"{n}={list(getattr(self, n).shape)}" for n in self.ARRAYS)
        return (f"{type(self).__name__}(batch={self.batch}, length={self.length}/"
                f"{self.max_seq_len}, {arrays}, dtype={self.dtype})")


class KVCache(DecodeCache):
    """Inference cache of the baseline block: rotated keys and values of every kv head.

        k [B, max_seq_len, Hkv, Dn+Dr]   keys after RoPE (positions 0..length-1 are filled)
        v [B, max_seq_len, Hkv, Dv]
        length                           tokens stored so far (the next token's position)

    Per token and layer it holds Hkv*(Dn+Dr+Dv) numbers, against MLA's Dc+Dr (LatentKVCache).
    """
    ARRAYS = ("k", "v")

    def trailing(self, cfg) -> tuple:
        H, Hkv, Dn, Dr, Dv = _mha_dims(cfg)
        return (Hkv, Dn + Dr), (Hkv, Dv)


def mha_decode(x: np.ndarray, p: dict, cfg, cache: KVCache) -> np.ndarray:
    """x [B, T, D] -> y [B, T, D]: append T tokens at positions cache.length.. and attend causally.

    Prefill (T > 1) or one decoding step (T = 1). Equal to the matching rows of mha_forward over
    the whole sequence (tests check it). Advances cache.length by T.
    """
    _check_mha_inputs(x, p, cfg)
    if not isinstance(cache, KVCache):
        raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
    B, T, _ = x.shape
    if B != cache.batch:
        raise ValueError(f"x: batch {B} does not match the cache's batch {cache.batch}")
    if x.dtype != cache.dtype:
        raise TypeError(f"x: dtype {x.dtype} does not match the cache's dtype {cache.dtype}")
    start, end = cache.length, cache.length + T
    if end > cache.max_seq_len:
        raise ValueError(f"decoding {T} token(s) at position {start} would pass max_seq_len = "
                         f"{cache.max_seq_len} (the KV cache holds at most that many tokens)")
    H, Hkv, Dn, Dr, Dv = _mha_dims(cfg)
    cos, sin = rope_angles(cfg, np.arange(start, end), x.dtype)      # [T, Dr/2] each
    # 1-2. projections and RoPE of the new tokens
    q, k, v = _project_qkv(x, p, cfg, cos, sin)
    # store the new keys and values
    cache.k[:, start:end] = k                                        # [B, T, Hkv, Dn+Dr]
    cache.v[:, start:end] = v                                        # [B, T, Hkv, Dv]
    # 3. the new queries attend to every stored token up to their own position
    o, _ = sdpa_forward(q, cache.k[:, :end], cache.v[:, :end], softmax_scale(cfg), causal=True,
                        q_offset=start)                              # [B, T, H, Dv]
    cache.length = end
    # 4. output projection
    return o.reshape(B, T, H * Dv) @ p["wo"].T                       # [B, T, D]

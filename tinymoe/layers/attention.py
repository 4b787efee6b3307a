"""Causal scaled-dot-product attention with grouped key/value heads (MHA, GQA, MQA).

    scores[b,h,t,s] = scale * q[b,t,h] . k[b,s,h // (H/Hkv)]
    scores[b,h,t,s] = -inf                 where key s is in the future of query t
    p = softmax_s(scores);  o[b,t,h] = sum_s p[b,h,t,s] v[b,s,h // (H/Hkv)]

MHA has Hkv = H, GQA 1 < Hkv < H, MQA Hkv = 1 (Shazeer 2019; Ainslie et al. 2023). This is the
baseline MLA is measured against, and MLA's own training path (reference/deepseek.md section 5)
calls `sdpa_forward` with per-head keys built from its latent. Queries may sit after a cache:
query t is at absolute position q_offset + t and keys are at 0..S-1, so key s is visible to query t
iff s <= q_offset + t. Shape letters: B batch, T queries, S keys, H query heads, Hkv key/value
heads, Dk query/key width, Dv value width.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from tinymoe.checks import check_float, check_same_dtype
from tinymoe.layers.basic import softmax_backward, softmax_forward


class SDPACache(NamedTuple):
    q: np.ndarray    # [B, H, T, Dk]   queries, heads first
    k: np.ndarray    # [B, H, S, Dk]   keys repeated to H heads
    v: np.ndarray    # [B, H, S, Dv]   values repeated to H heads
    p: np.ndarray    # [B, H, T, S]    attention weights (exact zeros where masked)
    scale: float     # softmax scale
    n_kv_heads: int  # Hkv, to sum the repeated heads' gradients back


def causal_mask(T: int, S: int, q_offset: Optional[int] = None) -> np.ndarray:
    """[T, S] bool, True where key s is visible to query t: s <= q_offset + t (default S - T)."""
    q_offset = S - T if q_offset is None else q_offset
    return np.arange(S)[None, :] <= (q_offset + np.arange(T))[:, None]


def sdpa_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                 causal: bool = True, q_offset: Optional[int] = None):
    """q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv] -> o [B, T, H, Dv].

    H must be a multiple of Hkv; query head h reads key/value head h // (H / Hkv).
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
    # 1. heads first; repeat each key/value head for the rep query heads that share it
    qh = q.transpose(0, 2, 1, 3)                                     # [B, H, T, Dk]
    kh = np.repeat(k.transpose(0, 2, 1, 3), rep, axis=1)             # [B, H, S, Dk]
    vh = np.repeat(v.transpose(0, 2, 1, 3), rep, axis=1)             # [B, H, S, Dv]
    # 2. scaled scores, future keys masked with -inf
    s = (qh @ kh.transpose(0, 1, 3, 2)) * scale                      # [B, H, T, S]
    if causal:
        s = np.where(causal_mask(T, S, q_offset), s, -np.inf)
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
    doh = do.transpose(0, 2, 1, 3)                                   # [B, H, T, Dv]
    # 4. forward: o = p @ v
    dp = doh @ vh.transpose(0, 1, 3, 2)                              # [B, H, T, S]
    dvh = p.transpose(0, 1, 3, 2) @ doh                              # [B, H, S, Dv]
    # 3. forward: p = softmax(s)   (masked entries have p = 0, so they get ds = 0)
    ds = softmax_backward(dp, p) * scale                             # [B, H, T, S]
    # 2. forward: s = q @ k^T * scale
    dqh = ds @ kh                                                    # [B, H, T, Dk]
    dkh = ds.transpose(0, 1, 3, 2) @ qh                              # [B, H, S, Dk]
    # 1. forward: repeat kv heads; heads first
    rep = H // Hkv
    dk = dkh.reshape(B, Hkv, rep, S, Dk).sum(axis=2).transpose(0, 2, 1, 3)            # [B, S, Hkv, Dk]
    dv = dvh.reshape(B, Hkv, rep, S, dvh.shape[-1]).sum(axis=2).transpose(0, 2, 1, 3)  # [B, S, Hkv, Dv]
    dq = dqh.transpose(0, 2, 1, 3)                                   # [B, T, H, Dk]
    return np.ascontiguousarray(dq), np.ascontiguousarray(dk), np.ascontiguousarray(dv)

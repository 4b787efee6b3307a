"""Fused causal softmax and its backward for attention, around the same BLAS matrix products.

The plain `sdpa_forward` / `sdpa_backward` (tinymoe/layers/attention.py) add a -inf mask to the
score tensor [B, H, T, S] and run the softmax as five NumPy passes over it (max, subtract, exp,
sum, divide); the backward makes four more (product, row sum, subtract, multiply, and two scale
multiplies). Here the matrix products stay in BLAS and each of those chains is ONE pass per
row of scores, in place, touching only the visible keys s < n_t = min(S, q_offset + t + 1)
(all S when not causal):

    forward   p[t, s] = exp(z[t, s] - max_s' z[t, s']) / sum_s' exp(...)   s < n_t, else exactly 0
    backward  ds[t, s] = scale * p[t, s] (dp[t, s] - sum_s' dp[t, s'] p[t, s'])

with z = (scale q) k^T and dp = do v^T. Rows are independent tasks (`prange`), each computed by one
thread in a fixed order, so the result does not depend on the thread count. The NumPy twins are
the same formulas on whole arrays, written with the mask of tinymoe.layers.attention.causal_mask.
"""
from __future__ import annotations

import numpy as np

from tinymoe.kernels import get, register
from tinymoe.kernels._math import exp_nonpositive, row_max, row_sum

prange = range            # numba.prange once a kernel is compiled (tinymoe.kernels.get)


# ------------------------------------------------------------------------------------------------
# forward: causal softmax over the last axis, in place
# ------------------------------------------------------------------------------------------------

def _causal_softmax_numpy(z, q_offset, causal):
    """z [B, H, T, S] scores -> p [B, H, T, S] (in place): softmax over the visible keys."""
    from tinymoe.layers.attention import causal_mask
    from tinymoe.layers.basic import softmax_forward
    if causal:
        z[..., ~causal_mask(z.shape[2], z.shape[3], q_offset)] = -np.inf
    z[...] = softmax_forward(z)[0]
    return z


def _causal_softmax_loops(z, q_offset, causal):
    B, H, T, S = z.shape
    rows = z.reshape(B * H * T, S)
    for r in prange(B * H * T):                       # every row of scores on its own
        t = r % T
        n = min(S, q_offset + t + 1) if causal else S  # visible keys 0..n-1
        x = rows[r]
        m = row_max(x, n)
        for s in range(n):
            x[s] = exp_nonpositive(x[s] - m)
        inv = 1.0 / row_sum(x, n)
        for s in range(S):                            # normalise; masked keys: exactly 0
            x[s] = x[s] * inv if s < n else 0.0
    return z


register("causal_softmax", _causal_softmax_numpy, _causal_softmax_loops, parallel=True)


# ------------------------------------------------------------------------------------------------
# backward: ds = scale * p * (dp - rowsum(dp * p)), in place in dp
# ------------------------------------------------------------------------------------------------

def _softmax_scores_backward_numpy(dp, p, scale):
    """dp [B, H, T, S], p [B, H, T, S] -> ds (in dp's buffer) = scale * softmax_backward(dp, p)."""
    from tinymoe.layers.basic import softmax_backward
    dp[...] = softmax_backward(dp, p) * scale
    return dp


def _softmax_scores_backward_loops(dp, p, scale):
    # BEGIN EXERCISE attention-backward
    S = dp.shape[-1]
    R = dp.size // S
    g, pr = dp.reshape(R, S), p.reshape(R, S)
    for r in prange(R):
        x, pp = g[r], pr[r]
        c = 0.0                                       # sum_s dp[s] p[s], 16 partial sums
        acc = np.zeros(16)
        nb = S - S % 16
        for s0 in range(0, nb, 16):
            for j in range(16):
                acc[j] += x[s0 + j] * pp[s0 + j]
        for j in range(16):
            c += acc[j]
        for s in range(nb, S):
            c += x[s] * pp[s]
        for s in range(S):                            # masked keys have p = 0, so ds = 0
            x[s] = scale * pp[s] * (x[s] - c)
    return dp
    # END EXERCISE


register("softmax_scores_backward", _softmax_scores_backward_numpy,
         _softmax_scores_backward_loops, parallel=True)


# ------------------------------------------------------------------------------------------------
# drop-in replacements for sdpa_forward / sdpa_backward (same arguments, same cache)
# ------------------------------------------------------------------------------------------------

def sdpa_forward_fused(q, k, v, scale, causal=True, q_offset=None):
    """q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv] -> o [B, T, H, Dv], SDPACache.

    sdpa_forward with the causal softmax fused into one pass (float32 under the numba backend;
    any other dtype or TINYMOE_BACKEND=numpy runs the plain function). Same steps, same cache,
    so either backward consumes it.
    """
    from tinymoe.kernels import fused
    from tinymoe.layers.attention import SDPACache, sdpa_forward
    if not all(isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 4
               for a in (q, k, v)) or not fused(q.size // q.shape[3] * k.shape[1]) \
            or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] \
            or v.shape[:3] != k.shape[:3] or k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        return sdpa_forward(q, k, v, scale, causal=causal, q_offset=q_offset)  # or its error
    B, T, H, Dk = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    q_offset = S - T if q_offset is None else q_offset
    if causal and q_offset < 0:
        return sdpa_forward(q, k, v, scale, causal=causal, q_offset=q_offset)  # its error
    scale, rep = float(scale), H // Hkv
    # 1. heads first, kv heads repeated (as the plain forward), copied contiguous: BLAS multiplies
    #    the strided views about half as fast, and the backward reuses the copies
    qh, kh, vh = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)) for a in (q, k, v))
    if rep > 1:
        kh, vh = np.repeat(kh, rep, axis=1), np.repeat(vh, rep, axis=1)
    # 2-3. scores, then mask + softmax in one pass
    z = (qh * scale) @ kh.transpose(0, 1, 3, 2)                      # [B, H, T, S]
    p = get("causal_softmax", "numba", z.size)(z, int(q_offset), bool(causal))   # [B, H, T, S]
    # 4. weighted sum of values
    o = np.ascontiguousarray((p @ vh).transpose(0, 2, 1, 3))         # [B, T, H, Dv]
    return o, SDPACache(qh, kh, vh, p, scale, Hkv)


def sdpa_backward_fused(do, cache):
    """do [B, T, H, Dv] -> dq, dk [B, S, Hkv, Dk], dv: sdpa_backward with the softmax backward
    and both scale multiplications fused into one pass (float32, numba backend)."""
    from tinymoe.kernels import fused
    from tinymoe.layers.attention import sdpa_backward
    qh, kh, vh, p, scale, Hkv = cache
    B, H, T, Dk = qh.shape
    if not fused(p.size) or qh.dtype != np.float32 or not isinstance(do, np.ndarray) \
            or do.dtype != qh.dtype or do.shape != (B, T, H, vh.shape[-1]) \
            or not p.flags.c_contiguous:
        return sdpa_backward(do, cache)
    # BEGIN EXERCISE attention-backward
    S = kh.shape[2]
    doh = do.transpose(0, 2, 1, 3)                                   # [B, H, T, Dv]
    # 4. forward: o = p @ v
    dp = doh @ vh.transpose(0, 1, 3, 2)                              # [B, H, T, S]
    dvh = p.transpose(0, 1, 3, 2) @ doh                              # [B, H, S, Dv]
    # 3-2. forward: p = softmax(s), s = (q * scale) @ k^T: ds = scale * p * (dp - rowsum(dp p))
    ds = get("softmax_scores_backward", "numba", dp.size)(dp, p, np.float32(scale))
    dqh = ds @ kh                                                    # [B, H, T, Dk]
    dkh = ds.transpose(0, 1, 3, 2) @ qh                              # [B, H, S, Dk]
    # 1. forward: repeat kv heads; heads first
    rep = H // Hkv
    dk = dkh.reshape(B, Hkv, rep, S, Dk).sum(axis=2).transpose(0, 2, 1, 3)
    dv = dvh.reshape(B, Hkv, rep, S, -1).sum(axis=2).transpose(0, 2, 1, 3)
    return (np.ascontiguousarray(dqh.transpose(0, 2, 1, 3)), np.ascontiguousarray(dk),
            np.ascontiguousarray(dv))
    # END EXERCISE

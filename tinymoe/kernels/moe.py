"""MoE dispatch and combine: group (token, slot) assignments by expert, gather, weighted scatter-add.

A token t routed to K experts makes K assignments a = t*K + k (flat index into indices [N, K]).
The MoE layer (tinymoe/layers/moe.py) runs every expert on one contiguous block of rows, so the
assignments are first grouped by expert with a counting sort (stable: inside an expert's block the
assignments keep their flat order a, i.e. ascending token):

    order   [M]    flat assignment ids a, sorted by expert     (M = kept assignments, <= N*K)
    pos     [N*K]  inverse permutation: pos[order[m]] = m; -1 for an assignment dropped by capacity
    offsets [E+1]  expert e owns rows offsets[e]:offsets[e+1] of the sorted block

then
    dispatch (gather):        xs[m]  = x[order[m] // K]                      [M, D]
    combine (scatter-add):    y[t]   = sum_k w[t,k] * ys[pos[t*K+k]]         [N, D] (kept slots)
    combine backward:         dys[m] = w_s[m] * dy[t_m],  dw_s[m] = <dy[t_m], ys[m]>
    dispatch backward:        dx[t]  = sum_k dxs[pos[t*K+k]]                 (= combine with w = 1)

Each pair below is a NumPy twin (vectorised reference) and a loop body that numba jits lazily.
Both combine versions add the K slots of a token in the order k = 0..K-1, so they agree up to
round-off of the final sum (in practice bitwise). The integer outputs of the sort are identical.
"""
from __future__ import annotations

import numpy as np

from tinymoe.kernels import get, register


# ------------------------------------------------------------------------------------------------
# 1. counting sort of assignments by expert
# ------------------------------------------------------------------------------------------------

def moe_sort_numpy(idx_flat: np.ndarray, keep_flat: np.ndarray, n_experts: int):
    """[A] int64 expert ids, [A] bool kept, E -> order [M] int64, pos [A] int64, offsets [E+1] int64."""
    # BEGIN EXERCISE moe-dispatch
    kept = np.nonzero(keep_flat)[0]                               # [M] assignment ids, ascending
    e = idx_flat[kept]                                            # [M] their experts
    order = kept[np.argsort(e, kind="stable")]                    # [M] grouped by expert, stable
    counts = np.bincount(e, minlength=n_experts)                  # [E]
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(counts)                               # [E+1]
    pos = np.full(idx_flat.shape[0], -1, dtype=np.int64)          # [A]
    pos[order] = np.arange(order.shape[0], dtype=np.int64)
    return order, pos, offsets
    # END EXERCISE


def _moe_sort_loops(idx_flat, keep_flat, n_experts):
    # BEGIN EXERCISE moe-dispatch
    A = idx_flat.shape[0]
    offsets = np.zeros(n_experts + 1, dtype=np.int64)
    for a in range(A):                        # pass 1: count the kept assignments of each expert
        if keep_flat[a]:
            offsets[idx_flat[a] + 1] += 1
    for e in range(n_experts):                # prefix sum: start row of each expert's block
        offsets[e + 1] += offsets[e]
    fill = offsets[:n_experts].copy()         # next free row of each block
    order = np.empty(offsets[n_experts], dtype=np.int64)
    pos = np.full(A, -1, dtype=np.int64)
    for a in range(A):                        # pass 2: place each assignment (stable)
        if keep_flat[a]:
            e = idx_flat[a]
            order[fill[e]] = a
            pos[a] = fill[e]
            fill[e] += 1
    return order, pos, offsets
    # END EXERCISE


register("moe_sort", moe_sort_numpy, _moe_sort_loops)


# ------------------------------------------------------------------------------------------------
# 2. dispatch: gather token rows into expert order
# ------------------------------------------------------------------------------------------------

def moe_gather_numpy(x: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """[N, D], [M] int64 token of each sorted row -> xs [M, D]:  xs[m] = x[tok[m]]."""
    return x[tok]


def _moe_gather_loops(x, tok):
    M, D = tok.shape[0], x.shape[1]
    xs = np.empty((M, D), dtype=x.dtype)
    for m in range(M):                        # one sorted row per assignment
        t = tok[m]
        for d in range(D):
            xs[m, d] = x[t, d]
    return xs


register("moe_gather", moe_gather_numpy, _moe_gather_loops)


# ------------------------------------------------------------------------------------------------
# 3. combine: weighted scatter-add back to tokens (also the dispatch backward, with w = 1)
# ------------------------------------------------------------------------------------------------

def moe_combine_numpy(ys: np.ndarray, w_s: np.ndarray, pos: np.ndarray, n_tokens: int,
                      k: int) -> np.ndarray:
    """[M, D], [M], [N*K] int64, N, K -> y [N, D]:  y[t] = sum_k w_s[p] ys[p], p = pos[t*K+k] >= 0.

    Vectorised without np.add.at: every assignment has its own row of an [N*K, D] buffer (dropped
    ones stay zero), then the K slots of each token are summed in order k = 0..K-1.
    """
    # BEGIN EXERCISE moe-dispatch
    D = ys.shape[1]
    buf = np.zeros((n_tokens * k, D), dtype=ys.dtype)             # [N*K, D]
    kept = pos >= 0
    buf[kept] = ys[pos[kept]] * w_s[pos[kept], None]
    out = buf[0::k].copy()                                        # [N, D]  slot 0
    for j in range(1, k):                                         # K is small: slots 1..K-1 in order
        out += buf[j::k]
    return out
    # END EXERCISE


def _moe_combine_loops(ys, w_s, pos, n_tokens, k):
    # BEGIN EXERCISE moe-dispatch
    D = ys.shape[1]
    out = np.zeros((n_tokens, D), dtype=ys.dtype)
    for t in range(n_tokens):                 # every token ...
        for j in range(k):                    # ... adds its K weighted expert outputs in slot order
            p = pos[t * k + j]
            if p >= 0:                        # -1: dropped by capacity, contributes nothing
                w = w_s[p]
                for d in range(D):
                    out[t, d] += w * ys[p, d]
    return out
    # END EXERCISE


register("moe_combine", moe_combine_numpy, _moe_combine_loops)


# ------------------------------------------------------------------------------------------------
# 4. combine backward: gradients of the sorted expert outputs and of the gate weights
# ------------------------------------------------------------------------------------------------

def moe_combine_backward_numpy(dy: np.ndarray, ys: np.ndarray, w_s: np.ndarray, tok: np.ndarray):
    """[N, D], [M, D], [M], [M] -> dys [M, D], dw_s [M]:  dys = w_s * dy[tok], dw_s = <dy[tok], ys>."""
    g = dy[tok]                                                   # [M, D]
    return g * w_s[:, None], np.einsum("md,md->m", g, ys)


def _moe_combine_backward_loops(dy, ys, w_s, tok):
    M, D = ys.shape
    dys = np.empty((M, D), dtype=ys.dtype)
    dw_s = np.zeros(M, dtype=ys.dtype)
    for m in range(M):                        # each sorted row reads the gradient of its token
        t = tok[m]
        acc = 0.0
        for d in range(D):
            dys[m, d] = w_s[m] * dy[t, d]
            acc += dy[t, d] * ys[m, d]
        dw_s[m] = acc
    return dys, dw_s


register("moe_combine_backward", moe_combine_backward_numpy, _moe_combine_backward_loops)


# ------------------------------------------------------------------------------------------------
# wrappers with the active backend (TINYMOE_BACKEND)
# ------------------------------------------------------------------------------------------------

def moe_sort(idx_flat, keep_flat, n_experts: int):
    """See moe_sort_numpy."""
    return get("moe_sort")(np.ascontiguousarray(idx_flat, dtype=np.int64),
                           np.ascontiguousarray(keep_flat, dtype=np.bool_), int(n_experts))


def moe_gather(x, tok):
    """See moe_gather_numpy."""
    return get("moe_gather")(np.ascontiguousarray(x), np.ascontiguousarray(tok, dtype=np.int64))


def moe_combine(ys, w_s, pos, n_tokens: int, k: int):
    """See moe_combine_numpy."""
    return get("moe_combine")(np.ascontiguousarray(ys), np.ascontiguousarray(w_s, dtype=ys.dtype),
                              np.ascontiguousarray(pos, dtype=np.int64), int(n_tokens), int(k))


def moe_combine_backward(dy, ys, w_s, tok):
    """See moe_combine_backward_numpy."""
    return get("moe_combine_backward")(np.ascontiguousarray(dy, dtype=ys.dtype),
                                       np.ascontiguousarray(ys),
                                       np.ascontiguousarray(w_s, dtype=ys.dtype),
                                       np.ascontiguousarray(tok, dtype=np.int64))

"""DeepSeekMoE layer: shared experts + fine-grained routed SwiGLU experts, dispatch and combine.

    y_t = Shared(u_t) + sum_{k<K} w_{t,k} Expert_{idx_{t,k}}(u_t)           (V3 eq. 12)

DeepSeekMoE 3.1 (fine-grained segmentation: E narrow experts of width F = moe_inter_dim, K of
them active per token), 3.2 (shared-expert isolation: the n_shared_experts always-on experts are
fused into ONE SwiGLU of width Fs = n_shared_experts * F, unweighted), 3.3 (balance losses);
V2 2.2, V3 2.1.2 (reference/deepseek.md sections 7, 8, 11). Every expert is the SwiGLU of
basic.swiglu_forward; the gate weight multiplies the expert OUTPUT (after W2). Routing and the
balance losses are in tinymoe/layers/router.py.

Forward steps (A = N*K assignments, M <= A kept after capacity):
    1. route:      w [N, K], idx [N, K] = router(u)                         (router.py)
    2. capacity:   keep [N, K] (all True when dropless, cfg.capacity_factor None)
    3. dispatch:   counting sort of the kept assignments by expert -> order [M], pos [A],
                   offsets [E+1]; gather xs = u[tok] [M, D], tok = order // K  (kernels/moe.py)
    4. experts:    ys[block_e] = SwiGLU_e(xs[block_e]), one BLAS call per matrix per expert
    5. combine:    y_r[t] = sum_k w[t,k] ys[pos[t*K+k]]   (weighted scatter-add, kernels/moe.py)
    6. shared:     y = y_r + SwiGLU_shared(u)
    7. aux loss:   alpha1 L_ExpBal + alpha_seq L_SeqBal + alpha_z L_z  (router.py; 0 terms skipped)

Capacity (optional, Switch/GShard-style; V3 itself is dropless): C = ceil(cf * N * K / E). When
an expert gets more than C assignments, it keeps them in this deterministic order: first all
first choices (slot k = 0) in token order, then all second choices (k = 1) in token order, and so
on; the rest are dropped (that slot contributes nothing; the token still gets its shared expert
and its other slots). The number of dropped assignments is returned in cache.dropped and the
kept loads in cache.load; nothing is dropped silently.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import numpy as np

from tinymoe.checks import check_float, check_same_dtype, check_shape
from tinymoe.kernels.experts import (ExpertsCache, experts_backward_batched,
                                     experts_forward_batched, use_batched)
from tinymoe.kernels.moe import moe_combine, moe_combine_backward, moe_gather, moe_sort
from tinymoe.layers.basic import swiglu_backward, swiglu_forward
# The fused twins of the experts' SwiGLU (tinymoe/kernels/swiglu.py): same arguments, same caches,
# and the plain functions above for float64 or under TINYMOE_BACKEND=numpy.
from tinymoe.kernels.swiglu import swiglu_backward_fused as swiglu_backward  # noqa: E402,F811
from tinymoe.kernels.swiglu import swiglu_forward_fused as swiglu_forward  # noqa: E402,F811
from tinymoe.layers.router import (RouterCache, expert_balance_backward, expert_balance_forward,
                                   router_backward, router_forward, seq_balance_backward,
                                   seq_balance_forward, update_bias, z_loss_backward,
                                   z_loss_forward)

__all__ = ["init_moe_params", "moe_forward", "moe_backward", "update_bias", "capacity_keep",
           "MoECache"]


# ================================================================================================
# parameters
# ================================================================================================

def init_moe_params(cfg, rng: np.random.Generator, dtype=np.float32) -> dict:
    """cfg, rng, dtype -> LOCAL param dict of one MoE layer (keys as in contracts.md).

    gate [E, D], experts.w1 [E, F, D], experts.w2 [E, D, F], experts.w3 [E, F, D],
    shared.w1 [Fs, D], shared.w2 [D, Fs], shared.w3 [Fs, D] (absent when n_shared_experts == 0);
    every entry ~ N(0, cfg.init_std^2).
    """
    E, D, F = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
    Fs = cfg.n_shared_experts * F
    std = cfg.init_std

    def normal(*shape):
        return (rng.standard_normal(shape) * std).astype(dtype)

    p = {"gate": normal(E, D),
         "experts.w1": normal(E, F, D), "experts.w2": normal(E, D, F), "experts.w3": normal(E, F, D)}
    if Fs:
        p["shared.w1"] = normal(Fs, D)
        p["shared.w2"] = normal(D, Fs)
        p["shared.w3"] = normal(Fs, D)
    return p


# ================================================================================================
# capacity
# ================================================================================================

def capacity_keep(indices: np.ndarray, n_experts: int, capacity: int) -> np.ndarray:
    """indices [N, K], E, C -> keep [N, K] bool: each expert keeps at most C assignments.

    Priority (deterministic): slot k ascending first, then token t ascending; i.e. all first
    choices before any second choice. Vectorised: a stable sort of the k-major assignment list
    by expert gives each assignment its rank inside its expert; keep rank < C.
    """
    N, K = indices.shape
    e_km = indices.T.reshape(-1)                                      # [K*N] k-major (k, t) order
    order = np.argsort(e_km, kind="stable")                           # grouped by expert
    counts = np.bincount(e_km, minlength=n_experts)                   # [E]
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))            # [E]
    rank = np.empty(K * N, dtype=np.int64)
    rank[order] = np.arange(K * N) - starts[e_km[order]]              # rank inside its expert
    return (rank < capacity).reshape(K, N).T.copy()                   # [N, K]


# ================================================================================================
# forward / backward
# ================================================================================================

class MoECache(NamedTuple):
    x: np.ndarray                    # [N, D]  layer input u
    router: RouterCache              #         router forward cache
    indices: np.ndarray              # [N, K]  int64 routed experts, best first (before capacity)
    weights: np.ndarray              # [N, K]  gate weights
    scores: np.ndarray               # [N, E]  unbiased affinities s
    keep: np.ndarray                 # [N, K]  bool, assignment kept after capacity
    order: np.ndarray                # [M]     flat assignment ids t*K+k sorted by expert
    pos: np.ndarray                  # [N*K]   row of each assignment in the sorted block, -1 dropped
    offsets: np.ndarray              # [E+1]   expert e owns sorted rows offsets[e]:offsets[e+1]
    tok: np.ndarray                  # [M]     token of each sorted row (order // K)
    w_s: np.ndarray                  # [M]     gate weight of each sorted row
    ys: np.ndarray                   # [M, D]  expert outputs (before the gate weight)
    experts: object                  #         E SwiGLUCache (None: no tokens) or one ExpertsCache
    shared: Optional[object]         #         SwiGLUCache of the shared expert (None if absent)
    load: np.ndarray                 # [E]     int64 assignments kept per expert
    dropped: int                     #         assignments dropped by capacity
    capacity: Optional[int]          #         C, None when dropless
    aux: dict                        #         {name: (alpha, loss value, loss cache)} enabled terms
    param_shapes: dict               #         {key: shape} of p (for the zero gradients)
    param_dtype: np.dtype


def _check_params(x: np.ndarray, p: dict, bias: np.ndarray, cfg) -> None:
    N, D = x.shape
    E, F = cfg.n_routed_experts, cfg.moe_inter_dim
    Fs = cfg.n_shared_experts * F
    want = {"gate": (E, D), "experts.w1": (E, F, D), "experts.w2": (E, D, F),
            "experts.w3": (E, F, D)}
    if Fs:
        want.update({"shared.w1": (Fs, D), "shared.w2": (D, Fs), "shared.w3": (Fs, D)})
    if set(p) != set(want):
        raise ValueError(f"p: expected keys {sorted(want)}, got {sorted(p)}")
    for k, shape in want.items():
        check_float(f"p[{k!r}]", p[k])
        check_shape(f"p[{k!r}]", p[k], shape)
    check_same_dtype(["x"] + [f"p[{k!r}]" for k in want], x, *[p[k] for k in want])
    check_shape("bias", bias, (E,))


def moe_forward(x: np.ndarray, p: dict, bias: np.ndarray, cfg, seq_len: int):
    """x [N, D], p (local params), bias [E], cfg, seq_len -> y [N, D], aux_loss float, MoECache.

    Rows of x are B = N / seq_len sequences of seq_len tokens (for the sequence-wise loss).
    """
    check_float("x", x, ndim=2)
    _check_params(x, p, bias, cfg)
    N, D = x.shape
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    if not isinstance(seq_len, (int, np.integer)) or seq_len <= 0 or N % seq_len:
        raise ValueError(f"seq_len = {seq_len!r}: must be a positive integer dividing the {N} "
                         f"rows of x (x holds B sequences of seq_len tokens)")
    # 1. route
    weights, indices, rcache = router_forward(x, p["gate"], bias, cfg)   # [N, K], [N, K]
    # 2. capacity
    capacity = None
    if cfg.capacity_factor is not None:
        capacity = int(math.ceil(cfg.capacity_factor * N * K / E))
        keep = capacity_keep(indices, E, capacity)                       # [N, K]
    else:
        keep = np.ones((N, K), dtype=bool)                               # [N, K]
    # 3. dispatch: group assignments by expert, gather the token rows
    order, pos, offsets = moe_sort(indices.reshape(-1), keep.reshape(-1), E)   # [M], [A], [E+1]
    tok = order // K                                                     # [M]
    w_s = weights.reshape(-1)[order]                                     # [M]
    xs = moe_gather(x, tok)                                              # [M, D]
    # 4. experts: one contiguous block each
    w1, w2, w3 = p["experts.w1"], p["experts.w2"], p["experts.w3"]
    if use_batched(xs, offsets, w1):         # many small experts: one padded stack (fused twin)
        ys, caches = experts_forward_batched(xs, offsets, w1, w2, w3)   # [M, D]
    else:
        ys = np.empty_like(xs)                                           # [M, D]
        caches = []
        for e in range(E):
            a, b = offsets[e], offsets[e + 1]
            if a == b:
                caches.append(None)                                      # no tokens: no work
                continue
            ys[a:b], c = swiglu_forward(xs[a:b], w1[e], w2[e], w3[e])    # [M_e, D]
            caches.append(c)
        caches = tuple(caches)
    # 5. combine: weighted scatter-add back to the tokens
    y = moe_combine(ys, w_s, pos, N, K)                                  # [N, D]
    # 6. shared expert (always on, weight 1)
    shared = None
    if "shared.w1" in p:
        ysh, shared = swiglu_forward(x, p["shared.w1"], p["shared.w2"], p["shared.w3"])
        y = y + ysh                                                      # [N, D]
    # 7. auxiliary losses (only the enabled ones are computed)
    aux = {}
    if cfg.aux_loss_alpha > 0:
        aux["expert"] = (cfg.aux_loss_alpha,) + expert_balance_forward(rcache.scores, indices)
    if cfg.seq_aux_loss_alpha > 0:
        aux["seq"] = (cfg.seq_aux_loss_alpha,) + seq_balance_forward(rcache.scores, indices,
                                                                     int(seq_len))
    if cfg.z_loss_alpha > 0:
        aux["z"] = (cfg.z_loss_alpha,) + z_loss_forward(rcache.logits)
    aux_loss = float(sum(alpha * val for alpha, val, _ in aux.values()))
    load = np.diff(offsets).astype(np.int64)                             # [E] kept per expert
    cache = MoECache(x, rcache, indices, weights, rcache.scores, keep, order, pos, offsets, tok,
                     w_s, ys, caches, shared, load, int(N * K - order.shape[0]), capacity,
                     aux, {k: v.shape for k, v in p.items()}, x.dtype)
    return y, aux_loss, cache


def moe_backward(dy: np.ndarray, cache: MoECache, daux: float = 1.0):
    """dy [N, D], cache, daux -> dx [N, D], grads {key: array} with exactly p's keys.

    daux is the upstream gradient of aux_loss (1.0 when the loss is simply added).
    """
    x = cache.x
    N, D = x.shape
    K = cache.indices.shape[1]
    check_shape("dy", dy, (N, D))
    dy = dy.astype(x.dtype, copy=False)
    grads = {}
    # 6. forward: y = y_r + SwiGLU_shared(x)
    dx = np.zeros_like(x)
    if cache.shared is not None:
        dx_sh, grads["shared.w1"], grads["shared.w2"], grads["shared.w3"] = \
            swiglu_backward(dy, cache.shared)
        dx = dx + dx_sh                                                  # [N, D]
    # 5. forward: y_r[t] = sum_k w[t,k] ys[pos[t*K+k]]
    dys, dw_s = moe_combine_backward(dy, cache.ys, cache.w_s, cache.tok)  # [M, D], [M]
    # 4. forward: ys[block_e] = SwiGLU_e(xs[block_e])   (an expert with no tokens: zero grads)
    if isinstance(cache.experts, ExpertsCache):                          # the padded stack
        dxs, dw1, dw2, dw3 = experts_backward_batched(dys, cache.experts)
    else:
        dxs = np.empty_like(dys)                                         # [M, D]
        dw1 = np.zeros(cache.param_shapes["experts.w1"], dtype=cache.param_dtype)
        dw2 = np.zeros(cache.param_shapes["experts.w2"], dtype=cache.param_dtype)
        dw3 = np.zeros(cache.param_shapes["experts.w3"], dtype=cache.param_dtype)
        offsets = cache.offsets
        for e, c in enumerate(cache.experts):
            if c is None:
                continue
            a, b = offsets[e], offsets[e + 1]
            dxs[a:b], dw1[e], dw2[e], dw3[e] = swiglu_backward(dys[a:b], c)
    grads["experts.w1"], grads["experts.w2"], grads["experts.w3"] = dw1, dw2, dw3
    # 3. forward: xs = x[tok]   (scatter-add back = the combine kernel with unit weights)
    dx = dx + moe_combine(dxs, np.ones(dxs.shape[0], dtype=dxs.dtype), cache.pos, N, K)
    # 3. forward: w_s = weights.flat[order]   (a dropped assignment gets no gradient)
    dweights = np.zeros(N * K, dtype=x.dtype)
    dweights[cache.order] = dw_s
    dweights = dweights.reshape(N, K)                                    # [N, K]
    # 7. forward: aux = sum alpha * L(scores or logits)
    dscores = dlogits = None
    for name, (alpha, _, c) in cache.aux.items():
        if name == "z":
            dlogits = z_loss_backward(daux * alpha, c)                   # [N, E]
        else:
            back = expert_balance_backward if name == "expert" else seq_balance_backward
            g = back(daux * alpha, c)                                    # [N, E]
            dscores = g if dscores is None else dscores + g
    # 1. forward: w, idx = router(x)
    dx_r, grads["gate"] = router_backward(dweights, cache.router, dscores=dscores, dlogits=dlogits)
    dx = dx + dx_r
    return dx, {k: grads[k] for k in cache.param_shapes}

"""DeepSeekMoE router: affinities, selection bias, group-limited top-k, gate weights, balance losses.

Forward (reference/deepseek.md sections 7.1, 7.2; DeepSeek-V3 2.1.2 eqs. 12-16; V2 2.2 eqs. 20-22):

    1. logits  z = x Wg^T                                          [N, E]
    2. scores  s = sigmoid(z)             (V3, score_func "sigmoid")
               s = softmax_E(z)           (V2, score_func "softmax", over ALL E experts)
    3. selection scores  s_sel = s + b    the bias b [E] chooses experts only (V3 eq. 16)
    4. group limit (G = n_expert_groups > 1): view s_sel as [N, G, E/G];
           group score = sum of the two highest s_sel of the group  (V3 node-limited routing)
                       = max s_sel of the group                     (V2 device-limited routing)
       keep the Gk = n_limited_groups best groups, set every other expert to -inf
    5. idx = top-K of the masked s_sel, best first                     [N, K]
    6. w = s[idx]   gathered from the UNBIASED scores                  [N, K]
    7. if cfg.renormalize:  w = w / sum_k w    (V3 eq. 13; optional for softmax)
    8. w = route_scale * w                     (normalise first, then scale)

A degenerate case worth knowing: sigmoid scores renormalised over K = 1 chosen expert give the
weight s/s * route_scale = route_scale for every token, so the loss sends the router no gradient
at all (only balance losses and the bias move it). Top-1 routers use softmax scores (V2 style).

Ties (equal selection scores, equal group scores) go to the lower index (stable sort), so the
routing is deterministic. The selection (steps 3-5) is piecewise constant: no gradient flows
through idx, the group mask or b (deepseek.md 7.4). The backward flows through the chosen w
into s, and for softmax through the full softmax Jacobian over all E experts.

Balance losses (functions of the scores s and the routed set idx; forward/backward pairs):

    expert-level (DeepSeekMoE 3.3, V2 2.2.3 eqs. 23-25), over all N tokens of the batch:
        f_i = E / (K N) * #{t : i in idx_t}       P_i = (1/N) sum_t s'_{i,t}      L = sum_i f_i P_i
    sequence-wise (V3 eqs. 17-20), per sequence of T tokens, then the mean over the B sequences:
        f_i = E / (K T) * #{t in seq : i in idx_t} P_i = (1/T) sum_{t in seq} s'_{i,t}
        L = mean_seq sum_i f_i P_i
    with s'_{i,t} = s_{i,t} / sum_j s_{j,t} (the scores normalised over all E; for softmax s' = s).
    Both equal 1 under perfectly uniform routing (so alpha * L = alpha) and E/K when every token
    picks the same K experts and puts all its affinity on them (collapse).
    The counts f_i use the ACTUALLY ROUTED top-K set idx (biased, group-limited, before any
    capacity drop), as the DeepSeek Hub code does; the paper writes the unbiased top-K. f_i is a
    constant: the gradient flows only through P_i.
    router z-loss (ST-MoE 3):   L_z = (1/N) sum_t (logsumexp_i z_{t,i})^2

Auxiliary-loss-free balancing (V3 2.1.2; Wang et al. 2024 Alg. 1), after every optimizer step:
        b_i <- b_i + gamma * sign(mean_j c_j - c_i)     (c = the step's load per expert)

Router statistics (reference/router-analysis.md 4.1), pure functions of loads and scores that live
in tinymoe/analysis.py and are re-exported here (router_stats gathers them for one layer and step):
    load c_i, MaxVio = (max_i c_i - mean c) / mean c (Wang et al. 2024 eq. 4; per batch, or over a
    held-out set by passing the summed loads), CV = std(c) / mean(c), dead experts, mean per-token
    routing entropy of the normalised affinities.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

from tinymoe.checks import check_float, check_same_dtype, check_shape
from tinymoe.analysis import dead_experts, expert_load, load_cv, maxvio, routing_entropy  # noqa: F401
from tinymoe.layers.basic import sigmoid, softmax_backward, softmax_forward


# ================================================================================================
# router forward / backward
# ================================================================================================

class RouterCache(NamedTuple):
    x: np.ndarray                     # [N, D]  router input
    gate_w: np.ndarray                # [E, D]  router weight Wg
    logits: np.ndarray                # [N, E]  z = x Wg^T
    scores: np.ndarray                # [N, E]  s = sigmoid(z) or softmax(z): unbiased affinities
    sel: np.ndarray                   # [N, E]  s + b with the excluded groups at -inf
    group_mask: Optional[np.ndarray]  # [N, G]  bool, groups kept (None when G == 1)
    indices: np.ndarray               # [N, K]  int64 chosen experts, best first by biased score
    raw: np.ndarray                   # [N, K]  s[idx] before renormalisation
    denom: Optional[np.ndarray]       # [N, 1]  sum_k s[idx] (None without renormalisation)
    weights: np.ndarray               # [N, K]  final gate weights
    score_func: str                   # "sigmoid" or "softmax"
    route_scale: float                # rho


def _check_routing_config(cfg, E: int) -> None:
    """Clear errors for configs that cannot route (also when ModelConfig.validate was skipped)."""
    G, Gk, K = cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_activated_experts
    if cfg.score_func not in ("sigmoid", "softmax"):
        raise ValueError(f"cfg.score_func = {cfg.score_func!r}: must be 'sigmoid' or 'softmax'")
    if E % G:
        raise ValueError(f"cfg.n_expert_groups = {G}: must divide the number of experts {E}")
    if not 1 <= Gk <= G:
        raise ValueError(f"cfg.n_limited_groups = {Gk}: must be in [1, n_expert_groups = {G}]")
    allowed = Gk * (E // G)
    if not 1 <= K <= allowed:
        raise ValueError(
            f"cfg.n_activated_experts = {K}: must be in [1, {allowed}], the experts reachable under "
            f"the group limit (n_limited_groups {Gk} * experts per group {E // G})")
    if G > 1 and cfg.score_func == "sigmoid" and E // G < 2:
        raise ValueError(f"cfg.n_expert_groups = {G}: sigmoid group scores sum the top-2 experts "
                         f"of a group, so every group needs >= 2 experts (E = {E})")


def router_forward(x: np.ndarray, gate_w: np.ndarray, bias: np.ndarray, cfg):
    """x [N, D], gate_w [E, D], bias [E], cfg -> weights [N, K], indices [N, K] int64, RouterCache.

    Steps 1-8 of the module docstring (deepseek.md 7.1 for sigmoid, 7.2 for softmax).
    """
    check_float("x", x, ndim=2)
    check_float("gate_w", gate_w, ndim=2)
    check_float("bias", bias, ndim=1)
    check_same_dtype(("x", "gate_w"), x, gate_w)
    N, D = x.shape
    E = gate_w.shape[0]
    check_shape("gate_w", gate_w, (E, D))
    check_shape("bias", bias, (E,))
    _check_routing_config(cfg, E)
    if not np.all(np.isfinite(bias)):
        raise ValueError("bias: the router selection bias contains NaN or inf")
    G, Gk, K = cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_activated_experts
    # 1. logits
    logits = x @ gate_w.T                                               # [N, E]
    if not np.all(np.isfinite(logits)):
        bad = int(np.sum(~np.all(np.isfinite(logits), axis=1)))
        raise ValueError(f"router logits: {bad} of {N} tokens have NaN or inf logits "
                         f"(x or gate_w is non-finite or overflowed)")
    # BEGIN EXERCISE router-forward
    # 2. unbiased affinities
    if cfg.score_func == "sigmoid":
        scores = sigmoid(logits)                                        # [N, E]
    else:
        scores, _ = softmax_forward(logits)                             # [N, E]
    # 3. selection scores: the bias picks experts, it never enters the weights
    sel = scores + bias.astype(scores.dtype, copy=False)                # [N, E]
    # 4. group-limited routing
    group_mask = None
    if G > 1:
        grouped = sel.reshape(N, G, E // G)                             # [N, G, E/G]
        if cfg.score_func == "sigmoid":
            top2 = np.sort(grouped, axis=-1)[:, :, -2:]                 # [N, G, 2]
            gscore = top2.sum(axis=-1)                                  # [N, G] V3: top-2 sum
        else:
            gscore = grouped.max(axis=-1)                               # [N, G] V2: max
        keep = np.argsort(-gscore, axis=1, kind="stable")[:, :Gk]       # [N, Gk] best groups
        group_mask = np.zeros((N, G), dtype=bool)
        np.put_along_axis(group_mask, keep, True, axis=1)
        sel = np.where(np.repeat(group_mask, E // G, axis=1), sel, -np.inf).astype(sel.dtype)
    # 5. top-K, best first (stable: ties go to the lower expert id)
    indices = np.argsort(-sel, axis=1, kind="stable")[:, :K].astype(np.int64)   # [N, K]
    # 6. gate weights from the unbiased scores
    raw = np.take_along_axis(scores, indices, axis=1)                   # [N, K]
    # 7. optional renormalisation among the chosen
    denom = None
    w = raw
    if cfg.renormalize:
        denom = raw.sum(axis=1, keepdims=True)                          # [N, 1]
        w = raw / denom                                                 # [N, K]
    # 8. scale
    weights = (w * cfg.route_scale).astype(x.dtype, copy=False)         # [N, K]
    # END EXERCISE
    cache = RouterCache(x, gate_w, logits, scores, sel, group_mask, indices, raw, denom, weights,
                        cfg.score_func, float(cfg.route_scale))
    return weights, indices, cache


def router_backward(dweights: np.ndarray, cache: RouterCache, dscores: Optional[np.ndarray] = None,
                    dlogits: Optional[np.ndarray] = None):
    """dweights [N, K] -> dx [N, D], dgate_w [E, D].

    Optional extra upstream gradients from the balance losses: dscores [N, E] (on s) and
    dlogits [N, E] (z-loss, on z). No gradient through idx, the group mask or the bias.
    """
    x, gate_w, logits, s, _, _, idx, raw, denom, _, score_func, rho = cache
    N, E = s.shape
    check_shape("dweights", dweights, idx.shape)
    # BEGIN EXERCISE router-backward
    # 8. forward: weights = rho * w
    dw = rho * dweights                                                 # [N, K]
    # 7. forward: w = raw / denom   (dw/draw_k = (d_k - sum_j d_j w_j) / denom)
    if denom is not None:
        w = raw / denom
        draw = (dw - np.sum(dw * w, axis=1, keepdims=True)) / denom     # [N, K]
    else:
        draw = dw
    # 6. forward: raw = s[idx]   (each expert at most once per row: a plain scatter)
    ds = np.zeros((N, E), dtype=np.result_type(s.dtype, draw.dtype))   # [N, E]
    np.put_along_axis(ds, idx, draw, axis=1)
    if dscores is not None:
        check_shape("dscores", dscores, (N, E))
        ds = ds + dscores
    # 2. forward: s = sigmoid(z)  |  s = softmax(z)
    if score_func == "sigmoid":
        dz = ds * s * (1.0 - s)                                         # [N, E]
    else:
        dz = softmax_backward(ds, s)                                    # [N, E] full Jacobian
    if dlogits is not None:
        check_shape("dlogits", dlogits, (N, E))
        dz = dz + dlogits
    dz = dz.astype(x.dtype, copy=False)
    # 1. forward: z = x @ gate_w.T
    dx = dz @ gate_w                                                    # [N, D]
    dgate_w = dz.T @ x                                                  # [E, D]
    return dx, dgate_w
    # END EXERCISE


# ================================================================================================
# balance losses (forward / backward pairs; the MoE layer multiplies by the alphas)
# ================================================================================================

class BalanceCache(NamedTuple):
    f: np.ndarray        # [B, E]  float64 load fractions f_i per sequence (constants)
    sn: np.ndarray       # [N, E]  float64 s' = s / sum_j s
    ssum: np.ndarray     # [N, 1]  float64 sum_j s_{j,t}
    seq_len: int         # T tokens per sequence (N for the expert-level loss)
    dtype: np.dtype      # dtype of the scores (dscores is returned in it)


def seq_balance_forward(scores: np.ndarray, indices: np.ndarray, seq_len: int):
    """scores [N, E], indices [N, K], T -> L float, cache.  V3 eqs. 17-20, mean over sequences.

        f_{b,i} = E/(K T) #{t in b : i in idx_t},  P_{b,i} = (1/T) sum_{t in b} s'_{i,t},
        L = (1/B) sum_b sum_i f_{b,i} P_{b,i},     s'_{i,t} = s_{i,t} / sum_j s_{j,t}.
    """
    check_float("scores", scores, ndim=2)
    N, E = scores.shape
    K = indices.shape[1]
    check_shape("indices", indices, (N, K))
    if seq_len <= 0 or N % seq_len:
        raise ValueError(f"seq_len = {seq_len}: must be positive and divide the {N} tokens")
    B, T = N // seq_len, seq_len
    # 1. load fractions per sequence (constants: counted from the routed set)
    seq_of = np.repeat(np.arange(B), T * K)                             # [N*K] sequence of each pick
    counts = np.zeros((B, E))
    np.add.at(counts, (seq_of, indices.reshape(-1)), 1.0)               # [B, E]
    f = counts * (E / (K * T))                                          # [B, E]
    # 2. normalised affinities and their sequence means
    s = scores.astype(np.float64)
    ssum = s.sum(axis=1, keepdims=True)                                 # [N, 1]
    sn = s / ssum                                                       # [N, E]
    P = sn.reshape(B, T, E).mean(axis=1)                                # [B, E]
    # 3. loss
    loss = float(np.sum(f * P) / B)
    return loss, BalanceCache(f, sn, ssum, T, scores.dtype)


def seq_balance_backward(dloss: float, cache: BalanceCache) -> np.ndarray:
    """dL -> dscores [N, E] (f is a constant; gradient only through P)."""
    f, sn, ssum, T, dtype = cache
    # BEGIN EXERCISE balance-backward
    N, E = sn.shape
    B = N // T
    # 3. forward: L = sum(f * P) / B ;  2. forward: P = mean_t s'
    dsn = np.repeat(f, T, axis=0) * (dloss / (B * T))                   # [N, E]
    # 2. forward: s' = s / sum_j s
    ds = (dsn - np.sum(dsn * sn, axis=1, keepdims=True)) / ssum         # [N, E]
    return ds.astype(dtype, copy=False)
    # END EXERCISE


def expert_balance_forward(scores: np.ndarray, indices: np.ndarray):
    """scores [N, E], indices [N, K] -> L float, cache.  DeepSeekMoE 3.3 / V2 eq. 23-25.

    The expert-level loss over the whole batch: the sequence-wise loss with one "sequence" of all
    N tokens, f_i = E/(K N) count_i, P_i = (1/N) sum_t s'_{i,t}, L = sum_i f_i P_i.
    """
    return seq_balance_forward(scores, indices, scores.shape[0])


def expert_balance_backward(dloss: float, cache: BalanceCache) -> np.ndarray:
    """dL -> dscores [N, E]."""
    return seq_balance_backward(dloss, cache)


class ZLossCache(NamedTuple):
    p: np.ndarray        # [N, E] float64 softmax(z)
    lse: np.ndarray      # [N, 1] float64 logsumexp(z)
    dtype: np.dtype


def z_loss_forward(logits: np.ndarray):
    """logits [N, E] -> L float, cache:  L = (1/N) sum_t (logsumexp_i z_{t,i})^2  (ST-MoE 3)."""
    check_float("logits", logits, ndim=2)
    z = logits.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    e = np.exp(z - m)
    lse = m + np.log(e.sum(axis=1, keepdims=True))                      # [N, 1]
    p = e / e.sum(axis=1, keepdims=True)                                # [N, E]
    return float(np.mean(lse ** 2)), ZLossCache(p, lse, logits.dtype)


def z_loss_backward(dloss: float, cache: ZLossCache) -> np.ndarray:
    """dL -> dlogits [N, E]:  dz = (2/N) lse * softmax(z)."""
    p, lse, dtype = cache
    # forward: L = mean(lse^2), lse = logsumexp(z)
    return (dloss * 2.0 / p.shape[0] * lse * p).astype(dtype, copy=False)


# ================================================================================================
# auxiliary-loss-free balancing
# ================================================================================================

def update_bias(bias: np.ndarray, load: np.ndarray, gamma: float) -> np.ndarray:
    """bias [E], load [E], gamma -> new bias [E]:  b + gamma * sign(mean(c) - c)  (V3 2.1.2).

    Overloaded experts move down by gamma, underloaded ones up by gamma, experts exactly at the
    mean stay. Not a gradient step: the optimizer never sees b. Returns a fresh array.
    """
    check_float("bias", bias, ndim=1)
    load = np.asarray(load)
    check_shape("load", load, bias.shape)
    if not (np.isfinite(gamma) and gamma >= 0):
        raise ValueError(f"gamma = {gamma!r}: must be a non-negative finite number")
    # BEGIN EXERCISE bias-update
    c = load.astype(np.float64)
    step = np.sign(c.mean() - c)                                        # [E] in {-1, 0, +1}
    return (bias + gamma * step).astype(bias.dtype)
    # END EXERCISE


# ================================================================================================
# router statistics (router-analysis.md 4.1); the metric functions themselves live in
# tinymoe/analysis.py and are re-exported here for convenience
# ================================================================================================

def router_stats(cache) -> dict:
    """A router or MoE cache (one layer, one step) -> {load, maxvio, cv, entropy, dead, dropped}.

    load counts the assignments kept after capacity when the cache has them (MoE cache), else
    the routed top-K set; dropped is the number of (token, expert) assignments dropped.
    """
    E = cache.scores.shape[1]
    load = getattr(cache, "load", None)
    if load is None:
        load = expert_load(cache.indices, E)
    return dict(load=np.asarray(load, dtype=np.int64), maxvio=maxvio(load), cv=load_cv(load),
                entropy=routing_entropy(cache.scores), dead=dead_experts(load),
                dropped=int(getattr(cache, "dropped", 0)))

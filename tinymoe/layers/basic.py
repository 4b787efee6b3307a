"""Basic layers as forward/backward pairs: linear, embedding, SwiGLU MLP, softmax, cross-entropy.

Every forward returns `(out, cache)`; every backward takes the upstream gradient and that cache
and returns fresh arrays. Linear weights are stored [out, in] and applied as `x @ W.T`, as in
every DeepSeek checkpoint. Shape letters: N rows (tokens), D in-features, F hidden width, V vocab.

    y = x @ W.T                                   linear
    y = E[tokens]                                 embedding (backward: scatter-add into E)
    y = (silu(x @ W1.T) * (x @ W3.T)) @ W2.T      SwiGLU MLP (DeepSeek `MLP` / `Expert`)
    p = exp(x - max x) / sum exp(x - max x)       softmax over the last axis
    L = mean_{n: t_n != -100} -log softmax(z_n)[t_n]   cross-entropy
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tinymoe.checks import check_float, check_same_dtype, check_shape, check_tokens
from tinymoe.kernels.scatter import scatter_add_rows

IGNORE_INDEX = -100


# ================================================================================================
# linear
# ================================================================================================

class LinearCache(NamedTuple):
    x: np.ndarray   # [..., In] the input
    w: np.ndarray   # [Out, In] the weight


def linear_forward(x: np.ndarray, w: np.ndarray):
    """[..., In], [Out, In] -> [..., Out]:  y = x @ W.T  (no bias anywhere in DeepSeek)."""
    check_float("x", x)
    check_float("w", w, ndim=2)
    check_same_dtype(("x", "w"), x, w)
    if x.ndim == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x: shape {list(x.shape)} does not end in w's in-features "
                         f"{w.shape[1]} (w is [out, in] = {list(w.shape)})")
    y = x @ w.T                                                  # [..., Out]
    return y, LinearCache(x, w)


def linear_backward(dy: np.ndarray, cache: LinearCache):
    """[..., Out] -> dx [..., In], dw [Out, In].

    dx = dy @ W;  dW = sum over rows of dy^T x  (every leading index is a row).
    """
    x, w = cache
    check_shape("dy", dy, x.shape[:-1] + (w.shape[0],))
    # forward: y = x @ w.T
    dx = dy @ w                                                  # [..., In]
    dw = dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])   # [Out, In]
    return dx, dw


# ================================================================================================
# embedding
# ================================================================================================

class EmbeddingCache(NamedTuple):
    tokens: np.ndarray   # [...] int token ids
    n_rows: int          # V, rows of the table
    dtype: np.dtype      # dtype of the table


def embedding_forward(tokens: np.ndarray, w: np.ndarray):
    """[...] int, [V, D] -> [..., D]:  y = W[tokens]  (no sqrt(D) scaling, as in DeepSeek)."""
    check_float("w", w, ndim=2)
    check_tokens("tokens", tokens, w.shape[0])
    y = w[tokens]                                                # [..., D]
    return y, EmbeddingCache(tokens, w.shape[0], w.dtype)


def embedding_backward(dy: np.ndarray, cache: EmbeddingCache):
    """[..., D] -> dW [V, D]:  dW[v] = sum over positions i with tokens[i] = v of dy[i].

    A scatter-add: repeated tokens accumulate, unused rows stay 0 (numba kernel + NumPy twin,
    tinymoe.kernels.scatter; TINYMOE_BACKEND picks one). Returns the table's dtype.
    """
    tokens, n_rows, dtype = cache
    if dy.ndim != tokens.ndim + 1 or dy.shape[:-1] != tokens.shape:
        raise ValueError(f"dy: expected shape {list(tokens.shape)} + [D], got {list(dy.shape)}")
    D = dy.shape[-1]
    # forward: y = w[tokens]
    dw = scatter_add_rows(tokens.reshape(-1), dy.reshape(-1, D).astype(dtype, copy=False),
                          n_rows)                                # [V, D]
    return dw


# ================================================================================================
# SwiGLU MLP
# ================================================================================================

def silu(a: np.ndarray) -> np.ndarray:
    """[...] -> [...]: silu(a) = a * sigmoid(a), computed without overflow."""
    a = _as_float(a)
    return a * sigmoid(a)


def sigmoid(a: np.ndarray) -> np.ndarray:
    """[...] -> [...]: 1 / (1 + exp(-a)), stable for large |a| (exp never overflows).

    For a >= 0 it uses 1 / (1 + e^-a), for a < 0 the equal e^a / (1 + e^a), so exp only ever sees
    -|a|. Float inputs keep their dtype; integers and Python numbers become float64.
    """
    a = _as_float(a)
    e = np.exp(-np.abs(a))
    r = 1.0 / (1.0 + e)
    return np.where(a >= 0, r, e * r).astype(a.dtype, copy=False)


def _as_float(a) -> np.ndarray:
    """An ndarray of a floating dtype (float32/float64 kept; ints and scalars -> float64)."""
    a = np.asarray(a)
    return a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64)


class SwiGLUCache(NamedTuple):
    x: np.ndarray    # [N, D]  input
    h1: np.ndarray   # [N, F]  x @ W1.T (gate pre-activation)
    h3: np.ndarray   # [N, F]  x @ W3.T (up projection)
    sg: np.ndarray   # [N, F]  sigmoid(h1)
    g: np.ndarray    # [N, F]  silu(h1) * h3
    w1: np.ndarray   # [F, D]
    w2: np.ndarray   # [D, F]
    w3: np.ndarray   # [F, D]


def swiglu_forward(x: np.ndarray, w1: np.ndarray, w2: np.ndarray, w3: np.ndarray):
    """[N, D], W1 [F, D], W2 [D, F], W3 [F, D] -> [N, D].

    y = (silu(x W1^T) * (x W3^T)) W2^T   (DeepSeek `MLP`/`Expert`; W1 gate_proj, W3 up_proj,
    W2 down_proj). Used for the dense FFN, each routed expert and the fused shared experts.
    """
    check_float("x", x, ndim=2)
    for name, w in (("w1", w1), ("w2", w2), ("w3", w3)):
        check_float(name, w, ndim=2)
    check_same_dtype(("x", "w1", "w2", "w3"), x, w1, w2, w3)
    F, D = w1.shape
    if x.shape[1] != D:
        raise ValueError(f"x: last dimension {x.shape[1]} does not match w1's in-features {D}")
    check_shape("w3", w3, (F, D))
    check_shape("w2", w2, (D, F))
    # 1. gate and up projections
    h1 = x @ w1.T                                                # [N, F]
    h3 = x @ w3.T                                                # [N, F]
    # 2. gated activation
    sg = sigmoid(h1)                                             # [N, F]
    g = h1 * sg * h3                                             # [N, F]
    # 3. down projection
    y = g @ w2.T                                                 # [N, D]
    return y, SwiGLUCache(x, h1, h3, sg, g, w1, w2, w3)


def swiglu_backward(dy: np.ndarray, cache: SwiGLUCache):
    """[N, D] -> dx [N, D], dW1 [F, D], dW2 [D, F], dW3 [F, D].

    silu'(a) = s (1 + a (1 - s)) with s = sigmoid(a), since d/da [a s] = s + a s (1 - s).
    """
    x, h1, h3, sg, g, w1, w2, w3 = cache
    check_shape("dy", dy, x.shape)
    # BEGIN EXERCISE swiglu-backward
    # 3. forward: y = g @ w2.T
    dw2 = dy.T @ g                                               # [D, F]
    dg = dy @ w2                                                 # [N, F]
    # 2. forward: g = h1 * sg * h3  (= silu(h1) * h3)
    dh3 = dg * h1 * sg                                           # [N, F]
    dh1 = dg * h3 * sg * (1.0 + h1 * (1.0 - sg))                 # [N, F]
    # 1. forward: h1 = x @ w1.T ; h3 = x @ w3.T
    dw1 = dh1.T @ x                                              # [F, D]
    dw3 = dh3.T @ x                                              # [F, D]
    dx = dh1 @ w1 + dh3 @ w3                                     # [N, D]
    return dx, dw1, dw2, dw3
    # END EXERCISE


# ================================================================================================
# softmax
# ================================================================================================

def softmax_forward(x: np.ndarray):
    """[..., C] -> [..., C]: p = exp(x - max) / sum(exp(x - max)) over the last axis.

    Entries equal to -inf (masked) get probability exactly 0. Cache: p itself.
    """
    check_float("x", x)
    if x.ndim == 0:
        raise ValueError("x: expected at least one dimension (softmax runs over the last axis)")
    m = np.max(x, axis=-1, keepdims=True)                        # [..., 1]
    p = x - m                                                    # [..., C]
    np.exp(p, out=p)                                             # in place: one buffer
    p /= np.sum(p, axis=-1, keepdims=True)                       # [..., C]
    return p, p


def softmax_backward(dp: np.ndarray, p: np.ndarray) -> np.ndarray:
    """[..., C], cache p [..., C] -> dx [..., C]:  dx = p * (dp - sum_c(dp * p)).

    The Jacobian dp_i/dx_j = p_i (delta_ij - p_j) applied to dp without forming it. Masked
    entries (p = 0) get dx = 0 exactly.
    """
    check_shape("dp", dp, p.shape)
    # BEGIN EXERCISE cross-entropy-backward
    # forward: p = softmax(x)
    return p * (dp - np.sum(dp * p, axis=-1, keepdims=True))
    # END EXERCISE


# ================================================================================================
# cross-entropy
# ================================================================================================

class CrossEntropyCache(NamedTuple):
    p: np.ndarray          # [N, V] softmax of the logits
    targets: np.ndarray    # [N]    target ids (IGNORE_INDEX rows ignored)
    valid: np.ndarray      # [N]    bool, target != ignore_index
    n_valid: int           # number of counted rows (the mean's denominator)


def cross_entropy_forward(logits: np.ndarray, targets: np.ndarray, ignore_index: int = IGNORE_INDEX):
    """[N, V], [N] int -> scalar:  L = mean over rows with t != ignore_index of -log softmax(z)[t].

        -log softmax(z)[t] = lse(z) - z_t,  lse(z) = m + log sum_v exp(z_v - m),  m = max_v z_v

    Stable for logits of any magnitude (every exp sees z - m <= 0). With no valid row the loss
    is 0.0 and the gradient is zero. Returns a Python float (summed in float64); the cache keeps
    the softmax p in the logits' dtype for the fused backward.
    """
    check_float("logits", logits, ndim=2)
    if not isinstance(targets, np.ndarray) or not np.issubdtype(targets.dtype, np.integer):
        raise TypeError(f"targets: expected an integer numpy array, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    check_shape("targets", targets, (logits.shape[0],))
    valid = targets != ignore_index                              # [N]
    check_tokens(f"targets (ignoring {ignore_index})", targets[valid], logits.shape[1])
    # 1. log-softmax, row max subtracted
    z = logits - logits.max(axis=1, keepdims=True)               # [N, V]
    lse = np.log(np.exp(z).sum(axis=1))                          # [N]
    p = np.exp(z - lse[:, None])                                 # [N, V]
    # 2. negative log-likelihood of the targets, mean over valid rows
    n_valid = int(valid.sum())
    rows = np.nonzero(valid)[0]
    nll = lse[rows] - z[rows, targets[rows]]                     # [n_valid]
    loss = float(nll.sum(dtype=np.float64) / n_valid) if n_valid else 0.0
    return loss, CrossEntropyCache(p, targets, valid, n_valid)


def cross_entropy_backward(dloss: float, cache: CrossEntropyCache) -> np.ndarray:
    """scalar -> dlogits [N, V]:  dz = dloss * (p - onehot(t)) / n_valid on valid rows, 0 elsewhere.

    Fused: the softmax and the log never meet in the backward, d(lse(z) - z_t)/dz = p - onehot(t).
    """
    p, targets, valid, n_valid = cache
    # BEGIN EXERCISE cross-entropy-backward
    dz = np.zeros_like(p)                                        # [N, V]
    if n_valid == 0:
        return dz
    rows = np.nonzero(valid)[0]
    # 2. forward: L = sum(lse[rows] - z[rows, t]) / n_valid
    # 1. forward: lse = log(sum(exp(z))), so d lse / dz = p
    dz[rows] = p[rows]
    dz[rows, targets[rows]] -= 1.0
    dz *= dloss / n_valid
    return dz
    # END EXERCISE

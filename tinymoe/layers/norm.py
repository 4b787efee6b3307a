"""RMSNorm (Zhang & Sennrich 2019), the only normalisation in DeepSeek-V2/V3.

    r = (mean(x^2) + eps)^(-1/2)        per row of D values
    y = w * (x * r)

Used before attention and FFN in every block (`attn_norm`, `ffn_norm`), on the final hidden state
(`norm`), and inside MLA on the compressed query (`q_norm`) and KV latent (`kv_norm`) only
(DeepSeek-V2 section 3.1.2). reference/deepseek.md section 3.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from tinymoe.checks import check_float, check_same_dtype


class RMSNormCache(NamedTuple):
    x: np.ndarray   # [..., D] input
    r: np.ndarray   # [..., 1] 1 / sqrt(mean(x^2) + eps)
    w: np.ndarray   # [D]      scale


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float = 1e-6):
    """[..., D], [D] -> [..., D]:  y = w * x / sqrt(mean(x^2) + eps), over the last axis.

    The mean of squares is taken in x's dtype. Returns x's dtype.
    """
    check_float("x", x)
    check_float("w", w, ndim=1)
    check_same_dtype(("x", "w"), x, w)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match w's size {w.shape[0]}")
    # 1. inverse root-mean-square per row
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)   # [..., 1]
    # 2. normalise and scale
    y = w * (x * r)                                                   # [..., D]
    return y.astype(x.dtype, copy=False), RMSNormCache(x, r.astype(x.dtype, copy=False), w)


def rmsnorm_backward(dy: np.ndarray, cache: RMSNormCache):
    """[..., D] -> dx [..., D], dw [D].

    With g = dy * w (the gradient reaching x * r) and dr/dx_i = -r^3 x_i / D:
        dw = sum over rows of dy * x * r
        dx = r * g + x * (-r^3 / D) * sum_j g_j x_j  =  r * g - x * r^3 * mean(g * x)
    """
    x, r, w = cache
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected shape {list(x.shape)}, got {list(dy.shape)}")
    # 2. forward: y = w * (x * r)
    dw = np.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)       # [D]
    g = dy * w                                                        # [..., D]  d/d(x*r)
    # 1. forward: r = (mean(x^2) + eps)^(-1/2)   (x reaches y directly and through r)
    dx = r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)   # [..., D]
    return dx, dw

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


def check_eps(eps) -> None:
    """eps must be a finite number > 0 (a negative or NaN eps makes r NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float, np.floating)) or \
            not 0 < float(eps) < float("inf"):
        raise ValueError(f"eps = {eps!r}: must be a finite number > 0")


def check_scale(r: np.ndarray, x: np.ndarray) -> None:
    """r = 1/sqrt(mean(x^2) + eps) [..., 1] must be finite and > 0: an overflowing mean square
    (|x| ~ 1e19 in float32) gives r = 0, which would silently zero the row and its gradient."""
    if r.size and not (r.min() > 0 and r.max() < np.inf):          # NaN fails both
        bad = int(np.sum(~((r > 0) & (r < np.inf))))
        finite = np.isfinite(x)
        what = ("x has NaN or inf values" if not finite.all() else
                f"mean(x^2) + eps overflows {x.dtype} (max |x| = {np.abs(x).max():.3g})")
        raise FloatingPointError(f"rmsnorm_forward: {bad} of {r.size} rows cannot be normalised: "
                                 f"{what}")


def rmsnorm_forward(x: np.ndarray, w: np.ndarray, eps: float = 1e-6):
    """[..., D], [D] -> [..., D]:  y = w * x / sqrt(mean(x^2) + eps), over the last axis.

    The mean of squares is taken in x's dtype. Returns x's dtype.
    """
    check_float("x", x)
    check_float("w", w, ndim=1)
    check_same_dtype(("x", "w"), x, w)
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"x: last dimension {x.shape[-1]} does not match w's size {w.shape[0]}")
    check_eps(eps)
    # 1. inverse root-mean-square per row
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)   # [..., 1]
    check_scale(r, x)
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
    # BEGIN EXERCISE rmsnorm-backward
    # 2. forward: y = w * (x * r)
    dw = np.sum((dy * x * r).reshape(-1, x.shape[-1]), axis=0)       # [D]
    g = dy * w                                                        # [..., D]  d/d(x*r)
    # 1. forward: r = (mean(x^2) + eps)^(-1/2)   (x reaches y directly and through r)
    dx = r * g - x * (r ** 3) * np.mean(g * x, axis=-1, keepdims=True)   # [..., D]
    return dx, dw
    # END EXERCISE

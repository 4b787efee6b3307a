"""Fused RMSNorm: each row's mean square, scale and output in one pass; the backward likewise.

The plain `rmsnorm_forward` / `rmsnorm_backward` (tinymoe/layers/norm.py) are five and eight NumPy
passes over [..., D]. Here, per row x of D values (rows are independent: `prange`),

    forward   r = 1 / sqrt(sum(x^2) / D + eps);   y = w * (x * r)
    backward  g = dy * w;   dx = r * g - x * r^3 * sum(g * x) / D

and dw = sum over rows of dy * x * r, the one sum across rows, is taken in fixed blocks of
ROWS_PER_BLOCK rows (each block's partial sum on one thread, then the blocks added in order), so
it does not depend on the thread count either. Row sums use tinymoe.kernels._math.row_sum.
"""
from __future__ import annotations

import numpy as np

from tinymoe.kernels import fused, get, register
from tinymoe.kernels._math import row_sum

prange = range            # numba.prange once a kernel is compiled (tinymoe.kernels.get)

ROWS_PER_BLOCK = 64


def _rmsnorm_numpy(x, w, eps):
    """x [R, D], w [D] -> y [R, D], r [R, 1]."""
    r = (1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)).astype(x.dtype)
    return (w * (x * r)).astype(x.dtype), r


def _rmsnorm_loops(x, w, eps):
    R, D = x.shape
    y = np.empty((R, D), dtype=x.dtype)
    r = np.empty((R, 1), dtype=x.dtype)
    for i in prange(R):
        sq = np.empty(D, dtype=np.float64)
        for d in range(D):
            sq[d] = x[i, d] * x[i, d]
        ri = 1.0 / np.sqrt(row_sum(sq, D) / D + eps)
        r[i, 0] = ri
        rf = r[i, 0]                                  # r in x's dtype, as the plain cache
        for d in range(D):
            y[i, d] = w[d] * (x[i, d] * rf)
    return y, r


register("rmsnorm", _rmsnorm_numpy, _rmsnorm_loops, parallel=True)


def _rmsnorm_backward_numpy(dy, x, r, w):
    """dy, x [R, D], r [R, 1], w [D] -> dx [R, D], dw [D]: the plain rmsnorm_backward itself."""
    from tinymoe.layers.norm import RMSNormCache, rmsnorm_backward
    return rmsnorm_backward(dy, RMSNormCache(x, r, w))


def _rmsnorm_backward_loops(dy, x, r, w):
    # BEGIN EXERCISE rmsnorm-backward
    R, D = x.shape
    dx = np.empty((R, D), dtype=x.dtype)
    n_blocks = (R + ROWS_PER_BLOCK - 1) // ROWS_PER_BLOCK
    partial = np.zeros((n_blocks, D), dtype=np.float64)
    for blk in prange(n_blocks):
        gx = np.empty(D, dtype=np.float64)
        for i in range(blk * ROWS_PER_BLOCK, min(R, (blk + 1) * ROWS_PER_BLOCK)):
            ri = r[i, 0]
            for d in range(D):
                # forward: y = w * (x * r)
                partial[blk, d] += dy[i, d] * x[i, d] * ri
                gx[d] = dy[i, d] * w[d] * x[i, d]
            # forward: r = (mean(x^2) + eps)^(-1/2)
            c = ri * ri * ri * row_sum(gx, D) / D
            for d in range(D):
                dx[i, d] = ri * (dy[i, d] * w[d]) - x[i, d] * c
    dw = np.zeros(D, dtype=np.float64)
    for blk in range(n_blocks):                       # blocks in order: thread-count independent
        for d in range(D):
            dw[d] += partial[blk, d]
    return dx, dw.astype(x.dtype)
    # END EXERCISE


register("rmsnorm_backward", _rmsnorm_backward_numpy, _rmsnorm_backward_loops, parallel=True)


# ------------------------------------------------------------------------------------------------
# drop-in replacements for rmsnorm_forward / rmsnorm_backward (same arguments, same cache)
# ------------------------------------------------------------------------------------------------

def rmsnorm_forward_fused(x, w, eps: float = 1e-6):
    """[..., D], [D] -> [..., D], RMSNormCache: rmsnorm_forward in one pass per row (float32,
    numba backend; otherwise the plain function). Same eps and overflow checks as the plain one."""
    from tinymoe.layers.norm import RMSNormCache, check_eps, check_scale, rmsnorm_forward
    if not isinstance(x, np.ndarray) or not isinstance(w, np.ndarray) or not fused(x.size) \
            or x.dtype != np.float32 or w.dtype != x.dtype or w.ndim != 1 or x.ndim == 0 \
            or x.shape[-1] != w.shape[0] or x.size == 0:
        return rmsnorm_forward(x, w, eps)
    check_eps(eps)
    D = w.shape[0]
    y, r = get("rmsnorm", "numba", x.size)(np.ascontiguousarray(x).reshape(-1, D), w,
                                           float(eps))
    r = r.reshape(x.shape[:-1] + (1,))
    check_scale(r, x)
    return y.reshape(x.shape), RMSNormCache(x, r, w)


def rmsnorm_backward_fused(dy, cache):
    """[..., D] -> dx [..., D], dw [D]: rmsnorm_backward in one pass per row (float32, numba)."""
    from tinymoe.layers.norm import rmsnorm_backward
    x, r, w = cache
    if not isinstance(dy, np.ndarray) or not fused(dy.size) or dy.dtype != np.float32 \
            or x.dtype != dy.dtype or dy.shape != x.shape or x.size == 0:
        return rmsnorm_backward(dy, cache)
    D = x.shape[-1]
    dx, dw = get("rmsnorm_backward", "numba", dy.size)(np.ascontiguousarray(dy).reshape(-1, D),
                                     np.ascontiguousarray(x).reshape(-1, D),
                                     np.ascontiguousarray(r).reshape(-1, 1), w)
    return dx.reshape(x.shape), dw

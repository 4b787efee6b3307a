"""Fused RoPE: rotate the interleaved pairs of every head in one pass per token.

The plain `rope_forward` (tinymoe/layers/rope.py) makes six strided NumPy passes (two products
and a difference for the even slots, the same for the odd ones). Here each (batch, token) row of
x [B, T, ..., Dr], viewed as [B*T, R, Dr] with R the head axes, is one task (`prange`):

    y[2j]   = x[2j] cos(phi_tj) - x[2j+1] sin(phi_tj)
    y[2j+1] = x[2j] sin(phi_tj) + x[2j+1] cos(phi_tj)

in the same float32 operations as the plain function (bitwise the same result). The backward is
the rotation by -phi, as in the plain rope_backward.
"""
from __future__ import annotations

import numpy as np

from tinymoe.kernels import fused, get, register

prange = range            # numba.prange once a kernel is compiled (tinymoe.kernels.get)


def _rope_numpy(x, cos, sin):
    """x [B, T, R, Dr], cos/sin [T, Dr/2] -> y [B, T, R, Dr]."""
    from tinymoe.layers.rope import rope_forward
    return rope_forward(x, cos, sin)


def _rope_loops(x, cos, sin):
    # BEGIN EXERCISE rope
    B, T, R, Dr = x.shape
    y = np.empty_like(x)
    for bt in prange(B * T):
        b, t = bt // T, bt % T
        for r in range(R):
            for j in range(Dr // 2):
                x0, x1 = x[b, t, r, 2 * j], x[b, t, r, 2 * j + 1]
                c, s = cos[t, j], sin[t, j]
                y[b, t, r, 2 * j] = x0 * c - x1 * s
                y[b, t, r, 2 * j + 1] = x0 * s + x1 * c
    return y
    # END EXERCISE


register("rope", _rope_numpy, _rope_loops, parallel=True)


def rope_forward_fused(x, cos, sin):
    """[B, T, ..., Dr], cos/sin [T, Dr/2] -> [B, T, ..., Dr]: rope_forward in one pass (float32,
    numba backend; otherwise the plain function, which also gives the errors)."""
    from tinymoe.layers.rope import rope_forward
    if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim < 3 \
            or not isinstance(cos, np.ndarray) or cos.dtype != x.dtype or cos.ndim != 2 \
            or not isinstance(sin, np.ndarray) or sin.shape != cos.shape or sin.dtype != x.dtype \
            or x.shape[1] != cos.shape[0] or x.shape[-1] != 2 * cos.shape[1] or not fused(x.size):
        return rope_forward(x, cos, sin)
    B, T, Dr = x.shape[0], x.shape[1], x.shape[-1]
    x4 = np.ascontiguousarray(x).reshape(B, T, -1, Dr)
    y = get("rope", "numba", x.size)(x4, np.ascontiguousarray(cos), np.ascontiguousarray(sin))
    return y.reshape(x.shape)


def rope_backward_fused(dy, cos, sin):
    """[B, T, ..., Dr] -> dx: rope_backward (the rotation by -phi) in one pass."""
    # forward: y = R(phi) x
    return rope_forward_fused(dy, cos, -sin)

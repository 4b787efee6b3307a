"""Fused SwiGLU gate: the element-wise middle of the SwiGLU MLP in one pass, forward and backward.

The plain `swiglu_forward` / `swiglu_backward` (tinymoe/layers/basic.py) spend about as long on
their element-wise lines as on their matrix products at the expert shapes: the stable sigmoid is
six NumPy passes, the gate two more, and the backward five. Here each is one pass per row
(`prange`; rows are independent, so the result does not depend on the thread count):

    forward   sg = sigmoid(h1),  g = h1 * sg * h3                    h1, h3 [N, F]
    backward  dh3 = dg * h1 * sg,  dh1 = dg * h3 * sg * (1 + h1 (1 - sg))

The backward writes dh1 and dh3 side by side into one [N, 2F] buffer, so that
dx = dh1 W1 + dh3 W3 and [dW1; dW3] = [dh1 | dh3]^T x are one matrix product each.
The sigmoid is the plain one's: 1 / (1 + e^-|a|), times e^-|a| for a < 0 (exp never overflows).
"""
from __future__ import annotations

import numpy as np

from tinymoe.kernels import fused, get, register
from tinymoe.kernels._math import exp_nonpositive

prange = range            # numba.prange once a kernel is compiled (tinymoe.kernels.get)


def _swiglu_gate_numpy(h1, h3):
    """h1, h3 [N, F] -> sg = sigmoid(h1), g = h1 * sg * h3 (both [N, F])."""
    from tinymoe.layers.basic import sigmoid
    sg = sigmoid(h1)
    return sg, h1 * sg * h3


def _swiglu_gate_loops(h1, h3):
    N, F = h1.shape
    sg = np.empty((N, F), dtype=h1.dtype)
    g = np.empty((N, F), dtype=h1.dtype)
    for n in prange(N):
        for f in range(F):
            a = h1[n, f]
            e = exp_nonpositive(-abs(a))              # e^-|a| <= 1
            r = 1.0 / (1.0 + e)
            s = r if a >= 0 else e * r                # sigmoid(a), both branches stable
            sg[n, f] = s
            g[n, f] = a * sg[n, f] * h3[n, f]
    return sg, g


register("swiglu_gate", _swiglu_gate_numpy, _swiglu_gate_loops, parallel=True)


def _swiglu_gate_backward_numpy(dg, h1, h3, sg):
    """dg, h1, h3, sg [N, F] -> dh [N, 2F] = [dh1 | dh3]."""
    # BEGIN EXERCISE swiglu-backward
    dh3 = dg * h1 * sg
    dh1 = dg * h3 * sg * (1.0 + h1 * (1.0 - sg))
    return np.concatenate([dh1, dh3], axis=1)
    # END EXERCISE


def _swiglu_gate_backward_loops(dg, h1, h3, sg):
    # BEGIN EXERCISE swiglu-backward
    N, F = dg.shape
    dh = np.empty((N, 2 * F), dtype=dg.dtype)
    one = np.float32(1.0)                             # float32 arithmetic, as NumPy's
    for n in prange(N):
        for f in range(F):
            s = sg[n, f]
            a = h1[n, f]
            # forward: g = h1 * sg * h3
            dh[n, F + f] = dg[n, f] * a * s
            dh[n, f] = dg[n, f] * h3[n, f] * s * (one + a * (one - s))
    return dh
    # END EXERCISE


register("swiglu_gate_backward", _swiglu_gate_backward_numpy, _swiglu_gate_backward_loops,
         parallel=True)


# ------------------------------------------------------------------------------------------------
# drop-in replacements for swiglu_forward / swiglu_backward (same arguments, same cache)
# ------------------------------------------------------------------------------------------------

def _fusable(x, *ws) -> bool:
    """float32 2-d arrays, a fused-size hidden layer [N, F] (x [N, .], ws[0] [F, .] or [N, F]),
    the numba backend (anything else: the plain path)."""
    for a in (x,) + ws:
        if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.ndim != 2:
            return False
    return fused(x.shape[0] * ws[0].shape[0])


def swiglu_forward_fused(x, w1, w2, w3):
    """[N, D], W1 [F, D], W2 [D, F], W3 [F, D] -> [N, D], SwiGLUCache: swiglu_forward, gate fused."""
    from tinymoe.layers.basic import SwiGLUCache, swiglu_forward
    F, D = w1.shape
    if not _fusable(x, w1, w2, w3) or x.shape[1] != D or w3.shape != (F, D) \
            or w2.shape != (D, F):
        return swiglu_forward(x, w1, w2, w3)          # the reference (and its error messages)
    h1 = x @ w1.T                                     # [N, F]
    h3 = x @ w3.T                                     # [N, F]
    sg, g = get("swiglu_gate", "numba", h1.size)(h1, h3)                # [N, F] each
    y = g @ w2.T                                      # [N, D]
    return y, SwiGLUCache(x, h1, h3, sg, g, w1, w2, w3)


def swiglu_backward_fused(dy, cache):
    """[N, D] -> dx, dW1, dW2, dW3: swiglu_backward with the gate fused and W1/W3 products joined."""
    from tinymoe.layers.basic import swiglu_backward
    x, h1, h3, sg, g, w1, w2, w3 = cache
    if not _fusable(dy, w1, x, h1, h3, sg, g) or dy.shape != x.shape:
        return swiglu_backward(dy, cache)
    # BEGIN EXERCISE swiglu-backward
    F = w1.shape[0]
    # 3. forward: y = g @ w2.T
    dw2 = dy.T @ g                                    # [D, F]
    dg = dy @ w2                                      # [N, F]
    # 2. forward: g = h1 * sg * h3
    c = np.ascontiguousarray
    dh = get("swiglu_gate_backward", "numba", dg.size)(dg, c(h1), c(h3), c(sg))  # [N, 2F] = [dh1 | dh3]
    # 1. forward: h1 = x @ w1.T ; h3 = x @ w3.T
    dw13 = dh.T @ x                                   # [2F, D] = [dW1; dW3]
    dx = dh @ np.concatenate([w1, w3])                # [N, D] = dh1 W1 + dh3 W3
    return dx, dw13[:F], dw2, dw13[F:]
    # END EXERCISE

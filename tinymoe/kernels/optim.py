"""Fused AdamW update: the seven NumPy passes of one parameter's update in one pass, in place.

Per element, with every scalar cast to the parameter's float32 first and every operation in
float32, in the order of AdamW.step (tinymoe/optim.py), so the result equals the plain update
bitwise (NumPy applies a Python float to a float32 array as a float32 scalar, NEP 50):

    m = m * b1 + (1 - b1) * g
    v = v * b2 + (1 - b2) * g * g
    u = (m / c1) / (sqrt(v / c2) + eps)  [+ wd * p]
    p = p - lr * u

Elements are independent (`prange` over the flat arrays), so the result does not depend on the
thread count.
"""
from __future__ import annotations

import numpy as np

from tinymoe.kernels import fused, get, register

prange = range            # numba.prange once a kernel is compiled (tinymoe.kernels.get)



def _adamw_numpy(p, g, m, v, s):
    """Flat p, g, m, v [n] (updated in place: p, m, v); s = float32 [lr, b1, 1-b1, b2, 1-b2, c1,
    c2, eps, wd] (wd = 0: no decay)."""
    # BEGIN EXERCISE adamw
    lr, b1, b1c, b2, b2c, c1, c2, eps, wd = s
    m *= b1
    m += b1c * g
    v *= b2
    v += b2c * g * g
    update = (m / c1) / (np.sqrt(v / c2) + eps)
    if wd:
        update = update + wd * p
    p -= lr * update
    return p
    # END EXERCISE


def _adamw_loops(p, g, m, v, s):
    # BEGIN EXERCISE adamw
    lr, b1, b1c, b2, b2c, c1, c2, eps, wd = s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8]
    n = p.shape[0]
    if wd != 0:                                       # two loops: no branch inside, so they vectorise
        for i in prange(n):
            mi = m[i] * b1 + b1c * g[i]
            vi = v[i] * b2 + b2c * g[i] * g[i]
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - lr * ((mi / c1) / (np.sqrt(vi / c2) + eps) + wd * p[i])
    else:                                             # norm scales: no weight decay
        for i in prange(n):
            mi = m[i] * b1 + b1c * g[i]
            vi = v[i] * b2 + b2c * g[i] * g[i]
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - lr * ((mi / c1) / (np.sqrt(vi / c2) + eps))
    return p
    # END EXERCISE


register("adamw", _adamw_numpy, _adamw_loops, parallel=True)


def adamw_fusable(params, grads, m, v) -> bool:
    """True when the fused update applies to every parameter: numba backend, and every parameter,
    moment and gradient a float32 array of its parameter's shape (parameters and moments
    contiguous, since they are updated in place)."""
    if not fused(sum(p.size for p in params.values())):
        return False
    for k, p in params.items():
        for a, inplace in ((p, True), (m.get(k), True), (v.get(k), True), (grads.get(k), False)):
            if not isinstance(a, np.ndarray) or a.dtype != np.float32 or a.shape != p.shape \
                    or (inplace and not a.flags.c_contiguous):
                return False
    return True


def adamw_update(p, g, m, v, lr, b1, b2, c1, c2, eps, wd) -> None:
    """Update one float32 parameter p and its moments m, v in place (see adamw_fusable)."""
    s = np.array([lr, b1, 1 - b1, b2, 1 - b2, c1, c2, eps, wd], dtype=np.float32)
    get("adamw", "numba", p.size)(p.reshape(-1), np.ascontiguousarray(g).reshape(-1),
                                  m.reshape(-1), v.reshape(-1), s)

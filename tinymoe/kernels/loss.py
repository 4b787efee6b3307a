"""Fused cross-entropy: log-softmax, the target's negative log-likelihood and the softmax cache in
one pass per row of logits; the backward p - onehot(t), scaled, in one more.

The plain `cross_entropy_forward` / `cross_entropy_backward` (tinymoe/layers/basic.py) make about
eight NumPy passes over the logits [N, V]. Per row z here (rows are independent: `prange`):

    m = max z;  e = exp(z - m);  lse = m + log(sum e);  p = e / sum e;  nll = lse - z[t]
    backward:  dz = dloss / n_valid * (p - onehot(t))      (0 on rows with t = ignore_index)

Targets are checked first (the loops index with them). The loss is the float64 sum of the
valid rows' nll over n_valid, as in the plain function.
"""
from __future__ import annotations

import math

import numpy as np

from tinymoe.kernels import fused, get, register
from tinymoe.kernels._math import exp_nonpositive, row_max, row_sum

prange = range            # numba.prange once a kernel is compiled (tinymoe.kernels.get)


def _cross_entropy_numpy(z, targets, valid):
    """z [N, V], targets [N], valid [N] bool -> p [N, V], nll [N] (0 where not valid)."""
    from tinymoe.layers.basic import cross_entropy_forward
    p = np.empty_like(z)
    nll = np.zeros(z.shape[0], dtype=z.dtype)
    for n in range(z.shape[0]):                       # one row at a time through the plain loss
        t = targets[n:n + 1] if valid[n] else np.array([-100])
        loss, cache = cross_entropy_forward(z[n:n + 1], t)
        p[n], nll[n] = cache.p[0], loss
    return p, nll


def _cross_entropy_loops(z, targets, valid):
    N, V = z.shape
    p = np.empty((N, V), dtype=z.dtype)
    nll = np.zeros(N, dtype=z.dtype)
    for n in prange(N):
        x, out = z[n], p[n]
        m = row_max(x, V)
        for v in range(V):
            out[v] = exp_nonpositive(x[v] - m)
        total = row_sum(out, V)
        inv = 1.0 / total
        for v in range(V):
            out[v] = out[v] * inv
        if valid[n]:
            nll[n] = m + math.log(total) - x[targets[n]]
    return p, nll


register("cross_entropy", _cross_entropy_numpy, _cross_entropy_loops, parallel=True)


def _cross_entropy_backward_numpy(p, targets, valid, scale):
    """p [N, V], targets [N], valid [N], scale = dloss / n_valid -> dz [N, V]."""
    # BEGIN EXERCISE cross-entropy-backward
    dz = p * scale
    rows = np.nonzero(valid)[0]
    dz[rows, targets[rows]] -= scale
    dz[~valid] = 0
    return dz
    # END EXERCISE


def _cross_entropy_backward_loops(p, targets, valid, scale):
    # BEGIN EXERCISE cross-entropy-backward
    N, V = p.shape
    dz = np.zeros((N, V), dtype=p.dtype)
    for n in prange(N):
        if valid[n]:
            for v in range(V):
                dz[n, v] = p[n, v] * scale
            dz[n, targets[n]] = (p[n, targets[n]] - 1.0) * scale
    return dz
    # END EXERCISE


register("cross_entropy_backward", _cross_entropy_backward_numpy, _cross_entropy_backward_loops,
         parallel=True)


def cross_entropy_forward_fused(logits, targets, ignore_index: int = -100):
    """[N, V], [N] int -> scalar, CrossEntropyCache: cross_entropy_forward in one pass per row
    (float32, numba backend; otherwise the plain function). Same checks, same cache."""
    from tinymoe.checks import check_float, check_shape, check_tokens
    from tinymoe.layers.basic import CrossEntropyCache, cross_entropy_forward
    if not isinstance(logits, np.ndarray) or logits.dtype != np.float32 or logits.ndim != 2 \
            or not fused(logits.size) or not isinstance(targets, np.ndarray) \
            or not np.issubdtype(targets.dtype, np.integer):
        return cross_entropy_forward(logits, targets, ignore_index)
    check_float("logits", logits, ndim=2)
    check_shape("targets", targets, (logits.shape[0],))
    valid = targets != ignore_index                              # [N]
    check_tokens(f"targets (ignoring {ignore_index})", targets[valid], logits.shape[1])
    p, nll = get("cross_entropy", "numba", logits.size)(
        np.ascontiguousarray(logits), np.where(valid, targets, 0).astype(np.int64), valid)
    n_valid = int(valid.sum())
    loss = float(nll[valid].sum(dtype=np.float64) / n_valid) if n_valid else 0.0
    return loss, CrossEntropyCache(p, targets, valid, n_valid)


def cross_entropy_backward_fused(dloss: float, cache):
    """scalar -> dlogits [N, V]: cross_entropy_backward in one pass (float32, numba backend)."""
    from tinymoe.layers.basic import cross_entropy_backward
    p, targets, valid, n_valid = cache
    if p.dtype != np.float32 or not fused(p.size) or n_valid == 0 or not p.flags.c_contiguous:
        return cross_entropy_backward(dloss, cache)
    scale = np.float32(dloss / n_valid)
    return get("cross_entropy_backward", "numba", p.size)(
        p, np.where(valid, targets, 0).astype(np.int64), valid, scale)

"""Helpers for the kernels: plain Python functions that tinymoe.kernels.get jits (inlined).

exp_nonpositive(x) = exp(x) for x <= 0, as straight-line arithmetic. numba has no vector exp
without Intel's SVML, so a kernel calling math.exp pays a scalar libm call per element (about
5x NumPy's vectorised exp on this project's machine); this branch-free version lets LLVM
vectorise the loop around it. Every softmax, sigmoid and cross-entropy exponent is <= 0 after its
max is subtracted (or for exp(-|a|)), so this is the only exp the kernels need:

    x = max(x, -88)                     exp(-88) = 6e-39: below float32's normal range anyway
    y = x / 128                         in [-0.6875, 0]
    e^y = sum_{i<=12} y^i / i!          Taylor, Horner form (truncation < 2e-12 at |y| <= 0.6875)
    e^x = (e^y)^128                     seven squarings

in float64. The squarings multiply the relative error of e^y by 128, so the result is within
3e-10 relative of exp(x) (tests/test_fused.py checks it against np.exp), far below float32's
resolution (6e-8), which is the only dtype the fused paths run in.
"""
from __future__ import annotations

import numpy as np


def exp_nonpositive(x):
    """exp(x) for x <= 0 (x = -inf or below -88 gives exp(-88) ~ 6e-39, not 0); float64."""
    y = max(x, -88.0) * 0.0078125                 # x / 128
    p = 2.08767569878681e-09                      # 1/12!
    p = 2.505210838544172e-08 + y * p             # 1/11!
    p = 2.755731922398589e-07 + y * p
    p = 2.7557319223985893e-06 + y * p
    p = 2.48015873015873e-05 + y * p
    p = 0.0001984126984126984 + y * p
    p = 0.001388888888888889 + y * p
    p = 0.008333333333333333 + y * p
    p = 0.041666666666666664 + y * p
    p = 0.16666666666666666 + y * p
    p = 0.5 + y * p
    p = 1.0 + y * p
    p = 1.0 + y * p                               # e^y
    p = p * p                                     # e^(2y)
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p
    p = p * p                                     # e^(128 y) = e^x
    return p


def row_max(x, n):
    """max(x[0:n]) for n >= 1; sixteen running maxima (as row_sum), so the loop vectorises.

    A maximum has no rounding, so the order never changes the result.
    """
    acc = np.full(16, x[0])
    nb = n - n % 16
    for s0 in range(0, nb, 16):
        for j in range(16):
            v = x[s0 + j]
            acc[j] = v if v > acc[j] else acc[j]
    m = acc[0]
    for j in range(16):
        m = acc[j] if acc[j] > m else m
    for s in range(nb, n):
        m = x[s] if x[s] > m else m
    return m


def row_sum(x, n):
    """sum(x[0:n]) in float64, in a fixed order that vectorises without fastmath.

    Sixteen partial sums: acc[j] adds x[j], x[16 + j], x[32 + j], ...; then acc[0] + ... + acc[15]
    and the tail x[16 * (n // 16):n] in order. The order depends only on n, never on threads.
    """
    acc = np.zeros(16)
    nb = n - n % 16
    for s0 in range(0, nb, 16):
        for j in range(16):
            acc[j] += x[s0 + j]
    total = 0.0
    for j in range(16):
        total += acc[j]
    for s in range(nb, n):
        total += x[s]
    return total

"""All routed experts of a MoE layer in one stack of products: the fused twin of the per-expert
loop in tinymoe/layers/moe.py (step 4), for layers whose experts are too small to keep BLAS busy.

The loop calls swiglu_forward once per expert on its block of sorted rows. With many small
experts (lesson 06: 64 experts of width 1 on 32-row blocks) each call is a few microseconds of
arithmetic behind tens of microseconds of Python, so the layer spends its time dispatching. Here
the blocks are copied into one zero-padded stack and every product is ONE batched matmul:

    xp[e, j]  = xs[offsets[e] + j]     j < load_e, else 0          [E, C, D]   C = max load
    h1 = xp W1_e^T,  h3 = xp W3_e^T                                 [E, C, F]
    g  = h1 * sigmoid(h1) * h3                                      [E, C, F]
    ys[offsets[e] + j] = (g W2_e^T)[e, j]                           [M, D]

A padded row is 0, so its g is 0 and it adds exactly 0 to every weight gradient; an expert with
no rows gets zero gradients, as in the loop. Same formulas as swiglu_forward/backward, so the
result equals the loop's up to float summation order (tests/test_fused.py). It is used, like the
other fused paths, for float32 under the numba backend (`kernels.fused`), and only while the
experts are small: mean rows per expert x F x D below EXPERTS_BATCH_MAX_WORK (2^16), where the
padding and the copies cost less than the calls they save; bigger experts keep the loop.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

EXPERTS_BATCH_MAX_WORK = 1 << 16
# tinymoe.fp8.fp8_linears() sets this False while it routes every expert's GEMMs through FP8 by
# swapping the SwiGLU functions the per-expert loop calls (this stack would bypass them).
BATCHED = True


class ExpertsCache(NamedTuple):
    xp: np.ndarray        # [E, C, D]  padded rows of every expert
    h1: np.ndarray        # [E, C, F]
    h3: np.ndarray        # [E, C, F]
    sg: np.ndarray        # [E, C, F]  sigmoid(h1)
    g: np.ndarray         # [E, C, F]  h1 * sg * h3
    e_row: np.ndarray     # [M]        expert of each sorted row
    j_row: np.ndarray     # [M]        its slot in that expert's padded block
    w1: np.ndarray        # [E, F, D]
    w2: np.ndarray        # [E, D, F]
    w3: np.ndarray        # [E, F, D]


def use_batched(xs: np.ndarray, offsets: np.ndarray, w1: np.ndarray) -> bool:
    """Should moe_forward run its experts as one padded stack? (float32, fused kernels on,
    small experts, not inside fp8_linears; see the module docstring.)"""
    from tinymoe.kernels import fused
    E, F, D = w1.shape
    M = int(offsets[-1])
    return (BATCHED and xs.dtype == np.float32 and w1.dtype == np.float32 and M > 0
            and fused(M * D) and M * F * D < EXPERTS_BATCH_MAX_WORK * E)


def experts_forward_batched(xs, offsets, w1, w2, w3):
    """xs [M, D] rows sorted by expert, offsets [E+1], W1/W3 [E, F, D], W2 [E, D, F]
    -> ys [M, D], ExpertsCache."""
    from tinymoe.layers.basic import sigmoid
    E, F, D = w1.shape
    M = xs.shape[0]
    loads = np.diff(offsets)                                           # [E]
    e_row = np.repeat(np.arange(E), loads)                             # [M]
    j_row = np.arange(M) - offsets[e_row]                              # [M]
    xp = np.zeros((E, int(loads.max()), D), dtype=xs.dtype)            # [E, C, D]
    xp[e_row, j_row] = xs
    h1 = xp @ w1.transpose(0, 2, 1)                                    # [E, C, F]
    h3 = xp @ w3.transpose(0, 2, 1)                                    # [E, C, F]
    sg = sigmoid(h1)
    g = h1 * sg * h3                                                   # [E, C, F]
    ys = (g @ w2.transpose(0, 2, 1))[e_row, j_row]                     # [M, D]
    return ys, ExpertsCache(xp, h1, h3, sg, g, e_row, j_row, w1, w2, w3)


def experts_backward_batched(dys, cache: ExpertsCache):
    """dys [M, D] -> dxs [M, D], dW1 [E, F, D], dW2 [E, D, F], dW3 [E, F, D]."""
    xp, h1, h3, sg, g, e_row, j_row, w1, w2, w3 = cache
    # BEGIN EXERCISE swiglu-backward
    dyp = np.zeros(xp.shape[:2] + (dys.shape[1],), dtype=dys.dtype)  # [E, C, D], padded rows 0
    dyp[e_row, j_row] = dys
    # 3. forward: y = g @ W2^T
    dw2 = dyp.transpose(0, 2, 1) @ g                                   # [E, D, F]
    dg = dyp @ w2                                                      # [E, C, F]
    # 2. forward: g = h1 * sigmoid(h1) * h3
    dh3 = dg * h1 * sg
    dh1 = dg * h3 * sg * (1 + h1 * (1 - sg))
    # 1. forward: h1 = x @ W1^T ; h3 = x @ W3^T
    dw1 = dh1.transpose(0, 2, 1) @ xp                                  # [E, F, D]
    dw3 = dh3.transpose(0, 2, 1) @ xp
    dxs = (dh1 @ w1 + dh3 @ w3)[e_row, j_row]                          # [M, D]
    return dxs, dw1, dw2, dw3
    # END EXERCISE

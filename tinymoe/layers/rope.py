"""Rotary position embedding (RoPE, Su et al. 2021) in DeepSeek's interleaved-pair layout, and YaRN.

RoPE rotates each pair (x_{2j}, x_{2j+1}) of a vector at absolute position t by the angle
phi_{t,j} = t * inv_freq_j, inv_freq_j = theta^(-2j/Dr), j = 0..Dr/2-1:

    y_{2j}   = x_{2j} cos(phi) - x_{2j+1} sin(phi)
    y_{2j+1} = x_{2j} sin(phi) + x_{2j+1} cos(phi)

so q_s . k_t depends only on the offset s - t. DeepSeek applies it only to the Dr "rope" values of
each query head and to one Dr-wide key shared by all heads (decoupled RoPE, DeepSeek-V2 2.1.3).
This is the official weights' layout ([OFF] `apply_rotary_emb`, complex multiply of adjacent
pairs); Hugging Face's `rope_interleave` permutation lives only in `tinymoe/hf.py`.

YaRN (Peng et al. 2023; DeepSeek-V3 4.3), on iff max_seq_len > original_seq_len:
    cd(n)  = Dr * ln(L_orig / (2 pi n)) / (2 ln theta)
    low    = max(floor(cd(beta_fast)), 0),  high = min(ceil(cd(beta_slow)), Dr - 1)
    ramp_j = clip((j - low) / (high - low), 0, 1)
    inv_freq'_j = inv_freq_j / s * ramp_j + inv_freq_j * (1 - ramp_j)
and the softmax scale becomes (Dn + Dr)^(-1/2) * m^2 with m = 0.1 * mscale * ln(s) + 1.
reference/deepseek.md section 4.
"""
from __future__ import annotations

import math

import numpy as np

from tinymoe.checks import check_float


def yarn_bounds(dim: int, theta: float, original_seq_len: int, beta_fast: float,
                beta_slow: float) -> tuple[float, float]:
    """(low, high): the frequency slots where the YaRN ramp starts and ends (V3: 10 and 23)."""

    def correction_dim(n_rot: float) -> float:
        return dim * math.log(original_seq_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001          # avoid a zero-width ramp, as the reference code does
    return low, high


def yarn_ramp(dim: int, low: float, high: float) -> np.ndarray:
    """[Dr/2]: 0 for high-frequency slots j <= low (kept), 1 for j >= high (divided by s)."""
    j = np.arange(dim // 2, dtype=np.float64)
    return np.clip((j - low) / (high - low), 0.0, 1.0)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """m(s, a) = 0.1 * a * ln(s) + 1 for s > 1, else 1 (the YaRN attention magnitude factor)."""
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def rope_inv_freq(cfg) -> np.ndarray:
    """[Dr/2] float64: inv_freq_j = theta^(-2j/Dr), YaRN-corrected when cfg.yarn."""
    dim = cfg.qk_rope_head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)  # [Dr/2]
    if cfg.yarn:
        low, high = yarn_bounds(dim, cfg.rope_theta, cfg.original_seq_len, cfg.beta_fast,
                                cfg.beta_slow)
        ramp = yarn_ramp(dim, low, high)                                             # [Dr/2]
        inv_freq = inv_freq / cfg.rope_factor * ramp + inv_freq * (1.0 - ramp)
    return inv_freq


def softmax_scale(cfg) -> float:
    """(Dn + Dr)^(-1/2), times m(s, mscale)^2 when YaRN is on (V3: 0.1352338)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn:
        scale *= yarn_mscale(cfg.rope_factor, cfg.mscale) ** 2
    return scale


def rope_angles(cfg, positions: np.ndarray, dtype=np.float64):
    """[T] int positions -> cos, sin [T, Dr/2] in `dtype` (angles computed in float64)."""
    positions = np.asarray(positions)
    if not np.issubdtype(positions.dtype, np.integer) or positions.ndim != 1:
        raise TypeError(f"positions: expected a 1-d integer array, got dtype {positions.dtype}, "
                        f"shape {list(positions.shape)}")
    if positions.size and (positions.min() < 0 or positions.max() >= cfg.max_seq_len):
        raise ValueError(f"positions: range [{positions.min()}, {positions.max()}] is outside "
                         f"[0, max_seq_len={cfg.max_seq_len})")
    phi = np.outer(positions.astype(np.float64), rope_inv_freq(cfg))               # [T, Dr/2]
    return np.cos(phi).astype(dtype), np.sin(phi).astype(dtype)


def _broadcast(c: np.ndarray, x: np.ndarray) -> np.ndarray:
    """cos/sin [T, Dr/2] -> [1, T, 1, ..., Dr/2] so that it lines up with x [B, T, ..., Dr/2]."""
    return c.reshape((1, c.shape[0]) + (1,) * (x.ndim - 3) + (c.shape[1],))


def rope_forward(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """[B, T, ..., Dr], cos/sin [T, Dr/2] -> [B, T, ..., Dr]: rotate interleaved pairs.

        y[..., 2j]   = x[..., 2j] cos(phi_tj) - x[..., 2j+1] sin(phi_tj)
        y[..., 2j+1] = x[..., 2j] sin(phi_tj) + x[..., 2j+1] cos(phi_tj)

    i.e. the complex product (x_2j + i x_2j+1) e^{i phi} of [OFF] `apply_rotary_emb`. Any number
    of head axes may sit between T and Dr. No cache: the backward needs only cos and sin.
    Returns x's dtype (cos/sin are cast to it).
    """
    check_float("x", x)
    if cos.ndim != 2 or sin.shape != cos.shape:
        raise ValueError(f"cos, sin: expected two arrays of shape [T, Dr/2], got "
                         f"{list(np.shape(cos))} and {list(np.shape(sin))}")
    if x.ndim < 3 or x.shape[1] != cos.shape[0] or x.shape[-1] != 2 * cos.shape[1]:
        raise ValueError(f"x: expected [B, T={cos.shape[0]}, ..., Dr={2 * cos.shape[1]}], "
                         f"got {list(x.shape)}")
    # BEGIN EXERCISE rope
    c, s = _broadcast(cos, x), _broadcast(sin, x)
    x0, x1 = x[..., 0::2], x[..., 1::2]                            # [B, T, ..., Dr/2] each
    y = np.empty_like(x)                                           # [B, T, ..., Dr]
    y[..., 0::2] = x0 * c - x1 * s
    y[..., 1::2] = x0 * s + x1 * c
    return y
    # END EXERCISE


def rope_backward(dy: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """[B, T, ..., Dr], cos/sin [T, Dr/2] -> dx [B, T, ..., Dr]:  dx = R(phi)^T dy = R(-phi) dy.

    Each 2x2 block R = [[c, -s], [s, c]] is orthogonal, so its transpose is the rotation by -phi.
    """
    # BEGIN EXERCISE rope
    # forward: y = R(phi) x
    return rope_forward(dy, cos, -sin)
    # END EXERCISE

"""FP8 by hand, as DeepSeek-V3 trains with it (V3 3.3): formats, scaling, GEMM, a training switch.

Everything here is simulation in float32/float64 NumPy, written to be read next to the paper;
nothing in tinymoe needs it unless a lesson asks for it (lesson 11). Numbers are sourced in
shared/reference/cheap.md section 4.

1. Formats.  A float with E exponent bits (bias b) and M mantissa bits holds

       normal:     (-1)^s * 1.m * 2^(e - b)        exponent field e in [1, top]
       subnormal:  (-1)^s * 0.m * 2^(1 - b)        exponent field 0 (evenly spaced down to 0)

   E4M3 (`float8_e4m3fn`, V3's only format): b = 7, max 448 = 1.75 * 2^8, no inf, NaN is only
   S.1111.111 (so the top exponent field still holds normals); min normal 2^-6, min subnormal
   2^-9, eps 2^-3. E5M2 (`float8_e5m2`): b = 15, max 57344 = 1.75 * 2^15, IEEE inf and NaNs,
   min normal 2^-14, min subnormal 2^-16. BF16 is the same machinery with E = 8, M = 7.
   Rounding is to nearest, ties to even, in one step from the input (`round_to`):

       e = max(floor(log2 |x|), 1 - b)       the binade; subnormals share the smallest one
       q = 2^(e - M)                         spacing of representable values there
       r = rint(|x| / q) * q                 rint = round half to even; |x| / q is exact

   then overflow (r > max): inf (E5M2), NaN (E4M3, which has no inf), or +-max with
   `saturate=True` (what a quantiser wants; PTX calls it satfinite). `encode` writes the bit
   pattern and `decode` reads it back; both agree bit for bit with `ml_dtypes` (tests/test_fp8.py).

2. Scaling (V3 3.3.2).  FP8 covers only ~18 binades, so a tensor is divided by a scale first:

       s_blk = amax(|x| over the block) / max_fp8     (s = 1 for an all-zero block)
       x_q   = round_to(x / s_blk, saturate=True)     x ~ x_q * s_blk   (`quantize`, `dequantize`)

   Per tensor: one block. V3: activations per 1x128 tile (one token, 128 channels), weights per
   128x128 block; the max is taken online, no delayed scaling. One outlier then only costs its
   own tile the precision of the small values (lesson 11, part 2).

3. GEMM (V3 3.3.2, 3.5.2, Fig. 7b).  `gemm(A, B)` computes A @ B^T for quantised operands whose
   scales run along the inner dimension K. The tensor core multiplies FP8 values exactly but
   accumulates with limited precision: "about 14 bits" on the H800, which the paper measured as
   a max relative error of nearly 2 % for K = 4096 (it names neither the inputs nor the error
   measure; this model gives 0.13 % on Gaussian and 6.6 % on all-positive inputs, relative
   Frobenius error, lesson 11). We model it as in V3 3.5.2: for each group
   of 32 products (one WGMMA step), the products and the running accumulator are aligned to the
   largest exponent among them and only the top `acc_bits` = 14 bits are kept, the rest truncated:

       ulp  = 2^(e_top - acc_bits + 1)      e_top = floor(log2 max(|acc|, max_k |p_k|))
       acc <- trunc(acc / ulp) * ulp + sum_k trunc(p_k / ulp) * ulp        (exact in float64)

   V3's fix: every N_C = 128 elements (4 WGMMAs) the partial sum is promoted to an FP32 register
   on the CUDA cores, multiplied there by the two scales of that K-interval, and the tensor-core
   accumulator restarts from 0:

       C[m, n] (FP32) += fp32(acc) * (s_A[m, c] * s_B[n, c])        c = the interval's index

   `interval=None` accumulates the whole K in the tensor core (no promotion; the scales must then
   be constant along K, e.g. per tensor). `acc_bits=None` accumulates each interval with float32
   BLAS instead (the reference). The accumulation is a numba kernel beside its NumPy twin
   (`tinymoe.kernels` registry; TINYMOE_BACKEND=numpy picks the twin); both give the same bits.

4. Training (V3 3.3.1).  `fp8_linears()` is a teaching device: a context manager that, inside its
   with-block, swaps the model's Linear GEMMs for emulated FP8 ones (Fprop, Dgrad and Wgrad, all
   E4M3, as V3) and puts the originals back on exit. It replaces the module-level names the model
   calls: `linear_forward/linear_backward` in tinymoe.layers.mla (the attention projections) and
   `swiglu_forward/swiglu_backward` in tinymoe.model and tinymoe.layers.moe (dense FFN, routed and
   shared experts). Left in higher precision, as in V3: the embedding, the output head (and the
   MTP projection; model.py's own linear calls), the router gate, the norms and the attention
   operators (softmax(QK^T)V). The MHA/GQA baselines compute their projections inline and stay
   float32. Not thread-safe; meant for scripts. Simplifications against V3: every FP8 input is
   E4M3 (V3 gives the input of the Linear after attention a custom E5M6 with power-of-2 scales,
   3.3.3); GEMM outputs are float32 (V3: BF16 or FP32); the backward is the float backward with
   its two GEMMs in FP8 (the rounding itself is not differentiated: a straight-through estimate,
   as in any FP8 training); Wgrad re-quantises x and dy in tiles along the tokens.

Shape letters: M rows, K inner dimension, N output columns (A is [M, K], B is [N, K]).
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import NamedTuple, Optional, Tuple

import numpy as np

from tinymoe.checks import check_float, check_shape
from tinymoe.kernels import get, register
from tinymoe.layers.basic import sigmoid

Block = Optional[Tuple[int, int]]

TILE = (1, 128)         # V3: activations, one token x 128 channels
BLOCK = (128, 128)      # V3: weights, 128 output x 128 input channels
INTERVAL = 128          # V3: N_C, elements accumulated in the tensor core before promotion
ACC_BITS = 14           # V3 3.3.2 / 3.5.2: bits the H800 keeps when accumulating FP8 products
WGMMA_K = 32            # V3 3.5.2: products aligned together (one WGMMA step for FP8)


# ================================================================================================
# 1. formats
# ================================================================================================

class FloatFormat(NamedTuple):
    """A small binary float: 1 sign bit, `exp_bits` exponent bits, `man_bits` mantissa bits."""
    name: str
    exp_bits: int
    man_bits: int
    bias: int
    has_inf: bool      # IEEE-style: the top exponent field holds only inf and NaN
    nan_code: int      # the (unsigned) code written for NaN, the one ml_dtypes writes

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade, 1 - bias (subnormals share its spacing)."""
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest binade that holds finite values."""
        top = 2 ** self.exp_bits - 1
        return (top - 1 if self.has_inf else top) - self.bias

    @property
    def max(self) -> float:
        """Largest finite value: 1.11..1 * 2^emax, or 1.11..0 when the all-ones code is NaN."""
        frac = 2.0 - 2.0 ** -self.man_bits if self.has_inf else 2.0 - 2.0 ** (1 - self.man_bits)
        return frac * 2.0 ** self.emax

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.man_bits)

    @property
    def n_bits(self) -> int:
        return 1 + self.exp_bits + self.man_bits


E4M3 = FloatFormat("e4m3", 4, 3, 7, has_inf=False, nan_code=0x7F)      # torch.float8_e4m3fn
E5M2 = FloatFormat("e5m2", 5, 2, 15, has_inf=True, nan_code=0x7E)      # torch.float8_e5m2
BF16 = FloatFormat("bf16", 8, 7, 127, has_inf=True, nan_code=0x7FC0)   # bfloat16, for comparison
FORMATS = {f.name: f for f in (E4M3, E5M2, BF16)}


def _check_format(fmt) -> FloatFormat:
    if not isinstance(fmt, FloatFormat):
        raise TypeError(f"fmt: expected a FloatFormat (fp8.E4M3, fp8.E5M2, fp8.BF16), got {fmt!r}")
    return fmt


def round_to(x, fmt: FloatFormat = E4M3, saturate: bool = False) -> np.ndarray:
    """[...] float -> [...] same dtype: the nearest value of `fmt` (ties to even), as a float.

    Overflow gives inf (formats with inf) or NaN (E4M3), or +-max with saturate=True (which also
    maps +-inf to +-max; NaN stays NaN). Signs, -0 included, are kept. One rounding, straight from
    the input (float64 inputs are not rounded to float32 first).
    """
    fmt = _check_format(fmt)
    x = np.asarray(x)
    check_float("x", x)
    with np.errstate(invalid="ignore"):                          # NaN and inf pass through
        a = np.abs(x.astype(np.float64))                         # [...]
        _, e = np.frexp(a)                                       # a = f 2^e, f in [0.5, 1)
        e = np.maximum(e - 1, fmt.emin)                          # binade 2^e <= a < 2^(e+1)
        q = np.ldexp(1.0, e - fmt.man_bits)                      # spacing in that binade
        r = np.rint(a / q) * q                                   # round half to even
        over = r > fmt.max
        if saturate:
            r = np.where(over, fmt.max, r)
        else:
            r = np.where(over, np.inf if fmt.has_inf else np.nan, r)
        return np.copysign(r, x).astype(x.dtype)


def encode(x, fmt: FloatFormat = E4M3, saturate: bool = False) -> np.ndarray:
    """[...] float -> [...] uint8 (uint16 for BF16): the bit pattern s | exponent | mantissa."""
    fmt = _check_format(fmt)
    r = round_to(x, fmt, saturate).astype(np.float64)
    a = np.abs(r)
    finite = np.isfinite(a)
    a0 = np.where(finite, a, 0.0)
    _, e = np.frexp(a0)
    e = e - 1                                                    # a0 = 1.m * 2^e when normal
    normal = a0 >= fmt.min_normal
    exp_field = np.where(normal, e + fmt.bias, 0)                # 0 marks a subnormal (or zero)
    frac = np.where(normal, np.ldexp(a0, -e) - 1.0, np.ldexp(a0, -fmt.emin))   # in [0, 1)
    man = np.rint(np.ldexp(frac, fmt.man_bits)).astype(np.int64)  # exact: r is on the grid
    code = (exp_field.astype(np.int64) << fmt.man_bits) | man
    top = 2 ** fmt.exp_bits - 1
    code = np.where(np.isinf(a), top << fmt.man_bits, code)       # inf: all-ones exponent, m = 0
    code = np.where(np.isnan(a), fmt.nan_code, code)
    code = code | (np.signbit(r).astype(np.int64) << (fmt.n_bits - 1))
    return code.astype(np.uint8 if fmt.n_bits <= 8 else np.uint16)


def decode(codes, fmt: FloatFormat = E4M3) -> np.ndarray:
    """[...] uint8/uint16 codes -> [...] float32 values (every E4M3/E5M2/BF16 value is a float32)."""
    fmt = _check_format(fmt)
    c = np.asarray(codes)
    if not np.issubdtype(c.dtype, np.integer) or (c.size and (c.min() < 0
                                                              or c.max() >= 2 ** fmt.n_bits)):
        raise ValueError(f"codes: expected integers in [0, 2^{fmt.n_bits}) for {fmt.name}")
    c = c.astype(np.int64)
    sign = np.where(c >> (fmt.n_bits - 1) & 1, -1.0, 1.0)
    exp_field = (c >> fmt.man_bits) & (2 ** fmt.exp_bits - 1)
    man = c & (2 ** fmt.man_bits - 1)
    frac = man / 2.0 ** fmt.man_bits
    value = np.where(exp_field == 0, np.ldexp(frac, fmt.emin),
                     np.ldexp(1.0 + frac, exp_field - fmt.bias))
    top = 2 ** fmt.exp_bits - 1
    if fmt.has_inf:
        value = np.where(exp_field == top, np.where(man == 0, np.inf, np.nan), value)
    else:
        value = np.where((c & ~(1 << (fmt.n_bits - 1))) == fmt.nan_code, np.nan, value)
    return (sign * value).astype(np.float32)


def all_values(fmt: FloatFormat = E4M3) -> np.ndarray:
    """[2^bits] float32: the value of every code, NaNs included (for plots and tests)."""
    return decode(np.arange(2 ** fmt.n_bits), fmt)


# ================================================================================================
# 2. scaling
# ================================================================================================

class Quantized(NamedTuple):
    q: np.ndarray          # [M, K]  float32 values on the FP8 grid (what the tensor core reads)
    scale: np.ndarray      # [ceil(M/bm), ceil(K/bk)] float32, x ~ q * scale of its block
    block: Tuple[int, int]  # (bm, bk) as used: clipped to the tensor (its shape when per tensor)
    fmt: FloatFormat


def _block_shape(name: str, block: Block, shape: tuple) -> Tuple[int, int]:
    """The block actually used on a tensor of `shape`: clipped to it (None = the whole tensor)."""
    if block is None:
        block = shape
    elif (not isinstance(block, tuple) or len(block) != 2
            or not all(isinstance(b, (int, np.integer)) and b >= 1 for b in block)):
        raise ValueError(f"{name}: expected None (per tensor) or a pair of positive ints such as "
                         f"(1, 128), got {block!r}")
    return max(1, min(int(block[0]), shape[0])), max(1, min(int(block[1]), shape[1]))


def _blocks(x: np.ndarray, block: Tuple[int, int]) -> np.ndarray:
    """[M, K] -> [ceil(M/bm), bm, ceil(K/bk), bk] float32, zero-padded at the edges (a view when
    the blocks tile x exactly). Zeros never raise a block's max."""
    M, K = x.shape
    bm, bk = block
    nm, nk = -(-M // bm), -(-K // bk)
    if (nm * bm, nk * bk) == (M, K):
        return x.astype(np.float32, copy=False).reshape(nm, bm, nk, bk)
    padded = np.zeros((nm * bm, nk * bk), dtype=np.float32)
    padded[:M, :K] = x
    return padded.reshape(nm, bm, nk, bk)


def block_amax(x: np.ndarray, block: Block) -> np.ndarray:
    """[M, K] -> [ceil(M/bm), ceil(K/bk)] float32: max |x| over each block (edge blocks smaller)."""
    check_float("x", x, ndim=2)
    return np.abs(_blocks(x, _block_shape("block", block, x.shape))).max(axis=(1, 3))


def expand_scale(scale: np.ndarray, block: Tuple[int, int], shape: tuple) -> np.ndarray:
    """[ceil(M/bm), ceil(K/bk)] -> [M, K]: each block's scale repeated over its elements."""
    bm, bk = block
    return np.repeat(np.repeat(scale, bm, axis=0), bk, axis=1)[:shape[0], :shape[1]]


def quantize(x: np.ndarray, block: Block = TILE, fmt: FloatFormat = E4M3) -> Quantized:
    """[M, K] float -> Quantized: s = amax(block) / max_fp8, q = round_to(x / s, saturate=True).

    block None = per tensor; TILE (1, 128) = V3's activations; BLOCK (128, 128) = V3's weights.
    The scale is computed online from this tensor (V3 3.3.2, no history), in float32.
    """
    fmt = _check_format(fmt)
    check_float("x", x, ndim=2)
    if not np.all(np.isfinite(x)):
        raise ValueError("x: contains NaN or inf; a scale cannot be computed from it")
    blk = _block_shape("block", block, x.shape)
    xb = _blocks(x, blk)                                         # [nm, bm, nk, bk]
    amax = np.abs(xb).max(axis=(1, 3))                           # [nm, nk]
    scale = np.where(amax > 0, amax / np.float32(fmt.max), np.float32(1.0)).astype(np.float32)
    q = round_to(xb / scale[:, None, :, None], fmt, saturate=True)
    M, K = x.shape
    return Quantized(q.reshape(xb.shape[0] * xb.shape[1], -1)[:M, :K], scale, blk, fmt)


def transpose(Q: Quantized) -> Quantized:
    """Quantized of x -> Quantized of x^T, no rounding: a 128x128 block of W is one of W^T too,
    so one FP8 copy of a weight serves Fprop (x W^T) and Dgrad (dy W) (V3 3.3.2)."""
    return Quantized(Q.q.T, Q.scale.T, Q.block[::-1], Q.fmt)


def dequantize(Q: Quantized) -> np.ndarray:
    """Quantized -> [M, K] float32: q * scale of its block."""
    return Q.q * expand_scale(Q.scale, Q.block, Q.q.shape)


def fake_quantize(x: np.ndarray, block: Block = TILE, fmt: FloatFormat = E4M3) -> np.ndarray:
    """[M, K] -> [M, K] in x's dtype: dequantize(quantize(x)), the value FP8 keeps of x."""
    return dequantize(quantize(x, block, fmt)).astype(x.dtype)


# ================================================================================================
# 3. GEMM with limited-precision accumulation, promoted every `interval` elements
# ================================================================================================

def accumulate_numpy(qa, qbt, sa, sb, interval, acc_bits, group):
    """qa [M, K], qbt [K, N] float32 on the FP8 grid, sa [M, C], sb [N, C] -> qa @ qbt [M, N] float32.

    C = ceil(K / interval) promotion intervals; sa[m, c] * sb[n, c] dequantises interval c.
    The tensor-core accumulator is the model of the module docstring (section 3).
    """
    M, K = qa.shape
    N = qbt.shape[1]
    out = np.zeros((M, N), dtype=np.float32)                     # the FP32 registers
    rows = max(1, (1 << 21) // max(1, N * group))                # bound the [rows, G, N] temporary
    for c in range(sa.shape[1]):
        k0, k1 = c * interval, min(K, (c + 1) * interval)
        part = np.zeros((M, N))                                  # tensor-core accumulator
        for g0 in range(k0, k1, group):
            g1 = min(k1, g0 + group)
            for r0 in range(0, M, rows):
                r1 = min(M, r0 + rows)
                p = (qa[r0:r1, g0:g1, None].astype(np.float64)
                     * qbt[None, g0:g1, :])                      # [R, G, N] exact products
                top = np.maximum(np.abs(p).max(axis=1), np.abs(part[r0:r1]))   # [R, N]
                _, e = np.frexp(top)                             # top < 2^e
                ulp = np.ldexp(1.0, e - acc_bits)                # keep acc_bits bits below 2^e
                kept = np.trunc(p / ulp[:, None, :]) * ulp[:, None, :]
                part[r0:r1] = np.trunc(part[r0:r1] / ulp) * ulp + kept.sum(axis=1)
        # promotion: scale on the CUDA cores, add into FP32
        out = out + part.astype(np.float32) * (sa[:, c, None] * sb[None, :, c])
    return out


def _accumulate_loops(qa, qbt, sa, sb, interval, acc_bits, group):
    """The loop twin of accumulate_numpy (jitted by tinymoe.kernels.get).

    For each output row m the N columns advance together (the inner loops run over n, so they
    vectorise); each column keeps its own tensor-core accumulator part[n] and alignment.
    """
    M, K = qa.shape
    N = qbt.shape[1]
    out = np.zeros((M, N), dtype=np.float32)                     # FP32 registers, CUDA cores
    part = np.empty(N)                                           # tensor-core accumulators
    top = np.empty(N)
    inv_ulp = np.empty(N)
    units = np.empty(N)
    for m in range(M):
        for c in range(sa.shape[1]):
            k0 = c * interval
            k1 = min(K, k0 + interval)
            part[:] = 0.0
            for g0 in range(k0, k1, group):
                g1 = min(k1, g0 + group)
                for n in range(N):                               # 1. largest magnitude in play
                    top[n] = abs(part[n])
                for k in range(g0, g1):
                    a = np.float64(qa[m, k])
                    for n in range(N):
                        top[n] = max(top[n], abs(a * qbt[k, n]))
                for n in range(N):                               # 2. align: keep acc_bits bits
                    inv_ulp[n] = math.ldexp(1.0, acc_bits - math.frexp(top[n])[1])
                    units[n] = np.trunc(part[n] * inv_ulp[n])    # whole ulps, exact (< 2^20)
                for k in range(g0, g1):
                    a = np.float64(qa[m, k])
                    for n in range(N):
                        units[n] += np.trunc(a * qbt[k, n] * inv_ulp[n])
                for n in range(N):
                    part[n] = units[n] / inv_ulp[n]
            for n in range(N):                                   # 3. promote and scale
                out[m, n] = out[m, n] + np.float32(part[n]) * (sa[m, c] * sb[n, c])
    return out


register("fp8_accumulate", accumulate_numpy, _accumulate_loops)


def _interval_scales(name: str, Q: Quantized, I: int, C: int) -> np.ndarray:
    """[rows, C]: the scale each row of Q uses in each promotion interval (checked constant)."""
    rows, K = Q.q.shape
    bm, bk = Q.block
    if bk < K and bk % I:
        raise ValueError(f"{name}: block {Q.block} changes scale inside a promotion interval of "
                         f"{I} elements; its K-extent must be a multiple of the interval or cover "
                         f"all K = {K} (per tensor)")
    cols = np.minimum(np.arange(C) * I // bk, Q.scale.shape[1] - 1)
    return np.ascontiguousarray(np.repeat(Q.scale, bm, axis=0)[:rows][:, cols], dtype=np.float32)


def gemm(A: Quantized, B: Quantized, acc_bits: Optional[int] = ACC_BITS,
         interval: Optional[int] = INTERVAL, group: int = WGMMA_K) -> np.ndarray:
    """A [M, K], B [N, K] quantised -> A @ B^T [M, N] float32, accumulated as in V3 3.3.2.

    acc_bits: bits kept by the tensor-core accumulator (None: float32 BLAS per interval).
    interval: elements between promotions to FP32 (None: never, the whole K in the tensor core).
    """
    for name, Q in (("A", A), ("B", B)):
        if not isinstance(Q, Quantized):
            raise TypeError(f"{name}: expected a Quantized (fp8.quantize), got {type(Q).__name__}")
    M, K = A.q.shape
    check_shape("B.q", B.q, (None, K))
    if K == 0:
        raise ValueError("A: the inner dimension K is 0")
    if interval is not None and (not isinstance(interval, (int, np.integer)) or interval < 1):
        raise ValueError(f"interval = {interval!r}: must be a positive int or None")
    if acc_bits is not None and (not isinstance(acc_bits, (int, np.integer)) or
                                 not 2 <= acc_bits <= 40):
        raise ValueError(f"acc_bits = {acc_bits!r}: must be an int in [2, 40] or None")
    I = K if interval is None else int(interval)
    C = -(-K // I)
    sa, sb = _interval_scales("A", A, I, C), _interval_scales("B", B, I, C)
    qa = np.ascontiguousarray(A.q, dtype=np.float32)                        # [M, K]
    qbt = np.ascontiguousarray(B.q.T, dtype=np.float32)                     # [K, N]
    if acc_bits is None:
        out = np.zeros((M, qbt.shape[1]), dtype=np.float32)
        for c in range(C):
            part = qa[:, c * I:(c + 1) * I] @ qbt[c * I:(c + 1) * I]         # float32 BLAS
            out = out + part * (sa[:, c, None] * sb[None, :, c])
        return out
    return get("fp8_accumulate")(qa, qbt, sa, sb, I, int(acc_bits), int(group))


def fp8_matmul(a: np.ndarray, b: np.ndarray, a_block: Block = TILE, b_block: Block = BLOCK,
               fmt: FloatFormat = E4M3, acc_bits: Optional[int] = ACC_BITS,
               interval: Optional[int] = INTERVAL) -> np.ndarray:
    """a [M, K], b [N, K] float -> a @ b^T [M, N] float32 through FP8 (quantize both, then gemm)."""
    return gemm(quantize(a, a_block, fmt), quantize(b, b_block, fmt), acc_bits, interval)


# ================================================================================================
# 4. the Linear pair in FP8, SwiGLU over any linear pair, and the training switch
# ================================================================================================

class Recipe(NamedTuple):
    """How the three GEMMs of a Linear are run (V3 3.3: E4M3, 1x128 / 128x128, 14 bits, 128)."""
    fmt: FloatFormat = E4M3
    act_block: Block = TILE        # activations and activation gradients, along K
    weight_block: Block = BLOCK    # weights
    acc_bits: Optional[int] = ACC_BITS
    interval: Optional[int] = INTERVAL


V3_RECIPE = Recipe()


class FP8LinearCache(NamedTuple):
    x: np.ndarray         # [N, In] the input, flattened (quantised again, along N, for Wgrad)
    w: np.ndarray         # [Out, In]
    qw: Quantized         # W in 128x128 blocks, reused (transposed) by Dgrad
    lead: tuple           # leading shape of the input, [...]
    recipe: Recipe
    counts: Optional[dict]  # GEMM counter of the fp8_linears block, or None


def _count(counts: Optional[dict], key: str) -> None:
    if counts is not None:
        counts[key] += 1


def fp8_linear_forward(x: np.ndarray, w: np.ndarray, recipe: Recipe = V3_RECIPE,
                       counts: Optional[dict] = None):
    """[..., In], [Out, In] -> [..., Out]:  Fprop  y = Q_tile(x) @ Q_block(W)^T, in x's dtype."""
    check_float("x", x)
    check_float("w", w, ndim=2)
    if x.ndim == 0 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"x: shape {list(x.shape)} does not end in w's in-features "
                         f"{w.shape[1]} (w is [out, in] = {list(w.shape)})")
    x2 = x.reshape(-1, x.shape[-1])                                          # [N, In]
    qw = quantize(w, recipe.weight_block, recipe.fmt)
    y = gemm(quantize(x2, recipe.act_block, recipe.fmt), qw,
             recipe.acc_bits, recipe.interval)                               # [N, Out]
    _count(counts, "fprop")
    return (y.astype(x.dtype, copy=False).reshape(x.shape[:-1] + (w.shape[0],)),
            FP8LinearCache(x2, w, qw, x.shape[:-1], recipe, counts))


def fp8_linear_backward(dy: np.ndarray, cache: FP8LinearCache):
    """[..., Out] -> dx [..., In], dW [Out, In], both GEMMs in FP8 with scales along their K:

        Dgrad  dx = Q_tile(dy) @ Q_block(W^T)^T           K = Out (Q_block(W^T) = Q_block(W)^T)
        Wgrad  dW = Q_tile(dy^T) @ Q_tile(x^T)^T          K = N tokens (tiles run along tokens)
    """
    x2, w, qw, lead, r, counts = cache
    check_shape("dy", dy, lead + (w.shape[0],))
    dy2 = dy.reshape(-1, w.shape[0])                                         # [N, Out]
    # forward: y = x @ w.T
    dx = gemm(quantize(dy2, r.act_block, r.fmt), transpose(qw),
              r.acc_bits, r.interval)                                        # [N, In]
    dw = gemm(quantize(np.ascontiguousarray(dy2.T), r.act_block, r.fmt),
              quantize(np.ascontiguousarray(x2.T), r.act_block, r.fmt),
              r.acc_bits, r.interval)                                        # [Out, In]
    _count(counts, "dgrad")
    _count(counts, "wgrad")
    return dx.astype(dy.dtype, copy=False).reshape(lead + (w.shape[1],)), dw.astype(w.dtype)


class SwiGLUOverCache(NamedTuple):
    c1: object          # linear cache of h1 = x @ W1^T
    c3: object          # linear cache of h3 = x @ W3^T
    c2: object          # linear cache of y = g @ W2^T
    h1: np.ndarray      # [N, F]
    h3: np.ndarray      # [N, F]
    sg: np.ndarray      # [N, F] sigmoid(h1)


def swiglu_over(linear_fwd, linear_bwd):
    """(forward, backward) of basic.swiglu's MLP with its three GEMMs done by a given linear pair.

        y = (silu(x W1^T) * (x W3^T)) W2^T,   silu'(a) = s (1 + a (1 - s)),  s = sigmoid(a)

    With basic.linear_forward/backward it equals basic.swiglu_forward/backward (tested); with the
    FP8 pair it is the FP8 expert of V3 3.3 (the gating stays in the input's float precision).
    """
    def forward(x, w1, w2, w3):
        """[N, D], W1 [F, D], W2 [D, F], W3 [F, D] -> [N, D], SwiGLUOverCache."""
        h1, c1 = linear_fwd(x, w1)                                           # [N, F]
        h3, c3 = linear_fwd(x, w3)                                           # [N, F]
        sg = sigmoid(h1)                                                     # [N, F]
        y, c2 = linear_fwd(h1 * sg * h3, w2)                                 # [N, D]
        return y, SwiGLUOverCache(c1, c3, c2, h1, h3, sg)

    def backward(dy, cache):
        """[N, D] -> dx [N, D], dW1 [F, D], dW2 [D, F], dW3 [F, D]."""
        c1, c3, c2, h1, h3, sg = cache
        # forward: y = g @ w2.T
        dg, dw2 = linear_bwd(dy, c2)
        # forward: g = silu(h1) * h3 = h1 * sg * h3
        dsilu = sg * (1.0 + h1 * (1.0 - sg))                                 # silu'(h1)
        dx1, dw1 = linear_bwd(dg * h3 * dsilu, c1)
        # forward: h3 = x @ w3.T  (x feeds both projections: the two dx add)
        dx3, dw3 = linear_bwd(dg * h1 * sg, c3)
        return dx1 + dx3, dw1, dw2, dw3

    return forward, backward


# the module-level names the model calls, and what fp8_linears puts there
_TARGETS = (("tinymoe.layers.mla", "linear_forward", "linear_backward"),
            ("tinymoe.model", "swiglu_forward", "swiglu_backward"),
            ("tinymoe.layers.moe", "swiglu_forward", "swiglu_backward"))


@contextmanager
def fp8_linears(recipe: Recipe = V3_RECIPE):
    """with fp8_linears() as counts: ...train...   (a teaching device; see the module docstring)

    Inside the block every Linear of the attention projections and of every SwiGLU (dense FFN,
    routed and shared experts) runs its Fprop, Dgrad and Wgrad GEMMs through `gemm` with the
    given recipe; `counts` tallies them ({"fprop", "dgrad", "wgrad"}). Gate, head, embedding,
    norms and attention operators stay in the model's precision. The original functions are
    restored on exit, also when the block raises.
    """
    import importlib
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe: expected an fp8.Recipe, got {type(recipe).__name__}")
    counts = {"fprop": 0, "dgrad": 0, "wgrad": 0}

    def lin_f(x, w):
        return fp8_linear_forward(x, w, recipe, counts)

    fp8_pair = {"linear": (lin_f, fp8_linear_backward)}
    fp8_pair["swiglu"] = swiglu_over(lin_f, fp8_linear_backward)
    from tinymoe.kernels import experts
    saved = [(experts, "BATCHED", experts.BATCHED)]   # routed experts through the loop's SwiGLU
    experts.BATCHED = False
    try:
        for modname, fwd_name, bwd_name in _TARGETS:
            mod = importlib.import_module(modname)
            for name in (fwd_name, bwd_name):
                if not hasattr(mod, name):
                    raise RuntimeError(f"fp8_linears: {modname} no longer has {name!r}; the model "
                                       f"calls its GEMMs elsewhere, update fp8._TARGETS")
            new_f, new_b = fp8_pair[fwd_name.split("_")[0]]
            saved.append((mod, fwd_name, getattr(mod, fwd_name)))
            saved.append((mod, bwd_name, getattr(mod, bwd_name)))
            setattr(mod, fwd_name, new_f)
            setattr(mod, bwd_name, new_b)
        yield counts
    finally:
        for mod, name, fn in reversed(saved):
            setattr(mod, name, fn)

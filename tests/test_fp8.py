"""FP8 by hand: rounding bit for bit against ml_dtypes, block scaling against loops, the GEMM's
accumulator against closed forms and its NumPy twin, the FP8 Linear pair and the training switch."""
import numpy as np
import pytest

from tinymoe import fp8
from tinymoe.config import ModelConfig
from tinymoe.kernels import get
import tinymoe.model as model_mod
from tinymoe.layers import basic, mla, moe
from tinymoe.model import Model

md = pytest.importorskip("ml_dtypes")
pytestmark = pytest.mark.fp8

# each format next to ml_dtypes' type and the unsigned view of its bits
FORMATS = [(fp8.E4M3, md.float8_e4m3fn, np.uint8), (fp8.E5M2, md.float8_e5m2, np.uint8),
           (fp8.BF16, md.bfloat16, np.uint16)]
IDS = [f[0].name for f in FORMATS]


def _ml_codes(x, mdtype, view):
    with np.errstate(invalid="ignore", over="ignore"):
        return np.asarray(x).astype(mdtype).view(view)


def _same_floats(a, b):
    """Bitwise equal (so -0 != +0), with any NaN equal to any NaN."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return (a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))


def _assert_rounding_matches(x, fmt, mdtype, view):
    codes = fp8.encode(x, fmt)
    want = _ml_codes(x, mdtype, view)
    bad = np.nonzero(codes != want)[0]
    assert bad.size == 0, (f"{fmt.name}: {bad.size} mismatches, first x = {x[bad[0]]!r}: "
                           f"code {codes[bad[0]]:#x}, ml_dtypes {want[bad[0]]:#x}")
    with np.errstate(invalid="ignore", over="ignore"):
        ref = np.asarray(x).astype(mdtype).astype(np.float32)
    assert np.all(_same_floats(fp8.round_to(x, fmt), ref))


# ================================================================================================
# formats and rounding
# ================================================================================================

def test_format_constants_match_the_published_table():
    # shared/reference/cheap.md section 4 (ml_dtypes' finfo; OCP FP8 numbers)
    assert (fp8.E4M3.max, fp8.E4M3.min_normal, fp8.E4M3.min_subnormal) == (448.0, 2**-6, 2**-9)
    assert (fp8.E5M2.max, fp8.E5M2.min_normal, fp8.E5M2.min_subnormal) == (57344.0, 2**-14, 2**-16)
    assert fp8.E4M3.max == float.fromhex("0x1.Cp8") and fp8.E5M2.max == float.fromhex("0x1.Cp15")
    for fmt, mdtype, _ in FORMATS:
        fi = md.finfo(mdtype)
        assert fmt.max == float(fi.max) and fmt.min_normal == float(fi.smallest_normal)
        assert fmt.min_subnormal == float(fi.smallest_subnormal)


@pytest.mark.parametrize("fmt,mdtype,view", FORMATS, ids=IDS)
def test_decode_every_code_matches_ml_dtypes(fmt, mdtype, view):
    codes = np.arange(2 ** fmt.n_bits).astype(view)
    assert np.all(_same_floats(fp8.decode(codes, fmt), codes.view(mdtype).astype(np.float32)))


def test_special_codes_by_hand():
    assert fp8.decode(np.array([0x01, 0x08, 0x7E, 0xFE]), fp8.E4M3).tolist() == \
        [2**-9, 2**-6, 448.0, -448.0]
    assert np.isnan(fp8.decode(np.array([0x7F, 0xFF]), fp8.E4M3)).all()    # S.1111.111 only
    assert fp8.decode(np.array([0x78]), fp8.E4M3)[0] == 256.0               # 1111.000 is normal
    assert fp8.decode(np.array([0x7C, 0xFC]), fp8.E5M2).tolist() == [np.inf, -np.inf]
    assert fp8.decode(np.array([0x7B, 0x01]), fp8.E5M2).tolist() == [57344.0, 2**-16]


@pytest.mark.parametrize("fmt,mdtype,view", FORMATS, ids=IDS)
def test_every_representable_value_rounds_to_itself(fmt, mdtype, view):
    codes = np.arange(2 ** fmt.n_bits).astype(view)
    values = codes.view(mdtype).astype(np.float32)
    finite = np.isfinite(values)
    assert np.array_equal(fp8.encode(values[finite], fmt), codes[finite])
    _assert_rounding_matches(values, fmt, mdtype, view)


@pytest.mark.parametrize("fmt,mdtype,view", FORMATS, ids=IDS)
def test_ties_and_their_neighbours_match_ml_dtypes(fmt, mdtype, view):
    codes = np.arange(2 ** (fmt.n_bits - 1)).astype(view)                  # the positive half
    with np.errstate(invalid="ignore"):
        v = codes.view(mdtype).astype(np.float64)
    v = np.sort(v[np.isfinite(v)])
    mid = (v[:-1] + v[1:]) / 2                                             # every tie (exact)
    top = v[-1] + (v[-1] - v[-2]) / 2                                      # the overflow tie
    x = np.concatenate([mid, [top]]).astype(np.float32)
    assert np.array_equal(x.astype(np.float64), np.concatenate([mid, [top]]))   # exact in f32
    x = np.concatenate([x, np.nextafter(x, 0), np.nextafter(x, np.inf)])
    x = np.concatenate([x, -x])
    _assert_rounding_matches(x, fmt, mdtype, view)


def test_ties_to_even_by_hand():
    r = fp8.round_to(np.array([1 + 1 / 16, 1 + 3 / 16, 2**-10, 3 * 2**-10, -2**-11]), fp8.E4M3)
    # 1.0625 between 1.000 and 1.001 -> even 1.0; 1.1875 -> 1.25; half the smallest subnormal -> 0;
    # 1.5 * 2^-9 between 0.001 and 0.010 (x 2^-6) -> 2^-8; underflow keeps the sign
    assert r.tolist() == [1.0, 1.25, 0.0, 2**-8, -0.0]
    assert np.signbit(r[-1])


@pytest.mark.parametrize("fmt,mdtype,view", FORMATS, ids=IDS)
def test_float32_sweep_matches_ml_dtypes(fmt, mdtype, view):
    # every 4093rd float32 bit pattern: all binades, subnormals, inf, NaN payloads, both signs
    x = np.arange(0, 2**32, 4093, dtype=np.uint64).astype(np.uint32).view(np.float32)
    _assert_rounding_matches(x, fmt, mdtype, view)


def test_float64_inputs_are_rounded_once(rng):
    x = rng.standard_normal(20000) * np.exp2(rng.uniform(-20, 18, 20000))
    x = np.concatenate([x, [1 + 2**-4 + 2**-40, 1 + 2**-4 - 2**-40]])     # just off a tie
    for fmt, mdtype, view in FORMATS:
        _assert_rounding_matches(x, fmt, mdtype, view)
    assert fp8.round_to(x[-2:], fp8.E4M3).tolist() == [1.125, 1.0]


def test_saturation_boundary():
    e4 = np.array([448.0, 464.0, np.nextafter(np.float32(464), np.float32(np.inf)), 1e6, np.inf,
                   -np.inf], dtype=np.float32)
    # 464 is the tie between 448 (1.110) and the missing 480 (1.111 = NaN): ties to even -> 448
    r = fp8.round_to(e4, fp8.E4M3)
    assert r[:2].tolist() == [448.0, 448.0] and np.isnan(r[2:]).all()      # no inf in E4M3
    assert fp8.round_to(e4, fp8.E4M3, saturate=True).tolist() == [448, 448, 448, 448, 448, -448]
    e5 = np.array([57344.0, np.nextafter(np.float32(61440), np.float32(0)), 61440.0, np.inf],
                  dtype=np.float32)
    # 61440 is the tie between 57344 (1.11) and 65536 (would be 1.00 x 2^16): even -> inf
    assert fp8.round_to(e5, fp8.E5M2).tolist() == [57344.0, 57344.0, np.inf, np.inf]
    assert fp8.round_to(e5, fp8.E5M2, saturate=True).tolist() == [57344.0] * 4
    assert np.isnan(fp8.round_to(np.array([np.nan]), fp8.E4M3, saturate=True)).all()


def test_rounding_errors_are_named():
    with pytest.raises(TypeError, match="x"):
        fp8.round_to(np.array([1, 2]), fp8.E4M3)
    with pytest.raises(TypeError, match="fmt"):
        fp8.round_to(np.array([1.0]), "e4m3")
    with pytest.raises(ValueError, match="codes"):
        fp8.decode(np.array([256]), fp8.E4M3)


# ================================================================================================
# scaling
# ================================================================================================

def _quantize_loops(x, bm, bk, fmax, mdtype):
    """Per-block scale and FP8 payload, block by block; rounding by ml_dtypes."""
    M, K = x.shape
    q = np.zeros((M, K), np.float32)
    scale = np.zeros((-(-M // bm), -(-K // bk)), np.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            blk = x[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk].astype(np.float32)
            amax = np.float32(np.abs(blk).max())
            s = amax / np.float32(fmax) if amax > 0 else np.float32(1.0)
            scale[i, j] = s
            q[i * bm:(i + 1) * bm, j * bk:(j + 1) * bk] = \
                np.clip(blk / s, -fmax, fmax).astype(mdtype).astype(np.float32)
    return q, scale


@pytest.mark.parametrize("block", [fp8.TILE, fp8.BLOCK, (3, 7), None], ids=str)
@pytest.mark.parametrize("fmt,mdtype", [(fp8.E4M3, md.float8_e4m3fn), (fp8.E5M2, md.float8_e5m2)],
                         ids=["e4m3", "e5m2"])
def test_quantize_matches_block_loops(rng, block, fmt, mdtype):
    x = rng.standard_normal((130, 300)) * np.exp2(rng.integers(-8, 8, (130, 1)))
    x[5, 17] = 0.0
    x[:, 260:] = 0.0                                      # an all-zero block gets scale 1
    Q = fp8.quantize(x, block, fmt)
    bm, bk = (130, 300) if block is None else block
    q, scale = _quantize_loops(x, bm, bk, fmt.max, mdtype)
    assert np.array_equal(Q.scale, scale) and np.array_equal(Q.q, q)
    np.testing.assert_array_equal(fp8.dequantize(Q), q * np.repeat(np.repeat(
        scale, bm, 0), bk, 1)[:130, :300])


def test_one_outlier_costs_per_tensor_scaling_the_small_values():
    x = np.ones((4, 256))
    x[0, 3] = 1e6                                # one outlier in row 0, first tile
    per_tensor = fp8.fake_quantize(x, None)
    tiled = fp8.fake_quantize(x, fp8.TILE)
    # per tensor: 1 * 448 / 1e6 = 4.5e-4 < 2^-10 (half the smallest subnormal): every 1 is lost
    assert per_tensor[x == 1].max() == 0.0
    # per 1x128 tile: only the outlier's own tile loses them; every other tile is exact
    assert np.all(tiled[0, :128][x[0, :128] == 1] == 0.0)
    assert np.all(tiled[0, 128:] == 1.0) and np.all(tiled[1:] == 1.0)


def test_block_quantized_transpose_is_the_transposed_quantization(rng):
    w = rng.standard_normal((200, 300))
    a, b = fp8.transpose(fp8.quantize(w, fp8.BLOCK)), fp8.quantize(np.ascontiguousarray(w.T),
                                                                   fp8.BLOCK)
    assert np.array_equal(a.q, b.q) and np.array_equal(a.scale, b.scale) and a.block == b.block


def test_quantize_errors_are_named():
    with pytest.raises(ValueError, match="NaN or inf"):
        fp8.quantize(np.array([[1.0, np.nan]]))
    with pytest.raises(ValueError, match="block"):
        fp8.quantize(np.ones((2, 2)), (0, 128))
    with pytest.raises(ValueError, match="2 dimensions"):
        fp8.quantize(np.ones(3))


# ================================================================================================
# the GEMM
# ================================================================================================

def _manual(q):
    """A Quantized with given FP8 payload and unit scales (per tensor)."""
    q = np.asarray(q, np.float32)
    return fp8.Quantized(q, np.ones((1, 1), np.float32), q.shape, fp8.E4M3)


def test_accumulator_keeps_14_bits_and_truncates():
    # 1 + 2^-14: the aligned accumulator has ulp 2^(0 - 13), so 2^-14 is cut off (toward zero);
    # 2^-13 survives; the float32 reference keeps both. 2^-7 is an E4M3 subnormal.
    a = _manual([[1.0, 2**-7], [1.0, -2**-7], [1.0, 2**-6]])
    b = _manual([[1.0, 2**-7]])
    assert fp8.gemm(a, b)[:, 0].tolist() == [1.0, 1.0, 1.0 + 2**-13]
    assert fp8.gemm(a, b, acc_bits=None)[:, 0].tolist() == [1 + 2**-14, 1 - 2**-14, 1 + 2**-13]
    assert fp8.gemm(a, b, acc_bits=15)[:, 0].tolist() == [1 + 2**-14, 1 - 2**-14, 1 + 2**-13]


def test_promotion_every_128_rescues_the_small_products():
    # 128 products of 8 make 1024; then 128 products of 2^-4 (128 x 2^-4 = 8). Without promotion
    # the accumulator sits at 1024, whose 14-bit ulp is 2^(10 - 13) = 1/8 > 2^-4: all are lost.
    a = _manual([[8.0] * 128 + [2**-4] * 128])
    b = _manual([[1.0] * 256])
    assert fp8.gemm(a, b, interval=None)[0, 0] == 1024.0
    assert fp8.gemm(a, b, interval=128)[0, 0] == 1032.0
    assert fp8.gemm(a, b, acc_bits=None, interval=None)[0, 0] == 1032.0


@pytest.mark.parametrize("shape", [(5, 7, 300), (1, 1, 1), (3, 2, 33), (16, 9, 256)], ids=str)
def test_accumulate_twins_agree_bitwise(rng, shape):
    M, N, K = shape
    A = fp8.quantize(rng.standard_normal((M, K)) * 3, fp8.TILE)
    B = fp8.quantize(rng.standard_normal((N, K)), fp8.BLOCK)
    for interval, bits in ((128, 14), (64, 10), (128, 20)):
        C = -(-K // interval)
        args = (A.q, np.ascontiguousarray(B.q.T), fp8._interval_scales("A", A, interval, C),
                fp8._interval_scales("B", B, interval, C), interval, bits, fp8.WGMMA_K)
        np.testing.assert_array_equal(get("fp8_accumulate", "numba")(*args),
                                      get("fp8_accumulate", "numpy")(*args))


def test_gemm_applies_each_intervals_scales(rng, tol):
    a = rng.standard_normal((6, 384)) * np.exp2(rng.integers(-6, 6, (1, 384)))   # scales vary by tile
    b = rng.standard_normal((5, 384))
    A, B = fp8.quantize(a, fp8.TILE), fp8.quantize(b, fp8.BLOCK)
    da, db = fp8.dequantize(A).astype(np.float64), fp8.dequantize(B).astype(np.float64)
    want = da @ db.T
    got = fp8.gemm(A, B, acc_bits=None)              # float32 per interval, scales at promotion
    np.testing.assert_allclose(got, want, rtol=0, atol=tol["f32_vs_f64"] * np.abs(want).max())
    # 14 bits: each of the 4 groups of an interval truncates < 33 ulps, ulp <= 2^-13 * (the sum of
    # that interval's |products|), so |error| <= 4 * 33 * 2^-13 * sum_k |a_k b_k| (scales included)
    bound = 4 * 33 * 2.0**-13 * (np.abs(da) @ np.abs(db).T)
    err = np.abs(fp8.gemm(A, B) - want)
    assert np.all(err <= bound + tol["f32_vs_f64"] * np.abs(want).max()) and err.max() > 0
    # and the whole point: it approximates a @ b.T to FP8 precision, not exactly
    rel = np.linalg.norm(fp8.fp8_matmul(a, b) - a @ b.T) / np.linalg.norm(a @ b.T)
    assert 1e-3 < rel < 0.1


def test_gemm_rejects_scales_that_change_inside_an_interval():
    A = fp8.quantize(np.ones((2, 256)), (1, 64))
    B = fp8.quantize(np.ones((3, 256)), fp8.BLOCK)
    with pytest.raises(ValueError, match="promotion interval"):
        fp8.gemm(A, B, interval=128)
    with pytest.raises(ValueError, match="promotion interval"):
        fp8.gemm(fp8.quantize(np.ones((2, 256))), B, interval=None)
    with pytest.raises(ValueError, match="expected shape"):
        fp8.gemm(A, fp8.quantize(np.ones((3, 255)), fp8.BLOCK))


# ================================================================================================
# the FP8 Linear pair, SwiGLU over a linear pair, the training switch
# ================================================================================================

def _on_grid(rng, shape):
    """Integers in [-2, 2], |max| 1 or 2 in every tile: x / s lands on 0, +-224 or +-448, all E4M3
    values, and the products' sums need < 14 bits, so FP8 is exact up to the float32 scales."""
    x = rng.integers(-2, 3, shape).astype(np.float64)
    x.reshape(-1)[::7] = 2.0
    return x


def test_fp8_linear_pair_equals_the_linear_pair_on_grid_inputs(rng, tol):
    x = _on_grid(rng, (2, 32, 48))                   # N = 64 tokens: one Wgrad tile of tokens
    w = _on_grid(rng, (40, 48))
    dy = _on_grid(rng, (2, 32, 40))
    y, c = fp8.fp8_linear_forward(x, w)
    dx, dw = fp8.fp8_linear_backward(dy, c)
    y0, c0 = basic.linear_forward(x, w)
    dx0, dw0 = basic.linear_backward(dy, c0)
    for got, want in ((y, y0), (dx, dx0), (dw, dw0)):
        assert got.shape == want.shape and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=tol["f32_rtol"], atol=tol["f32_atol"])


def test_fp8_linear_pair_is_fp8_accurate_on_general_inputs(rng):
    x, w, dy = rng.standard_normal((300, 64)), rng.standard_normal((48, 64)), rng.standard_normal((300, 48))
    y, c = fp8.fp8_linear_forward(x, w)
    y0, c0 = basic.linear_forward(x, w)
    for got, want in zip((y, *fp8.fp8_linear_backward(dy, c)), (y0, *basic.linear_backward(dy, c0))):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 1e-3 < rel < 0.06                     # E4M3: 3 mantissa bits, ~2^-5 rms per entry


def test_swiglu_over_the_linear_pair_equals_basic_swiglu(rng, tol):
    x, dy = rng.standard_normal((7, 6)), rng.standard_normal((7, 6))
    w1, w2, w3 = rng.standard_normal((5, 6)), rng.standard_normal((6, 5)), rng.standard_normal((5, 6))
    fwd, bwd = fp8.swiglu_over(basic.linear_forward, basic.linear_backward)
    y, c = fwd(x, w1, w2, w3)
    y0, c0 = basic.swiglu_forward(x, w1, w2, w3)
    np.testing.assert_allclose(y, y0, rtol=0, atol=tol["f64_close"])
    for got, want in zip(bwd(dy, c), basic.swiglu_backward(dy, c0)):
        np.testing.assert_allclose(got, want, rtol=0, atol=tol["f64_close"])


def _tiny_model():
    cfg = ModelConfig.preset("toy", n_layers=2, max_seq_len=16)     # MLA + dense + one MoE block
    return cfg, Model(cfg, seed=0)


def _patched_names():
    """{(module, name): function} of every name fp8_linears swaps, as they are now."""
    return {(m, n): getattr(m, n) for m in (mla, moe, model_mod)
            for n in ("linear_forward", "linear_backward", "swiglu_forward", "swiglu_backward")
            if hasattr(m, n)}


def test_fp8_linears_runs_every_linear_gemm_in_fp8_and_restores(rng):
    cfg, model = _tiny_model()
    tokens = rng.integers(0, cfg.vocab_size, (4, 16))
    targets = rng.integers(0, cfg.vocab_size, (4, 16))
    before = _patched_names()
    loss32, g32 = model.loss_and_grads(tokens, targets)
    with fp8.fp8_linears() as counts:
        assert mla.linear_forward is not before[(mla, "linear_forward")]
        loss8, g8 = model.loss_and_grads(tokens, targets)
        active = int(np.sum(model.last_stats["loads"]["layers.1.ffn.gate.bias"] > 0))
    # per MLA block wq_a, wq_b, wkv_a, wkv_b, wo; dense FFN 3; MoE: 3 per expert with tokens + 3
    # shared; the gate, the head and attention are not Linear GEMMs in FP8
    n = 2 * 5 + 3 + 3 * (active + 1)
    assert counts == {"fprop": n, "dgrad": n, "wgrad": n}
    assert loss8 != loss32 and abs(loss8 - loss32) / loss32 < 0.02
    rel = np.linalg.norm(g8["layers.0.attn.wq_a"] - g32["layers.0.attn.wq_a"]) / \
        np.linalg.norm(g32["layers.0.attn.wq_a"])
    assert 1e-4 < rel < 0.2
    assert g8.keys() == g32.keys()
    assert _patched_names() == before
    assert model.loss_and_grads(tokens, targets)[0] == loss32             # bitwise back to fp32


def test_fp8_linears_restores_after_an_exception():
    before = _patched_names()
    with pytest.raises(RuntimeError, match="inside"):
        with fp8.fp8_linears():
            assert model_mod.swiglu_backward is not before[(model_mod, "swiglu_backward")]
            raise RuntimeError("inside")
    assert _patched_names() == before
    with pytest.raises(TypeError, match="recipe"):
        with fp8.fp8_linears("v3"):
            pass

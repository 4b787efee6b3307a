"""linear, embedding, SwiGLU, softmax, cross-entropy: loop-level values, gradients, dtypes, errors."""
import math

import numpy as np
import pytest

from tinymoe.gradcheck import gradcheck
from tinymoe.layers.basic import (cross_entropy_backward, cross_entropy_forward,
                                  embedding_backward, embedding_forward, linear_backward,
                                  linear_forward, sigmoid, silu, softmax_backward,
                                  softmax_forward, swiglu_backward, swiglu_forward)


def _sig(a):
    return 1.0 / (1.0 + math.exp(-a))


# ---------------------------------------------------------------------------- forward vs loops

@pytest.mark.basic
def test_linear_matches_loops(rng, tol):
    x, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4))
    y, _ = linear_forward(x, w)
    want = np.zeros((2, 3, 5))
    for b in range(2):
        for t in range(3):
            for o in range(5):
                want[b, t, o] = sum(x[b, t, i] * w[o, i] for i in range(4))
    np.testing.assert_allclose(y, want, rtol=0, atol=tol["f64_close"])


@pytest.mark.basic
def test_embedding_matches_loops(rng, tol):
    w = rng.standard_normal((7, 3))
    tokens = np.array([[0, 6, 2], [2, 2, 5]])
    y, _ = embedding_forward(tokens, w)
    for b in range(2):
        for t in range(3):
            for d in range(3):
                assert y[b, t, d] == w[tokens[b, t], d]


@pytest.mark.basic
def test_embedding_backward_accumulates_repeats(rng, tol, backend):
    w = rng.standard_normal((5, 3))
    tokens = np.array([1, 3, 1, 1, 0])
    dy = rng.standard_normal((5, 3))
    _, cache = embedding_forward(tokens, w)
    dw = embedding_backward(dy, cache)
    want = np.zeros((5, 3))
    for n, v in enumerate(tokens):
        want[v] += dy[n]
    np.testing.assert_allclose(dw, want, rtol=0, atol=tol["f64_close"])
    assert np.all(dw[[2, 4]] == 0.0)          # unused rows stay exactly 0


@pytest.mark.basic
def test_swiglu_matches_loops(rng, tol):
    N, D, F = 3, 4, 5
    x = rng.standard_normal((N, D))
    w1, w2, w3 = (rng.standard_normal((F, D)), rng.standard_normal((D, F)),
                  rng.standard_normal((F, D)))
    y, _ = swiglu_forward(x, w1, w2, w3)
    want = np.zeros((N, D))
    for n in range(N):
        g = []
        for f in range(F):
            a = sum(x[n, d] * w1[f, d] for d in range(D))
            u = sum(x[n, d] * w3[f, d] for d in range(D))
            g.append(a * _sig(a) * u)
        for d in range(D):
            want[n, d] = sum(g[f] * w2[d, f] for f in range(F))
    np.testing.assert_allclose(y, want, rtol=0, atol=tol["f64_close"])


@pytest.mark.basic
def test_sigmoid_silu_closed_form_and_stable(tol):
    a = np.array([-800.0, -3.0, 0.0, 2.0, 800.0])
    want = np.array([_sig(v) if abs(v) < 700 else (0.0 if v < 0 else 1.0) for v in a])
    s = sigmoid(a)
    assert np.all(np.isfinite(s))
    np.testing.assert_allclose(s, want, rtol=tol["f64_close"], atol=0)
    np.testing.assert_allclose(silu(a), a * want, rtol=tol["f64_close"], atol=0)
    assert sigmoid(np.float32(1.0) * np.ones(2, np.float32)).dtype == np.float32
    assert sigmoid(np.array([1, 2])).dtype == np.float64       # ints are not truncated
    assert 0.7 < float(sigmoid(np.array([1]))[0]) < 0.75


@pytest.mark.basic
def test_softmax_matches_loops_and_rows_sum_to_one(rng, tol):
    x = rng.standard_normal((2, 3, 6)) * 5
    p, _ = softmax_forward(x)
    for i in range(2):
        for j in range(3):
            e = [math.exp(v) for v in x[i, j]]
            for c in range(6):
                assert abs(p[i, j, c] - e[c] / sum(e)) < tol["f64_close"]
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=0, atol=tol["f64_close"])


@pytest.mark.basic
def test_softmax_masked_entries_are_exactly_zero():
    x = np.array([[1.0, -np.inf, 2.0, -np.inf]])
    p, _ = softmax_forward(x)
    assert p[0, 1] == 0.0 and p[0, 3] == 0.0
    dx = softmax_backward(np.ones_like(p) * 3.0 + np.arange(4), p)
    assert dx[0, 1] == 0.0 and dx[0, 3] == 0.0


@pytest.mark.basic
def test_cross_entropy_matches_loops_with_ignored(rng, tol):
    logits = rng.standard_normal((5, 7)) * 3
    targets = np.array([3, -100, 0, 6, -100])
    loss, _ = cross_entropy_forward(logits, targets)
    terms = []
    for n in range(5):
        if targets[n] == -100:
            continue
        lse = math.log(sum(math.exp(v) for v in logits[n]))
        terms.append(lse - logits[n, targets[n]])
    assert abs(loss - sum(terms) / len(terms)) < tol["f64_close"]


@pytest.mark.basic
def test_cross_entropy_stable_for_huge_logits(tol):
    for dtype in (np.float32, np.float64):
        # logits ~1e4: naive exp overflows; the answer is known in closed form
        logits = np.array([[1e4, 1e4 - 1.0, -1e4], [-1e4, -1e4, -1e4]], dtype=dtype)
        targets = np.array([1, 2])
        loss, cache = cross_entropy_forward(logits, targets)
        row0 = math.log(1.0 + math.exp(1.0)) + 0.0    # lse - z_1 = 1e4 + log(1 + e^-1) - (1e4 - 1)
        row1 = math.log(3.0)
        assert math.isfinite(loss)
        assert abs(loss - (row0 + row1) / 2) < (1e-3 if dtype == np.float32 else 1e-9)
        d = cross_entropy_backward(1.0, cache)
        assert d.dtype == dtype and np.all(np.isfinite(d))


@pytest.mark.basic
def test_cross_entropy_all_ignored_is_zero():
    logits = np.ones((3, 4))
    loss, cache = cross_entropy_forward(logits, np.full(3, -100))
    assert loss == 0.0
    assert np.all(cross_entropy_backward(1.0, cache) == 0.0)


# ---------------------------------------------------------------------------- gradient checks

@pytest.mark.basic
def test_gradcheck_linear(rng, tol):
    x, w = rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4))
    gradcheck(linear_forward, lambda dy, c: dict(zip(("x", "w"), linear_backward(dy, c))),
              {"x": x, "w": w}).assert_ok(tol["grad_rel"])


@pytest.mark.basic
def test_gradcheck_embedding_repeated_ids(rng, tol):
    tokens = np.array([[1, 1, 4], [0, 1, 4]])
    w = rng.standard_normal((6, 3))
    gradcheck(lambda w: embedding_forward(tokens, w),
              lambda dy, c: {"w": embedding_backward(dy, c)}, {"w": w}).assert_ok(tol["grad_rel"])


@pytest.mark.basic
def test_gradcheck_swiglu(rng, tol):
    inputs = {"x": rng.standard_normal((3, 4)), "w1": rng.standard_normal((5, 4)),
              "w2": rng.standard_normal((4, 5)), "w3": rng.standard_normal((5, 4))}
    gradcheck(swiglu_forward,
              lambda dy, c: dict(zip(("x", "w1", "w2", "w3"), swiglu_backward(dy, c))),
              inputs).assert_ok(tol["grad_rel"])


@pytest.mark.basic
def test_gradcheck_softmax(rng, tol):
    gradcheck(softmax_forward, lambda dp, p: {"x": softmax_backward(dp, p)},
              {"x": rng.standard_normal((3, 5))}).assert_ok(tol["grad_rel"])


@pytest.mark.basic
@pytest.mark.parametrize("targets", [[2, -100, 0, 4], [-100, -100, -100, -100]])
def test_gradcheck_cross_entropy(rng, tol, targets):
    targets = np.array(targets)
    gradcheck(lambda logits: cross_entropy_forward(logits, targets),
              lambda d, c: {"logits": cross_entropy_backward(d, c)},
              {"logits": rng.standard_normal((4, 5))}).assert_ok(tol["grad_rel"])


# ---------------------------------------------------------------------------- dtypes

@pytest.mark.basic
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtypes_preserved(rng, dtype):
    x = rng.standard_normal((3, 4)).astype(dtype)
    w = rng.standard_normal((5, 4)).astype(dtype)
    y, c = linear_forward(x, w)
    assert y.dtype == dtype and all(g.dtype == dtype for g in linear_backward(y, c))
    e, c = embedding_forward(np.array([0, 4, 4]), w)
    assert e.dtype == dtype and embedding_backward(e, c).dtype == dtype
    w1, w2, w3 = (rng.standard_normal(s).astype(dtype) for s in ((6, 4), (4, 6), (6, 4)))
    y, c = swiglu_forward(x, w1, w2, w3)
    assert y.dtype == dtype and all(g.dtype == dtype for g in swiglu_backward(y, c))
    p, c = softmax_forward(x)
    assert p.dtype == dtype and softmax_backward(p, c).dtype == dtype
    loss, c = cross_entropy_forward(x, np.array([0, 3, -100]))
    assert isinstance(loss, float) and cross_entropy_backward(1.0, c).dtype == dtype


@pytest.mark.basic
def test_float32_close_to_float64(rng, tol):
    x, w1, w2, w3 = (rng.standard_normal(s) for s in ((3, 4), (6, 4), (4, 6), (6, 4)))
    y64, _ = swiglu_forward(x, w1, w2, w3)
    y32, _ = swiglu_forward(*(a.astype(np.float32) for a in (x, w1, w2, w3)))
    np.testing.assert_allclose(y32, y64, rtol=0, atol=tol["f32_vs_f64"] * np.abs(y64).max())


# ---------------------------------------------------------------------------- bad input

@pytest.mark.basic
def test_bad_inputs_raise_clear_errors():
    w = np.zeros((5, 4))
    with pytest.raises(ValueError, match="x: shape"):
        linear_forward(np.zeros((2, 3)), w)
    with pytest.raises(TypeError, match="x: dtype int64"):
        linear_forward(np.zeros((2, 4), dtype=np.int64), w)
    with pytest.raises(TypeError, match="dtype mismatch"):
        linear_forward(np.zeros((2, 4), dtype=np.float32), w)
    with pytest.raises(TypeError, match="w: expected a numpy"):
        linear_forward(np.zeros((2, 4)), [[1.0] * 4])
    with pytest.raises(ValueError, match="tokens: token id 5 is outside"):
        embedding_forward(np.array([0, 5]), w)
    with pytest.raises(ValueError, match="tokens: token id -1 is outside"):
        embedding_forward(np.array([-1, 2]), w)
    with pytest.raises(TypeError, match="tokens: dtype float64"):
        embedding_forward(np.array([0.0, 1.0]), w)
    with pytest.raises(TypeError, match="x: dtype int64"):
        softmax_forward(np.arange(3))
    with pytest.raises(ValueError, match="w3: expected shape"):
        swiglu_forward(np.zeros((2, 4)), np.zeros((6, 4)), np.zeros((4, 6)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="x: last dimension"):
        swiglu_forward(np.zeros((2, 3)), np.zeros((6, 4)), np.zeros((4, 6)), np.zeros((6, 4)))
    with pytest.raises(ValueError, match=r"targets \(ignoring -100\): token id 9"):
        cross_entropy_forward(np.zeros((2, 4)), np.array([9, -100]))
    with pytest.raises(TypeError, match="targets: expected an integer"):
        cross_entropy_forward(np.zeros((2, 4)), np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="targets: expected shape"):
        cross_entropy_forward(np.zeros((2, 4)), np.array([1, 2, 3]))
    _, c = linear_forward(np.zeros((2, 4)), w)
    with pytest.raises(ValueError, match="dy: expected shape"):
        linear_backward(np.zeros((2, 4)), c)

"""The gradient checker itself: it passes correct backwards and catches wrong ones."""
import numpy as np
import pytest

from tinymoe.gradcheck import gradcheck, gradcheck_scalar
from tinymoe.layers.basic import linear_backward, linear_forward


def _matmul_fwd(x, w):
    return x @ w.T, (x, w)


@pytest.mark.gradcheck
def test_correct_backward_passes(rng, tol):
    x, w = rng.standard_normal((3, 4)), rng.standard_normal((5, 4))
    report = gradcheck(_matmul_fwd, lambda dy, c: {"x": dy @ c[1], "w": dy.T @ c[0]},
                       {"x": x, "w": w})
    report.assert_ok(tol["grad_rel"])
    assert set(report.tensors) == {"x", "w"}
    assert report.tensors["x"].n_checked == 12 and report.max_rel_error < 1e-8


@pytest.mark.gradcheck
@pytest.mark.parametrize("bug", ["transposed", "scaled", "missing_term"])
def test_wrong_backward_is_caught(rng, bug):
    x, w = rng.standard_normal((4, 4)), rng.standard_normal((4, 4))

    def bad_backward(dy, c):
        x, w = c
        if bug == "transposed":                    # dx = dy @ w.T instead of dy @ w
            return {"x": dy @ w.T, "w": dy.T @ x}
        if bug == "scaled":                        # off by a factor 2
            return {"x": dy @ w, "w": 2 * (dy.T @ x)}
        return {"x": dy @ w, "w": dy.T @ x + 1e-3 * x}   # a small spurious term

    with pytest.raises(AssertionError, match="gradient check failed"):
        gradcheck(_matmul_fwd, bad_backward, {"x": x, "w": w}).assert_ok(1e-6)


@pytest.mark.gradcheck
def test_failure_message_names_tensor_index_expected_actual(rng):
    x = rng.standard_normal((2, 3))
    w = rng.standard_normal((3, 3))

    def bwd(dy, c):
        dx = dy @ c[1]
        dx[1, 2] += 5.0                           # one wrong entry
        return {"x": dx}

    report = gradcheck(_matmul_fwd, bwd, {"x": x, "w": w}, names=["x"])
    t = report.tensors["x"]
    assert t.index == (1, 2)
    assert abs(t.analytic - t.numeric - 5.0) < 1e-6
    with pytest.raises(AssertionError) as e:
        report.assert_ok(1e-6)
    msg = str(e.value)
    assert "'x'" in msg and "(1, 2)" in msg
    assert "expected (finite differences)" in msg and "actual (backward)" in msg
    assert f"{t.numeric:.10g}" in msg and f"{t.analytic:.10g}" in msg


@pytest.mark.gradcheck
def test_random_upstream_gradient_catches_what_ones_hide(rng):
    # y = x + x^T: the true dx = dy + dy^T. The wrong "2 * dy" agrees whenever dy is symmetric
    # (an all-ones dy); the random upstream gradient exposes it.
    x = rng.standard_normal((3, 3))
    report = gradcheck(lambda x: (x + x.T, None), lambda dy, _: {"x": 2 * dy}, {"x": x})
    assert report.max_rel_error > 1e-2


@pytest.mark.gradcheck
def test_gradcheck_scalar_sampling_and_restores_inputs(rng, tol):
    x = rng.standard_normal((10, 10))
    before = x.copy()
    r = gradcheck_scalar(lambda: float(np.sum(np.sin(x))), {"x": x}, {"x": np.cos(x)},
                         max_entries=7)
    r.assert_ok(tol["grad_rel"])
    assert r.tensors["x"].n_checked == 7
    np.testing.assert_array_equal(x, before)           # restored bitwise


@pytest.mark.gradcheck
def test_nan_gradient_fails(rng):
    x = rng.standard_normal(3)
    r = gradcheck_scalar(lambda: float(np.sum(x * x)), {"x": x},
                         {"x": np.array([2 * x[0], np.nan, 2 * x[2]])})
    with pytest.raises(AssertionError, match="index \\(1,\\)"):
        r.assert_ok(1e-6)


@pytest.mark.gradcheck
def test_gradcheck_rejects_bad_arguments(rng):
    x32 = rng.standard_normal((2, 3)).astype(np.float32)
    with pytest.raises(TypeError, match=r"inputs\['x'\]: gradient checks need float64"):
        gradcheck_scalar(lambda: 0.0, {"x": x32}, {"x": x32})
    x = rng.standard_normal((2, 3))
    with pytest.raises(ValueError, match=r"grads\['x'\]: shape"):
        gradcheck_scalar(lambda: 0.0, {"x": x}, {"x": np.zeros(6)})
    with pytest.raises(ValueError, match=r"inputs\['x'\]: must be contiguous"):
        xt = rng.standard_normal((3, 2)).T
        gradcheck_scalar(lambda: 0.0, {"x": xt}, {"x": np.zeros((2, 3))})


@pytest.mark.gradcheck
def test_report_string_lists_every_tensor(rng):
    x, w = rng.standard_normal((2, 4)), rng.standard_normal((3, 4))
    r = gradcheck(linear_forward, lambda dy, c: dict(zip("xw", linear_backward(dy, c))),
                  {"x": x, "w": w})
    lines = str(r).splitlines()
    assert len(lines) == 3 and lines[1].startswith("x") and lines[2].startswith("w")

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


@pytest.mark.gradcheck
def test_fourth_order_stencil_beats_central_difference():
    # L = sum(sin(x)) has dL/dx = cos(x) in closed form; at a step of 3e-4 the central
    # difference is off by ~h^2/6 ~ 1.5e-8 relative, the 4th-order stencil by ~h^4/30 ~ 3e-16.
    x = np.linspace(-1.0, 1.0, 7)
    exact = {"x": np.cos(x)}
    two = gradcheck_scalar(lambda: np.sum(np.sin(x)), {"x": x}, exact, eps=3e-4)
    four = gradcheck_scalar(lambda: np.sum(np.sin(x)), {"x": x}, exact, eps=3e-4, stencil=4)
    assert 1e-9 < two.max_rel_error < 1e-7
    assert four.max_rel_error < 1e-10
    with pytest.raises(ValueError, match="stencil"):
        gradcheck_scalar(lambda: 0.0, {"x": x}, exact, stencil=3)


@pytest.mark.gradcheck
def test_sampled_entries_are_judged_against_the_whole_tensor_scale():
    # Only entry 0 has a gradient (1.0); the backward is off by 1e-10 on the other entries.
    # A sample of 10 of 1000 entries almost surely misses entry 0; measured against the
    # tensor's scale (1e-3 * 1.0) that 1e-10 is 1e-7 relative, not 1e-10 / 1e-8 = 0.01.
    x = np.zeros(1000)
    a = np.zeros(1000)
    a[0] = 1.0
    grads = {"x": a + np.where(a == 0, 1e-10, 0.0)}
    report = gradcheck_scalar(lambda: float(a @ x), {"x": x}, grads, max_entries=10)
    assert report.tensors["x"].n_checked == 10
    report.assert_ok(1e-6)

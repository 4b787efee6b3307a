"""Kernel registry and scatter-add: the numba kernel against its NumPy twin, edge cases, errors."""
import subprocess
import sys

import numpy as np
import pytest

from tinymoe import kernels
from tinymoe.kernels.scatter import scatter_add_rows, scatter_add_rows_numpy


def _loop(idx, src, n_rows):
    out = np.zeros((n_rows, src.shape[1]), dtype=src.dtype)
    for n in range(len(idx)):
        out[idx[n]] += src[n]
    return out


CASES = {
    "general": (np.array([3, 0, 3, 1, 3]), 5),
    "no_indices": (np.zeros(0, dtype=np.int64), 4),
    "repeated": (np.array([2, 2, 2, 2]), 3),
    "one_row": (np.array([0, 0, 0]), 1),
    "one_token": (np.array([1]), 2),
}


@pytest.mark.kernels
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_scatter_add_numba_equals_numpy(rng, case, dtype):
    idx, n_rows = CASES[case]
    src = rng.standard_normal((len(idx), 3)).astype(dtype)
    a = kernels.get("scatter_add_rows", "numba")(idx.astype(np.int64), src, n_rows)
    b = kernels.get("scatter_add_rows", "numpy")(idx.astype(np.int64), src, n_rows)
    assert a.dtype == b.dtype == dtype and a.shape == b.shape == (n_rows, 3)
    np.testing.assert_array_equal(a, b)                 # same summation order: bitwise equal
    np.testing.assert_array_equal(b, _loop(idx, src, n_rows))


@pytest.mark.kernels
def test_wrapper_follows_backend(rng, backend, tol):
    assert kernels.backend() == backend
    idx = np.array([1, 1, 0])
    src = rng.standard_normal((3, 2))
    np.testing.assert_array_equal(scatter_add_rows(idx, src, 3), _loop(idx, src, 3))
    # non-contiguous source and a narrow index dtype are accepted
    np.testing.assert_array_equal(scatter_add_rows(idx.astype(np.int32), src[:, ::-1], 3),
                                  _loop(idx, src[:, ::-1], 3))


@pytest.mark.kernels
def test_get_selects_twin_under_numpy_backend(monkeypatch):
    monkeypatch.setenv("TINYMOE_BACKEND", "numpy")
    assert kernels.get("scatter_add_rows") is scatter_add_rows_numpy
    monkeypatch.setenv("TINYMOE_BACKEND", "NUMBA")
    assert kernels.backend() == "numba"


@pytest.mark.kernels
def test_bogus_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TINYMOE_BACKEND", "bogus")
    with pytest.raises(ValueError, match="TINYMOE_BACKEND='bogus': must be one of"):
        kernels.get("scatter_add_rows")
    with pytest.raises(ValueError, match="TINYMOE_BACKEND"):
        scatter_add_rows(np.array([0]), np.ones((1, 2)), 1)


@pytest.mark.kernels
def test_registry_errors():
    with pytest.raises(KeyError, match="kernel 'nope': unknown"):
        kernels.get("nope", "numpy")
    with pytest.raises(ValueError, match="which='gpu'"):
        kernels.get("scatter_add_rows", "gpu")


@pytest.mark.kernels
def test_scatter_bad_inputs(backend):
    with pytest.raises(ValueError, match=r"idx: row 3 is outside \[0, n_rows=3\)"):
        scatter_add_rows(np.array([0, 3]), np.ones((2, 2)), 3)
    with pytest.raises(ValueError, match="idx: row -1"):
        scatter_add_rows(np.array([-1]), np.ones((1, 2)), 3)
    with pytest.raises(TypeError, match="idx: expected a 1-d integer array"):
        scatter_add_rows(np.array([0.0]), np.ones((1, 2)), 3)
    with pytest.raises(ValueError, match=r"src: expected shape \[N=2, D\]"):
        scatter_add_rows(np.array([0, 1]), np.ones((3, 2)), 3)


@pytest.mark.kernels
def test_numba_disable_jit_runs_the_loop_source():
    code = ("import numpy as np; from tinymoe import kernels; "
            "f = kernels.get('scatter_add_rows', 'numba'); "
            "print(type(f).__name__, f(np.array([1, 1]), np.ones((2, 2)), 2).tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "NUMBA_DISABLE_JIT": "1"}, check=True)
    assert "[[0.0, 0.0], [2.0, 2.0]]" in out.stdout

"""Shared test settings: the one tolerance table, seeded generators, and the backend fixture."""
from __future__ import annotations


import numpy as np
import pytest

# In a student copy (python -m tinymoe.grading student-copy) a test that reaches the stub of
# another exercise than its own is skipped as "waiting on exercise <id>" instead of failing.
from tinymoe.grading.hook import pytest_runtest_makereport, pytest_runtest_protocol  # noqa: F401

# The tolerance table: every numeric comparison in the suite uses one of these.
TOL = {
    "grad_rel": 1e-6,        # float64 gradient check: max relative error (tinymoe.gradcheck)
    "f64_exact": 1e-10,      # float64 paths that must agree (absorbed vs naive, cached vs full)
    "f64_close": 1e-12,      # float64 results against an explicit-loop recomputation
    "f32_rtol": 1e-5,        # float32 twin agreement, relative
    "f32_atol": 1e-6,        # float32 twin agreement, absolute
    "f32_vs_f64": 1e-4,      # a float32 forward against the float64 one (values of order 1)
    "f64_roundoff": 1e-14,   # float64 closed forms that differ only by a few roundings
    "f64_ulp": 1e-15,        # float64 scalars computed two ways from the same formula
    "f32_cast": 1e-6,        # the same float64 numbers stored in float32 (one rounding, 6e-8)
    "golden_f32_share": 0.2, # tinymoe in float32 uses at most this share of a golden case's float32 tolerance
}


@pytest.fixture
def tol():
    return TOL


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(params=["numba", "numpy"])
def backend(request, monkeypatch):
    """Run a test under both kernel backends (TINYMOE_BACKEND)."""
    monkeypatch.setenv("TINYMOE_BACKEND", request.param)
    return request.param

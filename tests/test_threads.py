"""Thread policy (tinymoe/threads.py): the decision rule, the environment overrides, BLAS control."""
import os
import subprocess
import sys

import pytest

from tinymoe import threads

pytestmark = pytest.mark.threads

VARS = ("TINYMOE_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_NUM_THREADS")


@pytest.fixture
def clean_env(monkeypatch):
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    yield monkeypatch
    threads.reset()


@pytest.mark.parametrize("others,cores,want", [(0.0, 2, 2), (0.05, 2, 2), (1.0, 2, 1),
                                               (0.67, 2, 1), (3.0, 2, 1), (1.2, 4, 2),
                                               (0.0, 1, 1), (0.4, 2, 1), (0.95, 4, 3)])
def test_decide_takes_the_cores_others_leave(others, cores, want):
    # 2 cores and one busy loop beside us (others = 1): 1 thread; while we still held both,
    # the loop got 2/3 of a core, which must already give 1; a fraction of a core (0.4) that
    # would make our second thread wait also gives 1
    assert threads.decide(others, cores) == want


def test_mode_follows_the_environment(clean_env):
    assert threads.mode() == "auto"
    clean_env.setenv("TINYMOE_THREADS", "auto")
    assert threads.mode() == "auto"
    clean_env.setenv("OPENBLAS_NUM_THREADS", "1")
    assert threads.mode() == "fixed"
    clean_env.delenv("OPENBLAS_NUM_THREADS")
    clean_env.setenv("TINYMOE_THREADS", "2")
    assert threads.mode() == "fixed"


@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_bad_thread_variable_is_a_clear_error(clean_env, value):
    clean_env.setenv("TINYMOE_THREADS", value)
    with pytest.raises(ValueError, match=f"TINYMOE_THREADS={value!r}: must be a positive integer"):
        threads.adapt()


def test_forced_count_is_applied_to_blas_and_numba(clean_env):
    import numba
    if threads.get_blas_threads() is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS with thread control")
    old = numba.get_num_threads()
    try:
        for n in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            threads.reset()
            clean_env.setenv("TINYMOE_THREADS", str(n))
            assert threads.adapt() == n
            assert threads.get_blas_threads() == n and numba.get_num_threads() == n
            assert f"fixed policy, {n} in force" in threads.status()
    finally:
        numba.set_num_threads(old)


def test_auto_gives_a_count_within_the_cores(clean_env):
    threads.reset()
    n = threads.adapt()
    assert 1 <= n <= threads.available_cores()
    assert threads.adapt() == threads.adapt()          # a too-short window keeps the count
    assert "auto policy" in threads.status()


def test_blas_user_setting_is_left_alone():
    """OPENBLAS_NUM_THREADS=1 set by the user: adapt never touches BLAS, numba follows it."""
    code = ("from tinymoe import threads; import numba; print(threads.adapt(), "
            "threads.get_blas_threads(), numba.get_num_threads(), threads.mode())")
    env = {k: v for k, v in os.environ.items() if k not in VARS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(env, OPENBLAS_NUM_THREADS="1"), check=True)
    n, blas, nb, mode = out.stdout.split()
    assert (n, nb, mode) == ("1", "1", "fixed") and blas in ("1", "None")

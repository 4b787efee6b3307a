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


def _scripted(clean_env, samples):
    """Feed adapt() these (wall, machine busy, own CPU) samples on 2 cores, one wall time per
    call (the CPU counters are read only when it decides); record what it sets."""
    walls, by_wall = iter(s[0] for s in samples), {s[0]: s for s in samples}
    clean_env.setattr(threads, "_clock", lambda: next(walls))
    clean_env.setattr(threads, "_cpu_sample", lambda wall: by_wall[wall])
    clean_env.setattr(threads, "available_cores", lambda: 2)
    clean_env.setattr(threads, "_runnable_now", lambda: 0)       # no other process
    applied = []
    clean_env.setattr(threads, "set_blas_threads", lambda n: applied.append(n) or True)
    clean_env.setattr(threads, "set_numba_threads", lambda n: None)
    threads.reset()
    return applied


def test_auto_decides_over_half_a_second_not_one_step(clean_env):
    # steps of 0.13 s on 2 cores, our process busy on both (0.26 s CPU per step); another
    # process shows one stray 2-tick burst (0.02 s) in the second step. Over that step alone it
    # reads 0.15 cores, which would drop a thread; over the 0.5 s window it is 0.04: keep 2
    samples, busy, own = [], 0.0, 0.0
    for i in range(9):
        samples.append((0.13 * i, busy, own))
        busy += 0.26 + (0.02 if i == 1 else 0.0)
        own += 0.26
    applied = _scripted(clean_env, samples)
    seen, decide = [], threads.decide
    clean_env.setattr(threads, "decide", lambda others, cores: seen.append(others) or
                      decide(others, cores))
    counts = [threads.adapt() for _ in samples]
    assert counts == [2] * 9 and applied == [2]          # first from the runnable count, then kept
    # decisions at 0 s (runnable count), 0.52 s and 1.04 s only: the short calls in between never
    # restart the window, so the one at 0.52 s saw the burst spread over all four steps
    assert seen[0] == 0.0 and len(seen) == 3
    assert seen[1] == pytest.approx(0.02 / 0.52) and seen[2] == pytest.approx(0.0, abs=1e-12)


def test_auto_drops_a_thread_within_the_window_when_a_competitor_starts(clean_env):
    # quiet for 0.6 s, then a busy loop takes one core: our process gets 1 core of CPU
    samples = [(0.0, 0.0, 0.0), (0.6, 1.2, 1.2), (0.8, 1.6, 1.4), (1.2, 2.4, 1.8)]
    applied = _scripted(clean_env, samples)
    assert threads.adapt() == 2                          # nothing else runnable: both cores
    assert threads.adapt() == 2                          # 0.6 s quiet window: others = 0
    assert threads.adapt() == 2                          # 0.2 s: too short to judge, keep
    assert threads.adapt() == 1                          # 0.6 s window: others = 1.0 core
    assert applied == [2, 1]


def test_first_decision_counts_tasks_runnable_now(clean_env):
    # a competitor is runnable in every reading, a kernel thread's blip in one: the fewest count
    readings = iter([2, 1, 1, 3, 1])
    clean_env.setattr(threads, "_runnable_now", lambda: next(readings))
    assert threads.runnable_others(gap=0.0) == 1.0
    readings = iter([0, 1, 0, 0, 2])                     # blips only: nothing else wants a core
    assert threads.runnable_others(gap=0.0) == 0.0


def test_runnable_count_sees_a_competitor_not_our_own_spinning_threads():
    import numpy as np
    a = np.ones((512, 512), dtype=np.float32)
    a @ a                                                # BLAS workers may now spin (state R)
    quiet = threads.runnable_others()
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        import time
        time.sleep(0.3)
        busy = threads.runnable_others()
    finally:
        loop.kill()
        loop.wait()
    assert busy >= 1.0 and busy >= quiet + 1.0          # the busy loop is in every reading

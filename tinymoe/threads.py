"""Thread policy: how many threads numpy's BLAS and numba's parallel kernels use, per training step.

On a 2-core machine the matrices of a small model are too small for BLAS threading to pay off
when a core is taken: OpenBLAS's worker threads spin waiting for a core another process holds,
and a step that takes 0.1 s alone took 7 s beside a test run. So the default policy ("auto")
re-decides at the first forward pass (`adapt()`, called by Model.forward_train) once WINDOW =
0.5 s have passed since the last decision:

    others = CPU time used by other processes since the last decision, in cores
             (/proc/stat's busy time minus this process's own, over the wall time)
    threads = clamp(floor(cores available to this process - others + 0.1), 1, cores)

so a quiet machine uses every core, and one competing CPU-bound process (or any load of more than a
tenth of a core) takes the step down to the whole cores that are left. The first decision, with no
window behind it yet, counts other processes' tasks runnable right now (the fewest in five readings
of /proc/loadavg 2 ms apart, less this process's own running threads), not the 1-minute load
average, which still counts a job that ended seconds ago and so started the next run on one thread.
Why a half-second window: both CPU counters advance in clock ticks (10 ms), so over one 0.13 s step
a single stray tick of another process reads as 0.08 cores and two as 0.15, which dropped a quiet
machine to one thread on about one step in ten; over 0.5 s that noise stays below 0.04 cores, and a
competitor that starts is seen within half a second (or one step, if a step takes longer). The
count changes only between steps, and a step's results do not depend on it (the numba kernels split
rows across threads without changing any sum's order, OpenBLAS's products split the output;
tests/test_fused.py checks a training step at 1 and 2 threads bit for bit).

Overrides, in this order (a fixed count is never changed by `adapt`):

    TINYMOE_THREADS=N          BLAS and numba both use N threads ("auto": the default policy)
    OPENBLAS_NUM_THREADS=N     (or OMP_NUM_THREADS) BLAS keeps the N it started with
    NUMBA_NUM_THREADS=N        numba keeps the N it started with

BLAS threads are set through OpenBLAS's own openblas_set_num_threads, found in the library
numpy has already loaded (ctypes; no extra dependency). Where it is not found (another BLAS, or
not Linux) the policy says so once (`status()`, and a RuntimeWarning) and leaves BLAS alone.
"""
from __future__ import annotations

import ctypes
import math
import os
import warnings
from typing import Optional

_SYMBOLS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
            "openblas_set_num_threads64_", "openblas_set_num_threads")

_state = {"blas": None, "blas_name": None, "searched": False, "warned": False,
          "last": None, "current": None}


def _env_int(name: str) -> Optional[int]:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    try:
        n = int(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: must be a positive integer") from None
    if n < 1:
        raise ValueError(f"{name}={raw!r}: must be a positive integer")
    return n


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _find_blas():
    """The set_num_threads function of the OpenBLAS numpy loaded, or None (searched once)."""
    if _state["searched"]:
        return _state["blas"]
    _state["searched"] = True
    import numpy  # noqa: F401  (loads the BLAS)
    paths = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                name = line.rsplit(None, 1)[-1]
                if "openblas" in name.lower() and name not in paths:
                    paths.append(name)
    except OSError:
        pass
    for path in paths:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in _SYMBOLS:
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.argtypes, fn.restype = [ctypes.c_int], None
                get = getattr(lib, sym.replace("set_", "get_"), None)
                if get is not None:
                    get.argtypes, get.restype = [], ctypes.c_int
                _state["blas"], _state["blas_get"] = fn, get
                _state["blas_name"] = f"{os.path.basename(path)}:{sym}"
                return fn
    return None


def set_blas_threads(n: int) -> bool:
    """Set OpenBLAS's thread count; False (with one RuntimeWarning) if it cannot be set."""
    fn = _find_blas()
    if fn is None:
        if not _state["warned"]:
            _state["warned"] = True
            warnings.warn("tinymoe.threads: numpy's BLAS is not an OpenBLAS this module can find "
                          "(openblas_set_num_threads); BLAS threads are left as they are",
                          RuntimeWarning, stacklevel=2)
        return False
    fn(int(n))
    return True


def get_blas_threads() -> Optional[int]:
    """OpenBLAS's current thread count, or None where it cannot be read."""
    _find_blas()
    get = _state.get("blas_get")
    return int(get()) if get is not None else None


def reset() -> None:
    """Forget the last decision: the next adapt() applies the policy (and the environment) anew."""
    _state["last"] = _state["current"] = None


def set_numba_threads(n: int) -> None:
    """Set numba's thread count for the parallel kernels (at most NUMBA_NUM_THREADS)."""
    from tinymoe.kernels import numba_module
    numba = numba_module()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def mode() -> str:
    """"fixed" when the environment pins a thread count (see the module docstring), else "auto"."""
    raw = os.environ.get("TINYMOE_THREADS", "auto").strip().lower()
    if raw not in ("", "auto"):
        _env_int("TINYMOE_THREADS")
        return "fixed"
    if any(os.environ.get(v) for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")):
        return "fixed"
    return "auto"


def _clock() -> float:
    """Wall seconds (monotonic): read first, so a call inside the window reads nothing else."""
    import time
    return time.monotonic()


def _cpu_sample(wall: float):
    """(wall, busy CPU seconds of the machine, CPU seconds of this process)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()[1:]
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)          # idle + iowait
    hz = os.sysconf("SC_CLK_TCK")
    t = os.times()
    return wall, (sum(ticks[:8]) - idle) / hz, t.user + t.system


def _runnable_now() -> int:
    """Runnable tasks of OTHER processes at this instant: /proc/loadavg's count of runnable
    tasks machine-wide minus this process's threads in state R (/proc/self/task/*/stat), which
    include BLAS worker threads that spin for a while after a product."""
    with open("/proc/loadavg") as f:
        total = int(f.read().split()[3].split("/")[0])
    own = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                own += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:                               # a thread that just ended
            continue
    return total - own


def runnable_others(samples: int = 5, gap: float = 0.002) -> float:
    """Tasks of other processes that want a core right now: the fewest in `samples` readings
    `gap` seconds apart (a CPU-bound competitor is in every reading, a kernel thread's blip is
    not). Where /proc is missing, the 1-minute load average."""
    import time
    try:
        seen = []
        for i in range(samples):
            if i:
                time.sleep(gap)
            seen.append(_runnable_now())
        return float(max(0, min(seen)))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (AttributeError, OSError):
            return 0.0


SLACK = 0.1        # cores of other load tolerated before giving up a thread
WINDOW = 0.5       # seconds of CPU accounting behind each decision


def decide(others: float, cores: int) -> int:
    """Threads for the next step: the whole cores `others` busy cores leave free, in [1, cores].

    Conservative on purpose: a thread more gains at most ~1.2x on this model's small matrices,
    a thread that must wait for a busy core can cost 5x, so any load above SLACK cores gives up
    the core it touches (others = 0.3 on 2 cores: 1 thread).
    """
    return int(max(1, min(cores, math.floor(cores - others + SLACK))))


def adapt() -> int:
    """Re-decide the thread count (auto mode) and apply it; returns the count in force."""
    if mode() == "fixed":
        if _state["current"] is None:                 # decided once: the count the user chose
            forced = os.environ.get("TINYMOE_THREADS", "auto").strip().lower() not in ("", "auto")
            n = _env_int("TINYMOE_THREADS") if forced else None
            if n is not None:
                set_blas_threads(n)
            n = n or _env_int("OPENBLAS_NUM_THREADS") or _env_int("OMP_NUM_THREADS")
            if not os.environ.get("NUMBA_NUM_THREADS"):
                set_numba_threads(n)                  # numba follows the BLAS count
            _state["current"] = n
        return _state["current"]
    now, last = _clock(), _state["last"]
    if _state["current"] is not None and (last is None or now - last[0] < WINDOW):
        return _state["current"]                       # window still short: keep the count
    try:
        sample = _cpu_sample(now)
    except (OSError, ValueError, IndexError):
        sample = None
    if _state["current"] is None:                      # first decision: no window behind it
        others = runnable_others()
    elif sample is None:
        return _state["current"]
    else:
        others = max(0.0, (sample[1] - last[1]) - (sample[2] - last[2])) / (now - last[0])
    _state["last"] = sample
    n = decide(others, available_cores())
    if n != _state["current"]:
        set_blas_threads(n)
        if not os.environ.get("NUMBA_NUM_THREADS"):
            set_numba_threads(n)
        _state["current"] = n
    return n


def status() -> str:
    """One line: the policy, the thread count in force and how BLAS threads are controlled."""
    _find_blas()
    blas = _state["blas_name"] or "not found (BLAS threads left alone)"
    return (f"threads: {mode()} policy, {_state['current'] or 'not yet decided'} in force, "
            f"{available_cores()} cores; BLAS control {blas}")

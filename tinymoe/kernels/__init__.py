"""Hot loops as numba kernels, each beside its NumPy twin with the same signature and results.

The NumPy twin is the reference; the numba kernel is the same computation written as explicit
loops (it doubles as the loop-level explanation). Bodies are plain Python functions that are
jitted lazily by name on first use, so:

- `import tinymoe` compiles nothing;
- `NUMBA_DISABLE_JIT=1` runs exactly the loop source in the interpreter;
- `TINYMOE_BACKEND=numpy` makes `get(name)` return the NumPy twin everywhere.

Each submodule (`scatter.py`, `moe.py`, ...) defines its pairs and calls `register`; callers use
the wrapper a submodule exports (it dispatches through `get`) or `get(name, which)` in tests.
Kernels are compiled with `cache=True` and no `fastmath`, so results are bitwise deterministic and
equal to the twin's up to float summation order (exactly, for the scatter-adds, which add in the
same order as `np.add.at`). Kernels registered with `parallel=True` split independent rows over
numba's threads with `prange`; every row is computed by one thread in a fixed order and no row
reads another's result, so their output does not depend on the thread count either
(tinymoe/threads.py sets it).
"""
from __future__ import annotations

import os
from typing import Callable, Dict


BACKENDS = ("numba", "numpy")


def backend() -> str:
    """The active backend: TINYMOE_BACKEND (default "numba")."""
    name = os.environ.get("TINYMOE_BACKEND", "numba").lower()
    if name not in BACKENDS:
        raise ValueError(f"TINYMOE_BACKEND={name!r}: must be one of {BACKENDS}")
    return name


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------

_NUMPY: Dict[str, Callable] = {}
_LOOPS: Dict[str, Callable] = {}
_JITTED: Dict[str, Callable] = {}
_PARALLEL: Dict[str, bool] = {}


def register(name: str, numpy_twin: Callable, loops: Callable, parallel: bool = False) -> None:
    """Add a kernel pair: `numpy_twin` (reference) and `loops` (plain function, jitted on use).

    parallel=True compiles `loops` with numba's parallel=True, so its `prange` loops run on
    numba's threads (under NUMBA_DISABLE_JIT=1 prange is a plain range).
    """
    _NUMPY[name] = numpy_twin
    _LOOPS[name] = loops
    _PARALLEL[name] = parallel


def numba_module():
    """numba, imported on first use, with the threading layer chosen before any parallel launch.

    The default layer is "workqueue" (NUMBA_THREADING_LAYER overrides): its idle threads sleep,
    while the OpenMP layer's spin, which on a 2-core machine shared with another process made a
    2-thread kernel 100x slower (0.2 ms -> 20 ms for an AdamW update of 200k values).
    """
    import numba
    if "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER = "workqueue"
    return numba


def _jit_helper(name: str) -> Callable:
    fn = _JITTED.get("_math." + name)
    if fn is None:
        numba = numba_module()
        from tinymoe.kernels import _math
        fn = numba.njit(cache=True, error_model="numpy", inline="always")(getattr(_math, name))
        _JITTED["_math." + name] = fn
    return fn


_HELPERS = ("exp_nonpositive", "row_max", "row_sum")       # plain functions of tinymoe/kernels/_math.py


PARALLEL_MIN_WORK = 1 << 18    # elements below which a parallel kernel runs its serial twin
FUSED_MIN_WORK = 1 << 12       # elements below which a fused path calls the plain function
# A student copy (tinymoe.grading) sets this False: its fused twins are cut like the exercises
# they duplicate, and the plain functions a student writes are the ones that run.
FUSED_KERNELS = True


def fused(size: int) -> bool:
    """Should a fused path (tinymoe/kernels/{attention,swiglu,norm,optim}.py) run on `size` elements?

    Under the numba backend and from FUSED_MIN_WORK elements on: below that a kernel saves
    microseconds, while loading its compiled code costs a process tens of milliseconds, so the
    toy models of the lessons and tests run the plain functions.
    """
    return FUSED_KERNELS and size >= FUSED_MIN_WORK and backend() == "numba"


def get(name: str, which: str | None = None, work: int | None = None) -> Callable:
    """The implementation of kernel `name` for backend `which` (default: the active backend).

    A kernel registered with parallel=True is compiled twice, lazily: its parallel version runs
    when numba has more than one thread and the call's `work` (elements, if given) is at least
    PARALLEL_MIN_WORK; otherwise the same loops compiled serially, since starting numba's threads
    costs more than a small loop (and, on a busy machine, waits for a core). Both compute every
    row identically, so the choice never changes a result.
    """
    which = which or backend()
    if name not in _NUMPY:
        raise KeyError(f"kernel {name!r}: unknown; known kernels are {sorted(_NUMPY)}")
    if which == "numpy":
        return _NUMPY[name]
    if which != "numba":
        raise ValueError(f"which={which!r}: must be one of {BACKENDS}")
    parallel = _PARALLEL[name]
    if parallel:
        numba = numba_module()
        parallel = numba.get_num_threads() > 1 and (work is None or work >= PARALLEL_MIN_WORK)
    fn = _JITTED.get((name, parallel))
    if fn is None:
        fn = _JITTED[(name, parallel)] = _compile(name, parallel)
    return fn


def _compile(name: str, parallel: bool) -> Callable:
    import types
    numba = numba_module()  # imported here so that `import tinymoe` stays fast
    loops = _LOOPS[name]
    if _PARALLEL[name]:
        # kernel modules bind `prange = range` (so importing them does not import numba);
        # the parallel loop needs numba's own prange at compile time (serially it is a range)
        loops.__globals__["prange"] = numba.prange
    for helper in _HELPERS:                           # helpers it calls: jitted, inlined
        if helper in loops.__code__.co_names and helper in loops.__globals__:
            loops.__globals__[helper] = _jit_helper(helper)
    if _PARALLEL[name] and not parallel:
        # the serial twin is a separate function object, so that numba's on-disk cache (keyed
        # by the function's name) keeps both versions apart
        loops = types.FunctionType(loops.__code__, loops.__globals__, loops.__name__ + "_serial")
        loops.__qualname__ = loops.__name__
    # error_model="numpy": x / 0 gives inf or nan as in NumPy, instead of a ZeroDivisionError
    # check per division, which would also stop the loop from vectorising
    return numba.njit(cache=True, parallel=parallel, error_model="numpy")(loops)


# Submodules register their kernels on import (pure Python: nothing is compiled here).
from tinymoe.kernels import scatter  # noqa: E402,F401
from tinymoe.kernels import moe  # noqa: E402,F401
from tinymoe.kernels import attention, loss, norm, optim, rope, swiglu  # noqa: E402,F401

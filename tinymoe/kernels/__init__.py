"""Hot loops as numba kernels, each beside its NumPy twin with the same signature and results.

The NumPy twin is the reference; the numba kernel is the same computation written as explicit
loops (it doubles as the loop-level explanation). Bodies are plain Python functions that are
jitted lazily by name on first use, so:

- `import tinymoe` compiles nothing;
- `NUMBA_DISABLE_JIT=1` runs exactly the loop source in the interpreter;
- `TINYMOE_BACKEND=numpy` makes `get(name)` return the NumPy twin everywhere.

Each submodule (`scatter.py`, `moe.py`, ...) defines its pairs and calls `register`; callers use
the wrapper a submodule exports (it dispatches through `get`) or `get(name, which)` in tests.
Kernels are compiled with `cache=True`; no `fastmath` and no `prange`, so results are bitwise
deterministic and equal to the twin's up to float summation order (exactly, for the scatter-adds,
which add in the same order as `np.add.at`).
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


def register(name: str, numpy_twin: Callable, loops: Callable) -> None:
    """Add a kernel pair: `numpy_twin` (reference) and `loops` (plain function, jitted on use)."""
    _NUMPY[name] = numpy_twin
    _LOOPS[name] = loops


def get(name: str, which: str | None = None) -> Callable:
    """The implementation of kernel `name` for backend `which` (default: the active backend)."""
    which = which or backend()
    if name not in _NUMPY:
        raise KeyError(f"kernel {name!r}: unknown; known kernels are {sorted(_NUMPY)}")
    if which == "numpy":
        return _NUMPY[name]
    if which != "numba":
        raise ValueError(f"which={which!r}: must be one of {BACKENDS}")
    fn = _JITTED.get(name)
    if fn is None:
        import numba  # imported here so that `import tinymoe` stays fast
        fn = numba.njit(cache=True)(_LOOPS[name])
        _JITTED[name] = fn
    return fn


# Submodules register their kernels on import (pure Python: nothing is compiled here).
from tinymoe.kernels import scatter  # noqa: E402,F401
from tinymoe.kernels import moe  # noqa: E402,F401

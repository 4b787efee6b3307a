"""Benchmark section: where the training step's time goes, by operation, before and after fusion.

The bench preset's full step under cProfile, in a fresh interpreter per configuration: the plain
NumPy layers (TINYMOE_BACKEND=numpy, "before") and the fused numba kernels (default, "after"),
at 1 and 2 threads. Each operation's row is its own time (cProfile's tottime: the matrix
products a function calls count as its own, the functions it calls do not) in ms per step;
cProfile adds some overhead per call, so the total is a little above the plain step time.
"""
from __future__ import annotations

from typing import List

from tinymoe.bench._timing import run_with_env

TOP = 14


def worker(steps: int) -> dict:
    """{function label: ms per step} of `steps` profiled steps (runs in the subprocess)."""
    import cProfile
    import pstats

    from tinymoe.bench.train import make_step
    *_, full_step = make_step()
    full_step()
    full_step()                                        # warm-up (numba cache, allocations)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        full_step()
    prof.disable()
    out: dict = {}
    for (path, _, fn), row in pstats.Stats(prof).stats.items():
        if "site-packages" in path and "numba" in path:
            label = "numba dispatch"
        elif path == "~":
            label = fn.strip("<>").replace("method ", "").replace("built-in ", "")
        else:
            label = f"{'/'.join(path.rsplit('/', 2)[-2:])[:-3]}.{fn}"       # layers/norm.rmsnorm_...
        out[label] = out.get(label, 0.0) + 1e3 * row[2] / steps      # tottime
    return out


def run(quick: bool) -> List[str]:
    steps = 1 if quick else 8
    configs = [(t, be) for t in ("1", "2") for be in ("numpy", "numba")]
    lines = [f"profile: bench preset step under cProfile, own time per operation in ms per step "
             f"(mean of {steps}); before = TINYMOE_BACKEND=numpy, after = fused numba kernels"]
    if quick:                                          # smoke test: this process, as it is
        from tinymoe.kernels import backend
        configs = [("as set", backend())]
    for threads, be in configs:
        res = worker(steps) if quick else run_with_env(          # quick: in this process
            f"tinymoe.bench.profile.worker({steps})",
            {"TINYMOE_THREADS": threads, "TINYMOE_BACKEND": be})
        total = sum(res.values())
        top = sorted(res.items(), key=lambda kv: -kv[1])[:TOP]
        what = "before (plain NumPy)" if be == "numpy" else "after (fused)"
        lines.append(f"-- threads {threads}, {what}: {total:.1f} ms per profiled step")
        lines += [f"   {ms:7.2f}  {label}" for label, ms in top]
    return lines

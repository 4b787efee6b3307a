"""Timing helpers shared by the benchmark sections (the leading underscore keeps this module out of
the section list): medians of repeated calls, round-robin timing, and running a measurement in a
subprocess with a given BLAS thread count (BLAS reads OPENBLAS_NUM_THREADS once, at start-up)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np


def median_seconds(fn, repeats: int, warmup: bool = True) -> float:
    """Median wall time of `repeats` calls of fn() (one untimed warm-up call first by default)."""
    if warmup:
        fn()                                           # numba compile, caches, allocations
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds of each fn, timed round-robin so background load hits all of them alike."""
    for fn in fns.values():
        fn()                                           # warm-up
    ts = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[k].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in ts.items()}


def run_with_threads(call: str, threads: int) -> dict:
    """Evaluate `call` (a Python expression returning a JSON-able dict, e.g.
    "tinymoe.bench.train.worker(False)") in a fresh interpreter whose BLAS uses `threads` threads."""
    return run_with_env(call, {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads),
                               "MKL_NUM_THREADS": str(threads)})


THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS",
               "TINYMOE_THREADS")


def run_with_env(call: str, env: dict, python: str = sys.executable) -> dict:
    """Evaluate `call` in a fresh interpreter with every thread variable of THREAD_VARS removed and
    then `env` added (so {} runs tinymoe's default thread policy); returns its JSON dict."""
    full = {k: v for k, v in os.environ.items() if k not in THREAD_VARS}
    full.update(env)
    module = call.split("(", 1)[0].rsplit(".", 1)[0]
    code = f"import json, {module}; print(json.dumps({call}))"
    out = subprocess.run([python, "-c", code], env=full, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench subprocess {call} ({env}) failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Competitor:
    """`with Competitor():` one CPU-bound process (a Python busy loop) runs beside the block.

    It is this interpreter in a subprocess, started before the block and killed (by its own
    process handle) after it, even when the block raises.
    """

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.2)                                # let it reach the CPU
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()
        return False

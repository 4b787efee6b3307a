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
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    module = call.split("(", 1)[0].rsplit(".", 1)[0]
    code = f"import json, {module}; print(json.dumps({call}))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"bench subprocess {call} (OPENBLAS_NUM_THREADS={threads}) failed:\n"
                           f"{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])

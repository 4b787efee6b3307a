"""Benchmark section: the training step on a busy machine (one competing CPU-bound process).

The bench preset's full step (batch 8 x 128, float32, forward + backward + AdamW + bias update),
each configuration in a fresh interpreter, quiet and then beside one Python busy loop:

    default    no thread variable set: tinymoe's policy (tinymoe/threads.py) picks the count
    forced 1   TINYMOE_THREADS=1 (BLAS and numba one thread)
    forced 2   TINYMOE_THREADS=2

Reported as medians and as ratios to the quiet forced-1 step (the target: default <= 1.5x).
Rounds alternate the configurations so that background load hits them alike.
"""
from __future__ import annotations

from typing import List

import numpy as np

from tinymoe.bench._timing import Competitor, run_with_env

CONFIGS = {"default": {}, "forced 1": {"TINYMOE_THREADS": "1"},
           "forced 2": {"TINYMOE_THREADS": "2"}}


def measure(quick: bool) -> dict:
    """{(load, config): [step seconds per round]}, load in ("quiet", "busy")."""
    rounds, repeats = (1, 1) if quick else (3, 7)
    out: dict = {}
    if quick:                                          # smoke test: in this process, as it is
        from tinymoe.bench.train import step_worker
        out[("quiet", "default")] = [step_worker(repeats)]
        with Competitor():
            out[("busy", "default")] = [step_worker(repeats)]
        return out
    configs = CONFIGS
    call = f"tinymoe.bench.train.step_worker({repeats})"
    for _ in range(rounds):
        for name, env in configs.items():
            out.setdefault(("quiet", name), []).append(run_with_env(call, env))
        with Competitor():
            for name, env in configs.items():
                out.setdefault(("busy", name), []).append(run_with_env(call, env))
    return out


def run(quick: bool) -> List[str]:
    res = measure(quick)
    base_key = ("quiet", "forced 1") if ("quiet", "forced 1") in res else ("quiet", "default")
    base = float(np.median([r["step_s"] for r in res[base_key]]))
    lines = [f"busy machine: bench preset step, one competing CPU-bound process, medians over "
             f"{len(res[base_key])} alternating round(s); ratio to the quiet {base_key[1]} step",
             f"{'load':>6} {'threads':>9} {'in force':>9} {'step ms':>8} {'ratio':>6}"]
    for (load, name), rs in res.items():
        t = float(np.median([r["step_s"] for r in rs]))
        used = "/".join(sorted({str(r["threads"]) for r in rs}))
        lines.append(f"{load:>6} {name:>9} {used:>9} {1e3 * t:>8.1f} {t / base:>5.2f}x")
    lines.append("default = tinymoe.threads' auto policy: every half second it counts the cores "
                 "other processes used since its last decision and takes the rest (at least 1)")
    return lines

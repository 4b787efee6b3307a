"""Benchmark section: how the training step scales with sequence length, experts and batch.

The bench preset's full step (forward + backward + AdamW + bias update, float32) with one of
sequence length T, routed experts E or batch B changed at a time, each in a fresh interpreter with
tinymoe's default thread policy. Reported per row: step time (median), tokens/s, and the peak
memory of one step: the largest amount of NumPy memory alive at once during the step (tracemalloc,
which NumPy reports its buffers to), measured on a separate, untimed step.
"""
from __future__ import annotations

from typing import List

from tinymoe.bench._timing import run_with_env

FULL = ([("T", t, dict(batch=2, seq=t)) for t in (128, 256, 512, 1024)]
        + [("E", e, dict(n_routed_experts=e)) for e in (16, 32, 64)]
        + [("B", b, dict(batch=b)) for b in (1, 4, 8, 16)])
QUICK = [("T", 128, dict(batch=1, seq=128))]


def worker(kwargs: dict, repeats: int) -> dict:
    """Step median and peak bytes for make_step(**kwargs) (runs in the subprocess)."""
    import tracemalloc

    from tinymoe.bench._timing import median_seconds
    from tinymoe.bench.train import make_step
    cfg, model, opt, tokens, targets, full_step = make_step(**kwargs)
    full_step()                                        # warm-up
    t = median_seconds(full_step, repeats, warmup=False)
    tracemalloc.start()
    full_step()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"step_s": t, "peak_bytes": peak, "tokens": int(tokens.size)}


def run(quick: bool) -> List[str]:
    rows = QUICK if quick else FULL
    repeats = 1 if quick else 5
    lines = ["scaling: bench preset step (B=8, T=128, E=16 unless changed; T rows at B=2), "
             f"default thread policy, median of {repeats}; peak = most NumPy memory alive in one step",
             f"{'vary':>4} {'value':>6} {'tokens':>7} {'step ms':>9} {'tok/s':>8} {'peak MB':>8}"]
    for what, value, kwargs in rows:
        r = (worker(kwargs, repeats) if quick else       # smoke test: in this process
             run_with_env(f"tinymoe.bench.scaling.worker({kwargs!r}, {repeats})", {}))
        lines.append(f"{what:>4} {value:>6d} {r['tokens']:>7d} {1e3 * r['step_s']:>9.1f} "
                     f"{r['tokens'] / r['step_s']:>8.0f} {r['peak_bytes'] / 2**20:>8.1f}")
    lines.append("attention weights are cached per layer as [B, H, T, T]: peak memory grows with "
                 "B T^2 at long sequences, with B T elsewhere")
    return lines

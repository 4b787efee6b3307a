"""Benchmark section: the DeepSeekMoE layer's forward + backward on the bench preset's shape.

Compares (same router, same shared expert, same per-expert SwiGLU matmuls):
    numba    moe_forward/moe_backward with the numba dispatch/combine kernels
    numpy    the same with TINYMOE_BACKEND=numpy (the vectorised NumPy twins)
    loop     a plain per-expert Python loop: boolean mask per expert, x[rows], np.add.at back
and the share of the layer spent in dispatch + combine (sort, gather, weighted scatter-add and
their backward) against the experts' own matrix products (forward + backward).
Threads: whatever OPENBLAS_NUM_THREADS says (reported); __main__ may set it per subprocess.
"""
from __future__ import annotations

import os

import numpy as np

from tinymoe.bench._timing import interleaved_medians, median_seconds


def _with_backend(which: str, fn):
    def call():
        os.environ["TINYMOE_BACKEND"] = which
        return fn()
    return call


def loop_moe_forward_backward(x, p, bias, cfg, dy):
    """The baseline: per-expert Python loop with np.add.at (forward and backward)."""
    from tinymoe.layers.basic import swiglu_backward, swiglu_forward
    from tinymoe.layers.router import router_backward, router_forward

    w, idx, rc = router_forward(x, p["gate"], bias, cfg)
    N, K = idx.shape
    y = np.zeros_like(x)
    saved = []
    for e in range(cfg.n_routed_experts):
        rows, ks = np.nonzero(idx == e)
        if rows.size == 0:
            saved.append(None)
            continue
        h, c = swiglu_forward(x[rows], p["experts.w1"][e], p["experts.w2"][e], p["experts.w3"][e])
        np.add.at(y, rows, w[rows, ks, None] * h)
        saved.append((rows, ks, h, c))
    ysh, csh = swiglu_forward(x, p["shared.w1"], p["shared.w2"], p["shared.w3"])
    y = y + ysh
    # backward
    dx, *_ = swiglu_backward(dy, csh)
    dwts = np.zeros_like(w)
    for e, s in enumerate(saved):
        if s is None:
            continue
        rows, ks, h, c = s
        g = dy[rows]
        dwts[rows, ks] = np.sum(g * h, axis=1)
        dxe, *_ = swiglu_backward(g * w[rows, ks, None], c)
        np.add.at(dx, rows, dxe)
    dxr, _ = router_backward(dwts, rc)
    return y, dx + dxr


def run(quick: bool = False) -> list[str]:
    from tinymoe.config import ModelConfig
    from tinymoe.kernels.moe import moe_combine, moe_combine_backward, moe_gather, moe_sort
    from tinymoe.layers.basic import swiglu_backward, swiglu_forward
    from tinymoe.layers.moe import init_moe_params, moe_backward, moe_forward
    from tinymoe.memory import keep_freed_memory

    keep_freed_memory()                                # as a Model does (tinymoe/memory.py)
    cfg = ModelConfig.preset("bench")
    B, T = 8, 128
    N, D, E, K = B * T, cfg.dim, cfg.n_routed_experts, cfg.n_activated_experts
    rng = np.random.default_rng(0)
    p = init_moe_params(cfg, rng, np.float32)
    p["gate"] *= 10                                    # a router with some preference
    x = rng.standard_normal((N, D)).astype(np.float32)
    dy = rng.standard_normal((N, D)).astype(np.float32)
    bias = np.zeros(E, np.float32)
    reps = 3 if quick else 15

    def layer():
        y, _, c = moe_forward(x, p, bias, cfg, T)
        return moe_backward(dy, c)

    old = os.environ.get("TINYMOE_BACKEND")
    try:
        times = interleaved_medians({
            "numba": _with_backend("numba", layer),
            "numpy": _with_backend("numpy", layer),
            "loop": _with_backend("numba", lambda: loop_moe_forward_backward(x, p, bias, cfg, dy)),
        }, reps)
        os.environ["TINYMOE_BACKEND"] = "numba"

        # dispatch + combine alone vs the experts' matmuls alone, on the layer's own routing
        _, _, c = moe_forward(x, p, bias, cfg, T)
        idx_flat, keep_flat = c.indices.reshape(-1), c.keep.reshape(-1)
        ones = np.ones(c.order.shape[0], np.float32)
        xs = x[c.tok]
        dc = {}
        for which in ("numba", "numpy"):
            os.environ["TINYMOE_BACKEND"] = which

            def dispatch_combine():
                order, pos, off = moe_sort(idx_flat, keep_flat, E)
                tok = order // K
                xs_ = moe_gather(x, tok)
                moe_combine(c.ys, c.w_s, pos, N, K)
                moe_combine_backward(dy, c.ys, c.w_s, tok)
                moe_combine(xs_, ones, pos, N, K)            # dispatch backward

            dc[which] = median_seconds(dispatch_combine, reps)
    finally:
        if old is None:
            os.environ.pop("TINYMOE_BACKEND", None)
        else:
            os.environ["TINYMOE_BACKEND"] = old

    def experts():
        for e in range(E):
            a, b = c.offsets[e], c.offsets[e + 1]
            if a == b:
                continue
            ye, ce = swiglu_forward(xs[a:b], p["experts.w1"][e], p["experts.w2"][e],
                                    p["experts.w3"][e])
            swiglu_backward(ye, ce)

    t_exp = median_seconds(experts, reps)
    ms = lambda s: f"{1e3 * s:8.2f} ms"               # noqa: E731
    threads = os.environ.get("OPENBLAS_NUM_THREADS", "unset")
    return [
        f"moe: bench preset, N = {B}x{T} tokens, D={D}, E={E}, K={K}, F={cfg.moe_inter_dim}, "
        f"1 shared, float32, OPENBLAS_NUM_THREADS={threads}, median of {reps}, timed round-robin",
        f"moe fwd+bwd  numba kernels   {ms(times['numba'])}",
        f"moe fwd+bwd  numpy twins     {ms(times['numpy'])}   numpy/numba = "
        f"{times['numpy'] / times['numba']:.2f}x",
        f"moe fwd+bwd  per-expert loop {ms(times['loop'])}   loop/numba  = "
        f"{times['loop'] / times['numba']:.2f}x",
        f"dispatch+combine fwd+bwd: numba {ms(dc['numba'])}, numpy {ms(dc['numpy'])}; "
        f"experts' matmuls fwd+bwd {ms(t_exp)}; dispatch+combine / matmuls = "
        f"{dc['numba'] / t_exp:.2f} (numba), {dc['numpy'] / t_exp:.2f} (numpy); "
        f"share of the whole layer = {dc['numba'] / times['numba']:.1%} (numba)",
    ]


if __name__ == "__main__":
    print("\n".join(run(False)))

"""Benchmark section: one training step of the whole model on the `bench` preset (batch 8 x 128).

Reports, for OPENBLAS_NUM_THREADS = 1 and 2 (each in its own subprocess, since BLAS reads the
variable once at start-up):
    tokens/s of a full step, and its split into forward, backward and the AdamW update
    the machine's measured float32 matmul peak (best of a few 1024^3 products) and the model
    FLOPs utilisation (MFU) = model FLOPs per step / step time / peak,
with model FLOPs from tinymoe.accounting.flops_per_token (6 x active non-embedding
parameters per token plus the attention scores at the batch's context, forward + backward).
The PyTorch + transformers comparison (DeepseekV3ForCausalLM with the same shape, threads, and
AdamW) is scripts/bench_torch.py, run with an environment that has torch and transformers.
"""
from __future__ import annotations

import os

import numpy as np

from tinymoe.bench._timing import median_seconds, run_with_env, run_with_threads

B, T = 8, 128


def matmul_peak(n: int = 1024, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n x n by n x n product (2 n^3 FLOPs) with the current threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    b = rng.standard_normal((n, n)).astype(np.float32)
    a @ b
    best = min(median_seconds(lambda: a @ b, 1, warmup=False) for _ in range(repeats))
    return 2 * n ** 3 / best


def make_step(batch: int = B, seq: int = T, **overrides):
    """(cfg, model, opt, tokens, targets, full_step) on the bench preset with `overrides`."""
    from tinymoe.config import ModelConfig
    from tinymoe.model import Model
    from tinymoe.optim import AdamW

    fields = dict(bias_update_speed=0.001)
    fields.update(overrides)
    if seq > 4096:
        fields["max_seq_len"] = seq
    cfg = ModelConfig.preset("bench", **fields)
    model = Model(cfg, seed=0, dtype=np.float32)
    opt = AdamW(model.params, lr=1e-3, weight_decay=0.1)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, size=(batch, seq))
    targets = rng.integers(0, cfg.vocab_size, size=(batch, seq))

    def full_step():
        grads = model.loss_and_grads(tokens, targets)[1]
        opt.step(grads)
        model.update_router_biases(model.last_stats["loads"], cfg.bias_update_speed)

    return cfg, model, opt, tokens, targets, full_step


def step_worker(repeats: int) -> dict:
    """Median seconds of the full step only (threads as the environment and policy say)."""
    from tinymoe import threads
    *_, full_step = make_step()
    full_step()                                          # warm-up: numba cache, allocations
    t = median_seconds(full_step, repeats, warmup=False)
    return {"step_s": t, "threads": threads.adapt(), "policy": threads.mode()}


def worker(quick: bool) -> dict:
    """Measure in this process (threads fixed by the environment); returns a JSON-able dict."""
    from tinymoe.accounting import flops_per_token
    from tinymoe.layers.basic import cross_entropy_forward

    cfg, model, opt, tokens, targets, _ = make_step()
    repeats = 2 if quick else 15

    def fwd():
        logits, _, _ = model.forward_train(tokens)
        cross_entropy_forward(logits.reshape(B * T, -1), targets.reshape(-1))

    holder = {}

    def fwd_bwd():
        holder["grads"] = model.loss_and_grads(tokens, targets)[1]

    def opt_step():
        opt.step(holder["grads"])

    def full_step():
        fwd_bwd()
        opt_step()
        model.update_router_biases(model.last_stats["loads"], cfg.bias_update_speed)

    full_step()                                          # warm-up: numba compile, allocations
    t_fwd = median_seconds(fwd, repeats, warmup=False)
    t_fb = median_seconds(fwd_bwd, repeats, warmup=False)
    t_opt = median_seconds(opt_step, repeats, warmup=False)
    t_step = median_seconds(full_step, repeats, warmup=False)
    peak = matmul_peak(512 if quick else 1024)
    flops = flops_per_token(cfg, T).total * B * T
    return {"threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
            "tokens_per_s": B * T / t_step, "step_s": t_step, "forward_s": t_fwd,
            "backward_s": max(t_fb - t_fwd, 0.0), "optimizer_s": t_opt, "peak_flops": peak,
            "model_flops_per_step": flops, "mfu": flops / t_step / peak}


def run(quick: bool) -> list:
    lines = [f"bench preset, batch {B} x {T} tokens, float32, forward + backward + AdamW + bias update"]
    lines.append(f"{'threads':>7} {'tok/s':>9} {'step ms':>8} {'fwd ms':>8} {'bwd ms':>8} "
                 f"{'adam ms':>8} {'peak GF/s':>10} {'MFU':>6}")
    for threads in ("1", "2"):
        r = run_with_threads(f"tinymoe.bench.train.worker({quick})", int(threads))
        lines.append(f"{threads:>7} {r['tokens_per_s']:>9.0f} {1e3 * r['step_s']:>8.1f} "
                     f"{1e3 * r['forward_s']:>8.1f} {1e3 * r['backward_s']:>8.1f} "
                     f"{1e3 * r['optimizer_s']:>8.1f} {r['peak_flops'] / 1e9:>10.1f} "
                     f"{100 * r['mfu']:>5.1f}%")
    if not quick:
        for threads in ("1", "2"):
            env = {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
            t = {be: run_with_env("tinymoe.bench.train.step_worker(15)",
                                  dict(env, TINYMOE_BACKEND=be))["step_s"]
                 for be in ("numpy", "numba")}
            lines.append(f"threads {threads}: plain NumPy layers (TINYMOE_BACKEND=numpy) "
                         f"{1e3 * t['numpy']:.1f} ms, fused numba kernels {1e3 * t['numba']:.1f} ms, "
                         f"plain/fused = {t['numpy'] / t['numba']:.2f}x")
    lines.append("compare: scripts/bench_torch.py (PyTorch + transformers DeepseekV3ForCausalLM, "
                 "same shape and threads)")
    return lines

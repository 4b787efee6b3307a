"""Lesson 6: DeepSeekMoE - fine-grained and shared experts vs dense, at equal ACTIVE parameters.

Four feed-forward layers with the same number of parameters used per token are trained on data
that needs more capacity than any one token's active path has (router-analysis.md 2.5):

    dense        one SwiGLU of width w                                  (every parameter active)
    coarse       top-1 of 8 experts of width w                           (GShard-style MoE)
    fine         top-4 of 32 experts of width w/4                        (DeepSeekMoE 3.1)
    fine+shared  1 shared expert of width w/4 + top-3 of 31 of width w/4 (DeepSeekMoE 3.2)

then ablated at evaluation time: disable each token's top-r routed experts (DeepSeekMoE 4.5,
Fig. 4), drop the shared expert vs the busiest routed expert, and look at co-activation.

    python lessons/06_deepseekmoe.py            # about a minute on 2 cores
    python lessons/06_deepseekmoe.py --quick    # a few seconds (test suite)
    python lessons/06_deepseekmoe.py --seeds 3  # the calibration runs of the claims
"""
# %% [markdown]
# # DeepSeekMoE: fine-grained experts and shared-expert isolation
#
# DeepSeekMoE ("DeepSeekMoE: Towards Ultimate Expert Specialization", Dai et al. 2024) changes
# two things in a GShard-style MoE layer, keeping the compute per token fixed:
#
# 1. **Fine-grained expert segmentation (section 3.1).** Split each of the N experts of width w
#    into m experts of width w/m and route every token to mK of them instead of K. Active
#    parameters stay the same; the number of expert *combinations* a token can use grows from
#    C(N, K) to C(mN, mK) (C(16,2) = 120 vs C(64,8) = 4,426,165,368 in the paper), so each
#    token can get a more specific mixture.
# 2. **Shared-expert isolation (section 3.2).** K_s experts are always on (weight 1, no router)
#    and only mK - K_s are routed. Knowledge every token needs (here: the part of the answer that
#    does not depend on which map is asked) can live once in the shared expert instead of being
#    copied into every routed expert.
#
# The layer (V3 eq. 12, `tinymoe.layers.moe.moe_forward`):
#
#     y_t = Shared(u_t) + sum_{i in TopK(s_t)} g_{t,i} Expert_i(u_t),   s_t = softmax(u_t W_g^T)
#
# Here the router uses softmax affinities and the gate g = s (not renormalised: DeepSeekMoE /
# V2 style). With sigmoid scores renormalised over the chosen K (V3), a top-1 router gets
# g = 1 for every token and therefore no gradient from the loss at all, so the coarse top-1
# baseline needs the softmax gate.
#
# **Why the data matters.** On smooth data a dense FFN and an MoE of equal active size tie
# (router-analysis.md 2.5: makemore blog, moe-lab). An MoE's advantage is its *total*
# parameters, which only pays when the task needs more capacity than the active path: here
# 16 tasks x 128 symbols = 2048 random facts ("task t maps symbol c to pi_t(c)"), memorised by a
# model whose FFN is only 8 units wide per token. (With 8 tasks = 1024 facts, the prototype's
# size, this SwiGLU model with RMSNorms memorises everything even when dense - loss 0.0004 - so
# the table was doubled until the dense path runs out of room: dense 1.55-1.71 nats.)

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matrices: threads only cost (router-analysis 5)

import time

import numpy as np

from tinymoe.analysis import coactivation, expert_load, maxvio, plot_coactivation, random_baselines
from tinymoe.config import ModelConfig
from tinymoe.layers.basic import (cross_entropy_backward, cross_entropy_forward, embedding_backward,
                                  embedding_forward, swiglu_backward, swiglu_forward)
from tinymoe.layers.moe import moe_backward, moe_forward, update_bias
from tinymoe.layers.norm import rmsnorm_backward, rmsnorm_forward
from tinymoe.layers.router import router_forward
from tinymoe.lesson import Lesson
from tinymoe.optim import AdamW, lr_schedule

L = Lesson("06_deepseekmoe", __doc__)
QUICK = L.quick

# %% [markdown]
# ## Data: memorisation-heavy conflicting maps (router-analysis.md 2.3, 2.5)
#
# `n_tasks` random permutations pi_t of `n_symbols` content symbols. The input is the pair
# (task, symbol); the target is pi_t(symbol). The same symbol needs a different answer under
# every task, so the map is a table of n_tasks * n_symbols independent facts: no smooth rule to
# generalise, only capacity helps. The pair is embedded as e_task + e_symbol (what an attention
# layer over "<task> symbol" would hand to the FFN), so the router sees the task as a direction
# it can split on. The generator is local to this lesson and seeded by the lesson's seed.

# %%
N_TASKS, N_SYMBOLS = 16, 128
D, W = 32, 8                          # model width, active FFN width per token


def make_facts(seed: int):
    """-> tasks [M], symbols [M], answers [M] int64, M = N_TASKS * N_SYMBOLS (every fact once)."""
    rng = np.random.default_rng(10_000 + seed)
    perms = np.stack([rng.permutation(N_SYMBOLS) for _ in range(N_TASKS)])   # [tasks, symbols]
    t, c = np.meshgrid(np.arange(N_TASKS), np.arange(N_SYMBOLS), indexing="ij")
    t, c = t.ravel(), c.ravel()
    return t.astype(np.int64), c.astype(np.int64), perms[t, c].astype(np.int64)


# %% [markdown]
# ## Four FFNs with the same active parameters
#
# Active FFN parameters per token = 3 D (K F + F_s) (SwiGLU: W1, W3 [F, D] and W2 [D, F]; plus
# the router's E x D, which every token uses). Total = 3 D (E F + F_s). The dense layer is the
# `inter_dim` SwiGLU of the first DeepSeek blocks; the MoE variants are `ModelConfig` MoE layers.

# %%
def variant_configs():
    base = dict(vocab_size=N_SYMBOLS, dim=D, n_layers=1, n_heads=1, max_seq_len=2,
                score_func="softmax", route_scale=1.0, n_expert_groups=1, n_limited_groups=1,
                bias_update_speed=1e-3, aux_loss_alpha=0.0)
    return {
        "dense": ModelConfig(**base, inter_dim=W, n_dense_layers=1),
        "coarse": ModelConfig(**base, inter_dim=W, n_dense_layers=0, n_routed_experts=8,
                              n_activated_experts=1, moe_inter_dim=W, n_shared_experts=0),
        "fine": ModelConfig(**base, inter_dim=W, n_dense_layers=0, n_routed_experts=32,
                            n_activated_experts=4, moe_inter_dim=W // 4, n_shared_experts=0),
        "fine+shared": ModelConfig(**base, inter_dim=W, n_dense_layers=0, n_routed_experts=31,
                                   n_activated_experts=3, moe_inter_dim=W // 4, n_shared_experts=1),
    }


def param_table(cfg: ModelConfig) -> dict:
    if not cfg.is_moe_layer(0):
        n = 3 * cfg.dim * cfg.inter_dim
        return dict(active_width=cfg.inter_dim, active_ffn=n, total_ffn=n, router=0,
                    combos=1)
    F, Fs = cfg.moe_inter_dim, cfg.n_shared_experts * cfg.moe_inter_dim
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    import math
    return dict(active_width=K * F + Fs, active_ffn=3 * cfg.dim * (K * F + Fs),
                total_ffn=3 * cfg.dim * (E * F + Fs), router=E * cfg.dim, combos=math.comb(E, K))


CFGS = variant_configs()
TABLE = {name: param_table(cfg) for name, cfg in CFGS.items()}
L.log(f"{'variant':12s} {'E':>3s} {'K':>2s} {'F':>3s} {'Fs':>3s} {'active width':>12s} "
      f"{'active FFN':>10s} {'total FFN':>9s} {'router':>6s} {'C(E,K)':>8s}")
for name, cfg in CFGS.items():
    r = TABLE[name]
    moe = cfg.is_moe_layer(0)
    L.log(f"{name:12s} {cfg.n_routed_experts if moe else 0:3d} {cfg.n_activated_experts if moe else 0:2d} "
          f"{cfg.moe_inter_dim if moe else cfg.inter_dim:3d} "
          f"{cfg.n_shared_experts * cfg.moe_inter_dim if moe else 0:3d} {r['active_width']:12d} "
          f"{r['active_ffn']:10d} {r['total_ffn']:9d} {r['router']:6d} {r['combos']:8d}")
L.metric("param_table", TABLE)
widths = {r["active_width"] for r in TABLE.values()}
L.claim("active_width_spread", max(widths) - min(widths), "<=", 0, quick=True,
        note="every variant uses the same active FFN width K*F + Fs = w")

# %% [markdown]
# ## The model, forward and backward by hand
#
#     x      = E_task[t] + E_sym[c]                 [N, D]
#     u      = RMSNorm(x)                           [N, D]
#     h      = x + FFN(u)                           [N, D]   dense SwiGLU or DeepSeekMoE
#     logits = RMSNorm(h) W_head^T                  [N, V]
#
# The backward walks the same lines in reverse; `moe_backward` returns the router's gradient
# (through the gate values) and the experts' gradients. The router's selection bias is balanced
# by the auxiliary-loss-free rule b_i += gamma sign(mean load - load_i) after each step (V3 2.1.2).

# %%
def init_params(cfg: ModelConfig, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    std = 0.02
    p = {"e_task": rng.standard_normal((N_TASKS, D)) * 0.5,
         "e_sym": rng.standard_normal((N_SYMBOLS, D)) * 0.5,
         "ffn_norm": np.ones(D), "out_norm": np.ones(D),
         "head": rng.standard_normal((N_SYMBOLS, D)) * std}
    if cfg.is_moe_layer(0):
        E, F = cfg.n_routed_experts, cfg.moe_inter_dim
        p["ffn.gate"] = rng.standard_normal((E, D)) * std
        p["ffn.experts.w1"] = rng.standard_normal((E, F, D)) / np.sqrt(D)
        p["ffn.experts.w3"] = rng.standard_normal((E, F, D)) / np.sqrt(D)
        p["ffn.experts.w2"] = rng.standard_normal((E, D, F)) / np.sqrt(F)
        if cfg.n_shared_experts:
            Fs = cfg.n_shared_experts * F
            p["ffn.shared.w1"] = rng.standard_normal((Fs, D)) / np.sqrt(D)
            p["ffn.shared.w3"] = rng.standard_normal((Fs, D)) / np.sqrt(D)
            p["ffn.shared.w2"] = rng.standard_normal((D, Fs)) / np.sqrt(Fs)
    else:
        F = cfg.inter_dim
        p["ffn.w1"] = rng.standard_normal((F, D)) / np.sqrt(D)
        p["ffn.w3"] = rng.standard_normal((F, D)) / np.sqrt(D)
        p["ffn.w2"] = rng.standard_normal((D, F)) / np.sqrt(F)
    return {k: v.astype(np.float32) for k, v in p.items()}


def ffn_params(p):
    return {k[4:]: v for k, v in p.items() if k.startswith("ffn.")}


def forward(p, bias, cfg, t, c, y=None):
    """-> logits [N, V], (loss, caches) if y given. N facts, one token each (seq_len 1)."""
    x_t, c_t = embedding_forward(t, p["e_task"])
    x_c, c_c = embedding_forward(c, p["e_sym"])
    x = x_t + x_c                                                            # [N, D]
    u, c_n1 = rmsnorm_forward(x, p["ffn_norm"])                              # [N, D]
    fp = ffn_params(p)
    if cfg.is_moe_layer(0):
        f, aux, c_f = moe_forward(u, fp, bias, cfg, 1)                       # [N, D]
    else:
        f, c_f = swiglu_forward(u, fp["w1"], fp["w2"], fp["w3"])
        aux = 0.0
    h = x + f                                                                # [N, D]
    hn, c_n2 = rmsnorm_forward(h, p["out_norm"])
    logits = hn @ p["head"].T                                                # [N, V]
    if y is None:
        return logits, c_f
    ce, c_ce = cross_entropy_forward(logits, y)
    return logits, (ce, aux, (c_t, c_c, c_n1, c_f, hn, c_n2, c_ce))


def backward(p, cfg, caches):
    c_t, c_c, c_n1, c_f, hn, c_n2, c_ce = caches
    g = {}
    # forward: logits = hn @ head.T ; loss = CE(logits)
    dlogits = cross_entropy_backward(1.0, c_ce)
    g["head"] = dlogits.T @ hn
    # forward: hn = RMSNorm(h)
    dh, g["out_norm"] = rmsnorm_backward(dlogits @ p["head"], c_n2)
    # forward: h = x + FFN(u)
    if cfg.is_moe_layer(0):
        du, gf = moe_backward(dh, c_f, 1.0)
    else:
        du, dw1, dw2, dw3 = swiglu_backward(dh, c_f)
        gf = {"w1": dw1, "w2": dw2, "w3": dw3}
    g.update({f"ffn.{k}": v for k, v in gf.items()})
    # forward: u = RMSNorm(x)
    dx_n, g["ffn_norm"] = rmsnorm_backward(du, c_n1)
    dx = dh + dx_n                                                   # residual: both paths meet
    # forward: x = E_task[t] + E_sym[c]
    g["e_task"] = embedding_backward(dx, c_t)
    g["e_sym"] = embedding_backward(dx, c_c)
    return g


# %% [markdown]
# ## Evaluation-time ablations (an independent MoE path)
#
# `moe_eval` recomputes the MoE output with every expert applied to every token, then picks
# slots. To **disable the top-r routed experts of each token** (DeepSeekMoE Fig. 4) it routes
# with K + r experts and keeps slots r .. r+K-1, so each token uses its next-best experts with
# their own (softmax) gate values. To **drop the busiest routed expert** it gives that expert a
# selection bias of -1e4 (finite: the router rejects non-finite biases), so the router picks
# the next one; compute per token is unchanged. To **drop the shared expert** it removes the
# shared output and routes one more expert (K+1, DeepSeekMoE 4.5's protocol: same compute).
# First check: with no ablation it must equal `moe_forward` exactly.

# %%
def moe_eval(u, fp, bias, cfg, skip=0, extra=0, drop_shared=False):
    K = cfg.n_activated_experts
    rcfg = cfg.replace(n_activated_experts=min(K + skip + extra, cfg.n_routed_experts))
    w, idx, _ = router_forward(u, fp["gate"], bias, rcfg)
    w, idx = w[:, skip:], idx[:, skip:]                                      # [N, K+extra]
    ys = np.stack([swiglu_forward(u, fp["experts.w1"][e], fp["experts.w2"][e],
                                  fp["experts.w3"][e])[0] for e in range(cfg.n_routed_experts)])
    rows = np.arange(u.shape[0])
    y = sum(w[:, k, None] * ys[idx[:, k], rows] for k in range(idx.shape[1]))   # [N, D]
    if "shared.w1" in fp and not drop_shared:
        y = y + swiglu_forward(u, fp["shared.w1"], fp["shared.w2"], fp["shared.w3"])[0]
    return y


def eval_loss(p, bias, cfg, t, c, y, **abl):
    x = p["e_task"][t] + p["e_sym"][c]
    u, _ = rmsnorm_forward(x, p["ffn_norm"])
    f = moe_eval(u, ffn_params(p), bias, cfg, **abl)
    hn, _ = rmsnorm_forward(x + f, p["out_norm"])
    return cross_entropy_forward(hn @ p["head"].T, y)[0]


# %% [markdown]
# ## Training
#
# Adam (lr 3e-3, warmup then cosine), batches of 256 facts drawn with replacement, no weight
# decay (we want memorisation). Progress lines show the loss, tokens/s and MaxVio of the batch.

# %%
STEPS = 150 if QUICK else 3000
BATCH = 256


def train_variant(name, cfg, seed, facts):
    t_all, c_all, y_all = facts
    p = init_params(cfg, seed)
    bias = np.zeros(cfg.n_routed_experts, np.float32)
    opt = AdamW(p, lr=3e-3, betas=(0.9, 0.99), weight_decay=0.0)
    rng = np.random.default_rng(seed)
    curve = []
    t0 = time.perf_counter()
    for step in range(1, STEPS + 1):
        pick = rng.integers(0, len(y_all), BATCH)
        _, (ce, aux, caches) = forward(p, bias, cfg, t_all[pick], c_all[pick], y_all[pick])
        g = backward(p, cfg, caches)
        opt.step(g, lr=lr_schedule(step, 3e-3, 50, STEPS, 0.1))
        mv = 0.0
        if cfg.is_moe_layer(0):
            load = caches[3].load
            bias = update_bias(bias, load, cfg.bias_update_speed).astype(np.float32)
            mv = maxvio(load)
        curve.append(ce)
        if step % (STEPS // 5) == 0 or step == STEPS:
            tps = step * BATCH / (time.perf_counter() - t0)
            L.log(f"  [{name:11s} seed {seed}] step {step:5d}/{STEPS} | loss {ce:.4f} | "
                  f"{tps / 1e3:6.1f}k tok/s | maxvio {mv:.3f}")
    return p, bias, np.array(curve)


# %% [markdown]
# ## Run every variant on every seed, then ablate

# %%
def run_seed(seed):
    facts = make_facts(seed)
    t_all, c_all, y_all = facts
    out = {}
    for name, cfg in CFGS.items():
        p, bias, curve = train_variant(name, cfg, seed, facts)
        logits, c_f = forward(p, bias, cfg, t_all, c_all)
        loss = cross_entropy_forward(logits, y_all)[0]
        acc = float((logits.argmax(1) == y_all).mean())
        r = dict(loss=float(loss), acc=acc, curve=curve)
        if cfg.is_moe_layer(0):
            E, K = cfg.n_routed_experts, cfg.n_activated_experts
            idx = c_f.indices
            load = expert_load(idx, E)
            r.update(idx=idx, maxvio=float(maxvio(load)))
            # independent path == the library's moe_forward (no ablation)
            x = p["e_task"][t_all] + p["e_sym"][c_all]
            u, _ = rmsnorm_forward(x, p["ffn_norm"])
            y_lib, _, _ = moe_forward(u, ffn_params(p), bias, cfg, 1)
            r["eval_path_err"] = float(np.abs(moe_eval(u, ffn_params(p), bias, cfg) - y_lib).max()
                                       / np.abs(y_lib).max())
            r["loss_eval_path"] = float(eval_loss(p, bias, cfg, t_all, c_all, y_all))
            # disable the top-r routed experts of each token
            r["skip_r"] = list(range(0, K + 1))
            r["skip_loss"] = [float(eval_loss(p, bias, cfg, t_all, c_all, y_all, skip=s))
                              for s in r["skip_r"]]
            # drop the busiest routed expert: bias -1e4 -> the router picks the next best
            busy = int(np.argmax(load))
            b2 = bias.copy()
            b2[busy] = -1e4
            r["drop_busiest"] = float(eval_loss(p, b2, cfg, t_all, c_all, y_all)) - r["loss"]
            if cfg.n_shared_experts:
                r["drop_shared"] = float(eval_loss(p, bias, cfg, t_all, c_all, y_all,
                                                   drop_shared=True, extra=1)) - r["loss"]
                r["drop_shared_no_replace"] = float(eval_loss(
                    p, bias, cfg, t_all, c_all, y_all, drop_shared=True)) - r["loss"]
        out[name] = r
        L.log(f"  {name:11s} seed {seed}: loss {r['loss']:.4f} acc {acc:.3f}"
              + (f" maxvio {r['maxvio']:.3f} drop-busiest +{r['drop_busiest']:.3f}"
                 if "maxvio" in r else "")
              + (f" drop-shared +{r['drop_shared']:.3f}" if "drop_shared" in r else ""))
    return out


results = {seed: run_seed(seed) for seed in L.seeds}

# %% [markdown]
# ## Metrics and claims
#
# * every MoE variant beats dense by >= 0.2 nats (memorisation needs total capacity);
# * dropping the shared expert (compute kept by routing one more expert) costs more than dropping
#   the busiest routed expert (compute kept by routing the next best).

# %%
names = list(CFGS)
moe_names = names[1:]
per_seed = {f"loss_{n}_per_seed": [results[s][n]["loss"] for s in L.seeds] for n in names}
for k, v in per_seed.items():
    L.metric(k, v)
for n in names:
    L.metric(f"acc_{n}_per_seed", [results[s][n]["acc"] for s in L.seeds])
for n in moe_names:
    L.metric(f"maxvio_{n}_per_seed", [results[s][n]["maxvio"] for s in L.seeds])
    L.metric(f"drop_busiest_{n}_per_seed", [results[s][n]["drop_busiest"] for s in L.seeds])
    L.metric(f"skip_loss_{n}_per_seed", [results[s][n]["skip_loss"] for s in L.seeds])
L.metric("drop_shared_per_seed", [results[s]["fine+shared"]["drop_shared"] for s in L.seeds])
L.metric("drop_shared_no_replace_per_seed",
         [results[s]["fine+shared"]["drop_shared_no_replace"] for s in L.seeds])

err = max(results[s][n]["eval_path_err"] for s in L.seeds for n in moe_names)
L.claim("ablation_path_max_rel_err", err, "<", 1e-5, quick=True,
        note="moe_eval (every expert on every token) == tinymoe moe_forward")
gap = min(results[s]["dense"]["loss"] - results[s][n]["loss"] for s in L.seeds for n in moe_names)
L.claim("min_moe_gain_over_dense_nats", gap, ">=", 0.2,
        note="min over seeds and MoE variants of loss(dense) - loss(MoE)")
shared_vs_busy = min(results[s]["fine+shared"]["drop_shared"]
                     - results[s]["fine+shared"]["drop_busiest"] for s in L.seeds)
L.claim("drop_shared_minus_drop_busiest_nats", shared_vs_busy, ">", 0.0,
        note="fine+shared: loss increase dropping the shared expert minus dropping the busiest routed")
ratio = min(results[s]["fine+shared"]["drop_shared"]
            / max(results[s]["fine+shared"]["drop_busiest"], 1e-9) for s in L.seeds)
L.claim("drop_shared_over_drop_busiest_ratio", ratio, ">=", 3.0,
        note="router-analysis.md Lesson 6 proposal (prototype 1.28-1.49 vs 0.25-0.29 nats)")

# %% [markdown]
# ## Figures
#
# Main figure: (a) training loss of the four variants (log y), (b) DeepSeekMoE Fig. 4's
# "disable the top routed experts" curve, x = disabled experts / E, (c) the ablation bars.

# %%
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

s0 = L.seeds[0]
R = results[s0]
fig = Figure(figsize=(14, 4.6), dpi=100)
FigureCanvasAgg(fig)
ax = fig.add_subplot(1, 3, 1)
k = 25
COLORS = {"dense": "C0", "coarse": "C1", "fine": "C2", "fine+shared": "C3"}
for n in names:
    cv = R[n]["curve"]
    sm = np.convolve(cv, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(len(sm)) + k, sm, c=COLORS[n], label=f"{n} (final {R[n]['loss']:.3f})")
ax.set_yscale("log")
ax.set_xlabel("training step")
ax.set_ylabel("cross-entropy (nats, log scale)")
ax.set_title(f"(a) equal active params, {N_TASKS * N_SYMBOLS} facts")
ax.legend(fontsize=8)
ax = fig.add_subplot(1, 3, 2)
for n in moe_names:
    E = CFGS[n].n_routed_experts
    ax.plot(np.array(R[n]["skip_r"]) / E, R[n]["skip_loss"], "o-", c=COLORS[n], label=n)
ax.axhline(R["dense"]["loss"], c=COLORS["dense"], ls="--", label="dense (no ablation)")
ax.set_xlabel("ratio of disabled top routed experts (r / E)")
ax.set_ylabel("cross-entropy (nats)")
ax.set_title("(b) disable each token's top-r experts")
ax.legend(fontsize=8)
ax = fig.add_subplot(1, 3, 3)
bars = {f"{n}\ndrop busiest": R[n]["drop_busiest"] for n in moe_names}
bars["fine+shared\ndrop shared\n(+1 routed)"] = R["fine+shared"]["drop_shared"]
ax.bar(range(len(bars)), list(bars.values()),
       color=[COLORS[n] for n in moe_names] + ["C4"])
ax.set_xticks(range(len(bars)))
ax.set_xticklabels(list(bars), fontsize=7)
ax.set_ylabel("loss increase (nats)")
ax.set_title("(c) remove one expert, same compute")
fig.suptitle(f"Lesson 6: DeepSeekMoE vs dense at equal active parameters (seed {s0})")
fig.text(0.5, 0.01, "MoE variants memorise what the dense FFN cannot; the shared expert holds "
         "knowledge no routed expert replaces.", ha="center", fontsize=9, style="italic")
fig.tight_layout(rect=(0, 0.05, 1, 0.94))
fig.savefig(L.main_figure(L.path("deepseekmoe.png")))

fine = "fine+shared"
A = coactivation(R["fine"]["idx"], CFGS["fine"].n_routed_experts)
base = random_baselines(CFGS["fine"].n_routed_experts, CFGS["fine"].n_activated_experts)["coactivation"]
L.metric("coactivation_fine_max_per_seed",
         [float(coactivation(results[s]["fine"]["idx"], 32).max()) for s in L.seeds])
L.metric("coactivation_random_baseline", base)
plot_coactivation(A, L.path("coactivation_fine.png"),
                  title=f"Co-activation P(j | i), fine-grained top-4 of 32 (seed {s0})",
                  caption=f"Random routing would give {base:.0%} everywhere; bright cells are "
                          f"expert pairs that answer the same task together.")

# routing of the fine+shared run on every fact, labelled by task (redrawable without training)
L.save_routing(make_facts(s0)[0], {0: R[fine]["idx"]},
               indices_fine=R["fine"]["idx"], indices_coarse=R["coarse"]["idx"],
               symbols=make_facts(s0)[1])
L.finish()

"""Lesson 05 - load balancing: none vs auxiliary loss (small / large alpha) vs the bias method (V3).

Run:  python lessons/05_load_balancing.py [--quick] [--seeds 3] [--out runs/05_load_balancing]
"""
# %% [markdown]
# # Lesson 5: balancing the router, with and without an auxiliary loss
#
# Lesson 4 left 16 top-1 experts collapsed: a handful took most tokens, several died. This lesson
# trains the **same model on the same data with the same seeds** (same init, same batches) four
# times and changes only how the load is balanced.
#
# **1. No balancing** (lesson 4).
#
# **2-3. Expert-level auxiliary loss** (DeepSeekMoE §3.3, DeepSeek-V2 §2.2.3 eqs. 23-25; the
# Switch Transformer loss with DeepSeek's normalisation), added to the language-model loss:
#
#     f_i = E / (K N) * #{t : i in S_t}        share of the routed slots, x E (1 at perfect balance)
#     P_i = (1/N) sum_t s_{t,i}                mean router probability of expert i
#     L_bal = alpha * sum_i f_i P_i            (= alpha when balanced, alpha * E at total collapse)
#
# f_i is a count (no gradient); the gradient flows through P_i and pushes probability away from
# busy experts. Its price: it is a second objective that fights the language-model loss. Small
# alpha balances poorly; large alpha balances but bends the router away from what the task wants.
# We run alpha = 0.01 (Switch / DeepSeekMoE 2B) and alpha = 0.1.
#
# **4. Auxiliary-loss-free bias** (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing";
# DeepSeek-V3 §2.1.2 eq. 16): a per-expert bias `b_i` that only **selects**,
#
#     S_t = TopK_i(s_{t,i} + b_i, K)       the gate weight stays g_{t,i} = s_{t,i} (unbiased)
#     after each step:  b_i <- b_i + gamma * sign(cbar - c_i)      (c_i = load of that batch)
#
# No gradient, no second objective: an overloaded expert gets a lower bias and loses the tokens
# it barely won, an idle one gets a higher bias. The update uses only the loads of the batch just
# trained on (no peeking at the future; Wang et al. §3). In tinymoe `train()` applies it after the
# optimizer step with `cfg.bias_update_speed` = gamma (`model.update_router_biases`); the bias is
# state in `model.buffers["layers.1.ffn.gate.bias"]`, not a parameter.
#
# Measured (shared/reference/router-analysis.md §1.2, §4.3): MaxVio (max load / mean load - 1),
# **global** over all held-out tokens (the routing function's quality) and **per batch** over
# training (what the hardware feels; it carries sampling noise of a 2048-token batch).
# Specialisation: does balancing erase the language structure? We report
# `nmi_given_token` = I(expert; language | token) / H(language | token): for each token id, how
# much the expert choice tells about the document's language. This is the well-defined one on
# this data: plain NMI(expert; language) is inflated by the private tokens (each names its
# language, so even a per-token hash scores) and is also driven by the load (a balanced router
# spreads a language over more experts). Plain `nmi_top1` and NMI on the shared punctuation tokens
# only are printed and saved too.
#
# ## Setting (what we chose and why)
# * Model, data, optimiser as lesson 4 (2 blocks, MoE in block 1, 16 routed experts, top-1,
#   no shared expert, softmax router, AdamW lr 1e-2), so the "none" run collapses, but with
#   **batches of 64 documents** (2048 tokens, 128 per expert) for 500 steps instead of 16 x 1000.
#   Softmax and not sigmoid: with top-1, V3's renormalised sigmoid gate is the constant 1 and the
#   router gets no gradient from the loss (lesson 4).
# * gamma = 1e-3 (V3's value). Calibration with batches of 16 documents, 1000 steps: gamma = 1e-3
#   ended at MaxVio_global 0.23 / 0.26 (seeds 0 / 1), 3e-3 at 0.12-0.36 and 1e-2 at 0.91 (softmax
#   probabilities live in [0, 1], so big steps overshoot and the selection flips back and forth).
# * **Why the bigger batch.** The bias rule only sees the sign of each batch's load error. With
#   16 documents a batch holds ~4 documents per language, so an expert that serves one language
#   sees a lumpy, skewed load from batch to batch (32 tokens on average, +-sqrt noise on top); the
#   sign rule settles where the batch load is above the mean as often as below (the median), not
#   where the mean load is fair. Doubling the batch to 32 documents took seed 0 from 0.23 to 0.08
#   at the same gamma; 32 x 800 left the bias run at 0.097 / 0.092 / 0.085 / 0.090 / 0.143 (seeds
#   0-4), and 64 x 500 (the same compute) at 0.086 / 0.094 / 0.057 / 0.101 / 0.091. The bias
#   method balances what it measures: the hardware-level batch.
# * Held-out set: 1024 documents (32768 tokens, 2048 per expert when balanced) so the sampling
#   noise of MaxVio_global is a few hundredths, well under the 0.15 threshold.

# %%
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matrices: 1 BLAS thread is fastest

import numpy as np

from tinymoe import analysis as A
from tinymoe.config import ModelConfig
from tinymoe.data import make_languages, split_arrays
from tinymoe.layers.basic import cross_entropy_forward
from tinymoe.lesson import Lesson
from tinymoe.train import TrainConfig, train

L = Lesson("05_load_balancing", __doc__, default_seeds=1)
E, K = 16, 1
GAMMA = 1e-3
STEPS = 30 if L.quick else 500
BATCH = 64
ds = make_languages(seq_len=32, seed=0, n_train=2048, n_val=128 if L.quick else 1024)
base = ModelConfig.preset(
    "toy", vocab_size=ds.vocab_size, n_layers=2, n_dense_layers=1, max_seq_len=32,
    n_routed_experts=E, n_activated_experts=K, n_expert_groups=1, n_limited_groups=1,
    n_shared_experts=0, score_func="softmax", route_scale=1.0,
    bias_update_speed=0.0, aux_loss_alpha=0.0, seq_aux_loss_alpha=0.0, z_loss_alpha=0.0)
METHODS = {
    "none": base,
    "aux 0.01": base.replace(aux_loss_alpha=0.01),
    "aux 0.1": base.replace(aux_loss_alpha=0.1),
    f"bias {GAMMA:g}": base.replace(bias_update_speed=GAMMA),
}
BIAS_NAME = f"bias {GAMMA:g}"
MOE_LAYER = 1
BUF = f"layers.{MOE_LAYER}.ffn.gate.bias"
x_val, y_val, lab_val = split_arrays(ds, "val")
tok_val, lab_flat = x_val.ravel(), lab_val.ravel()
shared = np.isin(tok_val, ds.meta["shared_ids"])
L.log(f"data: {ds.name}, V={ds.vocab_size}, {ds.val.shape[0]} held-out documents "
      f"({tok_val.size} tokens, {shared.mean():.0%} of them shared punctuation)")

# %% [markdown]
# ## 1. Train the four runs
# The callback records the router bias after every step (the bias trajectories); the training
# history already holds every batch's load, so MaxVio per batch comes for free.

# %%
results = {name: {} for name in METHODS}
for seed in L.seeds:
    for name, cfg in METHODS.items():
        biases = []
        tcfg = TrainConfig(steps=STEPS, batch_size=BATCH, lr=1e-2, warmup=10, eval_every=0,
                           log_every=20 if L.quick else 250, seed=seed)
        t0 = time.perf_counter()
        out = train(cfg, ds, tcfg, print_fn=lambda s, n=name, sd=seed: L.log(f"[{n}, seed {sd}] {s}"),
                    callback=lambda step, model, rec: biases.append(model.buffers[BUF].copy()))
        secs = time.perf_counter() - t0
        model = out["model"]
        logits, routing = model.forward(x_val, record_routing=True)
        idx = routing[MOE_LAYER]["indices"]
        load = A.expert_load(idx, E)
        ce, _ = cross_entropy_forward(logits.reshape(-1, logits.shape[-1]), y_val.reshape(-1))
        r = dict(
            secs=secs, idx=idx, load=load, val_ce=float(ce), bias=np.array(biases),
            maxvio_batch=np.array([h["maxvio"] for h in out["history"]]),
            maxvio_global=A.maxvio(load), dead=A.dead_experts(load, 0.05),
            nmi_given_token=A.nmi_given_token(idx, lab_flat, tok_val, E, ds.n_labels, ds.vocab_size),
            nmi_top1=A.nmi_top1(idx, lab_flat, E, ds.n_labels),
            nmi_shared=A.nmi_top1(idx[shared], lab_flat[shared], E, ds.n_labels),
            rel=A.relative_load_matrix(idx, lab_flat, E, ds.n_labels))
        results[name][seed] = r
        L.log(f"[{name}, seed {seed}] {secs:.1f}s | val ce {r['val_ce']:.3f} | MaxVio_global "
              f"{r['maxvio_global']:.3f} | mean MaxVio_batch (last 200) "
              f"{r['maxvio_batch'][-200:].mean():.3f} | dead {r['dead']} | NMI|token "
              f"{r['nmi_given_token']:.3f} | NMI {r['nmi_top1']:.3f} | NMI shared {r['nmi_shared']:.3f}")

# %% [markdown]
# ## 2. Figures
# * `balancing.png` (main): (a) MaxVio per batch over training (moving average of 25 steps, log y);
#   (b) final MaxVio_global per method and seed; (c) the bias of each expert over training (bias
#   run); (d) NMI(expert; language | token) per method and seed.
#   In (c) the biases drift up together: only their differences change the selection (adding a
#   constant to every b_i changes no top-K), so watch the spread, not the level.
# * `language_heatmaps.png`: language x expert relative load per method (1 = uniform; experts
#   sorted by load). Balancing spreads each language over more experts but keeps the structure.
# * `maxvio_batch.png`: the raw per-batch MaxVio curves (library plot).

# %%
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

s0 = L.seeds[0]
names = list(METHODS)
colors = dict(zip(names, ["tab:red", "tab:orange", "tab:green", "tab:blue"]))
fig = Figure(figsize=(12.5, 8.4), dpi=100)
FigureCanvasAgg(fig)
axs = fig.subplots(2, 2)
ax = axs[0, 0]
w = 25 if STEPS >= 100 else 5
for n in names:
    mv = results[n][s0]["maxvio_batch"]
    sm = np.convolve(mv, np.ones(w) / w, mode="valid")
    ax.plot(np.arange(w, len(mv) + 1), sm, color=colors[n], label=n)
ax.set_yscale("log")
ax.set(xlabel="training step", ylabel=f"MaxVio per batch ({w}-step mean, log)",
       title=f"(a) imbalance of each training batch, seed {s0}")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
ax = axs[0, 1]
nseeds = len(L.seeds)
bw = 0.8 / nseeds
for j, s in enumerate(L.seeds):
    vals = [results[n][s]["maxvio_global"] for n in names]
    ax.bar(np.arange(len(names)) + (j - (nseeds - 1) / 2) * bw, vals, bw,
           color=[colors[n] for n in names], alpha=1.0 - 0.25 * j, edgecolor="k", lw=0.4)
ax.axhline(0.15, color="k", ls="--", lw=0.8, label="0.15 (claim for the bias run)")
ax.set_yscale("log")
ax.set_xticks(range(len(names)))
ax.set_xticklabels(names)
ax.set(ylabel="MaxVio_global on 32768 held-out tokens (log)",
       title=f"(b) final balance, one bar per seed {L.seeds}")
ax.legend(fontsize=8)
ax = axs[1, 0]
b = results[BIAS_NAME][s0]["bias"]
for e in range(E):
    ax.plot(np.arange(1, len(b) + 1), b[:, e], lw=0.9)
ax.set(xlabel="training step", ylabel="selection bias b_i",
       title=f"(c) bias of each of the 16 experts, gamma = {GAMMA:g}, seed {s0}")
ax.grid(alpha=0.3)
ax = axs[1, 1]
for j, s in enumerate(L.seeds):
    vals = [results[n][s]["nmi_given_token"] for n in names]
    ax.bar(np.arange(len(names)) + (j - (nseeds - 1) / 2) * bw, vals, bw,
           color=[colors[n] for n in names], alpha=1.0 - 0.25 * j, edgecolor="k", lw=0.4)
ax.set_xticks(range(len(names)))
ax.set_xticklabels(names)
ax.set(ylabel="I(expert; language | token) / H(language | token)", ylim=(0, 1),
       title="(d) language specialisation, one bar per seed")
fig.suptitle("Load balancing side by side: same model, data and seeds; 16 experts, top-1",
             fontsize=12)
fig.text(0.5, 0.01, "What to see: the bias method balances as well as the large auxiliary loss "
         "(and far better than none or the small one) without a loss term, and keeps the language "
         "specialisation.", ha="center", fontsize=9, style="italic")
fig.tight_layout(rect=(0, 0.03, 1, 0.96))
main = L.main_figure(L.path("balancing.png"))
fig.savefig(main)

mats, titles = [], []
for n in names:
    r = results[n][s0]
    order = np.argsort(-r["load"], kind="stable")
    mats.append(r["rel"][:, order])
    titles.append(f"{n}: MaxVio {r['maxvio_global']:.2f}, NMI|tok {r['nmi_given_token']:.2f}")
A.plot_heatmaps(mats, ds.label_names, [str(i + 1) for i in range(E)], L.path("language_heatmaps.png"),
                title=f"Language x expert relative load per method (seed {s0})",
                panel_titles=titles, xlabel="expert rank (busiest first)", ylabel="language",
                annotate=False,
                caption="1 = uniform (1/16 of the language's tokens); red = the language uses that "
                        "expert more. Without balancing whole columns are empty (dead experts).")
A.plot_maxvio({n: results[n][s0]["maxvio_batch"] for n in names}, L.path("maxvio_batch.png"),
              title=f"MaxVio per training batch ({BATCH * 32} tokens), seed {s0}",
              steps=np.arange(1, STEPS + 1))

# %% [markdown]
# ## 3. Claims
# * The bias run's MaxVio_global < 0.15 and < 1/5 of the unbalanced run's (worst seed).
# * Its NMI(expert; language | token) stays within 0.1 of the best auxiliary-loss run (mean over
#   the seeds run; per seed the NMI of any one method swings by +-0.17, because which experts end
#   up sharing a language is decided early and differs between seeds).
# Measured (64-document batches, 500 steps), seed 0 (the default run): MaxVio_global none 2.26
# (3 dead), aux 0.01 0.31, aux 0.1 0.17, bias 0.086 (bias / none = 0.04); NMI|token none 0.34,
# aux 0.01 0.34, aux 0.1 0.37, bias 0.47 (gap best aux - bias = -0.10). Bias run on seeds 0-4:
# MaxVio_global 0.086 / 0.094 / 0.057 / 0.101 / 0.091 (worst 0.101: 33 % under 0.15), NMI|token
# 0.47 / 0.31 / 0.45 / 0.47 / 0.40. Held-out loss 0.78-0.80 nats for every method. Per seed the
# NMI of any one method swings a lot (which experts end up sharing a language is decided early),
# which is why that claim is a mean. Loss is printed for completeness: on this data every method
# reaches a similar held-out loss, so loss alone says nothing about routing (router-analysis.md §4.3).

# %%
for n in names:
    key = n.replace(" ", "_").replace(".", "p")
    for m in ("maxvio_global", "nmi_given_token", "nmi_top1", "nmi_shared", "val_ce", "dead", "secs"):
        L.metric(f"{key}.{m}_per_seed", [results[n][s][m] for s in L.seeds])
    L.metric(f"{key}.maxvio_batch_last200_per_seed",
             [float(results[n][s]["maxvio_batch"][-200:].mean()) for s in L.seeds])
L.metric(f"bias_trajectory_seed{s0}", results[BIAS_NAME][s0]["bias"][:: max(1, STEPS // 100)])
L.metric("gamma", GAMMA)
L.metric("steps", STEPS)
L.metric("nmi_used", "nmi_given_token: I(top-1 expert; language | input token) / H(language | token)")
bias_mv = [results[BIAS_NAME][s]["maxvio_global"] for s in L.seeds]
ratio = [results[BIAS_NAME][s]["maxvio_global"] / results["none"][s]["maxvio_global"] for s in L.seeds]
gap = [max(results["aux 0.01"][s]["nmi_given_token"], results["aux 0.1"][s]["nmi_given_token"])
       - results[BIAS_NAME][s]["nmi_given_token"] for s in L.seeds]
L.claim("maxvio_global", max(bias_mv), "<", 0.15, note="bias run, worst seed")
L.claim("maxvio_global_bias_over_none", max(ratio), "<", 0.8 if L.quick else 0.2, quick=True,
        note="bias / none, worst seed (--quick: a sign error in the bias update makes it > 1)")
# (--quick, 30 steps, seeds 0-4: bias / none = 0.45, 0.32, 0.16, 0.26, 0.24)
L.metric("nmi_gap_best_aux_minus_bias_per_seed", gap)
L.claim("nmi_gap_best_aux_minus_bias", float(np.mean(gap)), "<=", 0.1,
        note="NMI|token: best aux run minus the bias run, mean over seeds")
# quick-mode claim: the bias really is state that moved by +-gamma per step, never a gradient
bt = results[BIAS_NAME][s0]["bias"]
steps_taken = np.abs(np.diff(np.vstack([np.zeros(E), bt]), axis=0))
L.claim("bias_step_error", float(np.abs(steps_taken[steps_taken > 0] - GAMMA).max()), "<", 1e-6,
        quick=True, note="every bias change is exactly +-gamma")
L.save_routing(lab_flat, {MOE_LAYER: results[BIAS_NAME][s0]["idx"]}, tokens=tok_val,
               **{f"method_{n.replace(' ', '_')}_indices": results[n][s0]["idx"]
                  for n in names})
L.finish()

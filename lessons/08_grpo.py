"""Lesson 8: GRPO on a verifiable toy task (one-digit addition), and what RL does to the router.

Run:  python lessons/08_grpo.py [--quick] [--seeds 3] [--out runs/08_grpo]
"""
# %% [markdown]
# # Lesson 8 - GRPO: reinforcement learning from a rule-based reward
#
# DeepSeekMath (§4.1) and DeepSeek-R1 (§2.1) train with **Group Relative Policy Optimisation**.
# For each prompt q the policy samples a *group* of G answers o_1..o_G; a rule scores each
# (here: 1 if the sum is exactly right, 0.1 if well formed but wrong, 0 otherwise). There is no
# value network: the baseline of an answer is the mean reward of its group,
#
#     A_i = (r_i - mean(r_1..r_G)) / std(r_1..r_G)                 (group-relative advantage)
#
# and every token of o_i gets A_i. The objective to maximise (deepseek.md §12) is
#
#     J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1-eps, 1+eps) A_i) - beta KL_it ]
#     rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
#     KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1           (k3 estimator, >= 0)
#
# `tinymoe.grpo` has the pieces (advantages, the loss and its backward by hand) and the loop
# (`grpo.train_grpo`: a supervised warm start, then RL steps). This lesson runs it on a tiny
# DeepSeek-style model (MLA attention + one DeepSeekMoE layer, 8 routed experts, top-2, one
# shared expert) and asks four questions:
#
# 1. Does the reward rise, and does the model learn problems it was never *shown*?
# 2. How do the group size G and the KL weight beta change the curves?
# 3. Why is the clip fraction exactly 0 with one update per sampled batch?
# 4. Does RL change the router?

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # tiny matrices: BLAS threads only cost time
import numpy as np                                   # noqa: E402

from tinymoe import grpo                              # noqa: E402
from tinymoe.config import ModelConfig               # noqa: E402
from tinymoe.lesson import Lesson                    # noqa: E402

L = Lesson("08_grpo", __doc__, default_seeds=3)
Q = L.quick

# %% [markdown]
# ## The task and the partial warm start
#
# One-digit addition `^a+b=` -> `s$` (a, b in 0..9: the whole 10 x 10 table). The warm start
# (supervised cross-entropy on correct answers, R1's "cold start" in miniature) only shows
# problems with **b <= 4**, and only for 60 steps, so the policy knows the answer format and
# part of the table. The problems with b >= 5 are **held out** from the warm start: the policy
# can only learn them from the reward during RL, which samples prompts from the whole table.
# (The task's own held-out box, a in {6,7} and b in {2,3}, is never sampled in either phase;
# the grid below marks it.)
#
# Why not two-digit addition with a held-out rectangle? We tried it first: at this model size a
# minute of NumPy warm start does not even learn the training table (cross-entropy 1.0 after 300
# steps, held-out greedy accuracy 0.06), so RL had no signal. One-digit sums with the held-out
# *half* of the table is the prototype's setting (router-analysis.md, Lesson 8) and learns in
# seconds.

# %%
TASK = grpo.AdditionTask(n_digits=1)
CFG = ModelConfig.preset("toy", vocab_size=grpo.VOCAB_SIZE, n_layers=1, n_dense_layers=0,
                         max_seq_len=16)
RL_STEPS = 4 if Q else 400             # headline runs (every seed)
VAR_STEPS = 3 if Q else 70             # variant runs (first seed only)
BASE = grpo.GRPOConfig.grpo(group_size=8, prompts_per_step=32, beta=0.04, lr=3e-3)
RUN = grpo.RunConfig(rl_steps=RL_STEPS, sft_steps=10 if Q else 60, sft_batch=64, sft_lr=3e-3,
                     sft_max_units=4, eval_split="warmstart", eval_every=2 if Q else 10,
                     log_every=0 if Q else 25)
L.log(f"model: {CFG.n_routed_experts} routed experts (top-{CFG.n_activated_experts}) + "
      f"{CFG.n_shared_experts} shared, dim {CFG.dim}; RL: G={BASE.group_size}, "
      f"{BASE.prompts_per_step} prompts/step, beta={BASE.beta}, lr={BASE.lr}, mu=1")


# %% [markdown]
# ## Routing probe
#
# To compare the router before and after RL we feed every problem of the table with its correct
# answer (teacher forcing, `^a+b=s$` padded) and record the top-2 experts of each token.

# %%
def all_problems():
    return [(a, b) for a in range(10) for b in range(10)]


def probe(model):
    """-> tokens [100, T], routed indices [100*T, K] of the MoE layer (layer 0)."""
    probs = all_problems()
    Tp, R = TASK.prompt_len, TASK.max_response_len
    toks = np.full((len(probs), Tp + R), grpo.PAD, dtype=np.int64)
    for i, p in enumerate(probs):
        ans = TASK.answer_tokens(p)
        toks[i, :Tp] = TASK.prompt_tokens(p)
        toks[i, Tp:Tp + len(ans)] = ans
    _, routing = model.forward(toks, record_routing=True)
    return toks, routing[0]["indices"]


def grid(model):
    """[10, 10] bool: greedy answer to a + b is exactly right (rows a, columns b)."""
    prompts = np.stack([TASK.prompt_tokens(p) for p in all_problems()])
    return grpo.greedy_correct(model, TASK, prompts).reshape(10, 10)


# %% [markdown]
# ## Headline runs: G = 8, beta = 0.04, one update per batch, every seed

# %%
def run(seed, gcfg, steps, collect=False):
    rc = RUN.__class__(**{**RUN.__dict__, "rl_steps": steps, "seed": seed})
    snaps = {}

    def cb(step, model, rec):
        if collect and step == 0:
            snaps["grid0"], snaps["probe0"] = grid(model), probe(model)
    out = grpo.train_grpo(CFG, TASK, gcfg, rc, callback=cb, print_fn=L.log)
    if collect:
        snaps["grid1"], snaps["probe1"] = grid(out["model"]), probe(out["model"])
    return out, snaps


heads, snaps0 = [], None
for s in L.seeds:
    L.log(f"-- seed {s}: warm start, then {RL_STEPS} GRPO steps")
    out, sn = run(s, BASE, RL_STEPS, collect=(s == L.seeds[0]))
    heads.append(out)
    snaps0 = snaps0 or sn
S = [h["summary"] for h in heads]
for s, sm in zip(L.seeds, S):
    L.log(f"seed {s}: held-out acc {sm['heldout_acc_start']:.2f} -> {sm['heldout_acc_end']:.2f}, "
          f"reward {sm['reward_start']:.3f} -> {sm['reward_end']:.3f}, clip {sm['clip_fraction']}, "
          f"{sm['seconds']:.1f}s")

# %% [markdown]
# ## Variants (first seed): group size and KL weight; and mu = 2 updates per batch
#
# Each variant starts from the same warm start (same seed) and changes one knob.

# %%
VARIANTS = {"G=4": dict(group_size=4), "G=16": dict(group_size=16), "beta=0": dict(beta=0.0),
            "beta=0.5": dict(beta=0.5), "mu=2": dict(updates_per_batch=2)}
if Q:
    VARIANTS = {"beta=0": dict(beta=0.0), "mu=2": dict(updates_per_batch=2)}
var = {}
for name, kw in VARIANTS.items():
    L.log(f"-- variant {name} (seed {L.seeds[0]}, {VAR_STEPS} steps)")
    var[name] = run(L.seeds[0], BASE.replace(**kw), VAR_STEPS)[0]

# %% [markdown]
# ## Why the clip fraction is exactly 0 with one update per batch
#
# pi_old is the policy that sampled the batch. With mu = 1 the single gradient step is taken at
# theta = theta_old, so rho = exp(l - l_old) = exp(0) = 1 for every token *exactly*: the loop
# computes l_old with the same full forward the loss uses (it even reuses those logits), so the
# difference is 0.0 in floating point, not just small. rho = 1 lies inside [1-eps, 1+eps], the
# clip never binds, and the gradient is the plain policy gradient A * grad log pi (DeepSeekMath
# used one update per exploration stage, so its clip never acted either). With mu = 2 the second
# update sees a moved policy: rho != 1 and some tokens hit the clip.

# %%
cf = [sm["clip_fraction"] for sm in S]
ratio_extremes = [(min(r["ratio_min"] for r in h["history"][1:]),
                   max(r["ratio_max"] for r in h["history"][1:])) for h in heads]
cf_mu2 = float(np.mean([r["clip_fraction"] for r in var["mu=2"]["history"][1:]]))
L.log(f"mu=1: clip fraction per seed {cf}, rho range {ratio_extremes}; mu=2: {cf_mu2:.4f}")

# %% [markdown]
# ## Figures

# %%
import matplotlib                                     # noqa: E402
matplotlib.use("Agg")
import matplotlib.pyplot as plt                       # noqa: E402


def curve(h, key):
    xs = [r["step"] for r in h["history"] if r.get(key) is not None]
    return xs, [r[key] for r in h["history"] if r.get(key) is not None]


def smooth(y, k=5):
    y = np.asarray(y, float)
    if len(y) < k:
        return y
    return np.convolve(np.pad(y, (k // 2, k - 1 - k // 2), mode="edge"), np.ones(k) / k, "valid")


fig, ax = plt.subplots(2, 3, figsize=(15, 8.5))
for s, h in zip(L.seeds, heads):
    x, y = curve(h, "reward")
    ax[0, 0].plot(x, smooth(y), label=f"seed {s}")
    x, y = curve(h, "heldout_acc")
    ax[0, 1].plot(x, y, marker="o", ms=3, label=f"seed {s}")
ax[0, 0].set(title="Mean reward (G=8, beta=0.04)", xlabel="RL step", ylabel="mean reward (5-step avg)")
ax[0, 1].set(title="Greedy accuracy on problems the warm start held out (b>=5)", xlabel="RL step",
             ylabel="accuracy (fraction of 50)")
base_h = heads[0]
for name, h in [("G=8 (headline)", base_h)] + [(n, var[n]) for n in var if n.startswith("G=")]:
    x, y = curve(h, "reward")
    ax[0, 2].plot(x[:VAR_STEPS + 1], smooth(y)[:VAR_STEPS + 1], label=name)
ax[0, 2].set(title="Group size", xlabel="RL step", ylabel="mean reward (5-step avg)")
for name, h in [("beta=0.04 (headline)", base_h)] + [(n, var[n]) for n in var if n.startswith("beta")]:
    x, y = curve(h, "reward")
    ax[1, 0].plot(x[:VAR_STEPS + 1], smooth(y)[:VAR_STEPS + 1], label=name)
    x, y = curve(h, "kl")
    ax[1, 1].plot(x[:VAR_STEPS + 1], smooth(y)[:VAR_STEPS + 1], label=name)
ax[1, 0].set(title="KL weight: reward", xlabel="RL step", ylabel="mean reward (5-step avg)")
ax[1, 1].set(title="KL weight: k3 KL to the reference", xlabel="RL step",
             ylabel="mean KL per response token (nats)")
x, y = curve(base_h, "zero_var")
ax[1, 2].plot(x, smooth(y), label="zero-variance groups (G=8)")
x, y = curve(base_h, "clip_fraction")
ax[1, 2].plot(x, y, label="clip fraction, mu=1 (exactly 0)")
x, y = curve(var["mu=2"], "clip_fraction")
ax[1, 2].plot(x, y, label="clip fraction, mu=2")
ax[1, 2].set(title="Zero-variance groups and clip fraction", xlabel="RL step", ylabel="fraction")
for a in ax.flat:
    a.legend(fontsize=8)
    a.grid(alpha=0.3)
fig.suptitle("GRPO on one-digit addition: reward and held-out accuracy rise; KL weight slows the "
             "drift; clip fraction is 0 with one update per batch", fontsize=11)
fig.tight_layout(rect=(0, 0, 1, 0.96))
fig.savefig(L.main_figure(L.path("grpo_curves.png")), dpi=90)
plt.close(fig)

# before / after grid of greedy correctness
g0, g1 = snaps0["grid0"], snaps0["grid1"]
fig, ax = plt.subplots(1, 2, figsize=(11, 5))
(alo, ahi), (blo, bhi) = TASK.heldout_box
for a, g, t in zip(ax, (g0, g1), ("after the warm start (before RL)", f"after {RL_STEPS} GRPO steps")):
    a.imshow(g, cmap="Greens", vmin=0, vmax=1.3, origin="upper")
    a.axvline(4.5, color="red", lw=2)
    a.add_patch(plt.Rectangle((blo - 0.5, alo - 0.5), bhi - blo + 1, ahi - alo + 1, fill=False,
                              ec="blue", lw=2, ls="--"))
    a.set(title=f"{t}: {g.mean():.0%} right", xlabel="b (right of the red line: held out of the "
          "warm start)", ylabel="a", xticks=range(10), yticks=range(10))
fig.suptitle(f"Greedy a+b correct (green), seed {L.seeds[0]}; dashed blue: the task's box, never "
             "sampled in either phase", fontsize=10)
fig.tight_layout()
fig.savefig(L.path("grid_before_after.png"), dpi=90)
plt.close(fig)

# %% [markdown]
# ## The router before and after RL
#
# Expert x position heatmap: the share of the tokens at each position (over the 100 problems)
# that pick each expert among their top 2. "How much routing changed": the share of tokens whose
# top-1 expert changed, and the mean overlap of the top-2 sets (1 = same two experts).

# %%
E, K = CFG.n_routed_experts, CFG.n_activated_experts
toks, idx0 = snaps0["probe0"]
_, idx1 = snaps0["probe1"]
T = toks.shape[1]
pos = np.tile(np.arange(T), toks.shape[0])                          # [N] position labels
heldout_row = np.repeat([b >= 5 for _, b in all_problems()], T)     # [N] problem held out of SFT


def expert_by(labels, idx, n):
    m = np.zeros((E, n))
    for j in range(n):
        sel = idx[labels == j]
        m[:, j] = np.bincount(sel.ravel(), minlength=E) / max(len(sel), 1)
    return m


M0, M1 = expert_by(pos, idx0, T), expert_by(pos, idx1, T)
top1_changed = float(np.mean(idx0[:, 0] != idx1[:, 0]))
overlap = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(idx0, idx1)]))
ans = pos >= TASK.prompt_len - 1                                    # positions predicting the answer
top1_changed_ans = {nm: float(np.mean(idx0[ans & (heldout_row == h), 0] != idx1[ans & (heldout_row == h), 0]))
                    for nm, h in (("seen", False), ("heldout", True))}
L.log(f"routing: top-1 expert changed for {top1_changed:.1%} of tokens, top-2 overlap {overlap:.3f};"
      f" answer positions: seen-by-warm-start {top1_changed_ans['seen']:.1%}, held-out "
      f"{top1_changed_ans['heldout']:.1%}")
fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
names = ["BOS", "a", "+", "b", "=", "s1", "s2/$", "$/pad"][:T]
for a, m, t in zip(ax, (M0, M1, M1 - M0), ("before RL", "after RL", "after - before")):
    im = a.imshow(m, cmap="RdBu_r" if "-" in t else "viridis", aspect="auto",
                  vmin=-0.5 if "-" in t else 0, vmax=0.5 if "-" in t else 1)
    a.set(title=f"expert x position, {t}", xlabel="token position", ylabel="routed expert",
          xticks=range(T), yticks=range(E))
    a.set_xticklabels(names, fontsize=8)
    fig.colorbar(im, ax=a, label="share of tokens routed to the expert")
fig.suptitle(f"Router (MoE layer 0) on all 100 problems, teacher-forced; top-1 changed for "
             f"{top1_changed:.0%} of tokens, top-2 overlap {overlap:.2f}", fontsize=10)
fig.tight_layout(rect=(0, 0, 1, 0.93))
fig.savefig(L.path("router_before_after.png"), dpi=90)
plt.close(fig)
L.save_routing(pos, {0: idx1}, indices_before_layer0=idx0, heldout=heldout_row.astype(np.int8),
               tokens=toks.reshape(-1))

# %% [markdown]
# ## Claims (means over the seeds)
#
# Held-out greedy accuracy (the 50 problems with b >= 5) rises by >= 0.15 and the mean reward
# (last 10 RL steps vs the step-0 batch) by >= 0.3, means over the seeds run; clip fraction 0 with
# one update per batch, > 0 with mu = 2.
#
# Calibration (seeds 0..4, 400 RL steps at lr 3e-3): held-out accuracy 0.12 -> 0.80, 0.04 -> 0.44,
# 0.24 -> 0.54, 0.04 -> 0.42, 0.04 -> 0.30 (gains 0.68 / 0.40 / 0.30 / 0.38 / 0.26); reward
# 0.20 -> 0.69, 0.24 -> 0.64, 0.26 -> 0.61, 0.15 -> 0.50, 0.20 -> 0.57 (gains 0.49 / 0.40 / 0.35 /
# 0.35 / 0.37). Means over the default seeds 0-2: accuracy gain 0.46, reward gain 0.41. An earlier
# setting (180 steps, lr 2e-3) passed with a reward gain of only 0.35 (seed 1 alone 0.27), and 240
# steps at lr 3e-3 left seeds 3 / 4 at gains 0.21 / 0.27: single RL runs are noisy (which problems
# the sampler happens to get right first decides the early advantages), so the lesson trains
# longer and claims means, not single seeds.

# %%
mean = lambda k: float(np.mean([sm[k] for sm in S]))           # noqa: E731
L.metric("heldout_acc_start", mean("heldout_acc_start"))
L.metric("heldout_acc_end", mean("heldout_acc_end"))
L.metric("reward_start", mean("reward_start"))
L.metric("reward_end", mean("reward_end"))
for k in ("heldout_acc_start", "heldout_acc_end", "reward_start", "reward_end", "clip_fraction"):
    L.metric(f"{k}_per_seed", [sm[k] for sm in S])
L.metric("seconds_per_seed", [sm["seconds"] for sm in S])
L.metric("clip_fraction_mu2", cf_mu2)
L.metric("variant_reward_end", {n: v["summary"]["reward_end"] for n, v in var.items()})
L.metric("variant_kl_end", {n: float(np.mean([r["kl"] for r in v["history"][-10:]]))
                            for n, v in var.items()})
L.metric("grid_acc_before", float(g0.mean()))
L.metric("grid_acc_after", float(g1.mean()))
L.metric("routing_top1_changed", top1_changed)
L.metric("routing_top2_overlap", overlap)
L.metric("routing_top1_changed_answer_positions", top1_changed_ans)
L.claim("clip_fraction", mean("clip_fraction"), "<=", 0.0, quick=True,
        note="one update per batch: rho == 1 exactly")
L.claim("heldout_acc_gain", mean("heldout_acc_end") - mean("heldout_acc_start"), ">=", 0.15)
L.claim("reward_gain", mean("reward_end") - mean("reward_start"), ">=", 0.3)
L.claim("clip_fraction_mu2", cf_mu2, ">", 0.0, note="mu=2: the second update is off-policy")
# quick-mode claim: the warm start's cross-entropy falls (AdamW works on this model); the last
# three warm-start steps against the first, worst seed (--quick, 10 steps, seeds 0-4: at most
# 0.77; a no-op or sign-flipped update gives >= 1)
sft_ratio = max(np.mean([r["loss"] for r in h["sft_history"][-3:]]) / h["sft_history"][0]["loss"]
                for h in heads)
L.claim("sft_loss_ratio", sft_ratio, "<", 0.9, quick=True,
        note="worst seed, warm-start loss at the end / at step 1")
L.finish()

"""Lesson 7: a tiny DeepSeek-V3 (MLA, dense first layer, DeepSeekMoE, MTP) and its routing report.

The whole model of the course on 4 synthetic languages: MLA attention, a dense SwiGLU first
block, a DeepSeekMoE block (1 shared + 16 routed experts, top-4, sigmoid scores), auxiliary-
loss-free bias balancing plus V3's sequence-wise balance loss, and one multi-token-prediction
module. After training: the routing report of every MoE layer (load, MaxVio, language heatmap,
NMI against a shuffled null and an untrained model, token specialisation, co-activation,
saturation, consecutive-token locality), MTP's next-next-token accuracy and self-speculative
acceptance, and a few generated samples.

    python lessons/07_tiny_deepseek_v3.py            # about 20 s on 2 cores
    python lessons/07_tiny_deepseek_v3.py --quick    # a few seconds (test suite)
    python lessons/07_tiny_deepseek_v3.py --seeds 3  # calibration of the claims
"""
# %% [markdown]
# # A tiny DeepSeek-V3
#
# DeepSeek-V3 (technical report, section 2) stacks blocks of
#
#     a = h + MLA(RMSNorm(h))                       (2.1.1: latent KV, decoupled RoPE)
#     h' = a + FFN(RMSNorm(a))                      dense SwiGLU in the first blocks,
#                                                   DeepSeekMoE after (2.1.2)
#
# with the MoE layer  y = Shared(u) + sum_{i in TopK(s + b)} g_i Expert_i(u),
# s_i = sigmoid(u . e_i), g = s[TopK] / sum s[TopK] * route_scale (eqs. 12-16). The bias b picks
# experts but never enters g; after each step b_i += gamma sign(mean load - load_i) (2.1.2,
# auxiliary-loss-free balancing), and a tiny sequence-wise balance loss alpha sum_i f_i P_i
# (eqs. 17-20, alpha = 1e-4) keeps single sequences from collapsing.
#
# Multi-token prediction (2.2): one extra block reads [RMSNorm(Emb(t_{i+1})) ; RMSNorm(h_i)],
# projects 2D -> D, runs a transformer block and the shared head, and predicts t_{i+2}. Its loss
# is added with weight lambda = 0.3. At inference the module drafts the token after next and the
# main model verifies it (self-speculative decoding, 5.4.3: 85-90 % acceptance at V3 scale).
#
# Data: `tinymoe.data.make_languages` - 4 languages with private vocabularies, a first-order
# grammar each (the next token depends on the current token and the language), and 4 punctuation tokens shared by all (router-analysis.md 2.4). A router that
# sees only the token cannot know a shared token's language; after attention over a
# single-language document it can.

# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matrices: threads only cost (router-analysis 5)

import numpy as np

from tinymoe import analysis as A
from tinymoe.config import ModelConfig
from tinymoe.data import decode, make_languages
from tinymoe.generate import generate, generate_speculative
from tinymoe.lesson import Lesson
from tinymoe.model import Model
from tinymoe.train import TrainConfig, train

L = Lesson("07_tiny_deepseek_v3", __doc__)
QUICK = L.quick
STEPS = 40 if QUICK else 600
N_EVAL_DOCS = 32 if QUICK else 128
SEQ_LEN = 32
GRAMMAR_ORDER = 1      # next token | current token and language (see the calibration note)


def make_config(ds) -> ModelConfig:
    return ModelConfig(
        vocab_size=ds.vocab_size, dim=64, inter_dim=128, n_layers=2, n_dense_layers=1,
        n_heads=4, max_seq_len=64,
        # MLA (V2 2.1): Dc latent, Dr decoupled rope key shared by the heads
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        # DeepSeekMoE: 1 shared + 16 routed of width 16, top-4, sigmoid scores (V3)
        n_routed_experts=16, n_shared_experts=1, n_activated_experts=4, moe_inter_dim=16,
        n_expert_groups=1, n_limited_groups=1, score_func="sigmoid", route_scale=2.5,
        # balancing: bias (aux-loss-free) + sequence-wise loss (V3 eqs. 17-20)
        bias_update_speed=1e-3, seq_aux_loss_alpha=1e-4,   # V3 gamma
        # one MTP module, lambda 0.3 (V3 4.2)
        n_mtp_modules=1, mtp_lambda=0.3)


# %% [markdown]
# ## Routing on a fixed evaluation set
#
# `routing_of(model)` runs the training forward (which also runs the MTP block) on the first
# validation documents and returns, per MoE layer, the chosen experts [N, K] best first, with the
# input tokens and the language labels of the routed positions. The MTP block routes positions
# 0..T-2 (its input mixes h_i with Emb(t_{i+1})), so its token key is t_{i+1}.

# %%
def routing_of(model, ds):
    rows = ds.val[:N_EVAL_DOCS]
    tokens, labels = rows[:, :-1], ds.val_labels[:N_EVAL_DOCS, :-1]
    _, mtp_logits, cache = model.forward_train(tokens)
    out = {}
    for name, c in cache.moe_caches.items():
        layer = name.replace(".ffn.gate.bias", "")
        if layer.startswith("mtp"):
            out[layer] = dict(indices=c.indices, tokens=tokens[:, 1:], labels=labels[:, 1:],
                              seq_len=SEQ_LEN - 1)
        else:
            out[layer] = dict(indices=c.indices, tokens=tokens, labels=labels, seq_len=SEQ_LEN)
    return out, mtp_logits


def nmi_report(r, ds, E, rng):
    """NMI(top-1 expert; language) on all tokens, on the SHARED tokens only, given the token,
    and the shuffled-document null of the shared-token NMI."""
    idx, tok, lab = r["indices"], r["tokens"], r["labels"]
    shared = np.isin(tok, ds.meta["shared_ids"])                           # [B, T']
    nL = ds.n_labels
    out = dict(all=A.nmi_top1(idx, lab.ravel(), E, nL),
               shared=A.nmi_top1(idx[shared.ravel()], lab[shared], E, nL),
               given_token=A.nmi_given_token(idx, lab.ravel(), tok.ravel(), E, nL, ds.vocab_size),
               n_shared_tokens=int(shared.sum()))
    nulls = []
    for _ in range(20):                        # permute whole documents' labels (keeps docs intact)
        perm = lab[rng.permutation(lab.shape[0])]
        nulls.append(A.nmi_top1(idx[shared.ravel()], perm[shared], E, nL))
    out["shared_null"] = float(np.mean(nulls))
    return out


def language_order(relload):
    """relload [languages, E] -> expert order [E]: grouped by the language each expert serves most
    (the row of its largest relative load), and inside a group the most devoted expert first."""
    top = relload.argmax(axis=0)                                            # [E]
    return np.lexsort((-relload.max(axis=0), top))                          # primary key: top


# %% [markdown]
# ## Train (one seed at a time), recording routing snapshots for the saturation curve

# %%
def legal_rate(ds, seq, lang):
    """Share of generated transitions t >= 2 that the language's grammar allows."""
    m = ds.meta
    S, vpl, succ = m["n_shared"], m["vocab_per_language"], m["successors"]
    Aa = vpl + S

    def loc(g):
        if g < S:
            return vpl + g
        j = g - S - lang * vpl
        return j if 0 <= j < vpl else -1

    ok = n = 0
    for i in range(2, len(seq)):
        a, b, c = loc(int(seq[i - 2])), loc(int(seq[i - 1])), loc(int(seq[i]))
        n += 1
        ctx = b if succ.shape[1] == Aa else a * Aa + b       # order 1: current token; 2: last two
        if a >= 0 and b >= 0 and c >= 0 and c in succ[lang, ctx]:
            ok += 1
    return ok / max(n, 1)


def tail_period(seq, tail=12):
    """Smallest p such that the last `tail` tokens repeat with period p (tail + 1: no cycle seen)."""
    t = np.asarray(seq)[-tail:]
    return next((q for q in range(1, len(t)) if np.array_equal(t[q:], t[:-q])), tail + 1)


def run_seed(seed):
    ds = make_languages(seed=seed, seq_len=SEQ_LEN, order=GRAMMAR_ORDER)
    cfg = make_config(ds)
    E, K = cfg.n_routed_experts, cfg.n_activated_experts
    rng = np.random.default_rng(seed + 123)
    untrained = Model(cfg, seed=seed)
    r_untrained, _ = routing_of(untrained, ds)
    snap_steps = sorted({max(1, int(STEPS * f)) for f in (0.1, 0.25, 0.5)})
    snaps = {}

    def callback(step, model, rec):
        if step in snap_steps:
            snaps[step] = routing_of(model, ds)[0]

    tcfg = TrainConfig(steps=STEPS, batch_size=16, lr=3e-3, warmup=min(50, STEPS // 4),
                       eval_every=0, log_every=max(1, STEPS // 10), seed=seed)
    out = train(cfg, ds, tcfg, callback=callback, print_fn=L.log)
    model, hist = out["model"], out["history"]
    # the bias rule at work: experts that carried more load during training end with a lower bias
    bname = "layers.1.ffn.gate.bias"
    b_final = np.asarray(model.buffers[bname], dtype=np.float64)
    cum_load = np.sum([h["loads"][bname] for h in hist], axis=0).astype(np.float64)
    bias_corr = float(np.corrcoef(b_final, cum_load)[0, 1]) if b_final.std() > 0 else float("nan")
    r_final, mtp_logits = routing_of(model, ds)
    res = dict(ds=ds, cfg=cfg, model=model, hist=hist, routing=r_final, untrained=r_untrained,
               val_loss=out["summary"]["val_loss"], bias_load_corr=bias_corr, layers={})
    for layer, r in r_final.items():
        idx = r["indices"]
        load = A.expert_load(idx, E)
        nmi = nmi_report(r, ds, E, rng)
        nmi_u = nmi_report(r_untrained[layer], ds, E, rng)
        rep1, base1 = A.consecutive_repetition(idx, r["seq_len"], E, "top1")
        reps, bases = A.consecutive_repetition(idx, r["seq_len"], E, "set")
        ts = A.token_specialisation(idx, r["tokens"].ravel(), E, ds.vocab_size)
        sat = {int(s): A.router_saturation(snaps[s][layer]["indices"], idx) for s in snaps}
        sat[STEPS] = A.router_saturation(idx, idx)
        res["layers"][layer] = dict(
            maxvio_global=float(A.maxvio(load)), load=load, dead=A.dead_experts(load, 0.05),
            nmi=nmi, nmi_untrained=nmi_u, purity=A.purity(idx, r["labels"].ravel(), E, ds.n_labels),
            rep_top1=rep1, rep_top1_base=base1, rep_set=reps, rep_set_base=bases,
            token_spec=ts, saturation=sat,
            relload=A.relative_load_matrix(idx, r["labels"].ravel(), E, ds.n_labels),
            relload_untrained=A.relative_load_matrix(r_untrained[layer]["indices"],
                                                     r["labels"].ravel(), E, ds.n_labels),
            coact=A.coactivation(idx, E))
        lr = res["layers"][layer]
        L.log(f"  seed {seed} {layer:8s}: NMI shared {nmi['shared']:.3f} (null "
              f"{nmi['shared_null']:.3f}, untrained {nmi_u['shared']:.3f}) all {nmi['all']:.3f} "
              f"given-token {nmi['given_token']:.3f} | maxvio_global {lr['maxvio_global']:.3f} | "
              f"saturation {sat}")
    # MTP: next-next-token accuracy on the evaluation documents
    rows = ds.val[:N_EVAL_DOCS]
    t2 = rows[:, 2:]                                          # t_{i+2} for i = 0..T-2
    pred = mtp_logits[0].argmax(-1)                           # [B, T-1]
    res["mtp_acc"] = float((pred == t2).mean())
    counts = np.bincount(ds.val[:, 1:].ravel(), minlength=ds.vocab_size)
    res["most_frequent_rate"] = float(counts.max() / counts.sum())
    # self-speculative decoding: MTP drafts t_{p+2}, the main model verifies it
    n_prompts = 2 if QUICK else 8
    drafted = accepted = 0
    samples = []
    same_as_greedy = True
    for i in range(n_prompts):
        prompt = ds.val[i, :6]
        toks, st = generate_speculative(model, prompt, 24)
        same_as_greedy &= bool(np.array_equal(toks, generate(model, prompt, 24)))
        drafted += st["drafted"]
        accepted += st["accepted"]
        lang = int(ds.val_labels[i, 0])
        sampled = generate(model, prompt, 24, temperature=1.0, seed=seed * 100 + i)
        samples.append(dict(lang=ds.label_names[lang], prompt=decode(ds, prompt),
                             greedy=decode(ds, toks[6:]), sampled=decode(ds, sampled[6:]),
                             legal=legal_rate(ds, sampled, lang), greedy_period=tail_period(toks[6:])))
    res["acceptance"] = accepted / max(drafted, 1)
    res["spec_equals_greedy"] = same_as_greedy
    res["samples"] = samples
    res["legal_rate"] = float(np.mean([s["legal"] for s in samples]))
    L.log(f"  seed {seed}: val loss {res['val_loss']:.4f} (optimal ln 2 = {np.log(2):.4f}) | MTP t+2 "
          f"acc {res['mtp_acc']:.3f} | acceptance {res['acceptance']:.3f} (most frequent token "
          f"{res['most_frequent_rate']:.3f}) | sampled-text legality {res['legal_rate']:.3f}")
    return res


results = {seed: run_seed(seed) for seed in L.seeds}

# %% [markdown]
# ## Claims
#
# * NMI(top-1 expert; language) at the MoE layer after attention (`layers.1`), computed on the
#   **shared tokens only**: a private token names its language, so a router that hashes token
#   ids already gets a plain NMI of ~0.1 on these data; on shared tokens the language can only
#   come from the context that attention mixed in. >= 0.3 and >= the shuffled-document null
#   + 0.25 (router-analysis.md 2.4). The untrained model's value is reported next to it.
# * MaxVio_global (held-out set) < 0.3: bias balancing keeps the experts' loads even. After the
#   40 steps of `--quick` it is still 0.13-0.56 over seeds 0-4 (0.61 with no balancing, 0.95 with
#   the bias update's sign flipped, seed 0): too early to tell a bug apart, so quick mode checks
#   the rule itself instead:
# * (quick) corr(final bias, load summed over training) < -0.5 at `layers.1`: experts that
#   carried more load end with a lower bias. A flipped sign makes it positive; a bias that never
#   moves makes it undefined (NaN fails the claim). Quick, seeds 0-4: -0.93 to -0.98 (flipped:
#   +0.96); full, seeds 0-4: at most -0.84.
# * (quick) validation loss / ln V < 0.5: after 40 steps it is ~0.36 (1.43 nats of ln 52 = 3.95);
#   a broken optimizer or gradient stays near 1.
# * MTP self-speculative acceptance > the rate of guessing the most frequent token.
# * (quick) speculative decoding returns exactly the greedy tokens.
#
# What the calibration runs showed (seeds 0-4, shared-token NMI at `layers.1`, null ~0.02):
# * Earlier setting (second-order grammar, 1500 steps): 0.293 / 0.393 / 0.430 / 0.160 / - ; seed 0
#   failed after an unrelated float-rounding change and seed 3 was far below. The NMI is HIGHEST
#   early in training and settles lower as the router also learns token-level splits; with the
#   order-2 grammar the previous (private) token names the language, so the expert at a shared
#   token can key off that token instead of the language. 600 steps: 0.338 / 0.422 / 0.407 /
#   0.244 / 0.393; 8 shared tokens instead of 4: 0.423 / 0.252 / 0.299 / 0.455 / 0.287.
# * This setting (first-order grammar: after a shared token the next token depends only on the
#   language, which only the context carries; 600 steps, val loss 0.70-0.71 vs optimal ln 2):
#   0.437 / 0.653 / 0.326 / 0.683 / 0.334 (minus null: 0.415 / 0.633 / 0.313 / 0.660 / 0.322);
#   MaxVio_global 0.112 / 0.061 / 0.107 / 0.113 / 0.142; acceptance 0.95 / 0.87 / 0.57 / 0.94 /
#   0.76 vs most-frequent-token 0.07-0.12. 400 steps gave seed 2 only 0.206 and 1000 steps
#   0.521 / 0.594 / 0.302 / 0.652 / 0.381: seed 2 stays the weak one, its margin over 0.3 is thin
#   (~0.03); the claim is robust for the default seed 0 (0.44 then, 0.39 after later changes to
#   the float summation order of the fused kernels), not for every seed.
# * A faster bias step (gamma 3e-3) hurt the NMI in earlier calibration, so the lesson keeps V3's
#   gamma = 1e-3. The MTP block's shared-token NMI is not claimed: its router input mixes in
#   Emb(t_{i+1}), the NEXT token, which usually names the language by itself (its untrained value
#   is token identity, not context), so only `layers.1` carries the claim.

# %%
seeds = L.seeds
M = "layers.1"
ds_vocab = results[seeds[0]]["ds"].vocab_size
per = lambda f: [f(results[s]) for s in seeds]      # noqa: E731
for layer in results[seeds[0]]["layers"]:
    tag = layer.replace(".", "")
    L.metric(f"nmi_shared_{tag}_per_seed", per(lambda r: r["layers"][layer]["nmi"]["shared"]))
    L.metric(f"nmi_shared_null_{tag}_per_seed", per(lambda r: r["layers"][layer]["nmi"]["shared_null"]))
    L.metric(f"nmi_shared_untrained_{tag}_per_seed",
             per(lambda r: r["layers"][layer]["nmi_untrained"]["shared"]))
    L.metric(f"nmi_all_{tag}_per_seed", per(lambda r: r["layers"][layer]["nmi"]["all"]))
    L.metric(f"nmi_given_token_{tag}_per_seed", per(lambda r: r["layers"][layer]["nmi"]["given_token"]))
    L.metric(f"maxvio_global_{tag}_per_seed", per(lambda r: r["layers"][layer]["maxvio_global"]))
    L.metric(f"dead_experts_{tag}_per_seed", per(lambda r: r["layers"][layer]["dead"]))
    L.metric(f"purity_{tag}_per_seed", per(lambda r: r["layers"][layer]["purity"]))
    L.metric(f"token_specialisation_{tag}_per_seed", per(lambda r: r["layers"][layer]["token_spec"].score))
    L.metric(f"consecutive_top1_{tag}_per_seed", per(lambda r: r["layers"][layer]["rep_top1"]))
    L.metric(f"consecutive_top1_baseline_{tag}_per_seed", per(lambda r: r["layers"][layer]["rep_top1_base"]))
    L.metric(f"consecutive_set_{tag}_per_seed", per(lambda r: r["layers"][layer]["rep_set"]))
    L.metric(f"consecutive_set_baseline_{tag}_per_seed", per(lambda r: r["layers"][layer]["rep_set_base"]))
    L.metric(f"saturation_{tag}_per_seed", per(lambda r: r["layers"][layer]["saturation"]))
L.metric("val_loss_per_seed", per(lambda r: r["val_loss"]))
L.metric("mtp_t2_acc_per_seed", per(lambda r: r["mtp_acc"]))
L.metric("mtp_acceptance_per_seed", per(lambda r: r["acceptance"]))
L.metric("most_frequent_token_rate_per_seed", per(lambda r: r["most_frequent_rate"]))
L.metric("sampled_legal_rate_per_seed", per(lambda r: r["legal_rate"]))
L.metric("samples_seed0", results[seeds[0]]["samples"])
L.metric("greedy_period_per_seed", per(lambda r: [s["greedy_period"] for s in r["samples"]]))

nmi_sh = min(per(lambda r: r["layers"][M]["nmi"]["shared"]))
margin = min(per(lambda r: r["layers"][M]["nmi"]["shared"] - r["layers"][M]["nmi"]["shared_null"]))
L.claim("nmi_shared_layer1", nmi_sh, ">=", 0.3,
        note="min over seeds; NMI(top-1 expert; language) on shared tokens at layers.1")
L.claim("nmi_shared_layer1_minus_null", margin, ">=", 0.25, note="shuffled-document null")
L.claim("maxvio_global_layer1", max(per(lambda r: r["layers"][M]["maxvio_global"])), "<", 0.3,
        note="max over seeds, held-out documents")
L.claim("bias_vs_training_load_corr", max(per(lambda r: r["bias_load_corr"])), "<", -0.5, quick=True,
        note=f"max over seeds: Pearson corr(final bias, load summed over training) at {M}")
L.claim("val_loss_over_uniform", max(per(lambda r: r["val_loss"])) / np.log(ds_vocab), "<", 0.5,
        quick=True, note=f"max over seeds: validation loss / ln V (V = {ds_vocab}, uniform guessing = 1)")
L.claim("mtp_acceptance_minus_most_frequent", min(per(lambda r: r["acceptance"] - r["most_frequent_rate"])),
        ">", 0.0, note="self-speculative acceptance vs guessing the most frequent token")
L.claim("speculative_equals_greedy", float(all(per(lambda r: r["spec_equals_greedy"]))), ">=", 1.0,
        quick=True, note="MTP drafting never changes the greedy output")

# %% [markdown]
# ## The routing report (seed shown: the first)

# %%
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

R = results[seeds[0]]
ds, cfg = R["ds"], R["cfg"]
E = cfg.n_routed_experts
bias_name = f"{M}.ffn.gate.bias"
loads = np.array([h["loads"][bias_name] for h in R["hist"]], dtype=float)
maxvio_batch = [h["maxvio"] for h in R["hist"]]
lay = R["layers"][M]

fig = Figure(figsize=(15, 8.4), dpi=100)
FigureCanvasAgg(fig)
# (a) language x expert relative load, experts grouped by the language they serve most
order = language_order(lay["relload"])
owner = lay["relload"].argmax(axis=0)[order]                                # [E] language per column
from matplotlib.colors import TwoSlopeNorm

ax = fig.add_subplot(2, 3, 1)
norm = TwoSlopeNorm(vcenter=1.0, vmin=0.0, vmax=max(2.0, float(lay["relload"].max())))
im = ax.imshow(lay["relload"][:, order], cmap="coolwarm", norm=norm, aspect="auto")
for j in np.flatnonzero(np.diff(owner)):                                    # group boundaries
    ax.axvline(j + 0.5, c="k", lw=1)
for lang in np.unique(owner):                                               # group names on top
    cols = np.flatnonzero(owner == lang)
    ax.text(cols.mean(), -0.6, ds.label_names[lang], ha="center", va="bottom", fontsize=7)
ax.set_yticks(range(ds.n_labels))
ax.set_yticklabels(ds.label_names)
ax.set_xticks(range(E))
ax.set_xticklabels(order, fontsize=6)
ax.set_xlabel("routed expert id, grouped by the language it serves most")
ax.set_title(f"(a) {M}: relative load per language (1 = uniform)\n"
             f"NMI on shared tokens {lay['nmi']['shared']:.2f}, null {lay['nmi']['shared_null']:.2f}",
             fontsize=9, pad=14)
fig.colorbar(im, ax=ax, fraction=0.046)
# (b) NMI bars
ax = fig.add_subplot(2, 3, 2)
keys = list(R["layers"])
xs = np.arange(len(keys))
wdt = 0.2
for j, (lbl, f) in enumerate([("trained, shared tokens", lambda l: l["nmi"]["shared"]),
                              ("shuffled-doc null", lambda l: l["nmi"]["shared_null"]),
                              ("untrained, shared tokens", lambda l: l["nmi_untrained"]["shared"]),
                              ("trained, given token", lambda l: l["nmi"]["given_token"])]):
    ax.bar(xs + (j - 1.5) * wdt, [f(R["layers"][k]) for k in keys], wdt, label=lbl)
ax.axhline(0.3, ls="--", c="k", lw=0.8)
ax.set_xticks(xs)
ax.set_xticklabels(keys)
ax.set_ylabel("NMI(top-1 expert; language)")
ax.set_ylim(0, 1)
ax.set_title("(b) language specialisation per MoE layer")
ax.legend(fontsize=7)
# (c) expert load over training
ax = fig.add_subplot(2, 3, 3)
share = loads / loads.sum(axis=1, keepdims=True)
k = 20
sm = np.array([np.convolve(share[:, e], np.ones(k) / k, mode="valid") for e in range(E)])
ax.stackplot(np.arange(sm.shape[1]) + k, sm * 100)
ax.set_xlabel("training step")
ax.set_ylabel("share of assignments (%)")
ax.set_ylim(0, 100)
ax.set_title(f"(c) {M}: load per expert (bias balancing)")
# (d) MaxVio per batch
ax = fig.add_subplot(2, 3, 4)
ax.plot(maxvio_batch, lw=0.6, label="MaxVio_batch (max over MoE layers)")
ax.axhline(lay["maxvio_global"], c="r", ls="--", label=f"MaxVio_global {M} = {lay['maxvio_global']:.2f}")
ax.set_yscale("log")
ax.set_xlabel("training step")
ax.set_ylabel("MaxVio")
ax.set_title("(d) balance")
ax.legend(fontsize=7)
# (e) saturation and locality
ax = fig.add_subplot(2, 3, 5)
base = A.random_baselines(E, cfg.n_activated_experts)
for k_, l in R["layers"].items():
    st = sorted(l["saturation"])
    ax.plot([100 * s / STEPS for s in st], [l["saturation"][s] * 100 for s in st], "o-", label=f"{k_} saturation")
ax.axhline(base["saturation"] * 100, c="gray", ls=":", label="random K/E")
ax.set_xlabel("% of training")
ax.set_ylabel("top-4 overlap with final routing (%)")
ax.set_ylim(0, 105)
ax.set_title("(e) router saturation (OLMoE 5.1)")
ax.legend(fontsize=7)
# (f) MTP
ax = fig.add_subplot(2, 3, 6)
vals = {"MTP t+2\naccuracy": R["mtp_acc"], "speculative\nacceptance": R["acceptance"],
        "most frequent\ntoken rate": R["most_frequent_rate"]}
ax.bar(range(3), list(vals.values()), color=["C0", "C2", "C7"])
ax.set_xticks(range(3))
ax.set_xticklabels(list(vals), fontsize=8)
ax.set_ylabel("rate")
ax.set_ylim(0, 1)
ax.set_title("(f) multi-token prediction")
fig.suptitle(f"Lesson 7: tiny DeepSeek-V3 routing report (seed {seeds[0]}, {STEPS} steps)")
fig.text(0.5, 0.01, "After attention the router partly groups each language's tokens - shared punctuation "
         "included (b: far above the null) - while the load stays balanced (c, d); MTP drafts are "
         "accepted far above chance (f).",
         ha="center", fontsize=9, style="italic")
fig.tight_layout(rect=(0, 0.04, 1, 0.95))
fig.savefig(L.main_figure(L.path("routing_report.png")))

A.plot_heatmaps([lay["relload_untrained"][:, order], lay["relload"][:, order]], ds.label_names,
                [str(e) for e in order], L.path("language_heatmap.png"),
                title=f"{M}: relative load per language", panel_titles=["untrained", "trained"],
                xlabel="routed expert id, grouped by the language it serves most (trained)",
                caption="Columns in the trained model's order. Trained: each language's hot cells "
                        "line up in its own block of experts; untrained: hot cells are scattered "
                        "(routing by token identity, and private tokens name their language).")
A.plot_coactivation(lay["coact"], L.path("coactivation.png"),
                    title=f"{M}: co-activation P(j | i)",
                    caption=f"Random top-4 routing gives {base['coactivation']:.0%}; pairs far above "
                            f"it serve the same language.")
ts = lay["token_spec"]
names = ds.token_names
spec = {names[v]: float(ts.per_token[v]) for v in range(ds.vocab_size) if np.isfinite(ts.per_token[v])}
A.plot_bar(spec, L.path("token_specialisation.png"),
           title=f"{M}: share of a token's occurrences on its most used expert",
           ylabel="token specialisation", caption=f"Shared tokens ({', '.join(names[i] for i in ds.meta['shared_ids'])}) "
           f"are split by language, so they score lower than private tokens; random ~{1 / E:.2f}.")
reps = {f"{k_} top-1": l["rep_top1"] for k_, l in R["layers"].items()}
reps.update({f"{k_} top-1 random": l["rep_top1_base"] for k_, l in R["layers"].items()})
A.plot_bar(reps, L.path("consecutive_repetition.png"),
           title="Same first expert on consecutive tokens (Mixtral 5)", ylabel="rate",
           caption="Above the random rate: a document's tokens keep going to the same experts.")

# %% [markdown]
# ## Why the greedy samples loop
#
# Every context of these grammars has exactly two successors, each with probability 1/2
# (`branching = 2`; the optimal loss is ln 2). A well-trained model gives both about 0.5, and
# greedy decoding takes whichever is a hair higher - the same one every time the same context
# comes back. With the first-order grammar the context that matters is (language, current token):
# at most 16 states per language (12 private + 4 shared tokens). A deterministic walk on 16 states
# must revisit one within 16 steps and from then on repeats the same cycle forever (pigeonhole);
# the lesson prints the period of each greedy tail (`greedy_period_per_seed` in metrics.json;
# seed 0, 8 prompts: 1, 6, 1, 1, 6, >12, 1, 2 - "D5 D5 D5 ..." is a legal self-loop of lang D).
# The model attends to more than the current token, so the walk is not exactly on 16 states and
# a few tails have not closed a cycle within the last 12 of the 24 generated tokens (written as
# 13; seeds 1-4: 3 of 32 tails).
# Sampling at T = 1 takes each branch half of the time and does not loop; its legality (the share
# of transitions the grammar allows) is printed next to it. Greedy text says little about a model
# of a random process; it is the right decoder when the answer is deterministic (lesson 8).

# %%
L.log("\nGenerated samples (seed %d; prompt | greedy continuation | sampled at T=1):" % seeds[0])
for s in R["samples"][:4]:
    L.log(f"  [{s['lang']}] {s['prompt']} | {s['greedy']} | {s['sampled']}  (legal {s['legal']:.2f})")

L.save_routing(R["routing"][M]["labels"].ravel(), {1: R["routing"][M]["indices"]},
               tokens=R["routing"][M]["tokens"].ravel(),
               indices_mtp0=R["routing"]["mtp.0"]["indices"],
               labels_mtp0=R["routing"]["mtp.0"]["labels"].ravel(),
               indices_layer1_untrained=R["untrained"][M]["indices"])
L.finish()

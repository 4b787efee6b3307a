"""Lesson 03: Multi-head Latent Attention - a 57x smaller KV cache, absorbed decoding, decoupled RoPE, and an MLA model trained next to MHA.

Goal
    Count the KV cache of MHA, GQA, MQA and MLA per token and per context length, at the toy
    size and at DeepSeek-V3's (MLA: (512 + 64) * 61 = 35,136 values = 70,272 bytes per token in
    bf16). Decode with the absorbed form (attention directly over the cached latents) and check
    it equals the naive form to float64 round-off. See why RoPE has to be decoupled: with RoPE on
    the compressed key, the absorbed shortcut is simply wrong. Finally train an MLA model and an
    MHA model on the same data and compare their losses.

Run
    python lessons/03_mla.py            # about 45 s on 2 cores
    python lessons/03_mla.py --quick    # a few seconds
    python lessons/03_mla.py --seeds 3
    pytest -m mla                        # MLA unit tests (forward/backward, caches, decoding)

Expected output
    kind   per token per layer (toy / V3)   V3 bytes per token (bf16)
    mla    12 / 576                          70,272
    PASS v3_mla_elements_per_token_error = 0 (<= 0)
    PASS absorbed_vs_naive_max_diff = 1e-16 (< 1e-10)
    PASS coupled_rope_absorbed_mismatch = 0.1 (> 0.001)
    PASS mla_over_mha_val_loss = 1.0 (< 1.1)
Figures: kv_cache.png (main), decode_error.png, mla_vs_mha.png, expert_language.png;
metrics.json; routing.npz (labels = language of each held-out token, MLA model).
"""
# %% [markdown]
# # Lesson 03 - Multi-head Latent Attention (DeepSeek-V2 2.1, V3 2.1.1)
#
# Decoding one token at a time needs every earlier token's keys and values: the **KV cache**.
# With n_h heads of width d_h, MHA stores 2 n_h d_h values per token per layer; GQA shares each
# key/value head among a group (n_g heads: 2 n_g d_h); MQA keeps one (2 d_h).
#
# MLA compresses keys and values jointly into one latent per token,
#
#     c_t = RMSNorm(W_DKV x_t)            [d_c]      (what the cache stores)
#     k_t,h = W_UK[h] c_t,  v_t,h = W_UV[h] c_t       (per head, rebuilt from c_t)
#
# plus ONE rotary key k^R_t = RoPE(W_KR x_t) [d_h^R] shared by all heads: d_c + d_h^R values per
# token and layer. DeepSeek-V2/V3: d_c = 512, d_h^R = 64, i.e. 576, against 2 * 128 * 128 = 32,768
# for MHA with 128 heads of width 128.
# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np

from tinymoe.accounting import kv_cache_bytes, kv_cache_elements, kv_cache_elements_per_layer
from tinymoe.analysis import (new_figure, save_figure, nmi_null, nmi_top1, plot_heatmaps, plot_lines,
                              relative_load_matrix)
from tinymoe.config import ModelConfig
from tinymoe.data import bigram_entropy, make_languages, split_arrays
from tinymoe.layers.basic import cross_entropy_forward
from tinymoe.layers.mla import (LatentKVCache, NaiveKVCache, init_mla_params, mla_decode,
                                mla_decode_coupled_rope, mla_forward, mla_forward_coupled_rope)
from tinymoe.lesson import Lesson
from tinymoe.train import TrainConfig, train

L = Lesson("03_mla", __doc__)
QUICK = L.quick

# %% [markdown]
# ## 1. Cache size: elements per token, and bytes against context length
#
# Per token, summed over layers (accounting.kv_cache_elements; DeepSeek-V2 Table 1). For the
# baselines d_h = 128 (keys and values); GQA with 8 groups as in LLaMA-3 / Qwen2.5.
# Independent check of the V3 number: (d_c + d_h^R) * layers = (512 + 64) * 61 = 35,136
# values, times 2 bytes (bf16) = 70,272 bytes per token (also "Insights into DeepSeek-V3",
# Table 1: 70.272 KB).
# %%
TOY = ModelConfig.preset("toy")
V3 = ModelConfig.preset("deepseek-v3")
GROUPS = {"toy": 2, "V3": 8}
KINDS = ("mha", "gqa", "mqa", "mla")
table = {}
L.log(f"{'kind':<5s} {'per token per layer (toy / V3)':>32s} {'V3 per token, all layers':>26s} "
      f"{'V3 bytes/token (bf16)':>22s}")
for kind in KINDS:
    row = {}
    for name, cfg in (("toy", TOY), ("V3", V3)):
        g = GROUPS[name] if kind == "gqa" else None
        row[name] = dict(per_layer=kv_cache_elements_per_layer(cfg, kind, g),
                         per_token=kv_cache_elements(cfg, kind, g),
                         bytes_per_token=kv_cache_bytes(cfg, kind, 1, 2, g))
    table[kind] = row
    L.log(f"{kind:<5s} {row['toy']['per_layer']:>15,d} / {row['V3']['per_layer']:<14,d} "
          f"{row['V3']['per_token']:>26,d} {row['V3']['bytes_per_token']:>22,d}")
v3_mla_expected = (512 + 64) * 61                      # paper numbers, not the code's
L.log(f"MLA / MHA cache at V3 size: {table['mla']['V3']['per_token'] / table['mha']['V3']['per_token']:.2%}"
      f" (MLA = GQA with {table['mla']['V3']['per_layer'] / (2 * 128):.2f} groups)")

ctx = np.unique(np.logspace(0, np.log10(131072), 60).astype(int))
fig = new_figure(12.0, 4.8)
for i, (name, cfg) in enumerate((("toy", TOY), ("V3", V3))):
    ax = fig.add_subplot(1, 2, i + 1)
    for kind, col in zip(KINDS, ("tab:red", "tab:orange", "tab:green", "tab:blue")):
        g = GROUPS[name] if kind == "gqa" else None
        label = kind if kind != "gqa" else f"gqa ({GROUPS[name]} groups)"
        b = [kv_cache_bytes(cfg, kind, int(n), 2, g) for n in ctx]
        ax.loglog(ctx, b, color=col, lw=1.6,
                  label=f"{label}: {table[kind][name]['bytes_per_token']:,} B/token")
    ax.axhline(141e9 if name == "V3" else 1e6, color="gray", ls=":", lw=0.8)
    ax.text(1.2, (141e9 if name == "V3" else 1e6) * 1.3,
            "141 GB (one H200)" if name == "V3" else "1 MB", fontsize=7, color="gray")
    ax.set_title(f"{name}: {cfg.n_layers} layers, {cfg.n_heads} heads, d_c={cfg.kv_lora_rank}, "
                 f"d_h^R={cfg.qk_rope_head_dim}", fontsize=9)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("KV cache of one sequence (bytes, bf16)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
save_figure(fig, L.main_figure(L.path("kv_cache.png")), "KV cache against context length: MHA, GQA, MQA, MLA",
      "Straight lines (cache grows linearly); MLA sits 57x below MHA at V3 size, between "
      "GQA-8 and MQA.")

# %% [markdown]
# ## 2. Absorbed decoding equals the naive form
#
# Scores need q_h . k_u,h = q_h . (W_UK[h] c_u) = (W_UK[h]^T q_h) . c_u: fold W_UK into the query
# once per new token, and attend DIRECTLY over the cached latents c_u (plus the shared rope key);
# likewise o_h = W_UV[h] (sum_u p_u c_u), so W_UV moves to the output side. No per-head key or
# value is ever rebuilt for the cached tokens. (mla_decode with a LatentKVCache; with a
# NaiveKVCache it stores and attends full per-head keys/values, as a plain MHA cache would.)
#
# We run the full training-form forward (mla_forward) on 24 tokens, then the same tokens through
# both caches (a prefill of 8, then one token at a time), in float64.
# %%
cfg_d = TOY.replace(max_seq_len=32, init_std=0.3)       # larger weights: peaky, non-trivial attention
rng = np.random.default_rng(L.seed)
p_d = init_mla_params(cfg_d, rng, np.float64)
x_d = rng.standard_normal((2, 24, cfg_d.dim))
PREFILL = 8


def decode_all(decode_fn, cache, x):
    """Prefill PREFILL tokens, then one token per call -> list of y chunks [B, t, D]."""
    out = [decode_fn(x[:, :PREFILL], p_d, cfg_d, cache)]
    for t in range(PREFILL, x.shape[1]):
        out.append(decode_fn(x[:, t:t + 1], p_d, cfg_d, cache))
    return out


def per_step_diff(chunks, ref):
    """Max |difference| per decoding call (the prefill counts as step 0)."""
    diffs, t = [], 0
    for c in chunks:
        diffs.append(float(np.abs(c - ref[:, t:t + c.shape[1]]).max()))
        t += c.shape[1]
    return np.array(diffs)


y_full, _ = mla_forward(x_d, p_d, cfg_d)
lat, nai = LatentKVCache(cfg_d, 2), NaiveKVCache(cfg_d, 2)
y_abs = decode_all(mla_decode, lat, x_d)
y_nai = decode_all(mla_decode, nai, x_d)
d_abs_full = per_step_diff(y_abs, y_full)
d_abs_nai = per_step_diff(y_abs, np.concatenate(y_nai, axis=1))
absorbed_diff = float(d_abs_nai.max())
L.log(f"absorbed vs naive decoding: max |diff| = {absorbed_diff:.1e}; absorbed vs full forward "
      f"{d_abs_full.max():.1e}; cache bytes after 24 tokens: latent {lat.nbytes:,} vs naive "
      f"{nai.nbytes:,} (float64)")

# %% [markdown]
# ## 3. Why RoPE must be decoupled
#
# Suppose RoPE were applied to the key rebuilt from the latent: k_u,h = R_u W_UK[h] c_u. Then
#
#     q_t,h . k_u,h = (R_t q_t,h) . (R_u W_UK[h] c_u) = q_t,h^T R_{u-t} W_UK[h] c_u
#
# and a position-dependent rotation sits between the query and W_UK: there is no single matrix
# to fold into the query for all cached tokens. The absorbed attempt (fold W_UK^T R_t q into
# the query, dot with c_u) silently drops R_u and computes the wrong scores; the only correct
# cache stores every rotated per-head key: the naive cache, 32,768 values per token and layer at
# V3 size instead of 576. DeepSeek's fix: keep the content key rotation-free and carry position
# in a separate, small, shared rope key k^R (d_h^R = 64) that is cached as is.
# %%
y_c, = (mla_forward_coupled_rope(x_d, p_d, cfg_d),)
yc_abs = decode_all(mla_decode_coupled_rope, LatentKVCache(cfg_d, 2), x_d)
yc_nai = decode_all(mla_decode_coupled_rope, NaiveKVCache(cfg_d, 2), x_d)
d_c_abs = per_step_diff(yc_abs, y_c)
d_c_nai = per_step_diff(yc_nai, y_c)
coupled_mismatch = float(d_c_abs.max())
y_scale = float(np.abs(y_c).max())
L.log(f"coupled RoPE: 'absorbed' vs full forward max |diff| = {coupled_mismatch:.2e} "
      f"(outputs are ~{y_scale:.2f}); naive per-head cache vs full forward {d_c_nai.max():.1e}")

steps = np.arange(len(d_abs_full))
floor = 1e-18
plot_lines(steps, {"decoupled RoPE (MLA): absorbed vs naive cache": np.maximum(d_abs_nai, floor),
                   "decoupled RoPE (MLA): absorbed vs full forward": np.maximum(d_abs_full, floor),
                   "RoPE on the latent key: 'absorbed' vs full forward": np.maximum(d_c_abs, floor),
                   "RoPE on the latent key: naive cache vs full forward": np.maximum(d_c_nai, floor)},
           L.path("decode_error.png"),
           title="Absorbed decoding: exact with decoupled RoPE, wrong with RoPE on the latent",
           xlabel=f"decoding call (0 = prefill of {PREFILL} tokens, then 1 token each)",
           ylabel="max |difference| of the layer output (float64, log)", logy=True,
           hlines={"claim threshold 1e-10": 1e-10},
           caption="Decoupled: ~1e-16 at every step. RoPE on the compressed key: the shortcut "
                   "misses the key rotation R_u and is off by O(0.1).")

# %% [markdown]
# ## 4. Does the compression cost quality? MLA and MHA trained on the same data
#
# Two toy models that differ only in attention (attn_type "mla" or "mha": same heads, same
# per-head widths, same MoE), trained on the synthetic languages (4 languages with their own
# grammar + shared punctuation whose successor depends on the language; optimal loss ln 2 =
# 0.693), same seed, same batches. Cache per token and layer: MLA 12 values, MHA 4*(12+8) = 80
# for tinymoe's baseline block (keys keep their rope part).
# %%
STEPS = 40 if QUICK else 1200


def train_pair(seed: int) -> dict:
    ds = make_languages(seq_len=32, n_train=4096, n_val=256, seed=seed)
    out = {"ds": ds}
    for attn in ("mla", "mha"):
        cfg = ModelConfig.preset("toy", vocab_size=ds.vocab_size, n_layers=2, max_seq_len=32,
                                 attn_type=attn, bias_update_speed=0.01,
                                 seq_aux_loss_alpha=1e-4)
        L.log(f"-- seed {seed}: {attn.upper()} model")
        tc = TrainConfig(steps=STEPS, batch_size=32, lr=1e-2, warmup=30, eval_every=0,
                         eval_batches=8, log_every=STEPS // 4, seed=seed)
        res = train(cfg, ds, tc, print_fn=L.log)
        model = res["model"]
        tokens, targets, labels = split_arrays(ds, "val")
        logits, routing = model.forward(tokens, record_routing=True)
        B, T, V = logits.shape
        val, _ = cross_entropy_forward(logits.reshape(B * T, V), targets.reshape(B * T))
        out[attn] = dict(val_loss=float(val), curve=[h["ce"] for h in res["history"]],
                         params=model.n_params(), routing=routing, labels=labels.reshape(-1),
                         tokens=tokens.reshape(-1), cfg=cfg, seconds=res["summary"]["seconds"])
    return out


pairs = {s: train_pair(s) for s in L.seeds}
p0 = pairs[L.seeds[0]]


def smooth(y, k=25):
    y = np.asarray(y)
    k = min(k, len(y))
    return np.convolve(y, np.ones(k) / k, mode="valid")


opt = float(p0["ds"].meta["optimal_loss"])
big = bigram_entropy(p0["ds"])
curves = {f"{a.upper()} ({p0[a]['params']:,} params, val {p0[a]['val_loss']:.3f})":
          smooth(p0[a]["curve"]) for a in ("mla", "mha")}
plot_lines(np.arange(len(next(iter(curves.values())))), curves, L.path("mla_vs_mha.png"),
           title="MLA and MHA trained on the same data (toy size, same seed and batches)",
           xlabel="training step", ylabel="training cross-entropy, moving average (nats)",
           hlines={f"optimal ln 2 = {opt:.3f}": opt, f"bigram baseline {big:.3f}": big},
           caption="The two curves overlap: compressing keys and values into a 8-wide latent "
                   "costs (almost) nothing here, at 1/7 of the cache.")

# routing of the MLA model by language (what lesson 07 studies in depth)
E = p0["mla"]["cfg"].n_routed_experts
n_lang = p0["ds"].n_labels
moe_layers = sorted(p0["mla"]["routing"])
idx = {l: p0["mla"]["routing"][l]["indices"] for l in moe_layers}
labels = p0["mla"]["labels"]
nmi = {l: nmi_top1(idx[l], labels, E, n_lang) for l in moe_layers}
null = {l: nmi_null(idx[l], labels.reshape(-1, 32), E, n_lang, np.random.default_rng(0))
        for l in moe_layers}
plot_heatmaps([relative_load_matrix(idx[l], labels, E, n_lang) for l in moe_layers],
              p0["ds"].label_names, [str(e) for e in range(E)], L.path("expert_language.png"),
              title="MLA model: relative load of each routed expert per language (held-out)",
              panel_titles=[f"MoE layer {l} (NMI {nmi[l]:.2f}, shuffled-document null "
                            f"{null[l]:.2f})" for l in moe_layers], ylabel="language",
              caption="Red: the language uses that expert more than uniform (1).")
L.save_routing(labels, idx, tokens=p0["mla"]["tokens"])

# %% [markdown]
# ## 5. Claims
# %%
seeds = L.seeds
L.metric("kv_cache_table", table)
L.metric("v3_mla_elements_per_token", table["mla"]["V3"]["per_token"])
L.metric("v3_mla_bytes_per_token", table["mla"]["V3"]["bytes_per_token"])
L.metric("v3_mha_elements_per_token", table["mha"]["V3"]["per_token"])
L.metric("absorbed_vs_full_max_diff", float(d_abs_full.max()))
L.metric("coupled_rope_naive_max_diff", float(d_c_nai.max()))
L.metric("val_loss_mla_per_seed", [pairs[s]["mla"]["val_loss"] for s in seeds])
L.metric("val_loss_mha_per_seed", [pairs[s]["mha"]["val_loss"] for s in seeds])
L.metric("params_mla_mha", [p0["mla"]["params"], p0["mha"]["params"]])
L.metric("nmi_language_seed0", {str(l): nmi[l] for l in moe_layers})
L.metric("nmi_null_seed0", {str(l): null[l] for l in moe_layers})
L.metric("optimal_loss", opt)
L.metric("bigram_baseline", big)
L.claim("v3_mla_elements_per_token_error",
        abs(table["mla"]["V3"]["per_token"] - v3_mla_expected), "<=", 0, quick=True,
        note=f"{table['mla']['V3']['per_token']:,} vs (512+64)*61 = {v3_mla_expected:,}")
L.claim("v3_mla_bytes_per_token_error",
        abs(table["mla"]["V3"]["bytes_per_token"] - 70272), "<=", 0, quick=True,
        note=f"{table['mla']['V3']['bytes_per_token']:,} vs 70,272 (bf16)")
L.claim("absorbed_vs_naive_max_diff", absorbed_diff, "<", 1e-10, quick=True)
L.claim("coupled_naive_vs_full_max_diff", float(d_c_nai.max()), "<", 1e-10, quick=True)
L.claim("coupled_rope_absorbed_mismatch", coupled_mismatch, ">", 1e-3, quick=True,
        note="RoPE on the compressed key breaks absorption")
ratio = max(pairs[s]["mla"]["val_loss"] / pairs[s]["mha"]["val_loss"] for s in seeds)
L.claim("mla_over_mha_val_loss", ratio, "<", 1.10, note="worst seed")
# quick-mode claim: 40 steps already take both models far below their first-step loss (about
# ln V); a broken optimizer step or backward does not
drop = max(pairs[s][a]["val_loss"] / pairs[s][a]["curve"][0] for s in seeds for a in ("mla", "mha"))
L.claim("val_over_first_loss", drop, "<", 0.7, quick=True,
        note="worst seed and attention, held-out loss / step-1 training loss")
L.finish()

"""Lesson 9: expert parallelism and node-limited routing (DeepSeek-V3 2.1.2, 3.2.2).

The routed experts of the MoE layer are placed on G = 8 simulated nodes (4 experts each) and the
same tiny model is trained three times on the same data with the same seed: unrestricted top-8
routing, V3's node-limited routing keeping M = 4 nodes, and a tighter M = 2. Per token we count
the nodes reached and the inter-node sends under V3's dispatch rule, price them at V3's real
shape (hidden 7168, FP8 dispatch, BF16 combine) and against the H800's link speeds (IB ~50 GB/s
vs NVLink ~160 GB/s per GPU), and follow the per-node load and the loss.

    python lessons/09_expert_parallelism.py            # about 30 s of CPU on 2 cores
    python lessons/09_expert_parallelism.py --quick    # a few seconds (test suite)
    python lessons/09_expert_parallelism.py --seeds 5  # the calibration runs of the claims
"""
# %% [markdown]
# # Expert parallelism and node-limited routing
#
# DeepSeek-V3 trains on 2048 H800 GPUs, 8 per node (NVLink + NVSwitch inside a node, InfiniBand
# across nodes). Each MoE layer's 256 routed experts sit on 64 GPUs spread over **8 nodes**
# (64-way expert parallelism, V3 3.2 and 4.2). Attention is data-parallel, so a token lives on
# one GPU and must be *sent* to the GPUs of its 8 experts, and their outputs sent back.
#
# **Dispatch rule** (V3 3.2.2). A token crosses InfiniBand **once per distinct remote node** it
# needs (to the GPU with the same in-node index), then fans out over NVLink to the GPUs of that
# node holding its experts; the combine retraces the route. With expert e on node
# node(e) = e // (E/G) and the token's home node h_t:
#
#     n_t     = |{node(e) : e in S_t}|                 nodes reached
#     sends_t = |{node(e) : e in S_t} \ {h_t}|         inter-node (IB) sends
#     IB bytes per token and MoE layer = sends_t * (dispatch + combine)
#     dispatch = 7168 B (FP8) + 56 x 4 B (one FP32 scale per 1 x 128 tile) = 7,392 B
#     combine  = 7168 x 2 B (BF16)                                          = 14,336 B
#
# (V3 3.3.3: activations are quantised to FP8 before dispatch, the combine stays BF16. The
# scale layout is DeepEP's reference cast; `tinymoe.parallel.dispatch_bytes`.)
#
# **Why it hurts on H800s.** IB gives a GPU about 50 GB/s, NVLink about 160 GB/s, "roughly 3.2"
# times more (V3 3.2.2). One IB send costs as long as 3.2 NVLink forwards, so the number of
# nodes, not the number of experts, sets the communication time.
#
# **Node-limited routing** (V3 2.1.2). Each token may use at most M nodes: group the selection
# scores s + b by node, score each node by the sum of its K/M = 2 highest, keep the M best nodes
# and take the top-K experts among them. V3 uses M = 4 ("each token will be sent to at most 4
# nodes"); then a token can use 3.2 experts per node on average "without incurring additional
# overhead from NVLink", up to 13 experts for the cost of 4 sends. In tinymoe this is the
# router's group-limited top-k: `n_expert_groups` = G nodes, `n_limited_groups` = M
# (`tinymoe/layers/router.py` step 4), the released config's 8 and 4.
#
# ## Setting
# * The lesson 7 model (2 blocks, MLA, dense first block, DeepSeekMoE in block 1 with 1 shared
#   expert, sigmoid scores, route_scale 2.5, bias balancing gamma 1e-3 + sequence-wise loss 1e-4)
#   with **32 routed experts of width 8, top-8**, the experts on **G = 8 nodes of 4**.
# * Three runs with the same data, init and batches: unrestricted (any of the 8 nodes),
#   M = 4 (V3), M = 2 (tight: 8 reachable experts for 8 picks, so the two chosen nodes are
#   used whole).
# * Home nodes: whole sequences live on one GPU; held-out sequence b lives on node b mod 8.

# %%
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matrices: threads only cost (router-analysis 5)

import math

import numpy as np

from tinymoe import analysis as A
from tinymoe import parallel as P
from tinymoe.config import ModelConfig
from tinymoe.data import make_languages
from tinymoe.lesson import Lesson
from tinymoe.train import TrainConfig, train

L = Lesson("09_expert_parallelism", __doc__)
QUICK = L.quick
STEPS = 20 if QUICK else 600
N_VAL = 64 if QUICK else 256              # held-out documents routed after training
E, K, G = 32, 8, 8                         # routed experts, picks per token, nodes
MOE_LAYER = 1
RUNS = {"unrestricted": G, "M=4 (V3)": 4, "M=2": 2}     # name -> nodes a token may use
V3_LIMITED = "M=4 (V3)"
# published hardware and shape (shared/reference/cheap.md section 3; V3 3.2.2, 3.3.3, 4.2)
IB_GBPS, NVLINK_GBPS = 50.0, 160.0
V3_DIM, V3_E, V3_K, V3_G, V3_M = 7168, 256, 8, 8, 4
V3_BYTES = P.dispatch_bytes(V3_DIM)


def make_config(ds, M: int) -> ModelConfig:
    limited = M < G
    return ModelConfig(
        vocab_size=ds.vocab_size, dim=64, inter_dim=128, n_layers=2, n_dense_layers=1,
        n_heads=4, max_seq_len=64,
        q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=E, n_shared_experts=1, n_activated_experts=K, moe_inter_dim=8,
        # node-limited routing = group-limited top-k with one group per node
        n_expert_groups=G if limited else 1, n_limited_groups=M if limited else 1,
        score_func="sigmoid", route_scale=2.5, bias_update_speed=1e-3, seq_aux_loss_alpha=1e-4)


def random_nodes(E_, K_, G_):
    """E[n_t] for K_ distinct experts drawn uniformly: G (1 - C(E - E/G, K) / C(E, K))."""
    return G_ * (1 - math.comb(E_ - E_ // G_, K_) / math.comb(E_, K_))


L.log(f"{E} experts on {G} nodes ({E // G} per node), top-{K}; uniformly random routing would "
      f"reach {random_nodes(E, K, G):.2f} nodes per token (V3's 256 on 8: "
      f"{random_nodes(V3_E, V3_K, V3_G):.2f})")
L.log(f"V3 bytes per token and remote node: dispatch {V3_BYTES.dispatch} B (FP8 + scales), "
      f"combine {V3_BYTES.combine} B (BF16), round trip {V3_BYTES.total} B")

# %% [markdown]
# ## 1. Train the three runs, then route the held-out documents
# After training, the held-out documents (256 x 32 tokens; 64 in --quick) are routed once; everything below is
# counted from those indices with `tinymoe.parallel` (node of each expert, distinct nodes,
# sends excluding the home node, per-node load). Over training, the per-step expert loads of the
# history give the node loads (sum over each node's 4 experts) and their node-level MaxVio.

# %%
def run(seed, name, M):
    ds = make_languages(seed=seed, seq_len=32, order=1)
    cfg = make_config(ds, M)
    tcfg = TrainConfig(steps=STEPS, batch_size=16, lr=3e-3, warmup=min(50, STEPS // 4),
                       eval_every=0, log_every=10 if QUICK else 150, seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    out = train(cfg, ds, tcfg, print_fn=lambda s: L.log(f"[{name}, seed {seed}] {s}"))
    secs, cpu = time.perf_counter() - t0, time.process_time() - c0
    model, hist = out["model"], out["history"]
    x = ds.val[:N_VAL, :-1]
    _, routing = model.forward(x, record_routing=True)
    idx = routing[MOE_LAYER]["indices"]
    home = P.home_nodes(x.shape[0], x.shape[1], G)
    nodes = P.nodes_per_token(idx, E, G)
    sends = P.cross_node_sends(idx, E, G, home)
    remote = (P.expert_nodes(idx, E, G) != home[:, None]).sum(axis=1)   # NVLink forwards (<=)
    loads = np.array([h["loads"][f"layers.{MOE_LAYER}.ffn.gate.bias"] for h in hist])
    node_loads = P.node_load_from_expert_load(loads, G)                    # [steps, G]
    labels = ds.val_labels[:N_VAL, :-1].ravel()
    r = dict(
        ds=ds, idx=idx, home=home, nodes=nodes, sends=sends, remote=remote, labels=labels,
        tokens=x.ravel(), secs=secs, cpu=cpu, val_loss=out["summary"]["val_loss"],
        loss_curve=np.array([h["ce"] for h in hist]), node_loads=node_loads,
        node_maxvio_batch=np.array([A.maxvio(l) for l in node_loads]),
        node_maxvio_global=A.maxvio(P.node_load(idx, E, G)),
        node_tokens_maxvio=A.maxvio(P.node_tokens(idx, E, G)),
        expert_maxvio_global=A.maxvio(A.expert_load(idx, E)),
        node_by_language=A.relative_load_matrix(P.expert_nodes(idx, E, G), labels, G, ds.n_labels),
        node_nmi=A.nmi_top1(P.expert_nodes(idx, E, G), labels, G, ds.n_labels),
        nodes_hist=np.bincount(nodes, minlength=G + 1))
    L.log(f"[{name}, seed {seed}] {secs:.1f}s wall ({cpu:.1f}s CPU) | val ce {r['val_loss']:.4f} | "
          f"nodes/token mean {nodes.mean():.2f} max {nodes.max()} | IB sends/token "
          f"{sends.mean():.2f} | node MaxVio {r['node_maxvio_global']:.3f} | expert MaxVio "
          f"{r['expert_maxvio_global']:.3f} | NMI(top-1 node; language) {r['node_nmi']:.3f}")
    return r


results = {name: {s: run(s, name, M) for s in L.seeds} for name, M in RUNS.items()}

# %% [markdown]
# ## 2. What the sends cost at V3's shape and on H800 links
#
# Per token and MoE layer, from the measured routing:
#
#     IB bytes    = sends_t * 21,728 B                            (7,392 out + 14,336 back)
#     IB time     = IB bytes / 50 GB/s
#     NVLink time <= remote experts_t * 21,728 B / 160 GB/s       (one forward per remote expert)
#
# The NVLink line is an upper bound (V3 puts 4 experts on each GPU, so experts on the same GPU
# share one forward). The two links work at the same time (V3 overlaps them), so the slower one
# sets the pace: time ~ max(IB, NVLink). Unrestricted and M = 4, IB is the bottleneck and fewer
# nodes means proportionally less time. At M = 2 a token uses 4 experts per node, more than the
# 3.2 that NVLink forwards for free per IB send, and the bottleneck moves to NVLink: V3's M = 4
# with 8 experts (2 per node) sits where IB still dominates.

# %%
def cost(r):
    ib = r["sends"] * V3_BYTES.total                      # bytes per token
    ib_ns = float(ib.mean() / IB_GBPS)                    # B / (GB/s) = ns
    nvl_ns = float((r["remote"] * V3_BYTES.total).mean() / NVLINK_GBPS)
    return dict(ib_bytes=float(ib.mean()), ib_ns=ib_ns, nvl_ns=nvl_ns, link_ns=max(ib_ns, nvl_ns))


s0 = L.seeds[0]
for name in RUNS:
    c = cost(results[name][s0])
    L.log(f"{name:13s}: IB {c['ib_bytes'] / 1e3:6.1f} kB/token/layer = {c['ib_ns']:5.0f} ns at "
          f"{IB_GBPS:g} GB/s | NVLink <= {c['nvl_ns']:5.0f} ns at {NVLINK_GBPS:g} GB/s | "
          f"max {c['link_ns']:5.0f} ns")
L.log(f"V3 bound with M = 4: at most {V3_M} IB sends = {V3_M * V3_BYTES.total / 1e3:.1f} kB per "
      f"token and MoE layer; with uniformly random routing over 8 nodes "
      f"{random_nodes(V3_E, V3_K, V3_G) * 7 / 8:.2f} sends on average (home node excluded) and up "
      f"to 8")

# %% [markdown]
# ## 3. Figures
# * `expert_parallelism.png` (main): (a) nodes per token, histogram per run; (b) IB bytes per
#   token at V3's shape; (c) IB vs NVLink time per token; (d) node-level MaxVio per training
#   batch; (e) training loss; (f) which nodes each language uses in the M = 4 run.
# * `language_nodes.png`: language x node relative load for all three runs.

# %%
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

names = list(RUNS)
colors = dict(zip(names, ["tab:red", "tab:blue", "tab:green"]))
fig = Figure(figsize=(15, 8.6), dpi=100)
FigureCanvasAgg(fig)
axs = fig.subplots(2, 3)
ax = axs[0, 0]
w = 0.27
for j, n in enumerate(names):
    h = results[n][s0]["nodes_hist"]
    ax.bar(np.arange(G + 1) + (j - 1) * w, 100 * h / h.sum(), w, color=colors[n], label=n)
ax.axvline(4.5, color="k", ls="--", lw=0.8)
ax.text(4.6, 60, "V3 limit:\n<= 4 nodes", fontsize=8)
ax.set(xlabel="distinct nodes a token's 8 experts live on", ylabel="% of held-out tokens",
       title="(a) nodes per token (8 nodes of 4 experts, top-8)", xlim=(0.4, G + 0.6))
ax.legend(fontsize=8)
ax = axs[0, 1]
kb = [cost(results[n][s0])["ib_bytes"] / 1e3 for n in names]
ax.bar(range(3), kb, color=[colors[n] for n in names])
for i, v in enumerate(kb):
    ax.text(i, v, f"{v:.1f} kB\n{results[names[i]][s0]['sends'].mean():.2f} sends", ha="center",
            va="bottom", fontsize=8)
ax.set_xticks(range(3))
ax.set_xticklabels(names)
ax.set(ylabel="inter-node bytes per token per MoE layer (kB)", ylim=(0, max(kb) * 1.25),
       title="(b) IB traffic at V3 shape: FP8 dispatch + BF16 combine")
ax = axs[0, 2]
ib = [cost(results[n][s0])["ib_ns"] for n in names]
nv = [cost(results[n][s0])["nvl_ns"] for n in names]
ax.bar(np.arange(3) - 0.2, ib, 0.4, color="tab:purple", label=f"IB, {IB_GBPS:g} GB/s")
ax.bar(np.arange(3) + 0.2, nv, 0.4, color="tab:gray", label=f"NVLink, {NVLINK_GBPS:g} GB/s (bound)")
ax.set_xticks(range(3))
ax.set_xticklabels(names)
for i, n in enumerate(names):
    ax.text(i, max(ib[i], nv[i]), f"max {max(ib[i], nv[i]):.0f}", ha="center", va="bottom", fontsize=8)
ax.set(ylabel="link time per token per MoE layer (ns)",
       title="(c) overlapped links: the slower one sets the pace")
ax.legend(fontsize=8)
ax = axs[1, 0]
k = 25 if STEPS >= 100 else 5
for n in names:
    mv = results[n][s0]["node_maxvio_batch"]
    ax.plot(np.arange(k, len(mv) + 1), np.convolve(mv, np.ones(k) / k, mode="valid"),
            color=colors[n], label=n)
ax.set_yscale("log")
ax.set(xlabel="training step", ylabel=f"node-level MaxVio per batch ({k}-step mean, log)",
       title="(d) per-node load over training (bias balancing on)")
ax.legend(fontsize=8)
ax.grid(alpha=0.3, which="both")
ax = axs[1, 1]
for n in names:
    lc = results[n][s0]["loss_curve"]
    ax.plot(np.arange(k, len(lc) + 1), np.convolve(lc, np.ones(k) / k, mode="valid"),
            color=colors[n], label=f"{n}: held-out {results[n][s0]['val_loss']:.4f}")
ax.axhline(results[names[0]][s0]["ds"].meta["optimal_loss"], color="k", ls=":", lw=0.8,
           label="optimal ln 2")
ax.set(xlabel="training step", ylabel=f"training cross-entropy ({k}-step mean, nats)",
       title="(e) the loss cost of the limit", ylim=(0.65, 1.2))
ax.legend(fontsize=8)
ax = axs[1, 2]
ds0 = results[V3_LIMITED][s0]["ds"]
im = ax.imshow(results[V3_LIMITED][s0]["node_by_language"], cmap="coolwarm", vmin=0, vmax=3,
               aspect="auto")
ax.set_yticks(range(ds0.n_labels))
ax.set_yticklabels(ds0.label_names)
ax.set_xticks(range(G))
ax.set(xlabel="node", title="(f) M = 4: load of each node per language (1 = uniform)")
fig.colorbar(im, ax=ax, fraction=0.046)
fig.suptitle(f"Lesson 9: node-limited routing, same model, data and seed {s0}; "
             f"{E} experts on {G} nodes, top-{K}", fontsize=12)
fig.text(0.5, 0.01, "What to see: the limit caps every token at M nodes (a) and cuts the IB "
         "traffic (b), the slow link (c; at M = 2 NVLink takes over), while node load stays "
         "balanced (d) and the loss barely moves (e).", ha="center", fontsize=9, style="italic")
fig.tight_layout(rect=(0, 0.03, 1, 0.96))
fig.savefig(L.main_figure(L.path("expert_parallelism.png")))

A.plot_heatmaps([results[n][s0]["node_by_language"] for n in names], ds0.label_names,
                [str(g) for g in range(G)], L.path("language_nodes.png"),
                title=f"Which nodes each language uses (seed {s0})", panel_titles=names,
                xlabel="node", ylabel="language",
                caption="Relative load of each node per language (1 = uniform). With a node limit a "
                        "language's tokens concentrate on fewer nodes.")

# %% [markdown]
# ## 4. Claims
# * (quick) The limit holds exactly: no held-out token of a limited run reaches more than M
#   nodes, and the unrestricted run does reach more than 4 (so the limit is not vacuous).
# * IB sends per token drop by a clear factor: unrestricted / M=4 >= 1.25 and unrestricted /
#   M=2 >= 2.5 (worst seed). The first cannot be large: with top-8 over 8 nodes a token reaches
#   about 5.6 nodes anyway (5.3 for V3's 256 experts under uniform routing), so M = 4 mostly
#   removes the tail of 5-8 nodes and, above all, bounds the worst case (8 -> 4 sends).
# * The held-out loss of each limited run stays within 0.01 nats of the unrestricted run.
# * (quick) Every run learns: held-out loss / ln V < 0.8 (--quick, 20 steps: 0.61; full: 0.18).
#
# Calibration (seeds 0-4, 600 steps; per seed 0 / 1 / 2 / 3 / 4):
# * nodes per token: unrestricted 5.72 / 5.64 / 5.51 / 5.38 / 5.72, M=4 3.97-4.00, M=2 2.00;
#   IB sends: unrestricted 4.71-5.01, M=4 3.47-3.51, M=2 1.74-1.77.
# * sends ratio unrestricted / M=4: 1.444 / 1.406 / 1.381 / 1.355 / 1.434 (worst 8 % above 1.25);
#   unrestricted / M=2: 2.868 / 2.790 / 2.749 / 2.708 / 2.888 (worst 8 % above 2.5).
# * held-out loss 0.704-0.711 for every run; worst limited minus unrestricted 0.0009 / 0.0004 /
#   0.0023 / 0.0016 / 0.0005 nats (4x under 0.01).
# * V3-shape link time per token and MoE layer, max(IB, NVLink bound): unrestricted 2048-2179 ns,
#   M=4 1508-1527 ns, M=2 943-962 ns (NVLink-bound).
# * Node-level MaxVio per batch (mean of the last 100 steps): unrestricted 0.10-0.14, M=4
#   0.14-0.20, M=2 0.21-0.33; over the held-out set 0.02-0.04 / 0.03-0.04 / 0.03-0.12. The limit
#   makes node loads lumpier batch to batch (a language's tokens crowd onto the same few nodes),
#   while the bias keeps the expert, and so the node, load balanced on average.
# * Full mode: 28-35 s of CPU per seed (wall 31-140 s on the shared, loaded machine).

# %%
seeds = L.seeds
per = lambda n, f: [f(results[n][s]) for s in seeds]      # noqa: E731
for n, M in RUNS.items():
    key = n.split(" ")[0].replace("=", "")
    L.metric(f"{key}.n_limited_groups", M)
    L.metric(f"{key}.val_loss_per_seed", per(n, lambda r: r["val_loss"]))
    L.metric(f"{key}.nodes_per_token_mean_per_seed", per(n, lambda r: float(r["nodes"].mean())))
    L.metric(f"{key}.nodes_per_token_max_per_seed", per(n, lambda r: int(r["nodes"].max())))
    L.metric(f"{key}.ib_sends_per_token_per_seed", per(n, lambda r: float(r["sends"].mean())))
    L.metric(f"{key}.ib_bytes_per_token_v3_per_seed", per(n, lambda r: cost(r)["ib_bytes"]))
    L.metric(f"{key}.ib_ns_per_token_v3_per_seed", per(n, lambda r: cost(r)["ib_ns"]))
    L.metric(f"{key}.nvlink_ns_bound_per_token_v3_per_seed", per(n, lambda r: cost(r)["nvl_ns"]))
    L.metric(f"{key}.link_ns_max_per_token_v3_per_seed", per(n, lambda r: cost(r)["link_ns"]))
    L.metric(f"{key}.node_maxvio_global_per_seed", per(n, lambda r: r["node_maxvio_global"]))
    L.metric(f"{key}.node_tokens_maxvio_per_seed", per(n, lambda r: r["node_tokens_maxvio"]))
    L.metric(f"{key}.expert_maxvio_global_per_seed", per(n, lambda r: r["expert_maxvio_global"]))
    L.metric(f"{key}.node_maxvio_batch_last100_per_seed",
             per(n, lambda r: float(r["node_maxvio_batch"][-100:].mean())))
    L.metric(f"{key}.nodes_histogram_seed{s0}", results[n][s0]["nodes_hist"])
    L.metric(f"{key}.nmi_top1_node_language_per_seed", per(n, lambda r: r["node_nmi"]))
    L.metric(f"{key}.seconds_per_seed", per(n, lambda r: r["secs"]))
    L.metric(f"{key}.cpu_seconds_per_seed", per(n, lambda r: r["cpu"]))
# what routing.npz's indices_layer1 was trained with: recount nodes per token from these
L.metric("n_routed_experts", E)
L.metric("n_activated_experts", K)
L.metric("n_expert_groups", G)
L.metric("n_limited_groups", RUNS[V3_LIMITED])
L.metric("steps", STEPS)
L.metric("v3_dispatch_bytes", V3_BYTES._asdict())
L.metric("random_routing_nodes_toy", random_nodes(E, K, G))
L.metric("random_routing_nodes_v3", random_nodes(V3_E, V3_K, V3_G))
L.metric("link_gbps", {"ib": IB_GBPS, "nvlink": NVLINK_GBPS})

over = max(int(results[n][s]["nodes"].max()) - M for n, M in RUNS.items() if M < G for s in seeds)
L.claim("node_limit_excess", over, "<=", 0, quick=True,
        note="max over limited runs and seeds of (nodes reached - M); 0 = the limit holds exactly")
L.claim("unrestricted_max_nodes", min(per(names[0], lambda r: int(r["nodes"].max()))), ">", 4,
        quick=True, note="without the limit some token reaches more than 4 nodes (min over seeds)")
ratio4 = [results[names[0]][s]["sends"].mean() / results[V3_LIMITED][s]["sends"].mean() for s in seeds]
ratio2 = [results[names[0]][s]["sends"].mean() / results["M=2"][s]["sends"].mean() for s in seeds]
L.metric("ib_sends_ratio_unrestricted_over_M4_per_seed", ratio4)
L.metric("ib_sends_ratio_unrestricted_over_M2_per_seed", ratio2)
L.claim("ib_sends_ratio_unrestricted_over_M4", min(ratio4), ">=", 1.25, note="worst seed")
L.claim("ib_sends_ratio_unrestricted_over_M2", min(ratio2), ">=", 2.5, note="worst seed")
gap = [max(results[n][s]["val_loss"] for n in names[1:]) - results[names[0]][s]["val_loss"]
       for s in seeds]
L.metric("val_loss_gap_limited_minus_unrestricted_per_seed", gap)
lnV = math.log(results[names[0]][s0]["ds"].vocab_size)
L.claim("val_loss_over_uniform", max(results[n][s]["val_loss"] for n in names for s in seeds) / lnV,
        "<", 0.8, quick=True, note=f"worst run and seed, held-out loss / ln V = {lnV:.2f} (a broken "
        "optimizer stays at ~1)")
L.claim("val_loss_gap_limited_minus_unrestricted", max(gap), "<=", 0.01,
        note="worst limited run and seed, held-out nats")

R = results[V3_LIMITED][s0]
path = L.save_routing(R["labels"], {MOE_LAYER: R["idx"]}, tokens=R["tokens"], home_nodes=R["home"],
                      indices_layer1_unrestricted=results[names[0]][s0]["idx"],
                      indices_layer1_limited_M2=results["M=2"][s0]["idx"])
# recount from the file, with the numbers metrics.json records, as a reader would
m = L.metrics
with np.load(path, allow_pickle=False) as z:
    recount = P.nodes_per_token(z["indices_layer1"], m["n_routed_experts"], m["n_expert_groups"])
    recount_free = P.nodes_per_token(z["indices_layer1_unrestricted"], m["n_routed_experts"],
                                     m["n_expert_groups"])
L.claim("routing_file_node_limit_excess", int(recount.max()) - m["n_limited_groups"], "<=", 0,
        quick=True, note="routing.npz indices_layer1 recounted: max nodes per token - M")
L.claim("routing_file_unrestricted_max_nodes", int(recount_free.max()), ">",
        m["n_limited_groups"], quick=True, note="routing.npz indices_layer1_unrestricted recounted")
L.finish()

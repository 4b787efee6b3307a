"""Lesson 01: every backward by hand, checked by finite differences, then a tiny MoE transformer trained on a task mixture.

Goal
    See that a whole DeepSeek-style model (embedding, MLA attention, RMSNorm, dense SwiGLU,
    DeepSeekMoE with a sigmoid router and a sequence-wise balance loss, head, cross-entropy) is a
    chain of small forward/backward pairs, that the chained backward agrees with finite
    differences of the loss for EVERY parameter tensor (float64), and that the same code, run in
    float32, trains: the loss drops far below the best input-blind guess, and the routed experts
    split the work by task.

Run
    python lessons/01_backprop.py                 # about 40 s on 2 cores
    python lessons/01_backprop.py --quick         # a few seconds (the test suite runs this)
    python lessons/01_backprop.py --seeds 3       # per-seed numbers in metrics.json
    pytest -m gradcheck                           # the unit-level gradient checks

Expected output (numbers vary a little with the seed)
    OK  rmsnorm.x  max rel err 1e-10 ...           one line per input of a single layer pair
    OK  layers.1.ffn.gate  max rel err 3e-09 ...   one line per parameter tensor of the model
    step  3000/3000 | loss 0.5 | ... | val 0.5     training progress (tokens/s, MaxVio balance)
    PASS max_grad_rel_error = 2e-08 (< 1e-06)
    PASS final_val_loss = 0.5 (< 1.15)         half the unigram baseline ln(10)
Figures: gradcheck.png (main), loss.png, expert_task.png; metrics.json; routing.npz.
"""
# %% [markdown]
# # Lesson 01 - backprop by hand, checked; a tiny MoE transformer that learns a task mixture
#
# Every layer in tinymoe is a **pair of pure functions**:
#
#     y, cache = layer_forward(x, params)           # keeps what the backward needs
#     dx, dparams = layer_backward(dy, cache)       # dL/dx and dL/dparams from dL/dy
#
# The model's backward is nothing but these pairs called in reverse order; wherever one value
# feeds two branches (a residual connection, the shared expert next to the routed ones, the
# query and the latent branch of MLA) the two incoming gradients are **added**.
#
# How do we know a hand-written backward is right? Central finite differences, in float64:
#
#     dL/dtheta_i  ~  (L(theta + eps e_i) - L(theta - eps e_i)) / (2 eps),    eps = 1e-5
#
# The truncation error is O(eps^2) ~ 1e-10 and the rounding error ~ 1e-16 / eps ~ 1e-11, so a
# correct backward agrees to ~1e-8 relative error or better; a wrong one (a missing transpose,
# a forgotten branch) is off by O(1). We ask for < 1e-6. (In float32 the rounding error alone
# would be ~1e-7 / 1e-5 = 1e-2: gradient checks must be float64.)
#
# The relative error of entry i is |a - n| / max(|a|, |n|, 1e-3 * the tensor's largest entry)
# (a = analytic, n = numeric): entries that are ~0 are measured against the tensor's own scale.
# %%
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")   # small matrices: 1 thread is fastest

import numpy as np

from tinymoe.analysis import (maxvio, nmi_null, nmi_top1, plot_bar, plot_heatmaps, plot_lines,
                              relative_load_matrix)
from tinymoe.config import ModelConfig
from tinymoe.data import make_tasks, split_arrays, unigram_entropy
from tinymoe.gradcheck import gradcheck, gradcheck_scalar
from tinymoe.layers.basic import cross_entropy_forward
from tinymoe.layers.norm import rmsnorm_backward, rmsnorm_forward
from tinymoe.lesson import Lesson
from tinymoe.model import Model
from tinymoe.train import TrainConfig, train

L = Lesson("01_backprop", __doc__)
QUICK = L.quick
GRAD_TOL = 1e-6

# %% [markdown]
# ## 1. One pair, checked
#
# RMSNorm: y = w * x * r with r = (mean(x^2) + eps)^(-1/2). Its backward (tinymoe/layers/norm.py)
#
#     dw = sum_rows dy * x * r
#     dx = r * g - x * r^3 * mean(g * x),     g = dy * w
#
# `gradcheck(forward, backward, inputs)` draws a random upstream gradient `dout`, defines
# L = sum(dout * forward(x)) and compares every entry of the backward's dL/dx and dL/dw with
# finite differences. The printed table is what every test in tests/ does for its layer.
# %%
rng = np.random.default_rng(1)          # a fixed demo input, whatever --seed says
x_demo = rng.standard_normal((2, 4, 8))
w_demo = 1.0 + 0.1 * rng.standard_normal(8)
rep = gradcheck(lambda x, w: rmsnorm_forward(x, w, 1e-6),
                lambda dy, cache: dict(zip(("x", "w"), rmsnorm_backward(dy, cache))),
                {"x": x_demo, "w": w_demo})
for t in rep.tensors.values():
    L.log(f"{'OK ' if t.max_rel_error < GRAD_TOL else 'BAD'} rmsnorm.{t.name:<3s} max rel err "
          f"{t.max_rel_error:.1e}  ({t.n_checked} entries)")
L.metric("rmsnorm_grad_rel_error", rep.max_rel_error)

# %% [markdown]
# ## 2. The data: four tasks on one shared vocabulary
#
# Each row is `<task> x_1 .. x_n = answer` on the digits 0-9 (make_tasks): **copy** x, **reverse**
# it, **sort** it, or **shift** every digit by one (mod 10). The same digits must be mapped
# differently depending on the task token at the start of the row: conflicting maps on shared
# inputs, the setting where one expert per task is the simple solution (Chen et al. 2022).
# Only the answer tokens are targets (the loss mask), so the optimal loss is 0.
#
# The **unigram baseline** is the loss of the best predictor that ignores the input:
# the entropy of the answer-token distribution, ~ln 10 = 2.3 nats. "Learned" means far below it.
# %%
TASKS = ("copy", "reverse", "sort", "shift")
SEQ_LEN = 20


def make_data(seed: int):
    return make_tasks(tasks=TASKS, seq_len=SEQ_LEN, max_len=8, n_train=8192, n_val=512, seed=seed)


def model_config(ds) -> ModelConfig:
    # The toy preset (MLA with a compressed query and latent KV, 1 dense block then DeepSeekMoE
    # with 8 routed experts, top-2, 1 shared expert, sigmoid router) at 2 layers and width 48;
    # auxiliary-loss-free balancing (gamma 0.01) plus V3's small sequence-wise balance loss.
    return ModelConfig.preset("toy", vocab_size=ds.vocab_size, n_layers=2, dim=48,
                              max_seq_len=SEQ_LEN, n_expert_groups=1, n_limited_groups=1,
                              bias_update_speed=0.01, seq_aux_loss_alpha=1e-4)


# %% [markdown]
# ## 3. Gradient check of the whole model, every parameter tensor, float64
#
# The model's loss is L = CE(logits, targets) + alpha * L_SeqBal. `Model.loss_and_grads` runs the
# forward, then `Model.backward`, which walks: head -> final norm -> each block in reverse
# (FFN/MoE pair, ffn_norm pair, residual add, MLA pair, attn_norm pair, residual add) ->
# embedding. We perturb a random sample of entries of every parameter tensor and compare.
#
# **Why a 4th-order stencil here.** The 2-point difference above has two error sources:
# truncation ~ eps^2 |L'''| / 6 and rounding ~ (a few ulp of L) / eps. For one layer both are
# ~1e-10. For a whole model, L ~ 3 carries a rounding noise of ~1e-15 per evaluation, i.e. ~1e-10
# in the difference quotient, while many gradient entries (router gate, lightly used experts)
# are only ~1e-5: the 2-point check then sits right at 1e-6 even for a correct backward.
# The 5-point stencil
#
#     dL/dtheta_i ~ (-L(+2h) + 8 L(+h) - 8 L(-h) + L(-2h)) / (12 h)
#
# has truncation ~ h^4 |L^(5)| / 30, so we can take h = 3e-4: rounding ~1e-15 / 3e-4 ~ 3e-12,
# truncation ~1e-14 (`gradcheck_scalar(..., stencil=4)`; the relative error is defined in
# tinymoe.gradcheck).
#
# One MoE subtlety: top-k selection is piecewise constant. If a perturbation flipped which
# experts a token chooses, the loss would jump; we count the evaluations where the routing
# changed (it should be 0).
# %%
def full_loss(model: Model, tokens: np.ndarray, targets: np.ndarray):
    """Forward pass only -> (CE + balance losses, {bias name: indices [N, K]} of the routing)."""
    logits, _, cache = model.forward_train(tokens)
    B, T, V = logits.shape
    ce, _ = cross_entropy_forward(logits.reshape(B * T, V), targets.reshape(B * T))
    # the chosen SET of experts per token (the order inside the top-k does not change the output)
    return ce + cache.aux_loss, {k: np.sort(c.indices, axis=1) for k, c in cache.moe_caches.items()}


def gradcheck_model(model: Model, tokens, targets, max_entries: int, h: float = 3e-4,
                    seed: int = 0):
    """-> ({name: (max relative error, entries checked)}, routing flips), 5-point stencil."""
    _, grads = model.loss_and_grads(tokens, targets)
    _, routing0 = full_loss(model, tokens, targets)
    flips = 0

    def loss_fn() -> float:
        nonlocal flips
        loss, routing = full_loss(model, tokens, targets)
        flips += any(not np.array_equal(routing[k], routing0[k]) for k in routing0)
        return loss

    report = gradcheck_scalar(loss_fn, model.params, grads, eps=h, stencil=4,
                              max_entries=max_entries, seed=seed)
    return {n: (t.max_rel_error, t.n_checked) for n, t in report.tensors.items()}, flips


def check_model(ds, seed: int, max_entries: int):
    """The lesson's model in float64 at a random point where gradients are well above round-off:
    matrices ~ N(0, 1/fan_in) instead of the small training init, norm scales 1 + 0.1 noise,
    a nonzero router selection bias; 4 held-out rows as the batch."""
    cfg = model_config(ds)
    model = Model(cfg, seed=seed, dtype=np.float64)
    grng = np.random.default_rng(seed + 1000)
    for k, v in model.params.items():
        if v.ndim > 1:
            v *= 1.0 / np.sqrt(v.shape[-1]) / cfg.init_std
        else:
            v += 0.1 * grng.standard_normal(v.shape)
    for k in model.buffers:
        model.buffers[k] = 0.05 * grng.standard_normal(model.buffers[k].shape)
    tokens, targets, _ = split_arrays(ds, "val", np.arange(4))
    loss, _ = model.loss_and_grads(tokens, targets)
    assert abs(loss - full_loss(model, tokens, targets)[0]) < 1e-12
    return gradcheck_model(model, tokens, targets, max_entries, seed=seed)


ds0 = make_data(L.seed)
check, routing_flips = check_model(ds0, L.seed, max_entries=4 if QUICK else 24)
for name, (err, n) in check.items():
    L.log(f"{'OK ' if err < GRAD_TOL else 'BAD'} {name:<28s} max rel err {err:.1e}  "
          f"({n} entries checked)")
L.log(f"routing changed under a perturbation in {routing_flips} evaluations")
grad_errors = {k: e for k, (e, _) in check.items()}
max_grad_err = max(grad_errors.values())
worst_tensor = max(grad_errors, key=grad_errors.get)
L.metric("grad_rel_error_per_tensor", grad_errors)
L.metric("n_param_tensors_checked", len(grad_errors))
plot_bar(grad_errors, L.main_figure(L.path("gradcheck.png")),
         title="Gradient check of every parameter tensor (float64, central differences)",
         ylabel="max relative error (log scale)", logy=True, hline=GRAD_TOL,
         hline_label=f"pass threshold {GRAD_TOL:g}",
         caption="Every bar far below the dashed line: the hand-written backward of the whole "
                 "MoE transformer matches finite differences.")

# %% [markdown]
# ## 4. Train (float32) and watch the loss
#
# `tinymoe.train.train`: batches of 32 rows, AdamW (b1 0.9, b2 0.95, weight decay 0.1),
# warmup + cosine learning rate, global-norm clipping at 1, and after every step the
# auxiliary-loss-free bias update b_i += gamma * sign(mean load - load_i) (V3 2.1.2).
# The progress line shows loss, tokens/s and MaxVio = max load / mean load - 1 of the batch.
# %%
STEPS = 100 if QUICK else 3000


def run(seed: int) -> dict:
    ds = make_data(seed)
    cfg = model_config(ds)
    tcfg = TrainConfig(steps=STEPS, batch_size=32, lr=5e-3, warmup=50, eval_every=250,
                       eval_batches=8, log_every=STEPS // 10, seed=seed)
    L.log(f"-- seed {seed}: training {Model(cfg, seed=seed).n_params():,} parameters for "
          f"{STEPS} steps")
    res = train(cfg, ds, tcfg, print_fn=L.log)
    model = res["model"]
    # held-out evaluation on the whole validation split
    tokens, targets, labels = split_arrays(ds, "val")
    logits, routing = model.forward(tokens, record_routing=True)
    B, T, V = logits.shape
    val_loss, _ = cross_entropy_forward(logits.reshape(B * T, V), targets.reshape(B * T))
    ok = targets != -100
    acc = float((logits.argmax(-1)[ok] == targets[ok]).mean())
    # routing of the real (non-padding) input tokens, labelled by their row's task
    keep = (tokens != ds.meta["pad_id"]).reshape(-1)
    moe_layers = sorted(routing)
    E = cfg.n_routed_experts
    idx = {l: routing[l]["indices"][keep] for l in moe_layers}
    lab = labels.reshape(-1)[keep]
    rel = {l: relative_load_matrix(idx[l], lab, E, len(TASKS)) for l in moe_layers}
    nmi = {l: nmi_top1(idx[l], lab, E, len(TASKS)) for l in moe_layers}
    null = {l: nmi_null(idx[l], lab, E, len(TASKS), np.random.default_rng(seed)) for l in moe_layers}
    load = {l: np.bincount(idx[l].ravel(), minlength=E) for l in moe_layers}
    return dict(ds=ds, history=res["history"], val_loss=float(val_loss), acc=acc,
                unigram=unigram_entropy(ds, "val"), idx=idx, labels=lab, rel=rel, nmi=nmi,
                null=null, maxvio={l: maxvio(load[l]) for l in moe_layers},
                seconds=res["summary"]["seconds"], tokens_per_s=res["summary"]["tokens_per_s"])


results = {s: run(s) for s in L.seeds}
r0 = results[L.seeds[0]]

# %% [markdown]
# ## 5. What the experts do: expert x task
#
# For every held-out input token we know its task. The relative load R[task, e] is the share of
# that task's routed assignments (both top-2 slots) that go to expert e, times E: 1 = uniform,
# E/K = 4 = the expert serves every token of the task. DeepSeek-V3 (Fig. 9) draws the same map
# per domain of the Pile. NMI(top-1 expert; task) = I/H(task) measures it in one number, next
# to the same statistic with the task labels shuffled across rows (the null).
# %%
hist = r0["history"]
steps = np.array([h["step"] for h in hist])
ev = [h for h in hist if "val_loss" in h]
plot_lines(None, {"train loss (batch)": [h["loss"] for h in hist]}, L.path("loss.png"),
           title="Training loss of the tiny MoE transformer on the task mixture",
           xlabel="training step", ylabel="cross-entropy on answer tokens (nats)",
           hlines={f"unigram baseline {r0['unigram']:.2f}": r0["unigram"],
                   f"held-out loss at the end {r0['val_loss']:.3f}": r0["val_loss"]},
           caption="The loss falls from ln(V) far below the input-blind unigram baseline "
                   "(dashed): the model reads the task token and the input digits.")
layers = sorted(r0["rel"])
plot_heatmaps([r0["rel"][l] for l in layers], list(TASKS),
              [str(e) for e in range(model_config(r0["ds"]).n_routed_experts)],
              L.path("expert_task.png"),
              title="Expert x task: relative load of each routed expert per task (held-out tokens)",
              panel_titles=[f"MoE layer {l}  (NMI {r0['nmi'][l]:.2f}, null {r0['null'][l]:.2f})"
                            for l in layers],
              ylabel="task",
              caption="Red: the task uses that expert more than a uniform router would (1); "
                      "blue: less. Distinct red cells per row = experts specialised by task.")
L.save_routing(r0["labels"], r0["idx"], label_names=np.array(TASKS))

# %% [markdown]
# ## 6. Claims
# %%
seeds = L.seeds
L.metric("val_loss_per_seed", [results[s]["val_loss"] for s in seeds])
L.metric("answer_accuracy_per_seed", [results[s]["acc"] for s in seeds])
L.metric("unigram_baseline_per_seed", [results[s]["unigram"] for s in seeds])
L.metric("nmi_task_per_seed", [{str(l): results[s]["nmi"][l] for l in layers} for s in seeds])
L.metric("nmi_null_per_seed", [{str(l): results[s]["null"][l] for l in layers} for s in seeds])
L.metric("val_maxvio_per_seed", [{str(l): results[s]["maxvio"][l] for l in layers} for s in seeds])
L.metric("tokens_per_s", r0["tokens_per_s"])
L.log(f"held-out answer-token accuracy {r0['acc']:.3f}; NMI(expert; task) per MoE layer "
      + ", ".join(f"{l}: {r0['nmi'][l]:.2f} (null {r0['null'][l]:.2f})" for l in layers))
L.metric("gradcheck_routing_flips", routing_flips)
L.claim("max_grad_rel_error", max_grad_err, "<", GRAD_TOL, quick=True,
        note=f"worst tensor {worst_tensor}, {len(grad_errors)} tensors checked")
worst_loss = max(results[s]["val_loss"] for s in seeds)
unigram = min(results[s]["unigram"] for s in seeds)
L.metric("unigram_baseline", unigram)
L.claim("final_val_loss", worst_loss, "<", 0.5 * unigram,
        note=f"worst seed; half the unigram baseline {unigram:.3f}")
# quick-mode claim: even 100 steps get clearly below the unigram baseline (a model that only
# learned token frequencies); a broken optimizer step or backward does not
L.claim("val_loss_over_unigram", max(results[s]["val_loss"] / results[s]["unigram"] for s in seeds),
        "<", 0.95, quick=True, note="worst seed, held-out loss / unigram baseline")
# (--quick, 100 steps, seeds 0-4: 0.86, 0.87, 0.84, 0.84, 0.86)
L.finish()

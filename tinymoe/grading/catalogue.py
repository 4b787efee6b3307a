"""The exercise catalogue: every region of the reference a student copy can leave for the student.

An exercise is one or more regions of reference code between `# BEGIN EXERCISE <id>` and
`# END EXERCISE` comment lines (tinymoe/grading/regions.py finds them), graded by the tests
listed here. Test ids are pytest node ids relative to the project root, either a whole test
function (every parametrization counts) or one parametrization (`...::test_x[seq]`). Hidden
tests are not listed: they live in tests/hidden/test_hidden_<id with _ for ->.py, one file per
exercise, and a student copy made with --hide-tests leaves that folder out.

`prereqs` names the exercises whose regions an exercise's tests also run: while one of those is
unfinished, the tests are skipped as "waiting on exercise <prereq>" instead of failing (and score
nothing). The suite checks the claim (tests/test_grading.py). Points add up to 40.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple


class Exercise(NamedTuple):
    id: str                      # short name used on the command line and in the markers
    title: str
    where: Tuple[str, ...]       # "file: function" of each region
    tests: Tuple[str, ...]       # pytest node ids that grade it
    prereqs: Tuple[str, ...]     # exercises its tests also run
    points: int
    hint: str                    # what to compute, the equation and paper section, the shapes
    lesson: str                  # the lesson that builds on it
    twins: Tuple[str, ...] = ()  # "file: function" of regions in the fused kernels that hold the
    #                              same solution: a student copy cuts them too and switches the
    #                              fused paths off (tinymoe.kernels.FUSED_KERNELS), so the code a
    #                              student writes is the code that runs; nothing to write there


# The backward of everything the whole-model gradient check runs through (mtp's prerequisites).
_MODEL_PREREQS = ("rmsnorm-backward", "cross-entropy-backward", "swiglu-backward", "rope",
                  "attention-backward", "mla-compress", "router-forward", "router-backward",
                  "moe-dispatch", "balance-backward")

EXERCISES: Tuple[Exercise, ...] = (
    Exercise(
        "rmsnorm-backward", "RMSNorm backward",
        ("tinymoe/layers/norm.py: rmsnorm_backward",),
        ("tests/test_norm.py::test_gradcheck_rmsnorm",), (), 2,
        "dw = sum over rows of dy * x * r;  with g = dy * w,  dx = r * g - x * r^3 * mean(g * x)\n"
        "(r = 1/sqrt(mean(x^2) + eps) reaches y directly and through the mean of squares).\n"
        "Shapes: dy, x [..., D], r [..., 1], w [D] -> dx [..., D], dw [D]. Zhang & Sennrich 2019; "
        "DeepSeek-V2 3.1.2.", "01_backprop",
        twins=("tinymoe/kernels/norm.py: _rmsnorm_backward_loops",)),
    Exercise(
        "cross-entropy-backward", "softmax and cross-entropy backward (with ignore index)",
        ("tinymoe/layers/basic.py: softmax_backward", "tinymoe/layers/basic.py: cross_entropy_backward"),
        ("tests/test_basic.py::test_gradcheck_softmax", "tests/test_basic.py::test_gradcheck_cross_entropy"),
        (), 2,
        "softmax: dx = p * (dp - sum_c dp * p) (the Jacobian p_i (delta_ij - p_j), never formed).\n"
        "cross-entropy: dz = dloss * (p - onehot(t)) / n_valid on rows with t != ignore_index, 0 on "
        "the others\n(and all zeros when no row counts). Shapes: p [N, V], t [N] -> dz [N, V].",
        "01_backprop",
        twins=("tinymoe/kernels/loss.py: _cross_entropy_backward_numpy", "tinymoe/kernels/loss.py: _cross_entropy_backward_loops")),
    Exercise(
        "swiglu-backward", "SwiGLU MLP backward",
        ("tinymoe/layers/basic.py: swiglu_backward",),
        ("tests/test_basic.py::test_gradcheck_swiglu",), (), 2,
        "y = (silu(h1) * h3) W2^T with h1 = x W1^T, h3 = x W3^T; walk steps 3, 2, 1 back:\n"
        "dW2 = dy^T g, dg = dy W2; dh3 = dg * silu(h1); dh1 = dg * h3 * s (1 + h1 (1 - s)), "
        "s = sigmoid(h1);\ndW1 = dh1^T x, dW3 = dh3^T x, dx = dh1 W1 + dh3 W3. Shapes: x [N, D], "
        "h [N, F]. DeepSeek `MLP`.", "01_backprop",
        twins=("tinymoe/kernels/swiglu.py: _swiglu_gate_backward_numpy", "tinymoe/kernels/swiglu.py: _swiglu_gate_backward_loops", "tinymoe/kernels/swiglu.py: swiglu_backward_fused", "tinymoe/kernels/experts.py: experts_backward_batched")),
    Exercise(
        "adamw", "the AdamW step",
        ("tinymoe/optim.py: AdamW.step",),
        ("tests/test_optim.py::test_adamw_matches_reference_loop",
         "tests/test_optim.py::test_first_adam_step_is_lr_times_sign",
         "tests/test_optim.py::test_adamw_updates_in_place_and_rejects_wrong_keys"), (), 2,
        "t += 1; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; m_hat = m/(1-b1^t), v_hat = v/(1-b2^t);\n"
        "p -= lr * (m_hat / (sqrt(v_hat) + eps) + wd * p), wd skipped where self.no_decay(name).\n"
        "Update p, m and v IN PLACE (the dict holds the model's arrays). Loshchilov & Hutter 2019.",
        "01_backprop",
        twins=("tinymoe/kernels/optim.py: _adamw_numpy", "tinymoe/kernels/optim.py: _adamw_loops", "tinymoe/optim.py: AdamW._step_fused")),
    Exercise(
        "rope", "interleaved RoPE forward and backward",
        ("tinymoe/layers/rope.py: rope_forward", "tinymoe/layers/rope.py: rope_backward"),
        ("tests/test_rope.py::test_rope_matches_pairwise_rotation_loop",
         "tests/test_rope.py::test_rope_position_zero_is_identity_and_norm_preserved",
         "tests/test_rope.py::test_rope_dot_product_depends_only_on_offset",
         "tests/test_rope.py::test_rope_backward_inverts_forward",
         "tests/test_rope.py::test_gradcheck_rope"), (), 3,
        "Rotate each ADJACENT pair (x[2j], x[2j+1]) by phi_tj: y[2j] = x[2j] c - x[2j+1] s, "
        "y[2j+1] = x[2j] s + x[2j+1] c\n(c, s = cos, sin [T, Dr/2], broadcast over batch and heads "
        "with _broadcast). Backward: R(phi)^T = R(-phi).\nShapes: x [B, T, ..., Dr]. RoFormer; "
        "DeepSeek-V2 2.1.3 (decoupled RoPE); official `apply_rotary_emb`.", "02_attention_rope",
        twins=("tinymoe/kernels/rope.py: _rope_loops",)),
    Exercise(
        "attention-backward", "causal attention backward",
        ("tinymoe/layers/attention.py: sdpa_backward",),
        ("tests/test_attention.py::test_gradcheck_sdpa",), (), 3,
        "Heads first (do -> [B, H, T, Dv]). dv = p^T do; dp = do v^T; ds = p * (dp - rowsum(dp * p));\n"
        "dq = scale * ds k; dk = scale * ds^T q; then sum dk, dv over the H/Hkv query heads sharing a "
        "kv head\nand transpose back to [B, T, H, Dk], [B, S, Hkv, Dk], [B, S, Hkv, Dv]. Masked p = 0 "
        "gives ds = 0.", "02_attention_rope",
        twins=("tinymoe/kernels/attention.py: _softmax_scores_backward_loops", "tinymoe/kernels/attention.py: sdpa_backward_fused")),
    Exercise(
        "mla-compress", "MLA compression forward: query and joint KV projections, decoupled rope key",
        ("tinymoe/layers/mla.py: _query_forward", "tinymoe/layers/mla.py: _latent_forward",
         "tinymoe/layers/mla.py: mla_forward (steps 3-4)"),
        ("tests/test_mla.py::test_forward_matches_loop_reference_f64",), ("rope",), 3,
        "Query: c_q = RMSNorm(x Wq_a^T) (q_norm, cfg.latent_norm_eps), q = c_q Wq_b^T (or x Wq^T "
        "when Dq = 0),\nper head [q_nope (Dn) | RoPE(q_pe) (Dr)]. KV: kv_a = x Wkv_a^T = [latent (Dc) "
        "| rope key (Dr)], c = RMSNorm(latent),\nk_pe = RoPE(rope key) shared by all heads; kv = c "
        "Wkv_b^T per head [k_nope | v]. DeepSeek-V2 eqs. 9-16.", "03_mla"),
    Exercise(
        "mla-absorbed", "MLA absorbed decoding over the latent cache",
        ("tinymoe/layers/mla.py: _attend_absorbed",),
        ("tests/test_mla.py::test_prefill_then_decode_equals_full_forward_f64",
         "tests/test_mla.py::test_prefill_then_decode_float32",
         "tests/test_mla.py::test_latent_cache_holds_normalised_latent_and_rotated_rope_key"),
        ("rope", "mla-compress"), 3,
        "Fold W_UK into the query: q~[t,h] = W_UK[h]^T q_nope[t,h] [B, H, T, Dc]; scores = scale * "
        "(q~ . c_u + q_pe . k_pe[u]) [B, H, T, S],\ncausal for T > 1 (causal_mask(T, S, start)); "
        "p = softmax; o_lat = p c [B, H, T, Dc]; o = W_UV[h] o_lat -> [B, T, H, Dv].\nDeepSeek-V2 "
        "2.1.2; reference/deepseek.md section 6.", "03_mla"),
    Exercise(
        "router-forward", "router scores, selection bias, group-limited top-k, normalise-then-scale",
        ("tinymoe/layers/router.py: router_forward (steps 2-8)",),
        ("tests/test_router.py::test_router_matches_explicit_loop",
         "tests/test_router.py::test_group_score_top2_sum_vs_max_and_neg_inf_mask",
         "tests/test_router.py::test_one_group_equals_plain_topk",
         "tests/test_router.py::test_bias_changes_choice_not_weights",
         "tests/test_router.py::test_k_equals_e_and_single_token"), (), 3,
        "s = sigmoid(z) or softmax(z); s_sel = s + b; with G > 1 groups score = top-2 sum (sigmoid) "
        "or max (softmax),\nkeep the best n_limited_groups, others -inf; idx = stable top-K of s_sel; "
        "w = s[idx] (UNBIASED), / sum_k if renormalize,\n* route_scale. Shapes: z [N, E] -> w, idx "
        "[N, K]. DeepSeek-V3 2.1.2 eqs. 12-16; V2 2.2.", "04_routing_collapse"),
    Exercise(
        "router-backward", "gate weights backward (normalise-then-scale, gather, score function)",
        ("tinymoe/layers/router.py: router_backward",),
        ("tests/test_router.py::test_router_gradcheck",),
        ("router-forward", "cross-entropy-backward"), 3,
        "Reverse steps 8-1: dw = rho dweights; with renormalisation draw = (dw - sum_k dw w) / denom;\n"
        "scatter draw into ds [N, E] at idx (+ dscores); dz = ds s (1 - s) (sigmoid) or "
        "softmax_backward (+ dlogits);\ndx = dz Wg, dWg = dz^T x. No gradient through idx or the bias.",
        "04_routing_collapse"),
    Exercise(
        "moe-dispatch", "MoE dispatch and combine (numba kernel bodies and their NumPy twins)",
        ("tinymoe/kernels/moe.py: moe_sort_numpy", "tinymoe/kernels/moe.py: _moe_sort_loops",
         "tinymoe/kernels/moe.py: moe_combine_numpy", "tinymoe/kernels/moe.py: _moe_combine_loops"),
        ("tests/test_moe.py::test_dispatch_combine_kernels_numba_equals_numpy",
         "tests/test_moe.py::test_moe_matches_per_token_loop",
         "tests/test_moe.py::test_one_expert_top1_equals_dense_swiglu"), ("router-forward",), 3,
        "Counting sort of the kept assignments a = t*K + k by expert (stable): order [M], pos [N*K] "
        "(-1 if dropped),\noffsets [E+1]. Combine: y[t] = sum_k w_s[p] ys[p], p = pos[t*K+k] >= 0, "
        "slots added in order k = 0..K-1.\nWrite each twice: vectorised NumPy and explicit loops "
        "(numba jits them). DeepSeekMoE 3.1-3.2.", "06_deepseekmoe"),
    Exercise(
        "balance-backward", "expert-level and sequence-wise balance-loss backward",
        ("tinymoe/layers/router.py: seq_balance_backward",),
        ("tests/test_balance.py::test_balance_loss_gradcheck[expert]",
         "tests/test_balance.py::test_balance_loss_gradcheck[seq]"), ("router-forward",), 2,
        "L = (1/B) sum_b sum_i f_bi P_bi with P_bi = mean over the T tokens of s'_i, s' = s / "
        "sum_j s_j; f is a constant.\ndsn = f (repeated per token) * dL / (B T); ds = (dsn - "
        "sum_j dsn_j sn_j) / sum_j s_j. Shapes: [N, E].\nDeepSeek-V3 eqs. 17-20; DeepSeekMoE 3.3 "
        "(the expert-level loss is one sequence of N tokens).", "05_load_balancing"),
    Exercise(
        "bias-update", "the auxiliary-loss-free bias update",
        ("tinymoe/layers/router.py: update_bias",),
        ("tests/test_balance.py::test_update_bias_moves_by_exactly_gamma",), (), 1,
        "b_i <- b_i + gamma * sign(mean_j c_j - c_i): overloaded experts down by gamma, underloaded "
        "up, at the mean unchanged.\nReturn a fresh array in bias's dtype. DeepSeek-V3 2.1.2; "
        "Wang et al. 2024 Alg. 1.", "05_load_balancing"),
    Exercise(
        "mtp", "the MTP module forward/backward wiring",
        ("tinymoe/model.py: Model._mtp_forward", "tinymoe/model.py: Model._mtp_backward"),
        ("tests/test_model.py::test_mtp_does_not_change_main_logits_and_is_causal",
         "tests/test_model.py::test_mtp_loss_term_is_weighted_cross_entropy_of_shifted_targets",
         "tests/test_model.py::test_gradcheck_whole_model_moe_mtp_balance"), _MODEL_PREREQS, 4,
        "Depth k: h' = eh_proj [enorm(Emb(t[k:])) ; hnorm(h_prev[:, :T-k])] (embedding half FIRST), "
        "hk = Block(h'),\nlogits = head(norm(hk)) with the SHARED embed and head. Backward: reverse, "
        "adding into the shared grads and\ninto dhk from the next depth. DeepSeek-V3 2.2 eq. 21-23; "
        "reference/kits.md section 4 (concat order).", "07_tiny_deepseek_v3"),
    Exercise(
        "grpo", "GRPO group advantages and the clipped objective's backward",
        ("tinymoe/grpo/objective.py: group_advantages", "tinymoe/grpo/objective.py: grpo_loss_backward"),
        ("tests/test_grpo.py::test_group_advantages_closed_form",
         "tests/test_grpo.py::test_identical_rewards_give_exactly_zero_advantages_and_gradient",
         "tests/test_grpo.py::test_grpo_loss_gradcheck_clip_inactive_with_kl",
         "tests/test_grpo.py::test_grpo_loss_gradcheck_clip_active",
         "tests/test_grpo.py::test_grpo_loss_gradcheck_variants",
         "tests/test_grpo.py::test_grpo_loss_gradient_zero_where_masked"), (), 4,
        "A = (r - mean_g r) / (std_g r + eps) (ddof 1 for 'sample'), exactly 0 for a constant "
        "group. Backward to l_it, with dobj = -w_i m_it / M:\ndl = dobj * (rho A where the "
        "unclipped branch is the min, 0 where the clip binds) - beta dobj (1 - exp(l_ref - l));\n"
        "then token_logprobs_backward. Shapes [M, L]. DeepSeekMath 4.1; the module docstring.", "08_grpo"),
)

BY_ID = {e.id: e for e in EXERCISES}


def get(exercise_id: str) -> Exercise:
    """The exercise with this id; KeyError listing the known ids otherwise."""
    try:
        return BY_ID[exercise_id]
    except KeyError:
        raise KeyError(f"exercise {exercise_id!r}: unknown; known exercises are "
                       f"{', '.join(BY_ID)}") from None


def select(spec: str | None) -> Tuple[Exercise, ...]:
    """'all' / None / 'id,id,...' -> the exercises in catalogue order (ValueError on an unknown id)."""
    if spec is None or spec.strip() == "all":
        return EXERCISES
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [i for i in ids if i not in BY_ID]
    if unknown or not ids:
        raise ValueError(f"--exercises: {','.join(unknown) or spec!r} is not a known exercise id; "
                         f"known: {','.join(BY_ID)}")
    return tuple(e for e in EXERCISES if e.id in ids)


def hidden_file(exercise_id: str) -> str:
    """The hidden-test file of an exercise, relative to the project root."""
    return f"tests/hidden/test_hidden_{exercise_id.replace('-', '_')}.py"


def exercises_of_test(nodeid: str) -> Tuple[str, ...]:
    """Ids of the exercises that a test (project-relative node id, params allowed) grades."""
    out = [e.id for e in EXERCISES if any(_matches(nodeid, t) for t in e.tests)]
    base = nodeid.split("::", 1)[0]
    out += [e.id for e in EXERCISES if hidden_file(e.id) == base and e.id not in out]
    return tuple(out)


def _matches(nodeid: str, entry: str) -> bool:
    """A catalogue entry names this node: the same id, or its function with any parameters."""
    return nodeid == entry or (nodeid.startswith(entry + "[") and "[" not in entry)

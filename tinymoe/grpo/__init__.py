"""GRPO, model-independent: toy tasks with rule-based rewards and the clipped, KL-regularised objective.

    tasks.py      vocabulary, AdditionTask / SortTask, make_prompts, reward(s), response_mask,
                  sft_examples (warm-start data)
    objective.py  GRPOConfig (+ variants grpo / dr_grpo / dapo), group_advantages,
                  token_logprobs(_forward/_backward), grpo_loss, grpo_loss_backward

Group Relative Policy Optimisation ([MATH] DeepSeekMath §4.1, [R1] §2.1) drops PPO's value
network: the baseline of a response is the mean reward of the G responses sampled for the same
prompt, A_i = (r_i - mean r) / std r, and every token of response i gets A_i.

How a training loop uses this module. Model side (tinymoe/model.py, tinymoe/generate.py):
Model(cfg, seed, dtype) with .params, .forward(tokens) -> logits [B, T, V],
.forward_train(tokens, mtp=False) -> (logits, mtp_logits, cache), .backward(dlogits, cache, daux=)
-> grads; generate(model, prompt_tokens, max_new_tokens, temperature, top_k, seed). Build the
model with cfg.vocab_size = grpo.VOCAB_SIZE and max_seq_len >= task.prompt_len + R.

    from tinymoe import grpo
    task, C = grpo.AdditionTask(), grpo.GRPOConfig.grpo(group_size=8, beta=0.04)
    Tp, R = task.prompt_len, C.max_new_tokens or task.max_response_len
    # 0. warm start (optional, partial on purpose):
    #    x, y = grpo.sft_examples(task, 2048, "train", rng, subset=lambda p: p[1] % 10 <= 4)
    #    a few hundred steps of model.loss_and_grads(x, y) + Adam.
    # 1. ref_model = a frozen copy of the model (refresh every C.ref_update_every steps, if set)
    for step in range(n_steps):
        # 2. sample G responses per prompt (row m = p*G + g) at temperature C.temperature (1.0)
        prompts = grpo.make_prompts(task, C.prompts_per_step, "train", rng)       # [P, Tp]
        rep = np.repeat(prompts, C.group_size, axis=0)                            # [M, Tp]
        seqs = generate(model, rep, R, C.temperature, C.top_k, seed=step)         # [M, Tp+R]
        resp = seqs[:, Tp:]                                                       # [M, R]
        mask = grpo.response_mask(resp)                                           # [M, R] to 1st EOS
        # 3. rewards, advantages, optional DAPO filter
        r = grpo.rewards(task, rep, resp).reshape(-1, C.group_size)               # [P, G]
        adv = C.advantages(r)                                                     # [P, G]
        keep = ~grpo.zero_variance_groups(r) if C.drop_zero_variance_groups else np.ones(len(r), bool)
        rows = np.repeat(keep, C.group_size)                                      # [M] bool
        seqs, resp, mask, adv = seqs[rows], resp[rows], mask[rows], adv[keep].reshape(-1)
        # 4. old and reference log-probs, once per batch, no gradient. Inputs seqs[:, :-1]; the
        #    logits at positions Tp-1 .. Tp+R-2 predict the R response tokens.
        x = seqs[:, :-1]
        old = grpo.token_logprobs(model.forward(x)[:, Tp - 1:], resp, C.temperature)      # [M, R]
        ref = (grpo.token_logprobs(ref_model.forward(x)[:, Tp - 1:], resp, C.temperature)
               if C.beta > 0 else None)
        # 5. mu = C.updates_per_batch updates on this batch (with mu = 1: rho == 1, no clipping)
        for _ in range(C.updates_per_batch):
            logits, _, fcache = model.forward_train(x, mtp=False)                 # [M, Tp+R-1, V]
            loss, stats, cache = grpo.grpo_loss(logits[:, Tp - 1:], resp, mask, old, ref, adv,
                                                **C.loss_kwargs())
            dlogits = np.zeros_like(logits)
            dlogits[:, Tp - 1:] = grpo.grpo_loss_backward(cache)                  # prompt: no grad
            grads = model.backward(dlogits, fcache, daux=...)                     # then Adam, lr C.lr
        # log: r.mean(), grpo.zero_variance_groups(r).mean(), stats["kl"], stats["clip_fraction"]
        # (exactly 0 when mu = 1), stats["ratio"], stats["mean_length"]

Notes for the loop:
* Compute old log-probs with the same full forward the loss uses (as above), not with
  generate(..., return_logprobs=True): that comes from the cached decode path in float64, so
  rho would differ from 1 by rounding, clip_fraction would not be exactly 0 at mu = 1, and
  grpo_loss refuses float64 old log-probs next to float32 logits (no silent dtype mixing).
* old_logprobs belong to the network that sampled, before any update of this batch, at the
  same temperature; the reference model never changes between refreshes.
* Tokens after the first EOS are masked out (their ids only need to be valid). A response
  without EOS keeps its whole mask and gets reward 0. Keep R fixed across steps so Dr. GRPO's
  constant normaliser (max_len = R) stays constant.
"""
from tinymoe.grpo.objective import (
    GRPOCache,
    GRPOConfig,
    TokenLogprobCache,
    group_advantages,
    grpo_loss,
    grpo_loss_backward,
    token_logprobs,
    token_logprobs_backward,
    token_logprobs_forward,
    zero_variance_groups,
)
from tinymoe.grpo.tasks import (
    ARROW,
    BOS,
    COMMA,
    EOS,
    EQUALS,
    IGNORE_INDEX,
    PAD,
    PLUS,
    VOCAB_SIZE,
    AdditionTask,
    SortTask,
    decode,
    encode,
    make_prompts,
    response_mask,
    reward,
    rewards,
    sample_problems,
    sft_examples,
)

__all__ = [
    "GRPOCache", "GRPOConfig", "TokenLogprobCache", "group_advantages", "grpo_loss",
    "grpo_loss_backward", "token_logprobs", "token_logprobs_backward", "token_logprobs_forward",
    "zero_variance_groups", "ARROW", "BOS", "COMMA", "EOS", "EQUALS", "IGNORE_INDEX", "PAD", "PLUS",
    "VOCAB_SIZE", "AdditionTask", "SortTask", "decode", "encode", "make_prompts", "response_mask",
    "reward", "rewards", "sample_problems", "sft_examples",
]

# the training loop (warm start + RL steps, checkpoints); `python -m tinymoe.grpo` is its CLI
from tinymoe.grpo.loop import (  # noqa: E402
    LOG_FIELDS,
    GRPOTrainingError,
    RunConfig,
    copy_model,
    greedy_correct,
    heldout_prompts,
    load_grpo_checkpoint,
    rl_step,
    save_grpo_checkpoint,
    train_grpo,
    warm_start,
)

__all__ += ["LOG_FIELDS", "GRPOTrainingError", "RunConfig", "copy_model", "greedy_correct",
            "heldout_prompts", "load_grpo_checkpoint", "rl_step", "save_grpo_checkpoint",
            "train_grpo", "warm_start"]

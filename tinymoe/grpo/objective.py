"""The GRPO objective with its backward by hand down to the logits ([MATH] §4.1, [R1] §2.1).

Shape letters: P prompts, G responses per prompt (the group), M = P*G sequences (row m = p*G + g:
each prompt's G responses are consecutive, as np.repeat(prompts, G, axis=0) lays them out),
L response positions (padded), V vocab.

    A_i      = (r_i - mean_g r) / (std_g r + eps)                group-relative advantage
    l_it     = log softmax(z_it / tau)[o_it]                      token log-prob (tau: temperature)
    rho_it   = exp(l_it - l_old_it)                               ratio to the sampling policy
    s_it     = min(rho_it A_i, clip(rho_it, 1 - eps_lo, 1 + eps_hi) A_i)   PPO clipped surrogate
    kl_it    = exp(l_ref_it - l_it) - (l_ref_it - l_it) - 1      k3 estimator of KL(pi || pi_ref), >= 0
    J        = (1/M) sum_i w_i sum_t m_it (s_it - beta kl_it)     objective to MAXIMISE
    loss     = -J
    w_i      = 1 / |o_i|        (length_norm=True: GRPO, TRL loss_type="grpo")
             = 1 / max_len      (length_norm=False: Dr. GRPO, one constant for every sequence)

Backward (d loss / d l_it; the ratio's derivative is d rho / d l = rho):
    surrogate:  -w_i m_it rho_it A_i / M   where the unclipped branch is the min, 0 where the clip binds
                (A > 0 and rho > 1 + eps_hi, or A < 0 and rho < 1 - eps_lo)
    KL:         +w_i m_it beta (1 - exp(l_ref_it - l_it)) / M
and d l_it / d z_itv = (onehot(o_it)_v - softmax(z_it / tau)_v) / tau.

Conventions (deepseek.md §14 item 24):
* std: "sample" = Bessel-corrected (ddof=1), as TRL (torch.std) computes it, plus eps = 1e-4
  added to the std (not under the square root). "population" (ddof=0) is the other common choice.
  A group whose rewards are all equal gets advantages of exactly 0.0 (not ~1e-17).
* KL is a loss term (not folded into the reward), k3 form from log-probs as in TRL.
* Ratio per token (DeepSeekMath), not per sequence (R1 writes it per sequence).
* With one update per sampled batch (mu = 1) old_logprobs equal the current log-probs, rho == 1
  exactly, the clip never binds and clip_fraction is exactly 0.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import NamedTuple, Optional

import numpy as np

from tinymoe.checks import check_float, check_same_dtype, check_shape, check_tokens

STD_CONVENTIONS = ("sample", "population")


# ================================================================================================
# configuration and its variants
# ================================================================================================

@dataclass(frozen=True)
class GRPOConfig:
    """Every GRPO knob in one place; GRPOConfig.grpo() / .dr_grpo() / .dapo() are the variants.

    Objective (grpo_loss):
      clip_eps       0.2    PPO clip range [1 - clip_eps, 1 + clip_eps_high]. Only matters when
                            updates_per_batch > 1 (with one update rho == 1). R1 used 10.
      clip_eps_high  None   upper clip (None = clip_eps). DAPO "clip-higher" uses 0.28: a larger
                            upper bound lets low-probability tokens that turned out good grow
                            faster, against entropy collapse.
      beta           0.04   weight of the k3 KL to the frozen reference (DeepSeekMath 0.04,
                            R1-Zero 0.001, DAPO and Dr. GRPO 0). 0 needs no reference model.
      length_norm    True   GRPO's 1/|o_i| per sequence. Dr. GRPO sets False: with 1/|o_i| a
                            long response's tokens each get a smaller push, so a long WRONG answer
                            is penalised less per token than a short one (and a short right one is
                            rewarded more) - the objective drifts towards long wrong answers.
                            False uses one constant 1/max_len for every sequence.
      max_len        None   the constant for length_norm=False (None = the batch's padded length L;
                            keep L fixed, e.g. max_new_tokens, so the constant does not move).
      temperature    1.0    sampling temperature; logits are divided by it in the loss as in
                            sampling (TRL), so old/ref log-probs must use the same tau.
    Advantages (GRPOConfig.advantages):
      std_normalise  True   divide by the group std. Dr. GRPO sets False: dividing by std gives
                            groups that are almost all right or all wrong (tiny std: too easy or
                            too hard questions) a large weight - a difficulty bias.
      std            "sample"  Bessel-corrected (TRL) or "population".
      adv_eps        1e-4   added to the std (TRL).
      drop_zero_variance_groups  False  DAPO dynamic sampling: a group whose rewards are all equal
                            (all right or all wrong) has zero advantages, contributes no policy
                            gradient (only KL) and shrinks the effective batch; drop it (DAPO also
                            samples more prompts until the batch is full).
    Loop (read by the training loop, not by this module):
      group_size G 8, prompts_per_step 32, updates_per_batch (mu) 1, lr 3e-3 (Adam; tiny
      from-scratch models need ~1e-3, not LLM-scale 1e-6), top_k None, max_new_tokens None
      (None = task.max_response_len), ref_update_every None (R1 refreshed pi_ref every 400 steps).
    """
    clip_eps: float = 0.2
    clip_eps_high: Optional[float] = None
    beta: float = 0.04
    length_norm: bool = True
    max_len: Optional[int] = None
    temperature: float = 1.0
    std_normalise: bool = True
    std: str = "sample"
    adv_eps: float = 1e-4
    drop_zero_variance_groups: bool = False
    group_size: int = 8
    prompts_per_step: int = 32
    updates_per_batch: int = 1
    lr: float = 3e-3
    top_k: Optional[int] = None
    max_new_tokens: Optional[int] = None
    ref_update_every: Optional[int] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> "GRPOConfig":
        def need(ok, field, rule):
            if not ok:
                raise ValueError(f"GRPOConfig.{field}: {getattr(self, field)!r} {rule}")
        for field in ("clip_eps", "beta", "temperature", "adv_eps", "lr"):   # inf/NaN pass > and >=
            need(np.isfinite(float(getattr(self, field))), field, "must be a finite number")
        need(self.clip_eps_high is None or np.isfinite(float(self.clip_eps_high)), "clip_eps_high",
             "must be a finite number or None")
        need(self.clip_eps > 0, "clip_eps", "must be > 0")
        need(self.clip_eps_high is None or self.clip_eps_high > 0, "clip_eps_high", "must be > 0 or None")
        need(self.beta >= 0, "beta", "must be >= 0")
        need(self.max_len is None or self.max_len >= 1, "max_len", "must be >= 1 or None")
        need(self.temperature > 0, "temperature", "must be > 0")
        need(self.std in STD_CONVENTIONS, "std", f"must be one of {STD_CONVENTIONS}")
        need(self.adv_eps >= 0, "adv_eps", "must be >= 0")
        need(self.group_size >= 2, "group_size", "must be >= 2 (a group of 1 has no baseline)")
        need(self.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
        need(self.updates_per_batch >= 1, "updates_per_batch", "must be >= 1")
        need(self.lr > 0, "lr", "must be > 0")
        need(self.top_k is None or self.top_k >= 1, "top_k", "must be >= 1 or None")
        need(self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1 or None")
        need(self.ref_update_every is None or self.ref_update_every >= 1, "ref_update_every",
             "must be >= 1 or None")
        return self

    # ---- variants -------------------------------------------------------------------------------
    @classmethod
    def grpo(cls, **kw) -> "GRPOConfig":
        """DeepSeekMath GRPO as TRL implements it: std-normalised advantages, 1/|o_i|, beta 0.04."""
        return cls(**kw)

    @classmethod
    def dr_grpo(cls, **kw) -> "GRPOConfig":
        """Dr. GRPO (Liu et al. 2025): no std normalisation, no 1/|o_i| (constant max_len), beta 0."""
        return cls(**{"std_normalise": False, "length_norm": False, "beta": 0.0, **kw})

    @classmethod
    def dapo(cls, **kw) -> "GRPOConfig":
        """DAPO (Yu et al. 2025): drop zero-variance groups, clip-higher 0.28, beta 0.

        DAPO also averages over all tokens of the batch (token-level loss); this module offers
        GRPO's per-sequence mean and Dr. GRPO's constant instead (see grpo_loss's length_norm).
        """
        return cls(**{"drop_zero_variance_groups": True, "clip_eps_high": 0.28, "beta": 0.0, **kw})

    def replace(self, **kw) -> "GRPOConfig":
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    # ---- helpers the loop calls -----------------------------------------------------------------
    def advantages(self, rewards: np.ndarray) -> np.ndarray:
        """[P, G] rewards -> [P, G] advantages with this config's std convention."""
        return group_advantages(rewards, scale_std=self.std_normalise, eps=self.adv_eps, std=self.std)

    def loss_kwargs(self) -> dict:
        """The keyword arguments of grpo_loss that this config sets."""
        return dict(clip_eps=self.clip_eps, clip_eps_high=self.clip_eps_high, beta=self.beta,
                    length_norm=self.length_norm, max_len=self.max_len,
                    temperature=self.temperature)


# ================================================================================================
# group-relative advantages
# ================================================================================================

def group_advantages(rewards: np.ndarray, scale_std: bool = True, eps: float = 1e-4,
                     std: str = "sample") -> np.ndarray:
    """[P, G] -> [P, G]:  A = (r - mean_g r) / (std_g r + eps)   (or r - mean when scale_std=False).

    std="sample": Bessel-corrected std (ddof=1, TRL / torch.std); "population": ddof=0.
    A group whose G rewards are all equal (zero variance) gets exactly 0.0. Returns float64.
    [MATH] §4.1.2 outcome supervision: every token of o_i gets the same A_i.
    """
    r = np.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards: expected 2 dimensions [P, G], got shape {r.shape}")
    if not np.issubdtype(r.dtype, np.number) or not np.all(np.isfinite(r)):
        raise ValueError("rewards: must be finite numbers")
    if std not in STD_CONVENTIONS:
        raise ValueError(f"std: {std!r} is not one of {STD_CONVENTIONS}")
    if eps < 0:
        raise ValueError(f"eps: {eps} must be >= 0")
    # BEGIN EXERCISE grpo
    r = r.astype(np.float64)
    P, G = r.shape
    constant = np.ptp(r, axis=1) == 0 if G else np.ones(P, bool)   # [P] zero-variance groups
    a = r - r.mean(axis=1, keepdims=True)                          # [P, G]
    if scale_std:
        ddof = 1 if std == "sample" else 0
        s = r.std(axis=1, ddof=ddof, keepdims=True) if G > ddof else np.zeros((P, 1))
        denom = s + eps
        a = np.divide(a, denom, out=np.zeros_like(a), where=denom > 0)
    a[constant] = 0.0                                              # exact zeros, no rounding residue
    return a
    # END EXERCISE


def zero_variance_groups(rewards: np.ndarray) -> np.ndarray:
    """[P, G] -> [P] bool: True where every reward of the group is equal (no learning signal)."""
    r = np.asarray(rewards)
    if r.ndim != 2:
        raise ValueError(f"rewards: expected 2 dimensions [P, G], got shape {r.shape}")
    return np.ptp(r, axis=1) == 0


# ================================================================================================
# token log-probabilities
# ================================================================================================

class TokenLogprobCache(NamedTuple):
    p: np.ndarray          # [M, L, V] softmax(logits / temperature)
    tokens: np.ndarray     # [M, L]    the scored token ids
    temperature: float     # tau


def token_logprobs_forward(logits: np.ndarray, tokens: np.ndarray, temperature: float = 1.0):
    """[M, L, V], [M, L] int -> ([M, L], cache):  l = log softmax(logits / tau)[tokens]."""
    check_float("logits", logits, ndim=3)
    check_tokens("tokens", tokens, logits.shape[2], ndim=2)
    check_shape("tokens", tokens, logits.shape[:2])
    if not temperature > 0:
        raise ValueError(f"temperature: {temperature} must be > 0")
    # 1. scaled logits, row max subtracted (stable log-sum-exp)
    z = logits / logits.dtype.type(temperature) if temperature != 1.0 else logits
    z = z - z.max(axis=-1, keepdims=True)                          # [M, L, V]
    lse = np.log(np.exp(z).sum(axis=-1, keepdims=True))            # [M, L, 1]
    logp_all = z - lse                                             # [M, L, V] log-softmax
    # 2. pick the sampled token
    logp = np.take_along_axis(logp_all, tokens[..., None], axis=-1)[..., 0]   # [M, L]
    return logp, TokenLogprobCache(np.exp(logp_all), tokens, float(temperature))


def token_logprobs_backward(dlogp: np.ndarray, cache: TokenLogprobCache) -> np.ndarray:
    """[M, L] -> dlogits [M, L, V]:  dz = dl * (onehot(token) - p) / tau."""
    p, tokens, tau = cache
    # forward: l = log_softmax(z / tau)[token]  ->  dl/dz_v = (onehot_v - p_v) / tau
    dlogits = -p * dlogp[..., None]                                # [M, L, V]
    picked = np.take_along_axis(dlogits, tokens[..., None], axis=-1) + dlogp[..., None]
    np.put_along_axis(dlogits, tokens[..., None], picked, axis=-1)
    if tau != 1.0:
        dlogits /= p.dtype.type(tau)
    return dlogits


def token_logprobs(logits: np.ndarray, tokens: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """[M, L, V], [M, L] -> [M, L] log-probs, no cache (for old / reference log-probs)."""
    return token_logprobs_forward(logits, tokens, temperature)[0]


# ================================================================================================
# the GRPO loss
# ================================================================================================

class GRPOCache(NamedTuple):
    lp: TokenLogprobCache  # log-prob cache (softmax [M, L, V], tokens, tau)
    mask: np.ndarray       # [M, L] bool, response tokens that count
    ratio: np.ndarray      # [M, L] rho = exp(l - l_old) (1 where masked out)
    unclipped: np.ndarray  # [M, L] bool, the unclipped branch rho*A is the min (gradient flows)
    adv: np.ndarray        # [M]    advantages, logits dtype
    ref_ratio: np.ndarray  # [M, L] exp(l_ref - l) (1 where masked out or beta == 0)
    weight: np.ndarray     # [M]    w_i / M: 1/(M |o_i|) or 1/(M max_len)
    beta: float            # KL weight


def _mask_bool(mask: np.ndarray, shape) -> np.ndarray:
    if not isinstance(mask, np.ndarray):
        raise TypeError(f"mask: expected a numpy array, got {type(mask).__name__}")
    check_shape("mask", mask, shape)
    if mask.dtype != bool:
        if not np.all((mask == 0) | (mask == 1)):
            raise ValueError("mask: entries must be 0/1 (or bool)")
        mask = mask != 0
    return mask


def grpo_loss(logits: np.ndarray, tokens: np.ndarray, mask: np.ndarray,
              old_logprobs: np.ndarray, ref_logprobs: Optional[np.ndarray], advantages: np.ndarray,
              clip_eps: float = 0.2, beta: float = 0.04, length_norm: bool = True, *,
              clip_eps_high: Optional[float] = None, max_len: Optional[int] = None,
              temperature: float = 1.0):
    """[M, L, V], [M, L] int, [M, L], [M, L], [M, L] | None, [M] -> (loss float, stats dict, cache).

    logits: the policy's logits at the positions that PREDICT the response tokens (for a model
    run on prompt+response of length Tp+L: logits[:, Tp-1:Tp-1+L]); tokens: the response tokens
    o_it; mask: 1 on real response tokens (response_mask), 0 on padding; old_logprobs: log-probs
    under the sampling policy (computed once per batch, no gradient); ref_logprobs: under the
    frozen reference (may be None when beta == 0); advantages: one A_i per sequence.
    The loss is -J (module docstring); `grpo_loss_backward(cache)` gives d loss / d logits.

    stats (Python floats over masked tokens): loss, surrogate (mean s), kl (mean k3 KL),
    ratio (mean rho), ratio_min, ratio_max, clip_fraction (share where the clip binds and the
    gradient is cut: A > 0 and rho > 1+eps_hi, or A < 0 and rho < 1-eps_lo), clip_low,
    clip_high, n_tokens, mean_length.
    """
    check_float("logits", logits, ndim=3)
    M, L, V = logits.shape
    check_float("old_logprobs", old_logprobs)
    check_shape("old_logprobs", old_logprobs, (M, L))
    if ref_logprobs is None:
        if beta != 0:
            raise ValueError(f"ref_logprobs: None is only allowed with beta == 0 (beta={beta})")
    else:
        check_float("ref_logprobs", ref_logprobs)
        check_shape("ref_logprobs", ref_logprobs, (M, L))
        check_same_dtype(("logits", "ref_logprobs"), logits, ref_logprobs)
    check_same_dtype(("logits", "old_logprobs"), logits, old_logprobs)
    mask = _mask_bool(mask, (M, L))
    adv = np.asarray(advantages)
    if adv.shape != (M,) or not np.issubdtype(adv.dtype, np.number):
        raise ValueError(f"advantages: expected shape [{M}] (one per sequence), got {list(adv.shape)}")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps: {clip_eps} must be > 0")
    eps_lo, eps_hi = float(clip_eps), float(clip_eps if clip_eps_high is None else clip_eps_high)
    if not eps_hi > 0:
        raise ValueError(f"clip_eps_high: {clip_eps_high} must be > 0")
    if beta < 0:
        raise ValueError(f"beta: {beta} must be >= 0")
    if max_len is not None and max_len < L:
        raise ValueError(f"max_len: {max_len} is shorter than the response length L={L}")
    dt = logits.dtype.type
    adv = adv.astype(logits.dtype)

    # 1. token log-probs of the response under the current policy
    logp, lp_cache = token_logprobs_forward(logits, tokens, temperature)      # [M, L]
    # 2a. ratio and clipped surrogate (masked-out positions: difference set to 0, rho = 1)
    ratio = np.exp(np.where(mask, logp - old_logprobs, 0).astype(logits.dtype))   # [M, L]
    A = adv[:, None]                                                            # [M, 1]
    clipped_ratio = np.clip(ratio, dt(1.0 - eps_lo), dt(1.0 + eps_hi))          # [M, L]
    surr = np.minimum(ratio * A, clipped_ratio * A)                             # [M, L]
    clip_high = (A > 0) & (ratio > 1.0 + eps_hi)                                # [M, L]
    clip_low = (A < 0) & (ratio < 1.0 - eps_lo)                                 # [M, L]
    unclipped = ~(clip_high | clip_low)                                         # [M, L]
    # 2b. k3 KL to the reference
    if ref_logprobs is None:
        d_ref = np.zeros_like(logp)
    else:
        d_ref = np.where(mask, ref_logprobs - logp, 0).astype(logits.dtype)     # [M, L]
    ref_ratio = np.exp(d_ref)                                                   # [M, L]
    kl = ref_ratio - d_ref - 1.0                                                # [M, L]
    # 3. per-token objective
    obj = surr - dt(beta) * kl                                                  # [M, L]
    # 4. per-sequence weights and the mean over sequences
    lengths = mask.sum(axis=1)                                                  # [M]
    if length_norm:
        w = 1.0 / np.maximum(lengths, 1)                                        # GRPO: 1/|o_i|
    else:
        w = np.full(M, 1.0 / (L if max_len is None else max_len))               # Dr. GRPO
    weight = (w / max(M, 1)).astype(logits.dtype)                               # [M]
    per_seq = np.where(mask, obj, 0).sum(axis=1)                                # [M]
    loss = -float(np.sum(weight.astype(np.float64) * per_seq))

    n_tok = int(mask.sum())

    def mmean(x):
        return float(x[mask].mean(dtype=np.float64)) if n_tok else 0.0
    stats = dict(loss=loss, surrogate=mmean(surr), kl=mmean(kl), ratio=mmean(ratio),
                 ratio_min=float(ratio[mask].min()) if n_tok else 1.0,
                 ratio_max=float(ratio[mask].max()) if n_tok else 1.0,
                 clip_fraction=mmean(~unclipped), clip_low=mmean(clip_low),
                 clip_high=mmean(clip_high), n_tokens=n_tok,
                 mean_length=float(lengths.mean()) if M else 0.0)
    cache = GRPOCache(lp_cache, mask, ratio, unclipped, adv, ref_ratio, weight, float(beta))
    return loss, stats, cache


def grpo_loss_backward(cache: GRPOCache, dloss: float = 1.0) -> np.ndarray:
    """cache -> dlogits [M, L, V] = dloss * d loss / d logits; exactly 0 where mask is 0."""
    lp, mask, ratio, unclipped, adv, ref_ratio, weight, beta = cache
    # BEGIN EXERCISE grpo
    dt = ratio.dtype.type
    # 4. forward: loss = -sum_i weight_i sum_t mask_it obj_it
    dobj = -(dt(dloss) * weight[:, None]) * mask                               # [M, L]
    # 3. forward: obj = surr - beta * kl
    dsurr = dobj                                                                # [M, L]
    dkl = -dt(beta) * dobj                                                      # [M, L]
    # 2b. forward: kl = exp(l_ref - l) - (l_ref - l) - 1   ->  dkl/dl = 1 - exp(l_ref - l)
    dlogp = dkl * (1.0 - ref_ratio)                                             # [M, L]
    # 2a. forward: surr = min(rho A, clip(rho) A), rho = exp(l - l_old)  ->  rho A or 0 (clip binds)
    dlogp = dlogp + dsurr * np.where(unclipped, ratio * adv[:, None], 0)        # [M, L]
    # 1. forward: l = log_softmax(logits / tau)[tokens]
    return token_logprobs_backward(dlogp.astype(ratio.dtype), lp)
    # END EXERCISE

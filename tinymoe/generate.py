"""Generation with the MLA latent cache: greedy, temperature and top-k sampling, and MTP
self-speculative decoding.

Cached decoding runs the prompt once (prefill), then one token at a time; each attention layer
keeps only its compressed cache (MLA: the normalised latent and the rotated rope key per token,
reference/deepseek.md section 6), so step t costs O(t) instead of recomputing O(t^2).

Self-speculative decoding with the MTP module (DeepSeek-V3 section 5.4.3 evaluates MTP this way):
the main model has just produced greedy token x_{p+1} from position p; MTP depth 1 reads the main
hidden state h_p and Emb(x_{p+1}) and drafts x_{p+2}. The main model then runs on both tokens in
one cached call: its prediction at p+1 verifies the draft. Accepted: two tokens for one main call
(and its prediction at p+2 comes for free). Rejected: the draft's cache entry is rolled back and
the main model's own token is used. Either way the output equals plain greedy decoding, token
for token; the acceptance rate says how often the MTP head guessed right.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

from tinymoe.layers.basic import embedding_forward, swiglu_forward
from tinymoe.layers.norm import rmsnorm_forward
from tinymoe.model import Model, _sub


class InferenceState:
    """Per-layer attention caches of a batch being decoded, plus the positions fed so far."""

    def __init__(self, model: Model, batch: int):
        cfg = model.config
        if cfg.attn_type == "mla":
            from tinymoe.layers.mla import LatentKVCache as Cache
        else:
            from tinymoe.layers.attention import KVCache as Cache
        self.caches = [Cache(cfg, batch, model.dtype) for _ in range(cfg.n_layers)]
        self.batch = batch

    @property
    def length(self) -> int:
        return self.caches[0].length

    def rollback(self, n: int) -> None:
        """Forget the last n positions (their cache rows are overwritten by the next call)."""
        for c in self.caches:
            c.length -= n


def _check_count(name: str, value, minimum: int) -> int:
    """An int (not a bool, not 2.5) >= minimum; returns it as a Python int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} = {value!r}: must be an integer >= {minimum}")
    return int(value)


def _check_prompt(prompt_tokens) -> tuple:
    """prompt [T0] or [B, T0] integer tokens -> ([B, T0] int64, squeeze); B, T0 >= 1."""
    prompt = np.asarray(prompt_tokens)
    if not np.issubdtype(prompt.dtype, np.integer):
        raise TypeError(f"prompt_tokens: dtype {prompt.dtype} is not an integer dtype")
    squeeze = prompt.ndim == 1
    prompt = prompt[None, :] if squeeze else prompt
    if prompt.ndim != 2 or 0 in prompt.shape:
        raise ValueError(f"prompt_tokens: expected a non-empty [T0] or [B, T0] array, got shape "
                         f"{list(np.shape(prompt_tokens))}")
    return prompt.astype(np.int64), squeeze


def _inference_cfg(model: Model):
    # Generation is dropless (V3 2.1.2, "No Token-Dropping"), whatever the training capacity.
    cfg = model.config
    return cfg if cfg.capacity_factor is None else cfg.replace(capacity_factor=None)


def _ffn(model: Model, cfg, prefix: str, x: np.ndarray, moe: bool, bias_name: str) -> np.ndarray:
    from tinymoe.layers.moe import moe_forward
    B, T, D = x.shape
    p = _sub(model.params, f"{prefix}.ffn")
    if moe:
        y, _, _ = moe_forward(x.reshape(B * T, D), p, model.buffers[bias_name], cfg, T)
    else:
        y, _ = swiglu_forward(x.reshape(B * T, D), p["w1"], p["w2"], p["w3"])
    return y.reshape(B, T, D)


def forward_cached(model: Model, tokens: np.ndarray, state: InferenceState):
    """[B, T] new tokens at positions state.length.. -> (logits [B, T, V], hidden [B, T, D]).

    `hidden` is the last block's output before the final norm (what MTP depth 1 reads).
    """
    cfg = _inference_cfg(model)
    P = model.params
    if cfg.attn_type == "mla":
        from tinymoe.layers.mla import mla_decode as attn_decode
    else:
        from tinymoe.layers.attention import mha_decode as attn_decode
    model._check_tokens(tokens)
    if tokens.shape[0] != state.batch:
        raise ValueError(f"tokens: batch {tokens.shape[0]} differs from the cache's {state.batch}")
    h, _ = embedding_forward(tokens, P["embed"])                                   # [B, T, D]
    for l in range(cfg.n_layers):
        pre = f"layers.{l}"
        x1, _ = rmsnorm_forward(h, P[f"{pre}.attn_norm"], cfg.norm_eps)
        h = h + attn_decode(x1, _sub(P, f"{pre}.attn"), cfg, state.caches[l])
        x2, _ = rmsnorm_forward(h, P[f"{pre}.ffn_norm"], cfg.norm_eps)
        h = h + _ffn(model, cfg, pre, x2, cfg.is_moe_layer(l), f"{pre}.ffn.gate.bias")
    hn, _ = rmsnorm_forward(h, P["norm"], cfg.norm_eps)
    return hn @ P["head"].T, h


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _pick(logits: np.ndarray, temperature: float, top_k: Optional[int],
          rng: np.random.Generator) -> np.ndarray:
    """[B, V] -> [B] next tokens: argmax at temperature 0, else a sample of softmax(z / temperature)
    restricted to the top_k largest logits (ties at the k-th value are kept)."""
    if temperature == 0.0:
        return np.argmax(logits, axis=-1)
    z = logits.astype(np.float64) / temperature
    if top_k is not None and top_k < z.shape[-1]:
        kth = np.sort(z, axis=-1)[:, -top_k][:, None]
        z = np.where(z >= kth, z, -np.inf)
    p = np.exp(_log_softmax(z))
    u = rng.random(z.shape[0])                                  # one uniform per row, in order
    return np.minimum((np.cumsum(p, axis=-1) < u[:, None]).sum(axis=-1), z.shape[-1] - 1)


def generate(model: Model, prompt_tokens, max_new_tokens: int, temperature: float = 0.0,
             top_k: Optional[int] = None, seed: int = 0, return_logprobs: bool = False):
    """[B, T0] (or [T0]) prompt -> [B, T0 + max_new_tokens] tokens (same rank as the prompt).

    temperature 0 is greedy; otherwise softmax(logits / temperature) sampling, optionally among
    the top_k logits, with np.random.default_rng(seed). With return_logprobs also returns
    [B, max_new_tokens]: log p(token) of each generated token under the model's own distribution
    (temperature 1, no top-k), which is what GRPO's ratio needs.
    """
    prompt, squeeze = _check_prompt(prompt_tokens)
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not 0 <= temperature < np.inf:
        raise ValueError(f"temperature = {temperature!r}: must be a finite number >= 0")
    if top_k is not None:
        top_k = _check_count("top_k", top_k, 1)
        if top_k > model.config.vocab_size:
            raise ValueError(f"top_k = {top_k}: must be in [1, vocab_size={model.config.vocab_size}]")
    total = prompt.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = "
                         f"{total} exceeds max_seq_len={model.config.max_seq_len}")
    rng = np.random.default_rng(seed)
    state = InferenceState(model, prompt.shape[0])
    out = [prompt.astype(np.int64)]
    logps = []
    logits, _ = forward_cached(model, prompt.astype(np.int64), state)        # prefill
    for i in range(max_new_tokens):
        last = logits[:, -1]                                                  # [B, V]
        nxt = _pick(last, temperature, top_k, rng).astype(np.int64)           # [B]
        if return_logprobs:
            logps.append(_log_softmax(last.astype(np.float64))[np.arange(len(nxt)), nxt])
        out.append(nxt[:, None])
        if i + 1 < max_new_tokens:
            logits, _ = forward_cached(model, nxt[:, None], state)
    tokens = np.concatenate(out, axis=1)
    tokens = tokens[0] if squeeze else tokens
    if not return_logprobs:
        return tokens
    lp = np.stack(logps, axis=1) if logps else np.zeros((prompt.shape[0], 0))
    return tokens, (lp[0] if squeeze else lp)


def generate_recompute(model: Model, prompt_tokens: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding that recomputes the full forward at every step (no cache): the reference
    that cached generation must equal token for token."""
    tokens = np.asarray(prompt_tokens, dtype=np.int64)
    squeeze = tokens.ndim == 1
    tokens = tokens[None, :] if squeeze else tokens
    for _ in range(max_new_tokens):
        logits = model.forward(tokens)
        tokens = np.concatenate([tokens, np.argmax(logits[:, -1], axis=-1)[:, None]], axis=1)
    return tokens[0] if squeeze else tokens


# ================================================================================================
# self-speculative decoding with the MTP module
# ================================================================================================

def _mtp_draft(model: Model, hidden: np.ndarray, next_tokens: np.ndarray) -> int:
    """MTP depth 1 over positions 0..p: hidden [1, p+1, D] main states, next_tokens [1, p+1]
    (t_1..t_{p+1}) -> the greedy draft of t_{p+2}. Recomputed over the prefix (toy sizes)."""
    from tinymoe.model import block_forward
    cfg, P = model.config, model.params
    e, _ = embedding_forward(next_tokens, P["embed"])
    en, _ = rmsnorm_forward(e, P["mtp.0.enorm"], cfg.norm_eps)
    hn, _ = rmsnorm_forward(hidden, P["mtp.0.hnorm"], cfg.norm_eps)
    x = np.concatenate([en, hn], axis=-1) @ P["mtp.0.eh_proj"].T
    icfg = _inference_cfg(model)
    hk, _, _ = block_forward(x, P, "mtp.0", icfg, model.buffers["mtp.0.ffn.gate.bias"], True)
    on, _ = rmsnorm_forward(hk[:, -1:], P["mtp.0.norm"], cfg.norm_eps)
    return int(np.argmax((on @ P["head"].T)[0, -1]))


def generate_speculative(model: Model, prompt_tokens, max_new_tokens: int):
    """Greedy self-speculative decoding with MTP depth 1; returns (tokens, stats).

    tokens equal generate(model, prompt, max_new_tokens) (greedy) exactly; stats holds
    "drafted", "accepted", "acceptance_rate" and "main_calls" (cached main-model calls after
    the prefill). One sequence at a time (prompt [T0] or [1, T0]).
    """
    if model.config.n_mtp_modules < 1:
        raise ValueError("model.config.n_mtp_modules = 0: speculative decoding needs an MTP module")
    prompt, squeeze = _check_prompt(prompt_tokens)
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 0)
    if prompt.shape[0] != 1:
        raise ValueError(f"prompt_tokens: batch {prompt.shape[0]}; speculative decoding takes one "
                         f"sequence")
    total = prompt.shape[1] + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = "
                         f"{total} exceeds max_seq_len={model.config.max_seq_len}")
    state = InferenceState(model, 1)
    logits, hidden = forward_cached(model, prompt, state)
    seq: List[int] = [int(t) for t in prompt[0]]
    nxt = int(np.argmax(logits[0, -1]))          # greedy token for position len(seq), not yet fed
    drafted = accepted = calls = 0
    new: List[int] = []
    while len(new) < max_new_tokens:
        if len(new) + 1 == max_new_tokens:
            new.append(nxt)
            break
        # 1. draft t_{p+2} from h_p and t_{p+1} = nxt
        following = np.array([seq[1:] + [nxt]], dtype=np.int64)                  # t_1..t_{p+1}
        draft = _mtp_draft(model, hidden, following)
        drafted += 1
        # 2. verify both in one cached call of the main model
        lg, hid = forward_cached(model, np.array([[nxt, draft]], dtype=np.int64), state)
        calls += 1
        truth = int(np.argmax(lg[0, 0]))
        seq.append(nxt)
        new.append(nxt)
        hidden = np.concatenate([hidden, hid[:, :1]], axis=1)
        if truth == draft:
            accepted += 1
            seq.append(draft)
            new.append(draft)
            hidden = np.concatenate([hidden, hid[:, 1:]], axis=1)
            nxt = int(np.argmax(lg[0, 1]))
        else:
            state.rollback(1)                    # the draft's cache row is discarded
            nxt = truth
    tokens = np.array([seq[:prompt.shape[1]] + new[:max_new_tokens]], dtype=np.int64)
    stats = {"drafted": drafted, "accepted": accepted, "main_calls": calls,
             "acceptance_rate": accepted / drafted if drafted else 0.0}
    return (tokens[0] if squeeze else tokens), stats

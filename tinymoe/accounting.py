"""Accounting for any ModelConfig: KV-cache sizes (and, below, parameters and FLOPs).

KV cache per token, summed over the l = cfg.n_layers transformer blocks (DeepSeek-V2 Table 1;
reference/deepseek.md section 13). The MTP modules are not counted (they are not used while
decoding), which is how the published 35,136 elements per token of DeepSeek-V3 are counted.

    kind        elements per token                       Table 1 form
    mha         n_h (Dn + Dv) l                          2 n_h d_h l
    gqa         n_g (Dn + Dv) l   (n_g kv heads)         2 n_g d_h l
    mqa         (Dn + Dv) l                              2 d_h l
    mla         (Dc + Dr) l                              (d_c + d_h^R) l    (LatentKVCache)
    mla_naive   n_h (Dn + Dr + Dv) l                     full per-head K/V (NaiveKVCache, HF)

Convention for the baselines: Table 1's d_h is the per-head width of a key and of a value in a
model WITHOUT decoupled RoPE, so keys count d_h = Dn = qk_nope_head_dim values and values
d_h = Dv = v_head_dim values; the table's 2 n_h d_h l is n_h (Dn + Dv) l, identical whenever
Dn = Dv (every DeepSeek preset: 128). V3: 2 * 128 * 128 * 61 = 1,998,848 (MHA) against
(512 + 64) * 61 = 35,136 (MLA), 70,272 bytes per token in bf16. (tinymoe's own baseline block,
attention.KVCache, keeps its RoPE'd keys Dn + Dr wide, so it holds Hkv (Dn + Dr + Dv) values per
token and layer; Table 1 counts keys without a rope part.)
"""
from __future__ import annotations

from typing import Optional

KV_KINDS = ("mha", "gqa", "mqa", "mla", "mla_naive")


# ---- KV cache ----------------------------------------------------------------------------------

def kv_cache_elements_per_layer(config, kind: str, n_groups: Optional[int] = None) -> int:
    """Values one token adds to ONE layer's KV cache for attention `kind` (see the module table)."""
    if kind not in KV_KINDS:
        raise ValueError(f"kind: {kind!r} must be one of {KV_KINDS}")
    H = config.n_heads
    d_k, d_v = config.qk_nope_head_dim, config.v_head_dim       # Table 1's d_h for keys, values
    if kind == "mha":
        return H * (d_k + d_v)                                   # 2 n_h d_h
    if kind == "mqa":
        return d_k + d_v                                         # 2 d_h
    if kind == "gqa":
        if n_groups is None:
            n_groups = config.n_kv_heads or None
        if n_groups is None:
            raise ValueError("n_groups: GQA needs the number of key/value heads (n_groups=None "
                             "and config.n_kv_heads = 0)")
        if not isinstance(n_groups, int) or isinstance(n_groups, bool) or not 1 <= n_groups <= H \
                or H % n_groups:
            raise ValueError(f"n_groups: {n_groups!r} must be a positive divisor of n_heads = {H}")
        return n_groups * (d_k + d_v)                            # 2 n_g d_h
    if kind == "mla":
        return config.kv_lora_rank + config.qk_rope_head_dim     # d_c + d_h^R
    return H * (config.qk_head_dim + d_v)                        # mla_naive: H (Dn + Dr + Dv)


def kv_cache_elements(config, kind: str, n_groups: Optional[int] = None) -> int:
    """Values one token adds to the KV cache over all config.n_layers layers (V3 MLA: 35,136).

    kind: "mha", "gqa" (n_groups key/value heads; default config.n_kv_heads), "mqa", "mla" (the
    latent cache: normalised latent + rotated rope key) or "mla_naive" (full per-head K and V).
    """
    return kv_cache_elements_per_layer(config, kind, n_groups) * config.n_layers


def kv_cache_bytes(config, kind: str, n_tokens: int, bytes_per_element: int = 2,
                   n_groups: Optional[int] = None) -> int:
    """Bytes of the KV cache of ONE sequence of n_tokens tokens (bf16 by default), all layers.

    Multiply by the batch size for a batch. V3 MLA: 70,272 bytes per token in bf16.
    """
    if not isinstance(n_tokens, int) or isinstance(n_tokens, bool) or n_tokens < 0:
        raise ValueError(f"n_tokens: {n_tokens!r} must be a non-negative integer")
    if not isinstance(bytes_per_element, int) or bytes_per_element < 1:
        raise ValueError(f"bytes_per_element: {bytes_per_element!r} must be a positive integer")
    return kv_cache_elements(config, kind, n_groups) * n_tokens * bytes_per_element


# ---- parameters and FLOPs ----------------------------------------------------------------------
# Parameters are counted from the shapes alone (the same table as tinymoe.model.param_shapes,
# written out here so the arithmetic can be read). Conventions, those behind the papers' figures:
#   total   every weight of the main model: embedding, all blocks (attention, norms, dense FFN,
#           router, all routed experts, shared experts), final norm and output head. The router's
#           selection bias (E values per MoE layer) is state, not a parameter, and is not counted.
#           The MTP modules are not counted unless include_mtp=True (V3's 671B excludes them).
#   active  the weights one token uses: everything above except the embedding table (a lookup,
#           not a matrix product) and except the routed experts the token does not choose
#           (E - K of them per MoE layer); the output head is counted.
#
# DeepSeek-V3 (D 7168, V 129280, 61 layers of which 3 dense, H 128, Dq 1536, Dc 512, Dn 128,
# Dr 64, Dv 128, I 18432, E 256, K 8, 1 shared expert, F 2048):
#   attention / layer  wq_a 1536*7168 + q_norm 1536 + wq_b 24576*1536 + wkv_a 576*7168
#                      + kv_norm 512 + wkv_b 32768*512 + wo 7168*16384          = 187,107,328
#   block norms        2 * 7168                                                  =      14,336
#   dense FFN          3 * 18432 * 7168                                          = 396,361,728
#   router             256 * 7168                                                =   1,835,008
#   one expert         3 * 2048 * 7168                                           =  44,040,192
#   routed experts     256 * 44,040,192                                          = 11,274,289,152
#   shared expert      1 * 44,040,192                                            =  44,040,192
#   dense block        187,107,328 + 14,336 + 396,361,728                        = 583,483,392
#   MoE block          187,107,328 + 14,336 + 1,835,008 + 11,274,289,152 + 44,040,192
#                                                                                = 11,507,286,016
#   total  = 2 * 129280*7168 (embed + head) + 3 * 583,483,392 + 58 * 11,507,286,016 + 7168 (norm)
#          = 1,853,358,080 + 1,750,450,176 + 667,422,588,928 + 7,168 = 671,026,404,352   ("671B")
#   active = total - 926,679,040 (embed) - 58 * (256 - 8) * 44,040,192
#          = 671,026,404,352 - 926,679,040 - 633,474,121,728 = 36,625,603,584          ("37B")
#   MTP (include_mtp): one MoE block + enorm + hnorm + eh_proj 7168*14336 + its norm
#          = 11,507,286,016 + 14,336 + 102,760,448 + 7,168 = 11,610,067,968 unique (DeepSeek's
#          README_WEIGHTS rounds it to "11.5B"; its embedding and head are the main model's).
# DeepSeek-V2: 235,741,434,880 total / 20,851,512,320 active ("236B / 21B");
# DeepSeek-V2-Lite: 15,706,484,224 / 2,451,435,008 ("15.7B / 2.4B").
#
# Training FLOPs per token: each weight matrix W [out, in] that a token passes through costs
# 2*out*in multiply-adds forward (x @ W.T); the backward costs twice the forward (dx and dW), so
# forward + backward = 3 * forward = 6 * (active matrix weights) + attention. Attention adds, per
# layer and token, 2 * H * (Dn + Dr) * S (scores q.k) + 2 * H * Dv * S (p @ v) forward FLOPs over
# S attended keys: S = (ctx + 1) / 2 on average with a causal mask over a context of ctx tokens
# (causal=True), S = ctx without (the Chinchilla-style count). Norms, softmax, activations and the
# embedding lookup are not counted (they are O(D) per token, not O(D^2)).

from typing import NamedTuple as _NamedTuple


class ParamCount(_NamedTuple):
    total: int            # main-model weights (+ MTP modules when include_mtp)
    active: int           # weights one token uses: no embedding table, K of E routed experts
    embedding: int        # V * D
    head: int             # V * D (untied output head)
    attention: int        # every block's attention weights (incl. q_norm / kv_norm)
    norms: int            # block norms (attn_norm, ffn_norm) and the final norm
    dense_ffn: int        # the n_dense_layers dense SwiGLU FFNs
    router: int           # every MoE block's gate [E, D]
    routed_experts: int   # all E routed experts of every MoE block
    shared_experts: int   # the shared experts of every MoE block
    mtp: int              # unique MTP weights (0 unless include_mtp)


def _attention_params(c) -> int:
    """Weights of one attention sub-layer (MLA, or the MHA/GQA/MQA baseline)."""
    D, H, Dqk, Dv = c.dim, c.n_heads, c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    if c.attn_type != "mla":
        if c.attn_type == "mqa":
            hkv = 1
        elif c.attn_type == "gqa" and c.n_kv_heads:
            hkv = c.n_kv_heads
        else:
            hkv = H
        return H * Dqk * D + hkv * Dqk * D + hkv * Dv * D + D * H * Dv     # wq wk wv wo
    q = (c.q_lora_rank * D + c.q_lora_rank + H * Dqk * c.q_lora_rank       # wq_a q_norm wq_b
         if c.q_lora_rank > 0 else H * Dqk * D)                            # or wq
    kv = ((c.kv_lora_rank + c.qk_rope_head_dim) * D + c.kv_lora_rank        # wkv_a kv_norm
          + H * (c.qk_nope_head_dim + Dv) * c.kv_lora_rank)                 # wkv_b
    return q + kv + D * H * Dv                                              # wo


def _moe_parts(c):
    """(router, routed experts, one expert, shared experts) weights of one MoE block."""
    D, E, F = c.dim, c.n_routed_experts, c.moe_inter_dim
    one = 3 * F * D                                      # w1 [F, D], w2 [D, F], w3 [F, D]
    return E * D, E * one, one, c.n_shared_experts * one


def count_params(config, include_mtp: bool = False) -> ParamCount:
    """ModelConfig -> ParamCount(total, active, ...) with the conventions above.

    DeepSeek-V3: total 671,026,404,352, active 36,625,603,584 (the arithmetic is in the comment
    block above this function). include_mtp adds the unique weights of the n_mtp_modules MTP
    modules (each: one MoE block, enorm, hnorm, eh_proj [D, 2D], its final norm) to both counts.
    """
    c = config
    D, V = c.dim, c.vocab_size
    n_dense = c.n_dense_layers
    n_moe = c.n_layers - n_dense
    attn1 = _attention_params(c)
    router1, routed1, expert1, shared1 = _moe_parts(c)
    dense1 = 3 * c.inter_dim * D
    embedding, head = V * D, V * D
    attention = c.n_layers * attn1
    norms = c.n_layers * 2 * D + D
    dense_ffn = n_dense * dense1
    router, routed, shared = n_moe * router1, n_moe * routed1, n_moe * shared1
    total = embedding + head + attention + norms + dense_ffn + router + routed + shared
    unused1 = (c.n_routed_experts - c.n_activated_experts) * expert1     # per MoE block and token
    active = total - embedding - n_moe * unused1
    mtp = 0
    if include_mtp and c.n_mtp_modules:
        block = attn1 + 2 * D + router1 + routed1 + shared1
        mtp1 = block + 2 * D + 2 * D * D + D                  # + enorm, hnorm, eh_proj, norm
        mtp = c.n_mtp_modules * mtp1
        total += mtp
        active += c.n_mtp_modules * (mtp1 - unused1)
    return ParamCount(total, active, embedding, head, attention, norms, dense_ffn, router,
                      routed, shared, mtp)


class FlopCount(_NamedTuple):
    forward: float         # forward FLOPs per token
    backward: float        # backward FLOPs per token (2 x forward)
    total: float           # forward + backward = 3 x forward
    matmul: float          # forward FLOPs of the weight matrices (2 x active matrix weights)
    attention: float       # forward FLOPs of q.k and p @ v over the attended keys


def _matrix_params_active(config, include_mtp: bool) -> int:
    """Active weights that are matrices (norm vectors excluded): what costs 2 FLOPs per use."""
    c = config
    pc = count_params(c, include_mtp)
    vectors = pc.norms                                                # block + final norms
    if c.attn_type == "mla":
        vectors += c.n_layers * (c.kv_lora_rank + (c.q_lora_rank if c.q_lora_rank > 0 else 0))
    m = pc.active - vectors
    if include_mtp and c.n_mtp_modules:
        lat = c.kv_lora_rank + (c.q_lora_rank if c.q_lora_rank > 0 else 0) \
            if c.attn_type == "mla" else 0
        # MTP norm vectors (attn_norm, ffn_norm, enorm, hnorm, norm, latent norms) are not
        # matrices; each depth also runs the shared head once more.
        m -= c.n_mtp_modules * (5 * c.dim + lat)
        m += c.n_mtp_modules * c.vocab_size * c.dim
    return m


def flops_per_token(config, ctx: int, causal: bool = True, include_mtp: bool = False) -> FlopCount:
    """Training FLOPs per token at context length ctx: 3 x (2 x active matrix weights + attention).

    Attention per layer and token (forward): 2 * H * (Dn + Dr) * S + 2 * H * Dv * S with
    S = (ctx + 1) / 2 when causal (average attended keys), ctx otherwise. MTP modules (include_mtp)
    add their block, eh_proj and one more pass through the head, and attend like a layer.
    """
    if not isinstance(ctx, int) or isinstance(ctx, bool) or ctx < 1:
        raise ValueError(f"ctx: {ctx!r} must be a positive integer")
    c = config
    S = (ctx + 1) / 2 if causal else float(ctx)
    n_attn = c.n_layers + (c.n_mtp_modules if include_mtp else 0)
    attention = n_attn * 2.0 * c.n_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * S
    matmul = 2.0 * _matrix_params_active(c, include_mtp)
    fwd = matmul + attention
    return FlopCount(fwd, 2.0 * fwd, 3.0 * fwd, matmul, attention)

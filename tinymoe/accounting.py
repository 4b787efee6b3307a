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
# (count_params, active parameters and FLOP counts go here; owned by another engineer)

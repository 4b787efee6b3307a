"""Hugging Face DeepSeek-V3 checkpoints in and out: the only file where Hugging Face names live.

    model = load_pretrained("path/to/DeepSeek-V3-tiny")          # config.json + *.safetensors
    save_pretrained(model, "out/")                                # transformers can load "out/"
    sd = to_hf_state_dict(model)                                  # {checkpoint name: array}
    gsd = to_hf_state_dict(model, grads)                          # gradients, same names/layouts

A checkpoint directory is `config.json` plus `model.safetensors` (or shards listed in
`model.safetensors.index.json`). Files are read with the `safetensors` package (the optional
extra `pip install tinymoe[hf]`) and `json`: nothing in a file is ever executed, and a
pickle-based `pytorch_model.bin` is refused. Everything is checked before a model is built, so an
error never leaves a half-loaded model behind.

Names (reference/deepseek.md section 9; official names as in DeepSeek's `convert.py`):

    tinymoe                        checkpoint (Hugging Face)
    embed                          model.embed_tokens.weight
    layers.{l}.attn_norm           model.layers.{l}.input_layernorm.weight
    layers.{l}.attn.wq_a / q_norm  model.layers.{l}.self_attn.q_a_proj.weight / q_a_layernorm.weight
    layers.{l}.attn.wq_b / wq      ... self_attn.q_b_proj.weight / q_proj.weight       (rope rows, see below)
    layers.{l}.attn.wkv_a          ... self_attn.kv_a_proj_with_mqa.weight            (rope rows, see below)
    layers.{l}.attn.kv_norm        ... self_attn.kv_a_layernorm.weight
    layers.{l}.attn.wkv_b / wo     ... self_attn.kv_b_proj.weight / o_proj.weight
    layers.{l}.ffn_norm            model.layers.{l}.post_attention_layernorm.weight
    layers.{l}.ffn.w1 / w2 / w3    ... mlp.gate_proj / down_proj / up_proj .weight    (dense layers)
    layers.{l}.ffn.gate            ... mlp.gate.weight
    buffer layers.{l}.ffn.gate.bias ... mlp.gate.e_score_correction_bias              (selection bias)
    layers.{l}.ffn.experts.w1[e]   ... mlp.experts.{e}.gate_proj.weight   (w2[e]: down_proj, w3[e]: up_proj)
    layers.{l}.ffn.shared.w1 ...   ... mlp.shared_experts.gate_proj.weight ...
    norm / head                    model.norm.weight / lm_head.weight
    mtp.{k}.*                      model.layers.{n_layers + k}.* : enorm, hnorm, eh_proj, the block's
                                   keys as above, shared_head.norm (= mtp.{k}.norm), and copies of
                                   the shared embed_tokens and shared_head.head

No weight is transposed: both sides store linear weights [out, in]. tinymoe stacks the routed
experts [E, out, in]; the checkpoint keeps one key per expert (transformers v5 fuses them in
memory as `gate_up_proj` [E, 2F, D], but writes and reads the per-expert keys).

RoPE layout. tinymoe rotates interleaved pairs (x_{2j}, x_{2j+1}), the released weights' layout
(`rope_interleave: true`; transformers then permutes the rotated vector, which leaves every score
unchanged). With `rope_interleave: false` transformers rotates half-split pairs (x_j, x_{j+Dr/2}),
which is right only for weights whose rope rows were stored in the permuted order
P = [0, 2, 4, ..., Dr-2, 1, 3, ..., Dr-1] (reference/deepseek.md 4.3): the last Dr rows of each
query head of q_b_proj / q_proj and the last Dr rows of kv_a_proj_with_mqa. Loading such a file
undoes P (row 2j <- row j, row 2j+1 <- row Dr/2 + j) and saving with rope_interleave=False applies
it, so the math inside tinymoe has one convention.

Config (reference/deepseek.md section 1): hidden_size -> dim, intermediate_size -> inter_dim,
moe_intermediate_size -> moe_inter_dim, num_hidden_layers -> n_layers, first_k_dense_replace ->
n_dense_layers, n_group / topk_group -> n_expert_groups / n_limited_groups, num_experts_per_tok
-> n_activated_experts, routed_scaling_factor -> route_scale, norm_topk_prob -> norm_topk_prob,
q_lora_rank null -> 0, rms_norm_eps -> norm_eps (transformers builds the MLA norms q_a_layernorm and
kv_a_layernorm with eps 1e-6 whatever rms_norm_eps says: latent_norm_eps = 1e-6),
num_nextn_predict_layers -> n_mtp_modules (only when loading with mtp=True).
RoPE is read from `rope_parameters` (current transformers) or `rope_theta` + `rope_scaling`
(older configs, DeepSeek's own); both are written. YaRN (rope type "yarn"): factor -> rope_factor,
original_max_position_embeddings -> original_seq_len, max_position_embeddings -> max_seq_len
(tinymoe turns YaRN on iff max_seq_len > original_seq_len), beta_fast/beta_slow, and
mscale_all_dim -> mscale (the softmax factor m(s, mscale_all_dim)^2). transformers also scales
cos/sin by m(s, mscale) / m(s, mscale_all_dim); tinymoe (like DeepSeek's code) has no such
factor, so a config where it is not 1 (mscale != mscale_all_dim, or only one of them given) is
refused. Plain RoPE: max_seq_len = original_seq_len = max_position_embeddings (YaRN off).
"""
from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from tinymoe.config import ModelConfig

__all__ = ["load_pretrained", "save_pretrained", "to_hf_state_dict", "from_hf_state_dict",
           "config_from_hf", "config_to_hf", "read_safetensors", "HFLoadReport",
           "HFUnusedKeysWarning", "HF_MODEL_TYPE", "rope_half_split_perm"]

HF_MODEL_TYPE = "deepseek_v3"
HF_ARCH = "DeepseekV3ForCausalLM"
HF_LATENT_NORM_EPS = 1e-6        # transformers' q_a_layernorm / kv_a_layernorm eps (fixed)

# DeepseekV3Config defaults (transformers v5), used for keys a config.json leaves out.
HF_DEFAULTS = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                   moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                   num_key_value_heads=None, n_shared_experts=1, n_routed_experts=256,
                   routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                   qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                   topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                   norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096,
                   initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False,
                   rope_interleave=True, attention_bias=False, num_nextn_predict_layers=0)


class HFUnusedKeysWarning(UserWarning):
    """A checkpoint held tensors that tinymoe does not use (reported, never silently dropped)."""


class HFLoadReport(NamedTuple):
    path: str                      # the directory read
    unused: List[str]              # checkpoint keys not loaded (e.g. MTP layers when mtp=False)
    source_dtypes: Dict[str, int]  # safetensors dtype -> number of tensors (e.g. {"BF16": 40})
    dequantized: List[str]         # FP8 weights dequantized with their weight_scale_inv
    rope_interleave: bool          # layout of the file's rope rows
    hf_config: dict                # the config.json as read


def _need_safetensors():
    try:
        import safetensors  # noqa: F401
    except ImportError as e:      # pragma: no cover - the test extra installs it
        raise ImportError("tinymoe.hf needs the safetensors package: pip install tinymoe[hf]") from e
    return safetensors


# ================================================================================================
# config.json <-> ModelConfig
# ================================================================================================

def _yarn_mscale(scale: float, mscale: float) -> float:
    """transformers' yarn_get_mscale: 0.1 * mscale * ln(scale) + 1 for scale > 1, else 1."""
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def _rope_from_hf(hf: dict, src: str) -> dict:
    """ModelConfig RoPE fields (max_seq_len, original_seq_len, rope_theta, YaRN) from an HF config."""
    max_pos = int(hf.get("max_position_embeddings") or HF_DEFAULTS["max_position_embeddings"])
    rp, rs = hf.get("rope_parameters"), hf.get("rope_scaling")
    if rp:
        params, where = dict(rp), "rope_parameters"
    elif rs:
        params, where = dict(rs), "rope_scaling"
    else:
        params, where = {}, "rope_parameters"
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    if theta is None:
        theta = 10000.0
    rtype = params.get("rope_type", params.get("type", "default"))
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{src}: {where}.partial_rotary_factor = {params['partial_rotary_factor']!r}: "
                         f"DeepSeek rotates all qk_rope_head_dim values (must be 1.0)")
    out = dict(rope_theta=float(theta))
    if rtype == "default":
        # YaRN off in tinymoe: max_seq_len must not exceed original_seq_len.
        out.update(max_seq_len=max_pos, original_seq_len=max_pos)
        return out
    if rtype != "yarn":
        raise ValueError(f"{src}: {where}.rope_type = {rtype!r} is not supported "
                         f"(DeepSeek-V3 uses 'default' or 'yarn')")
    orig = params.get("original_max_position_embeddings", hf.get("original_max_position_embeddings"))
    if orig is None:
        raise ValueError(f"{src}: {where}.original_max_position_embeddings is missing for YaRN")
    orig = int(orig)
    factor = params.get("factor") or max_pos / orig
    if not factor > 1:
        raise ValueError(f"{src}: {where}.factor = {factor!r}: YaRN needs a factor > 1")
    if max_pos <= orig:
        raise ValueError(
            f"{src}: max_position_embeddings = {max_pos} <= {where}.original_max_position_embeddings"
            f" = {orig}: YaRN must extend the context (tinymoe turns YaRN on iff "
            f"max_seq_len > original_seq_len, DeepSeek's rule)")
    if params.get("truncate", True) is not True:
        raise ValueError(f"{src}: {where}.truncate = {params['truncate']!r}: only the truncated "
                         f"(floor/ceil) YaRN ramp of DeepSeek is supported")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    att = params.get("attention_factor")
    if att is None:      # transformers' rule for the cos/sin amplitude
        att = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
               if mscale and mscale_all else _yarn_mscale(factor, 1.0))
    if abs(att - 1.0) > 1e-12:
        raise ValueError(
            f"{src}: {where}: mscale = {mscale!r}, mscale_all_dim = {mscale_all!r}, attention_factor"
            f" = {params.get('attention_factor')!r} make transformers scale cos/sin by {att:.6g}; "
            f"DeepSeek (and tinymoe) have no such factor: set mscale == mscale_all_dim")
    out.update(max_seq_len=max_pos, original_seq_len=orig, rope_factor=float(factor),
               beta_fast=params.get("beta_fast") or 32, beta_slow=params.get("beta_slow") or 1,
               mscale=float(mscale_all or 0.0))
    return out


def config_from_hf(hf: dict, mtp=False, source: str = "config.json") -> ModelConfig:
    """An HF DeepSeek-V3 config dict -> ModelConfig (validated). ValueError names the bad key.

    mtp: False (default, like transformers: MTP layers are not loaded), True (as many MTP modules as
    num_nextn_predict_layers) or an int. Training-only tinymoe fields saved by save_pretrained under
    the "tinymoe" key are restored; the fields that define the math come from the HF keys.
    """
    src = source
    mt = hf.get("model_type")
    if mt != HF_MODEL_TYPE:
        raise ValueError(f"{src}: model_type = {mt!r}: only {HF_MODEL_TYPE!r} checkpoints are supported")

    def g(key):                      # the value, or transformers' default when absent / null
        v = hf.get(key)
        return HF_DEFAULTS[key] if v is None else v

    sf = hf.get("scoring_func", "sigmoid")
    if sf != "sigmoid":
        raise ValueError(f"{src}: scoring_func = {sf!r}: DeepSeek-V3 routing is 'sigmoid'")
    tm = hf.get("topk_method", "noaux_tc")
    if tm != "noaux_tc":
        raise ValueError(f"{src}: topk_method = {tm!r}: DeepSeek-V3 routing is 'noaux_tc'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{src}: hidden_act = {hf['hidden_act']!r}: must be 'silu'")
    if hf.get("attention_bias", False):
        raise ValueError(f"{src}: attention_bias = true: DeepSeek linears have no bias")
    if hf.get("tie_word_embeddings", False):
        raise ValueError(f"{src}: tie_word_embeddings = true: tinymoe keeps a separate output head")
    if hf.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"{src}: moe_layer_freq = {hf['moe_layer_freq']!r}: every layer after "
                         f"first_k_dense_replace must be MoE (1)")
    H = int(g("num_attention_heads"))
    kvh = hf.get("num_key_value_heads")
    if kvh is not None and int(kvh) != H:
        raise ValueError(f"{src}: num_key_value_heads = {kvh!r}: must equal num_attention_heads = {H}")
    n_layers = int(g("num_hidden_layers"))
    q_lora = hf.get("q_lora_rank", HF_DEFAULTS["q_lora_rank"])
    ntp = hf.get("norm_topk_prob", True)
    n_mtp_file = int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0)
    if mtp is True:
        n_mtp = n_mtp_file
    elif mtp is False or mtp is None:
        n_mtp = 0
    else:
        n_mtp = int(mtp)
        if n_mtp > n_mtp_file:
            raise ValueError(f"{src}: mtp = {n_mtp} modules requested but num_nextn_predict_layers = "
                             f"{n_mtp_file}")
    fields = {}
    extra = hf.get("tinymoe")
    if isinstance(extra, dict):      # our own training-only fields (save_pretrained writes them)
        keep = ("bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_alpha",
                "capacity_factor", "mtp_lambda", "init_std")
        fields.update({k: extra[k] for k in keep if k in extra})
    fields.update(
        vocab_size=int(g("vocab_size")), dim=int(g("hidden_size")),
        inter_dim=int(g("intermediate_size")), moe_inter_dim=int(g("moe_intermediate_size")),
        n_layers=n_layers, n_dense_layers=min(int(g("first_k_dense_replace")), n_layers),
        n_heads=H, n_routed_experts=int(g("n_routed_experts")),
        n_shared_experts=int(hf.get("n_shared_experts", HF_DEFAULTS["n_shared_experts"]) or 0),
        n_activated_experts=int(g("num_experts_per_tok")),
        n_expert_groups=int(hf.get("n_group", 8) or 1),
        n_limited_groups=int(hf.get("topk_group", 4) or 1),
        score_func="sigmoid", route_scale=float(g("routed_scaling_factor")),
        q_lora_rank=0 if q_lora is None else int(q_lora), kv_lora_rank=int(g("kv_lora_rank")),
        qk_nope_head_dim=int(g("qk_nope_head_dim")), qk_rope_head_dim=int(g("qk_rope_head_dim")),
        v_head_dim=int(g("v_head_dim")), norm_eps=float(g("rms_norm_eps")),
        latent_norm_eps=HF_LATENT_NORM_EPS, norm_topk_prob=bool(ntp),   # HF: None acts as False
        n_mtp_modules=n_mtp, attn_type="mla")
    if "init_std" not in fields and hf.get("initializer_range"):
        fields["init_std"] = float(hf["initializer_range"])
    fields.update(_rope_from_hf(hf, src))
    try:
        return ModelConfig.from_dict(fields)
    except ValueError as e:
        raise ValueError(f"{src}: the config does not describe a valid model: {e}") from None


def config_to_hf(cfg: ModelConfig, rope_interleave: bool = True, include_mtp: bool = True) -> dict:
    """ModelConfig -> an HF DeepSeek-V3 config dict (what save_pretrained writes as config.json).

    RoPE is written both ways: `rope_parameters` (transformers >= 5) and `rope_theta` +
    `rope_scaling` (older transformers, DeepSeek's own configs). Raises ValueError for configs the
    HF model cannot express (softmax scoring, baseline attention, latent_norm_eps != 1e-6).
    """
    if cfg.attn_type != "mla":
        raise ValueError(f"config.attn_type = {cfg.attn_type!r}: DeepSeek-V3 checkpoints need 'mla'")
    if cfg.score_func != "sigmoid":
        raise ValueError(f"config.score_func = {cfg.score_func!r}: DeepSeek-V3 (transformers) "
                         f"routes with 'sigmoid' only")
    if cfg.latent_norm_eps != HF_LATENT_NORM_EPS:
        raise ValueError(f"config.latent_norm_eps = {cfg.latent_norm_eps!r}: transformers fixes the "
                         f"MLA norms' eps at {HF_LATENT_NORM_EPS}")
    if cfg.capacity_factor is not None:
        warnings.warn(f"config.capacity_factor = {cfg.capacity_factor}: transformers routes "
                      f"without capacity limits (dropless); outputs differ when tokens are dropped")
    if cfg.yarn:
        rope = {"rope_type": "yarn", "factor": float(cfg.rope_factor),
                "original_max_position_embeddings": int(cfg.original_seq_len),
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow,
                "mscale": float(cfg.mscale), "mscale_all_dim": float(cfg.mscale)}
        if not cfg.mscale:       # both 0: transformers would default cos/sin to m(s, 1)
            rope["attention_factor"] = 1.0
        rope_scaling = dict(rope, type="yarn")
        rope_parameters = dict(rope, rope_theta=float(cfg.rope_theta))
    else:
        rope_scaling = None
        rope_parameters = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    return {
        "architectures": [HF_ARCH], "model_type": HF_MODEL_TYPE,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
        "intermediate_size": cfg.inter_dim, "moe_intermediate_size": cfg.moe_inter_dim,
        "num_hidden_layers": cfg.n_layers, "first_k_dense_replace": cfg.n_dense_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
        "num_experts_per_tok": cfg.n_activated_experts, "n_group": cfg.n_expert_groups,
        "topk_group": cfg.n_limited_groups, "routed_scaling_factor": float(cfg.route_scale),
        "norm_topk_prob": bool(cfg.renormalize), "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "moe_layer_freq": 1,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": float(cfg.norm_eps), "rope_theta": float(cfg.rope_theta),
        "rope_scaling": rope_scaling, "rope_parameters": rope_parameters,
        "rope_interleave": bool(rope_interleave), "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "num_nextn_predict_layers": cfg.n_mtp_modules if include_mtp else 0,
        "initializer_range": float(cfg.init_std), "use_cache": True,
        "dtype": "float32", "torch_dtype": "float32",
        "tinymoe": cfg.to_dict(),
    }


# ================================================================================================
# the name and layout map
# ================================================================================================

class _Entry(NamedTuple):
    tm: str                  # tinymoe name (param, or buffer when kind == "buffer")
    hf: object               # checkpoint name, or a list of E names for kind "stack"
    kind: str                # "copy" | "q_rope" | "kv_rope" | "stack" | "buffer" | "shared" | "empty"
    shape: tuple             # the checkpoint tensor's shape (per expert for "stack")


def rope_half_split_perm(dr: int) -> np.ndarray:
    """P = [0, 2, ..., Dr-2, 1, 3, ..., Dr-1]: half-split row r holds interleaved row P[r]."""
    return np.concatenate([np.arange(0, dr, 2), np.arange(1, dr, 2)])


def _block_entries(cfg: ModelConfig, tm: str, hf: str, moe: bool) -> List[_Entry]:
    from tinymoe.model import _attn_shapes, _ffn_shapes
    a, f = _attn_shapes(cfg), _ffn_shapes(cfg, moe)
    D = cfg.dim
    out = [_Entry(f"{tm}.attn_norm", f"{hf}.input_layernorm.weight", "copy", (D,))]
    if cfg.q_lora_rank > 0:
        out += [_Entry(f"{tm}.attn.wq_a", f"{hf}.self_attn.q_a_proj.weight", "copy", a["wq_a"]),
                _Entry(f"{tm}.attn.q_norm", f"{hf}.self_attn.q_a_layernorm.weight", "copy", a["q_norm"]),
                _Entry(f"{tm}.attn.wq_b", f"{hf}.self_attn.q_b_proj.weight", "q_rope", a["wq_b"])]
    else:
        out.append(_Entry(f"{tm}.attn.wq", f"{hf}.self_attn.q_proj.weight", "q_rope", a["wq"]))
    out += [_Entry(f"{tm}.attn.wkv_a", f"{hf}.self_attn.kv_a_proj_with_mqa.weight", "kv_rope", a["wkv_a"]),
            _Entry(f"{tm}.attn.kv_norm", f"{hf}.self_attn.kv_a_layernorm.weight", "copy", a["kv_norm"]),
            _Entry(f"{tm}.attn.wkv_b", f"{hf}.self_attn.kv_b_proj.weight", "copy", a["wkv_b"]),
            _Entry(f"{tm}.attn.wo", f"{hf}.self_attn.o_proj.weight", "copy", a["wo"]),
            _Entry(f"{tm}.ffn_norm", f"{hf}.post_attention_layernorm.weight", "copy", (D,))]
    proj = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
    if not moe:
        out += [_Entry(f"{tm}.ffn.{w}", f"{hf}.mlp.{p}.weight", "copy", f[w]) for w, p in proj.items()]
        return out
    E = cfg.n_routed_experts
    out.append(_Entry(f"{tm}.ffn.gate", f"{hf}.mlp.gate.weight", "copy", f["gate"]))
    out.append(_Entry(f"{tm}.ffn.gate.bias", f"{hf}.mlp.gate.e_score_correction_bias", "buffer", (E,)))
    for w, p in proj.items():
        out.append(_Entry(f"{tm}.ffn.experts.{w}", [f"{hf}.mlp.experts.{e}.{p}.weight" for e in range(E)],
                          "stack", f[f"experts.{w}"][1:]))
    Fs = cfg.n_shared_experts * cfg.moe_inter_dim
    sh = {"w1": (Fs, D), "w2": (D, Fs), "w3": (Fs, D)}
    kind = "copy" if Fs else "empty"     # transformers always has the shared MLP (width 0 if none)
    out += [_Entry(f"{tm}.ffn.shared.{w}", f"{hf}.mlp.shared_experts.{p}.weight", kind, sh[w])
            for w, p in proj.items()]
    return out


def _entries(cfg: ModelConfig, include_mtp: bool = True) -> List[_Entry]:
    """Every (tinymoe name, checkpoint name, layout) of a config, in a fixed order."""
    V, D = cfg.vocab_size, cfg.dim
    out = [_Entry("embed", "model.embed_tokens.weight", "copy", (V, D))]
    for l in range(cfg.n_layers):
        out += _block_entries(cfg, f"layers.{l}", f"model.layers.{l}", cfg.is_moe_layer(l))
    out += [_Entry("norm", "model.norm.weight", "copy", (D,)),
            _Entry("head", "lm_head.weight", "copy", (V, D))]
    if include_mtp:
        for k in range(cfg.n_mtp_modules):
            hf = f"model.layers.{cfg.n_layers + k}"
            out += [_Entry(f"mtp.{k}.enorm", f"{hf}.enorm.weight", "copy", (D,)),
                    _Entry(f"mtp.{k}.hnorm", f"{hf}.hnorm.weight", "copy", (D,)),
                    _Entry(f"mtp.{k}.eh_proj", f"{hf}.eh_proj.weight", "copy", (D, 2 * D))]
            out += _block_entries(cfg, f"mtp.{k}", hf, True)
            out += [_Entry(f"mtp.{k}.norm", f"{hf}.shared_head.norm.weight", "copy", (D,)),
                    _Entry("embed", f"{hf}.embed_tokens.weight", "shared", (V, D)),
                    _Entry("head", f"{hf}.shared_head.head.weight", "shared", (V, D))]
    return out


def _rope_rows(w: np.ndarray, kind: str, cfg: ModelConfig, to_half_split: bool) -> np.ndarray:
    """Permute the rope rows of a q or kv_a weight between interleaved and half-split order."""
    dr = cfg.qk_rope_head_dim
    perm = rope_half_split_perm(dr)
    idx = perm if to_half_split else np.argsort(perm)
    w = np.array(w, copy=True)
    if kind == "q_rope":
        dq = cfg.qk_head_dim
        v = w.reshape((cfg.n_heads, dq) + w.shape[1:])           # [H, Dn+Dr, in]
        v[:, cfg.qk_nope_head_dim:] = v[:, cfg.qk_nope_head_dim:][:, idx]
        return v.reshape(w.shape)
    w[cfg.kv_lora_rank:] = w[cfg.kv_lora_rank:][idx]             # kv_a: last Dr rows
    return w


def to_hf_state_dict(model, tensors: Optional[Dict[str, np.ndarray]] = None, *,
                     rope_interleave: bool = True, include_mtp: bool = True) -> Dict[str, np.ndarray]:
    """tinymoe names and layouts -> checkpoint names and layouts.

    tensors=None: the model's parameters, router selection biases (e_score_correction_bias) and,
    for MTP modules, the copies of the shared embedding and head that the released checkpoint
    holds. tensors=a dict with the keys of model.params (e.g. gradients; buffers optional): the
    same mapping applied to it, so a port can compare gradient by gradient. rope_interleave=False
    writes the rope rows in half-split order (see the module docstring). Arrays keep their dtype.
    """
    cfg = model.config
    if tensors is None:
        src = dict(model.params)
        src.update(model.buffers)
        with_shared = True
    else:
        src = tensors
        known = set(model.params) | set(model.buffers)
        extra = sorted(set(src) - known)
        if extra:
            raise ValueError(f"tensors: key {extra[0]!r} is not a parameter or buffer of the model")
        missing = sorted(set(model.params) - set(src))
        if missing:
            raise ValueError(f"tensors: missing key {missing[0]!r} ({len(missing)} missing); pass a "
                             f"dict with the keys of model.params")
        with_shared = False
    out: Dict[str, np.ndarray] = {}
    for e in _entries(cfg, include_mtp):
        if e.kind == "shared" and not with_shared:
            continue
        if e.kind == "empty":
            if with_shared:
                out[e.hf] = np.zeros(e.shape, dtype=np.asarray(src["embed"]).dtype)
            continue
        if e.tm not in src:
            if e.kind == "buffer":
                continue
            raise ValueError(f"tensors: missing key {e.tm!r}")
        a = np.asarray(src[e.tm])
        if e.kind == "stack":
            for i, name in enumerate(e.hf):
                out[name] = np.ascontiguousarray(a[i])
        elif e.kind in ("q_rope", "kv_rope") and not rope_interleave:
            out[e.hf] = _rope_rows(a, e.kind, cfg, to_half_split=True)
        else:
            out[e.hf] = np.ascontiguousarray(a)
    return out


def from_hf_state_dict(cfg: ModelConfig, sd: Dict[str, np.ndarray], *, rope_interleave: bool = True,
                       source: str = "checkpoint"):
    """Checkpoint tensors -> (params, buffers, unused keys) for `cfg`; ValueError names the key.

    Every tensor the config needs must be present with the shape the config implies; keys the
    config does not use (e.g. MTP layers when cfg.n_mtp_modules is 0) are returned as `unused`.
    """
    params: Dict[str, np.ndarray] = {}
    buffers: Dict[str, np.ndarray] = {}
    used = set()

    def get(name: str, shape: tuple) -> np.ndarray:
        if name not in sd:
            missing = [n for e in _entries(cfg) if e.kind not in ("shared", "empty")
                       for n in (e.hf if e.kind == "stack" else [e.hf]) if n not in sd]
            raise ValueError(f"{source}: missing tensor {name!r} ({len(missing)} missing for this "
                             f"config; first: {missing[:3]})")
        a = sd[name]
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {list(a.shape)}, the config "
                             f"needs {list(shape)}")
        used.add(name)
        return a

    for e in _entries(cfg):
        if e.kind == "stack":
            params[e.tm] = np.stack([get(n, e.shape) for n in e.hf])
        elif e.kind == "buffer":
            buffers[e.tm] = get(e.hf, e.shape)
        elif e.kind == "empty":
            if e.hf in sd:
                get(e.hf, e.shape)
        elif e.kind == "shared":
            if e.hf in sd:     # the released checkpoint repeats the shared embed/head per MTP layer
                a = get(e.hf, e.shape)
                main = params[e.tm]
                if not np.array_equal(a, main):
                    raise ValueError(f"{source}: tensor {e.hf!r} differs from the main "
                                     f"{'model.embed_tokens' if e.tm == 'embed' else 'lm_head'}"
                                     f".weight; tinymoe's MTP modules share them")
        else:
            a = get(e.hf, e.shape)
            if e.kind in ("q_rope", "kv_rope") and not rope_interleave:
                a = _rope_rows(a, e.kind, cfg, to_half_split=False)
            params[e.tm] = a
    unused = sorted(set(sd) - used)
    return params, buffers, unused


# ================================================================================================
# safetensors files (read without executing anything)
# ================================================================================================

def _fp8_e4m3_table() -> np.ndarray:
    """[256] float32: the value of every float8 e4m3fn byte (bias 7, no inf, 0x7f/0xff = NaN)."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    val = np.where(exp == 0, man / 8.0 * 2.0 ** -6, (1 + man / 8.0) * 2.0 ** (exp - 7.0))
    val = np.where((exp == 15) & (man == 7), np.nan, val)
    return (sign * val).astype(np.float32)


def _decode(name: str, info: dict, src: str) -> Tuple[np.ndarray, str]:
    """One safetensors entry -> (array, dtype tag). BF16 -> float32 exactly; F8 stays raw uint8."""
    dt, shape, data = info["dtype"], tuple(info["shape"]), info["data"]
    simple = {"F32": np.float32, "F64": np.float64, "F16": np.float16}
    if dt in simple:
        a = np.frombuffer(data, dtype=np.dtype(simple[dt]).newbyteorder("<")).reshape(shape)
        return a.astype(np.float32 if dt == "F16" else a.dtype.newbyteorder("=")), dt
    if dt == "BF16":
        u = np.frombuffer(data, dtype="<u2").reshape(shape).astype(np.uint32) << 16
        return u.view(np.float32), dt
    if dt == "F8_E4M3":
        return np.frombuffer(data, dtype=np.uint8).reshape(shape), dt
    raise ValueError(f"{src}: tensor {name!r} has dtype {dt}, which tinymoe does not read "
                     f"(float32/float64/float16/bfloat16, or float8 e4m3 with weight_scale_inv)")


def read_safetensors(path: str, hf_config: Optional[dict] = None):
    """A checkpoint directory's tensors -> ({name: float array}, source dtypes, dequantized names).

    Reads model.safetensors, or every shard named by model.safetensors.index.json. FP8 (e4m3)
    weights are dequantized with their `<name>_scale_inv` block scales ([OFF] weight_dequant:
    W = W8 * scale_inv[i // bo, j // bi], blocks from quantization_config.weight_block_size,
    default 128 x 128); an FP8 tensor without its scale is an error naming it.
    """
    st = _need_safetensors()
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        with open(index, "r", encoding="utf-8") as f:
            wm = json.load(f).get("weight_map")
        if not isinstance(wm, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        files = sorted(set(wm.values()))
        for fn in files:
            if os.path.basename(fn) != fn:
                raise ValueError(f"{index}: shard name {fn!r} must be a plain file name")
    elif os.path.isfile(single):
        files = ["model.safetensors"]
    else:
        pickled = [f for f in ("pytorch_model.bin", "model.bin", "pytorch_model.bin.index.json")
                   if os.path.exists(os.path.join(path, f))]
        if pickled:
            raise ValueError(f"{path}: only {pickled[0]} found; tinymoe never reads pickle-based "
                             f"files (they can run code). Convert the checkpoint to safetensors")
        raise ValueError(f"{path}: no model.safetensors or model.safetensors.index.json")
    raw: Dict[str, Tuple[np.ndarray, str]] = {}
    for fn in files:
        full = os.path.join(path, fn)
        try:
            with open(full, "rb") as f:
                entries = st.deserialize(f.read())
        except Exception as e:       # safetensors raises its own error types
            raise ValueError(f"{full}: not a readable safetensors file ({e})") from None
        for name, info in entries:
            if name in raw:
                raise ValueError(f"{full}: tensor {name!r} appears in more than one file")
            raw[name] = _decode(name, info, full)
    dtypes: Dict[str, int] = {}
    for _, dt in raw.values():
        dtypes[dt] = dtypes.get(dt, 0) + 1
    block = ((hf_config or {}).get("quantization_config") or {}).get("weight_block_size", [128, 128])
    table = None
    out: Dict[str, np.ndarray] = {}
    dequantized = []
    for name, (a, dt) in raw.items():
        if name.endswith("_scale_inv") and name[:-len("_scale_inv")] in raw:
            continue                                    # consumed with its weight below
        if dt != "F8_E4M3":
            out[name] = a
            continue
        sname = name + "_scale_inv"
        if sname not in raw:
            raise ValueError(f"{path}: FP8 tensor {name!r} has no {sname!r}; cannot dequantize")
        if table is None:
            table = _fp8_e4m3_table()
        s = raw[sname][0].astype(np.float32)
        if a.ndim != 2:
            raise ValueError(f"{path}: FP8 tensor {name!r} must be 2-D, got shape {list(a.shape)}")
        bo, bi = int(block[0]), int(block[1])
        need = (-(-a.shape[0] // bo), -(-a.shape[1] // bi))
        if tuple(s.shape) != need:
            raise ValueError(f"{path}: {sname!r} has shape {list(s.shape)}, weight {list(a.shape)} "
                             f"with {bo}x{bi} blocks needs {list(need)}")
        scale = np.repeat(np.repeat(s, bo, axis=0), bi, axis=1)[:a.shape[0], :a.shape[1]]
        out[name] = table[a] * scale
        dequantized.append(name)
    return out, dtypes, sorted(dequantized)


# ================================================================================================
# load / save
# ================================================================================================

def _mtp_layer_summary(keys: List[str]) -> str:
    groups: Dict[str, int] = {}
    for k in keys:
        m = re.match(r"(model\.layers\.\d+)\.", k)
        g = m.group(1) + ".*" if m else k
        groups[g] = groups.get(g, 0) + 1
    return ", ".join(f"{g} ({n} tensors)" if n > 1 else g for g, n in sorted(groups.items()))


def load_pretrained(path: str, *, dtype=np.float32, mtp=False, return_report: bool = False):
    """A Hugging Face DeepSeek-V3 checkpoint directory -> Model (float32 unless dtype says float64).

    mtp=False loads the main model only (as transformers does) and reports the MTP layers'
    tensors as unused; mtp=True also loads the num_nextn_predict_layers MTP modules.
    Unused tensors raise an HFUnusedKeysWarning listing them (never silently dropped); with
    return_report=True the result is (model, HFLoadReport). Any missing tensor, wrong shape,
    unsupported config value or FP8 weight without its scale is a ValueError naming the key, raised
    before a model exists.
    """
    from tinymoe.model import Model
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise TypeError(f"dtype: {dtype} is not supported; use float32 or float64")
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{path}: no config.json (expected a Hugging Face checkpoint directory)")
    with open(cfg_path, "r", encoding="utf-8") as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    cfg = config_from_hf(hf, mtp=mtp, source=cfg_path)
    interleave = hf.get("rope_interleave", True)
    interleave = True if interleave is None else bool(interleave)
    sd, dtypes, deq = read_safetensors(path, hf)
    params, buffers, unused = from_hf_state_dict(cfg, sd, rope_interleave=interleave, source=path)
    params = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    buffers = {k: np.asarray(v, dtype=dtype) for k, v in buffers.items()}
    model = Model.from_params(cfg, params, buffers, source=path)
    if unused:
        warnings.warn(f"{path}: {len(unused)} checkpoint tensor(s) not used by this tinymoe model: "
                      f"{_mtp_layer_summary(unused)}" +
                      (" (MTP layers: load with mtp=True to use them)"
                       if not cfg.n_mtp_modules and hf.get("num_nextn_predict_layers") else ""),
                      HFUnusedKeysWarning, stacklevel=2)
    if return_report:
        return model, HFLoadReport(path, unused, dtypes, deq, interleave, hf)
    return model


def save_pretrained(model, path: str, *, rope_interleave: bool = True,
                    include_mtp: bool = True) -> None:
    """Write `path`/config.json and `path`/model.safetensors (float32) that transformers loads.

    Files are written to temporary names and renamed into place. MTP modules are written as the
    released checkpoint does (layer index n_layers + k); transformers loads the main model and
    lists those keys as unexpected (it ignores only layer 61), so pass include_mtp=False for a
    directory transformers loads without any report. rope_interleave=False writes the rope rows in
    half-split order with "rope_interleave": false.
    """
    _need_safetensors()
    from safetensors.numpy import save_file
    cfg = model.config
    hf = config_to_hf(cfg, rope_interleave=rope_interleave, include_mtp=include_mtp)
    sd = to_hf_state_dict(model, rope_interleave=rope_interleave, include_mtp=include_mtp)
    sd = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    if os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        raise ValueError(f"{path}: holds a sharded checkpoint (model.safetensors.index.json); "
                         f"save into an empty directory")
    tmp_st = os.path.join(path, ".model.safetensors.tmp")
    tmp_cfg = os.path.join(path, ".config.json.tmp")
    save_file(sd, tmp_st, metadata={"format": "pt"})
    with open(tmp_cfg, "w", encoding="utf-8") as f:
        json.dump(hf, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp_st, os.path.join(path, "model.safetensors"))
    os.replace(tmp_cfg, os.path.join(path, "config.json"))

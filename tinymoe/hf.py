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
it, so the math inside tinymoe has one convention. A loaded model remembers its file's layout
(`model.hf_rope_interleave`); to_hf_state_dict and save_pretrained use it unless told otherwise,
so gradients and saved weights come out in the layout the model was loaded from.

Config (reference/deepseek.md section 1). Every value is type-checked, never coerced ("false" is
not a boolean, true is not a count, 2.9 is not 2, n_group 0 is not 1): a bad value is a one-line
ValueError naming config.json, the key, the value and the rule. hidden_size -> dim, intermediate_size -> inter_dim,
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

import errno
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np

from tinymoe.atomic import fsync_dir
from tinymoe.config import ModelConfig

__all__ = ["load_pretrained", "save_pretrained", "to_hf_state_dict", "from_hf_state_dict",
           "config_from_hf", "config_to_hf", "read_safetensors", "HFLoadReport",
           "HFUnusedKeysWarning", "HF_MODEL_TYPE", "rope_half_split_perm"]

HF_MODEL_TYPE = "deepseek_v3"
HF_ARCH = "DeepseekV3ForCausalLM"
HF_LATENT_NORM_EPS = 1e-6        # transformers' q_a_layernorm / kv_a_layernorm eps (fixed)
HF_LAYOUT_ATTR = "hf_rope_interleave"   # set on a loaded model: its file's RoPE row layout

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


_MISSING = object()


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


class _Keys:
    """Typed reads of one JSON object (config.json or a nested rope dict); a bad value is a
    one-line ValueError naming the file, the key, the value and the rule. Nothing is coerced:
    "false" is not False, true is not 1, 2.9 is not 2 (2.0 is accepted as 2)."""

    def __init__(self, d: dict, src: str, where: str = ""):
        self.d, self.src, self.where = d, src, where

    def fail(self, key: str, rule: str):
        raise ValueError(f"{self.src}: {self.where}{key} = {self.d.get(key)!r}: {rule}")

    def int(self, key: str, default=None, minimum: int = 1, null=_MISSING, note: str = ""):
        """An integer >= minimum; `default` when absent; `null` (if given) when JSON null."""
        if key not in self.d:
            return default
        v = self.d[key]
        if v is None and null is not _MISSING:
            return null
        rule = f"must be an integer >= {minimum}" + (" or null" if null is not _MISSING else "") + note
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            self.fail(key, rule + (" (a JSON boolean is not a number)" if isinstance(v, bool) else ""))
        if isinstance(v, float) and not (math.isfinite(v) and v.is_integer()):
            self.fail(key, rule + " (no fractional part)")
        if v < minimum:
            self.fail(key, rule)
        return int(v)

    def float(self, key: str, default=None, positive: bool = True, null=_MISSING):
        """A finite number (> 0 if positive); `default` when absent; `null` when JSON null."""
        if key not in self.d:
            return default
        v = self.d[key]
        if v is None and null is not _MISSING:
            return null
        rule = ("must be a positive finite number" if positive else "must be a finite number") + \
            (" or null" if null is not _MISSING else "")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                or (positive and v <= 0):
            self.fail(key, rule)
        return float(v)

    def bool(self, key: str, default: bool) -> bool:
        """JSON true or false (a string such as "false" is refused, it would read as True)."""
        if key not in self.d:
            return default
        v = self.d[key]
        if not isinstance(v, bool):
            self.fail(key, "must be true or false (a JSON boolean)")
        return v

    def str(self, key: str, default: str) -> str:
        v = self.d.get(key, default)
        if not isinstance(v, str):
            self.fail(key, "must be a string")
        return v


def _rope_from_hf(hf: dict, src: str) -> dict:
    """ModelConfig RoPE fields (max_seq_len, original_seq_len, rope_theta, YaRN) from an HF config."""
    top = _Keys(hf, src)
    max_pos = top.int("max_position_embeddings", HF_DEFAULTS["max_position_embeddings"])
    rp, rs = hf.get("rope_parameters"), hf.get("rope_scaling")
    for key, v in (("rope_parameters", rp), ("rope_scaling", rs)):
        if v is not None and not isinstance(v, dict):
            top.fail(key, "must be an object (or null)")
    if rp:
        params, where = dict(rp), "rope_parameters"
    elif rs:
        params, where = dict(rs), "rope_scaling"
    else:
        params, where = {}, "rope_parameters"
    rk = _Keys(params, src, where + ".")
    if "rope_theta" in params:
        theta = rk.float("rope_theta")
    else:
        theta = top.float("rope_theta", 10000.0)
    rtype = rk.str("rope_type", rk.str("type", "default"))
    if rk.float("partial_rotary_factor", 1.0) != 1.0:
        rk.fail("partial_rotary_factor", "DeepSeek rotates all qk_rope_head_dim values (must be 1.0)")
    out = dict(rope_theta=theta)
    if rtype == "default":
        # YaRN off in tinymoe: max_seq_len must not exceed original_seq_len.
        out.update(max_seq_len=max_pos, original_seq_len=max_pos)
        return out
    if rtype != "yarn":
        rk.fail("rope_type" if "rope_type" in params else "type",
                "not supported (DeepSeek-V3 uses 'default' or 'yarn')")
    if "original_max_position_embeddings" in params:
        orig = rk.int("original_max_position_embeddings")
    else:
        orig = top.int("original_max_position_embeddings")
    if orig is None:
        raise ValueError(f"{src}: {where}.original_max_position_embeddings is missing for YaRN")
    # transformers reads factor, beta_fast, beta_slow with `or` (null or 0 -> its default)
    factor = rk.float("factor", None, positive=False, null=None) or max_pos / orig
    if not factor > 1:
        rk.fail("factor", "YaRN needs a factor > 1")
    if max_pos <= orig:
        raise ValueError(
            f"{src}: max_position_embeddings = {max_pos} <= {where}.original_max_position_embeddings"
            f" = {orig}: YaRN must extend the context (tinymoe turns YaRN on iff "
            f"max_seq_len > original_seq_len, DeepSeek's rule)")
    if params.get("truncate", True) is not True:
        rk.fail("truncate", "only the truncated (floor/ceil) YaRN ramp of DeepSeek is supported")
    beta_fast = rk.float("beta_fast", None, positive=False, null=None) or 32
    beta_slow = rk.float("beta_slow", None, positive=False, null=None) or 1
    mscale = rk.float("mscale", None, positive=False, null=None)
    mscale_all = rk.float("mscale_all_dim", None, positive=False, null=None)
    att = rk.float("attention_factor", None, null=None)
    if att is None:      # transformers' rule for the cos/sin amplitude
        att = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
               if mscale and mscale_all else _yarn_mscale(factor, 1.0))
    if abs(att - 1.0) > 1e-12:
        raise ValueError(
            f"{src}: {where}: mscale = {mscale!r}, mscale_all_dim = {mscale_all!r}, attention_factor"
            f" = {params.get('attention_factor')!r} make transformers scale cos/sin by {att:.6g}; "
            f"DeepSeek (and tinymoe) have no such factor: set mscale == mscale_all_dim")
    out.update(max_seq_len=max_pos, original_seq_len=orig, rope_factor=float(factor),
               beta_fast=beta_fast, beta_slow=beta_slow, mscale=float(mscale_all or 0.0))
    return out


def config_from_hf(hf: dict, mtp=False, source: str = "config.json") -> ModelConfig:
    """An HF DeepSeek-V3 config dict -> ModelConfig (validated). ValueError names the bad key.

    Every value is type-checked, never coerced (a string "false", a boolean where a count belongs,
    2.9 experts, n_group 0 are each refused with the key, the value and the rule); a key left out
    takes transformers' default. mtp: False (default, like transformers: MTP layers are not
    loaded), True (as many MTP modules as num_nextn_predict_layers) or an int. Training-only
    tinymoe fields saved by save_pretrained under the "tinymoe" key are restored; the fields that
    define the math come from the HF keys.
    """
    src = source
    if not isinstance(hf, dict):
        raise ValueError(f"{src}: must hold a JSON object, got {type(hf).__name__}")
    k = _Keys(hf, src)
    mt = hf.get("model_type")
    if mt != HF_MODEL_TYPE:
        k.fail("model_type", f"only {HF_MODEL_TYPE!r} checkpoints are supported")
    if k.str("scoring_func", "sigmoid") != "sigmoid":
        k.fail("scoring_func", "DeepSeek-V3 routing is 'sigmoid'")
    if k.str("topk_method", "noaux_tc") != "noaux_tc":
        k.fail("topk_method", "DeepSeek-V3 routing is 'noaux_tc'")
    if k.str("hidden_act", "silu") != "silu":
        k.fail("hidden_act", "must be 'silu'")
    if k.bool("attention_bias", False):
        k.fail("attention_bias", "DeepSeek linears have no bias (must be false)")
    if k.bool("tie_word_embeddings", False):
        k.fail("tie_word_embeddings", "tinymoe keeps a separate output head (must be false)")
    k.bool("rope_interleave", True)
    if k.int("moe_layer_freq", 1) != 1:
        k.fail("moe_layer_freq", "every layer after first_k_dense_replace must be MoE (1)")

    def count(key, minimum=1, **kw):     # an integer, transformers' default when absent
        return k.int(key, HF_DEFAULTS[key], minimum, **kw)

    H = count("num_attention_heads")
    kvh = k.int("num_key_value_heads", None, null=None)
    if kvh is not None and kvh != H:
        k.fail("num_key_value_heads", f"must equal num_attention_heads = {H}")
    n_layers = count("num_hidden_layers")
    n_mtp_file = count("num_nextn_predict_layers", 0, null=0) if "num_nextn_predict_layers" in hf \
        else k.int("num_mtp_layers", 0, 0, null=0)
    if mtp is True:
        n_mtp = n_mtp_file
    elif mtp is False or mtp is None:
        n_mtp = 0
    else:
        if isinstance(mtp, bool) or not isinstance(mtp, (int, np.integer)) or mtp < 0:
            raise ValueError(f"mtp = {mtp!r}: must be False, True or a number of MTP modules >= 0")
        n_mtp = int(mtp)
        if n_mtp > n_mtp_file:
            raise ValueError(f"{src}: mtp = {n_mtp} modules requested but num_nextn_predict_layers = "
                             f"{n_mtp_file}")
    fields = {}
    extra = hf.get("tinymoe")
    if isinstance(extra, dict):      # our own training-only fields (save_pretrained writes them)
        keep = ("bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_alpha",
                "capacity_factor", "mtp_lambda", "init_std")
        fields.update({f: extra[f] for f in keep if f in extra})
    fields.update(
        vocab_size=count("vocab_size"), dim=count("hidden_size"),
        inter_dim=count("intermediate_size"), moe_inter_dim=count("moe_intermediate_size"),
        n_layers=n_layers, n_dense_layers=min(count("first_k_dense_replace", 0), n_layers),
        n_heads=H, n_routed_experts=count("n_routed_experts"),
        n_shared_experts=count("n_shared_experts", 0, null=0),     # null: none (DeepSeek's code)
        n_activated_experts=count("num_experts_per_tok"),
        n_expert_groups=count("n_group", note=" (1 = no group limit)"),
        n_limited_groups=count("topk_group", note=" (groups kept per token)"),
        score_func="sigmoid",
        route_scale=k.float("routed_scaling_factor", HF_DEFAULTS["routed_scaling_factor"]),
        q_lora_rank=count("q_lora_rank", null=0),                   # null: no query compression
        kv_lora_rank=count("kv_lora_rank"),
        qk_nope_head_dim=count("qk_nope_head_dim"), qk_rope_head_dim=count("qk_rope_head_dim"),
        v_head_dim=count("v_head_dim"),
        norm_eps=k.float("rms_norm_eps", HF_DEFAULTS["rms_norm_eps"]),
        latent_norm_eps=HF_LATENT_NORM_EPS, norm_topk_prob=k.bool("norm_topk_prob", True),
        n_mtp_modules=n_mtp, attn_type="mla")
    if "init_std" not in fields:
        init_std = k.float("initializer_range", None, null=None)
        if init_std is not None:
            fields["init_std"] = init_std
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


def _rope_layout(model, rope_interleave) -> bool:
    """The RoPE row layout to write: the argument, else the one the model was loaded from."""
    if rope_interleave is None:
        return bool(getattr(model, HF_LAYOUT_ATTR, True))
    if not isinstance(rope_interleave, (bool, np.bool_)):
        raise ValueError(f"rope_interleave = {rope_interleave!r}: must be True, False or None "
                         f"(None: the layout the model was loaded from, interleaved otherwise)")
    return bool(rope_interleave)


def to_hf_state_dict(model, tensors: Optional[Dict[str, np.ndarray]] = None, *,
                     rope_interleave: Optional[bool] = None,
                     include_mtp: bool = True) -> Dict[str, np.ndarray]:
    """tinymoe names and layouts -> checkpoint names and layouts.

    tensors=None: the model's parameters, router selection biases (e_score_correction_bias) and,
    for MTP modules, the copies of the shared embedding and head that the released checkpoint
    holds. tensors=a dict with the keys of model.params (e.g. gradients; buffers optional): the
    same mapping applied to it, so a port can compare gradient by gradient. rope_interleave: the
    layout of the rope rows (see the module docstring); None (default) = the layout of the file
    the model was loaded from (`model.hf_rope_interleave`, set by load_pretrained), interleaved
    for any other model; False = half-split. Arrays keep their dtype.
    """
    rope_interleave = _rope_layout(model, rope_interleave)
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


def _read_json(path: str):
    """A JSON file -> its value; unreadable or invalid JSON is a one-line ValueError naming it."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot be read ({e.strerror or e})") from None


def _shard_names(index: str, path: str) -> Dict[str, str]:
    """model.safetensors.index.json -> its weight_map {tensor name: shard file}, checked."""
    doc = _read_json(index)
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise ValueError(f"{index}: needs a non-empty 'weight_map' object "
                         f"{{tensor name: shard file name}}")
    for name, fn in wm.items():
        if not isinstance(fn, str) or not fn or os.path.basename(fn) != fn:
            raise ValueError(f"{index}: weight_map[{name!r}] = {fn!r}: must be a plain file name "
                             f"in {path}")
        if not os.path.isfile(os.path.join(path, fn)):
            raise ValueError(f"{index}: weight_map[{name!r}] names shard {fn!r}, which is not a "
                             f"file in {path}")
    return wm


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
    wm = None
    if os.path.isfile(index):
        wm = _shard_names(index, path)
        files = sorted(set(wm.values()))
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
            if wm is not None and wm.get(name, fn) != fn:
                raise ValueError(f"{full}: holds tensor {name!r}, which {index} places in "
                                 f"{wm[name]!r}")
    if wm is not None:           # every tensor the index lists must be in the shard it names
        lost = sorted(n for n in wm if n not in raw)
        if lost:
            raise ValueError(f"{index}: weight_map lists {len(lost)} tensor(s) that no shard holds, "
                             f"first {lost[0]!r} (said to be in {wm[lost[0]]!r})")
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
    hf = _read_json(cfg_path)
    cfg = config_from_hf(hf, mtp=mtp, source=cfg_path)
    interleave = _Keys(hf, cfg_path).bool("rope_interleave", True)   # validated just above
    sd, dtypes, deq = read_safetensors(path, hf)
    params, buffers, unused = from_hf_state_dict(cfg, sd, rope_interleave=interleave, source=path)
    params = {k: np.asarray(v, dtype=dtype) for k, v in params.items()}
    buffers = {k: np.asarray(v, dtype=dtype) for k, v in buffers.items()}
    model = Model.from_params(cfg, params, buffers, source=path)
    setattr(model, HF_LAYOUT_ATTR, interleave)   # to_hf_state_dict / save_pretrained default
    if unused:
        warnings.warn(f"{path}: {len(unused)} checkpoint tensor(s) not used by this tinymoe model: "
                      f"{_mtp_layer_summary(unused)}" +
                      (" (MTP layers: load with mtp=True to use them)"
                       if not cfg.n_mtp_modules and hf.get("num_nextn_predict_layers") else ""),
                      HFUnusedKeysWarning, stacklevel=2)
    if return_report:
        return model, HFLoadReport(path, unused, dtypes, deq, interleave, hf)
    return model


_RENAME_EXCHANGE = 2             # Linux renameat2 flag: swap two paths in one step


def _exchange(a: str, b: str) -> bool:
    """Swap two existing paths atomically (Linux renameat2); False where the system cannot."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False             # e.g. a filesystem without the flag: use two renames instead
    raise OSError(err, os.strerror(err), a)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _carry_over(src: str, dst: str, ours) -> None:
    """Every entry of the old export folder except our two files, into the new one (hard links
    where possible), so that tokenizer files and the like survive the swap."""
    def link_or_copy(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    for name in os.listdir(src):
        if name in ours:
            continue
        a, b = os.path.join(src, name), os.path.join(dst, name)
        if os.path.islink(a):
            os.symlink(os.readlink(a), b)
        elif os.path.isdir(a):
            shutil.copytree(a, b, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(a, b)


def save_pretrained(model, path: str, *, rope_interleave: Optional[bool] = None,
                    include_mtp: bool = True) -> None:
    """Write `path`/config.json and `path`/model.safetensors (float32) that transformers loads.

    The pair is written atomically: both files go into a temporary folder next to `path`
    (`.NAME.tmp-*`, fsync'ed; any other file already in `path` is carried over), which then
    replaces `path` in one rename exchange (Linux renameat2; elsewhere two renames, rolled back on
    error). Readers see the old export or the new one, never a mix. An OS error (full disk, no
    permission) is an OSError naming `path`, with `path` left as it was and nothing left behind;
    a process killed mid-save can leave only a `.NAME.tmp-*` folder, which may be deleted.

    rope_interleave: layout of the rope rows; None (default) = the layout the model was loaded
    from (so a half-split checkpoint is written back half-split), interleaved for any other
    model; False writes them half-split with "rope_interleave": false. MTP modules are written as
    the released checkpoint does (layer index n_layers + k); transformers loads the main model and
    lists those keys as unexpected (it ignores only layer 61), so pass include_mtp=False for a
    directory transformers loads without any report.
    """
    _need_safetensors()
    from safetensors.numpy import save as serialize
    cfg = model.config
    rope_interleave = _rope_layout(model, rope_interleave)
    hf = config_to_hf(cfg, rope_interleave=rope_interleave, include_mtp=include_mtp)
    sd = to_hf_state_dict(model, rope_interleave=rope_interleave, include_mtp=include_mtp)
    sd = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}
    files = {"model.safetensors": serialize(sd, metadata={"format": "pt"}),
             "config.json": (json.dumps(hf, indent=2, sort_keys=True) + "\n").encode()}
    path = os.fspath(path)
    target = os.path.realpath(path)        # a symlinked folder: replace what it points to
    if os.path.exists(target) and not os.path.isdir(target):
        raise ValueError(f"{path}: exists and is not a directory")
    if os.path.exists(os.path.join(target, "model.safetensors.index.json")):
        raise ValueError(f"{path}: holds a sharded checkpoint (model.safetensors.index.json); "
                         f"save into an empty directory")
    cwd = os.getcwd()
    if os.path.isdir(target) and os.path.commonpath([cwd, target]) == target:
        raise ValueError(f"{path}: is the current directory or contains it; the export folder is "
                         f"replaced as a whole, so save into another folder")
    parent, name = os.path.split(target)
    tmp = old = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)    # mkdtemp's 0700 would make the export private
        for fn, data in files.items():
            _write_file(os.path.join(tmp, fn), data)
        if os.path.isdir(target):
            _carry_over(target, tmp, files)
            fsync_dir(tmp)
            if not _exchange(tmp, target):
                old = tmp + ".old"
                os.rename(target, old)
                try:
                    os.rename(tmp, target)
                except OSError:
                    try:
                        os.rename(old, target)       # roll back: the old export stays
                    except OSError as e2:
                        raise OSError(e2.errno, f"{path}: save failed and the previous export "
                                                f"could not be put back; it is in {old}") from None
                    raise
                tmp = old                            # the old export is what remains to delete
        else:
            fsync_dir(tmp)
            os.rename(tmp, target)
            tmp = None
        fsync_dir(parent)
    except OSError as e:
        if old is not None and not os.path.exists(target):
            raise                                    # says where the old export is kept
        msg = f"{path}: cannot save the Hugging Face export ({e.strerror or e}); {path} is unchanged"
        raise (OSError(e.errno, msg) if e.errno is not None else OSError(msg)) from None
    finally:
        if tmp is not None:       # the new files after a failure, or the old export after a swap
            shutil.rmtree(tmp, ignore_errors=True)

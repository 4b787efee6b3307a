"""ModelConfig: presets, published shapes, every validation rule, JSON round trip."""
import dataclasses
import math

import pytest

from tinymoe import ModelConfig
from tinymoe.config import PRESETS

FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}


@pytest.mark.config
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_validate_and_round_trip(name):
    cfg = ModelConfig.preset(name)
    assert cfg.validate() is cfg
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.config
def test_bench_preset_shapes():
    c = ModelConfig.preset("bench")
    assert (c.dim, c.n_layers, c.n_dense_layers, c.n_heads) == (128, 4, 1, 8)
    assert (c.q_lora_rank, c.kv_lora_rank) == (96, 64)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (16, 8, 16)
    assert (c.n_routed_experts, c.n_expert_groups, c.n_limited_groups) == (16, 2, 1)
    assert (c.n_activated_experts, c.n_shared_experts) == (2, 1)
    assert (c.moe_inter_dim, c.inter_dim, c.vocab_size) == (64, 256, 256)
    assert c.score_func == "sigmoid" and c.route_scale == 2.5


@pytest.mark.config
def test_published_deepseek_shapes():
    # reference/deepseek.md section 1 ([OFF-cfg] config_671B.json / config_236B.json / config_16B.json)
    v3 = ModelConfig.preset("deepseek-v3")
    assert (v3.vocab_size, v3.dim, v3.inter_dim, v3.moe_inter_dim) == (129280, 7168, 18432, 2048)
    assert (v3.n_layers, v3.n_dense_layers, v3.n_heads) == (61, 3, 128)
    assert (v3.n_routed_experts, v3.n_shared_experts, v3.n_activated_experts) == (256, 1, 8)
    assert (v3.n_expert_groups, v3.n_limited_groups) == (8, 4)
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.qk_head_dim, v3.v_head_dim) == (1536, 512, 192, 128)
    assert v3.score_func == "sigmoid" and v3.route_scale == 2.5 and v3.renormalize
    assert v3.yarn and v3.rope_factor == 40 and v3.original_seq_len == 4096
    v2 = ModelConfig.preset("deepseek-v2")
    assert (v2.dim, v2.n_layers, v2.n_heads, v2.q_lora_rank) == (5120, 60, 128, 1536)
    assert (v2.n_routed_experts, v2.n_shared_experts, v2.n_activated_experts) == (160, 2, 6)
    assert (v2.n_expert_groups, v2.n_limited_groups, v2.route_scale) == (8, 3, 16.0)
    assert v2.score_func == "softmax" and not v2.renormalize and v2.mscale == 0.707
    lite = ModelConfig.preset("deepseek-v2-lite")
    assert (lite.dim, lite.n_layers, lite.n_heads, lite.q_lora_rank) == (2048, 27, 16, 0)
    assert (lite.n_routed_experts, lite.n_activated_experts, lite.moe_inter_dim) == (64, 6, 1408)
    toy = ModelConfig.preset("toy")
    assert (toy.n_expert_groups, toy.n_limited_groups, toy.qk_head_dim) == (4, 2, 12)
    assert not toy.yarn


@pytest.mark.config
def test_derived_properties():
    toy = ModelConfig.preset("toy")
    assert toy.kv_heads == 4                                    # mla/mha: one per head
    assert toy.replace(attn_type="mqa").kv_heads == 1
    assert toy.replace(attn_type="gqa", n_kv_heads=2).kv_heads == 2
    assert toy.replace(attn_type="gqa").kv_heads == 4           # 0 means n_heads
    assert [toy.is_moe_layer(l) for l in range(3)] == [False, True, True]
    assert toy.replace(norm_topk_prob=False).renormalize is False
    assert toy.replace(score_func="softmax").renormalize is False


# every rule of ModelConfig.validate, each as (overrides on "toy", field named in the message)
POSITIVE_INTS = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                 "max_seq_len", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                 "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                 "v_head_dim", "original_seq_len"]
NONNEG_INTS = ["n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_modules", "n_kv_heads"]
POSITIVE_FLOATS = [n for n in ("rope_theta", "rope_factor", "norm_eps", "latent_norm_eps",
                               "route_scale", "init_std") if n in FIELDS]
NONNEG_FLOATS = ["bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_alpha",
                 "mtp_lambda", "mscale"]

BAD = ([({n: 0}, n, "positive integer") for n in POSITIVE_INTS]
       + [({n: 2.0}, n, "positive integer") for n in ("dim", "n_heads")]
       + [({"dim": True}, "dim", "positive integer")]
       + [({n: -1}, n, "non-negative integer") for n in NONNEG_INTS]
       + [({n: v}, n, "positive finite") for n in POSITIVE_FLOATS for v in (0.0, math.inf, True)]
       + [({n: v}, n, "non-negative finite") for n in NONNEG_FLOATS for v in (-0.1, math.nan)]
       + [({"beta_fast": 0}, "beta_fast", "positive finite"),
          ({"beta_slow": -1}, "beta_slow", "positive finite"),
          ({"beta_fast": 1, "beta_slow": 1}, "beta_fast", "must be > beta_slow"),
          ({"n_dense_layers": 4}, "n_dense_layers", "must be <= n_layers = 3"),
          ({"score_func": "relu"}, "score_func", "must be one of"),
          ({"attn_type": "linear"}, "attn_type", "must be one of"),
          ({"qk_rope_head_dim": 3}, "qk_rope_head_dim", "must be even"),
          ({"n_activated_experts": 9}, "n_activated_experts", "<= n_routed_experts = 8"),
          ({"n_expert_groups": 3}, "n_expert_groups", "must divide n_routed_experts = 8"),
          ({"n_limited_groups": 5}, "n_limited_groups", "<= n_expert_groups = 4"),
          ({"n_limited_groups": 1, "n_activated_experts": 3}, "n_activated_experts",
           "reachable under the group limit"),
          ({"n_expert_groups": 8}, "n_expert_groups", "every group needs >= 2 experts"),
          ({"capacity_factor": 0.0}, "capacity_factor", "None \\(dropless\\) or a positive"),
          ({"capacity_factor": True}, "capacity_factor", "None \\(dropless\\) or a positive"),
          ({"attn_type": "gqa", "n_kv_heads": 3}, "n_kv_heads", "must divide n_heads = 4"),
          ({"norm_topk_prob": 1}, "norm_topk_prob", "None, True or False")]
       # values past these overflow the forward into silent zeros (an inf mean square in RMSNorm)
       + [({"route_scale": 1e38}, "route_scale", "must be <= 100"),
          ({"init_std": 1e20}, "init_std", "must be <= 1"),
          ({"norm_eps": 1e300}, "norm_eps", "must be <= 1"),
          ({"latent_norm_eps": 2.0}, "latent_norm_eps", "must be <= 1"),
          ({"bias_update_speed": 5.0}, "bias_update_speed", "must be <= 1")])


@pytest.mark.config
@pytest.mark.parametrize("overrides,field,rule", BAD, ids=[f"{b[1]}={list(b[0].values())}" for b in BAD])
def test_every_rule_names_the_field(overrides, field, rule):
    with pytest.raises(ValueError, match=f"ModelConfig.{field} = .*{rule}"):
        ModelConfig.preset("toy", **overrides)


@pytest.mark.config
def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="preset name 'tiny': must be one of"):
        ModelConfig.preset("tiny")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['hidden_size'\]"):
        ModelConfig.preset("toy", hidden_size=32)
    with pytest.raises(ValueError, match="unknown field"):
        ModelConfig.from_json('{"dim": 32, "n_experts": 4}')


@pytest.mark.config
def test_replace_validates_and_copies():
    toy = ModelConfig.preset("toy")
    big = toy.replace(dim=64)
    assert big.dim == 64 and toy.dim == 32
    with pytest.raises(ValueError, match="ModelConfig.dim"):
        toy.replace(dim=-1)

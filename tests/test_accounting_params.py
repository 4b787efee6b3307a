"""Parameter and FLOP accounting: published totals, hand arithmetic, and real arrays' shapes."""
from __future__ import annotations

import os

import pytest

from tinymoe.accounting import count_params, flops_per_token
from tinymoe.config import ModelConfig


@pytest.mark.accounting
def test_deepseek_v3_total_and_active_exact():
    """V3 '671B / 37B' (the arithmetic is spelled out in tinymoe/accounting.py)."""
    pc = count_params(ModelConfig.preset("deepseek-v3"))
    assert pc.total == 671_026_404_352
    # per expert 3*2048*7168 = 44,040,192; 58 MoE layers each skip 248 experts per token
    assert pc.active == 671_026_404_352 - 129280 * 7168 - 58 * 248 * 44_040_192
    assert pc.active == 36_625_603_584
    assert round(pc.total / 1e9) == 671 and round(pc.active / 1e9) == 37
    assert pc.embedding == pc.head == 129280 * 7168
    assert pc.mtp == 0
    # MTP: one MoE block (11,507,286,016) + enorm + hnorm + eh_proj 7168 x 14336 + its norm
    with_mtp = count_params(ModelConfig.preset("deepseek-v3"), include_mtp=True)
    assert with_mtp.mtp == 11_507_286_016 + 2 * 7168 + 7168 * 14336 + 7168
    assert with_mtp.total == pc.total + with_mtp.mtp


@pytest.mark.accounting
@pytest.mark.parametrize("preset, total, active, label", [
    # V2: 1 dense + 59 MoE layers of 160 experts (3*1536*5120 each), K 6, 2 shared
    ("deepseek-v2", 235_741_434_880, 20_851_512_320, (235.7, 20.9)),
    # V2-Lite: no q compression, 1 dense + 26 MoE layers of 64 experts (3*1408*2048), K 6
    ("deepseek-v2-lite", 15_706_484_224, 2_451_435_008, (15.7, 2.45)),
])
def test_deepseek_v2_presets(preset, total, active, label):
    pc = count_params(ModelConfig.preset(preset))
    assert (pc.total, pc.active) == (total, active)
    # the papers' rounded figures (in billions)
    assert abs(pc.total / 1e9 - label[0]) < 0.05 and abs(pc.active / 1e9 - label[1]) < 0.05


@pytest.mark.accounting
def test_v2_active_by_hand():
    c = ModelConfig.preset("deepseek-v2")
    per_expert = 3 * 1536 * 5120
    pc = count_params(c)
    assert pc.routed_experts == 59 * 160 * per_expert
    assert pc.active == pc.total - 102400 * 5120 - 59 * (160 - 6) * per_expert


@pytest.mark.accounting
@pytest.mark.parametrize("overrides", [
    {}, {"q_lora_rank": 0, "n_shared_experts": 0}, {"n_mtp_modules": 2},
    {"attn_type": "gqa", "n_kv_heads": 2}, {"attn_type": "mqa"}])
def test_total_equals_the_model_arrays(overrides):
    """count_params(cfg).total == the sizes of a real model's parameter arrays (no MTP)."""
    from tinymoe.model import Model
    cfg = ModelConfig.preset("toy", **overrides)
    model = Model(cfg, seed=0)
    main = sum(v.size for k, v in model.params.items() if not k.startswith("mtp."))
    mtp = sum(v.size for k, v in model.params.items() if k.startswith("mtp."))
    assert count_params(cfg).total == main
    assert count_params(cfg, include_mtp=True).total == main + mtp


@pytest.mark.accounting
def test_total_equals_saved_checkpoint_shapes(tmp_path):
    """The tensors of a saved Hugging Face directory (minus selection biases) add up to total."""
    pytest.importorskip("safetensors")
    from tinymoe.hf import read_safetensors, save_pretrained
    from tinymoe.model import Model
    cfg = ModelConfig.preset("toy", q_lora_rank=0)
    save_pretrained(Model(cfg, seed=1), tmp_path)
    sd, _, _ = read_safetensors(str(tmp_path))
    n = sum(v.size for k, v in sd.items() if not k.endswith("e_score_correction_bias"))
    assert n == count_params(cfg).total
    fx = os.path.join(os.path.dirname(__file__), "fixtures", "hf", "noqlora_halfsplit")
    if os.path.isdir(fx):           # a checkpoint written by transformers itself
        from tinymoe.hf import config_from_hf
        import json
        with open(os.path.join(fx, "config.json")) as f:
            fcfg = config_from_hf(json.load(f))
        sd, _, _ = read_safetensors(fx)
        n = sum(v.size for k, v in sd.items() if not k.endswith("e_score_correction_bias"))
        assert n == count_params(fcfg).total


@pytest.mark.accounting
def test_active_counts_k_experts_and_the_head():
    cfg = ModelConfig.preset("toy")             # V 64, D 32, 2 MoE layers, E 8, K 2, F 16
    pc = count_params(cfg)
    one = 3 * 16 * 32
    assert pc.total - pc.active == 64 * 32 + 2 * (8 - 2) * one
    dense = count_params(cfg.replace(n_activated_experts=8, n_expert_groups=1, n_limited_groups=1))
    assert dense.active == dense.total - dense.embedding


@pytest.mark.accounting
def test_flops_per_token_by_hand():
    """Toy config, counted matrix by matrix with explicit loops over the layers."""
    c = ModelConfig.preset("toy")
    D, H, V = c.dim, c.n_heads, c.vocab_size
    Dn, Dr, Dv, Dq, Dc = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.q_lora_rank, c.kv_lora_rank
    mats = 0
    for l in range(c.n_layers):
        mats += Dq * D + H * (Dn + Dr) * Dq + (Dc + Dr) * D + H * (Dn + Dv) * Dc + D * H * Dv
        if l < c.n_dense_layers:
            mats += 3 * c.inter_dim * D
        else:
            mats += c.n_routed_experts * D                                   # router
            mats += (c.n_activated_experts + c.n_shared_experts) * 3 * c.moe_inter_dim * D
    mats += V * D                                                            # head
    ctx = 16
    attn = c.n_layers * 2 * H * (Dn + Dr + Dv) * (ctx + 1) / 2
    f = flops_per_token(c, ctx)
    assert f.matmul == 2 * mats and f.attention == attn
    assert f.forward == 2 * mats + attn and f.total == 3 * f.forward == f.forward + f.backward
    full = flops_per_token(c, ctx, causal=False)
    assert full.attention == c.n_layers * 2 * H * (Dn + Dr + Dv) * ctx
    with pytest.raises(ValueError, match="ctx"):
        flops_per_token(c, 0)


@pytest.mark.accounting
def test_flops_with_mtp_adds_a_block_and_a_head_pass():
    c = ModelConfig.preset("toy", n_mtp_modules=1)
    base, with_mtp = flops_per_token(c, 8), flops_per_token(c, 8, include_mtp=True)
    D, H = c.dim, c.n_heads
    block = (c.q_lora_rank * D + H * c.qk_head_dim * c.q_lora_rank
             + (c.kv_lora_rank + c.qk_rope_head_dim) * D
             + H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank + D * H * c.v_head_dim
             + c.n_routed_experts * D + (c.n_activated_experts + c.n_shared_experts) * 3 * c.moe_inter_dim * D)
    extra = block + 2 * D * D + c.vocab_size * D                     # block, eh_proj, head
    assert with_mtp.matmul - base.matmul == 2 * extra
    assert with_mtp.attention == base.attention * (c.n_layers + 1) / c.n_layers

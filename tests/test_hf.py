"""Hugging Face DeepSeek-V3 interop: parity with transformers, names/layouts, round trips, errors.

The reference outputs in tests/fixtures/hf/<case>/reference.npz were produced by transformers
(torch autograd for the gradients) from the checkpoint next to them, by
scripts/make_hf_fixtures.py; this file never imports torch or transformers. Cases:
    qlora_groups       q_lora set, 4 groups keep 2, norm_topk_prob true, rms_norm_eps 1e-5
    noqlora_halfsplit  q_lora null, rope_interleave false, norm_topk_prob false, K 3, 2 dense layers
    yarn_legacy        YaRN in rope_theta + rope_scaling form, mscale = mscale_all_dim = 0.707, Dr 8
    bf16_mtp           bfloat16 file, one MTP layer (num_nextn_predict_layers 1); its reference also
                       holds the MTP layer's logits in the serving engines' order (test_mtp_order.py)
    qlora_halfsplit_dr8  rope_interleave false with Dr 8, where the half-split permutation is not
                       its own inverse (with Dr 4 it is: noqlora_halfsplit cannot tell P from P^-1)
Every case has a nonzero selection bias (both signs) that changes some token's experts.
"""
from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import signal
import struct
import warnings

import numpy as np
import pytest

pytest.importorskip("safetensors")

from tinymoe.config import ModelConfig  # noqa: E402
from tinymoe.hf import (HFUnusedKeysWarning, config_from_hf, config_to_hf,  # noqa: E402
                        from_hf_state_dict, load_pretrained, read_safetensors,
                        rope_half_split_perm, save_pretrained, to_hf_state_dict)

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
CASES = ["qlora_groups", "noqlora_halfsplit", "yarn_legacy", "bf16_mtp", "qlora_halfsplit_dr8"]

# Tolerances of the issue, against transformers' float32 run (values of order 1):
LOGITS_ATOL = 1e-4      # max |logits - HF logits|
LOSS_ATOL = 1e-5        # |loss - HF loss|
GRAD_REL = 1e-4         # max |g - g_HF| / max |g_HF|, per tensor (float32 on both sides)


def _ref(case):
    return np.load(os.path.join(FIXTURES, case, "reference.npz"), allow_pickle=False)


def _load(case, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HFUnusedKeysWarning)
        return load_pretrained(os.path.join(FIXTURES, case), return_report=True, **kw)


def _targets(ids):
    """transformers' labels=input_ids: position t predicts token t+1; the last is ignored."""
    return np.concatenate([ids[:, 1:], np.full((ids.shape[0], 1), -100)], axis=1)


def _write_safetensors(path, tensors, metadata=None):
    """An independent safetensors writer: {name: (dtype tag, shape, raw bytes)} -> file."""
    header, off, blobs = {}, 0, []
    for name, (dt, shape, data) in tensors.items():
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    header["__metadata__"] = metadata or {"format": "pt"}
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def _f32(a):
    a = np.ascontiguousarray(a, dtype="<f4")
    return ("F32", a.shape, a.tobytes())


def _copy_case(case, tmp_path):
    dst = tmp_path / case
    shutil.copytree(os.path.join(FIXTURES, case), dst)
    os.remove(dst / "reference.npz")
    return dst


def _edit_config(path, **changes):
    with open(path / "config.json") as f:
        c = json.load(f)
    for k, v in changes.items():
        if v is _DELETE:
            c.pop(k, None)
        else:
            c[k] = v
    with open(path / "config.json", "w") as f:
        json.dump(c, f)


_DELETE = object()


def _rewrite_tensors(path, edit):
    sd, _, _ = read_safetensors(str(path))
    edit(sd)
    _write_safetensors(path / "model.safetensors", {k: _f32(v) for k, v in sd.items()})


# ---------------------------------------------------------------------------------------------
# parity with transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.hf
@pytest.mark.parametrize("case", CASES)
def test_parity_with_transformers(case):
    """Logits, chosen experts, loss and every gradient equal transformers' on the fixture.

    The gradients are mapped with to_hf_state_dict's default layout, which must be the file's
    (README snippet): on a half-split file with Dr 8 the interleaved layout is 100 % off."""
    ref = _ref(case)
    model, rep = _load(case)
    assert model.dtype == np.float32
    ids = ref["input_ids"]
    logits, routing = model.forward(ids, record_routing=True)
    assert np.abs(logits - ref["logits"]).max() < LOGITS_ATOL
    moe_layers = sorted(int(k.split(".")[1]) for k in ref.files if k.startswith("routing."))
    assert sorted(routing) == moe_layers
    for l in moe_layers:
        mine = np.sort(routing[l]["indices"], axis=-1)
        bad = np.flatnonzero((mine != ref[f"routing.{l}"]).any(-1))
        assert bad.size == 0, f"layer {l}: tokens {bad.tolist()} routed differently"
    loss, grads = model.loss_and_grads(ids, _targets(ids))
    assert abs(loss - float(ref["loss"])) < LOSS_ATOL
    g = to_hf_state_dict(model, grads)
    names = {k[len("grad."):] for k in ref.files if k.startswith("grad.")}
    assert set(g) == names
    for k in sorted(names):
        r = ref["grad." + k]
        scale = np.abs(r).max()
        err = np.abs(g[k] - r).max() / (scale if scale > 0 else 1.0)
        assert err < GRAD_REL, f"{k}: relative error {err:.3g}"


@pytest.mark.hf
def test_bias_decides_selection_not_weights(tol):
    """The fixtures' bias matters: routing on unbiased scores, or weights from biased, would fail."""
    ref = _ref("qlora_groups")
    model, _ = _load("qlora_groups")
    _, routing = model.forward(ref["input_ids"], record_routing=True)
    changed = 0
    for l, r in routing.items():
        b = model.buffers[f"layers.{l}.ffn.gate.bias"]
        assert (b < 0).any() and (b > 0).any()
        s = r["scores"]                                     # unbiased affinities [N, E]
        w = np.take_along_axis(s, r["indices"], axis=-1)
        expect = w / w.sum(-1, keepdims=True) * model.config.route_scale
        assert np.allclose(r["weights"], expect, rtol=tol["f32_rtol"], atol=tol["f32_atol"])
        plain = np.sort(np.argsort(-s, axis=-1)[:, :model.config.n_activated_experts], -1)
        changed += int((plain != ref[f"routing.{l}"]).any(-1).sum())
    assert changed > 0


@pytest.mark.hf
def test_float64_load_matches_transformers():
    ref = _ref("yarn_legacy")
    model, _ = _load("yarn_legacy", dtype=np.float64)
    assert model.params["embed"].dtype == np.float64
    assert np.abs(model.forward(ref["input_ids"]) - ref["logits"]).max() < LOGITS_ATOL


# ---------------------------------------------------------------------------------------------
# config and layout mapping
# ---------------------------------------------------------------------------------------------

@pytest.mark.hf
def test_config_mapping_of_fixtures():
    m, _ = _load("noqlora_halfsplit")
    c = m.config
    assert (c.q_lora_rank, c.norm_topk_prob, c.renormalize, c.route_scale) == (0, False, False, 1.5)
    assert (c.n_layers, c.n_dense_layers, c.n_expert_groups, c.n_limited_groups) == (4, 2, 2, 1)
    assert c.yarn is False and c.latent_norm_eps == 1e-6 and c.score_func == "sigmoid"
    m, _ = _load("qlora_groups")
    assert m.config.norm_eps == 1e-5 and m.config.latent_norm_eps == 1e-6
    m, _ = _load("yarn_legacy")
    c = m.config
    assert c.yarn and (c.max_seq_len, c.original_seq_len, c.rope_factor) == (256, 64, 4.0)
    assert (c.rope_theta, c.mscale, c.qk_rope_head_dim) == (100.0, 0.707, 8)


@pytest.mark.hf
@pytest.mark.parametrize("overrides", [
    {}, {"q_lora_rank": 0, "norm_topk_prob": False, "n_mtp_modules": 1},
    {"max_seq_len": 128, "original_seq_len": 32, "rope_factor": 4.0, "mscale": 0.707},
    {"max_seq_len": 128, "original_seq_len": 32, "mscale": 0.0}])
def test_config_round_trip(overrides):
    cfg = ModelConfig.preset("toy", bias_update_speed=0.01, **overrides)
    hf = config_to_hf(cfg)
    assert hf["hidden_size"] == cfg.dim and hf["first_k_dense_replace"] == cfg.n_dense_layers
    assert hf["q_lora_rank"] == (cfg.q_lora_rank or None)
    if cfg.yarn:
        rp = hf["rope_parameters"]
        assert rp["rope_type"] == "yarn" and rp["mscale"] == rp["mscale_all_dim"] == cfg.mscale
        assert hf["rope_scaling"]["type"] == "yarn"
    back = config_from_hf(json.loads(json.dumps(hf)), mtp=True)
    for name in ("dim", "inter_dim", "moe_inter_dim", "n_layers", "n_dense_layers", "n_heads",
                 "n_routed_experts", "n_shared_experts", "n_activated_experts", "n_expert_groups",
                 "n_limited_groups", "route_scale", "q_lora_rank", "kv_lora_rank",
                 "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rope_theta", "norm_eps",
                 "max_seq_len", "n_mtp_modules", "bias_update_speed", "yarn", "renormalize"):
        assert getattr(back, name) == getattr(cfg, name), name
    if cfg.yarn:
        assert (back.original_seq_len, back.rope_factor, back.mscale) == \
            (cfg.original_seq_len, cfg.rope_factor, cfg.mscale)
    # the legacy form alone (DeepSeek's own config.json) gives the same config
    legacy = dict(hf)
    legacy.pop("rope_parameters")
    assert config_from_hf(legacy, mtp=True) == back


@pytest.mark.hf
def test_rope_half_split_permutation_is_transformers_rule(rng, tol):
    """Interleaved pairs on x == transformers' half-split rotation on P(x), up to the same P.

    Half-split (rotate_half): y_j = x'_j cos - x'_{j+h} sin, y_{j+h} = x'_{j+h} cos + x'_j sin,
    h = Dr/2, written as explicit loops; interleaved: y_{2j} = x_{2j} cos - x_{2j+1} sin, ...
    """
    dr = 8
    x = rng.standard_normal(dr)
    phi = rng.uniform(0, 6, dr // 2)
    inter = np.empty(dr)
    for j in range(dr // 2):
        inter[2 * j] = x[2 * j] * np.cos(phi[j]) - x[2 * j + 1] * np.sin(phi[j])
        inter[2 * j + 1] = x[2 * j] * np.sin(phi[j]) + x[2 * j + 1] * np.cos(phi[j])
    p = rope_half_split_perm(dr)
    xs = x[p]
    half = np.empty(dr)
    h = dr // 2
    for j in range(h):
        half[j] = xs[j] * np.cos(phi[j]) - xs[j + h] * np.sin(phi[j])
        half[j + h] = xs[j + h] * np.cos(phi[j]) + xs[j] * np.sin(phi[j])
    assert np.allclose(half, inter[p], atol=tol["f64_roundoff"])


@pytest.mark.hf
@pytest.mark.parametrize("case", CASES)
def test_save_reproduces_the_file(case, tmp_path):
    """load -> save (default arguments) writes the same tensors (bf16 now as float32) in the
    file's own layout, and the same layout flag."""
    model, rep = _load(case, mtp=(case == "bf16_mtp"))
    src, _, _ = read_safetensors(os.path.join(FIXTURES, case))
    save_pretrained(model, tmp_path / "out")
    out, dtypes, _ = read_safetensors(str(tmp_path / "out"))
    assert set(dtypes) == {"F32"}
    assert set(out) == set(src)
    for k in src:
        assert np.array_equal(out[k], src[k].astype(np.float32)), k
    with open(tmp_path / "out" / "config.json") as f:
        c = json.load(f)
    assert c["rope_interleave"] == rep.rope_interleave
    again, _ = load_pretrained(tmp_path / "out", mtp=True, return_report=True)
    for k, v in model.params.items():
        assert np.array_equal(again.params[k], v), k
    for k, v in model.buffers.items():
        assert np.array_equal(again.buffers[k], v), k


@pytest.mark.hf
def test_to_hf_state_dict_names_and_rope_rows():
    model, _ = _load("noqlora_halfsplit")
    sd = to_hf_state_dict(model)
    src, _, _ = read_safetensors(os.path.join(FIXTURES, "noqlora_halfsplit"))
    assert set(sd) == set(src)
    cfg = model.config
    wq = model.params["layers.0.attn.wq"].reshape(cfg.n_heads, cfg.qk_head_dim, cfg.dim)
    file_q = src["model.layers.0.self_attn.q_proj.weight"].reshape(wq.shape)
    dn, h = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim // 2
    # the file (half-split) holds rope row 2j at j and 2j+1 at h + j
    assert np.array_equal(file_q[:, dn:dn + h], wq[:, dn::2])
    assert np.array_equal(file_q[:, dn + h:], wq[:, dn + 1::2])
    assert np.array_equal(file_q[:, :dn], wq[:, :dn])
    e3 = src["model.layers.2.mlp.experts.3.down_proj.weight"]
    assert np.array_equal(model.params["layers.2.ffn.experts.w2"][3], e3)
    assert np.array_equal(model.buffers["layers.2.ffn.gate.bias"],
                          src["model.layers.2.mlp.gate.e_score_correction_bias"])
    grads = {k: np.zeros_like(v) for k, v in model.params.items()}
    assert set(to_hf_state_dict(model, grads)) == set(src) - {
        k for k in src if k.endswith("e_score_correction_bias")}
    with pytest.raises(ValueError, match="layers.0.attn.wq_b"):
        to_hf_state_dict(model, dict(grads, **{"layers.0.attn.wq_b": np.zeros(1)}))
    with pytest.raises(ValueError, match="missing key 'embed'"):
        to_hf_state_dict(model, {k: v for k, v in grads.items() if k != "embed"})


# ---------------------------------------------------------------------------------------------
# MTP keys: reported, or loaded on request
# ---------------------------------------------------------------------------------------------

@pytest.mark.hf
def test_mtp_keys_are_reported_not_dropped():
    path = os.path.join(FIXTURES, "bf16_mtp")
    mtp_keys = sorted(str(k) for k in _ref("bf16_mtp")["mtp_keys"])
    with pytest.warns(HFUnusedKeysWarning, match=r"model\.layers\.3\.\* \(44 tensors\)"):
        model, rep = load_pretrained(path, return_report=True)
    assert rep.unused == mtp_keys and len(mtp_keys) == 44
    assert model.config.n_mtp_modules == 0
    assert rep.source_dtypes == {"BF16": 135}
    with warnings.catch_warnings():
        warnings.simplefilter("error", HFUnusedKeysWarning)
        m2, rep2 = load_pretrained(path, mtp=True, return_report=True)
    assert rep2.unused == [] and m2.config.n_mtp_modules == 1
    src, _, _ = read_safetensors(path)
    assert np.array_equal(m2.params["mtp.0.eh_proj"], src["model.layers.3.eh_proj.weight"])
    assert np.array_equal(m2.params["mtp.0.norm"], src["model.layers.3.shared_head.norm.weight"])
    assert np.array_equal(m2.buffers["mtp.0.ffn.gate.bias"],
                          src["model.layers.3.mlp.gate.e_score_correction_bias"])


# ---------------------------------------------------------------------------------------------
# errors: clear, naming the key, before any model exists
# ---------------------------------------------------------------------------------------------

@pytest.mark.hf
@pytest.mark.parametrize("changes, match", [
    ({"model_type": "deepseek_v2"}, "model_type = 'deepseek_v2'"),
    ({"scoring_func": "softmax"}, "scoring_func = 'softmax'"),
    ({"topk_method": "greedy"}, "topk_method = 'greedy'"),
    ({"num_key_value_heads": 1}, "num_key_value_heads = 1"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}},
     "rope_type = 'linear'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                          "original_max_position_embeddings": 16, "mscale": 1.0,
                          "mscale_all_dim": 0.707}}, "mscale_all_dim"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0,
                          "original_max_position_embeddings": 64, "mscale": 1.0,
                          "mscale_all_dim": 1.0}}, "original_max_position_embeddings = 64"),
])
def test_unsupported_config_is_refused(tmp_path, changes, match):
    path = _copy_case("qlora_groups", tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=match):
        load_pretrained(path)


@pytest.mark.hf
def test_missing_and_misshapen_tensors_name_the_key(tmp_path):
    path = _copy_case("qlora_groups", tmp_path)
    key = "model.layers.1.mlp.experts.5.up_proj.weight"
    _rewrite_tensors(path, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=f"missing tensor '{key}'"):
        load_pretrained(path)
    key2 = "model.layers.0.self_attn.kv_b_proj.weight"
    _rewrite_tensors(path, lambda sd: (sd.__setitem__(key, np.zeros((8, 16), np.float32)),
                                       sd.__setitem__(key2, np.zeros((3, 8), np.float32))))
    with pytest.raises(ValueError, match=rf"'{key2}' has shape \[3, 8\], the config needs \[16, 8\]"):
        load_pretrained(path)


@pytest.mark.hf
def test_fp8_weights_dequantized_with_scales_and_refused_without(tmp_path):
    # e4m3fn bytes with known values: 0x38 = 1.0, 0x40 = 2.0, 0xB8 = -1.0, 0x01 = 2^-9
    # (subnormal), 0x7E = 448 (largest), 0x00 = 0
    table = {0x38: 1.0, 0x40: 2.0, 0xB8: -1.0, 0x01: 2.0 ** -9, 0x7E: 448.0, 0x00: 0.0}
    path = _copy_case("qlora_groups", tmp_path)
    sd, _, _ = read_safetensors(str(path))
    key = "model.layers.0.self_attn.o_proj.weight"            # [16, 8]
    codes = np.array(list(table), dtype=np.uint8)
    q = codes[np.arange(16 * 8).reshape(16, 8) % len(codes)]
    values = np.vectorize(table.get)(q).astype(np.float32)
    scale = np.array([[0.5, 0.25]], dtype=np.float32)         # blocks of 16 x 4 -> [1, 2]
    raw = {k: _f32(v) for k, v in sd.items() if k != key}
    raw[key] = ("F8_E4M3", (16, 8), q.tobytes())
    _edit_config(path, quantization_config={"quant_method": "fp8", "weight_block_size": [16, 4]})
    _write_safetensors(path / "model.safetensors", raw)
    with pytest.raises(ValueError, match=f"FP8 tensor '{key}' has no '{key}_scale_inv'"):
        load_pretrained(path)
    raw[key + "_scale_inv"] = _f32(scale)
    _write_safetensors(path / "model.safetensors", raw)
    model, rep = load_pretrained(path, return_report=True)
    expect = values * np.repeat(scale, 4, axis=1)
    assert np.array_equal(model.params["layers.0.attn.wo"], expect)
    assert rep.dequantized == [key] and rep.unused == []


@pytest.mark.hf
def test_pickle_checkpoints_are_never_read(tmp_path):
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "ckpt"
    path.mkdir()
    shutil.copy(os.path.join(FIXTURES, "qlora_groups", "config.json"), path / "config.json")
    with open(path / "pytorch_model.bin", "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="pytorch_model.bin.*never reads pickle"):
        load_pretrained(path)
    assert not marker.exists()


@pytest.mark.hf
def test_mtp_copies_must_match_the_shared_tensors(tmp_path):
    path = _copy_case("bf16_mtp", tmp_path)
    key = "model.layers.3.shared_head.head.weight"
    _rewrite_tensors(path, lambda sd: sd.__setitem__(key, sd[key] + 1.0))
    with pytest.raises(ValueError, match=f"'{key}' differs from the main lm_head"):
        load_pretrained(path, mtp=True)


@pytest.mark.hf
def test_from_hf_state_dict_reports_unknown_keys():
    cfg = config_from_hf(json.load(open(os.path.join(FIXTURES, "qlora_groups", "config.json"))))
    sd, _, _ = read_safetensors(os.path.join(FIXTURES, "qlora_groups"))
    sd["model.rotary_emb.inv_freq"] = np.zeros(2, np.float32)
    params, buffers, unused = from_hf_state_dict(cfg, sd)
    assert unused == ["model.rotary_emb.inv_freq"]
    assert len(buffers) == cfg.n_layers - cfg.n_dense_layers


# ---------------------------------------------------------------------------------------------
# issue 13: config.json validated (never coerced), index files, half-split layout round trip,
# atomic and error-checked save
# ---------------------------------------------------------------------------------------------

@pytest.mark.hf
@pytest.mark.parametrize("changes, match", [
    ({"norm_topk_prob": "false"}, r"norm_topk_prob = 'false': must be true or false"),
    ({"rope_interleave": "false"}, r"rope_interleave = 'false': must be true or false"),
    ({"norm_topk_prob": None}, r"norm_topk_prob = None: must be true or false"),
    ({"num_experts_per_tok": True}, r"num_experts_per_tok = True: must be an integer >= 1 "
                                    r"\(a JSON boolean is not a number\)"),
    ({"n_routed_experts": 2.9}, r"n_routed_experts = 2.9: must be an integer >= 1 "
                                r"\(no fractional part\)"),
    ({"n_group": 0}, r"n_group = 0: must be an integer >= 1"),
    ({"topk_group": 0}, r"topk_group = 0: must be an integer >= 1"),
    ({"hidden_size": "16"}, r"hidden_size = '16': must be an integer >= 1"),
    ({"q_lora_rank": 0}, r"q_lora_rank = 0: must be an integer >= 1 or null"),
    ({"first_k_dense_replace": -1}, r"first_k_dense_replace = -1: must be an integer >= 0"),
    ({"routed_scaling_factor": "2.5"}, r"routed_scaling_factor = '2.5': must be a positive"),
    ({"rms_norm_eps": 0}, r"rms_norm_eps = 0: must be a positive finite number"),
    ({"max_position_embeddings": "a lot"}, r"max_position_embeddings = 'a lot': must be an int"),
    ({"rope_parameters": "yarn"}, r"rope_parameters = 'yarn': must be an object"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "1e4"}},
     r"rope_parameters\.rope_theta = '1e4': must be a positive finite number"),
])
def test_config_values_are_validated_not_coerced(tmp_path, changes, match):
    """Each bad value: one line naming config.json, the key, the value and the rule."""
    path = _copy_case("qlora_groups", tmp_path)
    _edit_config(path, **changes)
    with pytest.raises(ValueError, match=r"config\.json: " + match) as e:
        load_pretrained(path)
    assert "\n" not in str(e.value)


@pytest.mark.hf
def test_integral_floats_are_accepted_and_n_group_keeps_its_meaning(tmp_path):
    """8.0 experts is 8 (nothing lost); n_group = 1 means no group limit, while the file's 4
    groups keep 2 (the parity test checks those logits against transformers)."""
    path = _copy_case("qlora_groups", tmp_path)
    _edit_config(path, n_routed_experts=8.0, num_experts_per_tok=2.0)
    m, _ = _load_dir(path)
    assert (m.config.n_routed_experts, m.config.n_activated_experts) == (8, 2)
    assert (m.config.n_expert_groups, m.config.n_limited_groups) == (4, 2)


def _load_dir(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HFUnusedKeysWarning)
        return load_pretrained(path, return_report=True, **kw)


def _shard(path, split_at="model.layers.1."):
    """Rewrite `path` as two shards + model.safetensors.index.json; returns the weight map."""
    sd, _, _ = read_safetensors(str(path))
    os.remove(path / "model.safetensors")
    first = {k: v for k, v in sd.items() if not k.startswith(split_at)}
    second = {k: v for k, v in sd.items() if k.startswith(split_at)}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    for fn, part in zip(names, (first, second)):
        _write_safetensors(path / fn, {k: _f32(v) for k, v in part.items()})
    wm = {**{k: names[0] for k in first}, **{k: names[1] for k in second}}
    with open(path / "model.safetensors.index.json", "w") as f:
        json.dump({"metadata": {}, "weight_map": wm}, f)
    return wm


@pytest.mark.hf
def test_sharded_checkpoint_and_bad_index_files(tmp_path):
    path = _copy_case("qlora_groups", tmp_path)
    ref, _ = _load("qlora_groups")
    wm = _shard(path)
    m, _ = _load_dir(path)
    for k, v in ref.params.items():
        assert np.array_equal(m.params[k], v), k
    index = path / "model.safetensors.index.json"
    good = index.read_text()
    key = "model.layers.1.mlp.gate.weight"
    bad = [("{not json", r"index\.json: not valid JSON"),
           (json.dumps({"weight_map": []}), r"index\.json: needs a non-empty 'weight_map' object"),
           (json.dumps({"weight_map": dict(wm, **{key: "model-00003.safetensors"})}),
            rf"index\.json: weight_map\['{key}'\] names shard 'model-00003.safetensors', which is "
            rf"not a file"),
           (json.dumps({"weight_map": dict(wm, **{key: "../model.safetensors"})}),
            r"must be a plain file name"),
           (json.dumps({"weight_map": dict(wm, **{"model.extra.weight": wm[key]})}),
            r"index\.json: weight_map lists 1 tensor\(s\) that no shard holds, first "
            r"'model.extra.weight'"),
           (json.dumps({"weight_map": dict(wm, **{key: "model-00001-of-00002.safetensors"})}),
            rf"00002\.safetensors: holds tensor '{key}', which .*index\.json places in "
            rf"'model-00001-of-00002\.safetensors'")]
    for text, match in bad:
        index.write_text(text)
        with pytest.raises(ValueError, match=match) as e:
            load_pretrained(path)
        assert "\n" not in str(e.value)
    index.write_text(good)
    assert _load_dir(path)[0].config == ref.config


@pytest.mark.hf
def test_half_split_dr8_rows_are_the_inverse_permutation_on_load(tol):
    """File row j <- interleaved row 2j, row Dr/2 + j <- row 2j + 1 (Dr = 8: P != P^-1)."""
    model, rep = _load("qlora_halfsplit_dr8")
    assert rep.rope_interleave is False and model.config.qk_rope_head_dim == 8
    cfg = model.config
    src, _, _ = read_safetensors(os.path.join(FIXTURES, "qlora_halfsplit_dr8"))
    dn, dr, h = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.qk_rope_head_dim // 2
    wq = model.params["layers.0.attn.wq_b"].reshape(cfg.n_heads, cfg.qk_head_dim, -1)
    fq = src["model.layers.0.self_attn.q_b_proj.weight"].reshape(wq.shape)
    kv = model.params["layers.0.attn.wkv_a"]
    fkv = src["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    c = cfg.kv_lora_rank
    for j in range(h):
        assert np.array_equal(fq[:, dn + j], wq[:, dn + 2 * j])
        assert np.array_equal(fq[:, dn + h + j], wq[:, dn + 2 * j + 1])
        assert np.array_equal(fkv[c + j], kv[c + 2 * j])
        assert np.array_equal(fkv[c + h + j], kv[c + 2 * j + 1])
    assert np.array_equal(fkv[:c], kv[:c]) and dr == 2 * h
    # an explicit layout still wins over the remembered one
    sd = to_hf_state_dict(model, rope_interleave=True)
    assert np.array_equal(sd["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"], kv)
    with pytest.raises(ValueError, match=r"rope_interleave = 'false': must be True, False or None"):
        to_hf_state_dict(model, rope_interleave="false")


def _same_model(a, b):
    return a.config == b.config and all(np.array_equal(a.params[k], v) for k, v in b.params.items())


@pytest.mark.hf
@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_save_is_atomic_whichever_step_fails(tmp_path, monkeypatch, exchange):
    """Fail the k-th rename of a save over an existing export, for every k: the folder then
    loads completely as the old model or the new one (never new weights with the old config),
    the error names the folder, a user's file in it survives, and no temporary file or folder is
    left. Both ways of swapping: one rename exchange (Linux), or two renames where there is none."""
    import tinymoe.hf as hf
    old_model, _ = _load("qlora_groups")
    new_model, _ = _load("noqlora_halfsplit")
    out = tmp_path / "export"
    save_pretrained(old_model, out)
    (out / "tokenizer.json").write_text("{}")
    real = {"rename": os.rename, "replace": os.replace,
            "_exchange": getattr(hf, "_exchange", None) if exchange else (lambda a, b: False)}
    for k in range(1, 10):
        calls = []

        def failing(name):
            def f(*a, **kw):
                if name == "_exchange" and not exchange:
                    return False                       # no exchange on this "system"
                calls.append(name)
                if len(calls) == k:
                    raise OSError(5, "Input/output error (injected)")
                return real[name](*a, **kw)
            return f
        monkeypatch.setattr(os, "rename", failing("rename"))
        monkeypatch.setattr(os, "replace", failing("replace"))
        if real["_exchange"] is not None and hasattr(hf, "_exchange"):
            monkeypatch.setattr(hf, "_exchange", failing("_exchange"))
        try:
            save_pretrained(new_model, out)
            failed = None
        except OSError as e:
            failed = e
        monkeypatch.undo()
        got, _ = _load_dir(out)          # a mixed pair fails here (new weights, old config)
        assert _same_model(got, new_model if failed is None else old_model), k
        assert (out / "tokenizer.json").read_text() == "{}"
        assert sorted(os.listdir(tmp_path)) == ["export"], os.listdir(tmp_path)
        names = set(os.listdir(out))
        assert names == {"config.json", "model.safetensors", "tokenizer.json"}, names
        if failed is None:
            break
        assert str(out) in str(failed) and "\n" not in str(failed)
    assert failed is None and k == (2 if exchange else 3)


@pytest.mark.hf
def test_full_disk_gives_one_line_error_and_leaves_nothing(tmp_path):
    """A write that the OS refuses (EFBIG from RLIMIT_FSIZE, the same failed write() as ENOSPC on
    a full disk): OSError naming the folder, no partial export, the old export intact."""
    model, _ = _load("qlora_groups")
    other, _ = _load("noqlora_halfsplit")
    out = tmp_path / "export"
    save_pretrained(other, out)
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    new = tmp_path / "new"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    errors = []
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, hard))   # config fits, weights do not
        for target in (new, out):
            try:
                save_pretrained(model, target)
            except Exception as e:       # noqa: BLE001 - the type is what is checked
                errors.append(e)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert len(errors) == 2
    for e, target in zip(errors, (new, out)):
        assert type(e) is OSError, repr(e)
        assert str(target) in str(e) and "\n" not in str(e) and "is unchanged" in str(e)
    assert not new.exists()
    assert sorted(os.listdir(tmp_path)) == ["export"]
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before

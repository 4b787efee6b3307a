"""The whole model: gradient check of every parameter tensor, MTP wiring, routing record, errors."""
import numpy as np
import pytest

from tinymoe.config import ModelConfig
from tinymoe.gradcheck import gradcheck_scalar
from tinymoe.model import Model, buffer_shapes, param_shapes

pytestmark = pytest.mark.model


def _cfg(**kw):
    base = dict(vocab_size=16, dim=8, inter_dim=12, moe_inter_dim=4, n_layers=2, n_dense_layers=1,
                n_heads=2, max_seq_len=8, n_routed_experts=4, n_shared_experts=1,
                n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, route_scale=2.5,
                q_lora_rank=6, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
                v_head_dim=2, init_std=0.5)
    base.update(kw)
    return ModelConfig(**base).validate()


def _routing_signature(model, tokens):
    _, _, cache = model.forward_train(tokens)
    return {k: c.indices.copy() for k, c in cache.moe_caches.items()}


def _check_whole_model(cfg, tol, seed=0, max_entries=3):
    model = Model(cfg, seed=seed, dtype=np.float64)
    rng = np.random.default_rng(seed)
    for k in model.buffers:                       # a nonzero selection bias
        model.buffers[k] = 0.05 * rng.standard_normal(model.buffers[k].shape)
    tokens = rng.integers(0, cfg.vocab_size, size=(2, 5))
    targets = rng.integers(0, cfg.vocab_size, size=(2, 5))
    targets[0, 1] = -100
    loss, grads = model.loss_and_grads(tokens, targets)
    assert set(grads) == set(model.params)
    base_routing = _routing_signature(model, tokens)

    def loss_fn():
        assert all(np.array_equal(base_routing[k], v)
                   for k, v in _routing_signature(model, tokens).items()), \
            "routing changed under the perturbation: pick another seed"
        return model.loss_and_grads(tokens, targets)[0]

    report = gradcheck_scalar(loss_fn, model.params, grads, max_entries=max_entries, seed=seed)
    report.assert_ok(tol["grad_rel"])
    return report


def test_gradcheck_whole_model_moe_mtp_balance(tol):
    cfg = _cfg(n_mtp_modules=1, mtp_lambda=0.3, aux_loss_alpha=0.01, seq_aux_loss_alpha=0.01,
               z_loss_alpha=0.001)
    report = _check_whole_model(cfg, tol)
    assert len(report.tensors) == len(param_shapes(cfg))


def test_gradcheck_whole_model_no_q_lora_softmax_router(tol):
    cfg = _cfg(q_lora_rank=0, score_func="softmax", n_expert_groups=1, n_limited_groups=1,
               route_scale=1.0, aux_loss_alpha=0.01)
    _check_whole_model(cfg, tol, seed=1)


def test_gradcheck_whole_model_gqa_baseline(tol):
    cfg = _cfg(attn_type="gqa", n_heads=4, n_kv_heads=2, n_mtp_modules=2)
    _check_whole_model(cfg, tol, seed=2)


def test_param_and_buffer_names_follow_official_code():
    cfg = _cfg(n_mtp_modules=1)
    names = set(param_shapes(cfg))
    for n in ["embed", "norm", "head", "layers.0.attn_norm", "layers.0.attn.wq_a",
              "layers.0.attn.q_norm", "layers.0.attn.wq_b", "layers.0.attn.wkv_a",
              "layers.0.attn.kv_norm", "layers.0.attn.wkv_b", "layers.0.attn.wo",
              "layers.0.ffn_norm", "layers.0.ffn.w1", "layers.1.ffn.gate",
              "layers.1.ffn.experts.w1", "layers.1.ffn.shared.w2", "mtp.0.eh_proj",
              "mtp.0.enorm", "mtp.0.hnorm", "mtp.0.norm", "mtp.0.ffn.gate"]:
        assert n in names, n
    assert param_shapes(cfg)["mtp.0.eh_proj"] == (cfg.dim, 2 * cfg.dim)
    assert param_shapes(cfg)["layers.1.ffn.experts.w2"] == (4, 8, 4)
    assert set(buffer_shapes(cfg)) == {"layers.1.ffn.gate.bias", "mtp.0.ffn.gate.bias"}
    assert not any(k.endswith("bias") for k in names)      # the bias is state, not a parameter


def test_forward_shapes_and_routing_record(tol):
    cfg = _cfg()
    model = Model(cfg, seed=0)
    tokens = np.random.default_rng(0).integers(0, 16, size=(3, 7))
    logits = model.forward(tokens)
    assert logits.shape == (3, 7, 16) and logits.dtype == np.float32
    logits2, routing = model.forward(tokens, record_routing=True)
    np.testing.assert_array_equal(logits, logits2)
    assert set(routing) == {1}
    r = routing[1]
    assert r["indices"].shape == (21, 2) and r["weights"].shape == (21, 2)
    assert r["scores"].shape == (21, 4)
    np.testing.assert_allclose(r["weights"].sum(axis=1), 2.5, rtol=tol["f32_rtol"])   # normalise, then scale


def test_mtp_does_not_change_main_logits_and_is_causal(tol):
    cfg = _cfg(n_mtp_modules=1)
    with_mtp = Model(cfg, seed=3, dtype=np.float64)
    without = Model.from_params(cfg.replace(n_mtp_modules=0),
                                {k: v for k, v in with_mtp.params.items() if not k.startswith("mtp.")},
                                {k: v for k, v in with_mtp.buffers.items() if not k.startswith("mtp.")})
    tokens = np.random.default_rng(0).integers(0, 16, size=(2, 6))
    logits, mtp_logits, _ = with_mtp.forward_train(tokens)
    np.testing.assert_array_equal(logits, without.forward(tokens))
    assert len(mtp_logits) == 1 and mtp_logits[0].shape == (2, 5, 16)
    # depth 1 at position i reads tokens <= i+1 only: changing tokens from i+2 on leaves it alone
    t2 = tokens.copy()
    t2[:, 4:] = (t2[:, 4:] + 1) % 16
    _, mtp2, _ = with_mtp.forward_train(t2)
    np.testing.assert_allclose(mtp2[0][:, :3], mtp_logits[0][:, :3], rtol=0,
                               atol=tol["f64_close"])
    assert not np.allclose(mtp2[0][:, 3:], mtp_logits[0][:, 3:])


def test_mtp_loss_term_is_weighted_cross_entropy_of_shifted_targets():
    cfg = _cfg(n_mtp_modules=2, mtp_lambda=0.3)
    model = Model(cfg, seed=4, dtype=np.float64)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 16, size=(2, 6))
    targets = rng.integers(0, 16, size=(2, 6))
    loss, _ = model.loss_and_grads(tokens, targets)
    _, mtp_logits, cache = model.forward_train(tokens)

    def ce(logits, t):   # explicit loop
        tot, n = 0.0, 0
        for b in range(t.shape[0]):
            for i in range(t.shape[1]):
                z = logits[b, i]
                tot += np.log(np.sum(np.exp(z - z.max()))) + z.max() - z[t[b, i]]
                n += 1
        return tot / n

    main = ce(model.forward(tokens), targets)
    expected = main + 0.3 / 2 * (ce(mtp_logits[0], targets[:, 1:]) + ce(mtp_logits[1], targets[:, 2:]))
    expected += cache.aux_loss
    assert loss == pytest.approx(expected, rel=1e-12)


def test_bad_input_errors():
    model = Model(_cfg(), seed=0)
    ok = np.zeros((1, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="token id 16 is outside"):
        model.forward(np.full((1, 4), 16))
    with pytest.raises(ValueError, match="token id -1"):
        model.forward(np.full((1, 4), -1))
    with pytest.raises(ValueError, match="max_seq_len=8"):
        model.forward(np.zeros((1, 9), dtype=np.int64))
    with pytest.raises(TypeError, match="tokens"):
        model.forward(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="targets"):
        model.loss_and_grads(ok, np.zeros((1, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="2 dimensions"):
        model.forward(np.zeros(4, dtype=np.int64))


def test_from_params_rejects_mismatched_arrays():
    cfg = _cfg()
    model = Model(cfg, seed=0)
    params = dict(model.params)
    params["layers.0.attn.wo"] = np.zeros((3, 3), dtype=np.float32)
    with pytest.raises(ValueError, match="layers.0.attn.wo"):
        Model.from_params(cfg, params)
    params = dict(model.params)
    del params["head"]
    with pytest.raises(ValueError, match="'head'"):
        Model.from_params(cfg, params)


def test_same_seed_same_weights_across_dtypes(tol):
    cfg = _cfg()
    a, b = Model(cfg, seed=7, dtype=np.float32), Model(cfg, seed=7, dtype=np.float64)
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=tol["f32_cast"])
    c = Model(cfg, seed=8)
    assert not np.array_equal(a.params["embed"], c.params["embed"])

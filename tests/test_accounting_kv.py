"""KV-cache accounting against DeepSeek-V2 Table 1 and the published per-token numbers
(reference/deepseek.md section 13), and against the bytes the caches really hold."""
from __future__ import annotations

import numpy as np
import pytest

from tinymoe.accounting import kv_cache_bytes, kv_cache_elements, kv_cache_elements_per_layer
from tinymoe.config import ModelConfig
from tinymoe.layers.mla import LatentKVCache, NaiveKVCache, init_mla_params, mla_decode


@pytest.mark.accounting
@pytest.mark.parametrize("preset, n_layers, mla", [
    ("deepseek-v3", 61, 35_136), ("deepseek-v2", 60, 34_560), ("deepseek-v2-lite", 27, 15_552)])
def test_mla_cache_published(preset, n_layers, mla):
    cfg = ModelConfig.preset(preset)
    assert cfg.n_layers == n_layers
    assert kv_cache_elements_per_layer(cfg, "mla") == 512 + 64 == 576
    assert kv_cache_elements(cfg, "mla") == mla
    assert kv_cache_bytes(cfg, "mla", 1) == 2 * mla          # bf16
    assert kv_cache_bytes(cfg, "mla", 1000, bytes_per_element=4) == 4000 * mla


@pytest.mark.accounting
def test_v3_table1_formulas():
    cfg = ModelConfig.preset("deepseek-v3")
    n_h, d_h, l = 128, 128, 61
    assert kv_cache_bytes(cfg, "mla", 1) == 70_272
    assert kv_cache_elements(cfg, "mha") == 2 * n_h * d_h * l == 1_998_848
    assert kv_cache_elements(cfg, "gqa", n_groups=8) == 2 * 8 * d_h * l
    assert kv_cache_elements(cfg, "gqa", n_groups=n_h) == kv_cache_elements(cfg, "mha")
    assert kv_cache_elements(cfg, "gqa", n_groups=1) == kv_cache_elements(cfg, "mqa") == 2 * d_h * l
    # MLA = (d_c + d_h^R) l = (9/2) d_h l, the cache of GQA with 2.25 groups
    assert kv_cache_elements(cfg, "mla") == 9 * d_h * l // 2 == 2 * 2.25 * d_h * l
    # Hugging Face's full per-head K/V cache: H (dq + dv) l = 40,960 * 61
    assert kv_cache_elements(cfg, "mla_naive") == 40_960 * 61 == 2_498_560
    assert ModelConfig.preset("deepseek-v2").n_layers * 2 * n_h * d_h == \
        kv_cache_elements(ModelConfig.preset("deepseek-v2"), "mha") == 1_966_080
    assert kv_cache_elements(ModelConfig.preset("deepseek-v2-lite"), "mha") == 2 * 16 * 128 * 27


@pytest.mark.accounting
def test_gqa_groups_default_and_errors():
    cfg = ModelConfig.preset("toy", attn_type="gqa", n_kv_heads=2)
    assert kv_cache_elements(cfg, "gqa") == 2 * (8 + 8) * 3
    with pytest.raises(ValueError, match="n_groups"):
        kv_cache_elements(ModelConfig.preset("toy"), "gqa")
    with pytest.raises(ValueError, match="divisor of n_heads = 4"):
        kv_cache_elements(cfg, "gqa", n_groups=3)
    with pytest.raises(ValueError, match="kind"):
        kv_cache_elements(cfg, "mla2")
    with pytest.raises(ValueError, match="n_tokens"):
        kv_cache_bytes(cfg, "mla", -1)


@pytest.mark.accounting
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind, cache_cls", [("mla", LatentKVCache), ("mla_naive", NaiveKVCache)])
def test_measured_cache_bytes_match_formula(kind, cache_cls, dtype, rng):
    """Decode n tokens through a 2-layer stack of MLA layers, one cache per layer; the bytes the
    caches hold for those n tokens equal kv_cache_bytes * batch."""
    cfg = ModelConfig.preset("toy", n_layers=2, max_seq_len=16)
    B, n = 3, 7
    params = [init_mla_params(cfg, rng, dtype) for _ in range(cfg.n_layers)]
    caches = [cache_cls(cfg, B, dtype) for _ in range(cfg.n_layers)]
    x = rng.standard_normal((B, n, cfg.dim)).astype(dtype)
    for chunk in (x[:, :4], x[:, 4:5], x[:, 5:6], x[:, 6:7]):   # prefill, then decode
        h = chunk
        for p, cache in zip(params, caches):
            h = h + mla_decode(h, p, cfg, cache)
    assert all(c.length == n for c in caches)
    arrays = [(c.kv, c.pe) if kind == "mla" else (c.k, c.v) for c in caches]
    used = sum(a[:, :n].nbytes for pair in arrays for a in pair)
    itemsize = np.dtype(dtype).itemsize
    assert used == B * kv_cache_bytes(cfg, kind, n, bytes_per_element=itemsize)
    assert used == sum(c.nbytes for c in caches)
    allocated = sum(a.nbytes for pair in arrays for a in pair)
    assert allocated == B * kv_cache_bytes(cfg, kind, cfg.max_seq_len, bytes_per_element=itemsize)
    # independent per-layer counts: latent Dc + Dr = 8 + 4; naive H (Dn + Dr + Dv) = 4 * 20
    per_layer = 12 if kind == "mla" else 80
    assert used == B * n * cfg.n_layers * per_layer * itemsize

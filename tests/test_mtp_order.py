"""The order of the MTP projection's input, pinned against the released weights' reading.

DeepSeek-V3's paper (arXiv 2412.19437, eq. 21) writes h'_i = M [RMSNorm(h_i) ; RMSNorm(Emb(t_{i+1}))]
(hidden state first), but the released weights are read embedding FIRST by every serving engine
(vLLM deepseek_mtp.py `DeepSeekMultiTokenPredictorLayer.forward`: torch.cat([inputs_embeds,
previous_hidden_states]); SGLang deepseek_nextn.py and Megatron-LM likewise; reference/kits.md 4):
eh_proj.weight[:, :D] acts on enorm(Emb(t_{i+1})), eh_proj.weight[:, D:] on hnorm(h_i).

A forward and backward that both swap the halves agree with each other and with finite
differences, so only an independent statement of the order can catch that: here an explicit
formula on a hand-built model, and a reference made by torch in the engines' order from a
transformers-made checkpoint (tests/fixtures/hf/bf16_mtp, scripts/make_hf_fixtures.py).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import pytest

from tinymoe import ModelConfig
from tinymoe.model import Model

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


def _rms(v, w, eps):
    """RMSNorm of one vector, written out: w_j * v_j / sqrt(mean(v^2) + eps)."""
    return w * v / np.sqrt(np.mean(v * v) + eps)


@pytest.mark.model
def test_eh_proj_left_half_reads_the_embedding(rng, tol):
    """Every block made the identity (wo = 0, every w2 = 0), so with W_eh = [A | B]:
    h_i = Emb(t_i), x_i = A enorm(Emb(t_{i+1})) + B hnorm(Emb(t_i)), logits_i = head norm(x_i)."""
    cfg = ModelConfig.preset("toy", n_mtp_modules=1)
    model = Model(cfg, seed=3, dtype=np.float64)
    P = model.params
    for name in P:
        if name.endswith(".wo") or name.endswith(".w2"):
            P[name] = np.zeros_like(P[name])        # attention and FFN add nothing: blocks = identity
    D = cfg.dim
    A, B = rng.standard_normal((D, D)) / D ** 0.5, rng.standard_normal((D, D)) / D ** 0.5
    P["mtp.0.eh_proj"] = np.concatenate([A, B], axis=1)                        # [D, 2D]
    for n in ("mtp.0.enorm", "mtp.0.hnorm", "mtp.0.norm"):
        P[n] = 1.0 + 0.3 * rng.standard_normal(D)      # distinct norms: a swap cannot cancel
    tokens = rng.integers(0, cfg.vocab_size, (2, 7))
    _, mtp_logits, _ = model.forward_train(tokens)
    E, eps = P["embed"], cfg.norm_eps
    expect = np.empty((2, 6, cfg.vocab_size))
    for b in range(2):
        for i in range(6):
            en = _rms(E[tokens[b, i + 1]], P["mtp.0.enorm"], eps)      # the token one ahead
            hn = _rms(E[tokens[b, i]], P["mtp.0.hnorm"], eps)          # h_i = Emb(t_i) here
            x = A @ en + B @ hn
            expect[b, i] = P["head"] @ _rms(x, P["mtp.0.norm"], eps)
    assert np.abs(mtp_logits[0] - expect).max() < tol["f64_exact"]
    # the halves in the paper's literal order ([hnorm(h) ; enorm(emb)]) give other logits
    en, hn = _rms(E[tokens[0, 1]], P["mtp.0.enorm"], eps), _rms(E[tokens[0, 0]], P["mtp.0.hnorm"], eps)
    paper = P["head"] @ _rms(A @ hn + B @ en, P["mtp.0.norm"], eps)
    assert np.abs(paper - expect[0, 0]).max() > 0.1


@pytest.mark.hf
def test_mtp_logits_match_the_engines_reading_of_a_transformers_checkpoint():
    """bf16_mtp: torch computed eh_proj(cat([enorm(emb), hnorm(h)])) with transformers' modules."""
    pytest.importorskip("safetensors")
    from tinymoe.hf import HFUnusedKeysWarning, load_pretrained
    ref = np.load(os.path.join(FIXTURES, "bf16_mtp", "reference.npz"), allow_pickle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HFUnusedKeysWarning)
        model = load_pretrained(os.path.join(FIXTURES, "bf16_mtp"), mtp=True)
    _, mtp_logits, _ = model.forward_train(ref["input_ids"])
    expect = ref["mtp_logits.1"]
    assert mtp_logits[0].shape == expect.shape
    assert np.abs(mtp_logits[0] - expect).max() < 1e-4     # LOGITS_ATOL of test_hf (order-1 values)

"""Generation: cached decoding equals full recompute; speculative equals plain greedy."""
import numpy as np
import pytest

from tinymoe.config import ModelConfig
from tinymoe.generate import generate, generate_recompute, generate_speculative
from tinymoe.model import Model

pytestmark = pytest.mark.generate


def _model(dtype=np.float64, **kw):
    cfg = ModelConfig.preset("toy", n_layers=2, max_seq_len=24, init_std=0.3, **kw)
    return Model(cfg, seed=11, dtype=dtype)


@pytest.mark.parametrize("attn", ["mla", "mha", "mqa"])
def test_cached_greedy_equals_full_recompute(attn):
    model = _model(attn_type=attn)
    prompt = np.random.default_rng(0).integers(0, 64, size=(2, 5))
    cached = generate(model, prompt, 12)
    full = generate_recompute(model, prompt, 12)
    np.testing.assert_array_equal(cached, full)
    assert cached.shape == (2, 17)


def test_cached_logits_equal_full_forward(tol):
    from tinymoe.generate import InferenceState, forward_cached
    model = _model()
    tokens = np.random.default_rng(1).integers(0, 64, size=(2, 9))
    state = InferenceState(model, 2)
    parts = [forward_cached(model, tokens[:, :4], state)[0]]
    for t in range(4, 9):
        parts.append(forward_cached(model, tokens[:, t:t + 1], state)[0])
    np.testing.assert_allclose(np.concatenate(parts, axis=1), model.forward(tokens), rtol=0,
                               atol=tol["f64_exact"])


def test_speculative_equals_plain_greedy():
    model = _model(n_mtp_modules=1)
    for seed in range(3):
        prompt = np.random.default_rng(seed).integers(0, 64, size=4)
        tokens, stats = generate_speculative(model, prompt, 15)
        np.testing.assert_array_equal(tokens, generate(model, prompt, 15))
        assert 0 <= stats["accepted"] <= stats["drafted"]
        assert stats["main_calls"] == stats["drafted"]
        assert 0.0 <= stats["acceptance_rate"] <= 1.0


def test_speculative_accepts_everything_when_mtp_agrees_with_the_main_model():
    # With a zero output head every logit is 0 and argmax is token 0 for the main model and the
    # MTP head alike: every draft is accepted, so 9 new tokens take 1 + 4 verification calls
    # (the first token comes from the prefill, then two tokens per call).
    model = _model(n_mtp_modules=1)
    model.params["head"][:] = 0.0
    tokens, stats = generate_speculative(model, np.array([1, 2, 3]), 9)
    np.testing.assert_array_equal(tokens, generate(model, np.array([1, 2, 3]), 9))
    np.testing.assert_array_equal(tokens[3:], np.zeros(9))
    assert stats["acceptance_rate"] == 1.0
    assert stats["main_calls"] == 4 and stats["accepted"] == 4


def test_sampling_is_deterministic_and_top1_is_greedy():
    model = _model(dtype=np.float32)
    prompt = np.array([[1, 2, 3]])
    a = generate(model, prompt, 8, temperature=1.0, seed=5)
    b = generate(model, prompt, 8, temperature=1.0, seed=5)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(generate(model, prompt, 8, temperature=0.7, top_k=1, seed=3),
                                  generate(model, prompt, 8))


def test_logprobs_are_those_of_the_full_forward():
    model = _model()
    prompt = np.array([[5, 6, 7]])
    tokens, logp = generate(model, prompt, 6, temperature=1.0, seed=2, return_logprobs=True)
    logits = model.forward(tokens[:, :-1])
    for i in range(6):
        z = logits[0, 2 + i]
        expect = z[tokens[0, 3 + i]] - z.max() - np.log(np.sum(np.exp(z - z.max())))
        assert logp[0, i] == pytest.approx(expect, abs=1e-10)


def test_generation_errors():
    model = _model()
    with pytest.raises(ValueError, match="max_seq_len=24"):
        generate(model, np.zeros((1, 20), dtype=np.int64), 5)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, np.zeros((1, 2), dtype=np.int64), 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="n_mtp_modules"):
        generate_speculative(model, np.zeros(2, dtype=np.int64), 3)
    with pytest.raises(ValueError, match="token id"):
        generate(model, np.array([[99]]), 2)


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=2.5), "max_new_tokens = 2.5: must be an integer >= 0"),
    (dict(max_new_tokens=True), "max_new_tokens = True: must be an integer"),
    (dict(max_new_tokens=2, temperature=1.0, top_k=2.5), "top_k = 2.5: must be an integer >= 1"),
    (dict(max_new_tokens=2, temperature=1.0, top_k=True), "top_k = True"),
    (dict(max_new_tokens=2, temperature=float("nan")), "temperature = nan"),
])
def test_generation_refuses_non_integer_counts(kw, match):
    with pytest.raises(ValueError, match=match):
        generate(_model(), np.zeros((1, 2), dtype=np.int64), **kw)


def test_speculative_and_empty_prompts_are_refused():
    model = _model(n_mtp_modules=1)
    with pytest.raises(ValueError, match="max_new_tokens = -3"):
        generate_speculative(model, np.zeros(2, dtype=np.int64), -3)
    for prompt in (np.zeros((0, 2), dtype=np.int64), np.zeros((1, 0), dtype=np.int64)):
        with pytest.raises(ValueError, match="prompt_tokens: expected a non-empty"):
            generate(model, prompt, 2)

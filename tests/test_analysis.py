"""tinymoe.analysis: every metric against a small example computed by hand, plus the plots.

The arithmetic of each expected value is written out in the comments (router-analysis.md 4.1).
"""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from tinymoe import analysis as A

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# load and balance
# ---------------------------------------------------------------------------------------------
@pytest.mark.analysis
def test_load_maxvio_cv_dead_hand_example(tol):
    # 4 tokens, top-1, E = 3: experts 0, 0, 0, 1 -> load c = [3, 1, 0], mean 4/3
    idx = np.array([[0], [0], [0], [1]])
    c = A.expert_load(idx, 3)
    assert c.tolist() == [3, 1, 0] and c.dtype == np.int64
    # MaxVio = (3 - 4/3) / (4/3) = 9/4 - 1 = 1.25
    assert A.maxvio(c) == pytest.approx(1.25, abs=tol["f64_close"])
    # deviations 5/3, -1/3, -4/3 -> variance (25 + 1 + 16) / 27 = 14/9 -> std sqrt(14)/3
    # CV = (sqrt(14)/3) / (4/3) = sqrt(14)/4
    assert A.load_cv(c) == pytest.approx(math.sqrt(14) / 4, abs=tol["f64_close"])
    assert A.dead_experts(c) == 1                          # expert 2 got nothing
    assert A.dead_experts(c, threshold=0.8) == 2           # 1 <= 0.8 * 4/3 = 1.067 too
    # top-2, E = 4: sets {0,1} {0,2} {1,0} -> counts all K slots: [3, 2, 1, 0]
    assert A.expert_load(np.array([[0, 1], [0, 2], [1, 0]]), 4).tolist() == [3, 2, 1, 0]


@pytest.mark.analysis
def test_maxvio_limits_and_per_batch(tol):
    assert A.maxvio([5, 5, 5, 5]) == 0.0                    # perfect balance
    assert A.maxvio([8, 0, 0, 0]) == pytest.approx(3.0)     # top-1 collapse: E - 1
    # batch 1: experts 0, 0 -> load [2, 0] -> 2/1 - 1 = 1; batch 2: 0, 1 -> [1, 1] -> 0
    out = A.maxvio_per_batch([np.array([[0], [0]]), np.array([[0], [1]])], 2)
    np.testing.assert_allclose(out, [1.0, 0.0], atol=tol["f64_close"])


@pytest.mark.analysis
def test_load_and_routing_entropy_hand_example(tol):
    # f = (1/4, 1/4, 1/2): H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2, normalised by ln 3
    assert A.load_entropy([1, 1, 2]) == pytest.approx(1.5 * math.log(2) / math.log(3), abs=tol["f64_close"])
    assert A.load_entropy([7, 7]) == pytest.approx(1.0)
    # scores rows (1, 1) -> p = (1/2, 1/2), H = ln 2; (1, 0) -> H = 0; mean ln 2 / 2
    s = np.array([[1.0, 1.0], [1.0, 0.0]])
    assert A.routing_entropy(s) == pytest.approx(math.log(2) / 2, abs=tol["f64_close"])
    assert A.routing_entropy(s, normalized=True) == pytest.approx(0.5, abs=tol["f64_close"])
    # sigmoid scores need not sum to 1: (0.5, 0.5, 0.5, 0.5) normalises to uniform -> ln 4
    assert A.routing_entropy(np.full((3, 4), 0.5)) == pytest.approx(math.log(4), abs=tol["f64_close"])


# ---------------------------------------------------------------------------------------------
# label specialisation
# ---------------------------------------------------------------------------------------------
@pytest.mark.analysis
def test_relative_load_matrix_hand_example(tol):
    # label 0 tokens go to experts 0, 0, 1 -> shares 2/3, 1/3, 0 -> times E = 3: 2, 1, 0
    # label 1 token goes to expert 2 -> shares 0, 0, 1 -> 0, 0, 3; label 2 has no tokens -> NaN
    idx = np.array([[0], [0], [1], [2]])
    R = A.relative_load_matrix(idx, np.array([0, 0, 0, 1]), 3, 3)
    np.testing.assert_allclose(R[:2], [[2, 1, 0], [0, 0, 3]], atol=tol["f64_close"])
    assert np.isnan(R[2]).all()
    # top-2: label 0 tokens {0,1} {0,2}: shares 2/4, 1/4, 1/4 of 4 assignments -> 1.5, 0.75, 0.75
    R2 = A.relative_load_matrix(np.array([[0, 1], [0, 2]]), np.array([0, 0]), 3, 1)
    np.testing.assert_allclose(R2, [[1.5, 0.75, 0.75]], atol=tol["f64_close"])


@pytest.mark.analysis
def test_nmi_purity_dispatch_entropy_hand_example(tol):
    # top-1 experts X = 0, 0, 1, 1 ; labels Y = 0, 1, 0, 0
    # p(x=0,y=0) = 1/4, p(0,1) = 1/4, p(1,0) = 1/2
    # H(Y) = -(3/4 ln 3/4 + 1/4 ln 1/4); H(Y | X) = 1/2 * ln 2 (x=0 is a fair coin) + 1/2 * 0
    # NMI = (H(Y) - H(Y|X)) / H(Y)
    idx = np.array([[0, 2], [0, 1], [1, 0], [1, 2]])      # second column ignored by top-1 metrics
    y = np.array([0, 1, 0, 0])
    hy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    want = (hy - 0.5 * math.log(2)) / hy
    assert A.nmi_top1(idx, y, 3, 2) == pytest.approx(want, abs=tol["f64_close"])
    assert A.dispatch_entropy(idx, y, 3, 2) == pytest.approx(0.5 * math.log(2), abs=tol["f64_close"])
    # purity: expert 0 majority 1 of 2, expert 1 majority 2 of 2 -> 3/4
    assert A.purity(idx, y, 3, 2) == pytest.approx(0.75)


@pytest.mark.analysis
def test_nmi_one_to_one_is_one_and_independent_is_zero(rng):
    # one expert per label (a permutation) -> I = H(Y) -> NMI = 1
    y = rng.integers(0, 4, size=400)
    perm = np.array([2, 0, 3, 1])
    assert A.nmi_top1(perm[y][:, None], y, 4, 4) == pytest.approx(1.0, abs=1e-12)
    # several experts per label also determine the label: experts {0,1} -> label 0, {2} -> label 1
    assert A.nmi_top1(np.array([[0], [1], [2], [2]]), np.array([0, 0, 1, 1]), 3, 2) == pytest.approx(1.0)
    # independent draws: NMI ~ 0 (finite-sample bias ~ (E-1)(L-1) / (2 N H(Y)) ~ 1e-3 here)
    x = rng.integers(0, 8, size=20000)
    y2 = rng.integers(0, 4, size=20000)
    assert A.nmi_top1(x[:, None], y2, 8, 4) < 0.01
    # a single label carries no information: defined as 0
    assert A.nmi_top1(x[:, None], np.zeros(20000, dtype=int), 8, 1) == 0.0


@pytest.mark.analysis
def test_nmi_null_is_near_zero_for_specialised_routing(rng):
    # 64 documents x 16 tokens, label = document language, expert = 2*language + token parity:
    # NMI = 1, while shuffling the documents' labels destroys the relation.
    B, T, L = 64, 16, 4
    lang = np.repeat(np.arange(B) % L, T).reshape(B, T)
    experts = (2 * lang + np.arange(T)[None, :] % 2).reshape(-1, 1)
    assert A.nmi_top1(experts, lang, 8, L) == pytest.approx(1.0)
    null_docs = A.nmi_null(experts, lang, 8, L, np.random.default_rng(0), n_shuffles=10)
    null_tok = A.nmi_null(experts, lang.reshape(-1), 8, L, np.random.default_rng(0), n_shuffles=10)
    assert 0.0 <= null_docs < 0.15 and 0.0 <= null_tok < 0.02
    assert null_docs == A.nmi_null(experts, lang, 8, L, np.random.default_rng(0), n_shuffles=10)


@pytest.mark.analysis
def test_nmi_given_token_hand_example(tol):
    # tokens 0 0 1 1, labels 0 1 0 1
    tok, y = np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1])
    # experts a function of the token (2, 2, 1, 1): I(X; Y | token) = 0 exactly
    assert A.nmi_given_token(np.array([[2], [2], [1], [1]]), y, tok, 3, 2, 2) == 0.0
    # experts 0 1 2 2: token 0 -> expert tells the label (I = ln 2 = H(Y | token 0));
    # token 1 -> one expert (I = 0, H = ln 2): ratio (1/2 ln 2 + 0) / (1/2 ln 2 + 1/2 ln 2) = 1/2
    got = A.nmi_given_token(np.array([[0], [1], [2], [2]]), y, tok, 3, 2, 2)
    assert got == pytest.approx(0.5, abs=tol["f64_close"])
    # experts 0 1 2 3: every token's expert determines its label -> 1
    assert A.nmi_given_token(np.array([[0], [1], [2], [3]]), y, tok, 4, 2, 2) == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------
# token specialisation, co-activation, saturation, locality
# ---------------------------------------------------------------------------------------------
@pytest.mark.analysis
def test_token_specialisation_hand_example(tol):
    # token 0 occurs 3 times with top-1 experts 2, 2, 1 -> 2/3 on expert 2
    # token 1 occurs 2 times, both on expert 0 -> 1; token 2 never occurs -> NaN
    idx = np.array([[2, 0], [2, 1], [1, 0], [0, 2], [0, 1]])
    tok = np.array([0, 0, 0, 1, 1])
    r = A.token_specialisation(idx, tok, 3, 3, min_count=1)
    assert r.score == pytest.approx((2 / 3 + 1) / 2, abs=tol["f64_close"])
    np.testing.assert_allclose(r.per_token[:2], [2 / 3, 1.0], atol=tol["f64_close"])
    assert np.isnan(r.per_token[2])
    assert r.top_expert.tolist() == [2, 0, -1] and r.counts.tolist() == [3, 2, 0]
    # min_count = 3 keeps only token 0
    assert A.token_specialisation(idx, tok, 3, 3, min_count=3).score == pytest.approx(2 / 3)


@pytest.mark.analysis
def test_coactivation_hand_example(tol):
    # sets {0,1} {0,2} {0,1}, E = 4
    # expert 0 in 3 tokens: with 1 twice, with 2 once -> row 0 = [0, 2/3, 1/3, 0]
    # expert 1 in 2 tokens, both with 0 -> [1, 0, 0, 0]; expert 2 in 1 token with 0 -> [1, 0, 0, 0]
    # expert 3 never chosen -> zeros
    C = A.coactivation(np.array([[0, 1], [0, 2], [1, 0]]), 4)
    want = [[0, 2 / 3, 1 / 3, 0], [1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    np.testing.assert_allclose(C, want, atol=tol["f64_close"])
    # uniform random top-2 of 5 experts: every off-diagonal entry -> (K-1)/(E-1) = 1/4
    sets = np.array([[i, j] for i in range(5) for j in range(5) if i != j])
    np.testing.assert_allclose(A.coactivation(sets, 5)[~np.eye(5, dtype=bool)], 0.25)
    assert A.random_baselines(5, 2)["coactivation"] == pytest.approx(0.25)


@pytest.mark.analysis
def test_router_saturation_hand_example():
    early = np.array([[0, 1], [2, 3], [1, 0]])
    final = np.array([[1, 2], [2, 3], [3, 2]])
    # |{0,1} & {1,2}| = 1, |{2,3} & {2,3}| = 2, |{1,0} & {3,2}| = 0 -> (1 + 2 + 0) / (3 * 2) = 0.5
    assert A.router_saturation(early, final, 2) == pytest.approx(0.5)
    # top-1: 0 vs 1, 2 vs 2, 1 vs 3 -> 1/3
    assert A.router_saturation(early, final, 1) == pytest.approx(1 / 3)
    assert A.router_saturation(final, final, 2) == 1.0


@pytest.mark.analysis
def test_consecutive_repetition_hand_example():
    # 2 sequences of 3 tokens, top-1 experts 0 0 1 | 2 2 2
    # pairs inside a sequence: (0,0) yes, (0,1) no, (2,2) yes, (2,2) yes -> 3/4 (1 -> 2 crosses)
    # top-1 shares 2/6, 1/6, 3/6 -> chance of agreeing = (4 + 1 + 9) / 36 = 14/36
    idx = np.array([[0], [0], [1], [2], [2], [2]])
    rate, base = A.consecutive_repetition(idx, 3, E=3)
    assert rate == pytest.approx(0.75) and base == pytest.approx(14 / 36)
    # set version, 2 sequences of 2: {0,1}->{1,2} overlap, {0,1}->{2,3} not -> 1/2
    # sets {0,1} p=1/2, {1,2} p=1/4, {2,3} p=1/4; only {0,1} & {2,3} are disjoint:
    # P(overlap) = 1 - 2 * (1/2)(1/4) = 3/4
    idx2 = np.array([[0, 1], [1, 2], [0, 1], [2, 3]])
    rate2, base2 = A.consecutive_repetition(idx2, 2, E=4, mode="set")
    assert rate2 == pytest.approx(0.5) and base2 == pytest.approx(0.75)


@pytest.mark.analysis
def test_consecutive_set_baseline_matches_uniform_formula():
    # all C(5,2) = 10 pairs equally often -> baseline 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    sets = np.array([[i, j] for i in range(5) for j in range(i + 1, 5)])
    _, base = A.consecutive_repetition(sets, 2, E=5, mode="set")
    assert base == pytest.approx(0.7)
    # Mixtral's number: E = 8, K = 2 -> 1 - 15/28 = 46.4 %
    assert A.random_baselines(8, 2)["consecutive_set"] == pytest.approx(13 / 28)


@pytest.mark.analysis
@pytest.mark.parametrize("call,arg", [
    (lambda: A.expert_load(np.array([[0], [3]]), 3), "indices"),
    (lambda: A.expert_load(np.array([[0]]), 0), "E"),
    (lambda: A.nmi_top1(np.array([[0], [1]]), np.array([0]), 2, 2), "labels"),
    (lambda: A.nmi_top1(np.array([[0], [1]]), np.array([0, 5]), 2, 2), "labels"),
    (lambda: A.maxvio([0, 0]), "load"),
    (lambda: A.router_saturation(np.zeros((2, 2), int), np.zeros((3, 2), int)), "indices_early"),
    (lambda: A.consecutive_repetition(np.zeros((5, 1), int), 2, E=2), "seq_len"),
    (lambda: A.nmi_null(np.zeros((2, 1), int), np.zeros(2, int), 1, 1, None), "rng"),
])
def test_bad_arguments_raise_value_error_naming_them(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _is_png(path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    import os
    return head == PNG_MAGIC and os.path.getsize(path) > 1000


@pytest.mark.analysis
def test_plots_write_non_empty_pngs(tmp_path, rng):
    idx = np.argsort(-rng.random((64, 6)), axis=1)[:, :2]
    lab = rng.integers(0, 3, size=64)
    R = A.relative_load_matrix(idx, lab, 6, 3)
    paths = [
        A.plot_load_over_training(rng.random((20, 6)), tmp_path / "load.png"),
        A.plot_maxvio({"none": rng.random(20) + 1, "bias": rng.random(20) * 0.1}, tmp_path / "mv.png"),
        A.plot_heatmap(R, ["a", "b", "c"], [f"e{i}" for i in range(6)], tmp_path / "sub" / "hm.png",
                       "relative load", "caption"),
        A.plot_heatmaps([R, R], ["a", "b", "c"], None, tmp_path / "hms.png", "per layer",
                        panel_titles=["layer 1", "layer 2"]),
        A.plot_bar({"wq": 1e-9, "wo": 3e-8}, tmp_path / "bar.png", "gradient check",
                   "max relative error", logy=True, hline=1e-6, hline_label="tolerance"),
        A.plot_lines([0, 1, 2], {"top-1": [0.2, 0.3, 0.4]}, tmp_path / "lines.png", "repetition",
                     "layer", "rate", hlines={"random": 1 / 6}),
        A.plot_coactivation(A.coactivation(idx, 6), tmp_path / "co.png", baseline=0.2),
    ]
    assert all(_is_png(p) for p in paths)
    assert paths[2] == str(tmp_path / "sub" / "hm.png")


@pytest.mark.analysis
def test_import_does_not_load_matplotlib():
    code = "import sys, tinymoe.analysis; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

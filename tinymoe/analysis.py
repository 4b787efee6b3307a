"""Router analysis: the metrics and plots every lesson reuses to show what a router learned.

Conventions (shared/reference/router-analysis.md, sections 1 and 4.1):
    indices  int [N, K]   the K experts chosen for each of N tokens, best first (S_t = set of row t)
    scores   float [N, E] router affinities (softmax probabilities or sigmoid scores)
    labels   int [N]      one label per token (language, task, ...); [B, T] accepted where noted
    E                     number of routed experts, always passed explicitly (an expert that got no
                          token must still count)
    load     int [E]      c_i = #{t : i in S_t}, counted over all K slots; cbar = N K / E
Random baselines of every metric: `random_baselines(E, K)`.

Plots import matplotlib inside the function and draw on an Agg canvas (no window, no pyplot
state); each writes one PNG with a title, labelled axes and a one-line caption of what to see,
and returns the path.
"""
from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional, Sequence

import numpy as np


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_indices(indices, E: int, name: str = "indices") -> np.ndarray:
    E = _check_count("E", E)
    idx = np.asarray(indices)
    if idx.ndim == 1:
        idx = idx[:, None]
    if idx.ndim != 2:
        raise ValueError(f"{name}: expected shape [N, K], got {list(idx.shape)}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise ValueError(f"{name}: expected integer expert ids, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= E):
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise ValueError(f"{name}: expert id {bad} is outside [0, E={E})")
    return idx.astype(np.int64, copy=False)


def _check_labels(labels, n: int, n_labels: int, name: str = "labels") -> np.ndarray:
    n_labels = _check_count("n_labels", n_labels)
    lab = np.asarray(labels)
    if lab.size != n:
        raise ValueError(f"{name}: expected {n} labels (one per routed token), got shape {list(lab.shape)}")
    lab = lab.reshape(-1)
    if lab.size and not np.issubdtype(lab.dtype, np.integer):
        raise ValueError(f"{name}: expected integer labels, got dtype {lab.dtype}")
    if lab.size and (lab.min() < 0 or lab.max() >= n_labels):
        bad = lab.min() if lab.min() < 0 else lab.max()
        raise ValueError(f"{name}: label {bad} is outside [0, n_labels={n_labels})")
    return lab.astype(np.int64, copy=False)


def _check_load(load) -> np.ndarray:
    c = np.asarray(load, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"load: expected a non-empty 1-D array [E], got shape {list(c.shape)}")
    if (c < 0).any():
        raise ValueError("load: counts must be >= 0")
    if c.sum() == 0:
        raise ValueError("load: all counts are zero (no routed tokens)")
    return c


# ---------------------------------------------------------------------------------------------
# load and balance (router-analysis.md 1.1-1.4)
# ---------------------------------------------------------------------------------------------
def expert_load(indices, E: int) -> np.ndarray:
    """indices [N, K] -> load [E] int64: c_i = #{t : i in S_t}, all K slots counted."""
    idx = _check_indices(indices, E)
    return np.bincount(idx.ravel(), minlength=E).astype(np.int64)


def maxvio(load) -> float:
    """load [E] -> MaxVio = (max_i c_i - cbar) / cbar, cbar = mean load (Wang et al. 2024, Eq. 4).

    0 = perfect balance; 1 = the busiest expert does twice its share; E-1 = top-1 collapse.
    """
    c = _check_load(load)
    return float(c.max() / c.mean() - 1.0)


def maxvio_per_batch(indices_list: Sequence, E: int) -> np.ndarray:
    """List of indices [N_b, K] (one per batch) -> MaxVio_batch [n_batches] float64.

    Average it for Wang et al.'s MaxVio_batch; MaxVio_global is maxvio(expert_load(all tokens)).
    """
    return np.array([maxvio(expert_load(ix, E)) for ix in indices_list], dtype=np.float64)


def load_cv(load) -> float:
    """load [E] -> coefficient of variation std(c) / mean(c) (population std; 0 = balanced)."""
    c = _check_load(load)
    return float(c.std() / c.mean())


def dead_experts(load, threshold: float = 0.0) -> int:
    """load [E] -> number of experts with c_i <= threshold * mean(c) (default: zero load).

    router-analysis.md 1.3 uses threshold 0.05 ("load < 5 % of mean"); state the one you use.
    Expert ids: np.flatnonzero(load <= threshold * load.mean()).
    """
    c = _check_load(load)
    return int((c <= threshold * c.mean()).sum())


def load_entropy(load) -> float:
    """load [E] -> H_load / ln E with f_i = c_i / sum c (1 = uniform, 0 = one expert)."""
    c = _check_load(load)
    if c.size == 1:
        return 1.0
    f = c[c > 0] / c.sum()
    return float(-(f * np.log(f)).sum() / math.log(c.size))


def routing_entropy(scores, normalized: bool = False) -> float:
    """scores [N, E] -> mean_t -sum_i p_ti ln p_ti, p_t = scores_t / sum_i scores_ti (nats).

    Low = decisive router. With normalized=True divide by ln E (1 = uniform scores).
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] == 0:
        raise ValueError(f"scores: expected a non-empty [N, E] array, got shape {list(s.shape)}")
    if (s < 0).any():
        raise ValueError("scores: router scores must be >= 0 (softmax or sigmoid outputs)")
    tot = s.sum(axis=1, keepdims=True)
    if (tot <= 0).any():
        raise ValueError("scores: a row sums to zero and cannot be normalised")
    p = s / tot
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    h = float(-plogp.sum(axis=1).mean())
    if normalized:
        return h / math.log(s.shape[1]) if s.shape[1] > 1 else 0.0
    return h


# ---------------------------------------------------------------------------------------------
# label (domain / language / task) specialisation (1.5, 1.11)
# ---------------------------------------------------------------------------------------------
def joint_counts(indices, labels, E: int, n_labels: int, top1: bool = False) -> np.ndarray:
    """-> counts [n_labels, E]: assignments of label-y tokens to expert e (all K slots, or top-1)."""
    idx = _check_indices(indices, E)
    lab = _check_labels(labels, idx.shape[0], n_labels)
    if top1:
        idx = idx[:, :1]
    K = idx.shape[1]
    flat = np.repeat(lab, K) * E + idx.ravel()
    return np.bincount(flat, minlength=n_labels * E).reshape(n_labels, E).astype(np.int64)


def relative_load_matrix(indices, labels, E: int, n_labels: int) -> np.ndarray:
    """-> R [n_labels, E]: R[y, e] = (share of label-y assignments that go to e) / (1 / E).

    1 = uniform; E = every assignment of label y goes to e (top-1). DeepSeek-V3 Fig. 9 colours.
    A label with no tokens gives a row of NaN.
    """
    C = joint_counts(indices, labels, E, n_labels).astype(np.float64)
    tot = C.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, C / tot * E, np.nan)


def _mi_and_hy(C: np.ndarray):
    """Joint count table [Y, E] -> (I(E; Y), H(Y)) in nats."""
    n = C.sum()
    pxy = C / n
    py = pxy.sum(axis=1, keepdims=True)
    px = pxy.sum(axis=0, keepdims=True)
    nz = pxy > 0
    mi = float((pxy[nz] * np.log(pxy[nz] / (py @ px)[nz])).sum())
    pyy = py[py > 0]
    hy = float(-(pyy * np.log(pyy)).sum())
    return max(mi, 0.0), hy


def nmi_top1(indices, labels, E: int, n_labels: int) -> float:
    """Normalised MI between the top-1 expert X and the label Y: NMI = I(X; Y) / H(Y).

    The convention of router-analysis.md 4.1 (uclaml/MoE): the fraction of the label's entropy
    that the expert choice explains. 1 = the expert determines the label (e.g. one expert per
    language, or several experts per language); 0 = independent. If all tokens share one label
    (H(Y) = 0) it returns 0. Pair it with MaxVio: a collapsed router can score high.
    """
    C = joint_counts(indices, labels, E, n_labels, top1=True).astype(np.float64)
    if C.sum() == 0:
        raise ValueError("indices: no tokens")
    mi, hy = _mi_and_hy(C)
    return float(min(mi / hy, 1.0)) if hy > 1e-12 else 0.0   # round-off guard for one label


def nmi_null(indices, labels, E: int, n_labels: int, rng: np.random.Generator,
             n_shuffles: int = 20) -> float:
    """Shuffled-label null of nmi_top1: mean NMI after permuting the labels (n_shuffles times).

    labels [N] are permuted across tokens; labels [B, T] (N = B*T, row-major like the routed
    tokens) are permuted across documents (whole rows), which keeps each document's label
    constant and so estimates the finite-sample bias of NMI for this many documents. Should be ~0;
    assert NMI >= null + margin.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    n_shuffles = _check_count("n_shuffles", n_shuffles)
    idx = _check_indices(indices, E)
    lab = np.asarray(labels)
    _check_labels(lab, idx.shape[0], n_labels)
    vals = []
    for _ in range(n_shuffles):
        if lab.ndim == 2:
            perm = lab[rng.permutation(lab.shape[0])]
        else:
            perm = lab.reshape(-1)[rng.permutation(lab.size)]
        vals.append(nmi_top1(idx, perm.reshape(-1), E, n_labels))
    return float(np.mean(vals))


def nmi_given_token(indices, labels, tokens, E: int, n_labels: int, V: int) -> float:
    """Contextual specialisation: I(X; Y | token) / H(Y | token), X = top-1 expert, Y = label.

    A router that sees only the token id makes X a function of the token, so this is exactly 0
    for it, however the experts happen to line up with labels (a per-token hash can give
    nmi_top1 ~0.1 on the languages data, and the shuffled-document null does not remove that,
    router-analysis.md 2.6). It is 1 when, for each token id, the expert determines the label, i.e.
    the router uses the context. Sums run over tokens weighted by p(token); 0 if H(Y | token) = 0.
    """
    idx = _check_indices(indices, E)
    V = _check_count("V", V)
    lab = _check_labels(labels, idx.shape[0], n_labels)
    tok = _check_labels(tokens, idx.shape[0], V, name="tokens")
    C = np.bincount((tok * n_labels + lab) * E + idx[:, 0],
                    minlength=V * n_labels * E).reshape(V, n_labels, E).astype(np.float64)
    n = C.sum()
    mi = hy = 0.0
    for v in np.flatnonzero(C.sum(axis=(1, 2))):
        m, h = _mi_and_hy(C[v])
        w = C[v].sum() / n                               # p(token = v)
        mi += w * m
        hy += w * h
    return float(min(mi / hy, 1.0)) if hy > 1e-12 else 0.0


def purity(indices, labels, E: int, n_labels: int) -> float:
    """Top-1 purity = sum_e max_y n(y, e) / n (1 = each expert serves a single label)."""
    C = joint_counts(indices, labels, E, n_labels, top1=True)
    return float(C.max(axis=0).sum() / C.sum())


def dispatch_entropy(indices, labels, E: int, n_labels: int) -> float:
    """H_disp = sum_e (n_e / n) H(Y | X = e) in nats, top-1 (Chen et al. 2022; 0 = pure experts)."""
    C = joint_counts(indices, labels, E, n_labels, top1=True).astype(np.float64)
    mi, hy = _mi_and_hy(C)
    return float(max(hy - mi, 0.0))                      # H(Y|X) = H(Y) - I(X;Y)


# ---------------------------------------------------------------------------------------------
# token specialisation (1.6), co-activation (1.7), saturation (1.8), locality (1.9)
# ---------------------------------------------------------------------------------------------
class TokenSpecialisation(NamedTuple):
    score: float             # mean over kept token ids of per_token (NaN if none kept)
    per_token: np.ndarray    # [V] share of a token id's occurrences on its most frequent top-1 expert; NaN if < min_count
    top_expert: np.ndarray   # [V] that most frequent expert (ties: lowest id); -1 if < min_count
    counts: np.ndarray       # [V] occurrences of each token id


def token_specialisation(indices, tokens, E: int, V: int, min_count: int = 10) -> TokenSpecialisation:
    """OLMoE §5.4 vocabulary specialisation, keyed by the input token id, top-1 expert.

    For each token id v seen >= min_count times: spec(v) = max_e n(v, e) / n(v), with n(v, e) the
    number of occurrences of v whose top-1 expert is e; score = mean of spec(v) over those v.
    Random baseline ~1/E (higher for rare tokens, hence min_count). Key by the next token instead by
    passing the targets as `tokens`.
    """
    idx = _check_indices(indices, E)
    V = _check_count("V", V)
    min_count = _check_count("min_count", min_count)
    tok = _check_labels(tokens, idx.shape[0], V, name="tokens")
    C = np.bincount(tok * E + idx[:, 0], minlength=V * E).reshape(V, E)
    n = C.sum(axis=1)
    keep = n >= min_count
    per = np.full(V, np.nan)
    per[keep] = C[keep].max(axis=1) / n[keep]
    top = np.where(keep, C.argmax(axis=1), -1)
    score = float(per[keep].mean()) if keep.any() else float("nan")
    return TokenSpecialisation(score, per, top.astype(np.int64), n.astype(np.int64))


def coactivation(indices, E: int) -> np.ndarray:
    """indices [N, K] -> A [E, E], A[i, j] = #{t : i, j in S_t} / #{t : i in S_t} = P(j | i).

    Row-normalised and asymmetric (OLMoE §5.2), over all pairs of the top-K set (not only adjacent
    ones). Diagonal set to 0 (an expert trivially co-fires with itself); rows of unused experts 0.
    Random baseline (K-1)/(E-1).
    """
    idx = _check_indices(indices, E)
    M = np.zeros((idx.shape[0], E), dtype=np.float64)
    np.put_along_axis(M, idx, 1.0, axis=1)               # one-hot of each token's set S_t
    both = M.T @ M                                       # both[i, j] = #{t : i, j in S_t}
    n_i = np.diag(both).copy()
    A = np.divide(both, n_i[:, None], out=np.zeros_like(both), where=n_i[:, None] > 0)
    np.fill_diagonal(A, 0.0)
    return A


def router_saturation(indices_early, indices_final, K: Optional[int] = None) -> float:
    """OLMoE §5.1: mean_t |S_t(early) ∩ S_t(final)| / K, each S_t the first K experts of its row.

    Both routings must be on the same tokens. K=1 gives the top-1 variant (share of tokens whose
    first expert already matches the final one). Random baseline K/E; final vs itself = 1.
    """
    a = np.asarray(indices_early)
    b = np.asarray(indices_final)
    a = a[:, None] if a.ndim == 1 else a
    b = b[:, None] if b.ndim == 1 else b
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"indices_early: shape {list(a.shape)} must equal indices_final's "
                         f"{list(b.shape)} ([N, K], same tokens)")
    K = a.shape[1] if K is None else _check_count("K", K)
    if K > a.shape[1]:
        raise ValueError(f"K: must be <= the {a.shape[1]} columns of the indices, got {K}")
    if a.shape[0] == 0:
        raise ValueError("indices_early: no tokens")
    a, b = a[:, :K], b[:, :K]
    inter = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)   # |S_a ∩ S_b| (ids distinct)
    return float(inter.mean() / K)


def _set_overlap_baseline(idx: np.ndarray, E: int) -> float:
    """P(S_u ∩ S_v non-empty) for u, v drawn independently from the empirical sets of idx."""
    sets, cnt = np.unique(np.sort(idx, axis=1), axis=0, return_counts=True)
    p = cnt / cnt.sum()
    M = np.zeros((len(sets), E))
    np.put_along_axis(M, sets, 1.0, axis=1)
    total = 0.0
    for s in range(0, len(sets), 2048):                  # chunks keep memory bounded
        ov = (M[s:s + 2048] @ M.T) > 0
        total += float(p[s:s + 2048] @ ov @ p)
    return total


def consecutive_repetition(indices, seq_len: int, E: Optional[int] = None, mode: str = "top1"):
    """Mixtral §5 locality -> (rate, random_baseline), tokens in sequence order ([B*seq_len, K]).

    mode 'top1': rate = P(top-1 of token t+1 == top-1 of token t), pairs within a sequence only;
        baseline = sum_e f_e^2, f_e the top-1 load share (two independent tokens agree by chance;
        1/E when balanced).
    mode 'set': rate = P(S_{t+1} ∩ S_t non-empty); baseline = the same probability for two
        independent tokens drawn from the empirical sets (1 - C(E-K,K)/C(E,K) when uniform).
    """
    idx = np.asarray(indices)
    idx = idx[:, None] if idx.ndim == 1 else idx
    E = int(idx.max()) + 1 if E is None and idx.size else E
    idx = _check_indices(idx, E)
    T = _check_count("seq_len", seq_len, 2)
    if idx.shape[0] % T:
        raise ValueError(f"seq_len: {idx.shape[0]} routed tokens are not whole sequences of {T}")
    if mode not in ("top1", "set"):
        raise ValueError(f"mode: expected 'top1' or 'set', got {mode!r}")
    seqs = idx.reshape(-1, T, idx.shape[1])
    if mode == "top1":
        rate = float((seqs[:, 1:, 0] == seqs[:, :-1, 0]).mean())
        f = np.bincount(idx[:, 0], minlength=E) / idx.shape[0]
        return rate, float((f * f).sum())
    a, b = seqs[:, 1:, :], seqs[:, :-1, :]
    hit = (a[..., :, None] == b[..., None, :]).any(axis=(-1, -2))
    return float(hit.mean()), _set_overlap_baseline(idx, E)


def random_baselines(E: int, K: int) -> dict:
    """Chance levels of the metrics above for uniform random top-K routing (router-analysis.md 4.1)."""
    E = _check_count("E", E)
    K = _check_count("K", K)
    if K > E:
        raise ValueError(f"K: must be <= E={E}, got {K}")
    return dict(
        relative_load=1.0,
        domain_share=1.0 / E,
        coactivation=(K - 1) / (E - 1) if E > 1 else 0.0,
        saturation=K / E,
        consecutive_top1=1.0 / E,
        consecutive_set=1.0 - math.comb(E - K, K) / math.comb(E, K),
        token_specialisation=1.0 / E,
    )


# ---------------------------------------------------------------------------------------------
# plots (headless: an Agg canvas, no pyplot)
# ---------------------------------------------------------------------------------------------
def new_figure(width: float = 7.2, height: float = 4.6):
    """A headless matplotlib Figure (Agg canvas, no pyplot state) for custom lesson plots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path, title: str, caption: Optional[str]) -> str:
    """Title, one-line caption under the axes, tight layout, PNG at `path`; returns the path."""
    fig.suptitle(title, fontsize=11)
    if caption:
        fig.text(0.5, 0.012, caption, ha="center", va="bottom", fontsize=8, style="italic", wrap=True)
    fig.tight_layout(rect=(0, 0.06 if caption else 0, 1, 0.95))
    path = os.fspath(path)
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_load_over_training(loads, path, title: str = "Expert load over training",
                            steps=None, caption: Optional[str] = None) -> str:
    """loads [n_steps, E] (counts or shares) -> stacked area of each expert's share (%) per step."""
    L = np.asarray(loads, dtype=np.float64)
    if L.ndim != 2 or L.shape[0] < 1:
        raise ValueError(f"loads: expected [n_steps, E], got shape {list(L.shape)}")
    tot = L.sum(axis=1, keepdims=True)
    share = 100.0 * np.divide(L, tot, out=np.zeros_like(L), where=tot > 0)
    x = np.arange(L.shape[0]) if steps is None else np.asarray(steps)
    if x.shape != (L.shape[0],):
        raise ValueError(f"steps: expected {L.shape[0]} values, got shape {list(x.shape)}")
    E = L.shape[1]
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    import matplotlib
    cmap = matplotlib.colormaps["tab20"]
    ax.stackplot(x, share.T, labels=[f"expert {e}" for e in range(E)],
                 colors=[cmap(e % 20) for e in range(E)])
    ax.axhline(100.0 / E, color="k", lw=0.6, ls="--")
    ax.set_xlim(x[0], x[-1] if len(x) > 1 else x[0] + 1)
    ax.set_ylim(0, 100)
    ax.set_xlabel("training step")
    ax.set_ylabel("share of routed assignments (%)")
    if E <= 16:
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7)
    cap = caption or ("Bands of equal height (dashed: the 1/E share) mean balanced load; "
                      "one band swallowing the rest is collapse.")
    return save_figure(fig, path, title, cap)


def plot_maxvio(curves: dict, path, title: str = "MaxVio per batch", steps=None,
                logy: bool = True, caption: Optional[str] = None) -> str:
    """curves {name: [MaxVio per step]} -> one line each (log y by default; 0 = perfect balance)."""
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves: expected a non-empty dict {name: list of MaxVio values}")
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in curves.items():
        y = np.asarray(ys, dtype=np.float64)
        x = np.arange(len(y)) if steps is None else np.asarray(steps)[:len(y)]
        ax.plot(x, np.maximum(y, 1e-3) if logy else y, label=str(name), lw=1.2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio = max load / mean load - 1" + (" (log)" if logy else ""))
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    cap = caption or "Lower is better balanced: 0 = every expert gets its share, E-1 = one expert gets all."
    return save_figure(fig, path, title, cap)


def plot_heatmaps(matrices: Sequence, row_names, col_names, path, title: str,
                  caption: Optional[str] = None, panel_titles=None, xlabel: str = "expert",
                  ylabel: str = "label", cbar_label: str = "relative load (1 = uniform)",
                  center: Optional[float] = 1.0, vmax: Optional[float] = None,
                  annotate: Optional[bool] = None) -> str:
    """One heatmap panel per matrix [rows, cols] side by side (e.g. one per layer), shared colours.

    center=1.0 uses a diverging map around 1 (relative load); center=None a sequential map.
    """
    mats = [np.asarray(m, dtype=np.float64) for m in matrices]
    if not mats or any(m.ndim != 2 or m.shape != mats[0].shape for m in mats):
        raise ValueError("matrices: expected a non-empty list of 2-D arrays of one shape")
    R, Cn = mats[0].shape
    if row_names is not None and len(row_names) != R:
        raise ValueError(f"row_names: expected {R} names, got {len(row_names)}")
    if col_names is not None and len(col_names) != Cn:
        raise ValueError(f"col_names: expected {Cn} names, got {len(col_names)}")
    from matplotlib.colors import TwoSlopeNorm
    finite = np.concatenate([m[np.isfinite(m)] for m in mats]) if mats else np.zeros(1)
    hi = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
    P = len(mats)
    fig = new_figure(min(4.0 + 0.4 * Cn * P, 18.0), min(2.8 + 0.35 * R, 12.0))
    gs = fig.add_gridspec(1, P + 1, width_ratios=[1.0] * P + [0.04], left=0.12, right=0.92,
                          bottom=0.24, top=0.84, wspace=0.12)
    if annotate is None:
        annotate = R * Cn <= 200
    im = None
    axes = []
    for k, m in enumerate(mats):
        ax = fig.add_subplot(gs[0, k])
        axes.append(ax)
        if center is not None:
            top = max(hi, center + 1e-9)
            bottom = min(float(finite.min()) if finite.size else 0.0, center - 1e-9)
            im = ax.imshow(m, cmap="RdBu_r", norm=TwoSlopeNorm(vcenter=center, vmin=bottom, vmax=top),
                           aspect="auto")
        else:
            lo = float(finite.min()) if finite.size else 0.0
            im = ax.imshow(m, cmap="viridis", vmin=min(lo, 0.0), vmax=hi, aspect="auto")
        ax.set_xticks(range(Cn))
        ax.set_xticklabels(col_names if col_names is not None else range(Cn), fontsize=7, rotation=90)
        ax.set_yticks(range(R))
        if k == 0:
            ax.set_yticklabels(row_names if row_names is not None else range(R), fontsize=7)
        else:
            ax.set_yticklabels([])
        ax.set_xlabel(xlabel)
        if k == 0:
            ax.set_ylabel(ylabel)
        if panel_titles is not None:
            ax.set_title(str(panel_titles[k]), fontsize=9)
        if annotate:
            for i in range(R):
                for j in range(Cn):
                    if np.isfinite(m[i, j]):
                        t = float(im.norm(m[i, j]))          # colour position in [0, 1]
                        dark = (t < 0.2 or t > 0.8) if center is not None else t < 0.5
                        ax.text(j, i, f"{m[i, j]:.2g}", ha="center", va="center", fontsize=6,
                                color="white" if dark else "black")
    fig.colorbar(im, cax=fig.add_subplot(gs[0, P]), label=cbar_label)
    cap = caption or "Red cells: the label uses that expert more than uniform (1); blue: less."
    fig.suptitle(title, fontsize=11)
    fig.text(0.5, 0.012, cap, ha="center", va="bottom", fontsize=8, style="italic")
    path = os.fspath(path)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, format="png")
    return path


def plot_heatmap(matrix, row_names, col_names, path, title: str, caption: Optional[str] = None,
                 xlabel: str = "expert", ylabel: str = "label",
                 cbar_label: str = "relative load (1 = uniform)", center: Optional[float] = 1.0,
                 vmax: Optional[float] = None) -> str:
    """matrix [rows, cols] -> one heatmap (e.g. relative_load_matrix: labels x experts)."""
    return plot_heatmaps([matrix], row_names, col_names, path, title, caption, xlabel=xlabel,
                         ylabel=ylabel, cbar_label=cbar_label, center=center, vmax=vmax)


def plot_bar(values, path, title: str, ylabel: str, caption: Optional[str] = None,
             names=None, xlabel: str = "", logy: bool = False, hline: Optional[float] = None,
             hline_label: str = "") -> str:
    """values {name: number} (or a sequence with `names`) -> bar chart (e.g. gradient-check errors)."""
    if isinstance(values, dict):
        names, vals = list(values.keys()), list(values.values())
    else:
        vals = list(values)
        names = [str(i) for i in range(len(vals))] if names is None else list(names)
    if not vals or len(names) != len(vals):
        raise ValueError("values: expected a non-empty dict or a sequence with as many names")
    v = np.asarray(vals, dtype=np.float64)
    fig = new_figure(max(5.0, 0.35 * len(v) + 2.5), 4.4)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(range(len(v)), np.maximum(v, 1e-300) if logy else v, color="tab:blue")
    ax.set_xticks(range(len(v)))
    ax.set_xticklabels([str(n) for n in names], rotation=60 if len(v) > 6 else 0, ha="right"
                       if len(v) > 6 else "center", fontsize=7)
    if logy:
        ax.set_yscale("log")
    if hline is not None:
        ax.axhline(hline, color="k", ls="--", lw=0.8, label=hline_label or None)
        if hline_label:
            ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, title, caption)


def plot_lines(x, curves: dict, path, title: str, xlabel: str, ylabel: str,
               caption: Optional[str] = None, logy: bool = False,
               hlines: Optional[dict] = None) -> str:
    """x [n] (or None = 0..n-1) and curves {name: [n] values} -> line plot; hlines {name: y} dashed."""
    if not isinstance(curves, dict) or not curves:
        raise ValueError("curves: expected a non-empty dict {name: values}")
    fig = new_figure()
    ax = fig.add_subplot(1, 1, 1)
    for name, ys in curves.items():
        y = np.asarray(ys, dtype=np.float64)
        xs = np.arange(len(y)) if x is None else np.asarray(x)
        if xs.shape != y.shape:
            raise ValueError(f"curves[{name!r}]: {len(y)} values but x has {xs.shape[0]}")
        ax.plot(xs, y, label=str(name), lw=1.2, marker="o" if len(y) <= 12 else None, ms=3)
    for name, yv in (hlines or {}).items():
        ax.axhline(float(yv), ls="--", lw=0.8, color="gray")
        ax.annotate(str(name), xy=(0.01, float(yv)), xycoords=("axes fraction", "data"),
                    fontsize=7, color="gray", va="bottom")
    if logy:
        ax.set_yscale("log")
    if x is not None and np.issubdtype(np.asarray(x).dtype, np.integer):
        from matplotlib.ticker import MaxNLocator
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))   # layers, steps: whole numbers
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return save_figure(fig, path, title, caption)


def plot_coactivation(A, path, title: str = "Expert co-activation P(j | i)",
                      caption: Optional[str] = None, top: int = 16,
                      baseline: Optional[float] = None) -> str:
    """A [E, E] from coactivation() -> heatmap (%) of the `top` experts with the highest co-activation."""
    A = np.asarray(A, dtype=np.float64)
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"A: expected a square [E, E] matrix, got shape {list(A.shape)}")
    E = A.shape[0]
    keep = np.sort(np.argsort(-A.max(axis=1), kind="stable")[:min(top, E)])
    sub = 100.0 * A[np.ix_(keep, keep)]
    names = [str(e) for e in keep]
    cap = caption or ("Row i: of the tokens routed to expert i, the % also routed to expert j"
                      + (f"; random = {100 * baseline:.0f} %." if baseline is not None else "."))
    return plot_heatmaps([sub], names, names, path, title, cap, xlabel="expert j",
                         ylabel="expert i", cbar_label="P(j | i) (%)", center=None,
                         vmax=max(60.0, float(sub.max())))

"""Synthetic data sets (no downloads) and a character-level loader for your own text.

Every data set is a `TokenDataset` of fixed-length rows: row [T+1] holds one sequence, the model
reads `row[:-1]` and predicts `row[1:]`. Next to the tokens it keeps one label per token (the
language of the document, or the task of the sequence), so that router analyses
(`tinymoe.analysis`) can ask "which expert serves which language?".

    ds = make_languages(seed=0)                     # 4 synthetic languages + shared punctuation
    ds = make_tasks(seed=0)                         # copy / reverse / sort / add on shared digits
    ds = load_text("input.txt", seq_len=64)         # your own file, one token per character
    x, y, lab = get_batch(ds, "train", rng, 16)     # [B, T] inputs, targets (-100 = ignored), labels

Why these two synthetic sets (shared/reference/router-analysis.md, section 2):
* A router that sees only the current token does NOT group tokens by language, even when every
  language has its own vocabulary (measured NMI(expert; language) 0.01-0.06): each token just gets
  some expert. Routing specialises by language when the label is visible in the router input as a
  shared, document-level direction, which is exactly what attention over a single-language
  document supplies. So `make_languages` writes single-language documents, gives each language its
  own grammar, and adds a few tokens shared by all languages: for those tokens the language can
  only be known from context, and the next token depends on it.
* Conflicting maps on shared inputs (same symbols, different required output per task) make one
  expert per task the simple solution (Chen et al. 2022); `make_tasks` is that mixture.

Everything is generated from `np.random.default_rng(seed)`; the same arguments give the same bits.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

IGNORE_INDEX = -100  # targets with this value are skipped by basic.cross_entropy_forward

SHARED_TOKEN_NAMES = [".", ",", ";", "!", "?", ":", "-", "'", '"', "(", ")", "/"]
TASKS = ("copy", "reverse", "sort", "add", "shift")


@dataclass
class TokenDataset:
    """Token rows plus per-token labels. Shapes: rows [N, T+1]; inputs row[:-1], targets row[1:]."""

    name: str
    vocab_size: int                            # V: token ids are in [0, V)
    train: np.ndarray                          # int64 [Ntr, T+1]
    val: np.ndarray                            # int64 [Nval, T+1]
    train_labels: np.ndarray                   # int64 [Ntr, T+1] label id of every token
    val_labels: np.ndarray                     # int64 [Nval, T+1]
    label_names: list                          # label id -> name (language or task)
    token_names: Optional[list] = None         # token id -> printable name
    loss_mask_train: Optional[np.ndarray] = None  # bool [Ntr, T+1]: True = this token is a target
    loss_mask_val: Optional[np.ndarray] = None    # bool [Nval, T+1]; None = every token counts
    meta: dict = field(default_factory=dict)   # generator settings and extra facts (optimal loss ...)

    @property
    def seq_len(self) -> int:
        """T: the number of model inputs per row."""
        return int(self.train.shape[1] - 1)

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def split(self, split: str):
        """(rows [N, T+1], labels [N, T+1], mask [N, T+1] or None) of 'train' or 'val'."""
        if split == "train":
            return self.train, self.train_labels, self.loss_mask_train
        if split == "val":
            return self.val, self.val_labels, self.loss_mask_val
        raise ValueError(f"split: expected 'train' or 'val', got {split!r}")


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name}: expected an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")
    return int(value)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    return int(seed)


def targets(rows: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """[N, T+1] rows (and bool mask [N, T+1]) -> targets [N, T] = rows[:, 1:], -100 where masked out.

    mask[i, j] True means token rows[i, j] counts as a target (position 0 never is one).
    """
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] < 2:
        raise ValueError(f"rows: expected shape [N, T+1] with T >= 1, got {list(rows.shape)}")
    y = rows[:, 1:].astype(np.int64, copy=True)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != rows.shape:
            raise ValueError(f"mask: expected shape {list(rows.shape)}, got {list(mask.shape)}")
        y[~mask[:, 1:]] = IGNORE_INDEX
    return y


# ---------------------------------------------------------------------------------------------
# (a) synthetic languages
# ---------------------------------------------------------------------------------------------
def _language_tables(rng, n_languages, alphabet, branching, order):
    """succ [L, A, (A,) branching] local successor ids; successor 0 follows a random cycle.

    The cycle (a random Hamiltonian cycle over the language's alphabet, taken by successor 0 of
    every context) makes the chain irreducible: every token of a language, shared ones included,
    is reachable from every state, so all of them occur in long enough corpora.
    """
    n_ctx = alphabet if order == 1 else alphabet * alphabet
    succ = np.empty((n_languages, n_ctx, branching), dtype=np.int64)
    for l in range(n_languages):
        cyc = rng.permutation(alphabet)
        nxt = np.empty(alphabet, dtype=np.int64)
        nxt[cyc] = np.roll(cyc, -1)                      # nxt[cyc[i]] = cyc[i+1]
        for c in range(n_ctx):
            cur = c % alphabet                           # context index = prev * A + cur (order 2)
            first = nxt[cur]
            others = np.delete(np.arange(alphabet), first)
            succ[l, c, 0] = first
            succ[l, c, 1:] = rng.choice(others, size=branching - 1, replace=False)
    return succ


def make_languages(n_languages: int = 4, vocab_per_language: int = 12, n_shared: int = 4,
                   seq_len: int = 32, n_train: int = 2048, n_val: int = 256, seed: int = 0,
                   branching: int = 2, order: int = 2) -> TokenDataset:
    """Single-language documents -> TokenDataset with rows [N, seq_len+1], labels = language id.

    Vocabulary (V = n_shared + n_languages * vocab_per_language):
        ids 0 .. n_shared-1                       shared tokens, used by every language ('.', ',', ...)
        n_shared + l*vocab_per_language + j       private token j of language l (named 'A0', 'B3', ...)
    Grammar of language l: a sparse Markov table of order `order` (1: next | current token;
    2: next | previous two tokens) over the language's alphabet (its private tokens + the shared
    ones). Every context has `branching` distinct successors, drawn uniformly, so given the
    language and the context the next token has entropy exactly ln(branching) nats: that is the
    optimal loss (meta['optimal_loss']). Tables differ between languages, including the rows of
    the shared tokens: after '.' the next token depends on the language, which only the context
    reveals. A document starts with a uniform private token of its language (context padded with
    that token); languages are assigned to documents in equal numbers, in random order.

    Why routing after attention should specialise and token-only routing should not: private tokens
    name their language, but a token-only router has no reason to group them (it may hash them to
    any expert), and for shared tokens (about n_shared / alphabet of all tokens) it cannot know the
    language at all. After attention over a single-language document the hidden state carries a
    language direction common to all its tokens, which a linear router can read.
    """
    L = _check_int("n_languages", n_languages, 1)
    vpl = _check_int("vocab_per_language", vocab_per_language, 2)
    S = _check_int("n_shared", n_shared, 0)
    T = _check_int("seq_len", seq_len, 1)
    ntr = _check_int("n_train", n_train, 1)
    nva = _check_int("n_val", n_val, 1)
    seed = _check_seed(seed)
    A = vpl + S                                          # alphabet of one language
    b = _check_int("branching", branching, 1)
    if b > A:
        raise ValueError(f"branching: must be <= vocab_per_language + n_shared = {A} "
                         f"(distinct successors), got {b}")
    if order not in (1, 2):
        raise ValueError(f"order: expected 1 or 2, got {order!r}")
    rng = np.random.default_rng(seed)
    succ = _language_tables(rng, L, A, b, order)

    # local id -> global id, per language: private j -> S + l*vpl + j; shared vpl+s -> s
    to_global = np.empty((L, A), dtype=np.int64)
    for l in range(L):
        to_global[l, :vpl] = S + l * vpl + np.arange(vpl)
        to_global[l, vpl:] = np.arange(S)

    def sample(n):
        lang = rng.permutation(np.arange(n) % L)
        loc = np.empty((n, T + 1), dtype=np.int64)
        loc[:, 0] = rng.integers(0, vpl, size=n)         # first token: a private one
        prev = loc[:, 0].copy()
        for t in range(1, T + 1):
            cur = loc[:, t - 1]
            ctx = cur if order == 1 else prev * A + cur
            pick = rng.integers(0, b, size=n)
            loc[:, t] = succ[lang, ctx, pick]
            prev = cur
        rows = to_global[lang[:, None], loc]
        labels = np.repeat(lang[:, None], T + 1, axis=1).astype(np.int64)
        return rows, labels

    train, train_labels = sample(ntr)
    val, val_labels = sample(nva)
    letters = [chr(ord("A") + l) if l < 26 else f"L{l}_" for l in range(L)]
    shared_names = [SHARED_TOKEN_NAMES[s] if s < len(SHARED_TOKEN_NAMES) else f"<s{s}>" for s in range(S)]
    token_names = shared_names + [f"{letters[l]}{j}" for l in range(L) for j in range(vpl)]
    meta = dict(n_languages=L, vocab_per_language=vpl, n_shared=S, branching=b, order=order,
                seed=seed, shared_ids=list(range(S)),
                language_ids=[list(range(S + l * vpl, S + (l + 1) * vpl)) for l in range(L)],
                optimal_loss=math.log(b),
                successors=succ, local_to_global=to_global)
    return TokenDataset(name="languages", vocab_size=S + L * vpl, train=train, val=val,
                        train_labels=train_labels, val_labels=val_labels,
                        label_names=[f"lang {letters[l]}" for l in range(L)],
                        token_names=token_names, meta=meta)


# ---------------------------------------------------------------------------------------------
# (b) algorithmic tasks on shared symbols
# ---------------------------------------------------------------------------------------------
def _digits(x: np.ndarray, base: int, n: int) -> np.ndarray:
    """[M] ints -> [M, n] base-`base` digits, least significant first."""
    return (x[:, None] // base ** np.arange(n)[None, :]) % base


def make_tasks(tasks=("copy", "reverse", "sort", "add"), n_symbols: int = 10, seq_len: int = 32,
               n_train: int = 2048, n_val: int = 256, seed: int = 0, min_len: int = 1,
               max_len: Optional[int] = None, add_digits: Optional[int] = None) -> TokenDataset:
    """Task mixture -> TokenDataset, rows [task, input..., SEP, answer..., PAD...], labels = task id.

    Vocabulary: symbols 0..n_symbols-1 (shared by all tasks), then one token per task ('<copy>'...),
    then SEP ('=') and PAD ('_'). Tasks (input x of length n drawn uniformly in [min_len, max_len]):
        copy     answer = x
        reverse  answer = x reversed
        sort     answer = x sorted ascending
        shift    answer = (x_i + 1) mod n_symbols
        add      x = digits of a then digits of b (add_digits each, base n_symbols, least significant
                 digit first); answer = digits of a + b (add_digits + 1, least significant first)
    Tasks are assigned to rows in equal numbers, in random order. The loss mask is True only on the
    answer tokens, so `targets(rows, mask)` trains the model to produce answers (the answer is a
    function of the input: optimal masked loss 0, meta['optimal_loss']). meta also holds, per
    split, 'answer_start_<split>' (index of the first answer token) and 'answer_len_<split>'.
    """
    if isinstance(tasks, str):
        tasks = (tasks,)
    tasks = tuple(tasks)
    if not tasks or any(t not in TASKS for t in tasks) or len(set(tasks)) != len(tasks):
        raise ValueError(f"tasks: expected distinct names from {TASKS}, got {tasks!r}")
    Sy = _check_int("n_symbols", n_symbols, 2)
    T = _check_int("seq_len", seq_len, 1)
    ntr = _check_int("n_train", n_train, 1)
    nva = _check_int("n_val", n_val, 1)
    seed = _check_seed(seed)
    lo = _check_int("min_len", min_len, 1)
    longest = (T - 1) // 2                               # 1 + n + 1 + n <= T + 1
    hi = longest if max_len is None else _check_int("max_len", max_len, 1)
    if any(t != "add" for t in tasks):
        if hi > longest:
            raise ValueError(f"max_len: rows of seq_len={T} fit inputs of at most {longest}, got {hi}")
        if lo > hi:
            raise ValueError(f"min_len: must be <= max_len={hi}, got {lo}")
        if longest < 1:
            raise ValueError(f"seq_len: must be >= 3 for tasks {tasks}, got {T}")
    if "add" in tasks:
        most = (T - 2) // 3                              # 1 + 2d + 1 + (d+1) <= T + 1
        d = min(3, most) if add_digits is None else _check_int("add_digits", add_digits, 1)
        if d < 1 or d > most:
            raise ValueError(f"add_digits: rows of seq_len={T} fit at most {most} digits "
                             f"(1 + 2d + 1 + d + 1 <= seq_len + 1), got {d if d >= 1 else add_digits}")
    else:
        d = 0
    nt = len(tasks)
    task_tok = {t: Sy + i for i, t in enumerate(tasks)}
    SEP, PAD = Sy + nt, Sy + nt + 1
    rng = np.random.default_rng(seed)

    def sample(n):
        tid = rng.permutation(np.arange(n) % nt)
        rows = np.full((n, T + 1), PAD, dtype=np.int64)
        mask = np.zeros((n, T + 1), dtype=bool)
        start = np.zeros(n, dtype=np.int64)
        alen = np.zeros(n, dtype=np.int64)
        for i in range(n):
            task = tasks[tid[i]]
            if task == "add":
                a, b = rng.integers(0, Sy ** d, size=2)
                x = np.concatenate([_digits(np.array([a]), Sy, d)[0], _digits(np.array([b]), Sy, d)[0]])
                ans = _digits(np.array([a + b]), Sy, d + 1)[0]
            else:
                ln = int(rng.integers(lo, hi + 1))
                x = rng.integers(0, Sy, size=ln)
                if task == "copy":
                    ans = x
                elif task == "reverse":
                    ans = x[::-1]
                elif task == "sort":
                    ans = np.sort(x)
                else:  # shift
                    ans = (x + 1) % Sy
            seq = np.concatenate([[task_tok[task]], x, [SEP], ans])
            rows[i, :len(seq)] = seq
            start[i] = len(x) + 2
            alen[i] = len(ans)
            mask[i, start[i]:start[i] + alen[i]] = True
        labels = np.repeat(tid[:, None], T + 1, axis=1).astype(np.int64)
        return rows, labels, mask, start, alen

    tr, trl, trm, trs, tra = sample(ntr)
    va, val_, vam, vas, vaa = sample(nva)
    sym_names = [str(i) if i < 10 else f"s{i}" for i in range(Sy)]
    token_names = sym_names + [f"<{t}>" for t in tasks] + ["=", "_"]
    meta = dict(tasks=list(tasks), n_symbols=Sy, sep_id=SEP, pad_id=PAD, task_ids=dict(task_tok),
                add_digits=d, min_len=lo, max_len=hi, seed=seed, optimal_loss=0.0,
                answer_start_train=trs, answer_len_train=tra, answer_start_val=vas, answer_len_val=vaa)
    return TokenDataset(name="tasks", vocab_size=Sy + nt + 2, train=tr, val=va, train_labels=trl,
                        val_labels=val_, label_names=list(tasks), token_names=token_names,
                        loss_mask_train=trm, loss_mask_val=vam, meta=meta)


# ---------------------------------------------------------------------------------------------
# (c) your own text, one token per character
# ---------------------------------------------------------------------------------------------
def load_text(path, seq_len: int, val_fraction: float = 0.1, seed: int = 0) -> TokenDataset:
    """UTF-8 text file -> character-level TokenDataset (vocab = the sorted distinct characters).

    The first (1 - val_fraction) of the characters make the train split, the rest the val split
    (a contiguous cut, so no validation text leaks into training). Each split is cut into rows of
    seq_len+1 characters with stride seq_len (every character is a target once); `seed` shuffles
    the order of the train rows. Labels are all 0 ('text'); there is no loss mask.
    """
    T = _check_int("seq_len", seq_len, 1)
    seed = _check_seed(seed)
    if not isinstance(val_fraction, (int, float)) or not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), got {val_fraction!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"path: {path!r} is a folder; text:PATH needs one UTF-8 text file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: text file {path!r} does not exist")
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"path: {path!r} is not valid UTF-8 text ({e})") from None
    if not text:
        raise ValueError(f"path: text file {path!r} is empty")
    n_val_chars = int(round(len(text) * float(val_fraction)))
    n_tr_chars = len(text) - n_val_chars
    need = T + 1
    if n_tr_chars < need or n_val_chars < need:
        raise ValueError(
            f"path: {path!r} has {len(text)} characters; with seq_len={T} and "
            f"val_fraction={val_fraction} each split needs >= {need} (train {n_tr_chars}, val "
            f"{n_val_chars}). Use a longer file, a smaller seq_len or another val_fraction.")
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.fromiter((stoi[c] for c in text), dtype=np.int64, count=len(text))

    def rows_of(a):
        n = (len(a) - 1) // T
        return np.stack([a[i * T:i * T + T + 1] for i in range(n)])

    train = rows_of(ids[:n_tr_chars])
    train = train[np.random.default_rng(seed).permutation(len(train))]
    val = rows_of(ids[n_tr_chars:])
    return TokenDataset(name=f"text:{path}", vocab_size=len(chars), train=train, val=val,
                        train_labels=np.zeros_like(train), val_labels=np.zeros_like(val),
                        label_names=["text"], token_names=chars,
                        meta=dict(path=path, n_chars=len(text), val_fraction=float(val_fraction),
                                  seed=seed, stoi=stoi))


def encode(ds: TokenDataset, text: str) -> np.ndarray:
    """Text -> int64 ids for a character-level data set (ValueError on an unknown character)."""
    stoi = ds.meta.get("stoi")
    if stoi is None:
        stoi = {n: i for i, n in enumerate(ds.token_names or [])}
    bad = [c for c in text if c not in stoi]
    if bad:
        raise ValueError(f"text: character {bad[0]!r} is not in the vocabulary of {ds.name!r}")
    return np.array([stoi[c] for c in text], dtype=np.int64)


def decode(ds: TokenDataset, ids) -> str:
    """Ids -> readable string (characters joined for text data, names joined by spaces otherwise)."""
    names = ds.token_names or [str(i) for i in range(ds.vocab_size)]
    sep = "" if ds.name.startswith("text:") else " "
    return sep.join(names[int(i)] for i in np.asarray(ids).ravel())


def load_dataset(name: str, seq_len: int, seed: int = 0, **kw) -> TokenDataset:
    """'languages' | 'tasks' | 'text:PATH' -> TokenDataset (extra keywords go to the generator)."""
    if not isinstance(name, str):
        raise ValueError(f"name: expected 'languages', 'tasks' or 'text:PATH', got {name!r}")
    if name == "languages":
        return make_languages(seq_len=seq_len, seed=seed, **kw)
    if name == "tasks":
        return make_tasks(seq_len=seq_len, seed=seed, **kw)
    if name.startswith("text:") and len(name) > 5:
        return load_text(name[5:], seq_len=seq_len, seed=seed, **kw)
    raise ValueError(f"name: expected 'languages', 'tasks' or 'text:PATH', got {name!r}")


# ---------------------------------------------------------------------------------------------
# batches and baselines
# ---------------------------------------------------------------------------------------------
def get_batch(ds: TokenDataset, split: str, rng: np.random.Generator, batch_size: int):
    """-> tokens [B, T] int64, targets [B, T] int64 (-100 = not a target), labels [B, T] int64.

    Rows are drawn with replacement by `rng.integers` (the same generator state gives the same
    batch). labels[b, t] is the label of input token tokens[b, t].
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng: expected a numpy.random.Generator, got {type(rng).__name__}")
    B = _check_int("batch_size", batch_size, 1)
    n_rows = ds.split(split)[0].shape[0]
    pick = rng.integers(0, n_rows, size=B)
    return split_arrays(ds, split, pick)


def split_arrays(ds: TokenDataset, split: str, rows_idx=None):
    """Whole split (or the chosen rows) -> (tokens [N, T], targets [N, T], labels [N, T])."""
    rows, labels, mask = ds.split(split)
    if rows_idx is not None:
        rows, labels = rows[rows_idx], labels[rows_idx]
        mask = None if mask is None else mask[rows_idx]
    return (rows[:, :-1].astype(np.int64, copy=True), targets(rows, mask),
            labels[:, :-1].astype(np.int64, copy=True))


def _entropy(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def unigram_entropy(ds: TokenDataset, split: str = "train") -> float:
    """Unigram baseline loss (nats): entropy of the empirical distribution of the valid targets.

    H = -sum_v p_v ln p_v, p_v = (# valid targets equal to v) / (# valid targets). It is the loss
    of the best predictor that ignores the input entirely.
    """
    rows, _, mask = ds.split(split)
    y = targets(rows, mask)
    y = y[y != IGNORE_INDEX]
    if y.size == 0:
        raise ValueError(f"split: {split!r} of {ds.name!r} has no valid targets")
    return _entropy(np.bincount(y, minlength=ds.vocab_size))


def bigram_entropy(ds: TokenDataset, split: str = "train") -> float:
    """Bigram baseline loss (nats): H(next | current) = H(current, next) - H(current), valid targets.

    The loss of the best predictor that sees only the current input token (what a model without
    attention can reach). On the languages data the optimum ln(branching) is below it, because after
    a shared token the next token depends on the language, which only the context reveals.
    """
    rows, _, mask = ds.split(split)
    y = targets(rows, mask)
    x = rows[:, :-1]
    ok = y != IGNORE_INDEX
    if not ok.any():
        raise ValueError(f"split: {split!r} of {ds.name!r} has no valid targets")
    V = ds.vocab_size
    pair = np.bincount(x[ok] * V + y[ok], minlength=V * V)
    return _entropy(pair) - _entropy(np.bincount(x[ok], minlength=V))

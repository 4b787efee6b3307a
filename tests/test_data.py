"""tinymoe.data: synthetic languages and tasks, the text loader, batches and baselines.

Expected values come from independent Python re-implementations (answers of the tasks, grammar
statistics) or from hand arithmetic written out in comments.
"""
from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest

from tinymoe.data import (IGNORE_INDEX, TokenDataset, bigram_entropy, decode, get_batch,
                          load_dataset, load_text, make_languages, make_tasks, targets,
                          unigram_entropy)

SMALL_LANG = dict(n_languages=3, vocab_per_language=6, n_shared=3, seq_len=24, n_train=240, n_val=30)
SMALL_TASKS = dict(n_symbols=7, seq_len=20, n_train=200, n_val=40)


def _same(a: TokenDataset, b: TokenDataset) -> bool:
    arrays = ("train", "val", "train_labels", "val_labels", "loss_mask_train", "loss_mask_val")
    return all((getattr(a, k) is None and getattr(b, k) is None)
               or np.array_equal(getattr(a, k), getattr(b, k)) for k in arrays)


@pytest.mark.data
@pytest.mark.parametrize("make,kw", [(make_languages, SMALL_LANG), (make_tasks, SMALL_TASKS)])
def test_same_seed_same_bits_other_seed_differs(make, kw):
    a, b, c = make(seed=3, **kw), make(seed=3, **kw), make(seed=4, **kw)
    assert _same(a, b)
    assert not np.array_equal(a.train, c.train)


@pytest.mark.data
@pytest.mark.parametrize("make,kw", [(make_languages, SMALL_LANG), (make_tasks, SMALL_TASKS)])
def test_shapes_dtypes_and_vocab_range(make, kw):
    ds = make(seed=0, **kw)
    T = kw["seq_len"]
    for rows, labels, n in ((ds.train, ds.train_labels, kw["n_train"]), (ds.val, ds.val_labels, kw["n_val"])):
        assert rows.shape == (n, T + 1) and rows.dtype == np.int64
        assert labels.shape == rows.shape and labels.dtype == np.int64
        assert rows.min() >= 0 and rows.max() < ds.vocab_size
        assert labels.min() >= 0 and labels.max() < len(ds.label_names)
    assert ds.seq_len == T
    assert len(ds.token_names) == ds.vocab_size
    if ds.loss_mask_train is not None:
        assert ds.loss_mask_train.dtype == bool and ds.loss_mask_train.shape == ds.train.shape


@pytest.mark.data
def test_languages_vocabulary_layout_and_single_language_documents():
    L, vpl, S = 3, 6, 3
    ds = make_languages(seed=1, **SMALL_LANG)
    assert ds.vocab_size == S + L * vpl                     # 3 shared + 3 * 6 private = 21
    for rows, labels in ((ds.train, ds.train_labels), (ds.val, ds.val_labels)):
        for row, lab in zip(rows, labels):
            assert (lab == lab[0]).all()                    # one label per document
            l = int(lab[0])
            private = row[row >= S]
            # private token j of language l has id S + l*vpl + j, so (id - S) // vpl is its language
            assert ((private - S) // vpl == l).all()
            assert row[0] >= S                              # documents start with a private token
    counts = np.bincount(ds.train_labels[:, 0], minlength=L)
    assert (counts == 240 // 3).all()                       # languages in equal numbers


@pytest.mark.data
def test_every_shared_token_occurs_in_every_language():
    ds = make_languages(seed=2, **SMALL_LANG)
    for l in range(3):
        docs = ds.train[ds.train_labels[:, 0] == l]
        for s in range(3):
            assert (docs == s).any(), f"shared token {s} missing from language {l}"
    shared_frac = np.isin(ds.train, [0, 1, 2]).mean()
    assert 0.05 < shared_frac < 0.6


@pytest.mark.data
def test_languages_grammar_entropy_is_ln_branching_and_below_bigram():
    # Independent check of the generative claim: given (language, previous, current) the next token
    # has `branching` equally likely values, so the empirical conditional entropy is ~ln 2; and after
    # a shared token the next token depends on the language, so the bigram baseline is higher.
    ds = make_languages(seed=0, n_languages=4, vocab_per_language=8, n_shared=3, seq_len=32,
                        n_train=1500, n_val=10, branching=2, order=2)
    succ = defaultdict(lambda: defaultdict(int))
    for row, lab in zip(ds.train, ds.train_labels):
        prev = row[0]
        for t in range(1, len(row)):
            succ[(lab[0], prev, row[t - 1])][row[t]] += 1
            prev = row[t - 1]
    n_total = sum(sum(c.values()) for c in succ.values())
    h = 0.0
    for c in succ.values():
        assert len(c) <= 2                                   # at most `branching` successors
        n = sum(c.values())
        h += sum(-k * math.log(k / n) for k in c.values())
    h /= n_total
    assert abs(h - math.log(2)) < 0.02
    assert ds.meta["optimal_loss"] == pytest.approx(math.log(2))
    assert bigram_entropy(ds) > math.log(2) + 0.2
    assert unigram_entropy(ds) > bigram_entropy(ds)
    # shared tokens' successors differ by language: successors of '.' (id 0) are language-private
    nxt = [set(ds.train[:, 1:][(ds.train_labels[:, :-1] == l) & (ds.train[:, :-1] == 0)].tolist()) - {0, 1, 2}
           for l in range(4)]
    assert all(nxt)
    assert all(not (nxt[i] & nxt[j]) for i in range(4) for j in range(i + 1, 4))


def _reference_answer(task: str, x: list, n_symbols: int, d: int) -> list:
    """Independent Python answers (plain lists and ints, no numpy)."""
    if task == "copy":
        return list(x)
    if task == "reverse":
        return list(reversed(x))
    if task == "sort":
        return sorted(x)
    if task == "shift":
        return [(v + 1) % n_symbols for v in x]
    if task == "add":
        a = sum(v * n_symbols ** i for i, v in enumerate(x[:d]))       # least significant first
        b = sum(v * n_symbols ** i for i, v in enumerate(x[d:]))
        s = a + b
        out = []
        for _ in range(d + 1):
            out.append(s % n_symbols)
            s //= n_symbols
        return out
    raise AssertionError(task)


@pytest.mark.data
def test_task_answers_mask_and_labels_match_independent_code():
    tasks = ("copy", "reverse", "sort", "add", "shift")
    ds = make_tasks(tasks=tasks, seed=5, add_digits=2, **SMALL_TASKS)
    Sy, sep, pad = 7, ds.meta["sep_id"], ds.meta["pad_id"]
    assert ds.vocab_size == Sy + len(tasks) + 2
    seen = set()
    for rows, labels, mask in ((ds.train, ds.train_labels, ds.loss_mask_train),
                               (ds.val, ds.val_labels, ds.loss_mask_val)):
        for row, lab, m in zip(rows.tolist(), labels.tolist(), mask.tolist()):
            task = tasks[row[0] - Sy]                        # first token names the task
            seen.add(task)
            assert all(v == tasks.index(task) for v in lab)  # label = task id on every token
            j = row.index(sep)
            x = row[1:j]
            assert all(0 <= v < Sy for v in x)
            want = _reference_answer(task, x, Sy, 2)
            if task == "add":
                assert len(x) == 4
            assert row[j + 1:j + 1 + len(want)] == want
            assert all(v == pad for v in row[j + 1 + len(want):])
            assert m == [j + 1 <= i < j + 1 + len(want) for i in range(len(row))]
    assert seen == set(tasks)


@pytest.mark.data
def test_targets_masks_non_answer_tokens():
    rows = np.array([[5, 1, 2, 3]])
    mask = np.array([[False, False, True, True]])
    np.testing.assert_array_equal(targets(rows, mask), [[IGNORE_INDEX, 2, 3]])
    np.testing.assert_array_equal(targets(rows), [[1, 2, 3]])


@pytest.mark.data
def test_text_loader_round_trip(tmp_path):
    text = "the cat sat on the mat. " * 20 + "ünïcode ok\n"
    p = tmp_path / "input.txt"
    p.write_text(text, encoding="utf-8")
    T = 8
    ds = load_text(p, seq_len=T, val_fraction=0.25, seed=0)
    assert ds.token_names == sorted(set(text))
    assert ds.vocab_size == len(set(text))
    n_val = round(len(text) * 0.25)
    tr_text, va_text = text[:-n_val], text[-n_val:]
    # val rows are consecutive windows of T+1 characters with stride T
    va = "".join(decode(ds, r[:-1]) for r in ds.val) + decode(ds, ds.val[-1, -1:])
    assert va == va_text[:len(va)] and len(va) > len(va_text) - (T + 1)
    # train rows (shuffled) are exactly the windows starting at multiples of T
    want = sorted(tr_text[i * T:i * T + T + 1] for i in range((len(tr_text) - 1) // T))
    assert sorted(decode(ds, r) for r in ds.train) == want
    assert (ds.train_labels == 0).all() and ds.loss_mask_train is None
    ds2 = load_dataset(f"text:{p}", seq_len=T, seed=0, val_fraction=0.25)
    assert np.array_equal(ds.train, ds2.train)


@pytest.mark.data
def test_text_loader_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path"):
        load_text(tmp_path / "missing.txt", seq_len=8)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text(empty, seq_len=8)
    short = tmp_path / "short.txt"
    short.write_text("abcdefghij" * 3)
    with pytest.raises(ValueError, match="seq_len=16"):
        load_text(short, seq_len=16)


@pytest.mark.data
def test_get_batch_is_deterministic_and_consistent():
    ds = make_tasks(seed=0, **SMALL_TASKS)
    x1, y1, l1 = get_batch(ds, "train", np.random.default_rng(7), 16)
    x2, y2, l2 = get_batch(ds, "train", np.random.default_rng(7), 16)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and np.array_equal(l1, l2)
    assert x1.shape == y1.shape == l1.shape == (16, 20) and x1.dtype == y1.dtype == np.int64
    # recover the rows the generator drew and check the batch against them
    pick = np.random.default_rng(7).integers(0, 200, size=16)
    rows, mask = ds.train[pick], ds.loss_mask_train[pick]
    assert np.array_equal(x1, rows[:, :-1])
    assert np.array_equal(y1, np.where(mask[:, 1:], rows[:, 1:], -100))
    assert np.array_equal(l1, ds.train_labels[pick][:, :-1])
    x3, _, _ = get_batch(ds, "val", np.random.default_rng(8), 16)
    assert not np.array_equal(x1, x3)


@pytest.mark.data
def test_unigram_and_bigram_entropy_hand_example():
    rows = np.array([[0, 0, 1], [1, 1, 2]])
    ds = TokenDataset("hand", 3, rows, rows, np.zeros_like(rows), np.zeros_like(rows), ["x"])
    # targets: 0, 1 | 1, 2 -> p = (1/4, 1/2, 1/4): H = 2 * (1/4) ln 4 + (1/2) ln 2 = 1.5 ln 2
    assert unigram_entropy(ds) == pytest.approx(1.5 * math.log(2), abs=1e-12)
    # pairs (0,0) (0,1) (1,1) (1,2): after 0 -> {0,1}, after 1 -> {1,2}, each uniform: H = ln 2
    assert bigram_entropy(ds) == pytest.approx(math.log(2), abs=1e-12)
    # mask out the last target of each row: targets 0 | 1 -> H = ln 2; pairs (0,0),(1,1) -> 0
    mask = np.array([[False, True, False], [False, True, False]])
    ds.loss_mask_train = mask
    assert unigram_entropy(ds) == pytest.approx(math.log(2), abs=1e-12)
    assert bigram_entropy(ds) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.data
@pytest.mark.parametrize("call,arg", [
    (lambda: make_languages(n_languages=0), "n_languages"),
    (lambda: make_languages(vocab_per_language=1), "vocab_per_language"),
    (lambda: make_languages(seq_len=0), "seq_len"),
    (lambda: make_languages(branching=99), "branching"),
    (lambda: make_languages(order=3), "order"),
    (lambda: make_languages(seed=-1), "seed"),
    (lambda: make_tasks(tasks=("copy", "juggle")), "tasks"),
    (lambda: make_tasks(n_symbols=1), "n_symbols"),
    (lambda: make_tasks(seq_len=8, max_len=10), "max_len"),
    (lambda: make_tasks(tasks=("add",), seq_len=8, add_digits=3), "add_digits"),
    (lambda: make_tasks(n_train=0), "n_train"),
    (lambda: load_dataset("wikipedia", 16), "name"),
    (lambda: get_batch(make_tasks(**SMALL_TASKS), "test", np.random.default_rng(0), 2), "split"),
    (lambda: get_batch(make_tasks(**SMALL_TASKS), "train", np.random.default_rng(0), 0), "batch_size"),
    (lambda: get_batch(make_tasks(**SMALL_TASKS), "train", 0, 2), "rng"),
])
def test_bad_arguments_raise_value_error_naming_them(call, arg):
    with pytest.raises(ValueError, match=arg):
        call()


@pytest.mark.data
def test_load_dataset_dispatch_and_import_is_light():
    import subprocess
    import sys
    ds = load_dataset("languages", 16, seed=1, n_train=8, n_val=4)
    assert ds.name == "languages" and ds.train.shape == (8, 17)
    ds = load_dataset("tasks", 16, seed=1, n_train=8, n_val=4)
    assert ds.name == "tasks" and ds.loss_mask_val.shape == (4, 17)
    code = "import sys, tinymoe.data; assert 'matplotlib' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)

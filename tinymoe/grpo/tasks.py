"""Verifiable toy tasks for GRPO: a tiny vocabulary, prompts, rule-based rewards, SFT warm-start data.

Vocabulary (VOCAB_SIZE = 17; a digit's id is its value, so id 7 is the digit 7):

    id   0..9   10   11   12   13   14    15    16
    str  0..9   '+'  '='  ','  '>'  PAD   BOS   EOS
    char 0..9   '+'  '='  ','  '>'  '_'   '^'   '$'      (the characters encode/decode use)

Two tasks, each a frozen dataclass (the task is its configuration):

* AdditionTask(n_digits=2): prompt `^07+42=`, answer `49$`. Operands are zero-padded to n_digits
  so every prompt has the same length (no left padding when prompts are batched); the answer is
  the sum written WITHOUT leading zeros ("0" for 0), then EOS. A rectangle of operand values is
  HELD OUT: "train" prompts never come from it, "heldout" prompts only come from it, so a lesson
  can measure generalisation. Default rectangle: leading digits a in {6, 7}, b in {2, 3}
  (for 2 digits: 60 <= a <= 79 and 20 <= b <= 39; 4 % of all pairs), an interior block.
* SortTask(length=4): prompt `^3,1,4,1>`, answer `1134$`. All `length` digits must come out
  right together. Held out: the digit multisets whose digit sum is divisible by `heldout_mod`
  (default 5, about 20 % of lists).

A problem is a tuple of ints: (a, b) for addition, the digits for sorting.

Reward (rule-based, `reward(task, prompt_tokens, response_tokens) -> float`), TinyZero's scheme:

    1.0                if the response, up to its first EOS, is exactly the canonical answer
    task.format_reward if it is well formed but wrong (default 0.1; set 0.0 to switch it off)
    0.0                otherwise: malformed, empty, no EOS (truncated), bad token ids

Well formed: addition 1..n_digits+1 digits then EOS (so `049$` is well formed but not the exact
answer `49$`: the rule is an exact string match); sorting exactly `length` digits then EOS.
Tokens after the first EOS are ignored (a sampler may keep going or pad). A malformed response
never raises; a prompt the task cannot parse raises ValueError (that is a bug in the caller).

SFT warm start (`sft_examples`): rows `prompt + answer + EOS + PAD...` of length
T = task.prompt_len + task.max_response_len, with next-token targets aligned to the logits:
targets[:, t] is the token the model should predict at position t, i.e. tokens[:, t + 1] for the
positions whose NEXT token is an answer token or the EOS, and -100 everywhere else (prompt, pad,
the last position). Feed `model.forward(tokens)` logits and these targets to cross_entropy.

Making the warm start deliberately partial (so GRPO starts with a low but nonzero reward):
`sft_examples(..., subset=pred)` keeps only problems with pred(problem) True, e.g.
`subset=lambda p: p[1] % 10 <= 4` (SFT sees only pairs whose b ends in 0..4), and/or train for
few SFT steps. Everything is drawn from the np.random.Generator passed in: same seed, same data.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np

# ------------------------------------------------------------------------------------------------
# vocabulary
# ------------------------------------------------------------------------------------------------

PLUS, EQUALS, COMMA, ARROW, PAD, BOS, EOS = 10, 11, 12, 13, 14, 15, 16
VOCAB_SIZE = 17
IGNORE_INDEX = -100
_CHARS = "0123456789+=,>_^$"                     # _CHARS[id] is the character of token id
_IDS = {c: i for i, c in enumerate(_CHARS)}

Problem = Tuple[int, ...]
SPLITS = ("train", "heldout")


def encode(text: str) -> np.ndarray:
    """str -> [len] int64 ids, one character per token ('_' PAD, '^' BOS, '$' EOS)."""
    bad = [c for c in text if c not in _IDS]
    if bad:
        raise ValueError(f"text: character {bad[0]!r} is not in the vocabulary {_CHARS!r}")
    return np.array([_IDS[c] for c in text], dtype=np.int64)


def decode(tokens) -> str:
    """[len] ids -> str (ids outside the vocabulary show as '?', never an error)."""
    return "".join(_CHARS[int(t)] if 0 <= int(t) < VOCAB_SIZE else "?" for t in np.ravel(tokens))


def _digits(value: int, width: Optional[int] = None) -> List[int]:
    s = str(value) if width is None else str(value).zfill(width)
    return [int(c) for c in s]


def _body(response) -> Optional[List[int]]:
    """The response's tokens before its first EOS, or None if there is no EOS / ids are unusable."""
    try:
        arr = np.asarray(response)
        if arr.ndim != 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.integer):
            return None
        ids = [int(t) for t in arr]
    except (TypeError, ValueError, OverflowError):
        return None
    if EOS not in ids:
        return None                               # truncated: never terminated
    return ids[:ids.index(EOS)]


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split: {split!r} is not one of {SPLITS}")


# ------------------------------------------------------------------------------------------------
# tasks
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdditionTask:
    """a + b with n_digits-digit operands; a rectangle of (a, b) is held out.

    heldout: ((a_lo, a_hi), (b_lo, b_hi)) inclusive; None = leading digits a in {6,7}, b in {2,3}.
    format_reward: reward of a well-formed wrong answer (0.0 switches the format reward off).
    """
    n_digits: int = 2
    heldout: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None
    format_reward: float = 0.1
    name: str = "addition"

    def __post_init__(self):
        if not (isinstance(self.n_digits, int) and 1 <= self.n_digits <= 6):
            raise ValueError(f"n_digits: {self.n_digits!r} must be an int in [1, 6]")
        top = 10 ** self.n_digits - 1
        for (lo, hi), nm in zip(self.heldout_box, ("a", "b")):
            if not 0 <= lo <= hi <= top:
                raise ValueError(f"heldout: {nm} range ({lo}, {hi}) must satisfy 0 <= lo <= hi <= {top}")
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"format_reward: {self.format_reward} must be in [0, 1)")

    @property
    def heldout_box(self) -> Tuple[Tuple[int, int], Tuple[int, int]]:
        if self.heldout is not None:
            return tuple(tuple(int(v) for v in r) for r in self.heldout)
        s = 10 ** (self.n_digits - 1)
        return ((6 * s, 8 * s - 1), (2 * s, 4 * s - 1))

    @property
    def prompt_len(self) -> int:          # ^ a + b =
        return 2 * self.n_digits + 3

    @property
    def max_response_len(self) -> int:    # up to n_digits + 1 answer digits, then EOS
        return self.n_digits + 2

    def is_heldout(self, problem: Problem) -> bool:
        (alo, ahi), (blo, bhi) = self.heldout_box
        a, b = problem
        return alo <= a <= ahi and blo <= b <= bhi

    def sample_problem(self, rng: np.random.Generator, split: str) -> Problem:
        (alo, ahi), (blo, bhi) = self.heldout_box
        if split == "heldout":
            return (int(rng.integers(alo, ahi + 1)), int(rng.integers(blo, bhi + 1)))
        n = 10 ** self.n_digits
        while True:                                   # rejection: never from the held-out box
            p = (int(rng.integers(0, n)), int(rng.integers(0, n)))
            if not self.is_heldout(p):
                return p

    def all_problems(self, split: str) -> List[Problem]:
        _check_split(split)
        n = 10 ** self.n_digits
        if n * n > 1_000_000:
            raise ValueError(f"all_problems: {n * n} pairs is too many to enumerate")
        return [(a, b) for a in range(n) for b in range(n)
                if self.is_heldout((a, b)) == (split == "heldout")]

    def prompt_tokens(self, problem: Problem) -> np.ndarray:
        a, b = problem
        ids = [BOS, *_digits(a, self.n_digits), PLUS, *_digits(b, self.n_digits), EQUALS]
        return np.array(ids, dtype=np.int64)

    def parse_prompt(self, tokens) -> Problem:
        ids = [int(t) for t in np.ravel(tokens) if int(t) != PAD]
        nd = self.n_digits
        ok = (len(ids) == self.prompt_len and ids[0] == BOS and ids[nd + 1] == PLUS
              and ids[-1] == EQUALS and all(0 <= t <= 9 for t in ids[1:nd + 1] + ids[nd + 2:-1]))
        if not ok:
            raise ValueError(f"prompt_tokens: {decode(tokens)!r} is not an addition prompt "
                             f"like '^{'0' * nd}+{'0' * nd}='")
        a = int("".join(map(str, ids[1:nd + 1])))
        b = int("".join(map(str, ids[nd + 2:-1])))
        return (a, b)

    def answer_tokens(self, problem: Problem) -> np.ndarray:
        """The canonical response: the sum without leading zeros, then EOS."""
        return np.array([*_digits(problem[0] + problem[1]), EOS], dtype=np.int64)

    def well_formed(self, body: Sequence[int]) -> bool:
        return 1 <= len(body) <= self.n_digits + 1 and all(0 <= t <= 9 for t in body)


@dataclass(frozen=True)
class SortTask:
    """Sort `length` digits ascending; multisets with digit sum % heldout_mod == 0 are held out."""
    length: int = 4
    heldout_mod: int = 5
    format_reward: float = 0.1
    name: str = "sort"

    def __post_init__(self):
        if not (isinstance(self.length, int) and 2 <= self.length <= 12):
            raise ValueError(f"length: {self.length!r} must be an int in [2, 12]")
        if not (isinstance(self.heldout_mod, int) and self.heldout_mod >= 2):
            raise ValueError(f"heldout_mod: {self.heldout_mod!r} must be an int >= 2")
        if not 0.0 <= self.format_reward < 1.0:
            raise ValueError(f"format_reward: {self.format_reward} must be in [0, 1)")

    @property
    def prompt_len(self) -> int:          # ^ d , d , ... , d >
        return 2 * self.length + 1

    @property
    def max_response_len(self) -> int:    # length digits, then EOS
        return self.length + 1

    def is_heldout(self, problem: Problem) -> bool:
        return sum(problem) % self.heldout_mod == 0

    def sample_problem(self, rng: np.random.Generator, split: str) -> Problem:
        want = split == "heldout"
        while True:                                   # rejection sampling on the digit sum
            p = tuple(int(d) for d in rng.integers(0, 10, size=self.length))
            if self.is_heldout(p) == want:
                return p

    def all_problems(self, split: str) -> List[Problem]:
        _check_split(split)
        if 10 ** self.length > 1_000_000:
            raise ValueError(f"all_problems: 10**{self.length} lists is too many to enumerate")
        out = []
        for k in range(10 ** self.length):
            p = tuple(_digits(k, self.length))
            if self.is_heldout(p) == (split == "heldout"):
                out.append(p)
        return out

    def prompt_tokens(self, problem: Problem) -> np.ndarray:
        ids = [BOS]
        for i, d in enumerate(problem):
            ids += ([COMMA] if i else []) + [int(d)]
        return np.array(ids + [ARROW], dtype=np.int64)

    def parse_prompt(self, tokens) -> Problem:
        ids = [int(t) for t in np.ravel(tokens) if int(t) != PAD]
        ok = (len(ids) == self.prompt_len and ids[0] == BOS and ids[-1] == ARROW
              and all(0 <= t <= 9 for t in ids[1:-1:2])
              and all(t == COMMA for t in ids[2:-1:2]))
        if not ok:
            raise ValueError(f"prompt_tokens: {decode(tokens)!r} is not a sort prompt of "
                             f"{self.length} digits like '^3,1,4,1>'")
        return tuple(ids[1:-1:2])

    def answer_tokens(self, problem: Problem) -> np.ndarray:
        return np.array([*sorted(problem), EOS], dtype=np.int64)

    def well_formed(self, body: Sequence[int]) -> bool:
        return len(body) == self.length and all(0 <= t <= 9 for t in body)


Task = Union[AdditionTask, SortTask]


# ------------------------------------------------------------------------------------------------
# prompts, rewards, SFT data
# ------------------------------------------------------------------------------------------------

def sample_problems(task: Task, n: int, split: str, rng: np.random.Generator,
                    subset: Optional[Callable[[Problem], bool]] = None) -> List[Problem]:
    """n problems of the split, drawn with replacement from rng (optionally only where subset(p))."""
    _check_split(split)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng: expected np.random.Generator, got {type(rng).__name__}")
    if not (isinstance(n, (int, np.integer)) and n >= 0):
        raise ValueError(f"n: {n!r} must be a non-negative int")
    out, tries = [], 0
    while len(out) < n:
        p = task.sample_problem(rng, split)
        tries += 1
        if subset is None or subset(p):
            out.append(p)
        elif tries > 1000 * (n + 1):
            raise ValueError(f"subset: accepted {len(out)} of {tries} {split} problems; "
                             f"the subset is (nearly) empty for this split")
    return out


def make_prompts(task: Task, n: int, split: str, rng: np.random.Generator,
                 subset: Optional[Callable[[Problem], bool]] = None) -> np.ndarray:
    """-> [n, task.prompt_len] int64 prompt tokens (all the same length, BOS first)."""
    probs = sample_problems(task, n, split, rng, subset)
    if not probs:
        return np.zeros((0, task.prompt_len), dtype=np.int64)
    return np.stack([task.prompt_tokens(p) for p in probs])


def reward(task: Task, prompt_tokens, response_tokens) -> float:
    """[Tp] prompt, [R] response -> 1.0 exact / task.format_reward well formed / 0.0 malformed.

    The response is what the model generated after the prompt; it is read up to its first EOS.
    Never raises for a bad response (no EOS, junk ids, wrong dtype: 0.0).
    """
    problem = task.parse_prompt(prompt_tokens)
    body = _body(response_tokens)
    if body is None or not task.well_formed(body):
        return 0.0
    if body == [int(t) for t in task.answer_tokens(problem)[:-1]]:
        return 1.0
    return float(task.format_reward)


def rewards(task: Task, prompts: np.ndarray, responses: np.ndarray) -> np.ndarray:
    """[M, Tp], [M, R] -> [M] float64 rewards (row m of responses answers row m of prompts)."""
    if len(prompts) != len(responses):
        raise ValueError(f"responses: {len(responses)} rows but prompts has {len(prompts)}")
    return np.array([reward(task, p, r) for p, r in zip(prompts, responses)], dtype=np.float64)


def response_mask(responses: np.ndarray, eos_id: int = EOS) -> np.ndarray:
    """[M, R] sampled tokens -> [M, R] bool: True up to and including the first EOS.

    Tokens after the EOS (padding, or whatever a sampler kept producing) are not part of the
    response o_i and get no gradient. A row without EOS (truncated) is all True (TRL's default).
    """
    responses = np.asarray(responses)
    if responses.ndim != 2:
        raise ValueError(f"responses: expected 2 dimensions [M, R], got shape {responses.shape}")
    is_eos = responses == eos_id
    # number of EOS strictly before position t; a token is kept while that count is 0
    before = np.cumsum(is_eos, axis=1) - is_eos
    return before == 0


def sft_examples(task: Task, n: int, split: str, rng: np.random.Generator,
                 subset: Optional[Callable[[Problem], bool]] = None):
    """-> tokens [n, T] int64, targets [n, T] int64 (-100 on prompt/pad), T = prompt_len + max_response_len.

    Row: prompt, answer digits, EOS, PAD...; targets[:, t] = tokens[:, t + 1] where that next token
    belongs to the answer (digits or EOS), else -100. `subset` makes the warm start partial.
    """
    probs = sample_problems(task, n, split, rng, subset)
    Tp, T = task.prompt_len, task.prompt_len + task.max_response_len
    tokens = np.full((n, T), PAD, dtype=np.int64)
    targets = np.full((n, T), IGNORE_INDEX, dtype=np.int64)
    for i, p in enumerate(probs):
        ans = task.answer_tokens(p)                           # [len(ans)] digits + EOS
        tokens[i, :Tp] = task.prompt_tokens(p)
        tokens[i, Tp:Tp + len(ans)] = ans
        # the logits at position Tp-1 (the '=' / '>') predict the first answer token, ...
        targets[i, Tp - 1:Tp - 1 + len(ans)] = ans
    return tokens, targets

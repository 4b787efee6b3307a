"""Argument checks shared by every public entry point.

Each check raises a TypeError or ValueError that names the argument, the value seen and the rule,
so a student never meets a silent broadcast or an IndexError from deep inside the math.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

FLOAT_DTYPES = (np.float32, np.float64)


def check_float(name: str, x, ndim: Optional[int] = None) -> np.ndarray:
    """x must be a float32/float64 ndarray (with `ndim` dimensions if given); returns it unchanged."""
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a numpy float32/float64 array, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: dtype {x.dtype} is not supported; use float32 or float64")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {x.shape}")
    return x


def check_shape(name: str, x: np.ndarray, shape: Sequence[Optional[int]]) -> np.ndarray:
    """x.shape must equal `shape`, where None matches any size."""
    shape = tuple(shape)
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{name}: expected shape {want}, got {list(x.shape)}")
    return x


def check_same_dtype(names: Sequence[str], *arrays: np.ndarray) -> None:
    """All arrays share one dtype (no silent float32/float64 mixing)."""
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) > 1:
        seen = ", ".join(f"{n}={a.dtype}" for n, a in zip(names, arrays))
        raise TypeError(f"dtype mismatch: {seen}; all must have the same float dtype")


def check_tokens(name: str, tokens, vocab_size: int, ndim: Optional[int] = None) -> np.ndarray:
    """tokens must be an integer ndarray with every id in [0, vocab_size)."""
    if not isinstance(tokens, np.ndarray):
        raise TypeError(f"{name}: expected an integer numpy array, got {type(tokens).__name__}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"{name}: dtype {tokens.dtype} is not an integer dtype")
    if ndim is not None and tokens.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tokens.shape}")
    if tokens.size:
        lo, hi = int(tokens.min()), int(tokens.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"{name}: token id {bad} is outside [0, vocab_size={vocab_size})")
    return tokens

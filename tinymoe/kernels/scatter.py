"""Scatter-adds: out[idx[n]] += src[n] (embedding backward, MoE combine backward, ...)."""
from __future__ import annotations

import numpy as np

from tinymoe.kernels import get, register


# ------------------------------------------------------------------------------------------------

def scatter_add_rows_numpy(idx: np.ndarray, src: np.ndarray, n_rows: int) -> np.ndarray:
    """[N] int, [N, D] -> [n_rows, D]: out[idx[n], :] += src[n, :], repeated indices accumulate."""
    out = np.zeros((n_rows, src.shape[1]), dtype=src.dtype)
    np.add.at(out, idx, src)
    return out


def _scatter_add_rows_loops(idx, src, n_rows):
    """The loop twin of scatter_add_rows_numpy (jitted by tinymoe.kernels.get)."""
    out = np.zeros((n_rows, src.shape[1]), dtype=src.dtype)
    for n in range(idx.shape[0]):          # tokens in order, same as np.add.at
        row = idx[n]
        for d in range(src.shape[1]):      # one row of D values
            out[row, d] += src[n, d]
    return out


register("scatter_add_rows", scatter_add_rows_numpy, _scatter_add_rows_loops)


def scatter_add_rows(idx: np.ndarray, src: np.ndarray, n_rows: int) -> np.ndarray:
    """[N] int, [N, D] -> [n_rows, D] with the active backend (see scatter_add_rows_numpy).

    Checks the arguments first: the numba loop does no bounds checking, so an index outside
    [0, n_rows) would otherwise write outside the output instead of raising.
    """
    idx, src = np.asarray(idx), np.asarray(src)
    if not np.issubdtype(idx.dtype, np.integer) or idx.ndim != 1:
        raise TypeError(f"idx: expected a 1-d integer array, got dtype {idx.dtype}, "
                        f"shape {list(idx.shape)}")
    if src.ndim != 2 or src.shape[0] != idx.shape[0]:
        raise ValueError(f"src: expected shape [N={idx.shape[0]}, D], got {list(src.shape)}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_rows):
        bad = idx.min() if idx.min() < 0 else idx.max()
        raise ValueError(f"idx: row {int(bad)} is outside [0, n_rows={n_rows})")
    return get("scatter_add_rows")(np.ascontiguousarray(idx, dtype=np.int64),
                                   np.ascontiguousarray(src), int(n_rows))

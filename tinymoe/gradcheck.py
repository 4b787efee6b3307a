"""Finite-difference gradient checks in float64, used by the tests and the lessons.

A hand-written backward is trusted only after it agrees with central finite differences

    dL/dx_i ~ (L(x + eps e_i) - L(x - eps e_i)) / (2 eps)

of the scalar L = sum(dout * forward(x)) for a random upstream gradient `dout` (a random dout
catches errors that an all-ones dout hides, e.g. a transposed gradient of a symmetric sum).

The relative error of entry i of an input is

    |a_i - n_i| / max(|a_i|, |n_i|, 1e-3 * max_j max(|a_j|, |n_j|), 1e-8)

(a = analytic, n = numeric): relative where the gradient is large, and measured against the
tensor's own scale where an entry is tiny, so finite-difference noise on an entry that is
~0 does not count as a failure. The scale max_j is taken over every analytic entry of the
tensor (and the checked numeric ones), also when only a sample is checked, so a sample that hits
only unused experts (exact zeros) is judged against the tensor's scale, not against 1e-8.
With eps = 1e-5 in float64 a correct layer backward gives ~1e-9.

Whole models: the 2-point difference has truncation error ~eps^2 |L^(3)| / 6 and rounding error
~(a few ulp of L) / eps; for a loss of ~3 and gradient entries of ~1e-5 (router, rarely used
experts) the rounding alone reaches ~1e-6 relative. `stencil=4` uses the 4th-order formula

    dL/dx_i ~ (-L(+2h) + 8 L(+h) - 8 L(-h) + L(-2h)) / (12 h)

whose truncation error ~h^4 allows h = eps = 3e-4, so rounding drops to ~3e-12.

    report = gradcheck(lambda x, w: rmsnorm_forward(x, w),
                       lambda dy, cache: dict(zip("xw", rmsnorm_backward(dy, cache))),
                       {"x": x, "w": w})
    report.assert_ok(1e-6)        # AssertionError naming tensor, index, expected, actual
    print(report)                 # one line per input with its max relative error
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional

import numpy as np


@dataclass
class TensorReport:
    name: str
    max_rel_error: float     # worst entry's relative error (definition in the module docstring)
    index: tuple             # where it happened
    analytic: float          # the backward's value there ("actual")
    numeric: float           # the finite-difference value there ("expected")
    n_checked: int           # entries checked (all, or a random sample)


@dataclass
class GradcheckReport:
    tensors: Dict[str, TensorReport] = field(default_factory=dict)

    @property
    def max_rel_error(self) -> float:
        return max((t.max_rel_error for t in self.tensors.values()), default=0.0)

    def worst(self) -> Optional[TensorReport]:
        return max(self.tensors.values(), key=lambda t: t.max_rel_error, default=None)

    def assert_ok(self, tol: float = 1e-6) -> "GradcheckReport":
        """Raise AssertionError naming the worst tensor, index, expected and actual if > tol."""
        w = self.worst()
        if w is not None and not w.max_rel_error < tol:
            raise AssertionError(
                f"gradient check failed for {w.name!r} at index {w.index}: expected "
                f"(finite differences) {w.numeric:.10g}, actual (backward) {w.analytic:.10g}, "
                f"relative error {w.max_rel_error:.3g} >= {tol:g}\n{self}")
        return self

    def __str__(self) -> str:
        lines = [f"{'tensor':<40s} {'checked':>8s} {'max rel err':>12s}"]
        for t in self.tensors.values():
            lines.append(f"{t.name:<40s} {t.n_checked:>8d} {t.max_rel_error:>12.3e}")
        return "\n".join(lines)


def _rel_errors(a: np.ndarray, n: np.ndarray, full: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-entry relative error (module docstring); inf where either value is NaN or inf.

    `full` is every analytic entry of the tensor (a may be a sample of it); it sets the scale.
    """
    finite = np.isfinite(a) & np.isfinite(n)
    full = a[finite] if full is None else full[np.isfinite(full)]
    scale = max(float(np.max(np.abs(full), initial=0.0)),
                float(np.max(np.abs(n[finite]), initial=0.0)))
    denom = np.maximum(np.maximum(np.abs(a), np.abs(n)), max(1e-3 * scale, 1e-8))
    with np.errstate(invalid="ignore"):
        rel = np.abs(a - n) / denom
    # a NaN/inf entry must fail at its own index (not poison the scale of every other entry)
    return np.where(finite, rel, np.inf)


def gradcheck_scalar(loss_fn: Callable[[], float], inputs: Dict[str, np.ndarray],
                     grads: Dict[str, np.ndarray], *, names: Optional[Iterable[str]] = None,
                     eps: float = 1e-5, max_entries: Optional[int] = None,
                     seed: int = 0, stencil: int = 2) -> GradcheckReport:
    """Compare `grads[name]` with finite differences of `loss_fn()` w.r.t. `inputs[name]`.

    `loss_fn` takes no arguments and reads the arrays in `inputs`, which are perturbed in place
    one entry at a time and restored bitwise afterwards. Every checked array must be float64.
    `max_entries` checks a random sample of that many entries per tensor (seeded), for models.
    `stencil` is 2 (central difference, step eps) or 4 (4th order, steps +-eps, +-2 eps).
    """
    if stencil not in (2, 4):
        raise ValueError(f"stencil = {stencil!r}: must be 2 or 4")
    rng = np.random.default_rng(seed)
    report = GradcheckReport()
    for name in (list(names) if names is not None else list(grads)):
        x, g = inputs[name], grads[name]
        if not isinstance(x, np.ndarray) or x.dtype != np.float64:
            raise TypeError(f"inputs[{name!r}]: gradient checks need float64 arrays, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if g is None or g.shape != x.shape:
            raise ValueError(f"grads[{name!r}]: shape {None if g is None else g.shape} "
                             f"does not match input shape {x.shape}")
        flat = x.reshape(-1)          # a view: perturbing it perturbs x
        if not np.shares_memory(flat, x):
            raise ValueError(f"inputs[{name!r}]: must be contiguous so it can be perturbed in place")
        idx = np.arange(flat.size)
        if max_entries is not None and flat.size > max_entries:
            idx = np.sort(rng.choice(flat.size, size=max_entries, replace=False))
        numeric = np.empty(idx.size)
        for j, i in enumerate(idx):
            old = flat[i]

            def at(step: float) -> float:
                flat[i] = old + step
                return float(loss_fn())

            if stencil == 2:
                numeric[j] = (at(eps) - at(-eps)) / (2 * eps)
            else:
                numeric[j] = (-at(2 * eps) + 8 * at(eps) - 8 * at(-eps) + at(-2 * eps)) / (12 * eps)
            flat[i] = old                                    # restored bitwise
        full = np.asarray(g, dtype=np.float64).reshape(-1)
        analytic = full[idx]
        rel = _rel_errors(analytic, numeric, full)
        k = int(np.argmax(rel)) if rel.size else 0
        report.tensors[name] = TensorReport(
            name=name,
            max_rel_error=float(rel[k]) if rel.size else 0.0,
            index=tuple(int(v) for v in np.unravel_index(idx[k], x.shape)) if rel.size else (),
            analytic=float(analytic[k]) if rel.size else 0.0,
            numeric=float(numeric[k]) if rel.size else 0.0,
            n_checked=int(idx.size))
    return report


def gradcheck(forward: Callable, backward: Callable, inputs: Dict[str, np.ndarray], *,
              names: Optional[Iterable[str]] = None, eps: float = 1e-5,
              max_entries: Optional[int] = None, seed: int = 0,
              stencil: int = 2) -> GradcheckReport:
    """Check a forward/backward pair.

    forward(**inputs) -> (out, cache), out an array or a scalar;
    backward(dout, cache) -> {name: gradient} for (at least) the checked inputs.
    A random upstream gradient dout ~ N(0, 1) of out's shape (seeded) defines L = sum(dout * out).
    """
    rng = np.random.default_rng(seed)
    out, cache = forward(**inputs)
    out = np.asarray(out, dtype=np.float64)
    dout = rng.standard_normal(out.shape)
    grads = backward(dout if out.ndim else float(dout), cache)

    def loss() -> float:
        o, _ = forward(**inputs)
        return float(np.sum(dout * np.asarray(o, dtype=np.float64)))

    return gradcheck_scalar(loss, inputs, grads, names=names if names is not None else list(grads),
                            eps=eps, max_entries=max_entries, seed=seed, stencil=stencil)

"""AdamW with decoupled weight decay, global-norm clipping, and a warmup + cosine schedule.

AdamW (Loshchilov & Hutter 2019), for each parameter p with gradient g at step t = 1, 2, ...:

    m = b1 m + (1 - b1) g                    v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)                   v_hat = v / (1 - b2^t)
    p = p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)      (wd = 0 for norms)

Weight decay is decoupled (applied to p, not added to g) and skipped for RMSNorm scales. The
router's selection bias is not a parameter at all (it lives in `model.buffers`), so the optimizer
never sees it; the training loop (`tinymoe.train.train`) applies the auxiliary-loss-free bias
update after each step. DeepSeek-V3 trains with AdamW b1 = 0.9, b2 = 0.95, wd = 0.1 (V3 section 4.2).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np

from tinymoe.model import is_norm


def global_norm(grads: Dict[str, np.ndarray]) -> float:
    """sqrt(sum over tensors of sum g^2), accumulated in float64 in sorted key order."""
    return math.sqrt(sum(float(np.sum(np.square(grads[k], dtype=np.float64))) for k in sorted(grads)))


def clip_grad_norm(grads: Dict[str, np.ndarray], max_norm: Optional[float]):
    """Scale every gradient by min(1, max_norm / global_norm); returns (new grads, norm before)."""
    norm = global_norm(grads)
    if max_norm is None or not math.isfinite(norm) or norm <= max_norm:
        return dict(grads), norm
    scale = max_norm / (norm + 1e-12)
    return {k: (g * scale).astype(g.dtype, copy=False) for k, g in grads.items()}, norm


def lr_schedule(step: int, max_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warmup to max_lr over `warmup` steps, then cosine decay to min_ratio * max_lr at `total`.

    `step` counts from 1 (the first update uses lr_schedule(1, ...)).
    """
    if warmup > 0 and step <= warmup:
        return max_lr * step / warmup
    if total <= warmup:
        return max_lr
    frac = min(1.0, (step - warmup) / (total - warmup))
    return max_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


class AdamW:
    """AdamW over a flat parameter dict, updated in place by `step(grads)`.

        opt = AdamW(model.params, lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
        opt.step(grads)            # or opt.step(grads, lr=schedule value)
    """

    def __init__(self, params: Dict[str, np.ndarray], lr: float = 1e-3, betas=(0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0,
                 no_decay: Callable[[str], bool] = is_norm):
        if not lr > 0:
            raise ValueError(f"lr = {lr}: must be > 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"betas = {betas}: both must be in [0, 1)")
        if weight_decay < 0:
            raise ValueError(f"weight_decay = {weight_decay}: must be >= 0")
        self.params = params
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.no_decay = no_decay
        self.t = 0
        self.m = {k: np.zeros_like(p) for k, p in params.items()}
        self.v = {k: np.zeros_like(p) for k, p in params.items()}

    def step(self, grads: Dict[str, np.ndarray], lr: Optional[float] = None) -> None:
        """One update of every parameter (in place). grads must have exactly the params' keys."""
        if set(grads) != set(self.params):
            missing = sorted(set(self.params) - set(grads))
            extra = sorted(set(grads) - set(self.params))
            raise ValueError(f"grads: keys differ from the parameters (missing {missing[:3]}, "
                             f"unexpected {extra[:3]})")
        lr = self.lr if lr is None else lr
        if self._step_fused(grads, lr):      # the numba twin below, when every array is float32
            return
        # BEGIN EXERCISE adamw
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for k in sorted(self.params):
            p, g, m, v = self.params[k], grads[k], self.m[k], self.v[k]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            update = (m / c1) / (np.sqrt(v / c2) + self.eps)
            if self.weight_decay and not self.no_decay(k):
                update = update + self.weight_decay * p
            p -= (lr * update).astype(p.dtype, copy=False)
        # END EXERCISE

    def _step_fused(self, grads: Dict[str, np.ndarray], lr: float) -> bool:
        """step's update through the fused kernel (tinymoe/kernels/optim.py, bitwise the same
        result); False, with nothing changed, unless the backend is numba and every parameter,
        gradient and moment is float32."""
        from tinymoe.kernels.optim import adamw_fusable, adamw_update
        if not adamw_fusable(self.params, grads, self.m, self.v):
            return False
        # BEGIN EXERCISE adamw
        b1, b2 = self.betas
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for k in sorted(self.params):
            wd = self.weight_decay if self.weight_decay and not self.no_decay(k) else 0.0
            adamw_update(self.params[k], grads[k], self.m[k], self.v[k],
                         lr, b1, b2, c1, c2, self.eps, wd)
        return True
        # END EXERCISE

    def state_dict(self) -> Dict[str, np.ndarray]:
        """Everything needed to resume bitwise: moments and the step count."""
        out = {f"m/{k}": v for k, v in self.m.items()}
        out.update({f"v/{k}": v for k, v in self.v.items()})
        out["t"] = np.array(self.t, dtype=np.int64)
        return out

    def load_state_dict(self, state: Dict[str, np.ndarray], source: str = "state") -> None:
        for k in self.params:
            for which, store in (("m", self.m), ("v", self.v)):
                key = f"{which}/{k}"
                if key not in state:
                    raise ValueError(f"{source}: missing optimizer key {key!r}")
                if state[key].shape != self.params[k].shape:
                    raise ValueError(f"{source}: optimizer key {key!r} has shape "
                                     f"{list(state[key].shape)}, expected {list(self.params[k].shape)}")
                store[k] = np.array(state[key], dtype=self.params[k].dtype)
        if "t" not in state:
            raise ValueError(f"{source}: missing optimizer key 't'")
        self.t = int(state["t"])

"""tinymoe itself as a port: one function per golden case, in the manifest's argument order.

    python -m tinymoe.golden verify DIR --impl tinymoe.golden.reference      # must pass

This is the calling convention every port follows (examples/torch_port/ is a second one):

* Arguments arrive positionally in the order of the case's "args" in manifest.json: a tensor is a
  NumPy array in the file's dtype (int64 for ids, bool for masks); a "tensors" argument is a dict
  {name: array} in the manifest's key order (parameter names of DeepSeek's official code); an
  "attr" is a Python number, bool, string, list or, for `cfg`, a dict of ModelConfig fields.
* Each function returns a dict {output name: array}, where a "tensors" output is itself a dict
  (for example "dparams": {"wq_a": ...}); a tuple in the manifest's output order works too.
  Anything np.asarray converts is accepted (a torch CPU tensor as is).
* Upstream gradients (dy, dloss, ...) are inputs, so every backward is checked as the vector-
  Jacobian product dy^T dF/dinput of the forward, with a random dy.

A port can start from this module and replace one function at a time:

    from tinymoe.golden.reference import *          # everything from tinymoe ...
    def rmsnorm(x, w, dy, eps): ...                  # ... except the piece being ported

Every function is a thin adapter over tinymoe's public forward/backward pairs; none holds math
of its own.
"""
from __future__ import annotations

import numpy as np

from tinymoe.config import ModelConfig
from tinymoe.grpo.objective import grpo_loss as _grpo_loss
from tinymoe.grpo.objective import grpo_loss_backward, group_advantages
from tinymoe.kernels.moe import moe_combine as _combine
from tinymoe.kernels.moe import moe_combine_backward, moe_gather, moe_sort
from tinymoe.layers import basic, norm, rope as _rope
from tinymoe.layers.attention import sdpa_backward, sdpa_forward
from tinymoe.layers.mla import LatentKVCache, mla_backward, mla_forward
from tinymoe.layers.mla import mla_decode as _mla_decode
from tinymoe.layers.moe import moe_backward, moe_forward
from tinymoe.layers.router import (expert_balance_backward, expert_balance_forward,
                                   router_backward, router_forward, seq_balance_backward,
                                   seq_balance_forward, update_bias, z_loss_backward,
                                   z_loss_forward)
from tinymoe.model import Model, init_params
from tinymoe.optim import AdamW

__all__ = ["linear", "embedding", "rmsnorm", "swiglu", "softmax", "cross_entropy", "rope",
           "yarn_tables", "sdpa", "mla", "mla_decode", "router", "moe_dispatch", "moe_combine",
           "moe", "seq_balance", "expert_balance", "z_loss", "mtp", "model_loss", "adamw",
           "bias_update", "grpo_loss", "grpo_advantages"]


def _cfg(cfg: dict) -> ModelConfig:
    return ModelConfig.from_dict(dict(cfg))


def _scalar(a) -> float:
    return float(np.asarray(a))


# ---- basic layers -------------------------------------------------------------------------------

def linear(x, w, dy):
    """x [..., In], w [Out, In], dy [..., Out] -> y, dx, dw."""
    y, c = basic.linear_forward(x, w)
    dx, dw = basic.linear_backward(dy, c)
    return {"y": y, "dx": dx, "dw": dw}


def embedding(tokens, w, dy):
    """tokens [B, T] int, w [V, D], dy [B, T, D] -> y, dw (repeated tokens accumulate)."""
    y, c = basic.embedding_forward(tokens, w)
    return {"y": y, "dw": basic.embedding_backward(dy, c)}


def rmsnorm(x, w, dy, eps):
    """x [N, D], w [D], dy [N, D], eps -> y, dx, dw."""
    y, c = norm.rmsnorm_forward(x, w, eps)
    dx, dw = norm.rmsnorm_backward(dy, c)
    return {"y": y, "dx": dx, "dw": dw}


def swiglu(x, w1, w2, w3, dy):
    """x [N, D], w1 [F, D], w2 [D, F], w3 [F, D], dy [N, D] -> y, dx, dw1, dw2, dw3."""
    y, c = basic.swiglu_forward(x, w1, w2, w3)
    dx, dw1, dw2, dw3 = basic.swiglu_backward(dy, c)
    return {"y": y, "dx": dx, "dw1": dw1, "dw2": dw2, "dw3": dw3}


def softmax(x, dy):
    """x [N, C] (some entries -inf), dy [N, C] -> y, dx over the last axis."""
    p, c = basic.softmax_forward(x)
    return {"y": p.copy(), "dx": basic.softmax_backward(dy, c)}


def cross_entropy(logits, targets, dloss, ignore_index):
    """logits [N, V], targets [N] int (ignore_index rows skipped), dloss [] -> loss [], dlogits."""
    loss, c = basic.cross_entropy_forward(logits, targets, int(ignore_index))
    return {"loss": np.asarray(loss), "dlogits": basic.cross_entropy_backward(_scalar(dloss), c)}


# ---- positions and attention ----------------------------------------------------------------------

def rope(x, cos, sin, dy):
    """x [B, T, H, Dr], cos/sin [T, Dr/2], dy -> y, dx (interleaved pairs (2j, 2j+1))."""
    return {"y": _rope.rope_forward(x, cos, sin), "dx": _rope.rope_backward(dy, cos, sin)}


def yarn_tables(positions, cfg):
    """positions [T] int, cfg (YaRN on) -> inv_freq [Dr/2], cos, sin [T, Dr/2], softmax_scale [],
    mscale [] (the YaRN magnitude m; the scale is (Dn + Dr)^-1/2 m^2)."""
    c = _cfg(cfg)
    cos, sin = _rope.rope_angles(c, positions, np.float64)
    return {"inv_freq": _rope.rope_inv_freq(c), "cos": cos, "sin": sin,
            "softmax_scale": np.asarray(_rope.softmax_scale(c)),
            "mscale": np.asarray(_rope.yarn_mscale(c.rope_factor, c.mscale))}


def sdpa(q, k, v, do, scale):
    """q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv], do [B, T, H, Dv] -> o, dq, dk, dv."""
    o, c = sdpa_forward(q, k, v, float(scale), causal=True)
    dq, dk, dv = sdpa_backward(do, c)
    return {"o": o, "dq": dq, "dk": dk, "dv": dv}


def mla(x, params, dy, cfg):
    """x [B, T, D], params {wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo}, dy -> y, dx, dparams."""
    y, c = mla_forward(x, dict(params), _cfg(cfg))
    dx, grads = mla_backward(dy, c)
    return {"y": y, "dx": dx, "dparams": grads}


def mla_decode(x, params, kv, pe, cfg):
    """x [B, 1, D], MLA params, latent cache kv [B, S, Dc], pe [B, S, Dr] -> y, kv_after, pe_after.

    The new token sits at position S = kv.shape[1]; the caches after hold S + 1 rows.
    """
    c = _cfg(cfg)
    B, S = kv.shape[0], kv.shape[1]
    cache = LatentKVCache(c, B, x.dtype)
    cache.kv[:, :S], cache.pe[:, :S], cache.length = kv, pe, S
    y = _mla_decode(x, dict(params), c, cache)
    end = cache.length
    return {"y": y, "kv_after": cache.kv[:, :end].copy(), "pe_after": cache.pe[:, :end].copy()}


# ---- routing and experts ------------------------------------------------------------------------

def router(x, gate_w, bias, dweights, cfg):
    """x [N, D], gate_w [E, D], bias [E], dweights [N, K] -> weights, indices, scores, dx, dgate_w."""
    weights, indices, c = router_forward(x, gate_w, bias, _cfg(cfg))
    dx, dgate_w = router_backward(dweights, c)
    return {"weights": weights, "indices": indices, "scores": c.scores, "dx": dx,
            "dgate_w": dgate_w}


def _sorted_assignments(indices, n_experts):
    N, K = indices.shape
    order, pos, offsets = moe_sort(indices.reshape(-1), np.ones(N * K, dtype=bool), int(n_experts))
    return order, pos, offsets


def moe_dispatch(x, indices, dxs, n_experts):
    """x [N, D], indices [N, K], dxs [N*K, D] -> xs [N*K, D] (grouped by expert), order, offsets, dx."""
    N, K = indices.shape
    order, pos, offsets = _sorted_assignments(indices, n_experts)
    xs = moe_gather(x, order // K)
    dx = _combine(dxs, np.ones(dxs.shape[0], dtype=dxs.dtype), pos, N, K)
    return {"xs": xs, "order": order, "offsets": offsets, "dx": dx}


def moe_combine(ys, weights, indices, dy, n_experts):
    """ys [N*K, D] (expert order), weights [N, K], indices [N, K], dy [N, D] -> y, dys, dweights."""
    N, K = indices.shape
    order, pos, _ = _sorted_assignments(indices, n_experts)
    w_s = weights.reshape(-1)[order]
    y = _combine(ys, w_s, pos, N, K)
    dys, dw_s = moe_combine_backward(dy, ys, w_s, order // K)
    dweights = np.zeros(N * K, dtype=weights.dtype)
    dweights[order] = dw_s
    return {"y": y, "dys": dys, "dweights": dweights.reshape(N, K)}


def moe(x, params, bias, dy, cfg, seq_len):
    """x [N, D], MoE params, bias [E], dy [N, D] -> y, aux_loss [], indices, dx, dparams (daux = 1)."""
    y, aux, c = moe_forward(x, dict(params), bias, _cfg(cfg), int(seq_len))
    dx, grads = moe_backward(dy, c, 1.0)
    return {"y": y, "aux_loss": np.asarray(aux), "indices": c.indices, "dx": dx, "dparams": grads}


def seq_balance(scores, indices, dloss, seq_len):
    """scores [N, E], indices [N, K], dloss [] -> loss [], dscores (V3 sequence-wise loss)."""
    loss, c = seq_balance_forward(scores, indices, int(seq_len))
    return {"loss": np.asarray(loss), "dscores": seq_balance_backward(_scalar(dloss), c)}


def expert_balance(scores, indices, dloss):
    """scores [N, E], indices [N, K], dloss [] -> loss [], dscores (expert-level loss)."""
    loss, c = expert_balance_forward(scores, indices)
    return {"loss": np.asarray(loss), "dscores": expert_balance_backward(_scalar(dloss), c)}


def z_loss(logits, dloss):
    """logits [N, E], dloss [] -> loss [], dlogits (router z-loss)."""
    loss, c = z_loss_forward(logits)
    return {"loss": np.asarray(loss), "dlogits": z_loss_backward(_scalar(dloss), c)}


# ---- the model ----------------------------------------------------------------------------------

def _model(cfg: ModelConfig, params: dict, buffers: dict, dtype) -> Model:
    """A Model holding `params` (other parameters: fresh values, unused by the caller)."""
    full = init_params(cfg, np.random.default_rng(0), dtype)
    full.update(params)
    return Model.from_params(cfg, full, dict(buffers), source="golden case")


def mtp(tokens, h_prev, params, bias, dlogits, dh, cfg):
    """One MTP module (depth 1). tokens [B, T], h_prev [B, T, D], params {embed, head, mtp.0.*},
    bias [E], upstream dlogits [B, T-1, V] and dh [B, T-1, D] -> logits, h, aux_loss,
    dh_prev [B, T, D], dparams (daux = 1)."""
    c = _cfg(cfg)
    model = _model(c, params, {"mtp.0.ffn.gate.bias": bias}, h_prev.dtype)
    logits, h, cache, aux = model._mtp_forward(1, tokens, h_prev)
    grads = {"head": np.zeros_like(params["head"]), "embed": np.zeros_like(params["embed"])}
    dh_prev = model._mtp_backward(1, dlogits, dh, cache, grads, 1.0)
    return {"logits": logits, "h": h, "aux_loss": np.asarray(aux), "dh_prev": dh_prev,
            "dparams": {k: grads[k] for k in params}}


def model_loss(tokens, targets, params, buffers, cfg):
    """tokens, targets [B, T] (-100 ignored), every parameter, the router biases ->
    loss [] (CE + MTP + balance), logits [B, T, V], mtp_logits [B, T-1, V], dparams."""
    model = _model(_cfg(cfg), params, buffers, params["embed"].dtype)
    logits, mtp_logits, _ = model.forward_train(tokens)
    loss, grads = model.loss_and_grads(tokens, targets)
    return {"loss": np.asarray(loss), "logits": logits, "mtp_logits": mtp_logits[0],
            "dparams": {k: grads[k] for k in params}}


# ---- optimisation and RL --------------------------------------------------------------------------

def adamw(params, grads, m, v, t, lr, betas, eps, weight_decay):
    """One AdamW step at step count t + 1 (no decay on names ending in "norm") -> params, m, v."""
    opt = AdamW({k: a.copy() for k, a in params.items()}, lr=lr, betas=tuple(betas), eps=eps,
                weight_decay=weight_decay)
    opt.m = {k: a.copy() for k, a in m.items()}
    opt.v = {k: a.copy() for k, a in v.items()}
    opt.t = int(t)
    opt.step(dict(grads))
    return {"params": opt.params, "m": opt.m, "v": opt.v}


def bias_update(bias, load, gamma):
    """bias [E], load [E] int, gamma -> bias_after = bias + gamma * sign(mean(load) - load)."""
    return {"bias": update_bias(bias, load, gamma)}


def grpo_loss(logits, tokens, mask, old_logprobs, ref_logprobs, advantages, dloss, clip_eps,
              clip_eps_high, beta, temperature):
    """[M, L, V], [M, L] int, [M, L] bool, [M, L], [M, L], [M], [] -> loss [], dlogits [M, L, V]."""
    loss, _, c = _grpo_loss(logits, tokens, mask, old_logprobs, ref_logprobs, advantages,
                            clip_eps=clip_eps, beta=beta, length_norm=True,
                            clip_eps_high=clip_eps_high, temperature=temperature)
    return {"loss": np.asarray(loss), "dlogits": grpo_loss_backward(c, _scalar(dloss))}


def grpo_advantages(rewards, eps):
    """rewards [P, G] -> advantages [P, G] = (r - mean) / (sample std + eps), 0 for constant groups."""
    return {"advantages": group_advantages(rewards, eps=eps, std="sample")}

"""A PyTorch port of every tinymoe golden case: forwards in torch, every gradient by autograd.

    python -m tinymoe.golden write /tmp/golden
    python -m tinymoe.golden verify /tmp/golden --impl examples/torch_port/tinymoe_torch.py

Environment:
    TINYMOE_TORCH_DEVICE   torch device to compute on (default "cpu"; "cuda" runs the same file)
    TINYMOE_TORCH_DTYPE    "float32" / "float64" to compute in; default: the golden files' dtype

Calling convention (manifest.json "calling_convention"): each function gets the case's arguments
in manifest order as NumPy arrays, dicts of arrays, and plain values (`cfg` is a dict of
ModelConfig fields) and returns a dict of outputs. This adapter moves arrays to the device and
back; the math in between is ordinary torch, written from the papers and the manifest's notes,
not from tinymoe's NumPy. Gradients are d(sum_i out_i * upstream_i)/d(input) by autograd.

Where ports usually go wrong, and where that shows up in this file:
  * RoPE layout: DeepSeek's official weights rotate interleaved pairs (2j, 2j+1) (`rope`), not
    the half-split (j, j + Dr/2) of Llama/HF's rotate_half.
  * Angles in float64: position * inv_freq in float32 loses ~1e-4 at position 4096 (`_angles`).
  * YaRN: the softmax scale is (Dn + Dr)^-1/2 * mscale^2 with m = 0.1 * mscale * ln(s) + 1
    (`_softmax_scale`); forgetting m^2 fails `yarn_tables`, `mla`, `mla_decode`.
  * Router: the bias only selects (`_route`): weights come from the unbiased scores; V3
    renormalises over the K chosen and THEN multiplies by route_scale.
  * Absorbed decoding: the new token sits at position S = cache length, and the cache holds the
    normalised latent and the rotated k_pe (`mla_decode`).
  * MTP: eh_proj's input is [enorm(embedding) ; hnorm(hidden)], embedding first (`_mtp_depth`).
"""
from __future__ import annotations

import math
import os
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

DEVICE = torch.device(os.environ.get("TINYMOE_TORCH_DEVICE", "cpu"))
_DTYPE = os.environ.get("TINYMOE_TORCH_DTYPE")


# ================================================================================================
# adapter: NumPy <-> torch, autograd
# ================================================================================================

def _t(a, grad=False):
    """NumPy array (or dict of them) -> torch tensor on DEVICE; floats optionally recast."""
    if isinstance(a, dict):
        return {k: _t(v, grad) for k, v in a.items()}
    t = torch.from_numpy(np.array(a, copy=True))
    if t.is_floating_point():
        if _DTYPE:
            t = t.to(getattr(torch, _DTYPE))
        t = t.to(DEVICE).requires_grad_(grad)
    else:
        t = t.to(DEVICE).long() if t.dtype != torch.bool else t.to(DEVICE)
    return t


def _n(t):
    """torch tensor (or dict of them) -> NumPy array on the host."""
    if isinstance(t, dict):
        return {k: _n(v) for k, v in t.items()}
    return t.detach().cpu().numpy()


def _vjp(pairs, inputs):
    """sum over (out, upstream) of <out, upstream>, differentiated w.r.t. each input (0 if unused)."""
    total = sum((o * g).sum() for o, g in pairs)
    grads = torch.autograd.grad(total, inputs, allow_unused=True)
    return [torch.zeros_like(i) if g is None else g for i, g in zip(inputs, grads)]


def _cfg(cfg: dict):
    """The ModelConfig dict plus the derived quantities the model needs."""
    c = SimpleNamespace(**cfg)
    c.qk_head_dim = c.qk_nope_head_dim + c.qk_rope_head_dim
    c.yarn = c.max_seq_len > c.original_seq_len          # official rule: YaRN iff longer context
    c.renormalize = (c.score_func == "sigmoid") if c.norm_topk_prob is None else c.norm_topk_prob
    return c


# ================================================================================================
# basic layers
# ================================================================================================

def _rmsnorm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))    # normalise, then scale


def _swiglu(x, w1, w2, w3):
    return (F.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def linear(x, w, dy):
    x, w, dy = _t(x, True), _t(w, True), _t(dy)
    y = x @ w.T                                   # w is stored [out, in]
    dx, dw = _vjp([(y, dy)], [x, w])
    return _n({"y": y, "dx": dx, "dw": dw})


def embedding(tokens, w, dy):
    tokens, w, dy = _t(tokens), _t(w, True), _t(dy)
    y = F.embedding(tokens, w)
    (dw,) = _vjp([(y, dy)], [w])
    return _n({"y": y, "dw": dw})


def rmsnorm(x, w, dy, eps):
    x, w, dy = _t(x, True), _t(w, True), _t(dy)
    y = _rmsnorm(x, w, eps)
    dx, dw = _vjp([(y, dy)], [x, w])
    return _n({"y": y, "dx": dx, "dw": dw})


def swiglu(x, w1, w2, w3, dy):
    x, w1, w2, w3, dy = _t(x, True), _t(w1, True), _t(w2, True), _t(w3, True), _t(dy)
    y = _swiglu(x, w1, w2, w3)
    dx, dw1, dw2, dw3 = _vjp([(y, dy)], [x, w1, w2, w3])
    return _n({"y": y, "dx": dx, "dw1": dw1, "dw2": dw2, "dw3": dw3})


def softmax(x, dy):
    x, dy = _t(x, True), _t(dy)
    y = torch.softmax(x, dim=-1)
    (dx,) = _vjp([(y, dy)], [x])
    return _n({"y": y, "dx": dx})


def cross_entropy(logits, targets, dloss, ignore_index):
    logits, targets, dloss = _t(logits, True), _t(targets), _t(dloss)
    loss = F.cross_entropy(logits, targets, ignore_index=ignore_index)   # mean over counted rows
    (dlogits,) = _vjp([(loss, dloss)], [logits])
    return _n({"loss": loss, "dlogits": dlogits})


# ================================================================================================
# RoPE, YaRN, attention
# ================================================================================================

def _rope(x, cos, sin):
    """x [B, T, ..., Dr]; rotate interleaved pairs (x[2j], x[2j+1]) by the angle of (t, j)."""
    shape = (1, cos.shape[0]) + (1,) * (x.dim() - 3) + (cos.shape[1],)
    c, s = cos.reshape(shape), sin.reshape(shape)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def _inv_freq(c):
    """[Dr/2] float64: theta^(-2j/Dr), with the YaRN ramp between the correction dims when on."""
    dim = c.qk_rope_head_dim
    inv = 1.0 / c.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    if c.yarn:
        def corr(n_rot):
            turns = c.original_seq_len / (n_rot * 2 * math.pi)
            return dim * math.log(turns) / (2 * math.log(c.rope_theta))
        low = max(math.floor(corr(c.beta_fast)), 0)
        high = min(math.ceil(corr(c.beta_slow)), dim - 1)
        high = high + 0.001 if low == high else high
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        inv = inv / c.rope_factor * ramp + inv * (1 - ramp)
    return inv


def _angles(c, positions, dtype):
    """cos, sin [T, Dr/2]: angles in float64 (float32 drifts at long positions), then cast."""
    phi = torch.outer(positions.to(torch.float64).cpu(), _inv_freq(c))
    return phi.cos().to(DEVICE, dtype), phi.sin().to(DEVICE, dtype)


def _mscale(c):
    return 0.1 * c.mscale * math.log(c.rope_factor) + 1.0 if c.rope_factor > 1 else 1.0


def _softmax_scale(c):
    scale = c.qk_head_dim ** -0.5
    return scale * _mscale(c) ** 2 if c.yarn else scale


def _future(T, S, q_offset, device):
    """[T, S] bool: key s is in the future of query t (at absolute position q_offset + t)."""
    return torch.arange(S, device=device)[None, :] > (q_offset + torch.arange(T, device=device))[:, None]


def _attention(q, k, v, scale, q_offset=0):
    """q [B, T, H, Dk], k [B, S, Hkv, Dk], v [B, S, Hkv, Dv] -> [B, T, H, Dv], causal."""
    rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)   # head h reads h // rep
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    p = torch.softmax(s.masked_fill(_future(q.shape[1], k.shape[1], q_offset, q.device),
                                    float("-inf")), dim=-1)
    return torch.einsum("bhts,bshd->bthd", p, v)


def rope(x, cos, sin, dy):
    x, cos, sin, dy = _t(x, True), _t(cos), _t(sin), _t(dy)
    y = _rope(x, cos, sin)
    (dx,) = _vjp([(y, dy)], [x])
    return _n({"y": y, "dx": dx})


def yarn_tables(positions, cfg):
    c = _cfg(cfg)
    cos, sin = _angles(c, _t(positions), torch.float64)
    return {"inv_freq": _inv_freq(c).numpy(), "cos": _n(cos), "sin": _n(sin),
            "softmax_scale": np.asarray(_softmax_scale(c)), "mscale": np.asarray(_mscale(c))}


def sdpa(q, k, v, do, scale):
    q, k, v, do = _t(q, True), _t(k, True), _t(v, True), _t(do)
    o = _attention(q, k, v, scale)
    dq, dk, dv = _vjp([(o, do)], [q, k, v])
    return _n({"o": o, "dq": dq, "dk": dk, "dv": dv})


# ================================================================================================
# MLA
# ================================================================================================

def _mla_qkv(x, P, c, cos, sin):
    """x [B, T, D] -> q_nope [B,T,H,Dn], rotated q_pe [B,T,H,Dr], latent [B,T,Dc], k_pe [B,T,Dr]."""
    B, T, _ = x.shape
    H, Dn, Dc = c.n_heads, c.qk_nope_head_dim, c.kv_lora_rank
    if c.q_lora_rank > 0:
        q = _rmsnorm(x @ P["wq_a"].T, P["q_norm"], c.latent_norm_eps) @ P["wq_b"].T
    else:
        q = x @ P["wq"].T
    q = q.view(B, T, H, c.qk_head_dim)
    q_nope, q_pe = q[..., :Dn], _rope(q[..., Dn:], cos, sin)          # per head: [nope | rope]
    kv_a = x @ P["wkv_a"].T                                          # [latent | k_pe]
    latent = _rmsnorm(kv_a[..., :Dc], P["kv_norm"], c.latent_norm_eps)   # k_pe is not normalised
    k_pe = _rope(kv_a[..., Dc:], cos, sin)
    return q_nope, q_pe, latent, k_pe


def _mla(x, P, c):
    B, T, _ = x.shape
    H, Dn, Dr, Dv = c.n_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    cos, sin = _angles(c, torch.arange(T), x.dtype)
    q_nope, q_pe, latent, k_pe = _mla_qkv(x, P, c, cos, sin)
    kv = (latent @ P["wkv_b"].T).view(B, T, H, Dn + Dv)              # per head: [k_nope | v]
    k = torch.cat([kv[..., :Dn], k_pe[:, :, None, :].expand(B, T, H, Dr)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    o = _attention(q, k, kv[..., Dn:], _softmax_scale(c))
    return o.reshape(B, T, H * Dv) @ P["wo"].T


def mla(x, params, dy, cfg):
    c = _cfg(cfg)
    x, P, dy = _t(x, True), _t(params, True), _t(dy)
    y = _mla(x, P, c)
    grads = _vjp([(y, dy)], [x] + list(P.values()))
    return _n({"y": y, "dx": grads[0], "dparams": dict(zip(P, grads[1:]))})


def mla_decode(x, params, kv, pe, cfg):
    """Absorbed decoding over the latent cache: the new token(s) sit at positions S, S+1, ..."""
    c = _cfg(cfg)
    x, P, kv, pe = _t(x), _t(params), _t(kv), _t(pe)
    B, T, _ = x.shape
    S = kv.shape[1]
    H, Dn, Dv, Dc = c.n_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    with torch.no_grad():
        cos, sin = _angles(c, torch.arange(S, S + T), x.dtype)
        q_nope, q_pe, latent, k_pe = _mla_qkv(x, P, c, cos, sin)
        kv_all = torch.cat([kv, latent], dim=1)                      # [B, S+T, Dc] normalised latent
        pe_all = torch.cat([pe, k_pe], dim=1)                        # [B, S+T, Dr] rotated k_pe
        W = P["wkv_b"].view(H, Dn + Dv, Dc)
        q_lat = torch.einsum("bthn,hnc->bthc", q_nope, W[:, :Dn])    # W_UK folded into the query
        s = (torch.einsum("bthc,bsc->bhts", q_lat, kv_all)
             + torch.einsum("bthr,bsr->bhts", q_pe, pe_all)) * _softmax_scale(c)
        p = torch.softmax(s.masked_fill(_future(T, S + T, S, x.device), float("-inf")), dim=-1)
        o = torch.einsum("bhts,bsc->bthc", p, kv_all)
        o = torch.einsum("bthc,hvc->bthv", o, W[:, Dn:])             # W_UV after the weighted sum
        y = o.reshape(B, T, H * Dv) @ P["wo"].T
    return _n({"y": y, "kv_after": kv_all, "pe_after": pe_all})


# ================================================================================================
# routing, experts, balance losses
# ================================================================================================

def _route(x, gate, bias, c):
    """-> logits [N, E], scores [N, E], weights [N, K], indices [N, K] (best first)."""
    N, E = x.shape[0], gate.shape[0]
    G, Gk, K = c.n_expert_groups, c.n_limited_groups, c.n_activated_experts
    logits = x @ gate.T
    scores = torch.sigmoid(logits) if c.score_func == "sigmoid" else torch.softmax(logits, dim=-1)
    sel = scores.detach() + bias                                     # the bias selects, nothing else
    if G > 1:
        grouped = sel.view(N, G, E // G)
        gscore = (grouped.topk(2, dim=-1).values.sum(-1) if c.score_func == "sigmoid"
                  else grouped.amax(-1))
        keep = torch.zeros(N, G, dtype=torch.bool, device=x.device)
        keep.scatter_(1, gscore.topk(Gk, dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(E // G, dim=1), float("-inf"))
    indices = sel.topk(K, dim=-1).indices
    w = scores.gather(1, indices)                                    # unbiased scores
    if c.renormalize:
        w = w / w.sum(-1, keepdim=True)                              # normalise first ...
    return logits, scores, w * c.route_scale, indices               # ... then scale


def router(x, gate_w, bias, dweights, cfg):
    c = _cfg(cfg)
    x, gate_w, bias, dweights = _t(x, True), _t(gate_w, True), _t(bias), _t(dweights)
    _, scores, w, idx = _route(x, gate_w, bias, c)
    dx, dgate = _vjp([(w, dweights)], [x, gate_w])
    return _n({"weights": w, "indices": idx, "scores": scores, "dx": dx, "dgate_w": dgate})


def _by_expert(indices):
    """Flat assignments t*K+k stably sorted by expert -> order [N*K]."""
    return torch.sort(indices.reshape(-1), stable=True).indices


def moe_dispatch(x, indices, dxs, n_experts):
    x, indices, dxs = _t(x, True), _t(indices), _t(dxs)
    K = indices.shape[1]
    order = _by_expert(indices)
    xs = x[order // K]
    counts = torch.bincount(indices.reshape(-1), minlength=n_experts)
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    (dx,) = _vjp([(xs, dxs)], [x])
    return _n({"xs": xs, "order": order, "offsets": offsets, "dx": dx})


def moe_combine(ys, weights, indices, dy, n_experts):
    ys, weights, indices, dy = _t(ys, True), _t(weights, True), _t(indices), _t(dy)
    N, K = indices.shape
    order = _by_expert(indices)
    pos = torch.empty_like(order)
    pos[order] = torch.arange(order.numel(), device=order.device)    # row of assignment t*K+k
    y = (weights[..., None] * ys[pos].view(N, K, -1)).sum(1)
    dys, dweights = _vjp([(y, dy)], [ys, weights])
    return _n({"y": y, "dys": dys, "dweights": dweights})


def _balance(scores, indices, seq_len):
    """V3 sequence-wise loss: mean over sequences of sum_i f_i P_i (f constant, s' over all E)."""
    N, E = scores.shape
    K, B = indices.shape[1], N // seq_len
    onehot = F.one_hot(indices, E).sum(1).to(scores.dtype).view(B, seq_len, E)
    f = onehot.sum(1) * (E / (K * seq_len))                          # [B, E], no gradient
    P = (scores / scores.sum(-1, keepdim=True)).view(B, seq_len, E).mean(1)
    return (f * P).sum(-1).mean()


def _z(logits):
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def seq_balance(scores, indices, dloss, seq_len):
    scores, indices, dloss = _t(scores, True), _t(indices), _t(dloss)
    loss = _balance(scores, indices, seq_len)
    (ds,) = _vjp([(loss, dloss)], [scores])
    return _n({"loss": loss, "dscores": ds})


def expert_balance(scores, indices, dloss):
    scores, indices, dloss = _t(scores, True), _t(indices), _t(dloss)
    loss = _balance(scores, indices, scores.shape[0])                # one "sequence" of N tokens
    (ds,) = _vjp([(loss, dloss)], [scores])
    return _n({"loss": loss, "dscores": ds})


def z_loss(logits, dloss):
    logits, dloss = _t(logits, True), _t(dloss)
    loss = _z(logits)
    (dl,) = _vjp([(loss, dloss)], [logits])
    return _n({"loss": loss, "dlogits": dl})


def _moe(x, P, bias, c, seq_len):
    """x [N, D] -> y [N, D], aux loss, indices: shared expert + gate-weighted routed experts."""
    logits, scores, w, idx = _route(x, P["gate"], bias, c)
    y = torch.zeros_like(x)
    for e in range(c.n_routed_experts):
        tok, slot = torch.nonzero(idx == e, as_tuple=True)
        if tok.numel():
            out = _swiglu(x[tok], P["experts.w1"][e], P["experts.w2"][e], P["experts.w3"][e])
            y = y.index_add(0, tok, out * w[tok, slot][:, None])     # weight on the expert output
    if "shared.w1" in P:
        y = y + _swiglu(x, P["shared.w1"], P["shared.w2"], P["shared.w3"])
    aux = x.new_zeros(())
    if c.aux_loss_alpha > 0:
        aux = aux + c.aux_loss_alpha * _balance(scores, idx, x.shape[0])
    if c.seq_aux_loss_alpha > 0:
        aux = aux + c.seq_aux_loss_alpha * _balance(scores, idx, seq_len)
    if c.z_loss_alpha > 0:
        aux = aux + c.z_loss_alpha * _z(logits)
    return y, aux, idx


def moe(x, params, bias, dy, cfg, seq_len):
    c = _cfg(cfg)
    x, P, bias, dy = _t(x, True), _t(params, True), _t(bias), _t(dy)
    y, aux, idx = _moe(x, P, bias, c, seq_len)
    grads = _vjp([(y, dy), (aux, torch.ones_like(aux))], [x] + list(P.values()))
    return _n({"y": y, "aux_loss": aux, "indices": idx, "dx": grads[0],
               "dparams": dict(zip(P, grads[1:]))})


# ================================================================================================
# the model and its MTP module
# ================================================================================================

def _sub(P, prefix):
    n = len(prefix) + 1
    return {k[n:]: v for k, v in P.items() if k.startswith(prefix + ".")}


def _block(h, P, prefix, c, bias, is_moe):
    """a = h + MLA(attn_norm(h));  out = a + FFN(ffn_norm(a)) -> (out, aux)."""
    B, T, D = h.shape
    a = h + _mla(_rmsnorm(h, P[f"{prefix}.attn_norm"], c.norm_eps), _sub(P, f"{prefix}.attn"), c)
    u = _rmsnorm(a, P[f"{prefix}.ffn_norm"], c.norm_eps).reshape(B * T, D)
    ffn = _sub(P, f"{prefix}.ffn")
    if is_moe:
        y, aux, _ = _moe(u, ffn, bias, c, T)
    else:
        y, aux = _swiglu(u, ffn["w1"], ffn["w2"], ffn["w3"]), h.new_zeros(())
    return a + y.view(B, T, D), aux


def _mtp_depth(k, tokens, h_prev, P, bias, c):
    """Depth k: [enorm(Emb(t_{i+k})) ; hnorm(h_prev_i)] -> eh_proj -> block -> norm -> head."""
    pre, T = f"mtp.{k - 1}", tokens.shape[1]
    e = _rmsnorm(F.embedding(tokens[:, k:], P["embed"]), P[f"{pre}.enorm"], c.norm_eps)
    h = _rmsnorm(h_prev[:, :T - k], P[f"{pre}.hnorm"], c.norm_eps)
    x = torch.cat([e, h], dim=-1) @ P[f"{pre}.eh_proj"].T            # embedding half first
    hk, aux = _block(x, P, pre, c, bias, True)
    logits = _rmsnorm(hk, P[f"{pre}.norm"], c.norm_eps) @ P["head"].T
    return logits, hk, aux


def mtp(tokens, h_prev, params, bias, dlogits, dh, cfg):
    c = _cfg(cfg)
    tokens, h_prev, P = _t(tokens), _t(h_prev, True), _t(params, True)
    bias, dlogits, dh = _t(bias), _t(dlogits), _t(dh)
    logits, h, aux = _mtp_depth(1, tokens, h_prev, P, bias, c)
    grads = _vjp([(logits, dlogits), (h, dh), (aux, torch.ones_like(aux))], [h_prev] + list(P.values()))
    return _n({"logits": logits, "h": h, "aux_loss": aux, "dh_prev": grads[0],
               "dparams": dict(zip(P, grads[1:]))})


def model_loss(tokens, targets, params, buffers, cfg):
    c = _cfg(cfg)
    tokens, targets, P, buf = _t(tokens), _t(targets), _t(params, True), _t(buffers)
    B, T = tokens.shape
    V = c.vocab_size
    h = F.embedding(tokens, P["embed"])                              # no sqrt(D) scaling
    aux = h.new_zeros(())
    for l in range(c.n_layers):
        h, a = _block(h, P, f"layers.{l}", c, buf.get(f"layers.{l}.ffn.gate.bias"),
                      l >= c.n_dense_layers)
        aux = aux + a
    logits = _rmsnorm(h, P["norm"], c.norm_eps) @ P["head"].T
    loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    mtp_logits, h_prev, mtp_ce = [], h, []
    for k in range(1, min(c.n_mtp_modules, T - 1) + 1):
        lg, h_prev, a = _mtp_depth(k, tokens, h_prev, P, buf[f"mtp.{k - 1}.ffn.gate.bias"], c)
        mtp_logits.append(lg)
        mtp_ce.append(F.cross_entropy(lg.reshape(-1, V), targets[:, k:].reshape(-1),
                                      ignore_index=-100))
        aux = aux + a
    if mtp_ce:
        loss = loss + c.mtp_lambda / c.n_mtp_modules * sum(mtp_ce)
    loss = loss + aux
    grads = torch.autograd.grad(loss, list(P.values()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(P.values(), grads)]
    return _n({"loss": loss, "logits": logits, "mtp_logits": mtp_logits[0],
               "dparams": dict(zip(P, grads))})


# ================================================================================================
# optimiser, bias update, GRPO
# ================================================================================================

def adamw(params, grads, m, v, t, lr, betas, eps, weight_decay):
    """torch.optim.AdamW itself, its state set to (m, v, t); no decay for names ending in "norm"."""
    P = {k: torch.nn.Parameter(x) for k, x in _t(params).items()}
    G, M, Vs = _t(grads), _t(m), _t(v)
    decay = [p for k, p in P.items() if not k.endswith("norm")]
    keep = [p for k, p in P.items() if k.endswith("norm")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": keep, "weight_decay": 0.0}],
                            lr=lr, betas=tuple(betas), eps=eps, foreach=False)
    for k, p in P.items():
        p.grad = G[k]
        opt.state[p] = {"step": torch.tensor(float(t)), "exp_avg": M[k].clone(),
                        "exp_avg_sq": Vs[k].clone()}
    opt.step()
    return {"params": _n({k: p for k, p in P.items()}),
            "m": _n({k: opt.state[p]["exp_avg"] for k, p in P.items()}),
            "v": _n({k: opt.state[p]["exp_avg_sq"] for k, p in P.items()})}


def bias_update(bias, load, gamma):
    bias, load = _t(bias), _t(load)
    lf = load.to(torch.float64)
    return _n({"bias": bias + gamma * torch.sign(lf.mean() - lf).to(bias.dtype)})


def grpo_loss(logits, tokens, mask, old_logprobs, ref_logprobs, advantages, dloss, clip_eps,
              clip_eps_high, beta, temperature):
    z, tokens, mask = _t(logits, True), _t(tokens), _t(mask)
    old, ref, A, dloss = _t(old_logprobs), _t(ref_logprobs), _t(advantages)[:, None], _t(dloss)
    lp = torch.log_softmax(z / temperature, dim=-1).gather(-1, tokens[..., None])[..., 0]
    ratio = torch.exp(torch.where(mask, lp - old, torch.zeros_like(lp)))       # per token
    surr = torch.minimum(ratio * A, ratio.clamp(1 - clip_eps, 1 + clip_eps_high) * A)
    d = torch.where(mask, ref - lp, torch.zeros_like(lp))
    kl = torch.exp(d) - d - 1                                                   # k3 estimator
    per_seq = ((surr - beta * kl) * mask).sum(1) / mask.sum(1).clamp(min=1)    # 1/|o_i|
    loss = -per_seq.mean()
    (dz,) = _vjp([(loss, dloss)], [z])
    return _n({"loss": loss, "dlogits": dz})


def grpo_advantages(rewards, eps):
    r = _t(rewards)
    return _n({"advantages": (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)})

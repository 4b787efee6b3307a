"""The golden cases: for each forward/backward pair, seeded inputs and what the case checks.

Each builder takes (cfg, rng, dtype) and returns the case's arguments in calling order: NumPy
arrays (tensors), dicts of arrays ("tensors"), or JSON values ("attr"; `cfg` is the ModelConfig
as a dict). The outputs are computed by `tinymoe.golden.reference` (tinymoe itself), in float64
unless --dtype float32 is asked for, and stored next to the inputs.

Inputs are drawn from one explicit Generator per case, seeded by (seed, crc32(case name)), so a
case's data do not depend on which other cases exist. Upstream gradients are random (a random dy
catches a transposed gradient that an all-ones dy hides).

Routing is piecewise constant, so a port that computes the scores with a tiny rounding difference
must still pick the same experts. The router and MoE cases are built with a margin: every gap
that decides the routing (the K + 1 best selection scores, the n_limited_groups-th against the
next group score) is at least ROUTER_MARGIN = 0.01, far above bfloat16 rounding of the scores.
The MTP and whole-model cases route hidden states, so their inputs are redrawn until the smallest
such gap is at least MODEL_MARGIN = 1e-4 (float32 rounding is ~1e-7); the manifest records it.

Tolerances (manifest "tolerance"): an output entry passes when

    |actual - expected| <= rtol * |expected| + atol * max|expected|      (atol relative to the tensor)

with (rtol, atol) from TOLERANCES by precision and depth class, set from measurements rather than
guessed. tinymoe itself run in float32 on float32-cast inputs (what a correct float32 port does)
uses at most 4% (toy) / 10% (bench) of the float32 tolerance on any case, and
tests/test_golden.py asserts it stays under 20%. Run on inputs rounded to bfloat16 (a port that
stores tensors in bfloat16) it uses at most 58% of the bfloat16 tolerance on every toy case and
every bench case but one: on bench, bfloat16 rounding flips an expert choice in `model_loss`
(routing margin ~1e-4), after which no tolerance is meaningful, so a bfloat16 port checks the
whole model on toy or in float32. Deeper cases get looser tolerances because rounding compounds
through more layers. Integer outputs (indices, orders, offsets) must match exactly. float64 is a
strict extra level for float64 ports (other summation orders only).
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Dict, List

import numpy as np

from tinymoe.config import ModelConfig
from tinymoe.layers.basic import IGNORE_INDEX, sigmoid
from tinymoe.layers.mla import LatentKVCache, mla_param_shapes
from tinymoe.layers.rope import rope_angles
from tinymoe.model import buffer_shapes, init_params, is_norm, param_shapes

ROUTER_MARGIN = 1e-2
MODEL_MARGIN = 1e-4

# precision -> depth class -> (rtol, atol as a fraction of max|expected|)
TOLERANCES = {
    "float32": {"shallow": (3e-5, 3e-6), "medium": (1e-4, 1e-5), "deep": (1e-3, 1e-4)},
    "bfloat16": {"shallow": (2e-2, 1e-2), "medium": (5e-2, 2e-2), "deep": (1e-1, 5e-2)},
}


@dataclass(frozen=True)
class Case:
    name: str
    function: str            # the port function this case calls
    depth: str               # tolerance class: shallow / medium / deep
    checks: str              # what a failure here usually means (README table)
    build: Callable          # (cfg, rng, dtype) -> [(arg name, value), ...], extra manifest fields


def golden_config(preset: str) -> ModelConfig:
    """The preset with every switch the cases exercise turned on (YaRN, MTP, balance loss)."""
    base = ModelConfig.preset(preset)
    # init_std 0.6 / sqrt(D): router logits of std ~0.6 whatever D is (clear routing gaps), and
    # activations that neither vanish nor blow up through the layers
    return base.replace(n_mtp_modules=1, seq_aux_loss_alpha=0.01,
                        init_std=round(0.6 / base.dim ** 0.5, 6),
                        original_seq_len=base.max_seq_len // 4, mscale=0.707)


def case_seed(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), zlib.crc32(name.encode())]))


def _shape(cfg: ModelConfig):
    """(B, T) of the cases: 2 sequences of 8 (toy) or 16 (bench) tokens."""
    return 2, (8 if cfg.dim <= 32 else 16)


def _normal(rng, shape, dtype, std=1.0):
    return (std * rng.standard_normal(shape)).astype(dtype)


def _params(rng, shapes: Dict[str, tuple], dtype, std: float) -> Dict[str, np.ndarray]:
    """Matrices ~ N(0, std^2); norm scales 1 + N(0, 0.1^2) (not all ones: a port must apply them)."""
    return {k: (1.0 + 0.1 * rng.standard_normal(s) if is_norm(k) else std * rng.standard_normal(s)
                ).astype(dtype) for k, s in shapes.items()}


# ------------------------------------------------------------------------------------------------
# routing margins
# ------------------------------------------------------------------------------------------------

def routing_margin(scores: np.ndarray, bias: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """[N, E] scores, [E] bias -> [N]: the smallest gap that decides each token's routing.

    Gaps between consecutive selection scores s + b among the K + 1 best allowed experts, and
    between the n_limited_groups-th and the next group score (V3: top-2 sum, V2: max).
    """
    N, E = scores.shape
    G, Gk, K = cfg.n_expert_groups, cfg.n_limited_groups, cfg.n_activated_experts
    sel = scores.astype(np.float64) + bias
    margin = np.full(N, np.inf)
    if G > 1:
        grouped = sel.reshape(N, G, E // G)
        gs = (np.sort(grouped, axis=-1)[..., -2:].sum(-1) if cfg.score_func == "sigmoid"
              else grouped.max(-1))                                            # [N, G]
        order = np.argsort(-gs, axis=1, kind="stable")
        ranked = np.take_along_axis(gs, order, axis=1)
        if Gk < G:
            margin = ranked[:, Gk - 1] - ranked[:, Gk]
        allowed = np.zeros((N, G), dtype=bool)
        np.put_along_axis(allowed, order[:, :Gk], True, axis=1)
        sel = np.where(np.repeat(allowed, E // G, axis=1), sel, -np.inf)
    top = -np.sort(-sel, axis=1)[:, :K + 1]
    gaps = top[:, :-1] - top[:, 1:]                                            # inf past the allowed
    return np.minimum(margin, gaps.min(axis=1))


def _designed_router_inputs(rng, cfg: ModelConfig, N: int, bias: np.ndarray, dtype):
    """x [N, D], gate_w [E, D] whose routing has every deciding gap >= ROUTER_MARGIN.

    Logits z are drawn per token (redrawn until the token's margin holds), then x is the min-norm
    solution of x gate_w^T = z plus a random part in gate_w's null space.
    """
    E, D = cfg.n_routed_experts, cfg.dim
    gate_w = rng.standard_normal((E, D)) * 0.3
    z = np.empty((N, E))
    for t in range(N):
        for _ in range(10_000):
            z[t] = rng.standard_normal(E) * 1.5
            if cfg.score_func == "sigmoid":
                s = sigmoid(z[t:t + 1])
            else:
                e = np.exp(z[t:t + 1] - z[t].max())
                s = e / e.sum()
            if routing_margin(s, bias, cfg)[0] >= ROUTER_MARGIN:
                break
        else:
            raise RuntimeError("could not draw router logits with the routing margin")
    pinv = np.linalg.pinv(gate_w)                                              # [D, E]
    noise = rng.standard_normal((N, D))
    x = z @ pinv.T + noise - (noise @ pinv) @ gate_w
    return x.astype(dtype), gate_w.astype(dtype)


def _signed_bias(rng, E: int, scale: float) -> np.ndarray:
    """[E] selection bias with both signs present."""
    b = rng.uniform(-scale, scale, E)
    b[0], b[1] = abs(b[0]) + scale / 4, -abs(b[1]) - scale / 4
    return b


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------

def _linear(cfg, rng, dt):
    B, T = _shape(cfg)
    In, Out = cfg.dim, cfg.dim + cfg.dim // 2            # Out != In: a transposed weight fails
    return [("x", _normal(rng, (B, T, In), dt)), ("w", _normal(rng, (Out, In), dt, 0.2)),
            ("dy", _normal(rng, (B, T, Out), dt))], {}


def _embedding(cfg, rng, dt):
    B, T = _shape(cfg)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    tokens[1, :3] = tokens[0, 0]                          # a repeated id must accumulate
    return [("tokens", tokens.astype(np.int64)),
            ("w", _normal(rng, (cfg.vocab_size, cfg.dim), dt)),
            ("dy", _normal(rng, (B, T, cfg.dim), dt))], {}


def _rmsnorm(cfg, rng, dt):
    B, T = _shape(cfg)
    x = _normal(rng, (B * T, cfg.dim), dt, 2.0)
    return [("x", x), ("w", (1 + 0.3 * rng.standard_normal(cfg.dim)).astype(dt)),
            ("dy", _normal(rng, x.shape, dt)), ("eps", cfg.norm_eps)], {}


def _swiglu(cfg, rng, dt):
    B, T = _shape(cfg)
    D, F = cfg.dim, cfg.inter_dim
    return [("x", _normal(rng, (B * T, D), dt)), ("w1", _normal(rng, (F, D), dt, 0.2)),
            ("w2", _normal(rng, (D, F), dt, 0.2)), ("w3", _normal(rng, (F, D), dt, 0.2)),
            ("dy", _normal(rng, (B * T, D), dt))], {}


def _softmax(cfg, rng, dt):
    B, T = _shape(cfg)
    x = _normal(rng, (B * T, cfg.vocab_size), dt, 3.0)
    x[::3, -5:] = -np.inf                                  # masked entries: probability exactly 0
    return [("x", x), ("dy", _normal(rng, x.shape, dt))], {}


def _cross_entropy(cfg, rng, dt):
    B, T = _shape(cfg)
    targets = rng.integers(0, cfg.vocab_size, B * T)
    targets[[1, 4]] = IGNORE_INDEX                         # ignored rows: no loss, zero gradient
    return [("logits", _normal(rng, (B * T, cfg.vocab_size), dt, 3.0)),
            ("targets", targets.astype(np.int64)), ("dloss", np.asarray(1.7, dtype=dt)),
            ("ignore_index", IGNORE_INDEX)], {}


def _rope(cfg, rng, dt):
    B, T = _shape(cfg)
    Dr = cfg.qk_rope_head_dim
    cos, sin = rope_angles(cfg, np.arange(3, 3 + T), dt)
    return [("x", _normal(rng, (B, T, cfg.n_heads, Dr), dt)), ("cos", cos), ("sin", sin),
            ("dy", _normal(rng, (B, T, cfg.n_heads, Dr), dt))], {}


def _yarn_tables(cfg, rng, dt):
    T = _shape(cfg)[1]
    pos = np.sort(rng.choice(cfg.max_seq_len, T, replace=False))
    pos[-1] = cfg.max_seq_len - 1                          # the longest position the model sees
    return [("positions", pos.astype(np.int64)), ("cfg", cfg.to_dict())], {}


def _sdpa(cfg, rng, dt):
    B, T = _shape(cfg)
    H, Dk, Dv = cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim
    Hkv = H // 2                                           # grouped KV heads: h reads h // 2
    return [("q", _normal(rng, (B, T, H, Dk), dt)), ("k", _normal(rng, (B, T, Hkv, Dk), dt)),
            ("v", _normal(rng, (B, T, Hkv, Dv), dt)), ("do", _normal(rng, (B, T, H, Dv), dt)),
            ("scale", cfg.qk_head_dim ** -0.5)], {}


def _mla_params(cfg, rng, dt):
    return _params(rng, mla_param_shapes(cfg), dt, 0.2)


def _mla(cfg, rng, dt):
    B, T = _shape(cfg)
    return [("x", _normal(rng, (B, T, cfg.dim), dt)), ("params", _mla_params(cfg, rng, dt)),
            ("dy", _normal(rng, (B, T, cfg.dim), dt)), ("cfg", cfg.to_dict())], {}


def _mla_decode(cfg, rng, dt):
    from tinymoe.layers.mla import mla_decode
    B, S = _shape(cfg)[0], 5
    p = _mla_params(cfg, rng, dt)
    cache = LatentKVCache(cfg, B, dt)
    mla_decode(_normal(rng, (B, S, cfg.dim), dt), p, cfg, cache)      # prefill S tokens
    return [("x", _normal(rng, (B, 1, cfg.dim), dt)), ("params", p),
            ("kv", cache.kv[:, :S].copy()), ("pe", cache.pe[:, :S].copy()),
            ("cfg", cfg.to_dict())], {}


def _router_case(cfg, rng, dt, bias):
    B, T = _shape(cfg)
    N, K = B * T, cfg.n_activated_experts
    x, gate_w = _designed_router_inputs(rng, cfg, N, bias, dt)
    return [("x", x), ("gate_w", gate_w), ("bias", bias.astype(dt)),
            ("dweights", _normal(rng, (N, K), dt)), ("cfg", cfg.to_dict())]


def _router_sigmoid_cfg(cfg):
    return cfg.replace(score_func="sigmoid", norm_topk_prob=None, route_scale=2.5)


def _router_softmax_cfg(cfg):
    return cfg.replace(score_func="softmax", norm_topk_prob=False, route_scale=16.0)


def _router_sigmoid(cfg, rng, dt):
    c = _router_sigmoid_cfg(cfg)
    return _router_case(c, rng, dt, _signed_bias(rng, c.n_routed_experts, 0.1)), \
        {"routing_margin": ROUTER_MARGIN}


def _router_softmax(cfg, rng, dt):
    c = _router_softmax_cfg(cfg)
    return _router_case(c, rng, dt, np.zeros(c.n_routed_experts)), \
        {"routing_margin": ROUTER_MARGIN}


def _topk_indices(rng, N, E, K):
    return np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.int64)


def _moe_dispatch(cfg, rng, dt):
    B, T = _shape(cfg)
    N, E, K, D = B * T, cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim
    idx = _topk_indices(rng, N, E, K)
    idx[idx == E - 1] = 0                                  # one expert gets no tokens at all
    return [("x", _normal(rng, (N, D), dt)), ("indices", idx),
            ("dxs", _normal(rng, (N * K, D), dt)), ("n_experts", E)], {}


def _moe_combine(cfg, rng, dt):
    B, T = _shape(cfg)
    N, E, K, D = B * T, cfg.n_routed_experts, cfg.n_activated_experts, cfg.dim
    return [("ys", _normal(rng, (N * K, D), dt)),
            ("weights", rng.uniform(0.1, 1.5, (N, K)).astype(dt)),
            ("indices", _topk_indices(rng, N, E, K)), ("dy", _normal(rng, (N, D), dt)),
            ("n_experts", E)], {}


def _moe_cfg(cfg):
    return cfg.replace(aux_loss_alpha=0.01, seq_aux_loss_alpha=0.01, z_loss_alpha=0.001)


def _moe(cfg, rng, dt):
    from tinymoe.layers.moe import init_moe_params
    c = _moe_cfg(cfg)
    B, T = _shape(c)
    bias = _signed_bias(rng, c.n_routed_experts, 0.1)
    x, gate_w = _designed_router_inputs(rng, c, B * T, bias, dt)
    p = init_moe_params(c.replace(init_std=0.2), rng, dt)
    p["gate"] = gate_w
    return [("x", x), ("params", p), ("bias", bias.astype(dt)),
            ("dy", _normal(rng, x.shape, dt)), ("cfg", c.to_dict()), ("seq_len", T)], \
        {"routing_margin": ROUTER_MARGIN}


def _balance_inputs(cfg, rng, dt):
    B, T = _shape(cfg)
    N, E, K = B * T, cfg.n_routed_experts, cfg.n_activated_experts
    scores = sigmoid(rng.standard_normal((N, E)) * 1.5).astype(dt)
    return scores, np.argsort(-scores, axis=1, kind="stable")[:, :K].astype(np.int64), T


def _seq_balance(cfg, rng, dt):
    scores, idx, T = _balance_inputs(cfg, rng, dt)
    return [("scores", scores), ("indices", idx), ("dloss", np.asarray(0.8, dtype=dt)),
            ("seq_len", T)], {}


def _expert_balance(cfg, rng, dt):
    scores, idx, _ = _balance_inputs(cfg, rng, dt)
    return [("scores", scores), ("indices", idx), ("dloss", np.asarray(0.8, dtype=dt))], {}


def _z_loss(cfg, rng, dt):
    B, T = _shape(cfg)
    return [("logits", _normal(rng, (B * T, cfg.n_routed_experts), dt, 2.0)),
            ("dloss", np.asarray(0.8, dtype=dt))], {}


def _model_params(cfg, rng, dt):
    p = init_params(cfg, rng, np.float64)
    for k in p:
        if is_norm(k):
            p[k] = p[k] + 0.1 * rng.standard_normal(p[k].shape)
    return {k: v.astype(dt) for k, v in p.items()}


def _with_margin(draw, margin_of, what: str):
    """Redraw (deterministically) until the routing margin holds; returns (args, margin)."""
    for _ in range(200):
        args = draw()
        m = margin_of(args)
        if m >= MODEL_MARGIN:
            return args, m
    raise RuntimeError(f"{what}: no draw in 200 reached the routing margin {MODEL_MARGIN}")


def _mtp(cfg, rng, dt):
    from tinymoe.golden.reference import _model
    B, T = _shape(cfg)
    D, V = cfg.dim, cfg.vocab_size
    names = ["embed", "head"] + [k for k in param_shapes(cfg) if k.startswith("mtp.0.")]

    def draw():
        full = _model_params(cfg, rng, dt)
        return [("tokens", rng.integers(0, V, (B, T)).astype(np.int64)),
                ("h_prev", _normal(rng, (B, T, D), dt)),
                ("params", {k: full[k] for k in names}),
                ("bias", _signed_bias(rng, cfg.n_routed_experts, 0.05).astype(dt)),
                ("dlogits", _normal(rng, (B, T - 1, V), dt, 0.1)),
                ("dh", _normal(rng, (B, T - 1, D), dt, 0.1)), ("cfg", cfg.to_dict())]

    def margin(args):
        a = dict(args)
        m = _model(cfg, a["params"], {"mtp.0.ffn.gate.bias": a["bias"]}, dt)
        _, _, cache, _ = m._mtp_forward(1, a["tokens"], a["h_prev"])
        return float(routing_margin(cache["block"].ffn.scores, a["bias"], cfg).min())

    args, m = _with_margin(draw, margin, "mtp")
    return args, {"routing_margin": m}


def _model_loss(cfg, rng, dt):
    from tinymoe.golden.reference import _model
    B, T = _shape(cfg)

    def draw():
        tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int64)
        targets = np.concatenate([tokens[:, 1:], rng.integers(0, cfg.vocab_size, (B, 1))], 1)
        targets[0, 2] = targets[1, 5] = IGNORE_INDEX
        buffers = {k: _signed_bias(rng, s[0], 0.05).astype(dt)
                   for k, s in buffer_shapes(cfg).items()}
        return [("tokens", tokens), ("targets", targets.astype(np.int64)),
                ("params", _model_params(cfg, rng, dt)), ("buffers", buffers),
                ("cfg", cfg.to_dict())]

    def margin(args):
        a = dict(args)
        m = _model(cfg, a["params"], a["buffers"], dt)
        _, _, cache = m.forward_train(a["tokens"])
        return float(min(routing_margin(c.scores, a["buffers"][k], cfg).min()
                         for k, c in cache.moe_caches.items()))

    args, m = _with_margin(draw, margin, "model_loss")
    return args, {"routing_margin": m}


def _adamw(cfg, rng, dt):
    shapes = {"embed": (cfg.vocab_size, cfg.dim), "layers.0.attn_norm": (cfg.dim,),
              "layers.1.ffn.experts.w1": (cfg.n_routed_experts, cfg.moe_inter_dim, cfg.dim)}

    def group(std, positive=False):
        g = {k: _normal(rng, s, dt, std) for k, s in shapes.items()}
        return {k: np.abs(v) for k, v in g.items()} if positive else g
    return [("params", group(0.1)), ("grads", group(0.01)), ("m", group(0.01)),
            ("v", group(1e-4, positive=True)), ("t", 3), ("lr", 3e-3), ("betas", [0.9, 0.95]),
            ("eps", 1e-8), ("weight_decay", 0.1)], {}


def _bias_update(cfg, rng, dt):
    E = cfg.n_routed_experts
    k = rng.integers(1, 9, (E - 2) // 2)
    load = 10 + rng.permutation(np.concatenate([[0, 0], k, -k]))   # mean exactly 10: two at it
    return [("bias", _signed_bias(rng, E, 0.01).astype(dt)), ("load", load.astype(np.int64)),
            ("gamma", 0.001)], {}


def _grpo_loss(cfg, rng, dt):
    from tinymoe.grpo.objective import token_logprobs
    M, L, V = 6, 5, cfg.vocab_size
    logits = _normal(rng, (M, L, V), dt, 2.0)
    tokens = rng.integers(0, V, (M, L)).astype(np.int64)
    mask = np.ones((M, L), dtype=bool)
    mask[0, 3:] = mask[2, 4:] = mask[5, 1:] = False        # different response lengths
    tau, lo, hi = 0.9, 0.2, 0.28
    logp = token_logprobs(logits, tokens, tau).astype(np.float64)
    # log-ratios l - l_old on both sides of both clip boundaries, but >= 0.1 from them (the
    # surrogate has a kink there; 0.1 is ~5x the log-prob error of a bfloat16 port)
    bounds = np.log([1 - lo, 1 + hi])
    d = rng.uniform(-0.6, 0.6, (M, L))
    while True:
        near = np.min(np.abs(d[..., None] - bounds), -1) < 0.1
        if not near.any():
            break
        d[near] = rng.uniform(-0.6, 0.6, int(near.sum()))
    return [("logits", logits), ("tokens", tokens), ("mask", mask),
            ("old_logprobs", (logp - d).astype(dt)),
            ("ref_logprobs", (logp + rng.normal(0, 0.3, (M, L))).astype(dt)),
            ("advantages", np.array([1.2, 0.7, 0.5, -0.4, 0.0, 0.9], dtype=dt)),   # loss not ~0
            ("dloss", np.asarray(1.0, dtype=dt)), ("clip_eps", lo), ("clip_eps_high", hi),
            ("beta", 0.04), ("temperature", tau)], {}


def _grpo_advantages(cfg, rng, dt):
    r = rng.integers(0, 3, (4, 6)).astype(np.float64)
    r[2] = 1.0                                             # a constant group: advantages exactly 0
    return [("rewards", r.astype(dt)), ("eps", 1e-4)], {}


CASES: List[Case] = [
    Case("linear", "linear", "shallow", "y = x W^T with W stored [out, in]", _linear),
    Case("embedding", "embedding", "shallow", "row gather; repeated ids accumulate in dW",
         _embedding),
    Case("rmsnorm", "rmsnorm", "shallow", "normalise, then scale by w; eps inside the sqrt",
         _rmsnorm),
    Case("swiglu", "swiglu", "shallow", "silu(x W1^T) * (x W3^T) then W2; gate is W1",
         _swiglu),
    Case("softmax", "softmax", "shallow", "last axis, -inf entries give exactly 0", _softmax),
    Case("cross_entropy", "cross_entropy", "shallow",
         "mean over rows whose target is not ignore_index (-100)", _cross_entropy),
    Case("rope", "rope", "shallow", "interleaved pairs (2j, 2j+1), not half-split", _rope),
    Case("yarn_tables", "yarn_tables", "medium",
         "YaRN ramp on inv_freq, angles in float64, softmax scale times mscale^2", _yarn_tables),
    Case("sdpa", "sdpa", "medium", "causal mask, scale, grouped KV heads h // (H/Hkv)", _sdpa),
    Case("mla", "mla", "deep",
         "split orders [nope|rope], [latent|k_pe], [k_nope|v]; kv_norm on the latent only; "
         "YaRN scale", _mla),
    Case("mla_decode", "mla_decode", "deep",
         "absorbed decode: new token at position S, cache keeps normed latent and rotated k_pe",
         _mla_decode),
    Case("router_sigmoid", "router", "medium",
         "sigmoid, top-2-sum groups, bias for selection only, normalise then x route_scale",
         _router_sigmoid),
    Case("router_softmax", "router", "medium",
         "softmax over all E, max-group limit, no renormalisation, x route_scale", _router_softmax),
    Case("moe_dispatch", "moe_dispatch", "shallow",
         "stable sort of assignments t*K+k by expert; gather; backward scatter-adds", _moe_dispatch),
    Case("moe_combine", "moe_combine", "shallow",
         "weighted scatter-add of expert rows back to tokens", _moe_combine),
    Case("moe", "moe", "deep",
         "shared expert unweighted, gate weight on expert output, all three balance losses",
         _moe),
    Case("seq_balance", "seq_balance", "shallow",
         "per-sequence f_i P_i, mean over sequences, f_i constant", _seq_balance),
    Case("expert_balance", "expert_balance", "shallow",
         "batch-level f_i P_i with scores normalised over all E", _expert_balance),
    Case("z_loss", "z_loss", "shallow", "mean squared logsumexp of router logits", _z_loss),
    Case("mtp", "mtp", "deep",
         "eh_proj input [enorm(emb) ; hnorm(h)] (embedding first), own norm before shared head",
         _mtp),
    Case("model_loss", "model_loss", "deep",
         "whole model: CE + mtp_lambda * MTP CE + balance loss, every gradient", _model_loss),
    Case("adamw", "adamw", "medium",
         "bias-corrected moments at t+1, decoupled decay skipped for *norm", _adamw),
    Case("bias_update", "bias_update", "shallow",
         "b + gamma sign(mean load - load); 0 at the mean", _bias_update),
    Case("grpo_loss", "grpo_loss", "medium",
         "per-token ratio, clip [1-eps, 1+eps_high], k3 KL, 1/|o_i| length norm, temperature",
         _grpo_loss),
    Case("grpo_advantages", "grpo_advantages", "shallow",
         "Bessel std + eps, constant group exactly 0", _grpo_advantages),
]

CASE_NAMES = [c.name for c in CASES]

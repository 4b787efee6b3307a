"""The whole model: a DeepSeek-V3-style transformer with multi-token prediction, forward and backward.

    h_0     = Emb[tokens]                                   [B, T, D]   (no sqrt(D) scaling)
    a_l     = h_l + Attn_l(RMSNorm_attn(h_l))                            (MLA, or an MHA/GQA/MQA baseline)
    h_{l+1} = a_l + FFN_l(RMSNorm_ffn(a_l))                              (dense SwiGLU for l < n_dense_layers,
                                                                          DeepSeekMoE after)
    logits  = RMSNorm_final(h_L) @ W_head^T                 [B, T, V]   (untied head)

Multi-token prediction (DeepSeek-V3 section 2.2, reference/deepseek.md section 10), depth k = 1..n_mtp:

    h'^k_i = W_eh,k [ enorm_k(Emb(t_{i+k})) ; hnorm_k(h^{k-1}_i) ]      embedding half first, as in the
                                                                          released weights; i = 0..T-1-k
    h^k    = Block_k(h'^k)                                               one MoE transformer block
    logits^k_i = RMSNorm_k(h^k_i) @ W_head^T   predicts t_{i+k+1}       (shared embedding and head)
    L = CE(logits, targets) + (mtp_lambda / n_mtp) sum_k CE(logits^k, targets[:, k:]) + balance losses

h^0 is the last block's output before the final norm (hnorm re-normalises it either way).
Order of the concatenation: the V3 paper's eq. 21 writes [RMSNorm(h) ; RMSNorm(Emb)] (hidden
first), but the released weights are read embedding first by the serving engines (vLLM
deepseek_mtp.py, DeepSeekMultiTokenPredictorLayer.forward: torch.cat([inputs_embeds,
previous_hidden_states]); SGLang and Megatron-LM alike), so eh_proj[:, :D] acts on the embedding.
Eq. 21's M_k is [W_eh[:, D:] | W_eh[:, :D]]. Pinned by tests/test_mtp_order.py.
Every cross-entropy is the mean over targets that are not -100.

The backward walks the same steps in reverse; gradients meet at the residual additions, at the
shared embedding table (main input + every MTP depth) and at the shared head (main + MTP), each
summed in one visible line. The router's selection bias is state (`model.buffers`): no gradient,
updated after each optimizer step by the auxiliary-loss-free rule (`update_router_biases`).

Shape letters: B batch, T sequence, N = B*T, D dim, V vocab, E routed experts, K chosen experts.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional

import numpy as np

from tinymoe.checks import check_shape, check_tokens
from tinymoe.config import ModelConfig
from tinymoe.layers.basic import (cross_entropy_backward, cross_entropy_forward, embedding_backward,
                                  embedding_forward, linear_backward, linear_forward,
                                  swiglu_backward, swiglu_forward)
from tinymoe.layers.norm import rmsnorm_backward, rmsnorm_forward
from tinymoe.memory import keep_freed_memory
from tinymoe import threads
# The fused twins of the norm, the dense FFN and the loss (tinymoe/kernels/): same arguments and
# caches, and the plain functions above for float64 or under TINYMOE_BACKEND=numpy.
from tinymoe.kernels.norm import rmsnorm_backward_fused as rmsnorm_backward  # noqa: E402,F811
from tinymoe.kernels.norm import rmsnorm_forward_fused as rmsnorm_forward  # noqa: E402,F811
from tinymoe.kernels.swiglu import swiglu_backward_fused as swiglu_backward  # noqa: E402,F811
from tinymoe.kernels.swiglu import swiglu_forward_fused as swiglu_forward  # noqa: E402,F811
from tinymoe.kernels.loss import cross_entropy_backward_fused as cross_entropy_backward  # noqa
from tinymoe.kernels.loss import cross_entropy_forward_fused as cross_entropy_forward  # noqa

NORM_SUFFIXES = ("norm",)   # parameter names ending like this are RMSNorm scales (init 1, no decay)


# ================================================================================================
# parameter table
# ================================================================================================

def _attn_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    D, H = cfg.dim, cfg.n_heads
    Dqk, Dv = cfg.qk_head_dim, cfg.v_head_dim
    if cfg.attn_type != "mla":
        Hkv = cfg.kv_heads
        return {"wq": (H * Dqk, D), "wk": (Hkv * Dqk, D), "wv": (Hkv * Dv, D), "wo": (D, H * Dv)}
    s: Dict[str, tuple] = {}
    if cfg.q_lora_rank > 0:
        s["wq_a"] = (cfg.q_lora_rank, D)
        s["q_norm"] = (cfg.q_lora_rank,)
        s["wq_b"] = (H * Dqk, cfg.q_lora_rank)
    else:
        s["wq"] = (H * Dqk, D)
    s["wkv_a"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim, D)
    s["kv_norm"] = (cfg.kv_lora_rank,)
    s["wkv_b"] = (H * (cfg.qk_nope_head_dim + Dv), cfg.kv_lora_rank)
    s["wo"] = (D, H * Dv)
    return s


def _ffn_shapes(cfg: ModelConfig, moe: bool) -> Dict[str, tuple]:
    D = cfg.dim
    if not moe:
        F = cfg.inter_dim
        return {"w1": (F, D), "w2": (D, F), "w3": (F, D)}
    E, F = cfg.n_routed_experts, cfg.moe_inter_dim
    s = {"gate": (E, D), "experts.w1": (E, F, D), "experts.w2": (E, D, F), "experts.w3": (E, F, D)}
    if cfg.n_shared_experts:
        Fs = cfg.n_shared_experts * F
        s.update({"shared.w1": (Fs, D), "shared.w2": (D, Fs), "shared.w3": (Fs, D)})
    return s


def _block_shapes(cfg: ModelConfig, prefix: str, moe: bool) -> Dict[str, tuple]:
    s = {f"{prefix}.attn_norm": (cfg.dim,)}
    s.update({f"{prefix}.attn.{k}": v for k, v in _attn_shapes(cfg).items()})
    s[f"{prefix}.ffn_norm"] = (cfg.dim,)
    s.update({f"{prefix}.ffn.{k}": v for k, v in _ffn_shapes(cfg, moe).items()})
    return s


def param_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """{name: shape} of every parameter, in a fixed order (names of DeepSeek's official code)."""
    s = {"embed": (cfg.vocab_size, cfg.dim)}
    for l in range(cfg.n_layers):
        s.update(_block_shapes(cfg, f"layers.{l}", cfg.is_moe_layer(l)))
    s["norm"] = (cfg.dim,)
    s["head"] = (cfg.vocab_size, cfg.dim)
    for k in range(cfg.n_mtp_modules):
        s[f"mtp.{k}.enorm"] = (cfg.dim,)
        s[f"mtp.{k}.hnorm"] = (cfg.dim,)
        s[f"mtp.{k}.eh_proj"] = (cfg.dim, 2 * cfg.dim)
        s.update(_block_shapes(cfg, f"mtp.{k}", True))
        s[f"mtp.{k}.norm"] = (cfg.dim,)
    return s


def buffer_shapes(cfg: ModelConfig) -> Dict[str, tuple]:
    """{name: shape} of the router selection biases (state, not parameters)."""
    E = cfg.n_routed_experts
    s = {f"layers.{l}.ffn.gate.bias": (E,) for l in range(cfg.n_layers) if cfg.is_moe_layer(l)}
    s.update({f"mtp.{k}.ffn.gate.bias": (E,) for k in range(cfg.n_mtp_modules)})
    return s


def is_norm(name: str) -> bool:
    """True for RMSNorm scale vectors (initialised to 1, never weight-decayed)."""
    return name.rsplit(".", 1)[-1].endswith(NORM_SUFFIXES)


def init_params(cfg: ModelConfig, rng: np.random.Generator, dtype=np.float32) -> Dict[str, np.ndarray]:
    """Norm scales = 1; every matrix ~ N(0, init_std^2), drawn in float64 in param_shapes order.

    Drawing in float64 and then casting gives a float32 and a float64 model of the same seed the
    same weights up to rounding, which the gradient-check and parity tests rely on.
    """
    params = {}
    for name, shape in param_shapes(cfg).items():
        if is_norm(name):
            params[name] = np.ones(shape, dtype=dtype)
        else:
            params[name] = (cfg.init_std * rng.standard_normal(shape)).astype(dtype)
    return params


def _sub(params: Dict[str, np.ndarray], prefix: str) -> Dict[str, np.ndarray]:
    """The local dict of one sub-layer: {'wq_a': ...} from {'layers.0.attn.wq_a': ...}."""
    n = len(prefix) + 1
    return {k[n:]: v for k, v in params.items() if k.startswith(prefix + ".")}


# ================================================================================================
# one transformer block (shared by the main stack and the MTP modules)
# ================================================================================================

class BlockCache(NamedTuple):
    attn_norm: object      # RMSNormCache            [B, T, D]
    attn: object           # MLA / MHA cache
    ffn_norm: object       # RMSNormCache            [B, T, D]
    ffn: object            # SwiGLUCache (dense) or MoE cache, on [N, D]
    moe: bool              # which FFN
    attn_type: str         # "mla" or a baseline, selects the attention backward
    shape: tuple           # (B, T, D)


def _attn_fns(attn_type: str):
    """(forward, backward) of the attention sub-layer: MLA or the MHA/GQA/MQA baseline."""
    if attn_type == "mla":
        from tinymoe.layers.mla import mla_backward, mla_forward
        return mla_forward, mla_backward
    from tinymoe.layers.attention import mha_backward, mha_forward
    return mha_forward, mha_backward


def block_forward(h: np.ndarray, params: Dict[str, np.ndarray], prefix: str, cfg: ModelConfig,
                  bias: Optional[np.ndarray], moe: bool):
    """[B, T, D] -> ([B, T, D], aux_loss, cache):  a = h + Attn(norm(h));  out = a + FFN(norm(a))."""
    from tinymoe.layers.moe import moe_forward
    attn_forward, _ = _attn_fns(cfg.attn_type)
    B, T, D = h.shape
    # 1. attention sub-layer
    x1, c_n1 = rmsnorm_forward(h, params[f"{prefix}.attn_norm"], cfg.norm_eps)      # [B, T, D]
    att, c_att = attn_forward(x1, _sub(params, f"{prefix}.attn"), cfg)               # [B, T, D]
    a = h + att                                                                      # [B, T, D]
    # 2. feed-forward sub-layer (dense SwiGLU or DeepSeekMoE), on N = B*T rows
    x2, c_n2 = rmsnorm_forward(a, params[f"{prefix}.ffn_norm"], cfg.norm_eps)        # [B, T, D]
    p_ffn = _sub(params, f"{prefix}.ffn")
    if moe:
        y, aux, c_ffn = moe_forward(x2.reshape(B * T, D), p_ffn, bias, cfg, T)        # [N, D]
    else:
        y, c_ffn = swiglu_forward(x2.reshape(B * T, D), p_ffn["w1"], p_ffn["w2"], p_ffn["w3"])
        aux = 0.0
    out = a + y.reshape(B, T, D)                                                     # [B, T, D]
    return out, aux, BlockCache(c_n1, c_att, c_n2, c_ffn, moe, cfg.attn_type, (B, T, D))


def block_backward(dout: np.ndarray, cache: BlockCache, prefix: str, daux: float = 1.0):
    """[B, T, D] -> (dh [B, T, D], {full name: grad}) for one block."""
    from tinymoe.layers.moe import moe_backward
    c_n1, c_att, c_n2, c_ffn, moe, attn_type, (B, T, D) = cache
    grads: Dict[str, np.ndarray] = {}
    # 2. forward: out = a + FFN(norm(a))
    dy = dout.reshape(B * T, D)
    if moe:
        dx2, g_ffn = moe_backward(dy, c_ffn, daux)
    else:
        dx2, dw1, dw2, dw3 = swiglu_backward(dy, c_ffn)
        g_ffn = {"w1": dw1, "w2": dw2, "w3": dw3}
    grads.update({f"{prefix}.ffn.{k}": v for k, v in g_ffn.items()})
    dxa, grads[f"{prefix}.ffn_norm"] = rmsnorm_backward(dx2.reshape(B, T, D), c_n2)
    da = dout + dxa                                   # residual: both branches meet here
    # 1. forward: a = h + Attn(norm(h))
    _, attn_backward = _attn_fns(attn_type)
    dx1, g_att = attn_backward(da, c_att)
    grads.update({f"{prefix}.attn.{k}": v for k, v in g_att.items()})
    dxh, grads[f"{prefix}.attn_norm"] = rmsnorm_backward(dx1, c_n1)
    dh = da + dxh                                     # residual: both branches meet here
    return dh, grads


# ================================================================================================
# the model
# ================================================================================================

class ForwardCache(NamedTuple):
    tokens: np.ndarray           # [B, T]
    embed: object                # EmbeddingCache
    blocks: List[BlockCache]     # one per layer
    final_norm: object           # RMSNormCache [B, T, D]
    head: object                 # LinearCache of the output head (input [B, T, D], W [V, D])
    mtp: list                    # per depth: dict of caches (see _mtp_forward)
    aux_loss: float              # sum of the balance losses of every MoE block (already times alpha)
    moe_caches: Dict[str, object]  # bias name -> MoE cache (routing, loads) of that step


class Model:
    """A DeepSeek-V3-style model with parameters in one flat dict.

        model = Model(ModelConfig.preset("toy"), seed=0)
        logits = model.forward(tokens)                          # [B, T] int -> [B, T, V]
        logits, routing = model.forward(tokens, record_routing=True)
        loss, grads = model.loss_and_grads(tokens, targets)     # grads has the keys of .params
    """

    def __init__(self, config: ModelConfig, seed: int = 0, dtype=np.float32):
        config.validate()
        keep_freed_memory()          # reuse big temporaries instead of page-faulting them back
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype: {dtype} is not supported; use float32 or float64")
        self.config = config
        self.dtype = dtype
        self.params = init_params(config, np.random.default_rng(seed), dtype)
        self.buffers = {k: np.zeros(s, dtype=dtype) for k, s in buffer_shapes(config).items()}
        self.last_stats: dict = {}

    # ---------------------------------------------------------------------------------------
    @classmethod
    def from_params(cls, config: ModelConfig, params: Dict[str, np.ndarray],
                    buffers: Optional[Dict[str, np.ndarray]] = None, source: str = "params"):
        """Build a model from given arrays; every key and shape is checked against the config."""
        model = cls.__new__(cls)
        config.validate()
        keep_freed_memory()
        model.config = config
        expected = param_shapes(config)
        missing = sorted(set(expected) - set(params))
        unexpected = sorted(set(params) - set(expected))
        if missing:
            raise ValueError(f"{source}: missing parameter {missing[0]!r} "
                             f"({len(missing)} missing) for this config")
        if unexpected:
            raise ValueError(f"{source}: unexpected parameter {unexpected[0]!r} for this config")
        dtypes = {np.asarray(v).dtype for v in params.values()}
        if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
            raise TypeError(f"{source}: parameters must all be float32 or all float64, got {dtypes}")
        model.dtype = next(iter(dtypes))
        for k, shape in expected.items():
            if tuple(params[k].shape) != tuple(shape):
                raise ValueError(f"{source}: parameter {k!r} has shape {list(params[k].shape)}, "
                                 f"the config needs {list(shape)}")
        model.params = {k: np.array(params[k], dtype=model.dtype) for k in expected}
        for k, v in model.params.items():      # a NaN weight would only surface steps later
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{source}: parameter {k!r} has non-finite values (NaN or inf)")
        model.buffers = {}
        buffers = buffers or {}
        for k, shape in buffer_shapes(config).items():
            b = np.asarray(buffers.get(k, np.zeros(shape)), dtype=model.dtype)
            if b.shape != tuple(shape):
                raise ValueError(f"{source}: buffer {k!r} has shape {list(b.shape)}, "
                                 f"the config needs {list(shape)}")
            if not np.all(np.isfinite(b)):
                raise ValueError(f"{source}: buffer {k!r} has non-finite values (NaN or inf)")
            model.buffers[k] = b.copy()
        extra = sorted(set(buffers) - set(buffer_shapes(config)))
        if extra:
            raise ValueError(f"{source}: unexpected buffer {extra[0]!r} for this config")
        model.last_stats = {}
        return model

    def n_params(self) -> int:
        return int(sum(v.size for v in self.params.values()))

    # ---------------------------------------------------------------------------------------
    def _check_tokens(self, tokens, name="tokens") -> np.ndarray:
        check_tokens(name, tokens, self.config.vocab_size, ndim=2)
        if tokens.shape[0] < 1:
            raise ValueError(f"{name}: empty batch (shape {list(tokens.shape)})")
        if tokens.shape[1] < 1:
            raise ValueError(f"{name}: empty sequence (shape {list(tokens.shape)})")
        if tokens.shape[1] > self.config.max_seq_len:
            raise ValueError(f"{name}: sequence length {tokens.shape[1]} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        return tokens

    def forward_train(self, tokens: np.ndarray, mtp: bool = True):
        """[B, T] int -> (logits [B, T, V], mtp_logits: list of [B, T-k, V], cache).

        Runs every block keeping the caches the backward needs. `mtp=False` skips the MTP modules.
        """
        cfg, P = self.config, self.params
        self._check_tokens(tokens)
        threads.adapt()              # BLAS / numba thread count for this step (tinymoe/threads.py)
        B, T = tokens.shape
        # 1. embedding
        h, c_emb = embedding_forward(tokens, P["embed"])                            # [B, T, D]
        # 2. transformer blocks
        blocks, aux_total, moe_caches = [], 0.0, {}
        for l in range(cfg.n_layers):
            moe = cfg.is_moe_layer(l)
            bias_name = f"layers.{l}.ffn.gate.bias"
            h, aux, c = block_forward(h, P, f"layers.{l}", cfg, self.buffers.get(bias_name), moe)
            blocks.append(c)
            aux_total += aux
            if moe:
                moe_caches[bias_name] = c.ffn
        # 3. final norm and head
        hn, c_fn = rmsnorm_forward(h, P["norm"], cfg.norm_eps)                      # [B, T, D]
        logits, c_head = linear_forward(hn, P["head"])                              # [B, T, V]
        # 4. multi-token prediction depths
        mtp_logits, mtp_caches = [], []
        if mtp:
            h_prev = h
            for k in range(1, min(cfg.n_mtp_modules, T - 1) + 1):
                lg, h_prev, c_mtp, aux = self._mtp_forward(k, tokens, h_prev)
                mtp_logits.append(lg)
                mtp_caches.append(c_mtp)
                aux_total += aux
                moe_caches[f"mtp.{k - 1}.ffn.gate.bias"] = c_mtp["block"].ffn
        cache = ForwardCache(tokens, c_emb, blocks, c_fn, c_head, mtp_caches, aux_total, moe_caches)
        return logits, mtp_logits, cache

    def _mtp_forward(self, k: int, tokens: np.ndarray, h_prev: np.ndarray):
        """Depth k: h_prev [B, T-k+1, D] -> (logits [B, T-k, V], h_k [B, T-k, D], cache, aux)."""
        cfg, P = self.config, self.params
        pre = f"mtp.{k - 1}"
        T = tokens.shape[1]
        # BEGIN EXERCISE mtp
        # 1. embeddings of the tokens k ahead, and the previous depth's hidden states
        e, c_e = embedding_forward(tokens[:, k:], P["embed"])                       # [B, T-k, D]
        en, c_en = rmsnorm_forward(e, P[f"{pre}.enorm"], cfg.norm_eps)              # [B, T-k, D]
        hn, c_hn = rmsnorm_forward(h_prev[:, :T - k], P[f"{pre}.hnorm"], cfg.norm_eps)
        # 2. concatenate (embedding half first) and project
        cat = np.concatenate([en, hn], axis=-1)                                     # [B, T-k, 2D]
        x, c_eh = linear_forward(cat, P[f"{pre}.eh_proj"])                          # [B, T-k, D]
        # 3. one MoE transformer block
        hk, aux, c_blk = block_forward(x, P, pre, cfg, self.buffers[f"{pre}.ffn.gate.bias"], True)
        # 4. its own norm, then the shared head
        on, c_on = rmsnorm_forward(hk, P[f"{pre}.norm"], cfg.norm_eps)              # [B, T-k, D]
        logits, c_head = linear_forward(on, P["head"])                              # [B, T-k, V]
        cache = dict(emb=c_e, enorm=c_en, hnorm=c_hn, eh_proj=c_eh, block=c_blk, norm=c_on,
                     head=c_head, T_prev=h_prev.shape[1])
        return logits, hk, cache, aux
        # END EXERCISE

    def _mtp_backward(self, k: int, dlogits: np.ndarray, dhk: np.ndarray, cache: dict, grads: dict,
                      daux: float):
        """Reverse of _mtp_forward; returns d h_prev [B, T_prev, D] and adds into grads."""
        pre = f"mtp.{k - 1}"
        D = self.config.dim
        # BEGIN EXERCISE mtp
        # 4. forward: logits = on @ head.T ; on = norm(hk)
        don, dhead = linear_backward(dlogits, cache["head"])
        grads["head"] = grads["head"] + dhead         # the head is shared with the main model
        dhk_norm, grads[f"{pre}.norm"] = rmsnorm_backward(don, cache["norm"])
        dhk = dhk + dhk_norm                          # the next depth and this depth's head meet here
        # 3. forward: hk = Block(x)
        dx, g_blk = block_backward(dhk, cache["block"], pre, daux)
        grads.update(g_blk)
        # 2. forward: x = cat @ eh_proj.T
        dcat, grads[f"{pre}.eh_proj"] = linear_backward(dx, cache["eh_proj"])      # [B, T-k, 2D]
        # 1. forward: en = enorm(Emb(t[k:])) ; hn = hnorm(h_prev[:, :T-k])
        de, grads[f"{pre}.enorm"] = rmsnorm_backward(dcat[..., :D], cache["enorm"])
        dh_part, grads[f"{pre}.hnorm"] = rmsnorm_backward(dcat[..., D:], cache["hnorm"])
        grads["embed"] = grads["embed"] + embedding_backward(de, cache["emb"])   # shared embedding
        B, Tk, _ = dh_part.shape
        dh_prev = np.zeros((B, cache["T_prev"], D), dtype=dh_part.dtype)
        dh_prev[:, :Tk] = dh_part
        return dh_prev
        # END EXERCISE

    def backward(self, dlogits: np.ndarray, cache: ForwardCache,
                 dmtp_logits: Optional[list] = None, daux: float = 1.0) -> Dict[str, np.ndarray]:
        """dL/dlogits [B, T, V] (and dL/dmtp_logits) -> grads with exactly the keys of .params.

        `daux` scales the gradient of the balance losses (1.0 when they are part of the loss).
        """
        cfg, P = self.config, self.params
        grads: Dict[str, np.ndarray] = {}
        # 3. forward: logits = hn @ head.T ; hn = norm(h)
        dhn, grads["head"] = linear_backward(dlogits, cache.head)                   # [B, T, D]
        dh, grads["norm"] = rmsnorm_backward(dhn, cache.final_norm)
        grads["embed"] = np.zeros_like(P["embed"])
        # 4. forward: MTP depths, each reading the previous depth's hidden state
        if cache.mtp:
            dmtp_logits = dmtp_logits or [np.zeros(c["head"].x.shape[:2] + (cfg.vocab_size,),
                                                   dtype=dlogits.dtype) for c in cache.mtp]
            dh_next = None
            for k in range(len(cache.mtp), 0, -1):
                c = cache.mtp[k - 1]
                dhk = np.zeros_like(c["head"].x) if dh_next is None else dh_next
                dh_next = self._mtp_backward(k, dmtp_logits[k - 1], dhk, c, grads, daux)
            dh = dh + dh_next                     # the main stack's last hidden feeds MTP depth 1
        for k in range(cfg.n_mtp_modules):        # depths that did not run (T too short) get zeros
            for name in param_shapes(cfg):
                if name.startswith(f"mtp.{k}.") and name not in grads:
                    grads[name] = np.zeros_like(P[name])
        # 2. forward: h = Block_l(h) for each layer, in reverse
        for l in range(cfg.n_layers - 1, -1, -1):
            dh, g = block_backward(dh, cache.blocks[l], f"layers.{l}", daux)
            grads.update(g)
        # 1. forward: h = embed[tokens]
        grads["embed"] = grads["embed"] + embedding_backward(dh, cache.embed)
        return grads

    # ---------------------------------------------------------------------------------------
    def forward(self, tokens: np.ndarray, record_routing: bool = False):
        """[B, T] int -> logits [B, T, V]; with record_routing also {layer: routing dict}.

        The routing of MoE layer l holds "indices" [N, K] (best first), "weights" [N, K] and
        "scores" [N, E] (the unbiased affinities), N = B*T.
        """
        logits, _, cache = self.forward_train(tokens, mtp=False)
        if not record_routing:
            return logits
        routing = {}
        for l in range(self.config.n_layers):
            if self.config.is_moe_layer(l):
                c = cache.blocks[l].ffn
                routing[l] = {"indices": c.indices, "weights": c.weights, "scores": c.scores}
        return logits, routing

    def loss_and_grads(self, tokens: np.ndarray, targets: np.ndarray):
        """[B, T] tokens and targets (-100 = ignored) -> (loss, grads with the keys of .params).

        loss = CE(main) + (mtp_lambda / n_mtp) * sum_k CE(mtp depth k) + balance losses.
        The terms and the per-layer expert loads of this step are left in `self.last_stats`.
        """
        cfg = self.config
        self._check_tokens(tokens)
        if not isinstance(targets, np.ndarray) or not np.issubdtype(targets.dtype, np.integer):
            raise TypeError("targets: expected an integer numpy array")
        check_shape("targets", targets, tokens.shape)
        B, T = tokens.shape
        logits, mtp_logits, cache = self.forward_train(tokens)
        V = cfg.vocab_size
        # main next-token loss
        ce, c_ce = cross_entropy_forward(logits.reshape(B * T, V), targets.reshape(B * T))
        dlogits = cross_entropy_backward(1.0, c_ce).reshape(B, T, V)
        # MTP losses: depth k predicts targets[:, k:] (the token k+1 ahead of each input)
        mtp_terms, dmtp = [], []
        if mtp_logits:
            w = cfg.mtp_lambda / cfg.n_mtp_modules
            for k, lg in enumerate(mtp_logits, start=1):
                tk = targets[:, k:].reshape(-1)
                lk, c_k = cross_entropy_forward(lg.reshape(-1, V), tk)
                mtp_terms.append(lk)
                dmtp.append(cross_entropy_backward(w, c_k).reshape(lg.shape))
            mtp_loss = w * sum(mtp_terms)
        else:
            mtp_loss = 0.0
        loss = ce + mtp_loss + cache.aux_loss
        grads = self.backward(dlogits, cache, dmtp, daux=1.0)
        self.last_stats = {
            "loss": loss, "ce": ce, "mtp": mtp_terms, "mtp_loss": mtp_loss, "aux": cache.aux_loss,
            "loads": {k: c.load for k, c in cache.moe_caches.items()},
            "dropped": {k: int(c.dropped) for k, c in cache.moe_caches.items()},
        }
        return loss, grads

    # ---------------------------------------------------------------------------------------
    def update_router_biases(self, loads: Dict[str, np.ndarray], gamma: float) -> None:
        """Auxiliary-loss-free balancing (V3 2.1.2): b += gamma * sign(mean(load) - load), per layer."""
        from tinymoe.layers.moe import update_bias
        if gamma == 0:
            return
        for name, load in loads.items():
            self.buffers[name] = update_bias(self.buffers[name], load, gamma).astype(self.dtype)

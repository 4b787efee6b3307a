"""ModelConfig: every size and switch of a DeepSeek-style model, with DeepSeek's own field names.

The field names are those of `ModelArgs` in DeepSeek-V3's official `inference/model.py`, so a
student can read the real code next to this one. Fields that the official code does not have
(balancing, MTP, baseline attention, initialisation) are added after them and marked as ours.
Hugging Face names (`hidden_size`, `first_k_dense_replace`, ...) live only in `tinymoe/hf.py`.

    cfg = ModelConfig.preset("toy")                 # small enough for tests and lessons
    cfg = ModelConfig.preset("toy", n_layers=2)     # any field can be overridden
    cfg.validate()                                  # ValueError naming field, value and rule

Shape letters used across the package: D dim, H n_heads, Dn qk_nope_head_dim, Dr qk_rope_head_dim,
Dv v_head_dim, Dq q_lora_rank, Dc kv_lora_rank, E n_routed_experts, K n_activated_experts,
G n_expert_groups, F moe_inter_dim, V vocab_size.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Optional

SCORE_FUNCS = ("softmax", "sigmoid")
ATTN_TYPES = ("mla", "mha", "gqa", "mqa")


def _is_number(v: Any) -> bool:
    """A finite int or float, and not a bool (True would otherwise pass as 1)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

# Values past these are not a model but an overflow: the forward would turn them into silent
# zeros or infs (an inf mean square makes RMSNorm's scale 0), so validate() refuses them.
UPPER_BOUNDS = {
    "norm_eps": (1.0, "eps only guards mean(x^2) against 0; a large eps zeroes the normalised rows"),
    "latent_norm_eps": (1.0, "eps only guards mean(x^2) against 0; a large eps zeroes the "
                             "normalised rows"),
    "init_std": (1.0, "the std of the initial weights; larger ones overflow the activations"),
    "route_scale": (100.0, "a multiplier on gate weights in [0, 1]; V3 uses 2.5, V2 16"),
    "bias_update_speed": (1.0, "gamma moves biases compared with affinities in [0, 1]; V3 uses 0.001"),
}


@dataclass
class ModelConfig:
    # ---- sizes (official ModelArgs names) -------------------------------------------------
    vocab_size: int = 64            # V: vocabulary size
    dim: int = 32                   # D: model width (hidden size)
    inter_dim: int = 64             # width of the dense SwiGLU FFN in the first n_dense_layers
    moe_inter_dim: int = 16         # F: width of one routed expert (and per shared expert)
    n_layers: int = 3               # transformer blocks (MTP modules not counted)
    n_dense_layers: int = 1         # blocks 0..n_dense_layers-1 use a dense FFN, the rest MoE
    n_heads: int = 4                # H: attention heads
    max_seq_len: int = 64           # longest sequence (training and KV cache); YaRN is on iff > original_seq_len
    # ---- DeepSeekMoE ----------------------------------------------------------------------
    n_routed_experts: int = 8       # E: routed (fine-grained) experts per MoE layer
    n_shared_experts: int = 1       # always-on experts, fused into one SwiGLU of width n_shared*F
    n_activated_experts: int = 2    # K: routed experts chosen per token (top-k)
    n_expert_groups: int = 1        # G: expert groups for group-limited (node/device-limited) routing
    n_limited_groups: int = 1       # groups a token may draw its K experts from
    score_func: str = "sigmoid"     # "sigmoid" (V3) or "softmax" (V2) router affinities
    route_scale: float = 1.0        # multiplier on the routed gate weights (V3 2.5, V2 16)
    # ---- MLA ------------------------------------------------------------------------------
    q_lora_rank: int = 16           # Dq: query compression rank; 0 = no compression (one wq)
    kv_lora_rank: int = 8           # Dc: width of the compressed KV latent (what the cache stores)
    qk_nope_head_dim: int = 8       # Dn: per-head query/key width without rotary embedding
    qk_rope_head_dim: int = 4       # Dr: per-head query/key width that gets RoPE (key shared by heads)
    v_head_dim: int = 8             # Dv: per-head value width
    # ---- RoPE / YaRN ----------------------------------------------------------------------
    original_seq_len: int = 4096    # context length before YaRN extension
    rope_theta: float = 10000.0     # RoPE base theta
    rope_factor: float = 40.0       # YaRN scale s (used only when YaRN is on)
    beta_fast: int = 32             # YaRN ramp: rotations above which frequencies are kept
    beta_slow: int = 1              # YaRN ramp: rotations below which frequencies are divided by s
    mscale: float = 1.0             # YaRN softmax-scale factor a in m = 0.1*a*ln(s) + 1 (V2: 0.707)
    # ---- ours: norms and router details -----------------------------------------------------
    norm_eps: float = 1e-6          # eps of the block and final RMSNorms (official code hard-codes 1e-6)
    latent_norm_eps: float = 1e-6   # eps of MLA's q_norm and kv_norm (HF keeps 1e-6 whatever rms_norm_eps is)
    norm_topk_prob: Optional[bool] = None  # renormalise the K chosen weights; None = as official (iff sigmoid)
    # ---- ours: load balancing (reference/deepseek.md section 11) -----------------------------
    bias_update_speed: float = 0.0  # gamma of the auxiliary-loss-free bias update (V3: 0.001); 0 = off
    aux_loss_alpha: float = 0.0     # alpha of the expert-level balance loss (V2 / DeepSeekMoE); 0 = off
    seq_aux_loss_alpha: float = 0.0 # alpha of V3's complementary sequence-wise balance loss; 0 = off
    z_loss_alpha: float = 0.0       # router z-loss weight (mean squared logsumexp of router logits); 0 = off
    capacity_factor: Optional[float] = None  # per-expert capacity = ceil(cf * N * K / E); None = dropless
    # ---- ours: multi-token prediction (V3 section 2.2) ---------------------------------------
    n_mtp_modules: int = 0          # sequential MTP depths (V3 ships 1)
    mtp_lambda: float = 0.3         # weight of the averaged MTP loss (V3: 0.3, later 0.1)
    # ---- ours: baseline attention for comparisons ----------------------------------------------
    attn_type: str = "mla"          # "mla" (DeepSeek) or the baselines "mha", "gqa", "mqa"
    n_kv_heads: int = 0             # kv heads for "gqa" (0 = n_heads); "mha" uses n_heads, "mqa" 1
    # ---- ours: initialisation ---------------------------------------------------------------
    init_std: float = 0.02          # std of the normal init of every linear and embedding weight

    # ------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Dn + Dr: the per-head query/key width that sets the softmax scale."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        """YaRN is active iff max_seq_len > original_seq_len (the official code's rule)."""
        return self.max_seq_len > self.original_seq_len

    @property
    def renormalize(self) -> bool:
        """Whether the K chosen gate weights are renormalised (official: iff sigmoid)."""
        if self.norm_topk_prob is None:
            return self.score_func == "sigmoid"
        return bool(self.norm_topk_prob)

    @property
    def kv_heads(self) -> int:
        """Key/value heads of the baseline attention (MLA shares one latent across all heads)."""
        if self.attn_type == "mqa":
            return 1
        if self.attn_type == "gqa" and self.n_kv_heads:
            return self.n_kv_heads
        return self.n_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Blocks n_dense_layers..n_layers-1 (and every MTP block) use DeepSeekMoE."""
        return layer >= self.n_dense_layers

    # ------------------------------------------------------------------------------------------
    def validate(self) -> "ModelConfig":
        """Raise ValueError naming the field, its value and the rule it breaks; return self."""

        def fail(name: str, rule: str) -> None:
            raise ValueError(f"ModelConfig.{name} = {getattr(self, name)!r}: {rule}")

        positive = ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                    "max_seq_len", "n_routed_experts", "n_activated_experts", "n_expert_groups",
                    "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim", "original_seq_len")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                fail(name, "must be a positive integer")
        for name in ("n_dense_layers", "n_shared_experts", "q_lora_rank", "n_mtp_modules",
                     "n_kv_heads"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                fail(name, "must be a non-negative integer")
        for name in ("rope_theta", "rope_factor", "norm_eps", "latent_norm_eps", "route_scale",
                     "init_std"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                fail(name, "must be a positive finite number")
        for name in ("bias_update_speed", "aux_loss_alpha", "seq_aux_loss_alpha", "z_loss_alpha",
                     "mtp_lambda", "mscale"):
            v = getattr(self, name)
            if not _is_number(v) or v < 0:
                fail(name, "must be a non-negative finite number")
        for name, (most, why) in UPPER_BOUNDS.items():
            if getattr(self, name) > most:
                fail(name, f"must be <= {most:g} ({why})")
        for name in ("beta_fast", "beta_slow"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                fail(name, "must be a positive finite number (YaRN ramp bound, in rotations)")
        if self.beta_fast <= self.beta_slow:
            fail("beta_fast", f"must be > beta_slow = {self.beta_slow} (YaRN ramp bounds)")
        if self.n_dense_layers > self.n_layers:
            fail("n_dense_layers", f"must be <= n_layers = {self.n_layers}")
        if self.score_func not in SCORE_FUNCS:
            fail("score_func", f"must be one of {SCORE_FUNCS}")
        if self.attn_type not in ATTN_TYPES:
            fail("attn_type", f"must be one of {ATTN_TYPES}")
        if self.qk_rope_head_dim % 2:
            fail("qk_rope_head_dim", "must be even (RoPE rotates pairs of values)")
        if self.n_activated_experts > self.n_routed_experts:
            fail("n_activated_experts", f"must be <= n_routed_experts = {self.n_routed_experts}")
        if self.n_routed_experts % self.n_expert_groups:
            fail("n_expert_groups", f"must divide n_routed_experts = {self.n_routed_experts}")
        if self.n_limited_groups > self.n_expert_groups:
            fail("n_limited_groups", f"must be <= n_expert_groups = {self.n_expert_groups}")
        allowed = self.n_limited_groups * (self.n_routed_experts // self.n_expert_groups)
        if self.n_activated_experts > allowed:
            fail("n_activated_experts",
                 f"must be <= the experts reachable under the group limit, n_limited_groups * "
                 f"n_routed_experts / n_expert_groups = {allowed}")
        if self.n_expert_groups > 1 and self.score_func == "sigmoid" and \
                self.n_routed_experts // self.n_expert_groups < 2:
            fail("n_expert_groups", "sigmoid group scores sum the top-2 experts of a group, so "
                 "every group needs >= 2 experts")
        if self.capacity_factor is not None and not (
                _is_number(self.capacity_factor) and self.capacity_factor > 0):
            fail("capacity_factor", "must be None (dropless) or a positive finite number")
        if self.attn_type == "gqa":
            kv = self.n_kv_heads or self.n_heads
            if self.n_heads % kv:
                fail("n_kv_heads", f"must divide n_heads = {self.n_heads}")
        if self.norm_topk_prob is not None and not isinstance(self.norm_topk_prob, bool):
            fail("norm_topk_prob", "must be None, True or False")
        return self

    # ------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed, validated."""
        return dataclasses.replace(self, **changes).validate()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}")
        return cls(**d).validate()

    @classmethod
    def from_json(cls, s: str) -> "ModelConfig":
        return cls.from_dict(json.loads(s))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        """A named configuration, optionally with fields overridden; always validated.

        toy              tests and lessons: every code path at a few thousand parameters
        bench            the benchmark shape (python -m tinymoe.bench)
        deepseek-v2-lite published shapes, for accounting only (never instantiated with weights)
        deepseek-v2
        deepseek-v3
        """
        if name not in PRESETS:
            raise ValueError(f"preset name {name!r}: must be one of {sorted(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update(overrides)
        return cls.from_dict(fields)


def parse_overrides(items) -> dict:
    """["FIELD=VALUE", ...] (command-line --set flags, VALUE as JSON or None) -> {field: value}."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    out = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        key, value = item.split("=", 1)
        if key not in fields:
            raise ValueError(f"--set {key}: not a ModelConfig field")
        try:
            out[key] = None if value in ("None", "none", "null") else json.loads(value)
        except json.JSONDecodeError:
            out[key] = value            # a bare string such as score_func=softmax
    return out


PRESETS: dict[str, dict[str, Any]] = {
    # reference/deepseek.md section 1, "toy" column: each group holds >= 2 experts.
    "toy": dict(vocab_size=64, dim=32, inter_dim=64, moe_inter_dim=16, n_layers=3,
                n_dense_layers=1, n_heads=4, max_seq_len=64, n_routed_experts=8,
                n_shared_experts=1, n_activated_experts=2, n_expert_groups=4, n_limited_groups=2,
                score_func="sigmoid", route_scale=2.5, q_lora_rank=16, kv_lora_rank=8,
                qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8),
    "bench": dict(vocab_size=256, dim=128, inter_dim=256, moe_inter_dim=64, n_layers=4,
                  n_dense_layers=1, n_heads=8, max_seq_len=4096, n_routed_experts=16,
                  n_shared_experts=1, n_activated_experts=2, n_expert_groups=2,
                  n_limited_groups=1, score_func="sigmoid", route_scale=2.5, q_lora_rank=96,
                  kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16),
    # Published shapes: reference/deepseek.md section 1 ([OFF-cfg], [HUB-cfg]).
    "deepseek-v2-lite": dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408,
                             n_layers=27, n_dense_layers=1, n_heads=16, max_seq_len=163840,
                             n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
                             n_expert_groups=1, n_limited_groups=1, score_func="softmax",
                             route_scale=1.0, q_lora_rank=0, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             rope_factor=40.0, mscale=0.707),
    "deepseek-v2": dict(vocab_size=102400, dim=5120, inter_dim=12288, moe_inter_dim=1536,
                        n_layers=60, n_dense_layers=1, n_heads=128, max_seq_len=163840,
                        n_routed_experts=160, n_shared_experts=2, n_activated_experts=6,
                        n_expert_groups=8, n_limited_groups=3, score_func="softmax",
                        route_scale=16.0, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        rope_factor=40.0, mscale=0.707),
    "deepseek-v3": dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048,
                        n_layers=61, n_dense_layers=3, n_heads=128, max_seq_len=163840,
                        n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
                        n_expert_groups=8, n_limited_groups=4, score_func="sigmoid",
                        route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        rope_factor=40.0, mscale=1.0, n_mtp_modules=1,
                        bias_update_speed=0.001, seq_aux_loss_alpha=0.0001),
}

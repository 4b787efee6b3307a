"""Regenerate tests/fixtures/hf/: tiny DeepSeek-V3 checkpoints and reference outputs from transformers.

torch and transformers are tools for THIS script only (never dependencies of tinymoe or of its
tests). Run it with a separate environment:

    python3 -m venv /work/refenv
    /work/refenv/bin/pip install torch==2.13.0 transformers safetensors numpy
    /work/refenv/bin/python scripts/make_hf_fixtures.py [--out tests/fixtures/hf]

It does not import tinymoe: the references come from transformers alone. For every case it writes
    <out>/<case>/config.json, model.safetensors   written by transformers' save_pretrained (then,
                                                  for some cases, edited as described in CASES)
    <out>/<case>/reference.npz                    (np.savez, allow_pickle=False to read):
        input_ids [B, T] int64, logits [B, T, V] float32, loss float32 (mean next-token CE,
        transformers' labels=input_ids), routing.{l} [B*T, K] int64 chosen experts of MoE layer l
        (sorted per token, from transformers' own router), grad.{checkpoint name} float32 (torch
        autograd of the loss, per-expert names as in the file), and version strings.
        mtp_logits.1 [B, T-1, V] float32 (case with an MTP layer only): the MTP layer's logits,
        computed in torch with transformers' own modules as DeepSeek's serving engines read the
        released weights (vLLM deepseek_mtp.py, DeepSeekMultiTokenPredictorLayer.forward):
        eh_proj(cat([enorm(Emb(t_{i+1})), hnorm(h_i)])) (embedding FIRST), then the layer's decoder
        block, shared_head.norm and lm_head; h_i = the last main layer's output before model.norm.
        (transformers itself never runs MTP layers, and vLLM's position-0 mask is a serving detail
        left out: position i sees token i+1, as in the V3 paper's eq. 21-22.)
The references are computed from the checkpoint as transformers reloads it from disk (float32,
eager attention), after checking that transformers reports no missing keys and no unexpected keys
except the MTP layer that one case adds on purpose.

Weights are re-drawn so that logits are of order 1 and the router's selection bias
(e_score_correction_bias) is nonzero with both signs; inputs are re-drawn until every MoE layer's
group choice and top-k choice have a margin >= MARGIN in the biased scores, so float rounding cannot
flip a selection, and until the bias changes at least one token's experts (so confusing selection
scores with gate weights fails the tests).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

MARGIN = 2e-3
B, T = 2, 8

BASE = dict(vocab_size=48, hidden_size=16, intermediate_size=32, moe_intermediate_size=8,
            num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=2,
            num_key_value_heads=2, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            n_group=4, topk_group=2, routed_scaling_factor=2.5, norm_topk_prob=True,
            q_lora_rank=8, kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4,
            max_position_embeddings=32, rms_norm_eps=1e-6, rope_interleave=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            num_nextn_predict_layers=0, tie_word_embeddings=False)

CASES = {
    # q_lora set, group-limited routing (4 groups of 2, keep 2), renormalised gate weights,
    # rms_norm_eps != 1e-6 (the MLA norms keep 1e-6), interleaved rope rows.
    "qlora_groups": dict(rms_norm_eps=1e-5, seed=1),
    # q_lora null (one q_proj), rope_interleave false (rope rows stored half-split), no
    # renormalisation, scale 1.5, K=3 from 2 groups of 4 keeping 1, two dense layers of four.
    "noqlora_halfsplit": dict(q_lora_rank=None, rope_interleave=False, norm_topk_prob=False,
                              routed_scaling_factor=1.5, num_experts_per_tok=3, n_group=2,
                              topk_group=1, num_hidden_layers=4, first_k_dense_replace=2,
                              qk_nope_head_dim=6, v_head_dim=6, seed=2),
    # YaRN written the old way (rope_theta + rope_scaling with "type"), as DeepSeek's own
    # config.json does, with mscale == mscale_all_dim = 0.707 (V2 style) and Dr = 8 so the ramp
    # has interior slots; n_group 1; Hub-style scoring_func / topk_method keys.
    "yarn_legacy": dict(qk_rope_head_dim=8, max_position_embeddings=256, n_group=1, topk_group=1,
                        rope_parameters={"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0,
                                         "original_max_position_embeddings": 64, "beta_fast": 32,
                                         "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
                        legacy_rope=True, seed=3),
    # a bfloat16 checkpoint (tinymoe converts to float32) with one MTP layer (layer index
    # num_hidden_layers, num_nextn_predict_layers 1) that transformers ignores: tinymoe must report
    # its keys, or load them with mtp=True. 2 groups of 4 keeping 1.
    "bf16_mtp": dict(n_group=2, topk_group=1, bf16=True, mtp=True, seed=4),
    # rope_interleave false with Dr = 8, where P = [0, 2, 4, 6, 1, 3, 5, 7] is NOT its own inverse
    # (with Dr = 4 it is, so loading with P instead of P^-1 or writing gradients interleaved would
    # pass noqlora_halfsplit); q_lora set so the rope rows of q_b_proj are the permuted ones.
    "qlora_halfsplit_dr8": dict(rope_interleave=False, qk_rope_head_dim=8, n_group=2, topk_group=1,
                                seed=5),
}


def init_weights(model: DeepseekV3ForCausalLM, g: torch.Generator) -> None:
    """Weights for logits of order 1: N(0, 1/fan_in) linears, N(0,1) embedding, norms near 1."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * (2.0 / p.shape[-1] ** 0.5))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                v = (torch.rand(b.shape, generator=g) - 0.5) * 0.6        # in [-0.3, 0.3]
                v[0], v[1] = -abs(v[0]) - 0.05, abs(v[1]) + 0.05        # both signs for sure
                b.copy_(v)


@torch.no_grad()
def router_check(model, ids) -> tuple[float, bool]:
    """(smallest selection margin over MoE layers, whether the bias changes some token's experts)."""
    inputs = {}
    hooks = []
    for l, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "gate"):
            hooks.append(layer.mlp.gate.register_forward_hook(
                lambda m, i, o, l=l: inputs.__setitem__(l, i[0].detach())))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    margin, changed = np.inf, False
    cfg = model.config
    E, K, G, Gk = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    for l, x in inputs.items():
        gate = model.model.layers[l].mlp.gate
        x = x.reshape(-1, x.shape[-1]).double()
        s = torch.sigmoid(x @ gate.weight.double().T)                              # [N, E]
        sel = s + gate.e_score_correction_bias.double()

        def choose(v):
            """Group-limited top-k on scores v [N, E]: (sorted indices [N, K], margin)."""
            m = np.inf
            gs = v.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1)                   # [N, G]
            if Gk < G:
                gsort = gs.sort(dim=-1, descending=True)[0]
                m = float((gsort[:, Gk - 1] - gsort[:, Gk]).min())
            keep = torch.zeros_like(gs).scatter_(1, gs.topk(Gk, dim=-1)[1], 1.0)
            mask = keep.repeat_interleave(E // G, dim=1).bool()
            masked = v.masked_fill(~mask, float("-inf"))
            srt = masked.sort(dim=-1, descending=True)[0]
            if K < Gk * (E // G):
                m = min(m, float((srt[:, K - 1] - srt[:, K]).min()))
            return masked.topk(K, dim=-1)[1].sort(-1)[0], m

        biased, m = choose(sel)
        plain, _ = choose(s)
        margin = min(margin, m)
        changed |= bool((biased != plain).any())
    return margin, changed


def fused_to_checkpoint(name: str, t: torch.Tensor, F: int) -> dict:
    """transformers v5 in-memory names -> checkpoint names (split fused experts per expert)."""
    if name.endswith("mlp.experts.gate_up_proj"):
        pre = name[: -len("gate_up_proj")]
        out = {}
        for e in range(t.shape[0]):
            out[f"{pre}{e}.gate_proj.weight"] = t[e, :F]
            out[f"{pre}{e}.up_proj.weight"] = t[e, F:]
        return out
    if name.endswith("mlp.experts.down_proj"):
        pre = name[: -len("down_proj")]
        return {f"{pre}{e}.down_proj.weight": t[e] for e in range(t.shape[0])}
    return {name: t}


def add_mtp_layer(path: str, cfg: DeepseekV3Config, g: torch.Generator) -> list:
    """Append a DeepSeek-style MTP layer (index num_hidden_layers) to the checkpoint file."""
    f = os.path.join(path, "model.safetensors")
    sd = load_file(f)
    L = cfg.num_hidden_layers
    src = f"model.layers.{L - 1}."
    dst = f"model.layers.{L}."
    added = []
    for k, v in list(sd.items()):
        if k.startswith(src):
            nk = dst + k[len(src):]
            if k.endswith("e_score_correction_bias"):
                nv = (torch.rand(v.shape, generator=g) - 0.5) * 0.6
            elif v.ndim == 1:
                nv = 1.0 + 0.2 * torch.randn(v.shape, generator=g)
            else:
                nv = torch.randn(v.shape, generator=g) / v.shape[-1] ** 0.5
            sd[nk] = nv.to(v.dtype)
            added.append(nk)
    D = cfg.hidden_size
    dt = sd["lm_head.weight"].dtype
    extra = {"enorm.weight": 1.0 + 0.2 * torch.randn(D, generator=g),
             "hnorm.weight": 1.0 + 0.2 * torch.randn(D, generator=g),
             "eh_proj.weight": torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5,
             "shared_head.norm.weight": 1.0 + 0.2 * torch.randn(D, generator=g),
             "embed_tokens.weight": sd["model.embed_tokens.weight"].clone(),
             "shared_head.head.weight": sd["lm_head.weight"].clone()}
    for k, v in extra.items():
        sd[dst + k] = v.to(dt)
        added.append(dst + k)
    save_file(sd, f, metadata={"format": "pt"})
    return sorted(added)


@torch.no_grad()
def mtp_reference(path: str, ref, ids: torch.Tensor, cfg: DeepseekV3Config) -> tuple:
    """(MTP depth-1 logits [B, T-1, V], router margin) in the order the serving engines use.

    The MTP layer's decoder block is loaded by transformers itself: the same directory read as a
    model with num_hidden_layers + 1 layers (layer L = the MTP layer's block keys).
    """
    L = cfg.num_hidden_layers
    big = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager",
                                               num_hidden_layers=L + 1).eval()
    sd = load_file(os.path.join(path, "model.safetensors"))
    w = {k[len(f"model.layers.{L}."):]: v.float() for k, v in sd.items()
         if k.startswith(f"model.layers.{L}.")}
    captured = {}
    hook = ref.model.layers[L - 1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    ref(input_ids=ids)
    hook.remove()
    h = captured["h"]                                                   # [B, T, D] before model.norm

    def rms(x, weight):                                                 # DeepseekV3RMSNorm, float32
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps))

    emb = ref.model.embed_tokens(ids[:, 1:])                            # Emb(t_{i+1}) [B, T-1, D]
    cat = torch.cat([rms(emb, w["enorm.weight"]), rms(h[:, :-1], w["hnorm.weight"])], dim=-1)
    x = cat @ w["eh_proj.weight"].T                                     # [B, T-1, D]
    gate_in = {}
    block = big.model.layers[L]
    ghook = block.mlp.gate.register_forward_hook(lambda m, i, o: gate_in.__setitem__("x", i[0]))
    big.model.layers = torch.nn.ModuleList([block])                     # run the MTP block alone
    big.config.num_hidden_layers = 1
    big.model.norm.weight.copy_(w["shared_head.norm.weight"])
    out = big.model(inputs_embeds=x, use_cache=False).last_hidden_state  # shared_head.norm(Block(x))
    ghook.remove()
    logits = out @ w["shared_head.head.weight"].T
    # selection margin of the MTP block's router (the same rule as router_check)
    E, K, G, Gk = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
    u = gate_in["x"].reshape(-1, cfg.hidden_size).double()
    sel = torch.sigmoid(u @ block.mlp.gate.weight.double().T) + block.mlp.gate.e_score_correction_bias.double()
    gs = sel.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1).sort(dim=-1, descending=True)[0]
    margin = float((gs[:, Gk - 1] - gs[:, Gk]).min()) if Gk < G else np.inf
    keep = torch.zeros_like(gs).scatter_(
        1, sel.view(-1, G, E // G).topk(2, dim=-1)[0].sum(-1).topk(Gk, dim=-1)[1], 1.0)
    masked = sel.masked_fill(~keep.repeat_interleave(E // G, dim=1).bool(), float("-inf"))
    srt = masked.sort(dim=-1, descending=True)[0]
    margin = min(margin, float((srt[:, K - 1] - srt[:, K]).min()))
    return logits.float(), margin


def make_case(name: str, spec: dict, out: str) -> dict:
    spec = dict(spec)
    seed = spec.pop("seed")
    legacy, bf16, mtp = spec.pop("legacy_rope", False), spec.pop("bf16", False), spec.pop("mtp", False)
    kw = dict(BASE)
    kw.update(spec)
    if mtp:
        kw["num_nextn_predict_layers"] = 1
    cfg = DeepseekV3Config(**kw)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).float().eval()
    init_weights(model, g)
    path = os.path.join(out, name)
    shutil.rmtree(path, ignore_errors=True)
    (model.to(torch.bfloat16) if bf16 else model).save_pretrained(path)
    if legacy:            # rewrite RoPE the old way: rope_theta + rope_scaling {"type": ...}
        with open(os.path.join(path, "config.json")) as f:
            c = json.load(f)
        rp = dict(c.pop("rope_parameters"))
        c["rope_theta"] = rp.pop("rope_theta")
        rp["type"] = rp.pop("rope_type")
        c["rope_scaling"] = rp
        c["scoring_func"], c["topk_method"] = "sigmoid", "noaux_tc"
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
    added = add_mtp_layer(path, cfg, g) if mtp else []
    gen = os.path.join(path, "generation_config.json")
    if os.path.exists(gen):
        os.remove(gen)                          # not needed to load the model

    ref, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                     attn_implementation="eager",
                                                     output_loading_info=True)
    ref.eval()
    assert not info["missing_keys"], info["missing_keys"]
    # transformers names unexpected keys after its own renaming (fused experts): compare prefixes
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    assert all(k.startswith(prefix) for k in info["unexpected_keys"]), info["unexpected_keys"]
    assert bool(info["unexpected_keys"]) == bool(added), info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info["mismatched_keys"]
    if legacy:
        rp = ref.config.rope_parameters
        assert rp["rope_type"] == "yarn" and rp["rope_theta"] == 100.0, rp
        assert abs(ref.model.rotary_emb.attention_scaling - 1.0) < 1e-12

    rng = np.random.default_rng(seed)
    for attempt in range(500):
        ids = torch.tensor(rng.integers(0, cfg.vocab_size, (B, T)), dtype=torch.long)
        margin, changed = router_check(ref, ids)
        if margin >= MARGIN and changed:
            break
    else:
        raise RuntimeError(f"{name}: no input with selection margin >= {MARGIN}")

    # routing straight from transformers' router (its own top-k), via hooks
    routing = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda m, i, o, l=l: routing.__setitem__(l, o[2].detach().sort(-1)[0].numpy()))
        for l, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "gate")]
    ref.zero_grad()
    res = ref(input_ids=ids, labels=ids)
    res.loss.backward()
    for h in hooks:
        h.remove()
    F = cfg.moe_intermediate_size
    grads = {}
    for pname, p in ref.named_parameters():
        assert p.grad is not None, pname
        grads.update(fused_to_checkpoint(pname, p.grad.detach(), F))
    file_keys = set(load_file(os.path.join(path, "model.safetensors")))
    grad_keys = set(grads)
    main_keys = {k for k in file_keys if k not in added and not k.endswith("e_score_correction_bias")}
    assert grad_keys == main_keys, sorted(grad_keys ^ main_keys)[:5]

    arrays = {"input_ids": ids.numpy().astype(np.int64),
              "logits": res.logits.detach().numpy().astype(np.float32),
              "loss": np.float32(res.loss.item()),
              "transformers_version": np.array(transformers.__version__),
              "torch_version": np.array(torch.__version__),
              "mtp_keys": np.array(added if added else [""])}
    arrays.update({f"routing.{l}": r.astype(np.int64) for l, r in routing.items()})
    arrays.update({f"grad.{k}": v.numpy().astype(np.float32) for k, v in grads.items()})
    result = {"case": name, "margin": margin, "loss": float(res.loss),
              "logit_absmax": float(res.logits.abs().max()), "mtp_keys": len(added)}
    if added:
        mtp_logits, mtp_margin = mtp_reference(path, ref, ids, cfg)
        if mtp_margin < MARGIN:
            raise RuntimeError(f"{name}: MTP router selection margin {mtp_margin:.3g} < {MARGIN}")
        arrays["mtp_logits.1"] = mtp_logits.numpy().astype(np.float32)
        result.update(mtp_margin=mtp_margin, mtp_logit_absmax=float(mtp_logits.abs().max()))
    np.savez_compressed(os.path.join(path, "reference.npz"), **arrays)
    return result


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "hf"))
    ap.add_argument("--case", action="append", choices=sorted(CASES),
                    help="regenerate only this case (repeatable; default: all)")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)
    for name, spec in CASES.items():
        if args.case is None or name in args.case:
            print(make_case(name, spec, args.out))
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(args.out) for f in fs)
    print(f"fixtures: {total / 1e6:.2f} MB under {os.path.abspath(args.out)} "
          f"(transformers {transformers.__version__}, torch {torch.__version__})")


if __name__ == "__main__":
    main()

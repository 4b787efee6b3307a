"""Train toy models with `python -m tinymoe.train`, save them with tinymoe.hf, load them in transformers.

The direction the test suite cannot check (it never imports torch or transformers). Run it with the
reference environment that has torch + transformers (see scripts/make_hf_fixtures.py):

    /work/refenv/bin/python scripts/check_hf_roundtrip.py [--steps 40] [--python python3]

For each run it: trains with the main environment's python (`--python`, which has numba), loads the
final tinymoe checkpoint, writes a Hugging Face directory with save_pretrained, loads it with
transformers.AutoModelForCausalLM.from_pretrained (float32, eager attention) and compares, on
held-out random tokens: logits (max abs), the experts chosen in every MoE layer, the mean next-token
loss and every gradient (max |diff| / max |grad| per tensor, worst tensor reported). It also checks
that transformers reported no missing / unexpected / mismatched keys and logged no warning, and
that the directory loaded back into tinymoe gives, with to_hf_state_dict's DEFAULT layout (the
file's, half-split for the rope_interleave=False run), the same gradients as transformers.
Exit status 1 if a check fails. tinymoe runs here with TINYMOE_BACKEND=numpy (no numba needed).
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TINYMOE_BACKEND", "numpy")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from tinymoe.checkpoint import load_checkpoint, restore_model  # noqa: E402
from tinymoe.hf import HFUnusedKeysWarning, load_pretrained, save_pretrained, to_hf_state_dict  # noqa: E402,E501

RUNS = {
    # the toy preset, with the auxiliary-loss-free bias update on so the selection bias is nonzero
    "toy": dict(sets=["bias_update_speed=0.01"], save=dict()),
    # no query compression, YaRN (max_seq_len 128 > original 32, mscale 0.707), norm_topk_prob
    # false, rope rows written half-split (rope_interleave false)
    "yarn_noqlora_halfsplit": dict(
        sets=["bias_update_speed=0.01", "q_lora_rank=0", "max_seq_len=128", "original_seq_len=32",
              "rope_factor=4.0", "mscale=0.707", "norm_topk_prob=false", "route_scale=1.5"],
        save=dict(rope_interleave=False)),
    # an MTP module, saved without it so transformers loads the directory without any report
    "toy_mtp": dict(sets=["bias_update_speed=0.01", "n_mtp_modules=1"], save=dict(include_mtp=False)),
}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


def fused_to_checkpoint(name, t, F):
    if name.endswith("mlp.experts.gate_up_proj"):
        pre = name[: -len("gate_up_proj")]
        return {**{f"{pre}{e}.gate_proj.weight": t[e, :F] for e in range(t.shape[0])},
                **{f"{pre}{e}.up_proj.weight": t[e, F:] for e in range(t.shape[0])}}
    if name.endswith("mlp.experts.down_proj"):
        pre = name[: -len("down_proj")]
        return {f"{pre}{e}.down_proj.weight": t[e] for e in range(t.shape[0])}
    return {name: t}


def check(name, spec, args, work) -> dict:
    out = os.path.join(work, name)
    cmd = [args.python, "-m", "tinymoe.train", "--preset", "toy", "--steps", str(args.steps),
           "--seed", "0", "--out", out, "--overwrite", "--log-every", "0", "--eval-every", "0"]
    for s in spec["sets"]:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("TINYMOE_BACKEND", None)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    ckpt = sorted(glob.glob(os.path.join(out, "ckpt_step*.npz")))[-1]
    model = restore_model(load_checkpoint(ckpt), source=ckpt)
    cfg = model.config
    hf_dir = os.path.join(out, "hf")
    save_pretrained(model, hf_dir, **spec["save"])

    cap = _Capture()
    tlog = logging.getLogger("transformers")
    tlog.addHandler(cap)
    try:
        ref, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                                         attn_implementation="eager",
                                                         output_loading_info=True)
    finally:
        tlog.removeHandler(cap)
    ref.eval()
    load_problems = {k: list(v) for k, v in info.items() if v}

    rng = np.random.default_rng(123)
    T = min(32, cfg.max_seq_len)
    ids = rng.integers(0, cfg.vocab_size, (2, T))
    logits, routing = model.forward(ids, record_routing=True)
    targets = np.concatenate([ids[:, 1:], np.full((2, 1), -100)], axis=1)
    if cfg.n_mtp_modules:     # parity is for the main model: compare the plain next-token loss
        model = type(model).from_params(cfg.replace(n_mtp_modules=0),
                                        {k: v for k, v in model.params.items()
                                         if not k.startswith("mtp.")},
                                        {k: v for k, v in model.buffers.items()
                                         if not k.startswith("mtp.")})
    loss, grads = model.loss_and_grads(ids, targets)
    ghf = to_hf_state_dict(model, grads, rope_interleave=spec["save"].get("rope_interleave", True),
                           include_mtp=False)

    hf_routing = {}
    hooks = [layer.mlp.gate.register_forward_hook(
        lambda m, i, o, l=l: hf_routing.__setitem__(l, o[2].detach().sort(-1)[0].numpy()))
        for l, layer in enumerate(ref.model.layers) if hasattr(layer.mlp, "gate")]
    tid = torch.tensor(ids, dtype=torch.long)
    res = ref(input_ids=tid, labels=tid)
    res.loss.backward()
    for h in hooks:
        h.remove()
    F = ref.config.moe_intermediate_size
    hf_grads = {}
    for pname, p in ref.named_parameters():
        hf_grads.update(fused_to_checkpoint(pname, p.grad.detach().numpy(), F))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HFUnusedKeysWarning)
        back = load_pretrained(hf_dir)
    _, grads_back = back.loss_and_grads(ids, targets)
    g_back = to_hf_state_dict(back, grads_back)          # default layout: the file's own
    back_rel = max(float(np.abs(g_back[k] - g).max() / max(float(np.abs(g).max()), 1e-30))
                   for k, g in hf_grads.items())

    mism = sum(int((np.sort(routing[l]["indices"], -1) != hf_routing[l]).any(-1).sum())
               for l in routing)
    worst, worst_key = 0.0, None
    for k, g in hf_grads.items():
        d = float(np.abs(ghf[k] - g).max())
        rel = d / float(np.abs(g).max()) if np.abs(g).max() > 0 else d
        if rel > worst:
            worst, worst_key = rel, k
    r = {"run": name, "checkpoint": os.path.relpath(ckpt, work),
         "bias_absmax": max(float(np.abs(b).max()) for b in model.buffers.values()),
         "hf_load_problems": load_problems, "hf_warnings": cap.records,
         "logits_maxabs": float(np.abs(logits - res.logits.detach().numpy()).max()),
         "logits_absmax": float(np.abs(logits).max()),
         "routing_mismatched_tokens": mism, "routing_tokens": int(ids.size) * len(routing),
         "loss_diff": abs(float(loss) - res.loss.item()), "grad_max_rel": worst,
         "grad_worst_tensor": worst_key, "reloaded_default_layout_grad_max_rel": back_rel,
         "grad_keys_match": set(ghf) == set(hf_grads)}
    r["ok"] = (not load_problems and not cap.records and r["logits_maxabs"] < 1e-4 and mism == 0
               and r["loss_diff"] < 1e-5 and worst < 1e-4 and back_rel < 1e-4
               and r["grad_keys_match"])
    return r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--python", default="python3", help="interpreter with tinymoe's dependencies")
    ap.add_argument("--keep", default=None, help="folder to keep the runs in (default: temporary)")
    args = ap.parse_args()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        for name, spec in RUNS.items():
            r = check(name, spec, args, work)
            ok &= r["ok"]
            print(json.dumps(r, indent=1))
    print("ALL OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

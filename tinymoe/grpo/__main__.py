"""`python -m tinymoe.grpo`: supervised warm start, then GRPO on a verifiable toy task.

    python -m tinymoe.grpo --task addition --digits 1 --sft-steps 60 --rl-steps 150 \\
        --group-size 8 --prompts 32 --beta 0.04 --lr 2e-3 --eval-split warmstart --out runs/grpo
    python -m tinymoe.grpo --resume runs/grpo/ckpt_step000100.npz --rl-steps 200 --out runs/grpo

Writes log.jsonl (one record per RL step, tinymoe.grpo.loop's fields), checkpoints
(ckpt_stepNNNNNN.npz + .ref.npz) and summary.json into --out, which must be empty unless it holds
the --resume checkpoint or --overwrite is given. A resumed run keeps every setting saved in its
checkpoint (only --rl-steps, --eval-every, --log-every, --save-every may change); a flag that
conflicts with one is an error. A bad flag exits 2 with one line, any other error 1 with one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

# flag -> default of a fresh run (None where the variant decides)
DEFAULTS = dict(task="addition", digits=1, length=4, variant="grpo", preset="toy", sft_steps=60,
                sft_units="4", rl_steps=150, group_size=8, prompts=32, beta=None, clip_eps=0.2,
                mu=1, lr=2e-3, temperature=1.0, eval_split="warmstart", eval_every=1,
                log_every=10, save_every=0, seed=0)
# flag -> (section of the checkpoint's meta, field) it must agree with on resume
SAVED_AS = dict(digits=("task", "n_digits"), length=("task", "length"),
                sft_steps=("run", "sft_steps"), group_size=("grpo", "group_size"),
                prompts=("grpo", "prompts_per_step"), beta=("grpo", "beta"),
                clip_eps=("grpo", "clip_eps"), mu=("grpo", "updates_per_batch"), lr=("grpo", "lr"),
                temperature=("grpo", "temperature"), eval_split=("run", "eval_split"),
                seed=("run", "seed"))


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump, no traceback
        sys.stderr.write(f"tinymoe.grpo: error: {message} (see --help)\n")
        sys.exit(2)


def _units(text: str):
    return None if text.lower() == "none" else int(text)


def _check_resume_flags(args, path: str, meta: dict, config) -> None:
    """Every explicit flag must agree with the checkpoint's saved setting (both values named)."""
    from tinymoe.grpo import GRPOConfig
    from tinymoe.train import check_resume_config, check_resume_settings
    source = f"checkpoint {path}"
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    flat = {f: meta[sec].get(key) for f, (sec, key) in SAVED_AS.items() if key in meta[sec]}
    if "task" in given:
        flat["task"] = {"AdditionTask": "addition", "SortTask": "sort"}.get(meta["task"]["kind"])
    if "sft_units" in given:
        given["sft_units"], flat["sft_units"] = _units(given["sft_units"]), meta["run"]["sft_max_units"]
    if "variant" in given:          # the fields that tell the variants apart
        v = getattr(GRPOConfig, given.pop("variant"))().to_dict()
        keys = ("std_normalise", "length_norm", "drop_zero_variance_groups", "clip_eps_high")
        check_resume_settings({k: v[k] for k in keys}, meta["grpo"], keys, source, "--variant: ")
    check_resume_settings(given, flat, sorted(flat), source, "--")
    check_resume_config(args, config, source)


def main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog="python -m tinymoe.grpo",
                description="Warm-start a tinymoe model on a toy task, then train it with GRPO.")
    p.add_argument("--task", choices=("addition", "sort"), default=None, help="default addition")
    p.add_argument("--digits", type=int, default=None, help="addition: operand digits (default 1)")
    p.add_argument("--length", type=int, default=None, help="sort: list length (default 4)")
    p.add_argument("--variant", choices=("grpo", "dr_grpo", "dapo"), default=None,
                   help="default grpo")
    p.add_argument("--preset", default=None, help="ModelConfig preset (default toy)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (JSON value), repeatable")
    p.add_argument("--sft-steps", type=int, default=None, help="default 60")
    p.add_argument("--sft-units", default=None, help="warm start only where last operand %% 10 <= "
                   "this ('none' = all; default 4)")
    p.add_argument("--rl-steps", type=int, default=None, help="default 150")
    p.add_argument("--group-size", type=int, default=None, help="default 8")
    p.add_argument("--prompts", type=int, default=None, help="prompts per RL step (default 32)")
    p.add_argument("--beta", type=float, default=None, help="KL weight (variant default)")
    p.add_argument("--clip-eps", type=float, default=None, help="default 0.2")
    p.add_argument("--mu", type=int, default=None, help="updates per sampled batch (default 1)")
    p.add_argument("--lr", type=float, default=None, help="default 2e-3")
    p.add_argument("--temperature", type=float, default=None, help="default 1.0")
    p.add_argument("--eval-split", choices=("heldout", "warmstart"), default=None,
                   help="default warmstart")
    p.add_argument("--eval-every", type=int, default=None, help="default 1")
    p.add_argument("--log-every", type=int, default=None, help="default 10")
    p.add_argument("--save-every", type=int, default=None, help="default 0")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--out", default=None, help="output folder (log.jsonl, checkpoints, summary)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run files (checkpoints, log) already in --out")
    p.add_argument("--resume", default=None, help="GRPO checkpoint to continue from")
    args = p.parse_args(argv)
    a = {k: (v if v is not None else DEFAULTS[k]) for k, v in vars(args).items() if k in DEFAULTS}

    def body():
        import math
        from tinymoe import grpo
        from tinymoe.config import ModelConfig, parse_overrides
        from tinymoe.grpo.loop import RunConfig, train_grpo
        from tinymoe.train import check_fits_in_memory, prepare_out_dir, write_text
        for flag in ("lr", "beta", "clip_eps", "temperature"):
            if a[flag] is not None and not math.isfinite(a[flag]):
                raise ValueError(f"--{flag.replace('_', '-')} {a[flag]}: must be a finite number")
        if args.resume:
            from tinymoe.checkpoint import load_checkpoint
            ck = load_checkpoint(args.resume)
            if "run" not in ck.meta or "grpo" not in ck.meta or "task" not in ck.meta:
                raise ValueError(f"checkpoint {args.resume}: meta has no 'grpo'/'run' entries; "
                                 f"not a GRPO checkpoint")
            _check_resume_flags(args, args.resume, ck.meta, ck.config)
            run = dict(ck.meta["run"], betas=tuple(ck.meta["run"]["betas"]))
            run.update({k: a[k] for k in ("rl_steps", "eval_every", "log_every", "save_every")
                        if getattr(args, k) is not None})
            rcfg = RunConfig(**run).validate()
            if rcfg.rl_steps <= ck.step:
                raise ValueError(f"--rl-steps {rcfg.rl_steps}: must be > the step {ck.step} of "
                                 f"checkpoint {args.resume} (the total to reach)")
            if args.out is not None:
                prepare_out_dir(args.out, args.resume, args.overwrite)
            out = train_grpo(None, None, None, rcfg, out_dir=args.out, resume=args.resume,
                             overwrite=args.overwrite)
        else:
            rcfg = RunConfig(rl_steps=a["rl_steps"], sft_steps=a["sft_steps"],
                             sft_max_units=_units(a["sft_units"]), eval_every=a["eval_every"],
                             eval_split=a["eval_split"], log_every=a["log_every"],
                             save_every=a["save_every"], seed=a["seed"]).validate()
            task = (grpo.AdditionTask(n_digits=a["digits"]) if a["task"] == "addition"
                    else grpo.SortTask(length=a["length"]))
            kw = dict(group_size=a["group_size"], prompts_per_step=a["prompts"],
                      clip_eps=a["clip_eps"], updates_per_batch=a["mu"], lr=a["lr"],
                      temperature=a["temperature"])
            if a["beta"] is not None:
                kw["beta"] = a["beta"]
            gcfg = getattr(grpo.GRPOConfig, a["variant"])(**kw)
            need = task.prompt_len + task.max_response_len
            overrides = dict(vocab_size=grpo.VOCAB_SIZE, max_seq_len=max(16, need),
                             n_layers=1, n_dense_layers=0)
            overrides.update(parse_overrides(args.set))
            cfg = ModelConfig.preset(a["preset"], **overrides)
            check_fits_in_memory(cfg, f"--preset {a['preset']}")
            if args.out is not None:
                prepare_out_dir(args.out, None, args.overwrite)
            out = train_grpo(cfg, task, gcfg, rcfg, out_dir=args.out, overwrite=args.overwrite)
        if args.out:
            write_text(os.path.join(args.out, "summary.json"), json.dumps(out["summary"], indent=2))

    from tinymoe.train import run_cli
    return run_cli("tinymoe.grpo", body)


if __name__ == "__main__":
    sys.exit(main())

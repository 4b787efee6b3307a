"""`python -m tinymoe.grpo`: supervised warm start, then GRPO on a verifiable toy task.

    python -m tinymoe.grpo --task addition --digits 1 --sft-steps 60 --rl-steps 150 \\
        --group-size 8 --prompts 32 --beta 0.04 --lr 2e-3 --eval-split warmstart --out runs/grpo
    python -m tinymoe.grpo --resume runs/grpo/ckpt_step000100.npz --rl-steps 200 --out runs/grpo

Writes log.jsonl (one record per RL step, tinymoe.grpo.loop's fields), checkpoints
(ckpt_stepNNNNNN.npz + .ref.npz) and summary.json into --out. A bad flag exits 2 with one line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump, no traceback
        sys.stderr.write(f"tinymoe.grpo: error: {message} (see --help)\n")
        sys.exit(2)


def main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog="python -m tinymoe.grpo",
                description="Warm-start a tinymoe model on a toy task, then train it with GRPO.")
    p.add_argument("--task", choices=("addition", "sort"), default="addition")
    p.add_argument("--digits", type=int, default=1, help="addition: operand digits (default 1)")
    p.add_argument("--length", type=int, default=4, help="sort: list length (default 4)")
    p.add_argument("--variant", choices=("grpo", "dr_grpo", "dapo"), default="grpo")
    p.add_argument("--preset", default="toy", help="ModelConfig preset (default toy)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (JSON value), repeatable")
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--sft-units", default="4", help="warm start only where last operand %% 10 <= this"
                   " ('none' = all)")
    p.add_argument("--rl-steps", type=int, default=150)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--prompts", type=int, default=32, help="prompts per RL step")
    p.add_argument("--beta", type=float, default=None, help="KL weight (variant default)")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--mu", type=int, default=1, help="updates per sampled batch")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--eval-split", choices=("heldout", "warmstart"), default="warmstart")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (log.jsonl, checkpoints, summary)")
    p.add_argument("--resume", default=None, help="GRPO checkpoint to continue from")
    args = p.parse_args(argv)
    try:
        from tinymoe import grpo
        from tinymoe.config import ModelConfig
        from tinymoe.grpo.loop import RunConfig, train_grpo
        from tinymoe.config import parse_overrides
        units = None if args.sft_units.lower() == "none" else int(args.sft_units)
        rcfg = RunConfig(rl_steps=args.rl_steps, sft_steps=args.sft_steps, sft_max_units=units,
                         eval_every=args.eval_every, eval_split=args.eval_split,
                         log_every=args.log_every, save_every=args.save_every,
                         seed=args.seed).validate()
        if args.resume:
            out = train_grpo(None, None, None, rcfg, out_dir=args.out, resume=args.resume)
        else:
            task = (grpo.AdditionTask(n_digits=args.digits) if args.task == "addition"
                    else grpo.SortTask(length=args.length))
            kw = dict(group_size=args.group_size, prompts_per_step=args.prompts,
                      clip_eps=args.clip_eps, updates_per_batch=args.mu, lr=args.lr,
                      temperature=args.temperature)
            if args.beta is not None:
                kw["beta"] = args.beta
            gcfg = getattr(grpo.GRPOConfig, args.variant)(**kw)
            need = task.prompt_len + task.max_response_len
            overrides = dict(vocab_size=grpo.VOCAB_SIZE, max_seq_len=max(16, need),
                             n_layers=1, n_dense_layers=0)
            overrides.update(parse_overrides(args.set))
            cfg = ModelConfig.preset(args.preset, **overrides)
            out = train_grpo(cfg, task, gcfg, rcfg, out_dir=args.out)
        if args.out:
            with open(os.path.join(args.out, "summary.json"), "w") as f:
                json.dump(out["summary"], f, indent=2)
    except (ValueError, TypeError, FileNotFoundError, KeyError, RuntimeError) as e:
        sys.stderr.write(f"tinymoe.grpo: error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

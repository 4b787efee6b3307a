"""Training: a deterministic loop as a library function and as `python -m tinymoe.train`.

One step:
    tokens, targets = batch drawn with the run's np.random.Generator
    loss, grads     = model.loss_and_grads(tokens, targets)       (CE + MTP + balance losses)
    stop if the loss or any gradient is not finite                (naming the step and tensor)
    grads, norm     = clip_grad_norm(grads, grad_clip)
    AdamW step with lr = warmup + cosine schedule
    router biases  += gamma * sign(mean load - load)              (auxiliary-loss-free balancing)

Everything random comes from one Generator seeded by --seed, and its state is saved in every
checkpoint, so the same seed gives bitwise-identical losses and a run resumed from the checkpoint
of step n repeats steps n+1.. of the uninterrupted run bitwise.

    python -m tinymoe.train --preset toy --data languages --steps 200 --seed 0 --out runs/toy \\
        --save-every 50
    python -m tinymoe.train --resume runs/toy/ckpt_step000100.npz --steps 300 --out runs/toy
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from tinymoe.checkpoint import load_checkpoint, restore_model, restore_rng, save_checkpoint
from tinymoe.config import ModelConfig, parse_overrides
from tinymoe.model import Model
from tinymoe.optim import AdamW, clip_grad_norm, lr_schedule


class TrainingError(RuntimeError):
    """Raised when training cannot continue (a non-finite loss or gradient)."""


@dataclass
class TrainConfig:
    steps: int = 200              # total optimizer steps (a resumed run continues up to this)
    batch_size: int = 16          # sequences per step
    lr: float = 3e-3              # peak learning rate
    warmup: int = 20              # linear warmup steps
    min_lr_ratio: float = 0.1     # cosine decays to min_lr_ratio * lr
    weight_decay: float = 0.1     # AdamW decoupled weight decay (not on norms)
    betas: tuple = (0.9, 0.95)    # AdamW betas (DeepSeek-V3 4.2)
    grad_clip: Optional[float] = 1.0   # global-norm clipping; None = off
    eval_every: int = 50          # held-out evaluation period (0 = only at the end)
    eval_batches: int = 4         # held-out batches per evaluation (fixed rows, not sampled)
    log_every: int = 10           # progress line period (0 = silent)
    save_every: int = 0           # checkpoint period (0 = only the final checkpoint when out_dir)
    seed: int = 0                 # the run's generator (batches) and the model init

    def validate(self) -> "TrainConfig":
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be >= 1")
        for name in ("warmup", "eval_every", "eval_batches", "log_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} = {getattr(self, name)}: must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr = {self.lr}: must be > 0")
        return self


def first_nonfinite(loss: float, grads: Dict[str, np.ndarray]) -> Optional[str]:
    """None if the loss and every gradient are finite, else "loss" or "gradient of 'name'"."""
    if not math.isfinite(loss):
        return "loss"
    for k in sorted(grads):
        if not np.all(np.isfinite(grads[k])):
            return f"gradient of {k!r}"
    return None


def evaluate(model: Model, ds, batch_size: int, n_batches: int) -> dict:
    """Mean main cross-entropy and MaxVio over fixed held-out rows (the first n_batches*B rows)."""
    from tinymoe.layers.basic import cross_entropy_forward
    from tinymoe.layers.router import expert_load, maxvio
    rows = ds.val
    n = min(len(rows), max(1, n_batches) * batch_size)
    losses, loads = [], {}
    for start in range(0, n, batch_size):
        tokens, targets = rows[start:start + batch_size, :-1], rows[start:start + batch_size, 1:]
        targets = _masked_targets(ds, "val", start, targets)
        logits, routing = model.forward(tokens, record_routing=True)
        ce, _ = cross_entropy_forward(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        losses.append(ce)
        for l, r in routing.items():
            loads[l] = loads.get(l, 0) + expert_load(r["indices"], model.config.n_routed_experts)
    out = {"val_loss": float(np.mean(losses))}
    if loads:
        out["val_maxvio"] = {str(l): float(maxvio(v)) for l, v in loads.items()}
    return out


def truncate_log(path: str, keep_through: int) -> None:
    """Keep only the records with step <= keep_through (none for a fresh run), rewritten atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_through]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The checkpoint with the highest step in out_dir (ckpt_stepNNNNNN.npz), or None."""
    if not out_dir or not os.path.isdir(out_dir):
        return None
    names = sorted(n for n in os.listdir(out_dir) if n.startswith("ckpt_step") and n.endswith(".npz"))
    return os.path.join(out_dir, names[-1]) if names else None


def _masked_targets(ds, split: str, start: int, targets: np.ndarray) -> np.ndarray:
    """Apply the data set's loss mask (if any) to held-out targets: masked positions -> -100."""
    mask = getattr(ds, f"loss_mask_{split}", None)
    if mask is None:
        return targets
    m = mask[start:start + targets.shape[0], 1:]
    return np.where(m, targets, -100)


def train(model_cfg: ModelConfig, ds, tcfg: TrainConfig, out_dir: Optional[str] = None,
          resume: Optional[str] = None, model: Optional[Model] = None,
          callback: Optional[Callable[[int, Model, dict], None]] = None,
          print_fn: Optional[Callable[[str], None]] = print, meta: Optional[dict] = None) -> dict:
    """Train and return {"model", "history", "summary"}.

    `ds` is a tinymoe.data.TokenDataset; `callback(step, model, record)` runs after every step
    (lessons use it to record routing). With `resume`, model, optimizer, step and generator come
    from the checkpoint and training continues up to tcfg.steps.
    """
    from tinymoe.data import get_batch
    from tinymoe.layers.router import maxvio
    tcfg.validate()
    say = print_fn or (lambda s: None)
    if resume:
        ckpt = load_checkpoint(resume)
        model = restore_model(ckpt, source=f"checkpoint {resume}")
        model_cfg = model.config
        rng = restore_rng(ckpt)
        start = ckpt.step
    else:
        model = model or Model(model_cfg, seed=tcfg.seed)
        rng = np.random.default_rng(tcfg.seed)
        start = 0
    if ds.vocab_size > model.config.vocab_size:
        raise ValueError(f"data set {ds.name!r}: vocab_size {ds.vocab_size} exceeds the model's "
                         f"vocab_size {model.config.vocab_size}")
    opt = AdamW(model.params, lr=tcfg.lr, betas=tcfg.betas, weight_decay=tcfg.weight_decay)
    if resume:
        if ckpt.optimizer is None:
            raise ValueError(f"checkpoint {resume}: has no optimizer state, cannot resume training")
        opt.load_state_dict(ckpt.optimizer, source=f"checkpoint {resume}")
    meta = dict(meta or {}, train=dataclasses.asdict(tcfg))
    log_path = None
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        log_path = os.path.join(out_dir, "log.jsonl")
        truncate_log(log_path, start)        # a fresh run starts empty; a resumed one drops
                                              # the records after its checkpoint's step
    gamma = model.config.bias_update_speed
    history: List[dict] = []
    t_run = time.perf_counter()
    n_tokens = 0
    for step in range(start + 1, tcfg.steps + 1):
        t0 = time.perf_counter()
        tokens, targets, _ = get_batch(ds, "train", rng, tcfg.batch_size)
        loss, grads = model.loss_and_grads(tokens, targets)
        bad = first_nonfinite(loss, grads)
        if bad is not None:
            raise TrainingError(f"step {step}: non-finite {bad} (loss = {loss}); training stopped, "
                                f"the last checkpoint written (if any) is untouched")
        grads, gnorm = clip_grad_norm(grads, tcfg.grad_clip)
        lr = lr_schedule(step, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.min_lr_ratio)
        opt.step(grads, lr=lr)
        stats = model.last_stats
        model.update_router_biases(stats["loads"], gamma)
        dt = time.perf_counter() - t0
        n_tokens += tokens.size
        rec = {"step": step, "loss": float(loss), "ce": float(stats["ce"]),
               "mtp": [float(v) for v in stats["mtp"]], "aux": float(stats["aux"]), "lr": lr,
               "grad_norm": gnorm, "tokens_per_s": tokens.size / dt,
               "loads": {k: [int(v) for v in load] for k, load in stats["loads"].items()},
               "maxvio": max((float(maxvio(l)) for l in stats["loads"].values()), default=0.0),
               "dropped": sum(stats["dropped"].values())}
        if (tcfg.eval_every and step % tcfg.eval_every == 0) or step == tcfg.steps:
            rec.update(evaluate(model, ds, tcfg.batch_size, tcfg.eval_batches))
        history.append(rec)
        if log_path:
            with open(log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if tcfg.log_every and (step % tcfg.log_every == 0 or step == tcfg.steps):
            line = (f"step {step:5d}/{tcfg.steps} | loss {loss:.4f} | ce {stats['ce']:.4f} | "
                    f"{rec['tokens_per_s'] / 1e3:6.1f}k tok/s | maxvio {rec['maxvio']:.3f} | "
                    f"lr {lr:.2e}")
            if "val_loss" in rec:
                line += f" | val {rec['val_loss']:.4f}"
            say(line)
        if callback is not None:
            callback(step, model, rec)
        if out_dir and ((tcfg.save_every and step % tcfg.save_every == 0) or step == tcfg.steps):
            save_checkpoint(os.path.join(out_dir, f"ckpt_step{step:06d}.npz"), model, opt, step,
                            rng, meta)
    elapsed = time.perf_counter() - t_run
    last = history[-1] if history else {}
    summary = {"steps": tcfg.steps, "start_step": start, "final_loss": last.get("loss"),
               "final_ce": last.get("ce"), "val_loss": last.get("val_loss"),
               "val_maxvio": last.get("val_maxvio"), "seconds": elapsed,
               "tokens_per_s": n_tokens / elapsed if elapsed > 0 else None,
               "params": model.n_params()}
    if history:
        say(f"done: {len(history)} steps in {elapsed:.1f}s, final loss {summary['final_loss']:.4f}"
            + (f", val loss {summary['val_loss']:.4f}" if summary["val_loss"] is not None else ""))
    return {"model": model, "history": history, "summary": summary}


# ================================================================================================
# command line
# ================================================================================================

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump, no traceback
        sys.stderr.write(f"tinymoe.train: error: {message} (see --help)\n")
        sys.exit(2)


def main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog="python -m tinymoe.train", description="Train a tinymoe model on synthetic data.")
    p.add_argument("--preset", default="toy", help="ModelConfig preset (default toy)")
    p.add_argument("--data", default="languages", help="languages | tasks | text:PATH")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="output folder (log.jsonl, checkpoints)")
    p.add_argument("--save-every", type=int, default=0)
    p.add_argument("--resume", default=None, help="checkpoint to continue from")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (JSON value), repeatable")
    args = p.parse_args(argv)
    try:
        from tinymoe.data import load_dataset
        tcfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                           warmup=args.warmup, eval_every=args.eval_every,
                           log_every=args.log_every, save_every=args.save_every,
                           seed=args.seed).validate()
        if args.resume:
            ckpt_meta = load_checkpoint(args.resume).meta
            data, seq_len = ckpt_meta.get("data", args.data), ckpt_meta.get("seq_len", args.seq_len)
            data_seed = ckpt_meta.get("data_seed", args.seed)
            cfg = None
        else:
            data, seq_len, data_seed = args.data, args.seq_len, args.seed
            cfg = ModelConfig.preset(args.preset, **parse_overrides(args.set))
            if seq_len > cfg.max_seq_len:
                raise ValueError(f"--seq-len {seq_len}: exceeds the preset's max_seq_len "
                                 f"{cfg.max_seq_len}")
        ds = load_dataset(data, seq_len=seq_len, seed=data_seed)
        if cfg is not None and ds.vocab_size > cfg.vocab_size:
            raise ValueError(f"--data {data}: vocab_size {ds.vocab_size} exceeds the preset's "
                             f"vocab_size {cfg.vocab_size}; add --set vocab_size={ds.vocab_size}")
        out = train(cfg, ds, tcfg, out_dir=args.out, resume=args.resume,
                    meta={"data": data, "seq_len": seq_len, "data_seed": data_seed})
        if args.out:
            with open(os.path.join(args.out, "summary.json"), "w") as f:
                json.dump(out["summary"], f, indent=2)
    except (ValueError, TypeError, FileNotFoundError, TrainingError) as e:
        sys.stderr.write(f"tinymoe.train: error: {e}\n")
        return 1
    except KeyboardInterrupt:
        last = latest_checkpoint(args.out)
        hint = f"; continue with --resume {last}" if last else " (no checkpoint written yet)"
        sys.stderr.write(f"tinymoe.train: interrupted{hint}\n")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
of step n repeats steps n+1.. of the uninterrupted run bitwise. The records of log.jsonl are
bitwise identical between identical runs except `tokens_per_s`, the one wall-clock field.

Nothing is lost: a run refuses an `--out` folder that is not empty (unless it resumes from a
checkpoint in that folder, or `--overwrite` is given), a resumed run takes every setting from its
checkpoint (a conflicting flag is an error), and the parameters are checked after every update,
so a checkpoint on disk never holds a NaN or inf.

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
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import numpy as np

from tinymoe.atomic import write_atomic
from tinymoe.checkpoint import load_checkpoint, restore_model, restore_rng, save_checkpoint
from tinymoe.config import ModelConfig, _is_number, parse_overrides
from tinymoe.model import Model
from tinymoe.optim import AdamW, clip_grad_norm, lr_schedule


class TrainingError(RuntimeError):
    """Raised when training cannot continue (a non-finite loss, gradient or parameter)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; `.checkpoint` is the last checkpoint this run wrote (or resumed)."""

    def __init__(self, checkpoint: Optional[str]):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint


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
        def fail(name: str, rule: str) -> None:
            raise ValueError(f"TrainConfig.{name} = {getattr(self, name)!r}: {rule}")

        def is_int(v) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        for name in ("steps", "batch_size"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "must be an integer >= 1")
        for name in ("warmup", "eval_every", "eval_batches", "log_every", "save_every", "seed"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "must be an integer >= 0")
        if not _is_number(self.lr) or not self.lr > 0:
            fail("lr", "must be a finite number > 0")
        if not _is_number(self.min_lr_ratio) or not 0 <= self.min_lr_ratio <= 1:
            fail("min_lr_ratio", "must be in [0, 1] (the cosine ends at min_lr_ratio * lr)")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            fail("weight_decay", "must be a finite number >= 0")
        if len(self.betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in self.betas):
            fail("betas", "must be two numbers in [0, 1)")
        if self.grad_clip is not None and not (_is_number(self.grad_clip) and self.grad_clip > 0):
            fail("grad_clip", "must be None (off) or a finite number > 0 (0 would zero every "
                              "update, < 0 would climb the loss)")
        return self


# settings that shape the trajectory: a resumed run must use the checkpoint's values
TRAJECTORY_FIELDS = ("batch_size", "lr", "warmup", "min_lr_ratio", "weight_decay", "betas",
                     "grad_clip", "seed")


def check_resume_settings(given: dict, saved: dict, fields, source: str, prefix: str) -> None:
    """Raise ValueError naming both values if given[f] != saved[f] for a field both have."""
    for f in fields:
        if f in given and f in saved:
            a, b = given[f], saved[f]
            try:
                a = json.loads(json.dumps(a))           # tuples were saved as JSON lists
            except TypeError:
                pass
            if a != b:
                said = (f"--{f.replace('_', '-')} {a!r}" if prefix == "--" else f"{prefix}{f} = {a!r}")
                raise ValueError(f"{said} conflicts with {b!r} saved in {source}; a resumed run "
                                 f"keeps every setting of its checkpoint (drop the flag)")


def first_nonfinite(loss: float, grads: Dict[str, np.ndarray]) -> Optional[str]:
    """None if the loss and every gradient are finite, else "loss" or "gradient of 'name'"."""
    if not math.isfinite(loss):
        return "loss"
    for k in sorted(grads):
        if not np.all(np.isfinite(grads[k])):
            return f"gradient of {k!r}"
    return None


def nonfinite_state(model: Model) -> Optional[str]:
    """None if every parameter and router bias is finite, else "parameter 'name'" (or bias)."""
    for what, arrays in (("parameter", model.params), ("router bias", model.buffers)):
        for k in sorted(arrays):
            if not np.all(np.isfinite(arrays[k])):
                return f"{what} {k!r}"
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
    write_text(path, "".join(kept))


def write_text(path: str, text: str, mode: str = "w") -> None:
    """Write (mode "w": atomically, tinymoe.atomic) or append text; an OSError names path."""
    if mode == "w":
        write_atomic(path, text.encode("utf-8"))
        return
    try:
        with open(path, "a") as f:
            f.write(text)
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), path) from None


RUN_FILE = re.compile(r"^(ckpt_step\d+(\.ref)?\.npz|log\.jsonl(\.tmp)?|summary\.json(\.tmp)?|"
                      r"\.tmp-.*)$")         # .tmp-*: tinymoe.atomic's temporary files


def prepare_out_dir(out_dir: str, resume: Optional[str] = None, overwrite: bool = False) -> None:
    """Create out_dir, or accept it when it is empty, when `resume` lies in it (the same run), or
    when `overwrite` is set (its run files are deleted first); otherwise a ValueError, so a second
    run never mixes its log and checkpoints with a first one's. Checks that it is writable."""
    if not isinstance(out_dir, str) or not out_dir.strip():
        raise ValueError(f"--out {out_dir!r}: not a folder name")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"--out {out_dir}: exists and is not a folder")
    os.makedirs(out_dir, exist_ok=True)
    names = sorted(os.listdir(out_dir))
    own = resume is not None and os.path.samefile(os.path.dirname(os.path.abspath(resume)), out_dir)
    if names and not own:
        if not overwrite:
            shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
            how = ("resume into the checkpoint's own folder, use an empty --out" if resume else
                   "continue it with --resume CHECKPOINT, use another --out")
            raise ValueError(f"--out {out_dir}: folder is not empty ({shown}); {how}, or pass "
                             f"--overwrite to delete its run files (checkpoints, log.jsonl, "
                             f"summary.json)")
        for n in names:
            if RUN_FILE.match(n):
                os.remove(os.path.join(out_dir, n))
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=out_dir)   # unwritable: OSError now,
    os.close(fd)                                                   # not after the first step
    os.remove(probe)


def _masked_targets(ds, split: str, start: int, targets: np.ndarray) -> np.ndarray:
    """Apply the data set's loss mask (if any) to held-out targets: masked positions -> -100."""
    mask = getattr(ds, f"loss_mask_{split}", None)
    if mask is None:
        return targets
    m = mask[start:start + targets.shape[0], 1:]
    return np.where(m, targets, -100)


def train(model_cfg: Optional[ModelConfig], ds, tcfg: TrainConfig, out_dir: Optional[str] = None,
          resume: Optional[str] = None, model: Optional[Model] = None,
          callback: Optional[Callable[[int, Model, dict], None]] = None,
          print_fn: Optional[Callable[[str], None]] = print, meta: Optional[dict] = None,
          overwrite: bool = False) -> dict:
    """Train and return {"model", "history", "summary"}.

    `ds` is a tinymoe.data.TokenDataset; `callback(step, model, record)` runs after every step
    (lessons use it to record routing). With `resume`, model, optimizer, step and generator come
    from the checkpoint and training continues up to tcfg.steps (> the checkpoint's step);
    model_cfg (None or the checkpoint's) and tcfg's trajectory settings (TRAJECTORY_FIELDS) must
    agree with what the checkpoint saved. `out_dir` must be empty, hold `resume`, or be cleared
    with overwrite=True (prepare_out_dir). Ctrl-C raises TrainingInterrupted naming the last
    checkpoint written.
    """
    from tinymoe.data import get_batch
    from tinymoe.layers.router import maxvio
    tcfg.validate()
    say = print_fn or (lambda s: None)
    if resume:
        source = f"checkpoint {resume}"
        ckpt = load_checkpoint(resume)
        if model_cfg is not None and model_cfg != ckpt.config:
            diff = next(k for k, v in model_cfg.to_dict().items() if ckpt.config.to_dict()[k] != v)
            check_resume_settings(model_cfg.to_dict(), ckpt.config.to_dict(), [diff], source,
                                  "ModelConfig.")
        check_resume_settings(dataclasses.asdict(tcfg), ckpt.meta.get("train", {}),
                              TRAJECTORY_FIELDS, source, "TrainConfig.")
        if tcfg.steps <= ckpt.step:
            raise ValueError(f"TrainConfig.steps = {tcfg.steps}: must be > the step {ckpt.step} "
                             f"of {source}, or there is nothing to train")
        model = restore_model(ckpt, source=source)
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
    if out_dir is not None:
        prepare_out_dir(out_dir, resume, overwrite)
        log_path = os.path.join(out_dir, "log.jsonl")
        truncate_log(log_path, start)        # a fresh run starts empty; a resumed one drops
                                              # the records after its checkpoint's step
    gamma = model.config.bias_update_speed
    history: List[dict] = []
    t_run = time.perf_counter()
    n_tokens = 0
    saved = resume
    stopped = "training stopped, the last checkpoint written (if any) is untouched"
    try:
        for step in range(start + 1, tcfg.steps + 1):
            t0 = time.perf_counter()
            tokens, targets, _ = get_batch(ds, "train", rng, tcfg.batch_size)
            try:
                loss, grads = model.loss_and_grads(tokens, targets)
            except (FloatingPointError, ValueError) as e:      # overflow in the forward
                raise TrainingError(f"step {step}: {e}; {stopped}") from None
            bad = first_nonfinite(loss, grads)
            if bad is not None:
                raise TrainingError(f"step {step}: non-finite {bad} (loss = {loss}); {stopped}")
            grads, gnorm = clip_grad_norm(grads, tcfg.grad_clip)
            lr = lr_schedule(step, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.min_lr_ratio)
            opt.step(grads, lr=lr)
            stats = model.last_stats
            model.update_router_biases(stats["loads"], gamma)
            bad = nonfinite_state(model)
            if bad is not None:           # checked before anything is saved
                raise TrainingError(f"step {step}: the update made {bad} non-finite (lr = {lr:g}, "
                                    f"gradient norm {gnorm:.3g}); {stopped}")
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
                write_text(log_path, json.dumps(rec) + "\n", mode="a")
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
                saved = save_checkpoint(os.path.join(out_dir, f"ckpt_step{step:06d}.npz"), model,
                                        opt, step, rng, meta)
    except KeyboardInterrupt:
        raise TrainingInterrupted(saved) from None
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
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def check_fits_in_memory(cfg: ModelConfig, flag: str = "--preset") -> None:
    """Refuse a config whose parameters, gradients and AdamW moments (4 copies) exceed the RAM."""
    from tinymoe.model import param_shapes
    n = sum(math.prod(s) for s in param_shapes(cfg).values())
    need = 4 * n * 4                                   # float32 params, grads, m and v
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        raise ValueError(f"{flag}: this model has {n:,} parameters; training it needs at least "
                         f"{need / 2**30:.1f} GiB (parameters, gradients, AdamW moments) and this "
                         f"machine has {have / 2**30:.1f} GiB (the deepseek-* presets are for "
                         f"tinymoe.accounting only)")


def describe_os_error(e: OSError) -> str:
    """'path: reason' for an OSError that names a file, else its message."""
    if e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return str(e)


def run_cli(prog: str, body: Callable[[], None]) -> int:
    """Run a CLI body; every user mistake or OS failure becomes one line on stderr and an exit code
    (1 error, 130 Ctrl-C), never a traceback."""
    def fail(msg: str) -> int:
        sys.stderr.write(f"{prog}: error: {msg}\n")
        return 1
    try:
        body()
    except BrokenPipeError:                          # e.g. `... | head -1` closed our stdout
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # quiet exit flush
        except (OSError, ValueError):
            pass
        return fail("stdout was closed (broken pipe); stopped")
    except TrainingInterrupted as e:
        hint = (f"; continue with --resume {e.checkpoint}" if e.checkpoint
                else " (no checkpoint written yet)")
        sys.stderr.write(f"{prog}: interrupted{hint}\n")
        return 130
    except KeyboardInterrupt:
        sys.stderr.write(f"{prog}: interrupted (no checkpoint written yet)\n")
        return 130
    except MemoryError as e:
        return fail(f"out of memory{f' ({e})' if str(e) else ''}; try a smaller model "
                    f"(--preset toy, --set dim=...) or --batch-size")
    except OSError as e:
        return fail(describe_os_error(e))
    except (ValueError, TypeError, KeyError, RuntimeError, ArithmeticError) as e:
        return fail(str(e))
    return 0


# the flags a checkpoint remembers: flag -> default of a fresh run
DEFAULTS = dict(preset="toy", data="languages", steps=200, seed=0, save_every=0, batch_size=16,
                seq_len=32, lr=3e-3, warmup=20, eval_every=50, log_every=10)


def check_resume_config(args, config: ModelConfig, source: str) -> None:
    """--preset / --set given with --resume must describe the checkpoint's own config."""
    if args.preset is not None:
        base = ModelConfig.preset(args.preset, **parse_overrides(args.set)).to_dict()
        check_resume_settings(base, config.to_dict(), sorted(base), source,
                              f"--preset {args.preset}{' with --set' if args.set else ''} gives ")
    elif args.set:
        base = parse_overrides(args.set)
        check_resume_settings(base, config.to_dict(), sorted(base), source, "--set ")


def _resume_settings(args, ckpt) -> tuple:
    """(TrainConfig, data, seq_len, data_seed) of a resumed run: the checkpoint's settings, with
    only steps / save_every / eval_every / log_every taken from flags; a conflicting flag raises."""
    source = f"checkpoint {args.resume}"
    saved = dict(ckpt.meta.get("train", {}))
    if "betas" in saved:
        saved["betas"] = tuple(saved["betas"])
    meta = {"data": ckpt.meta.get("data"), "seq_len": ckpt.meta.get("seq_len")}
    given = {k: v for k, v in vars(args).items() if k in DEFAULTS and v is not None}
    check_resume_settings(given, dict(saved, **{k: v for k, v in meta.items() if v is not None}),
                          ("data", "seq_len", "batch_size", "lr", "warmup", "seed"), source, "--")
    check_resume_config(args, ckpt.config, source)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    tc = {k: v for k, v in saved.items() if k in fields}
    for k in ("steps", "save_every", "eval_every", "log_every"):
        if given.get(k) is not None:
            tc[k] = given[k]
    for k in fields - set(tc):       # an old checkpoint without saved settings: flags, defaults
        if k in DEFAULTS:
            tc[k] = given.get(k, DEFAULTS[k])
    tcfg = TrainConfig(**tc).validate()
    if tcfg.steps <= ckpt.step:
        raise ValueError(f"--steps {tcfg.steps}: must be > the step {ckpt.step} of {source} "
                         f"(--steps is the total to reach), or there is nothing to train")
    data = meta["data"] or given.get("data", DEFAULTS["data"])
    seq_len = meta["seq_len"] or given.get("seq_len", DEFAULTS["seq_len"])
    return tcfg, data, seq_len, ckpt.meta.get("data_seed", tcfg.seed)


def main(argv: Optional[List[str]] = None) -> int:
    p = _Parser(prog="tinymoe.train", description="Train a tinymoe model on synthetic data.")
    p.add_argument("--preset", default=None, help="ModelConfig preset (default toy)")
    p.add_argument("--data", default=None, help="languages | tasks | text:PATH (default languages)")
    p.add_argument("--steps", type=int, default=None, help="total steps (default 200)")
    p.add_argument("--seed", type=int, default=None, help="default 0")
    p.add_argument("--out", default=None, help="output folder (log.jsonl, checkpoints); must be "
                   "empty unless it holds the --resume checkpoint or --overwrite is given")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the run files (checkpoints, log) already in --out")
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--resume", default=None, help="checkpoint to continue from (all its settings "
                   "are kept; a flag that conflicts with one is an error)")
    p.add_argument("--batch-size", type=int, default=None, help="default 16")
    p.add_argument("--seq-len", type=int, default=None, help="default 32")
    p.add_argument("--lr", type=float, default=None, help="default 3e-3")
    p.add_argument("--warmup", type=int, default=None, help="default 20")
    p.add_argument("--eval-every", type=int, default=None, help="default 50")
    p.add_argument("--log-every", type=int, default=None, help="default 10")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field (JSON value), repeatable")
    args = p.parse_args(argv)

    def body():
        from tinymoe.data import load_dataset
        if args.resume:
            tcfg, data, seq_len, data_seed = _resume_settings(args, load_checkpoint(args.resume))
            cfg = None
        else:
            a = {k: (v if v is not None else DEFAULTS[k]) for k, v in vars(args).items()
                 if k in DEFAULTS}
            tcfg = TrainConfig(steps=a["steps"], batch_size=a["batch_size"], lr=a["lr"],
                               warmup=a["warmup"], eval_every=a["eval_every"],
                               log_every=a["log_every"], save_every=a["save_every"],
                               seed=a["seed"]).validate()
            data, seq_len, data_seed = a["data"], a["seq_len"], a["seed"]
            cfg = ModelConfig.preset(a["preset"], **parse_overrides(args.set))
            if seq_len > cfg.max_seq_len:
                raise ValueError(f"--seq-len {seq_len}: exceeds the preset's max_seq_len "
                                 f"{cfg.max_seq_len}")
            check_fits_in_memory(cfg, f"--preset {a['preset']}")
        if args.out is not None:
            prepare_out_dir(args.out, args.resume, args.overwrite)   # before loading any data
        ds = load_dataset(data, seq_len=seq_len, seed=data_seed)
        if cfg is not None and ds.vocab_size > cfg.vocab_size:
            raise ValueError(f"--data {data}: vocab_size {ds.vocab_size} exceeds the preset's "
                             f"vocab_size {cfg.vocab_size}; add --set vocab_size={ds.vocab_size}")
        out = train(cfg, ds, tcfg, out_dir=args.out, resume=args.resume, overwrite=args.overwrite,
                    meta={"data": data, "seq_len": seq_len, "data_seed": data_seed})
        if args.out:
            write_text(os.path.join(args.out, "summary.json"), json.dumps(out["summary"], indent=2))

    return run_cli("tinymoe.train", body)


if __name__ == "__main__":
    sys.exit(main())

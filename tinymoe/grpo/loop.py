"""The GRPO training loop: a supervised warm start, then RL steps; a library function and the CLI's engine.

    from tinymoe import grpo
    from tinymoe.config import ModelConfig
    task = grpo.AdditionTask(n_digits=1)              # the setting lessons/08_grpo.py calibrated
    cfg = ModelConfig.preset("toy", vocab_size=grpo.VOCAB_SIZE, n_layers=1, n_dense_layers=0,
                             max_seq_len=16)
    out = grpo.train_grpo(cfg, task, grpo.GRPOConfig.grpo(group_size=8, beta=0.04, lr=2e-3),
                          grpo.RunConfig(sft_steps=60, rl_steps=180, sft_max_units=4,
                                         eval_split="warmstart", eval_every=10, seed=0))
    out["history"]       # one record per RL step (step 0 = the warm-started policy, before RL)

Phase 1, warm start (supervised, partial on purpose, [R1] §2.3's "cold start" in miniature):
`sft_steps` AdamW steps of cross-entropy on task answers (`sft_examples`), only on training
problems whose last operand's units digit is <= `sft_max_units` (None = all training problems).
The policy knows the answer format and part of the table, so the first RL rewards are neither ~0
(no signal) nor ~1 (nothing to learn).

Phase 2, GRPO ([MATH] §4.1, deepseek.md §12), one step:
    prompts   P = gcfg.prompts_per_step training prompts, each repeated G = gcfg.group_size times
    sample    M = P*G responses of R tokens at gcfg.temperature (cached decode, seed from the run rng)
    reward    r [P, G] rule-based; A = gcfg.advantages(r) (group mean / std baseline)
    old, ref  log-probs of the sampled tokens under the policy (its FULL forward, the same function
              the loss runs, so rho == 1 exactly in the first update) and under the frozen reference
    update    mu = gcfg.updates_per_batch AdamW steps on grpo_loss (clipped surrogate - beta k3 KL)
    eval      greedy accuracy on the held-out prompts (every `eval_every` steps)

Logged per step (history records, log.jsonl): step, reward (mean), train_acc (share of sampled
responses exactly right), heldout_acc (greedy, at eval steps, else None), kl (mean k3 KL to the
reference over response tokens, measured even when beta = 0), clip_fraction (mean over the mu
updates; exactly 0 when mu = 1), zero_var (share of groups with equal rewards), length (mean
response length up to and including EOS), tokens_per_s (sequence tokens of the step / its wall
time), loss, grad_norm, lr, ratio_min/max, surrogate, format_rate (share well formed), loads.

Determinism: one np.random.Generator seeded by RunConfig.seed draws the SFT batches, the prompts
and the sampling seeds. A checkpoint (`ckpt_stepNNNNNN.npz`, tinymoe.checkpoint format: policy,
AdamW state, step, generator state; the configs in `meta`) plus its reference model
(`ckpt_stepNNNNNN.ref.npz`, parameters and router biases only) resumes bitwise: the resumed run's
records equal the uninterrupted run's, except the two wall-clock fields `seconds` and
`tokens_per_s` (the same holds for two identical runs).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import numpy as np

from tinymoe.checkpoint import load_checkpoint, restore_model, restore_rng, save_checkpoint
from tinymoe.config import ModelConfig
from tinymoe.grpo.objective import GRPOConfig, grpo_loss, grpo_loss_backward, token_logprobs
from tinymoe.grpo import tasks as _tasks
from tinymoe.grpo.objective import zero_variance_groups
from tinymoe.grpo.tasks import response_mask
from tinymoe.model import Model
from tinymoe.optim import AdamW, clip_grad_norm
from tinymoe.train import (TrainingInterrupted, check_resume_settings, first_nonfinite,
                           nonfinite_state, prepare_out_dir, truncate_log, write_text)

EVAL_SPLITS = ("heldout", "warmstart")
RESUMABLE = ("rl_steps", "eval_every", "log_every", "save_every")   # may change on resume
LOG_FIELDS = ("step", "reward", "train_acc", "heldout_acc", "kl", "clip_fraction", "zero_var",
              "length", "tokens_per_s")


class GRPOTrainingError(RuntimeError):
    """Raised when RL cannot continue (a non-finite loss or gradient)."""


@dataclass
class RunConfig:
    """The loop's knobs (GRPOConfig holds the objective's and the sampling's)."""
    rl_steps: int = 200               # RL steps (a resumed run continues up to this)
    sft_steps: int = 300              # warm-start AdamW steps (0 = none)
    sft_batch: int = 64               # warm-start sequences per step
    sft_lr: float = 3e-3              # warm-start learning rate (constant)
    sft_max_units: Optional[int] = 4  # warm start only on problems whose last operand % 10 <= this
    betas: Tuple[float, float] = (0.9, 0.99)   # AdamW betas (both phases)
    weight_decay: float = 0.0         # AdamW weight decay (both phases)
    grad_clip: Optional[float] = 1.0  # global-norm clipping (both phases); None = off
    eval_every: int = 1               # greedy held-out evaluation period (0 = only first and last)
    eval_split: str = "heldout"       # held-out prompts: "heldout" = the task's held-out split
                                      # (never trained on, in either phase); "warmstart" = training
                                      # problems outside the warm-start subset (only RL sees them)
    n_eval: Optional[int] = None      # held-out prompts (None = every such problem if enumerable)
    log_every: int = 10               # progress line period (0 = silent)
    save_every: int = 0               # checkpoint period (0 = only the final one when out_dir)
    seed: int = 0                     # model init and the run's generator

    def validate(self) -> "RunConfig":
        for name in ("rl_steps", "sft_steps", "eval_every", "log_every", "save_every", "seed"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
                raise ValueError(f"RunConfig.{name} = {v!r}: must be an int >= 0")
        if not (isinstance(self.sft_batch, int) and self.sft_batch >= 1):
            raise ValueError(f"RunConfig.sft_batch = {self.sft_batch!r}: must be an int >= 1")
        if not (self.sft_lr > 0 and math.isfinite(self.sft_lr)):
            raise ValueError(f"RunConfig.sft_lr = {self.sft_lr}: must be a finite number > 0")
        if self.sft_max_units is not None and not 0 <= self.sft_max_units <= 9:
            raise ValueError(f"RunConfig.sft_max_units = {self.sft_max_units}: must be in 0..9 or None")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"RunConfig.eval_split = {self.eval_split!r}: must be one of {EVAL_SPLITS}")
        if self.eval_split == "warmstart" and self.sft_max_units is None:
            raise ValueError("RunConfig.eval_split = 'warmstart' needs sft_max_units (a partial warm start)")
        if self.n_eval is not None and self.n_eval < 1:
            raise ValueError(f"RunConfig.n_eval = {self.n_eval}: must be >= 1 or None")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"RunConfig.grad_clip = {self.grad_clip}: must be a finite number > 0 "
                             f"or None")
        return self


# ================================================================================================
# tasks by name (so a checkpoint's meta can rebuild the task)
# ================================================================================================

def task_to_dict(task) -> dict:
    return {"kind": type(task).__name__, **dataclasses.asdict(task)}


def task_from_dict(d: dict):
    d = dict(d)
    kind = d.pop("kind", None)
    classes = {"AdditionTask": _tasks.AdditionTask, "SortTask": _tasks.SortTask}
    if kind not in classes:
        raise ValueError(f"task: kind {kind!r} is not one of {sorted(classes)}")
    if d.get("heldout") is not None:
        d["heldout"] = tuple(tuple(r) for r in d["heldout"])
    return classes[kind](**d)


def sft_subset(task, max_units: Optional[int]):
    """The warm start's problem filter: last operand's units digit <= max_units (None = all)."""
    if max_units is None:
        return None
    return lambda p: p[-1] % 10 <= max_units


# ================================================================================================
# pieces of a step
# ================================================================================================

def copy_model(model: Model) -> Model:
    """An independent copy (parameters and router biases), e.g. the frozen reference policy."""
    return Model.from_params(model.config, model.params, model.buffers, source="copy")  # copies


def heldout_prompts(task, rcfg: RunConfig) -> np.ndarray:
    """[n, Tp] the fixed evaluation prompts of rcfg.eval_split.

    "heldout": the task's held-out split; "warmstart": training problems the partial warm start
    never showed (last operand's units digit > sft_max_units). Every such problem when
    enumerable and rcfg.n_eval is None, else n_eval (default 256) drawn from a generator of its
    own (seed rcfg.seed + 1000003), so evaluation never touches the run's generator.
    """
    subset = None
    if rcfg.eval_split == "warmstart":
        k = rcfg.sft_max_units
        subset = lambda p: p[-1] % 10 > k                      # noqa: E731
    split = "heldout" if rcfg.eval_split == "heldout" else "train"
    if rcfg.n_eval is None:
        try:
            probs = task.all_problems(split)
        except ValueError:
            pass
        else:
            probs = [p for p in probs if subset is None or subset(p)]
            return np.stack([task.prompt_tokens(p) for p in probs])
    return _tasks.make_prompts(task, rcfg.n_eval or 256, split,
                               np.random.default_rng(rcfg.seed + 1_000_003), subset)


def greedy_correct(model: Model, task, prompts: np.ndarray, max_new_tokens: Optional[int] = None,
                   batch: int = 512) -> np.ndarray:
    """[n, Tp] prompts -> [n] bool: the greedy (temperature 0) response earns the full reward 1."""
    from tinymoe.generate import generate
    R = max_new_tokens or task.max_response_len
    Tp = prompts.shape[1]
    out = []
    for s in range(0, len(prompts), batch):
        p = prompts[s:s + batch]
        seqs = generate(model, p, R, 0.0)
        out.append(_tasks.rewards(task, p, seqs[:, Tp:]) == 1.0)
    return np.concatenate(out) if out else np.zeros(0, bool)


def warm_start(model: Model, task, rcfg: RunConfig, rng: np.random.Generator,
               say: Callable[[str], None] = print) -> List[dict]:
    """Supervised warm start (cross-entropy on answers, partial subset); returns per-step records."""
    opt = AdamW(model.params, lr=rcfg.sft_lr, betas=rcfg.betas, weight_decay=rcfg.weight_decay)
    subset = sft_subset(task, rcfg.sft_max_units)
    hist = []
    for step in range(1, rcfg.sft_steps + 1):
        t0 = time.perf_counter()
        x, y = _tasks.sft_examples(task, rcfg.sft_batch, "train", rng, subset)
        try:
            loss, grads = model.loss_and_grads(x, y)
        except FloatingPointError as e:
            raise GRPOTrainingError(f"warm start step {step}: {e}") from None
        bad = first_nonfinite(loss, grads)
        if bad is not None:
            raise GRPOTrainingError(f"warm start step {step}: non-finite {bad} (loss = {loss})")
        grads, gnorm = clip_grad_norm(grads, rcfg.grad_clip)
        opt.step(grads)
        model.update_router_biases(model.last_stats["loads"], model.config.bias_update_speed)
        bad = nonfinite_state(model)
        if bad is not None:
            raise GRPOTrainingError(f"warm start step {step}: the update made {bad} non-finite")
        dt = time.perf_counter() - t0
        hist.append({"sft_step": step, "loss": float(loss), "grad_norm": gnorm,
                     "tokens_per_s": x.size / dt})
        if rcfg.log_every and (step % (rcfg.log_every * 5) == 0 or step == rcfg.sft_steps):
            say(f"sft  {step:5d}/{rcfg.sft_steps} | loss {loss:.4f} | "
                f"{x.size / dt / 1e3:6.1f}k tok/s")
    return hist


def rl_step(model: Model, ref_model: Model, opt: AdamW, task, gcfg: GRPOConfig, rcfg: RunConfig,
            rng: np.random.Generator, update: bool = True) -> dict:
    """One GRPO step (sample, reward, advantages, mu updates); returns the step's record.

    update=False samples and scores a batch and measures the loss without changing the model
    (the step-0 record of the starting policy).
    """
    from tinymoe.generate import generate
    from tinymoe.layers.router import maxvio
    t0 = time.perf_counter()
    G, Tp = gcfg.group_size, task.prompt_len
    R = gcfg.max_new_tokens or task.max_response_len
    # 1. prompts and G samples each (row m = p*G + g); the sampler's seed comes from the run rng
    prompts = _tasks.make_prompts(task, gcfg.prompts_per_step, "train", rng)       # [P, Tp]
    rep = np.repeat(prompts, G, axis=0)                                            # [M, Tp]
    seed = int(rng.integers(2 ** 31))
    seqs = generate(model, rep, R, gcfg.temperature, gcfg.top_k, seed=seed)        # [M, Tp+R]
    resp = seqs[:, Tp:]                                                            # [M, R]
    mask_all = response_mask(resp)                                                 # [M, R]
    # 2. rewards and group-relative advantages (DAPO: drop zero-variance groups)
    r = _tasks.rewards(task, rep, resp).reshape(-1, G)                             # [P, G]
    zero = zero_variance_groups(r)                                                 # [P]
    adv = gcfg.advantages(r)                                                       # [P, G]
    keep = ~zero if gcfg.drop_zero_variance_groups else np.ones(len(r), bool)
    rows = np.repeat(keep, G)                                                      # [M]
    rec = {"reward": float(r.mean()), "train_acc": float((r == 1.0).mean()),
           "format_rate": float((r > 0).mean()), "zero_var": float(zero.mean()),
           "length": float(mask_all.sum(axis=1).mean()), "kept_groups": int(keep.sum())}
    stats_list = []
    loss = gnorm = float("nan")
    loads = {}
    if keep.any():
        seqs, resp, mask, A = seqs[rows], resp[rows], mask_all[rows], adv[keep].reshape(-1)
        x = seqs[:, :-1]                                                           # [M', Tp+R-1]
        # 3. old log-probs: the policy's full forward at sampling time (reused by update 1, so
        #    rho == 1 exactly there); reference log-probs from the frozen copy, no gradient
        logits, _, fcache = model.forward_train(x, mtp=False)
        loads = {k: c.load for k, c in fcache.moe_caches.items()}
        old = token_logprobs(logits[:, Tp - 1:], resp, gcfg.temperature)            # [M', R]
        ref = token_logprobs(ref_model.forward(x)[:, Tp - 1:], resp, gcfg.temperature)
        for u in range(gcfg.updates_per_batch if update else 1):
            if u > 0:
                logits, _, fcache = model.forward_train(x, mtp=False)
            loss, stats, cache = grpo_loss(logits[:, Tp - 1:], resp, mask, old, ref, A,
                                           **gcfg.loss_kwargs())
            if not update:
                stats_list.append(stats)
                loss = loss + fcache.aux_loss
                break
            dlogits = np.zeros_like(logits)
            dlogits[:, Tp - 1:] = grpo_loss_backward(cache)                        # prompt: no grad
            grads = model.backward(dlogits, fcache, daux=1.0)
            loss = loss + fcache.aux_loss
            bad = first_nonfinite(loss, grads)
            if bad is not None:
                raise GRPOTrainingError(f"non-finite {bad} (loss = {loss}); RL stopped, the last "
                                        f"checkpoint is untouched")
            grads, gnorm = clip_grad_norm(grads, rcfg.grad_clip)
            opt.step(grads, lr=gcfg.lr)
            loads = {k: c.load for k, c in fcache.moe_caches.items()}
            model.update_router_biases(loads, model.config.bias_update_speed)
            bad = nonfinite_state(model)
            if bad is not None:      # checked before anything is saved
                raise GRPOTrainingError(f"the update made {bad} non-finite (lr = {gcfg.lr:g}); RL "
                                        f"stopped, the last checkpoint is untouched")
            stats_list.append(stats)
    mean = (lambda k: float(np.mean([s[k] for s in stats_list]))) if stats_list else (lambda k: 0.0)
    rec.update({"kl": mean("kl"), "clip_fraction": mean("clip_fraction"),
                "clip_fraction_last": stats_list[-1]["clip_fraction"] if stats_list else 0.0,
                "ratio_min": min((s["ratio_min"] for s in stats_list), default=1.0),
                "ratio_max": max((s["ratio_max"] for s in stats_list), default=1.0),
                "surrogate": mean("surrogate"), "loss": None if math.isnan(loss) else float(loss),
                "grad_norm": None if math.isnan(gnorm) else float(gnorm),
                "lr": gcfg.lr,
                "loads": {k: [int(v) for v in l] for k, l in loads.items()},
                "maxvio": max((float(maxvio(l)) for l in loads.values()), default=0.0)})
    dt = time.perf_counter() - t0
    rec["seconds"] = dt
    n_pass = gcfg.updates_per_batch if update else 1
    rec["tokens_per_s"] = seqs.size * n_pass / dt if dt > 0 else 0.0
    return rec


# ================================================================================================
# checkpoints
# ================================================================================================

def _ref_path(path: str) -> str:
    return path[:-4] + ".ref.npz" if path.endswith(".npz") else path + ".ref.npz"


def save_grpo_checkpoint(path: str, model: Model, ref_model: Model, opt: AdamW, step: int,
                         rng: np.random.Generator, meta: dict) -> str:
    """Policy + optimizer + step + generator (+ meta) in `path`, the reference in `<path>.ref.npz`.

    The reference is written first, so a crash between the two writes never pairs a new policy
    file with an old reference.
    """
    save_checkpoint(_ref_path(path), ref_model, meta={"role": "grpo reference", "step": int(step)})
    return save_checkpoint(path, model, opt, step, rng, dict(meta, ref_file=os.path.basename(
        _ref_path(path))))


def load_grpo_checkpoint(path: str):
    """-> (model, ref_model, optimizer state dict, step, rng, meta)."""
    ck = load_checkpoint(path)
    if "grpo" not in ck.meta or "run" not in ck.meta:
        raise ValueError(f"checkpoint {path}: meta has no 'grpo'/'run' entries; not a GRPO checkpoint")
    ref_file = os.path.join(os.path.dirname(os.path.abspath(path)),
                            ck.meta.get("ref_file", os.path.basename(_ref_path(path))))
    if not os.path.exists(ref_file):
        raise FileNotFoundError(f"checkpoint {path}: its reference model file {ref_file} is missing")
    rk = load_checkpoint(ref_file)
    if rk.config != ck.config:
        raise ValueError(f"checkpoint {ref_file}: its config differs from the policy's in {path}")
    if ck.optimizer is None:
        raise ValueError(f"checkpoint {path}: has no optimizer state, cannot resume RL")
    return (restore_model(ck, source=f"checkpoint {path}"),
            restore_model(rk, source=f"checkpoint {ref_file}"), ck.optimizer, ck.step,
            restore_rng(ck), ck.meta)


# ================================================================================================
# the loop
# ================================================================================================

def _line(rec: dict, total: int) -> str:
    s = (f"rl   {rec['step']:5d}/{total} | reward {rec['reward']:.3f} | acc {rec['train_acc']:.3f} | "
         f"kl {rec['kl']:.4f} | clip {rec['clip_fraction']:.3f} | zero-var {rec['zero_var']:.2f} | "
         f"len {rec['length']:.2f} | {rec['tokens_per_s'] / 1e3:6.1f}k tok/s | "
         f"maxvio {rec['maxvio']:.3f}")
    if rec.get("heldout_acc") is not None:
        s += f" | heldout {rec['heldout_acc']:.3f}"
    return s


def train_grpo(model_cfg: Optional[ModelConfig], task, gcfg: GRPOConfig, rcfg: RunConfig,
               out_dir: Optional[str] = None, resume: Optional[str] = None,
               model: Optional[Model] = None,
               callback: Optional[Callable[[int, Model, dict], None]] = None,
               print_fn: Optional[Callable[[str], None]] = print, overwrite: bool = False) -> dict:
    """Warm start + GRPO; returns {"model", "ref_model", "history", "sft_history", "heldout",
    "heldout_correct_start", "heldout_correct_end", "summary"}.

    history[0] (step 0) is the warm-started policy before any RL step (reward from one sampled
    batch without an update; heldout_acc greedy), then one record per RL step. `model` replaces
    Model(model_cfg, seed) (skip the warm start with rcfg.sft_steps = 0). With `resume` (a GRPO
    checkpoint), task, configs, policy, reference, optimizer and generator come from the file and
    RL continues up to rcfg.rl_steps (the file's, unless rcfg is given: its rl_steps counts, and
    must be above the checkpoint's step); a model_cfg, task, gcfg or rcfg that is given must agree
    with the file (rcfg's rl_steps, eval_every, log_every and save_every may differ). `out_dir`
    follows tinymoe.train.prepare_out_dir (empty, the resumed run's own, or overwrite=True).
    callback(step, model, record) runs after every step (step 0 included); Ctrl-C raises
    tinymoe.train.TrainingInterrupted naming the last checkpoint written.
    """
    say = print_fn or (lambda s: None)
    sft_history: List[dict] = []
    if resume:
        model, ref_model, opt_state, start, rng, meta = load_grpo_checkpoint(resume)
        source = f"checkpoint {resume}"
        given = [(model_cfg.to_dict() if model_cfg else {}, model.config.to_dict(), "ModelConfig."),
                 (task_to_dict(task) if task else {}, meta["task"], "task."),
                 (gcfg.to_dict() if gcfg else {}, meta["grpo"], "GRPOConfig."),
                 (dataclasses.asdict(rcfg) if rcfg else {}, meta["run"], "RunConfig.")]
        for mine, saved, prefix in given:
            check_resume_settings(mine, saved, [k for k in sorted(saved) if k not in RESUMABLE],
                                  source, prefix)
        task = task_from_dict(meta["task"])
        gcfg = GRPOConfig(**meta["grpo"])
        run = dict(meta["run"], betas=tuple(meta["run"]["betas"]))
        if rcfg:
            run.update({k: getattr(rcfg, k) for k in RESUMABLE})
        rcfg = RunConfig(**run)
        if rcfg.rl_steps <= start:
            raise ValueError(f"RunConfig.rl_steps = {rcfg.rl_steps}: must be > the step {start} "
                             f"of {source}, or there is nothing to train")
    rcfg.validate()
    gcfg.validate()
    R = gcfg.max_new_tokens or task.max_response_len
    heldout = heldout_prompts(task, rcfg)
    if not resume:
        model = model or Model(model_cfg, seed=rcfg.seed)
        rng = np.random.default_rng(rcfg.seed)
        start = 0
    cfg = model.config
    if cfg.vocab_size < _tasks.VOCAB_SIZE:
        raise ValueError(f"model_cfg.vocab_size = {cfg.vocab_size}: the GRPO tasks need >= "
                         f"{_tasks.VOCAB_SIZE}")
    if task.prompt_len + R > cfg.max_seq_len:
        raise ValueError(f"model_cfg.max_seq_len = {cfg.max_seq_len}: prompt {task.prompt_len} + "
                         f"response {R} tokens do not fit")
    meta = {"task": task_to_dict(task), "grpo": gcfg.to_dict(),
            "run": dataclasses.asdict(rcfg)}
    log_path = os.path.join(out_dir, "log.jsonl") if out_dir is not None else None
    if out_dir is not None:
        prepare_out_dir(out_dir, resume, overwrite)
        truncate_log(log_path, start)         # fresh: empty; resumed: records up to its step
    history: List[dict] = []

    def emit(rec):
        history.append(rec)
        if log_path:
            write_text(log_path, json.dumps(rec) + "\n", mode="a")

    t_run = time.perf_counter()
    correct_start = None
    saved = resume
    try:
        if not resume:
            # phase 1: supervised warm start, then freeze the reference
            if rcfg.sft_steps:
                sft_history = warm_start(model, task, rcfg, rng, say)
            ref_model = copy_model(model)
            opt = AdamW(model.params, lr=gcfg.lr, betas=rcfg.betas, weight_decay=rcfg.weight_decay)
            correct_start = greedy_correct(model, task, heldout, R)
            # step 0: the starting policy's numbers (a sampled batch with no update: mu = 0)
            rec = rl_step(model, ref_model, opt, task, gcfg, rcfg, rng, update=False)
            rec.update(step=0, heldout_acc=float(correct_start.mean()))
            emit(rec)
            say(_line(rec, rcfg.rl_steps))
            if callback:
                callback(0, model, rec)
        else:
            opt = AdamW(model.params, lr=gcfg.lr, betas=rcfg.betas, weight_decay=rcfg.weight_decay)
            opt.load_state_dict(opt_state, source=f"checkpoint {resume}")
        # phase 2: RL
        for step in range(start + 1, rcfg.rl_steps + 1):
            if gcfg.ref_update_every and (step - 1) % gcfg.ref_update_every == 0 and step > 1:
                ref_model = copy_model(model)                      # R1: refresh pi_ref periodically
            rec = rl_step(model, ref_model, opt, task, gcfg, rcfg, rng)
            rec["step"] = step
            last = step == rcfg.rl_steps
            if (rcfg.eval_every and step % rcfg.eval_every == 0) or last:
                correct = greedy_correct(model, task, heldout, R)
                rec["heldout_acc"] = float(correct.mean())
            else:
                correct = None
                rec["heldout_acc"] = None
            emit(rec)
            if rcfg.log_every and (step % rcfg.log_every == 0 or last):
                say(_line(rec, rcfg.rl_steps))
            if callback:
                callback(step, model, rec)
            if out_dir and ((rcfg.save_every and step % rcfg.save_every == 0) or last):
                saved = save_grpo_checkpoint(os.path.join(out_dir, f"ckpt_step{step:06d}.npz"),
                                             model, ref_model, opt, step, rng, meta)
    except KeyboardInterrupt:
        raise TrainingInterrupted(saved) from None
    except FloatingPointError as e:                  # overflow in a forward
        raise GRPOTrainingError(f"{e}; RL stopped, the last checkpoint is untouched") from None
    correct_end = greedy_correct(model, task, heldout, R)
    elapsed = time.perf_counter() - t_run
    rl = [h for h in history if h["step"] > 0]
    summary = {"rl_steps": rcfg.rl_steps, "start_step": start, "seconds": elapsed,
               "heldout_acc_start": float(correct_start.mean()) if correct_start is not None else None,
               "heldout_acc_end": float(correct_end.mean()),
               "reward_start": history[0]["reward"] if history and history[0]["step"] == 0 else None,
               "reward_end": float(np.mean([h["reward"] for h in rl[-10:]])) if rl else None,
               "clip_fraction": float(np.mean([h["clip_fraction"] for h in rl])) if rl else None,
               "tokens_per_s": float(np.mean([h["tokens_per_s"] for h in rl])) if rl else None,
               "params": model.n_params()}
    if rl:
        say(f"done: {len(rl)} RL steps in {elapsed:.1f}s, reward {rl[-1]['reward']:.3f}, "
            f"held-out greedy accuracy {summary['heldout_acc_end']:.3f}")
    return {"model": model, "ref_model": ref_model, "history": history, "sft_history": sft_history,
            "heldout": heldout, "heldout_correct_start": correct_start,
            "heldout_correct_end": correct_end, "summary": summary}

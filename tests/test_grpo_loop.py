"""GRPO training loop: bitwise determinism, bitwise resume, the per-step log, the command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinymoe import grpo
from tinymoe.config import ModelConfig

pytestmark = pytest.mark.grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = ModelConfig.preset("toy", vocab_size=grpo.VOCAB_SIZE, n_layers=1, n_dense_layers=0,
                         max_seq_len=16, bias_update_speed=0.01)
TASK = grpo.AdditionTask(n_digits=1)
TIMING = ("seconds", "tokens_per_s")


def _run(tmp=None, steps=4, seed=0, resume=None, mu=1, **kw):
    gcfg = grpo.GRPOConfig.grpo(group_size=4, prompts_per_step=4, lr=2e-3, updates_per_batch=mu)
    rcfg = grpo.RunConfig(rl_steps=steps, sft_steps=3, sft_batch=8, sft_max_units=4,
                          eval_split="warmstart", eval_every=1, log_every=0, save_every=2,
                          seed=seed, **kw)
    return grpo.train_grpo(CFG, TASK, gcfg, rcfg, out_dir=tmp, resume=resume, print_fn=None)


def _strip(history):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in history]


def test_same_seed_same_bits_different_seed_differs():
    a, b, c = _run(), _run(), _run(seed=1)
    assert _strip(a["history"]) == _strip(b["history"])          # rewards, losses, KL ... bitwise
    for k in a["model"].params:
        np.testing.assert_array_equal(a["model"].params[k], b["model"].params[k])
    assert [r["loss"] for r in a["history"]] != [r["loss"] for r in c["history"]]


def test_resume_repeats_the_uninterrupted_run_bitwise(tmp_path):
    full = _run(str(tmp_path / "full"))
    ckpt = str(tmp_path / "full" / "ckpt_step000002.npz")
    assert os.path.exists(ckpt[:-4] + ".ref.npz")
    resumed = _run(str(tmp_path / "resumed"), resume=ckpt)
    assert [r["step"] for r in resumed["history"]] == [3, 4]
    assert _strip(resumed["history"]) == _strip(full["history"])[3:]
    for which in ("model", "ref_model"):
        for k in full[which].params:
            np.testing.assert_array_equal(full[which].params[k], resumed[which].params[k])
        for k in full[which].buffers:
            np.testing.assert_array_equal(full[which].buffers[k], resumed[which].buffers[k])
    # resuming into the run's own folder rewrites its log from the checkpoint: no repeated steps
    _run(str(tmp_path / "full"), resume=ckpt)
    log = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4]
    # a checkpoint without its reference file is refused, naming the missing file
    os.remove(ckpt[:-4] + ".ref.npz")
    with pytest.raises(FileNotFoundError, match="reference"):
        _run(str(tmp_path / "again"), resume=ckpt)


def test_log_has_every_field_and_on_policy_clip_fraction_is_zero(tmp_path):
    out = _run(str(tmp_path))
    hist = out["history"]
    assert [r["step"] for r in hist] == [0, 1, 2, 3, 4]
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert _strip(log) == _strip(hist)
    for r in hist:
        assert set(grpo.LOG_FIELDS) <= set(r), set(grpo.LOG_FIELDS) - set(r)
        assert 0.0 <= r["reward"] <= 1.0 and 0.0 <= r["heldout_acc"] <= 1.0
        assert 0.0 <= r["zero_var"] <= 1.0 and 1.0 <= r["length"] <= TASK.max_response_len
        assert r["tokens_per_s"] > 0 and r["kl"] >= 0.0
        # one update per sampled batch: rho = exp(l - l_old) with l_old from the same forward
        assert r["clip_fraction"] == 0.0 and r["ratio_min"] == 1.0 == r["ratio_max"]
    assert hist[0]["kl"] == 0.0                       # before RL the policy IS the reference
    assert hist[-1]["kl"] > 0.0
    # held-out prompts: the 50 one-digit problems the warm start never showed (b >= 5)
    probs = [TASK.parse_prompt(p) for p in out["heldout"]]
    assert len(probs) == 50 and all(b >= 5 for _, b in probs)


def test_several_updates_per_batch_move_the_ratio():
    out = _run(steps=2, mu=3)
    r = out["history"][-1]
    assert r["ratio_min"] < 1.0 < r["ratio_max"]      # updates 2 and 3 are off-policy
    assert 0.0 <= r["clip_fraction"] <= 1.0


def _cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "tinymoe.grpo", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_cli_bad_flags_exit_nonzero_with_one_line():
    for args in (["--no-such-flag"], ["--rl-steps", "many"], ["--variant", "ppo"]):
        r = _cli(*args)
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tinymoe.grpo: error:"), r.stderr
    r = _cli("--rl-steps", "-1")                                 # parses, but the value is invalid
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "rl_steps" in lines[0], r.stderr


def test_cli_runs_and_writes_log_and_checkpoint(tmp_path):
    r = _cli("--sft-steps", "2", "--rl-steps", "2", "--prompts", "2", "--group-size", "2",
             "--log-every", "1", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert [rec["step"] for rec in log] == [0, 1, 2]
    assert (tmp_path / "ckpt_step000002.npz").exists() and (tmp_path / "ckpt_step000002.ref.npz").exists()
    assert json.load(open(tmp_path / "summary.json"))["rl_steps"] == 2

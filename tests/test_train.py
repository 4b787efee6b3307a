"""Training: bitwise determinism, bitwise resume, NaN guard, command line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tinymoe.checkpoint import load_checkpoint
from tinymoe.config import ModelConfig
from tinymoe.data import load_dataset
from tinymoe.train import TrainConfig, TrainingError, train

pytestmark = pytest.mark.train

CFG = ModelConfig.preset("toy", n_layers=2, n_mtp_modules=1, bias_update_speed=0.01,
                         seq_aux_loss_alpha=0.001, max_seq_len=16)


@pytest.fixture(scope="module")
def ds():
    return load_dataset("languages", seq_len=12, seed=0)


def _run(ds, tmp=None, steps=6, resume=None, seed=0, **kw):
    tcfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=2, eval_every=3, eval_batches=1,
                       log_every=0, save_every=3, seed=seed, **kw)
    return train(CFG, ds, tcfg, out_dir=tmp, resume=resume, print_fn=None)


def _losses(out):
    return [r["loss"] for r in out["history"]]


def test_same_seed_same_bits_different_seed_differs(ds):
    a, b, c = _run(ds), _run(ds), _run(ds, seed=1)
    assert _losses(a) == _losses(b)
    for k in a["model"].params:
        np.testing.assert_array_equal(a["model"].params[k], b["model"].params[k])
    assert _losses(a) != _losses(c)


def test_resume_repeats_the_uninterrupted_run_bitwise(ds, tmp_path):
    full = _run(ds, str(tmp_path / "full"))
    ckpt = str(tmp_path / "full" / "ckpt_step000003.npz")
    assert load_checkpoint(ckpt).step == 3
    resumed = _run(ds, str(tmp_path / "resumed"), resume=ckpt)
    assert [r["step"] for r in resumed["history"]] == [4, 5, 6]
    assert _losses(resumed) == _losses(full)[3:]
    for k in full["model"].params:
        np.testing.assert_array_equal(full["model"].params[k], resumed["model"].params[k])
    for k in full["model"].buffers:
        np.testing.assert_array_equal(full["model"].buffers[k], resumed["model"].buffers[k])
    log = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [r["loss"] for r in log] == _losses(full)
    assert {"loss", "ce", "mtp", "aux", "lr", "grad_norm", "loads", "maxvio"} <= set(log[0])


def test_bias_moves_against_load(ds, tol):
    out = _run(ds, steps=3)
    model = out["model"]
    # after 3 steps of the sign rule with gamma 0.01 every bias is a multiple of 0.01 in [-0.03, 0.03]
    for b in model.buffers.values():
        assert np.all(np.abs(b) <= 0.03 + 1e-7)
        np.testing.assert_allclose(b / 0.01, np.round(b / 0.01), atol=tol["f32_vs_f64"])
        assert np.any(b != 0)


def test_nan_stops_training_and_keeps_the_last_checkpoint(ds, tmp_path, monkeypatch):
    from tinymoe.model import Model
    real = Model.loss_and_grads
    calls = []

    def poisoned(self, tokens, targets):
        loss, grads = real(self, tokens, targets)
        calls.append(1)
        if len(calls) == 4:                   # the fourth step's gradient overflows
            grads["layers.1.ffn.experts.w2"][0, 0, 0] = np.inf
        return loss, grads

    monkeypatch.setattr(Model, "loss_and_grads", poisoned)
    tcfg = TrainConfig(steps=6, batch_size=4, lr=1e-2, warmup=2, log_every=0, save_every=3,
                       eval_every=0, seed=0)
    with pytest.raises(TrainingError, match=r"step 4: non-finite gradient of 'layers.1.ffn.experts.w2'"):
        train(CFG, ds, tcfg, out_dir=str(tmp_path), print_fn=None)
    ck = load_checkpoint(str(tmp_path / "ckpt_step000003.npz"))
    assert ck.step == 3 and np.isfinite(ck.params["layers.1.ffn.experts.w2"]).all()
    assert not (tmp_path / "ckpt_step000006.npz").exists()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "tinymoe.train", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_bad_flag_is_one_line_not_a_traceback():
    r = _cli("--bogus-flag")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("--preset", "nope", "--steps", "1")
    assert r.returncode != 0 and "preset" in r.stderr and "Traceback" not in r.stderr
    r = _cli("--resume", "/nonexistent/ckpt.npz")
    assert r.returncode != 0 and "ckpt.npz" in r.stderr and "Traceback" not in r.stderr


def test_cli_trains_saves_and_resumes(tmp_path):
    out = str(tmp_path / "run")
    r = _cli("--preset", "toy", "--data", "languages", "--steps", "4", "--seed", "0", "--out", out,
             "--save-every", "2", "--batch-size", "4", "--seq-len", "16", "--log-every", "2")
    assert r.returncode == 0, r.stderr
    assert "step     4/4" in r.stdout
    assert sorted(os.listdir(out)) == ["ckpt_step000002.npz", "ckpt_step000004.npz", "log.jsonl",
                                       "summary.json"]
    r2 = _cli("--resume", os.path.join(out, "ckpt_step000002.npz"), "--steps", "4", "--out",
              str(tmp_path / "again"), "--batch-size", "4", "--log-every", "1")
    assert r2.returncode == 0, r2.stderr
    first = [json.loads(l)["loss"] for l in open(os.path.join(out, "log.jsonl"))]
    again = [json.loads(l)["loss"] for l in open(tmp_path / "again" / "log.jsonl")]
    assert again == first[2:]


def test_resume_into_the_same_folder_rewrites_the_log_from_the_checkpoint(ds, tmp_path):
    out = str(tmp_path / "run")
    full = _run(ds, out)                                   # steps 1..6, checkpoints at 3 and 6
    _run(ds, out, resume=str(tmp_path / "run" / "ckpt_step000003.npz"))
    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]   # no duplicated steps 4..6
    assert [r["loss"] for r in log] == _losses(full)


def test_ctrl_c_names_the_checkpoint_to_resume_from(tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "-m", "tinymoe.train", "--steps", "100000", "--out",
                          str(out), "--save-every", "2", "--batch-size", "2", "--seq-len", "8",
                          "--log-every", "0", "--eval-every", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):                               # wait for the first checkpoint
            if out.exists() and any(n.startswith("ckpt_step") for n in os.listdir(out)):
                break
            time.sleep(0.1)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130
    assert "interrupted; continue with --resume" in err and "Traceback" not in err
    named = err.split("--resume ")[1].strip()
    assert load_checkpoint(named).step >= 2

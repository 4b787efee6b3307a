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


def _run(ds, tmp=None, steps=6, resume=None, seed=0, overwrite=False, **kw):
    tcfg = TrainConfig(steps=steps, batch_size=4, lr=1e-2, warmup=2, eval_every=3, eval_batches=1,
                       log_every=0, save_every=3, seed=seed, **kw)
    return train(CFG, ds, tcfg, out_dir=tmp, resume=resume, print_fn=None, overwrite=overwrite)


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
    # A background job of a non-interactive shell starts with SIGINT ignored, and an ignored
    # disposition survives exec: simulate that launch, and give the child the default
    # disposition it relies on (Python then turns SIGINT into KeyboardInterrupt).
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        p = subprocess.Popen([sys.executable, "-m", "tinymoe.train", "--steps", "100000", "--out",
                              str(out), "--save-every", "2", "--batch-size", "2", "--seq-len", "8",
                              "--log-every", "0", "--eval-every", "0"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    finally:
        signal.signal(signal.SIGINT, previous)
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


# ---- nothing silent, nothing lost ------------------------------------------------------------

@pytest.mark.parametrize("field,value,rule", [
    ("lr", float("inf"), "finite number > 0"), ("lr", float("nan"), "finite number > 0"),
    ("grad_clip", -1.0, "None \\(off\\) or a finite number > 0"), ("grad_clip", 0.0, "> 0"),
    ("min_lr_ratio", -0.5, "in \\[0, 1\\]"), ("min_lr_ratio", 1.5, "in \\[0, 1\\]"),
    ("betas", (1.0, 0.9), "two numbers in \\[0, 1\\)"), ("seed", -1, "integer >= 0"),
    ("steps", 2.5, "integer >= 1"), ("batch_size", True, "integer >= 1"),
    ("weight_decay", float("inf"), "finite number >= 0")])
def test_train_config_refuses_values_that_train_something_else(field, value, rule):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} = .*{rule}"):
        TrainConfig(**{field: value}).validate()


def test_a_nonfinite_update_stops_before_it_is_saved(ds, tmp_path, monkeypatch):
    from tinymoe.optim import AdamW
    real = AdamW.step

    def poisoned(self, grads, lr=None):
        real(self, grads, lr)
        if self.t == 2:                           # the second update overflows one weight
            self.params["layers.0.attn.wkv_b"][0, 0] = np.inf

    monkeypatch.setattr(AdamW, "step", poisoned)
    tcfg = TrainConfig(steps=4, batch_size=2, warmup=0, log_every=0, save_every=1, eval_every=0)
    with pytest.raises(TrainingError, match=r"step 2: the update made parameter "
                                            r"'layers\.0\.attn\.wkv_b' non-finite \(lr = "):
        train(CFG, ds, tcfg, out_dir=str(tmp_path), print_fn=None)
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".npz")) == ["ckpt_step000001.npz"]
    assert load_checkpoint(str(tmp_path / "ckpt_step000001.npz")).step == 1   # finite: it loads


def test_an_overflowing_forward_is_an_error_not_zeros(ds):
    from tinymoe.model import Model
    model = Model(CFG, seed=0)
    params = dict(model.params, embed=model.params["embed"] * np.float32(1e21))   # finite, |x|^2 not
    big = Model.from_params(CFG, params, model.buffers)
    tcfg = TrainConfig(steps=2, batch_size=2, log_every=0, eval_every=0)
    with np.errstate(over="ignore"), pytest.raises(
            TrainingError, match=r"step 1: rmsnorm_forward: .* overflows float32"):
        train(CFG, ds, tcfg, model=big, print_fn=None)


def test_a_used_out_folder_is_refused_unless_overwritten(ds, tmp_path):
    out = str(tmp_path / "run")
    first = _run(ds, out, steps=3)
    with pytest.raises(ValueError, match=r"--out .*run: folder is not empty \(ckpt_step000003\.npz, "
                                         r"log\.jsonl\).*--resume.*--overwrite"):
        _run(ds, out, steps=3, seed=1)
    assert [json.loads(l)["loss"] for l in open(os.path.join(out, "log.jsonl"))] == _losses(first)
    # resuming from a copy elsewhere into this folder would mix two runs as well
    elsewhere = str(tmp_path / "elsewhere.npz")
    with open(os.path.join(out, "ckpt_step000003.npz"), "rb") as f, open(elsewhere, "wb") as g:
        g.write(f.read())
    with pytest.raises(ValueError, match="folder is not empty.*checkpoint's own folder"):
        _run(ds, out, steps=6, resume=elsewhere)
    second = _run(ds, out, steps=2, seed=1, overwrite=True)
    assert sorted(os.listdir(out)) == ["ckpt_step000002.npz", "log.jsonl"]
    assert [json.loads(l)["loss"] for l in open(os.path.join(out, "log.jsonl"))] == _losses(second)


def test_ctrl_c_names_this_runs_last_checkpoint(ds, tmp_path):
    from tinymoe.train import TrainingInterrupted

    def stop(step, model, rec):
        if step == 3:
            raise KeyboardInterrupt
    tcfg = TrainConfig(steps=6, batch_size=2, log_every=0, save_every=2, eval_every=0)
    with pytest.raises(TrainingInterrupted) as e:
        train(CFG, ds, tcfg, out_dir=str(tmp_path / "a"), callback=stop, print_fn=None)
    ckpt = str(tmp_path / "a" / "ckpt_step000002.npz")
    assert e.value.checkpoint == ckpt
    tcfg.steps = 8
    with pytest.raises(TrainingInterrupted) as e:       # stopped before its first save at step 4:
        train(CFG, ds, tcfg, out_dir=str(tmp_path / "b"), resume=ckpt, callback=stop,
              print_fn=None)                             # the file it resumed from
    assert e.value.checkpoint == ckpt


def test_resume_refuses_settings_that_differ_from_the_checkpoint(ds, tmp_path):
    _run(ds, str(tmp_path / "run"), steps=3)
    ckpt = str(tmp_path / "run" / "ckpt_step000003.npz")
    with pytest.raises(ValueError, match=r"TrainConfig\.lr = 0\.02 conflicts with 0\.01 saved in "
                                         r"checkpoint .*ckpt_step000003\.npz"):
        train(CFG, ds, TrainConfig(steps=6, batch_size=4, lr=0.02, warmup=2), resume=ckpt,
              print_fn=None)
    with pytest.raises(ValueError, match=r"ModelConfig\.n_mtp_modules = 0 conflicts with 1"):
        train(CFG.replace(n_mtp_modules=0), ds, TrainConfig(steps=6, batch_size=4, lr=1e-2,
                                                             warmup=2), resume=ckpt, print_fn=None)
    with pytest.raises(ValueError, match=r"TrainConfig\.steps = 3: must be > the step 3"):
        _run(ds, steps=3, resume=ckpt)


def test_cli_resume_takes_every_setting_from_the_checkpoint(tmp_path, capsys):
    from tinymoe.train import main
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(["--steps", "4", "--lr", "0.01", "--batch-size", "3", "--warmup", "1",
                 "--seq-len", "12", "--set", "n_layers=2", "--save-every", "2", "--log-every", "0",
                 "--out", a]) == 0
    ckpt = os.path.join(a, "ckpt_step000002.npz")
    assert main(["--resume", ckpt, "--out", b, "--log-every", "0"]) == 0    # no flag repeated
    full = [json.loads(l)["loss"] for l in open(os.path.join(a, "log.jsonl"))]
    resumed = [json.loads(l)["loss"] for l in open(os.path.join(b, "log.jsonl"))]
    assert resumed == full[2:]
    capsys.readouterr()
    for flags, said in ((["--lr", "0.003"], "--lr 0.003 conflicts with 0.01"),
                        (["--batch-size", "16"], "--batch-size 16 conflicts with 3"),
                        (["--seq-len", "32"], "--seq-len 32 conflicts with 12"),
                        (["--set", "n_layers=3"], "--set n_layers = 3 conflicts with 2"),
                        (["--data", "tasks"], "--data 'tasks' conflicts with 'languages'"),
                        (["--steps", "1"], "--steps 1: must be > the step 2")):
        assert main(["--resume", ckpt, "--out", str(tmp_path / "c"), *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and said in err[0], (flags, err)

"""A hostile or careless user: every mistake or OS failure is one line naming the path or the
cause and a non-zero exit, never a traceback, a silent wrong result or lost data (issue 13)."""
import errno
import io
import os
import sys

import numpy as np
import pytest

from tinymoe import grpo
from tinymoe.config import ModelConfig

SMALL = ["--steps", "2", "--batch-size", "2", "--seq-len", "8", "--log-every", "0",
         "--eval-every", "0", "--set", "n_layers=2"]


def _train(argv, capsys):
    """(exit code, the lines on stderr) of `python -m tinymoe.train argv`, run in-process."""
    from tinymoe.train import main
    capsys.readouterr()
    rc = main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


def _one_line(rc, err, *needles):
    assert rc != 0 and len(err) == 1, err
    assert err[0].startswith("tinymoe.") and "Traceback" not in err[0], err
    for n in needles:
        assert n in err[0], (n, err)


@pytest.mark.train
def test_out_paths_that_cannot_hold_a_run(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    _one_line(*_train(SMALL + ["--out", str(afile)], capsys), str(afile), "not a folder")
    _one_line(*_train(SMALL + ["--out", str(afile / "sub")], capsys), str(afile / "sub"),
              "Not a directory")
    _one_line(*_train(SMALL + ["--out", ""], capsys), "--out ''", "not a folder name")
    _one_line(*_train(["--data", f"text:{tmp_path}"] + SMALL, capsys), str(tmp_path), "is a folder")


@pytest.mark.train
def test_os_failures_are_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    import tempfile
    real = tempfile.mkstemp

    def read_only(*a, dir=None, **kw):
        raise OSError(errno.EROFS, "Read-only file system", dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)         # the writability probe
    _one_line(*_train(SMALL + ["--out", str(tmp_path / "ro")], capsys), str(tmp_path / "ro"),
              "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", real)

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full)                      # the disk fills at the checkpoint
    out = tmp_path / "full"
    _one_line(*_train(SMALL + ["--out", str(out)], capsys),
              str(out / "ckpt_step000002.npz"), "No space left on device")
    assert [n for n in os.listdir(out) if n.endswith(".npz")] == []   # no half-written file


@pytest.mark.train
def test_out_of_memory_and_accounting_only_presets(capsys, monkeypatch):
    _one_line(*_train(["--preset", "deepseek-v3", "--steps", "1"], capsys),
              "--preset deepseek-v3", "GiB", "accounting")
    from tinymoe.model import Model

    def oom(self, *a, **kw):
        raise MemoryError
    monkeypatch.setattr(Model, "__init__", oom)
    _one_line(*_train(SMALL, capsys), "out of memory")


@pytest.mark.train
def test_a_closed_stdout_is_one_line(capsys, monkeypatch):
    class Closed(io.TextIOBase):                     # `python -m tinymoe.train ... | head -0`
        def write(self, s):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", Closed())
    from tinymoe.train import main
    rc = main(SMALL[:-4] + ["--log-every", "1", "--set", "n_layers=2"])
    err = capsys.readouterr().err.strip().splitlines()
    _one_line(rc, err, "stdout was closed")


@pytest.mark.lessons
@pytest.mark.parametrize("argv,said", [(["--seed", "-1"], "--seed -1: must be >= 0"),
                                       (["--seeds", "0"], "--seeds 0: must be >= 1"),
                                       (["--out", "/proc/tinymoe"], "--out /proc/tinymoe: cannot write"),
                                       (["--out", ""], "--out '': not a folder name")])
def test_lesson_flags_are_checked(argv, said, capsys):
    from tinymoe.lesson import Lesson
    with pytest.raises(SystemExit) as e:
        Lesson("01_backprop", "doc", argv=argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and said in err[0], err


@pytest.mark.norm
def test_rmsnorm_refuses_bad_eps_and_reports_overflow():
    from tinymoe.layers.norm import rmsnorm_forward
    x, w = np.ones((3, 4), np.float32), np.ones(4, np.float32)
    for eps in (-1e-6, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="eps = .*: must be a finite number > 0"):
            rmsnorm_forward(x, w, eps)
    big = x.copy()
    big[1] = 3e19                                    # 3e19^2 overflows float32: r would be 0
    with np.errstate(over="ignore"), pytest.raises(
            FloatingPointError, match=r"1 of 3 rows cannot be normalised: mean\(x\^2\) \+ eps "
                                      r"overflows float32"):
        rmsnorm_forward(big, w, 1e-6)
    x[2, 0] = np.nan
    with pytest.raises(FloatingPointError, match="x has NaN or inf values"):
        rmsnorm_forward(x, w, 1e-6)
    y, _ = rmsnorm_forward(big.astype(np.float64), w.astype(np.float64), 1e-6)   # fits in float64
    np.testing.assert_allclose(y[1], np.ones(4), rtol=1e-12)


# ---- GRPO: the same rules for its --out and --resume ------------------------------------------

GCFG = ModelConfig.preset("toy", vocab_size=grpo.VOCAB_SIZE, n_layers=1, n_dense_layers=0,
                          max_seq_len=16)
GRPO_SMALL = ["--sft-steps", "1", "--rl-steps", "2", "--prompts", "2", "--group-size", "2",
              "--log-every", "0", "--eval-every", "0", "--save-every", "1"]


@pytest.mark.grpo
def test_grpo_resume_keeps_the_checkpoint_settings(tmp_path, capsys):
    from tinymoe.grpo.__main__ import main
    a = str(tmp_path / "a")
    assert main(GRPO_SMALL + ["--lr", "0.004", "--out", a]) == 0
    ckpt = os.path.join(a, "ckpt_step000001.npz")
    capsys.readouterr()
    for flags, said in ((["--lr", "0.002"], "--lr 0.002 conflicts with 0.004"),
                        (["--task", "sort"], "--task 'sort' conflicts with 'addition'"),
                        (["--group-size", "8"], "--group-size 8 conflicts with 2"),
                        (["--variant", "dapo"], "drop_zero_variance_groups = True conflicts"),
                        (["--rl-steps", "1"], "--rl-steps 1: must be > the step 1")):
        assert main(["--resume", ckpt, "--out", str(tmp_path / "b"), *flags]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        _one_line(1, err, said)
    assert main(GRPO_SMALL + ["--out", a]) == 1                 # a second run into the folder
    _one_line(1, capsys.readouterr().err.strip().splitlines(), "folder is not empty", "--overwrite")
    # the library refuses a differing config too, and Ctrl-C names the last checkpoint written
    with pytest.raises(ValueError, match=r"GRPOConfig\.lr = 0\.01 conflicts with 0\.004"):
        grpo.train_grpo(None, None, grpo.GRPOConfig.grpo(lr=0.01, group_size=2, prompts_per_step=2),
                        None, resume=ckpt, print_fn=None)
    from tinymoe.train import TrainingInterrupted

    def stop(step, model, rec):
        if step == 2:
            raise KeyboardInterrupt
    with pytest.raises(TrainingInterrupted) as e:
        grpo.train_grpo(None, None, None, None, resume=ckpt, out_dir=str(tmp_path / "c"),
                        callback=stop, print_fn=None)        # stopped before step 2 is saved
    assert e.value.checkpoint == ckpt

"""Every lesson runs in --quick mode, writes its files, and exits 0 (its quick claims hold)."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.lessons

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LESSONS = sorted(glob.glob(os.path.join(ROOT, "lessons", "[0-9][0-9]_*.py")))


def test_there_are_lessons():
    assert len(LESSONS) >= 1


@pytest.mark.parametrize("script", LESSONS, ids=[os.path.basename(p)[:-3] for p in LESSONS])
def test_lesson_quick(script, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, script, "--quick", "--out", str(out), "--seed", "0"],
                       capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env=dict(os.environ, MPLBACKEND="Agg"))
    assert r.returncode == 0, f"{script} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["quick"] is True and metrics["claims"], "a lesson must record its claims"
    pngs = [f for f in os.listdir(out) if f.endswith(".png")]
    assert pngs, "a lesson must save at least one figure"
    assert metrics.get("main_figure") in pngs
    if (out / "routing.npz").exists():
        z = np.load(out / "routing.npz", allow_pickle=False)
        layers = [k for k in z.files if k.startswith("indices_layer")]
        assert "labels" in z.files and layers
        for k in layers:
            assert z[k].shape[0] == z["labels"].shape[0] and z[k].ndim == 2


def test_lesson_in_a_notebook_ignores_the_kernels_argv(tmp_path, monkeypatch):
    """Jupyter runs cells with sys.argv = [ipykernel_launcher, -f, kernel.json]; a lesson opened
    as a notebook must run with its defaults instead of failing on the kernel's flags."""
    import types
    from tinymoe.lesson import Lesson
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ipykernel_launcher.py", "-f", "/tmp/kernel-1.json"])
    with pytest.raises(SystemExit):                  # a plain script still rejects unknown flags
        Lesson("99_probe", "probe")
    monkeypatch.setitem(sys.modules, "ipykernel", types.ModuleType("ipykernel"))
    L = Lesson("99_probe", "probe")
    assert (L.quick, L.seeds, L.out) == (False, [0], os.path.join("runs", "99_probe"))

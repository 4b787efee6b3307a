"""Packaging: a light `import tinymoe`, declared dependencies, and the bench entry point."""
import configparser
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kernels          # numba is imported lazily, on the first kernel call
def test_import_is_light():
    code = ("import sys, tinymoe; import tinymoe.layers.basic, tinymoe.layers.attention; "
            "print(sorted(m for m in ('numba', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.bench
def test_setup_cfg_declares_dependencies():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = cfg["options"]["install_requires"]
    names = {line.split(">")[0].split("=")[0].split("<")[0].strip()
             for line in reqs.splitlines() if line.strip()}
    assert {"numpy", "numba", "matplotlib"} <= names


def _fake_bench(tmp_path, monkeypatch):
    """A throw-away section package: one good, one raising, one without run, one private."""
    name = "fakebench_" + "".join(c if c.isalnum() else "_" for c in tmp_path.name)
    pkg = tmp_path / name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "good.py").write_text(textwrap.dedent("""
        def run(quick):
            return [f"good quick={quick}"]
    """))
    (pkg / "broken.py").write_text("def run(quick):\n    raise RuntimeError('boom')\n")
    (pkg / "norun.py").write_text("X = 1\n")
    (pkg / "_helpers.py").write_text("raise SystemExit('helpers must not be run')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.bench
def test_bench_runs_every_section_and_fails_at_the_end(tmp_path, monkeypatch, capsys):
    from tinymoe.bench.__main__ import discover, main
    package = _fake_bench(tmp_path, monkeypatch)
    assert discover(package) == ["broken", "good", "norun"]
    assert main(["--quick"], package=package) == 1
    out = capsys.readouterr().out
    assert "numpy" in out.splitlines()[0] and "OPENBLAS_NUM_THREADS" in out.splitlines()[0]
    assert "good quick=True" in out
    assert "ERROR: RuntimeError: boom" in out
    assert "defines no run(quick)" in out
    assert "FAILED sections: broken, norun" in out


@pytest.mark.bench
def test_bench_only(tmp_path, monkeypatch, capsys):
    from tinymoe.bench.__main__ import main
    package = _fake_bench(tmp_path, monkeypatch)
    assert main(["--only", "good"], package=package) == 0
    out = capsys.readouterr().out
    assert "good quick=False" in out and "boom" not in out
    assert main(["--only", "missing"], package=package) == 1
    assert "no section named 'missing'" in capsys.readouterr().out

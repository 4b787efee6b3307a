"""The real benchmark sections run end to end in --quick mode (a smoke test: no timing is asserted)."""
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.bench


def test_every_section_runs_in_quick_mode():
    r = subprocess.run([sys.executable, "-m", "tinymoe.bench", "--quick"], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, OPENBLAS_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for section in ("busy", "mla", "moe", "profile", "scaling", "train"):
        assert f"({section}: ok" in r.stdout, r.stdout[-3000:]
    assert "MFU" in r.stdout and "naive/abs" in r.stdout
    assert "DeepSeek-V2-Lite" in r.stdout and "peak MB" in r.stdout and "busy" in r.stdout

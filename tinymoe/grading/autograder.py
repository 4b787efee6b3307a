"""Gradescope's autograder: the zip, and what its run_autograder does (reference/kits.md section 1).

The zip holds, at its root, `setup.sh` (installs the runtime dependencies once, when Gradescope
builds the image), `run_autograder`, and the reference project (tinymoe/, tests/ with the hidden
tests, setup.cfg, pyproject.toml, README.md). Gradescope unzips it into /autograder/source, puts
the student's upload in /autograder/submission and runs run_autograder, which calls
`python3 -m tinymoe.grading autograde --root /autograder` with the reference's tinymoe. That
copies the reference tree, takes from each submitted file only the code between its exercise
markers (a file or region missing from the upload stays a stub, so it scores 0), grades the
result with the hidden tests and writes /autograder/results/results.json.

AUTOGRADER_ROOT (instead of /autograder) and AUTOGRADER_PYTHON (instead of python3) let the
suite run run_autograder against a fake layout in a temporary folder;
TINYMOE_GRADE_EXERCISES=id,id limits a trial to a few exercises.
"""
from __future__ import annotations

import configparser
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import List, Optional, Tuple

from tinymoe.grading.catalogue import EXERCISES, select
from tinymoe.grading.handout import (HIDDEN_DIR, copy_project, exercise_files, project_root,
                                     switch_fused_off)
from tinymoe.grading.regions import find_regions, splice_regions, strip_regions
from tinymoe.grading.runner import grade, results_json, write_json

ZIP_PROJECT = ("tinymoe", "tests", "setup.cfg", "pyproject.toml", "README.md")

RUN_AUTOGRADER = """#!/usr/bin/env bash
# Gradescope runs this in /autograder after unzipping the autograder into /autograder/source and
# the student's upload into /autograder/submission; it writes /autograder/results/results.json.
# AUTOGRADER_ROOT and AUTOGRADER_PYTHON point it at a fake layout for a local trial.
set -u
ROOT="${AUTOGRADER_ROOT:-/autograder}"
PYTHON="${AUTOGRADER_PYTHON:-python3}"
cd "$ROOT/source" || exit 1
PYTHONPATH="$ROOT/source" exec "$PYTHON" -m tinymoe.grading autograde --root "$ROOT"
"""

SETUP_SH = """#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder image (Ubuntu 22.04 default).
# It installs tinymoe's runtime dependencies (setup.cfg install_requires) and pytest for the
# image's python3; the Gradescope harness keeps its own python3 packages.
set -euo pipefail
apt-get update
apt-get install -y python3 python3-pip python3-dev
python3 -m pip install {requirements}
"""


def requirements(root: Path) -> List[str]:
    """install_requires of setup.cfg, plus pytest."""
    cfg = configparser.ConfigParser()
    cfg.read(Path(root) / "setup.cfg")
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines() if r.strip()]
    return reqs + ["pytest>=7"]


def autograder_zip(out: Path, source: Optional[Path] = None) -> Tuple[Path, int]:
    """Write the autograder zip -> (path, number of files). Written to a temp file, then renamed."""
    root = project_root(source)
    out = Path(out).resolve()
    if out.suffix != ".zip":
        raise ValueError(f"{out}: the autograder must be a .zip file")
    if not (root / HIDDEN_DIR).is_dir():
        raise ValueError(f"{root / HIDDEN_DIR}: missing (the hidden tests go into the zip)")
    out.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with tempfile.TemporaryDirectory(prefix="tinymoe-zip-") as tmp:
        tree = Path(tmp) / "tree"
        tree.mkdir()
        for name in ZIP_PROJECT:
            if (root / name).is_dir():
                copy_project(root / name, tree / name)
            else:
                shutil.copy2(root / name, tree / name)
        part = out.with_name(f".{out.name}.part")
        with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as z:
            for name, text in (("setup.sh", SETUP_SH.format(
                    requirements=" ".join(f'"{r}"' for r in requirements(root)))),
                    ("run_autograder", RUN_AUTOGRADER)):
                info = zipfile.ZipInfo(name, date_time=(2024, 1, 1, 0, 0, 0))
                info.external_attr = (stat.S_IFREG | 0o755) << 16
                info.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(info, text)
                n += 1
            for f in sorted(p for p in tree.rglob("*") if p.is_file()):
                z.write(f, f.relative_to(tree).as_posix())
                n += 1
        os.replace(part, out)
    return out, n


def _find_submitted(submission: Path, rel: str) -> Optional[Path]:
    """The upload's version of a project file: same relative path, a path ending in it, or the
    same file name (uploads of single files); None if absent or ambiguous."""
    direct = submission / rel
    if direct.is_file():
        return direct
    files = [p for p in submission.rglob("*.py") if p.is_file()]
    ending = [p for p in files if p.as_posix().endswith("/" + rel)]
    if len(ending) == 1:
        return ending[0]
    named = [p for p in files if p.name == Path(rel).name]
    return named[0] if len(named) == 1 else None


def assemble(source: Path, submission: Path, tree: Path) -> List[str]:
    """Reference tree + the submission's region bodies -> notes for the student (one per problem)."""
    copy_project(source, tree)
    for extra in ("setup.sh", "run_autograder"):
        (tree / extra).unlink(missing_ok=True)
    notes = []
    hints = {e.id: e.hint for e in EXERCISES}
    for rel in exercise_files(twins=False):   # twin-only files keep the reference (switched off)
        path = tree / rel
        ref = path.read_text()
        ids = {r.exercise_id for r in find_regions(ref, rel)}
        got = _find_submitted(submission, rel)
        if got is None:
            new, _ = strip_regions(ref, ids, hints, rel)
            notes.append(f"{rel}: not in the submission; its exercises ({', '.join(sorted(ids))}) "
                         f"score 0")
        else:
            try:
                new, bad = splice_regions(ref, got.read_text(), ids, rel, got.name)
            except (ValueError, UnicodeDecodeError) as e:
                new, bad = ref, sorted(ids)
                notes.append(f"{rel}: cannot read the exercise markers ({e})")
            if bad:
                new, _ = strip_regions(new, bad, hints, rel)
                notes.append(f"{rel}: the '# BEGIN EXERCISE' markers of {', '.join(bad)} are "
                             f"missing or duplicated; those exercises score 0")
        path.write_text(new)
    switch_fused_off(tree)           # the submission's plain functions are what runs
    return notes


def autograde(root: Path) -> int:
    """What run_autograder does: assemble, grade, write results/results.json -> exit code."""
    root = Path(root)
    results = root / "results" / "results.json"
    try:
        exercises = select(os.environ.get("TINYMOE_GRADE_EXERCISES"))
        with tempfile.TemporaryDirectory(prefix="tinymoe-autograde-") as tmp:
            tree = Path(tmp) / "tree"
            notes = assemble(root / "source", root / "submission", tree)
            hidden = root / "source" / HIDDEN_DIR
            scores, seconds, graded = grade(tree, exercises, hidden=hidden if hidden.is_dir() else None)
        output = "\n".join(notes) if notes else "All exercise files found in the submission."
        write_json(results, results_json(scores, seconds, output))
        print(f"graded {graded}: {sum(s.earned for s in scores):.2f} points in {seconds:.0f} s")
        return 0
    except Exception as e:    # noqa: BLE001 - Gradescope must get a results.json whatever happens
        write_json(results, {"score": 0.0, "output": f"The autograder failed: {type(e).__name__}: "
                             f"{e}. Please tell the course staff.", "stdout_visibility": "hidden",
                             "tests": []})
        print(f"autograder error: {type(e).__name__}: {e}")
        return 1

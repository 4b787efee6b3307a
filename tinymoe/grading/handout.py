"""Student copies: the whole project with the chosen exercise regions replaced by stubs.

    student_copy("handout", exercises=select("all"), hide_tests=True)

writes a pip-installable copy (setup.cfg, pyproject.toml, README, lessons, tests ...) with build
outputs, caches and runs left out, each chosen region stubbed (tinymoe/grading/regions.py) and,
with hide_tests, the instructor-only tests/hidden/ folder left out. The copy is assembled in a
temporary folder beside OUT and renamed into place, so OUT is either complete or absent.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

from tinymoe.atomic import write_atomic
from tinymoe.grading.catalogue import EXERCISES, Exercise
from tinymoe.grading.regions import find_regions, strip_regions

HIDDEN_DIR = Path("tests") / "hidden"
_SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "runs", "build", "dist", ".whl", ".gl",
              ".ipynb_checkpoints", ".mypy_cache", ".ruff_cache"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".nbi", ".nbc", ".egg-info")


def project_root(start: Optional[Path] = None) -> Path:
    """The source checkout holding the imported tinymoe (or `start`): it has setup.cfg and tinymoe/."""
    if start is None:
        import tinymoe
        start = Path(tinymoe.__file__).resolve().parents[1]
    root = Path(start).resolve()
    if not (root / "tinymoe" / "__init__.py").is_file() or not (root / "setup.cfg").is_file():
        raise ValueError(f"{root}: not a tinymoe project (expected setup.cfg and tinymoe/__init__.py)")
    return root


def exercise_files(exercises: Iterable[Exercise] = EXERCISES, twins: bool = True) -> List[str]:
    """The project-relative files that hold the regions of these exercises (with their fused
    twins, unless twins=False), sorted."""
    return sorted({w.split(":", 1)[0] for e in exercises
                   for w in e.where + (e.twins if twins else ())})


_FUSED_ON = "FUSED_KERNELS = True\n"


def switch_fused_off(root: Path) -> None:
    """Set tinymoe.kernels.FUSED_KERNELS = False in the tree at root (see catalogue.Exercise.twins)."""
    path = Path(root) / "tinymoe" / "kernels" / "__init__.py"
    text = path.read_text()
    if text.count(_FUSED_ON) != 1:
        raise ValueError(f"{path}: expected one line {_FUSED_ON.strip()!r} to switch off")
    _write_text(path, text.replace(_FUSED_ON, "FUSED_KERNELS = False\n"))


def copy_project(src: Path, dst: Path, hide_tests: bool = False, keep_caches: bool = False) -> None:
    """Copy the project tree src -> dst (dst must not exist), leaving out build outputs and caches.

    keep_caches keeps __pycache__ (numba's compiled kernels are valid for an unchanged source:
    copy2 keeps the modification times numba's cache index checks).
    """
    src = Path(src)
    skip_dirs = _SKIP_DIRS - ({"__pycache__"} if keep_caches else set())

    def ignore(folder, names):
        rel = Path(folder).resolve().relative_to(src.resolve())
        out = {n for n in names if n in skip_dirs or n.startswith("tmp_") and rel == Path(".")}
        out |= {n for n in names if n.endswith(_SKIP_SUFFIXES) and
                not (keep_caches and n.endswith((".nbi", ".nbc", ".pyc")))}
        if hide_tests and rel == HIDDEN_DIR.parent:
            out.add(HIDDEN_DIR.name)
        return out

    shutil.copytree(src, dst, ignore=ignore, symlinks=True)


def strip_tree(root: Path, exercises: Iterable[Exercise]) -> Dict[str, int]:
    """Stub every region of these exercises under root, in place -> {file: regions stubbed}."""
    exercises = tuple(exercises)
    ids = {e.id for e in exercises}
    hints = {e.id: e.hint for e in exercises}
    done: Dict[str, int] = {}
    for rel in exercise_files(exercises):
        path = Path(root) / rel
        text = path.read_text()
        new, n = strip_regions(text, ids, hints, str(path))
        if n:
            _write_text(path, new)
            done[rel] = n
    found = {r.exercise_id for rel in done for r in find_regions((Path(root) / rel).read_text())}
    missing = sorted(ids - found)
    if missing:
        raise ValueError(f"{root}: no '# BEGIN EXERCISE' region found for {', '.join(missing)} "
                         f"in {', '.join(exercise_files(exercises))}")
    return done


def student_copy(out: Path, exercises: Iterable[Exercise] = EXERCISES, hide_tests: bool = False,
                 source: Optional[Path] = None) -> Tuple[Path, Dict[str, int]]:
    """Write the handout to `out` (which must not exist or be an empty folder) -> (out, stubbed)."""
    src = project_root(source)
    out = Path(out).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: already exists and is not an empty folder; choose a new OUT")
    if out == src or src in out.parents:
        raise ValueError(f"{out}: is inside the project {src}; choose a folder outside it")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        copy_project(src, work / "tree", hide_tests=hide_tests)
        stubbed = strip_tree(work / "tree", exercises)
        switch_fused_off(work / "tree")
        if out.exists():
            out.rmdir()
        os.replace(work / "tree", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out, stubbed


def _write_text(path: Path, text: str) -> None:
    write_atomic(str(path), text.encode("utf-8"))

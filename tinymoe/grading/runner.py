"""Run an exercise's tests in a pytest subprocess and turn the outcomes into points.

    results = run_tests(root, ["tests/test_norm.py::test_gradcheck_rmsnorm"])    # {nodeid: ...}
    scores = score(exercises, results)                                          # one per exercise
    grade(path, exercises, hidden=DIR, json_file=FILE)                          # the whole thing

The subprocess runs with the code under `root` first on sys.path (cwd and PYTHONPATH), and the
grading plugin (tinymoe/grading/plugin.py, copied outside the graded tree) stops it unless the
imported tinymoe is the one under root, so an editable install elsewhere can never be graded by
mistake. An exercise earns points * passed / tests, where its tests are the catalogue's node ids
(every parametrization counts once) plus, when given, its hidden tests.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence

from tinymoe.atomic import write_atomic
from tinymoe.grading.catalogue import EXERCISES, Exercise, _matches, hidden_file
from tinymoe.grading.errors import NOT_DONE
from tinymoe.grading.handout import HIDDEN_DIR, copy_project, project_root

PLUGIN = "_tinymoe_grade_plugin"


class TestResult(NamedTuple):
    nodeid: str
    outcome: str         # passed, failed, skipped, error, missing
    message: str         # first line of the failure, the skip reason, or ""
    hidden: bool


class Score(NamedTuple):
    exercise: Exercise
    earned: float
    results: List[TestResult]

    @property
    def passed(self) -> int:
        return sum(r.outcome == "passed" for r in self.results)


class RunError(RuntimeError):
    """The test run itself went wrong (wrong tinymoe imported, timeout, pytest crashed)."""


def _test_exists(root: Path, nodeid: str) -> bool:
    """Whether the file of a node id exists under root and defines its test function."""
    path, _, name = nodeid.partition("::")
    f = root / path
    if not f.is_file() or not name:
        return f.is_file()
    func = name.split("[")[0].split("::")[-1]
    return re.search(rf"^\s*def {re.escape(func)}\(", f.read_text(), re.M) is not None


def run_tests(root: Path, nodeids: Sequence[str], timeout: float = 1800.0,
              extra_env: Optional[Dict[str, str]] = None):
    """pytest on these node ids with the code under root -> (json record of the plugin, output).

    Node ids whose test does not exist under root are not passed to pytest (the caller reports
    them as missing). Raises RunError when the imported tinymoe is not root's or pytest crashes.
    """
    root = Path(root).resolve()
    present = [n for n in nodeids if _test_exists(root, n)]
    with tempfile.TemporaryDirectory(prefix="tinymoe-grade-") as tmp:
        shutil.copyfile(Path(__file__).with_name("plugin.py"), Path(tmp) / f"{PLUGIN}.py")
        out = Path(tmp) / "results.json"
        env = dict(os.environ, **(extra_env or {}))
        env["PYTHONPATH"] = os.pathsep.join([str(root), tmp] +
                                            [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(TINYMOE_GRADE_ROOT=str(root), TINYMOE_GRADE_OUT=str(out), MPLBACKEND="Agg")
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", PLUGIN,
               "--rootdir", str(root), "--tb=short", *present]
        if not present:
            return {"tinymoe": None, "tests": {}, "collect_errors": []}, ""
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RunError(f"the tests did not finish within {timeout:.0f} s") from None
        output = proc.stdout + proc.stderr
        if not out.is_file():
            raise RunError(f"pytest stopped before running any test (exit {proc.returncode}):\n"
                           f"{output[-2000:]}")
        record = json.loads(out.read_text())
    if proc.returncode == 3:
        raise RunError(output.strip().splitlines()[-1] if output.strip() else "wrong tinymoe imported")
    return record, output


def score(exercises: Iterable[Exercise], record: dict, hidden: bool = False) -> List[Score]:
    """Per-exercise points from a run's record (tests that never ran count as failed)."""
    tests = record.get("tests", {})
    collect = record.get("collect_errors", [])
    scores = []
    for ex in exercises:
        results = []
        entries = list(ex.tests) + ([hidden_file(ex.id)] if hidden else [])
        for entry in entries:
            is_hidden = entry == hidden_file(ex.id)
            got = [n for n in tests if (n.split("::")[0] == entry if is_hidden else _matches(n, entry))]
            if not got:
                err = next((c["message"] for c in collect if entry.startswith(c["nodeid"])), None)
                if is_hidden and err is None:
                    continue                                   # no hidden tests for this one
                results.append(TestResult(entry, "missing", f"did not run: {err}" if err else
                                          "did not run: test not found in the graded tree", is_hidden))
            for n in got:
                t = tests[n]
                results.append(TestResult(n, t["outcome"], short_message(t["message"]), is_hidden))
        n_pass = sum(r.outcome == "passed" for r in results)
        earned = round(ex.points * n_pass / len(results), 2) if results else 0.0
        scores.append(Score(ex, earned, results))
    return scores


def short_message(message: str) -> str:
    """A failure message, with a stub's long ExerciseNotDone text cut to its first words."""
    m = NOT_DONE.search(message)
    if m and "waiting on" not in message:
        return f"exercise {m.group(1)} is not done yet (its stub raises ExerciseNotDone)"
    return message


def first_failure(s: Score, reveal_hidden: bool = True) -> str:
    """One line: the first failing test and its message (hidden test names withheld if asked)."""
    for r in s.results:
        if r.outcome != "passed":
            name = r.nodeid if reveal_hidden or not r.hidden else "a hidden test"
            return f"{name}: {r.message}"
    return ""


def exercise_output(s: Score, reveal_hidden: bool = False) -> str:
    """The per-exercise text of results.json: counts, then each failure (hidden ones anonymised)."""
    vis = [r for r in s.results if not r.hidden]
    hid = [r for r in s.results if r.hidden]
    lines = [f"{sum(r.outcome == 'passed' for r in vis)}/{len(vis)} tests passed"]
    if hid:
        lines[0] += f"; hidden tests: {sum(r.outcome == 'passed' for r in hid)}/{len(hid)} passed"
    for r in s.results:
        if r.outcome == "passed":
            continue
        if r.hidden and not reveal_hidden:
            lines.append(f"- a hidden test {r.outcome}")
        else:
            lines.append(f"- {r.outcome.upper()} {r.nodeid}: {r.message}")
    lines.append(f"where: {'; '.join(s.exercise.where)}")
    return "\n".join(lines)


def results_json(scores: Sequence[Score], execution_time: float, output: str = "") -> dict:
    """Gradescope's results.json: one test entry per exercise (see reference/kits.md section 1)."""
    tests = [{"name": f"{s.exercise.id}: {s.exercise.title}", "number": str(i + 1),
              "score": s.earned, "max_score": float(s.exercise.points),
              "output": exercise_output(s), "visibility": "visible"}
             for i, s in enumerate(scores)]
    return {"score": round(sum(s.earned for s in scores), 2),
            "execution_time": round(execution_time, 1),
            "output": output, "stdout_visibility": "hidden", "visibility": "visible",
            "tests": tests}


def table(scores: Sequence[Score]) -> str:
    """The points table: exercise, points earned / possible, tests passed, first failure."""
    w = max(len(s.exercise.id) for s in scores)
    lines = [f"{'exercise':<{w}}  {'points':>11}  {'tests':>5}  first failure"]
    for s in scores:
        fail = first_failure(s)
        fail = fail if len(fail) <= 110 else fail[:107] + "..."
        lines.append(f"{s.exercise.id:<{w}}  {s.earned:>5.2f} / {s.exercise.points:<3d}  "
                     f"{s.passed:>2d}/{len(s.results):<2d}  {fail}")
    total = sum(s.earned for s in scores)
    possible = sum(s.exercise.points for s in scores)
    lines.append(f"{'total':<{w}}  {total:>5.2f} / {possible:<3d}")
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """Write JSON atomically (temporary file beside it, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(str(path), (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def grade(path: Path, exercises: Sequence[Exercise] = EXERCISES, hidden: Optional[Path] = None,
          json_file: Optional[Path] = None, output: str = "", timeout: float = 1800.0):
    """Grade the project at `path` -> (scores, seconds, tinymoe file that was graded).

    The tree is copied to a temporary folder (caches kept, PATH left untouched), the hidden tests
    of `hidden` (a folder of test_hidden_*.py) are put in its tests/hidden/, and pytest runs
    there with that copy first on sys.path.
    """
    t0 = time.perf_counter()
    src = project_root(path)
    if hidden is not None and not Path(hidden).is_dir():
        raise ValueError(f"--hidden {hidden}: not a folder")
    with tempfile.TemporaryDirectory(prefix="tinymoe-graded-") as tmp:
        tree = Path(tmp) / "tree"
        copy_project(src, tree, keep_caches=True)
        nodeids = [t for e in exercises for t in e.tests]
        if hidden is not None:
            shutil.rmtree(tree / HIDDEN_DIR, ignore_errors=True)
            (tree / HIDDEN_DIR).mkdir(parents=True)
            for f in sorted(Path(hidden).glob("test_hidden_*.py")):
                shutil.copy2(f, tree / HIDDEN_DIR / f.name)
            nodeids += [hidden_file(e.id) for e in exercises if (tree / hidden_file(e.id)).is_file()]
        record, _ = run_tests(tree, nodeids, timeout=timeout)
        graded = record.get("tinymoe") or ""
        if graded.startswith(str(tree.resolve()) + os.sep):     # report PATH, not the temporary copy
            graded = str(src / Path(graded).parent.relative_to(tree.resolve()))
    scores = score(exercises, record, hidden=hidden is not None)
    seconds = time.perf_counter() - t0
    if json_file is not None:
        write_json(json_file, results_json(scores, seconds, output))
    return scores, seconds, graded

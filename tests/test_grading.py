"""The instructor kit: exercise regions, student copies, the grader, results.json, the autograder.

Expected scores come from what was done to a copy (which regions were stubbed, which line was
broken), never from a previous run of the grader. Every grade here runs only a few exercises'
tests; the full 'every exercise stubbed, then the whole suite' check is run by hand (README).
"""
import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tinymoe.grading.__main__ import main
from tinymoe.grading.catalogue import BY_ID, EXERCISES, hidden_file, select
from tinymoe.grading.errors import ExerciseNotDone
from tinymoe.grading.handout import exercise_files, student_copy
from tinymoe.grading.regions import find_regions, splice_regions, strip_regions
from tinymoe.grading.runner import grade

pytestmark = pytest.mark.grading

ROOT = Path(__file__).resolve().parents[1]
if any('raise ExerciseNotDone("' in (ROOT / f).read_text() for f in exercise_files()):
    pytest.skip("a student copy (exercise stubs present): the instructor kit is tested on the "
                "reference", allow_module_level=True)
STRIPPED = ("adamw", "bias-update", "grpo")          # leaves: no other exercise's tests run them
UNTOUCHED = ("rmsnorm-backward", "rope")


def closure(ex_id):
    """Every exercise an exercise's tests may wait on (prerequisites of prerequisites too)."""
    out, todo = set(), list(BY_ID[ex_id].prereqs)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += BY_ID[p].prereqs
    return out


# ------------------------------------------------------------------------------------------------
# the catalogue and the regions
# ------------------------------------------------------------------------------------------------

def test_catalogue_matches_the_markers_and_the_tests():
    assert len(EXERCISES) >= 14 and sum(e.points for e in EXERCISES) == 40
    found = {}
    for rel in exercise_files():
        for r in find_regions((ROOT / rel).read_text(), rel):
            found.setdefault(r.exercise_id, []).append(rel)
    assert set(found) == set(BY_ID), "every marker id is catalogued and every exercise is marked"
    for e in EXERCISES:
        regions = e.where + e.twins                               # one region per entry
        assert sorted(w.split(":")[0] for w in regions) == sorted(found[e.id]), e.id
        assert set(e.prereqs) <= set(BY_ID) and e.id not in closure(e.id), e.id
        assert e.tests and len(e.hint.splitlines()) <= 4, e.id
        for t in e.tests:
            path, name = t.split("::")
            src = (ROOT / path).read_text()
            assert re.search(rf"^def {re.escape(name.split('[')[0])}\(", src, re.M), t
    assert all((ROOT / hidden_file(i)).is_file() for i in ("rmsnorm-backward", "rope", "bias-update"))


SAMPLE = '''"""Module."""
from __future__ import annotations


def backward(dy, cache):
    """[N, D] -> dx [N, D], dw [D]."""
    x, w = cache
    # BEGIN EXERCISE demo
    # 2. forward: y = w * x
    dw = (dy * x).sum(axis=0)        # [D]
    dx = (dy *
          w)                         # [N, D]
    return dx, dw
    # END EXERCISE
'''


def test_stub_keeps_signature_docstring_comments_and_splices_back():
    stub, n = strip_regions(SAMPLE, ["demo"], {"demo": "dx = dy * w\ndw = sum of dy * x"})
    assert n == 1
    body = stub.split("# BEGIN EXERCISE demo\n")[1].split("    # END EXERCISE")[0].splitlines()
    assert body == ["    # 2. forward: y = w * x",
                    "    # dw = ...                       # [D]",
                    "    # dx = ...                       # [N, D]",
                    "    # TODO(demo): write this part; `python -m tinymoe.grading check demo` tests it.",
                    "    #   dx = dy * w",
                    "    #   dw = sum of dy * x",
                    '    raise ExerciseNotDone("demo")']
    assert '"""[N, D] -> dx [N, D], dw [D]."""' in stub and "def backward(dy, cache):" in stub
    assert "from __future__ import annotations\nfrom tinymoe.grading import ExerciseNotDone" in stub
    ns = {}
    exec(compile(stub, "stub", "exec"), ns)
    with pytest.raises(ExerciseNotDone) as e:
        ns["backward"](1.0, (2.0, 3.0))
    assert e.value.exercise_id == "demo"
    back, bad = splice_regions(stub, SAMPLE, ["demo"])
    assert bad == [] and back.replace(
        "from tinymoe.grading import ExerciseNotDone  # raised by the exercise stubs below\n", "") == SAMPLE


@pytest.mark.parametrize("text, rule", [
    ("    # BEGIN EXERCISE a\n    # BEGIN EXERCISE b\n    # END EXERCISE\n", "do not nest"),
    ("    # BEGIN EXERCISE a\n    x = 1\n", "has no END"),
    ("    # END EXERCISE\n", "without a BEGIN"),
    ("    # BEGIN EXERCISE a\n        # END EXERCISE\n", "indented differently"),
    ("    # BEGIN EXERCISE Bad_Id\n", "malformed")])
def test_malformed_markers_are_errors_naming_the_line(text, rule):
    with pytest.raises(ValueError, match=rf"f.py:\d+: .*{rule}"):
        find_regions(text, "f.py")


# ------------------------------------------------------------------------------------------------
# student copies and grading them
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def handout(tmp_path_factory):
    out, stubbed = student_copy(tmp_path_factory.mktemp("h") / "handout", select(",".join(STRIPPED)),
                                hide_tests=True)
    return out, stubbed


def test_student_copy_is_complete_and_hides_the_hidden_tests(handout):
    out, stubbed = handout
    # adamw: AdamW.step and its fused twins (AdamW._step_fused, kernels/optim.py's two bodies)
    assert stubbed == {"tinymoe/optim.py": 2, "tinymoe/kernels/optim.py": 2,
                       "tinymoe/layers/router.py": 1, "tinymoe/grpo/objective.py": 2}
    assert "m *= b1" not in (out / "tinymoe/kernels/optim.py").read_text()
    # the fused paths are off in a copy: one line differs, so the plain functions run
    ref = (ROOT / "tinymoe/kernels/__init__.py").read_text()
    assert (out / "tinymoe/kernels/__init__.py").read_text() == \
        ref.replace("FUSED_KERNELS = True\n", "FUSED_KERNELS = False\n") != ref
    for f in ("setup.cfg", "pyproject.toml", "README.md", "lessons/01_backprop.py",
              "tests/conftest.py", "tinymoe/layers/norm.py", "tinymoe/kernels/moe.py"):
        assert (out / f).read_bytes() == (ROOT / f).read_bytes(), f       # untouched
    assert not (out / "tests" / "hidden").exists() and (ROOT / "tests" / "hidden").is_dir()
    assert not list(out.rglob("*.nbi")) and not list(out.rglob("*.egg-info"))
    text = (out / "tinymoe/layers/router.py").read_text()
    assert 'raise ExerciseNotDone("bias-update")' in text and "gamma * step" not in text
    assert '"""bias [E], load [E], gamma -> new bias [E]' in text         # docstring kept


def test_round_trip_zero_on_exactly_the_stubbed_exercises_then_full_marks(handout, tmp_path):
    out, _ = handout
    scores, _, graded = grade(out, select(",".join(STRIPPED + UNTOUCHED)),
                              json_file=tmp_path / "results.json")
    assert graded == str(out / "tinymoe")                     # the copy, not this checkout
    got = {s.exercise.id: s for s in scores}
    for i in STRIPPED:
        assert got[i].earned == 0 and got[i].passed == 0
        assert all(r.outcome == "failed" and f"exercise {i} is not done" in r.message
                   for r in got[i].results), i
    for i in UNTOUCHED:
        assert got[i].earned == BY_ID[i].points and got[i].passed == len(got[i].results) > 0
    # results.json, field by field (Gradescope's schema, reference/kits.md section 1)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) >= {"score", "tests", "execution_time", "stdout_visibility"}
    assert data["score"] == sum(BY_ID[i].points for i in UNTOUCHED)
    assert data["stdout_visibility"] == "hidden" and data["execution_time"] > 0
    assert [t["name"] for t in data["tests"]] == [f"{e.id}: {e.title}" for e in
                                                  select(",".join(STRIPPED + UNTOUCHED))]
    for t in data["tests"]:
        assert set(t) >= {"name", "score", "max_score", "output", "visibility"}
        assert t["visibility"] == "visible" and 0 <= t["score"] <= t["max_score"]
        assert isinstance(t["output"], str) and t["output"]
    # put the reference bodies back: the exercise files are the reference again, byte for byte
    for rel in exercise_files(select(",".join(STRIPPED))):
        new, bad = splice_regions((out / rel).read_text(), (ROOT / rel).read_text(), STRIPPED)
        assert bad == []
        new = new.replace("from tinymoe.grading import ExerciseNotDone  # raised by the exercise "
                          "stubs below\n", "")
        assert new == (ROOT / rel).read_text(), rel
        (out / rel).write_text(new)


def test_the_reference_grades_full_marks_with_its_hidden_tests(tmp_path):
    ids = STRIPPED + UNTOUCHED
    scores, _, graded = grade(ROOT, select(",".join(ids)), hidden=ROOT / "tests" / "hidden",
                              json_file=tmp_path / "r.json")
    assert graded == str(ROOT / "tinymoe")
    assert all(s.earned == s.exercise.points and s.passed == len(s.results) for s in scores)
    hidden = {s.exercise.id: [r for r in s.results if r.hidden] for s in scores}
    assert [len(hidden[i]) for i in ids] == [0, 1, 0, 1, 1]             # counted when given
    out = {t["name"].split(":")[0]: t["output"] for t in json.loads((tmp_path / "r.json").read_text())["tests"]}
    assert "hidden tests: 1/1 passed" in out["rope"] and "test_hidden" not in out["rope"]


def test_a_sign_flip_scores_zero_with_a_message_naming_the_tensor(tmp_path):
    out, _ = student_copy(tmp_path / "wrong", select("rmsnorm-backward"))
    norm = out / "tinymoe/layers/norm.py"
    text = (ROOT / "tinymoe/layers/norm.py").read_text()
    wrong = text.replace("dx = r * g - x * (r ** 3)", "dx = r * g + x * (r ** 3)")
    assert wrong.count("dx = r * g + x * (r ** 3)") == 1
    norm.write_text(splice_regions(norm.read_text(), wrong, ["rmsnorm-backward"])[0])
    (s,) = grade(out, select("rmsnorm-backward"), hidden=ROOT / "tests" / "hidden")[0]
    assert s.earned == 0 and len(s.results) == 2 and s.passed == 0
    assert "gradient check failed for 'x'" in s.results[0].message      # names the tensor
    assert s.results[1].hidden


def test_every_exercise_stubbed_scores_zero_and_waits_only_on_its_prerequisites(tmp_path):
    out, _ = student_copy(tmp_path / "all", EXERCISES)
    scores, _, _ = grade(out, EXERCISES)
    for s in scores:
        assert s.earned == 0, s.exercise.id
        for r in s.results:
            if r.outcome == "failed":
                assert f"exercise {s.exercise.id} is not done" in r.message, r
            else:
                assert r.outcome == "skipped", r
                assert r.message.split()[-1] in closure(s.exercise.id), r


def test_check_reports_the_failure_and_the_hint(tmp_path, capsys):
    student, _ = student_copy(tmp_path / "student", select("bias-update"))
    router = student / "tinymoe/layers/router.py"
    wrong = (ROOT / "tinymoe/layers/router.py").read_text().replace(
        "np.sign(c.mean() - c)", "np.sign(c - c.mean())")
    router.write_text(splice_regions(router.read_text(), wrong, ["bias-update"])[0])
    assert main(["check", "bias-update", "--path", str(student)]) == 1
    text = capsys.readouterr().out
    assert "FAIL tests/test_balance.py::test_update_bias_moves_by_exactly_gamma" in text
    assert "assert" in text and "where: tinymoe/layers/router.py: update_bias" in text
    assert "sign(mean_j c_j - c_i)" in text                               # the equation


# ------------------------------------------------------------------------------------------------
# the autograder zip, run against a fake /autograder
# ------------------------------------------------------------------------------------------------

def test_autograder_zip_runs_against_a_fake_autograder_root(tmp_path):
    zpath = tmp_path / "autograder.zip"
    assert main(["autograder-zip", str(zpath)]) == 0
    root = tmp_path / "autograder"
    with zipfile.ZipFile(zpath) as z:
        names = z.namelist()
        assert {"setup.sh", "run_autograder", "setup.cfg", hidden_file("rope")} <= set(names)
        assert z.getinfo("run_autograder").external_attr >> 16 & 0o111
        z.extractall(root / "source")
    assert '"numba>=0.58"' in (root / "source/setup.sh").read_text()
    # the upload: optim.py as handed out (adamw stubbed), a finished router.py; no rope.py
    sub = root / "submission"
    sub.mkdir()
    (sub / "optim.py").write_text(strip_regions((ROOT / "tinymoe/optim.py").read_text(), ["adamw"],
                                                {})[0])
    (sub / "router.py").write_text((ROOT / "tinymoe/layers/router.py").read_text())
    env = dict(os.environ, AUTOGRADER_ROOT=str(root), AUTOGRADER_PYTHON=sys.executable,
               TINYMOE_GRADE_EXERCISES="adamw,rope,bias-update")
    r = subprocess.run(["bash", str(root / "source/run_autograder")], env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads((root / "results/results.json").read_text())
    got = {t["name"].split(":")[0]: t for t in data["tests"]}
    assert got["adamw"]["score"] == 0 and got["rope"]["score"] == 0          # stub; file missing
    assert got["bias-update"]["score"] == got["bias-update"]["max_score"] == 1
    assert "hidden tests: 1/1 passed" in got["bias-update"]["output"]
    assert data["score"] == 1 and "tinymoe/layers/rope.py: not in the submission" in data["output"]


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["check", "no-such-exercise"]) == 2
    assert main(["student-copy", str(tmp_path), "--exercises", "rope,nope"]) == 2
    (tmp_path / "x").write_text("")
    assert main(["student-copy", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("error: ") for e in err)
    assert "no-such-exercise" in err[0] and "nope" in err[1] and "not an empty folder" in err[2]

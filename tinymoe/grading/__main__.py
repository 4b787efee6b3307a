"""python -m tinymoe.grading {list, student-copy, check, grade, autograder-zip} (see __init__.py).

A user's mistake or an OS error ends with one line on stderr and exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tinymoe.grading.catalogue import EXERCISES, get, select


def cmd_list(args) -> int:
    w = max(len(e.id) for e in EXERCISES)
    p = max(len(",".join(e.prereqs) or "-") for e in EXERCISES)
    p = min(p, 40)
    for e in EXERCISES:
        pre = ",".join(e.prereqs) or "-"
        if len(pre) > p:
            pre = f"{len(e.prereqs)} exercises"
        print(f"{e.id:<{w}}  {e.points:>2d}  {pre:<{p}}  {e.title}")
    print(f"{len(EXERCISES)} exercises, {sum(e.points for e in EXERCISES)} points")
    return 0


def cmd_student_copy(args) -> int:
    from tinymoe.grading.handout import student_copy
    exercises = select(args.exercises)
    out, stubbed = student_copy(Path(args.out), exercises, hide_tests=args.hide_tests)
    print(f"wrote {out}: {len(exercises)} exercise(s) stubbed in {sum(stubbed.values())} regions "
          f"of {len(stubbed)} files" + ("; tests/hidden left out" if args.hide_tests else ""))
    print(f"  students: cd {out} && pip install -e '.[test]' && python -m tinymoe.grading list")
    print("            then write each region and run python -m tinymoe.grading check <id>")
    return 0


def cmd_check(args) -> int:
    from tinymoe.grading.handout import project_root
    from tinymoe.grading.runner import run_tests, score
    ex = get(args.id)
    if args.path is None and (Path.cwd() / "setup.cfg").is_file() and (Path.cwd() / "tinymoe").is_dir():
        args.path = Path.cwd()                   # the copy you are in, else the imported tinymoe's
    root = project_root(args.path)
    record, _ = run_tests(root, ex.tests)
    (s,) = score([ex], record)
    print(f"{ex.id}: {ex.title}  ({s.passed}/{len(s.results)} checks passed, "
          f"{s.earned:g}/{ex.points} points)")
    waiting = sorted({r.message.rsplit(" ", 1)[-1] for r in s.results
                      if r.outcome == "skipped" and r.message.startswith("waiting on exercise")})
    for r in s.results:
        mark = {"passed": "ok  ", "skipped": "wait"}.get(r.outcome, "FAIL")
        print(f"  {mark} {r.nodeid}")
        if r.outcome not in ("passed", "skipped"):
            msg = r.message if len(r.message) < 600 else r.message[:600] + " ..."
            print(f"       {msg}")
    if waiting:
        print(f"  waiting on {', '.join(waiting)}: do it first (python -m tinymoe.grading check "
              f"{waiting[0]})")
    if s.passed < len(s.results):
        print(f"  where: {'; '.join(ex.where)}")
        print("  hint:  " + "\n         ".join(ex.hint.splitlines()))
    return 0 if s.passed == len(s.results) else 1


def cmd_grade(args) -> int:
    from tinymoe.grading.runner import grade, table
    exercises = select(args.exercises)
    scores, seconds, graded = grade(Path(args.path), exercises,
                                    hidden=Path(args.hidden) if args.hidden else None,
                                    json_file=Path(args.json) if args.json else None)
    print(table(scores))
    print(f"graded {graded} in {seconds:.1f} s" +
          (f"; hidden tests from {args.hidden}" if args.hidden else "") +
          (f"; wrote {args.json}" if args.json else ""))
    return 0


def cmd_autograder_zip(args) -> int:
    from tinymoe.grading.autograder import autograder_zip
    out, n = autograder_zip(Path(args.out))
    print(f"wrote {out} ({n} files): upload it as the Gradescope autograder "
          f"(setup.sh and run_autograder at its root)")
    return 0


def cmd_autograde(args) -> int:
    from tinymoe.grading.autograder import autograde
    return autograde(Path(args.root))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinymoe.grading",
                                 description="Exercises cut from the reference: handouts, checks, grading.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the exercises: id, points, prerequisites, title")
    p = sub.add_parser("student-copy", help="write a student handout")
    p.add_argument("out", help="new folder for the copy")
    p.add_argument("--exercises", default="all", help="ID,ID,... or all (default)")
    p.add_argument("--hide-tests", action="store_true", help="leave out tests/hidden/")
    p = sub.add_parser("check", help="run one exercise's tests (for students)")
    p.add_argument("id")
    p.add_argument("--path", default=None, help="project to check (default: the current folder "
                   "if it is one, else the imported tinymoe's)")
    p = sub.add_parser("grade", help="grade the project at PATH per exercise")
    p.add_argument("path", nargs="?", default=".")
    p.add_argument("--json", help="write Gradescope's results.json here")
    p.add_argument("--hidden", help="folder of instructor-only tests (test_hidden_*.py)")
    p.add_argument("--exercises", default="all", help="ID,ID,... or all (default)")
    p = sub.add_parser("autograder-zip", help="write the Gradescope autograder zip")
    p.add_argument("out")
    p = sub.add_parser("autograde", help="what the zip's run_autograder calls: grade ROOT/submission "
                       "into ROOT/results/results.json")
    p.add_argument("--root", default="/autograder")
    args = ap.parse_args(argv)
    handlers = {"list": cmd_list, "student-copy": cmd_student_copy, "check": cmd_check,
                "grade": cmd_grade, "autograder-zip": cmd_autograder_zip, "autograde": cmd_autograde}
    from tinymoe.grading.runner import RunError
    try:
        return handlers[args.cmd](args)
    except (ValueError, KeyError, OSError, RunError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

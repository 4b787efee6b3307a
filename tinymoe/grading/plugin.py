"""The pytest plugin of the grader, loaded as `-p _tinymoe_grade_plugin` in a pytest subprocess.

The runner copies this file into a temporary folder (outside the graded tree, so a submission
cannot change it) and puts that folder on PYTHONPATH. It checks that the imported tinymoe is the
one under TINYMOE_GRADE_ROOT and writes one JSON record per test to TINYMOE_GRADE_OUT:
{"tinymoe": path, "tests": {nodeid: {"outcome", "message", "duration"}}, "collect_errors": [...]}.
"""
import json
import os

import pytest

_TESTS = {}
_COLLECT_ERRORS = []
_META = {}


def _message(report) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple):                 # a skip: (path, line, "Skipped: reason")
        return str(longrepr[2]).replace("Skipped: ", "", 1)
    crash = getattr(longrepr, "reprcrash", None)
    if crash is not None:
        return crash.message
    return str(longrepr).strip().splitlines()[-1] if longrepr else ""


def pytest_sessionstart(session):
    import tinymoe
    where = os.path.realpath(tinymoe.__file__)
    _META["tinymoe"] = where
    root = os.environ.get("TINYMOE_GRADE_ROOT")
    if root and not where.startswith(os.path.realpath(root) + os.sep):
        _write()
        pytest.exit(f"the imported tinymoe is {where}, not the code under {root}", returncode=3)


def pytest_collectreport(report):
    if report.failed:
        _COLLECT_ERRORS.append({"nodeid": report.nodeid, "message": _message(report)})


def pytest_runtest_logreport(report):
    entry = _TESTS.setdefault(report.nodeid, {"outcome": "passed", "message": "", "duration": 0.0})
    entry["duration"] += report.duration
    if report.when == "call" and report.outcome != "passed" and entry["outcome"] == "passed":
        entry.update(outcome=report.outcome, message=_message(report))
    elif report.when != "call" and report.outcome != "passed" and entry["outcome"] == "passed":
        entry.update(outcome="error" if report.failed else "skipped", message=_message(report))


def pytest_sessionfinish(session, exitstatus):
    _write()


def _write():
    out = os.environ.get("TINYMOE_GRADE_OUT")
    if not out:
        return
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"tinymoe": _META.get("tinymoe"), "tests": _TESTS,
                   "collect_errors": _COLLECT_ERRORS}, f)
    os.replace(tmp, out)

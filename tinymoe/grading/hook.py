"""The pytest hook of student copies: a test stopped by ANOTHER exercise's stub is skipped.

tests/conftest.py imports `pytest_runtest_makereport` from here. When a test fails because it
reached the stub of an unfinished exercise (the ExerciseNotDone exception itself, or its
"ExerciseNotDone: exercise <id> is not done" line in the output of a subprocess the test ran),
(every ExerciseNotDone also writes its id to a per-test log file that subprocesses inherit)
the failure stays a failure if the test grades that exercise (tinymoe/grading/catalogue.py), and
becomes a skip with the reason "waiting on exercise <id>" otherwise. In the complete reference
no stub exists and the hook changes nothing. Tests marked `grading` are never touched (they make
student copies on purpose).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import List, Optional

import pytest

from tinymoe.grading.catalogue import exercises_of_test
from tinymoe.grading.errors import NOT_DONE, STUB_LOG, ExerciseNotDone

_LOG = pytest.StashKey[str]()


def project_nodeid(item) -> str:
    """The test's node id relative to the project root: tests/<...>.py::name[params]."""
    parts = Path(str(item.path)).parts
    i = len(parts) - 1 - parts[::-1].index("tests") if "tests" in parts else len(parts) - 1
    return "/".join(parts[i:]) + "::" + item.nodeid.split("::", 1)[-1]


def stubs_reached(excinfo, report, log: Optional[str]) -> List[str]:
    """Ids of the exercises whose stubs the test reached (its own process or a subprocess)."""
    ids = []
    err = excinfo.value if excinfo is not None else None
    while err is not None:                       # the exception, or one it was raised from
        if isinstance(err, ExerciseNotDone):
            ids.append(err.exercise_id)
        err = err.__cause__ or err.__context__
    if log and os.path.exists(log):
        with open(log) as f:
            ids += f.read().split()
    for text in [str(report.longrepr)] + [content for _, content in report.sections]:
        ids += NOT_DONE.findall(text)
    return list(dict.fromkeys(ids))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Give the test (and its subprocesses) a fresh stub log: ExerciseNotDone writes to it."""
    fd, log = tempfile.mkstemp(prefix="tinymoe-stubs-", suffix=".txt")
    os.close(fd)
    previous = os.environ.get(STUB_LOG)
    os.environ[STUB_LOG] = log
    item.stash[_LOG] = log
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(STUB_LOG, None)
        else:
            os.environ[STUB_LOG] = previous
        os.unlink(log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if not report.failed or item.get_closest_marker("grading") is not None:
        return
    reached = stubs_reached(call.excinfo, report, item.stash.get(_LOG, None))
    own = exercises_of_test(project_nodeid(item))
    if not reached or any(e in own for e in reached):
        return
    exercise = reached[0]
    report.outcome = "skipped"
    report.longrepr = (str(item.path), (item.location[1] or 0) + 1,
                       f"Skipped: waiting on exercise {exercise}")

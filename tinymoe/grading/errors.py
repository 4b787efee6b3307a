"""ExerciseNotDone: what the stub of an unfinished exercise raises (kept import-light)."""
from __future__ import annotations

import os
import re

# "exercise <id> is not done (" is what the pytest hook (tinymoe/grading/hook.py) looks for in a
# failure's text (a lesson or CLI run in a subprocess prints it); and when STUB_LOG is set, every
# ExerciseNotDone appends its id to that file, from subprocesses too.
NOT_DONE = re.compile(r"\bexercise ([a-z0-9-]+) is not done \(")
STUB_LOG = "TINYMOE_EXERCISE_STUB_LOG"


class ExerciseNotDone(NotImplementedError):
    """Raised by the stub that `python -m tinymoe.grading student-copy` leaves in place of a region.

    Works inside numba-jitted loops too: the argument is a compile-time constant and the message
    is built in Python when the exception reaches the interpreter.
    """

    def __init__(self, exercise_id: str):
        self.exercise_id = exercise_id
        super().__init__(exercise_id)
        log = os.environ.get(STUB_LOG)
        if log:
            try:
                with open(log, "a") as f:
                    f.write(exercise_id + "\n")
            except OSError:
                pass

    def __str__(self) -> str:
        from tinymoe.grading.catalogue import BY_ID
        ex = BY_ID.get(self.exercise_id)
        where = f" ({'; '.join(ex.where)})" if ex else ""
        hint = ex.hint.replace("\n", " ") if ex else ""
        return (f"exercise {self.exercise_id} is not done{where}: {hint} "
                f"[check it with: python -m tinymoe.grading check {self.exercise_id}]")

"""The instructor kit: exercise regions in the reference, student copies, self-checks, a grader.

    python -m tinymoe.grading list                              the exercises (id, points, prereqs)
    python -m tinymoe.grading student-copy OUT [--exercises ID,...|all] [--hide-tests]
    python -m tinymoe.grading check ID                          a student checks one exercise
    python -m tinymoe.grading grade [PATH] [--json FILE] [--hidden DIR]
    python -m tinymoe.grading autograder-zip OUT.zip            Gradescope's autograder

Modules: catalogue (the exercises), regions (find and replace `# BEGIN EXERCISE` regions),
handout (student copies), runner (pytest in a subprocess, per-exercise scores, results.json),
hook (the pytest hook that skips tests waiting on another exercise), autograder (the zip).
Importing this package imports nothing heavy: student copies import ExerciseNotDone from it.
"""
from tinymoe.grading.errors import ExerciseNotDone

__all__ = ["ExerciseNotDone"]

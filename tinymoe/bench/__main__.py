"""`python -m tinymoe.bench [--quick] [--only NAME]`: run every benchmark section.

A section is any module `tinymoe/bench/<name>.py` (name not starting with "_") that defines

    run(quick: bool) -> list[str]        # lines to print: ratios, medians, threads used

Sections are found with pkgutil, so adding a file adds a section; nothing here needs editing.
The header states what the numbers depend on (numpy version, CPU count, OPENBLAS_NUM_THREADS).
A section that fails to import, lacks `run`, or raises prints its error, the others still run,
and the command exits with status 1 at the end.
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import platform
import sys
import time
import traceback
from typing import List, Optional


def discover(package: str = "tinymoe.bench") -> List[str]:
    """Sorted names of the section modules of `package` (every non-underscore module)."""
    pkg = importlib.import_module(package)
    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                  if not m.name.startswith("_") and not m.ispkg)


def header() -> List[str]:
    import numpy as np
    return [f"tinymoe.bench  python {platform.python_version()}  numpy {np.__version__}  "
            f"cpus {os.cpu_count()}  OPENBLAS_NUM_THREADS="
            f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}"]


def run_section(package: str, name: str, quick: bool) -> tuple[bool, List[str]]:
    """(ok, lines) of one section; errors become lines, never exceptions."""
    try:
        mod = importlib.import_module(f"{package}.{name}")
        fn = getattr(mod, "run", None)
        if not callable(fn):
            return False, [f"ERROR: {package}.{name} defines no run(quick) function"]
        lines = fn(quick)
        if not isinstance(lines, (list, tuple)) or not all(isinstance(s, str) for s in lines):
            return False, [f"ERROR: {package}.{name}.run must return a list of str, "
                           f"got {type(lines).__name__}"]
        return True, list(lines)
    except Exception as e:  # noqa: BLE001 - a failing section must not stop the others
        tb = traceback.format_exc().rstrip().splitlines()
        return False, [f"ERROR: {type(e).__name__}: {e}"] + ["  " + s for s in tb[-6:]]


def main(argv: Optional[List[str]] = None, package: str = "tinymoe.bench") -> int:
    ap = argparse.ArgumentParser(prog="python -m tinymoe.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (seconds)")
    ap.add_argument("--only", metavar="NAME", action="append",
                    help="run only this section (repeatable)")
    args = ap.parse_args(argv)

    available = discover(package)
    names = [n for n in available if not args.only or n in args.only]
    unknown = [n for n in (args.only or []) if n not in available]
    failed: List[str] = list(unknown)
    for line in header():
        print(line)
    for n in unknown:
        print(f"\n== {n}\nERROR: no section named {n!r}; sections are {available}")
    if not available:
        print("no benchmark sections found")
    for name in names:
        print(f"\n== {name}", flush=True)
        t0 = time.perf_counter()
        ok, lines = run_section(package, name, args.quick)
        for line in lines:
            print(line)
        print(f"({name}: {'ok' if ok else 'FAILED'}, {time.perf_counter() - t0:.1f} s)", flush=True)
        if not ok:
            failed.append(name)
    if failed:
        print(f"\nFAILED sections: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The machinery every lesson script shares: flags, output folder, claims, metrics and routing files.

    from tinymoe.lesson import Lesson
    L = Lesson("04_routing_collapse", __doc__)        # parses --out, --quick, --seed
    ...train, analyse, plot into L.path("load.png")...
    L.metric("dead_experts", 5)
    L.claim("dead_experts", 5, ">=", 4)                 # recorded, printed, checked at the end
    L.save_routing(labels, {1: indices_layer1})          # routing.npz, redrawable without training
    L.finish()                                           # metrics.json; exit code 1 if a claim failed

A lesson prints one line per claim (`PASS dead_experts = 5 (>= 4)`) and exits non-zero when any
claim fails, so the test suite's `--quick` runs and a student's full runs catch a broken lesson.
In --quick mode a lesson trains for a few seconds; its claims are still recorded but only those
marked `quick=True` are enforced (a few seconds of training cannot show most effects); every
lesson keeps at least one cheap quick claim that a broken optimizer or balancing rule would fail.
Flags are checked up front (--seed >= 0, --seeds >= 1, a writable --out): a bad one is one line
on stderr and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional

import numpy as np

from tinymoe.atomic import write_atomic

class _Parser(argparse.ArgumentParser):
    def error(self, message):   # one line, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


_OPS = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class Lesson:
    def __init__(self, name: str, doc: Optional[str] = None, argv: Optional[List[str]] = None,
                 default_seeds: int = 1):
        p = _Parser(prog=f"lessons/{name}.py",
                                    description=(doc or "").strip().splitlines()[0] if doc else None)
        p.add_argument("--out", default=os.path.join("runs", name), help="output folder")
        p.add_argument("--quick", action="store_true", help="a few seconds, for the test suite")
        p.add_argument("--seed", type=int, default=0, help="first seed")
        p.add_argument("--seeds", type=int, default=None,
                       help=f"number of seeds (default {default_seeds}, 1 with --quick)")
        if argv is None and "ipykernel" in sys.modules:   # a notebook: its argv is the kernel's
            argv = []                                        # (-f kernel.json), not the lesson's
        args = p.parse_args(argv)
        if args.seed < 0:
            p.error(f"--seed {args.seed}: must be >= 0")
        if args.seeds is not None and args.seeds < 1:
            p.error(f"--seeds {args.seeds}: must be >= 1")
        if not args.out.strip():
            p.error("--out '': not a folder name")
        try:                                  # unwritable: one line now, not a traceback later
            os.makedirs(args.out, exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".probe-", dir=args.out)
            os.close(fd)
            os.remove(probe)
        except OSError as e:
            p.error(f"--out {args.out}: cannot write there ({e.strerror or e})")
        self.name = name
        self.out = args.out
        self.quick = args.quick
        self.seed = args.seed
        n = args.seeds if args.seeds is not None else (1 if args.quick else default_seeds)
        self.seeds = list(range(args.seed, args.seed + n))
        self.metrics: Dict[str, object] = {}
        self.claims: List[dict] = []
        self.t0 = time.perf_counter()
        print(f"== {name}{' (quick)' if self.quick else ''}: seeds {self.seeds}, output {self.out}")

    def path(self, filename: str) -> str:
        return os.path.join(self.out, filename)

    def main_figure(self, path: str) -> str:
        """Mark the figure the README's lesson table shows (scripts/make_thumbnails.py reads it)."""
        self.metrics["main_figure"] = os.path.basename(path)
        return path

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def metric(self, key: str, value) -> None:
        self.metrics[key] = _jsonable(value)

    def claim(self, key: str, value: float, op: str, threshold: float, quick: bool = False,
              note: str = "") -> bool:
        """Record `value op threshold` (e.g. claim("dead_experts", 5, ">=", 4)); checked in finish()."""
        ok = bool(_OPS[op](value, threshold))
        enforced = quick or not self.quick
        self.metric(key, value)
        self.claims.append({"key": key, "value": _jsonable(value), "op": op,
                            "threshold": threshold, "ok": ok, "enforced": enforced, "note": note})
        tag = "PASS" if ok else ("FAIL" if enforced else "skip")
        print(f"{tag} {key} = {value:.4g} ({op} {threshold:g}){'  ' + note if note else ''}")
        return ok

    def save_routing(self, labels: np.ndarray, indices_by_layer: Dict[int, np.ndarray],
                     filename: str = "routing.npz", **extra: np.ndarray) -> str:
        """routing.npz: labels [N] and indices_layer{L} [N, K] (best first) per MoE layer."""
        arrays = {"labels": np.asarray(labels)}
        for l, idx in indices_by_layer.items():
            arrays[f"indices_layer{l}"] = np.asarray(idx)
        arrays.update({k: np.asarray(v) for k, v in extra.items()})
        return write_atomic(self.path(filename), lambda f: np.savez(f, **arrays), suffix=".npz")

    def finish(self) -> None:
        self.metric("seconds", time.perf_counter() - self.t0)
        self.metric("quick", self.quick)
        self.metric("seeds", self.seeds)
        self.metrics["claims"] = self.claims
        write_atomic(self.path("metrics.json"),
                     json.dumps(self.metrics, indent=2, sort_keys=True).encode("utf-8"))
        failed = [c for c in self.claims if c["enforced"] and not c["ok"]]
        n_ok = sum(c["ok"] for c in self.claims)
        n_skipped = sum(not c["enforced"] for c in self.claims)
        skipped = f", {n_skipped} not enforced in --quick" if n_skipped else ""
        print(f"== {self.name}: {n_ok}/{len(self.claims)} claims hold{skipped} "
              f"({time.perf_counter() - self.t0:.1f}s); metrics in {self.path('metrics.json')}")
        if failed:
            for c in failed:
                print(f"FAILED CLAIM {c['key']} = {c['value']} (needs {c['op']} {c['threshold']})",
                      file=sys.stderr)
            sys.exit(1)


def _jsonable(v):
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v

"""`python -m tinymoe.golden write|verify ...` (see tinymoe/golden/__init__.py)."""
from __future__ import annotations

import argparse
import sys

from tinymoe.golden.cases import CASE_NAMES


def _cases(text):
    return None if text is None else [c for c in text.split(",") if c]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tinymoe.golden",
                                 description="golden tensors per forward/backward pair, and a "
                                             "conformance runner for ports")
    sub = ap.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write", help="write one safetensors file per case and manifest.json")
    w.add_argument("dir")
    w.add_argument("--preset", default="toy", choices=["toy", "bench"])
    w.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--cases", help=f"comma-separated subset of: {','.join(CASE_NAMES)}")
    v = sub.add_parser("verify", help="run a port on the golden cases and compare")
    v.add_argument("dir")
    v.add_argument("--impl", required=True,
                   help="port module (e.g. tinymoe.golden.reference) or path to a .py file")
    v.add_argument("--cases", help="comma-separated subset of the manifest's cases")
    v.add_argument("--precision", default="float32", choices=["float32", "bfloat16", "float64"],
                   help="which tolerance of the manifest to apply (default float32)")
    v.add_argument("--failures-only", action="store_true", help="print only failing rows")
    args = ap.parse_args(argv)
    from tinymoe.golden.verify import GoldenError
    try:
        if args.cmd == "write":
            from tinymoe.golden.write import write_golden
            cases = _cases(args.cases)
            unknown = sorted(set(cases or []) - set(CASE_NAMES))
            if unknown:
                raise GoldenError(f"--cases: unknown case(s) {unknown}; cases: {','.join(CASE_NAMES)}")
            print(f"writing {args.dir} (preset {args.preset}, {args.dtype}, seed {args.seed})")
            m = write_golden(args.dir, args.preset, args.dtype, args.seed, cases, log=print)
            total = sum(c["bytes"] for c in m["cases"])
            print(f"{len(m['cases'])} cases, {total:,d} bytes, manifest {args.dir}/manifest.json")
            return 0
        from tinymoe.golden.verify import format_table, verify
        rows = verify(args.dir, args.impl, _cases(args.cases), args.precision)
        print(format_table(rows, args.failures_only))
        return 0 if all(r.ok for r in rows) else 1
    except (GoldenError, OSError) as e:
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

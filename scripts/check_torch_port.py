"""Run the PyTorch port (examples/torch_port/) against freshly written golden files.

    /work/refenv/bin/python scripts/check_torch_port.py [--preset toy|bench] [--dir DIR] [--table]

Writes the golden cases (float64) into DIR (default: a temporary folder), then verifies the port
twice: computing in float64 against the strict float64 tolerance, and computing in float32
(TINYMOE_TORCH_DTYPE=float32) against the float32 tolerance. Prints the worst error of each case
and exits non-zero if any tensor fails. Needs torch; without it, says so and exits 0 (CI does not
install torch). TINYMOE_TORCH_DEVICE=cuda runs the port on a GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PORT = os.path.join(ROOT, "examples", "torch_port", "tinymoe_torch.py")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="toy", choices=["toy", "bench"])
    ap.add_argument("--dir", help="golden folder to write and use (default: a temporary one)")
    ap.add_argument("--table", action="store_true", help="print every tensor's row")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping the PyTorch port check")
        return 0
    from tinymoe.golden.verify import format_table, load_impl, verify, worst_per_case
    from tinymoe.golden.write import write_golden

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.dir or tmp
        write_golden(folder, preset=args.preset, dtype="float64")
        port = load_impl(PORT)
        print(f"torch {torch.__version__}, device {port.DEVICE}, golden {folder} "
              f"(preset {args.preset}, float64)")
        results = {}
        for dtype, precision in (("float64", "float64"), ("float32", "float32")):
            port._DTYPE = dtype                       # what TINYMOE_TORCH_DTYPE sets
            rows = verify(folder, port, precision=precision)
            if args.table:
                print(format_table(rows))
            results[dtype] = (rows, worst_per_case(rows))
    print(f"\n{'case':16s} | {'port in float64 (float64 tolerance)':36s} | "
          f"{'port in float32 (float32 tolerance)':36s}")
    print(f"{'':16s} | {'max_abs':>9s} {'max_rel':>9s} {'used':>7s} {'':8s} | "
          f"{'max_abs':>9s} {'max_rel':>9s} {'used':>7s}")
    ok = True
    for case in results["float64"][1]:
        cells = []
        for dtype in ("float64", "float32"):
            a, rel, used, passed = results[dtype][1][case]
            ok &= passed
            cells.append(f"{a:9.2e} {rel:9.2e} {used:7.1e} {'PASS' if passed else 'FAIL':8s}")
        print(f"{case:16s} | {cells[0]} | {cells[1]}")
    for dtype, (rows, _) in results.items():
        n_fail = sum(not r.ok for r in rows)
        print(f"port in {dtype}: {len(rows) - n_fail}/{len(rows)} tensors pass")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

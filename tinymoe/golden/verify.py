"""`python -m tinymoe.golden verify DIR --impl MODULE`: run a port on every golden case, compare.

For each case the port's function (named in the manifest) is called with the case's arguments
in manifest order; each output tensor is compared with the stored one:

    max_abs = max |actual - expected|
    max_rel = max |actual - expected| / max(|expected|, 1e-3 * max|expected|)
    PASS iff every entry has |actual - expected| <= rtol * |expected| + atol * max|expected|

(rtol, atol) are the case's tolerance for --precision (float32 by default; bfloat16, float64).
Integer outputs (expert indices, sort orders, offsets) must be equal. A failing row gives the
first offending index with the expected and actual values; a missing function, a missing
output, a wrong shape, a non-finite value or an exception in the port each fail their row with
the reason. Results go through np.asarray, so a torch CPU tensor works as is (a tensor that
requires grad or lives on a GPU is detached and copied to the host first).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
import traceback
import types
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np

from tinymoe.golden import safetensors_io as st
from tinymoe.golden.write import FORMAT, FORMAT_VERSION, PRECISIONS


class GoldenError(ValueError):
    """A problem with the golden folder, a file or the port (one line, names the culprit)."""


@dataclass
class Row:
    case: str
    tensor: str
    max_abs: float
    max_rel: float
    tol: str
    ok: bool
    detail: str = ""
    used: float = np.nan     # max over entries of |a - e| / allowed: the share of the tolerance used


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

def load_manifest(folder: str) -> dict:
    path = os.path.join(folder, "manifest.json")
    if not os.path.isdir(folder):
        raise GoldenError(f"{folder}: no such folder (write one with "
                          f"`python -m tinymoe.golden write {folder}`)")
    if not os.path.isfile(path):
        raise GoldenError(f"{path}: missing; {folder} is not a golden folder (write one with "
                          f"`python -m tinymoe.golden write {folder}`)")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise GoldenError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GoldenError(f"{path}: not a tinymoe golden manifest (format "
                          f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GoldenError(f"{path}: format version {manifest.get('format_version')!r}, this tinymoe "
                          f"reads version {FORMAT_VERSION}; rewrite the folder with "
                          f"`python -m tinymoe.golden write`")
    return manifest


def load_case(folder: str, entry: dict):
    """-> (args list in calling order, {flat output name: expected array})."""
    path = os.path.join(folder, entry["file"])
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise GoldenError(f"{path}: cannot read the case file ({e.strerror})") from None
    try:
        tensors, meta = st.decode(data, path)
    except ValueError as e:                      # names the file and the broken rule
        raise GoldenError(str(e)) from None
    if meta.get("format") != FORMAT or meta.get("format_version") != str(FORMAT_VERSION):
        raise GoldenError(f"{path}: case file of format {meta.get('format')!r} version "
                          f"{meta.get('format_version')!r}, expected {FORMAT!r} version "
                          f"{FORMAT_VERSION}; rewrite the folder with `python -m tinymoe.golden write`")
    if meta.get("case") != entry["name"]:
        raise GoldenError(f"{path}: holds case {meta.get('case')!r}, the manifest expects "
                          f"{entry['name']!r}")
    if hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise GoldenError(f"{path}: sha256 differs from manifest.json (file changed or written by "
                          f"another run); rewrite the folder")

    def get(key):
        if key not in tensors:
            raise GoldenError(f"{path}: tensor {key!r} named by the manifest is missing")
        return tensors[key]
    args = []
    for a in entry["args"]:
        if a["kind"] == "tensor":
            args.append(get(f"arg/{a['name']}"))
        elif a["kind"] == "tensors":
            args.append({k["name"]: get(f"arg/{a['name']}/{k['name']}") for k in a["keys"]})
        else:
            args.append(a["value"])
    expected = {}
    for o in entry["outputs"]:
        if o["kind"] == "tensors":
            for k in o["keys"]:
                expected[f"{o['name']}.{k['name']}"] = get(f"out/{o['name']}/{k['name']}")
        else:
            expected[o["name"]] = get(f"out/{o['name']}")
    return args, expected


def load_impl(impl):
    """A module name (`tinymoe.golden.reference`), a path to a .py file, or a module object."""
    if not isinstance(impl, str):
        return impl
    if impl.endswith(".py") or os.sep in impl:
        if not os.path.isfile(impl):
            raise GoldenError(f"--impl {impl}: no such file")
        name = "golden_port_" + os.path.splitext(os.path.basename(impl))[0]
        spec = importlib.util.spec_from_file_location(name, impl)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:                   # noqa: BLE001 - the port's own import error
            raise GoldenError(f"--impl {impl}: importing it raised {type(e).__name__}: {e}") from None
        return module
    try:
        return importlib.import_module(impl)
    except ModuleNotFoundError as e:
        raise GoldenError(f"--impl {impl}: cannot import ({e})") from None
    except Exception as e:                       # noqa: BLE001 - the port's own import error
        raise GoldenError(f"--impl {impl}: importing it raised {type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------
# comparing
# ------------------------------------------------------------------------------------------------

def _flatten(entry: dict, result) -> Dict[str, object]:
    """The port's result -> {flat output name: value}; missing outputs are absent."""
    names = [o["name"] for o in entry["outputs"]]
    if isinstance(result, (tuple, list)):
        if len(result) != len(names):
            raise GoldenError(f"returned {len(result)} values, the manifest lists "
                              f"{len(names)} outputs {names}")
        result = dict(zip(names, result))
    if not isinstance(result, Mapping):
        raise GoldenError(f"returned {type(result).__name__}; expected a dict of outputs {names}")
    flat = {}
    for o in entry["outputs"]:
        if o["name"] not in result:
            continue
        v = result[o["name"]]
        if o["kind"] == "tensors":
            if not isinstance(v, Mapping):
                raise GoldenError(f"output {o['name']!r} is {type(v).__name__}, expected a dict "
                                  f"of {len(o['keys'])} tensors")
            flat.update({f"{o['name']}.{k}": t for k, t in v.items()})
        else:
            flat[o["name"]] = v
    return flat


def compare(case: str, name: str, expected: np.ndarray, actual, rtol: float, atol: float,
            exact: bool) -> Row:
    """One output tensor -> Row (module docstring for the rule)."""
    tol = "exact" if exact else f"{rtol:.0e}*|e|+{atol:.0e}*max|e|"
    if hasattr(actual, "detach") and hasattr(actual, "cpu"):   # a torch tensor, on any device
        actual = actual.detach().cpu()
    try:
        a = np.asarray(actual)
    except Exception as e:                       # noqa: BLE001 - whatever the port returned
        return Row(case, name, np.nan, np.nan, tol, False, f"not convertible by np.asarray ({e})")
    if a.shape != expected.shape:
        return Row(case, name, np.nan, np.nan, tol, False,
                   f"shape {list(a.shape)}, expected {list(expected.shape)}")
    e = expected.astype(np.float64)
    try:
        a = a.astype(np.float64)
    except (TypeError, ValueError) as err:
        return Row(case, name, np.nan, np.nan, tol, False, f"dtype {a.dtype} ({err})")
    if e.size == 0:
        return Row(case, name, 0.0, 0.0, tol, True)
    diff = np.abs(a - e)
    diff = np.where(a == e, 0.0, diff)            # equal infinities are equal
    scale = float(np.max(np.abs(e))) if np.all(np.isfinite(e)) else 1.0
    max_abs = float(np.max(diff))
    max_rel = float(np.max(diff / np.maximum(np.abs(e), max(1e-3 * scale, 1e-300))))
    if exact:
        bad = diff != 0
        used = float(bad.any())
    else:
        allowed = rtol * np.abs(e) + atol * (scale if scale > 0 else 1.0)
        bad = ~(diff <= allowed)                                                # NaN is bad
        used = float(np.max(diff / allowed))
    if not bad.any():
        return Row(case, name, max_abs, max_rel, tol, True, used=used)
    i = tuple(int(j) for j in np.argwhere(bad)[0])
    return Row(case, name, max_abs, max_rel, tol, False,
               f"first at {list(i)}: expected {e[i]:.9g}, actual {a[i]:.9g}", used)


def _run_case(port, entry: dict, args, expected: dict, precision: str) -> List[Row]:
    case, fn_name = entry["name"], entry["function"]
    fn = getattr(port, fn_name, None)
    if not callable(fn):
        port_name = getattr(port, "__name__", type(port).__name__)
        return [Row(case, "*", np.nan, np.nan, "", False,
                    f"port {port_name} has no function {fn_name!r}")]
    try:
        result = fn(*args)
    except Exception as e:                       # noqa: BLE001 - report, then go on
        where = traceback.extract_tb(e.__traceback__)[-1]
        return [Row(case, "*", np.nan, np.nan, "", False,
                    f"{fn_name}() raised {type(e).__name__}: {e} "
                    f"({os.path.basename(where.filename)}:{where.lineno})")]
    try:
        flat = _flatten(entry, result)
    except GoldenError as e:
        return [Row(case, "*", np.nan, np.nan, "", False, f"{fn_name}() {e}")]
    tol = entry["tolerance"][precision]
    exact = {o["name"]: o.get("exact", False) for o in entry["outputs"]}
    rows = []
    for name, exp in expected.items():
        if name not in flat:
            rows.append(Row(case, name, np.nan, np.nan, "", False, "missing from the port's result"))
            continue
        rows.append(compare(case, name, exp, flat[name], tol["rtol"], tol["atol"],
                            exact.get(name.split(".", 1)[0], False)))
    return rows


def verify(folder: str, impl, cases: Optional[List[str]] = None,
           precision: str = "float32") -> List[Row]:
    """Run the port on the chosen cases of `folder`; one Row per output tensor."""
    if precision not in PRECISIONS:
        raise GoldenError(f"--precision {precision!r}: must be one of {list(PRECISIONS)}")
    manifest = load_manifest(folder)
    entries = manifest["cases"]
    if cases is not None:
        known = [e["name"] for e in entries]
        unknown = [c for c in cases if c not in known]
        if unknown:
            raise GoldenError(f"--cases: {unknown} not in {os.path.join(folder, 'manifest.json')} "
                              f"(cases: {', '.join(known)})")
        entries = [e for e in entries if e["name"] in cases]
    port = load_impl(impl)
    rows: List[Row] = []
    for entry in entries:
        try:
            args, expected = load_case(folder, entry)
        except (KeyError, TypeError) as e:
            raise GoldenError(f"{os.path.join(folder, 'manifest.json')}: case entry "
                              f"{entry.get('name', '?') if isinstance(entry, dict) else entry!r} "
                              f"is malformed (missing or wrong field {e})") from None
        rows.extend(_run_case(port, entry, args, expected, precision))
    return rows


def format_table(rows: List[Row], failures_only: bool = False) -> str:
    lines = [f"{'case':16s} {'tensor':34s} {'max_abs':>9s} {'max_rel':>9s} {'tolerance':22s} "
             f"{'used':>7s} result"]
    for r in rows:
        if failures_only and r.ok:
            continue
        lines.append(f"{r.case:16s} {r.tensor:34s} {r.max_abs:9.2e} {r.max_rel:9.2e} {r.tol:22s} "
                     f"{r.used:7.1e} "
                     f"{'PASS' if r.ok else 'FAIL'}{'  ' + r.detail if r.detail else ''}")
    n_fail = sum(not r.ok for r in rows)
    failed_cases = sorted({r.case for r in rows if not r.ok})
    lines.append(f"{len(rows) - n_fail}/{len(rows)} tensors pass"
                 + (f"; failing cases: {', '.join(failed_cases)}" if failed_cases else
                    f" in {len({r.case for r in rows})} cases"))
    return "\n".join(lines)


def worst_per_case(rows: List[Row]) -> Dict[str, tuple]:
    """{case: (worst max_abs, worst max_rel, worst share of the tolerance used, all pass)}."""
    out: Dict[str, tuple] = {}
    for r in rows:
        a, rel, used, ok = out.get(r.case, (0.0, 0.0, 0.0, True))
        out[r.case] = (max(a, r.max_abs), max(rel, r.max_rel), max(used, r.used), ok and r.ok)
    return out


# ------------------------------------------------------------------------------------------------
# a reduced-precision wrapper (how the tolerances were measured)
# ------------------------------------------------------------------------------------------------

def round_bf16(a: np.ndarray) -> np.ndarray:
    """float -> float32 holding the nearest bfloat16 value (round to nearest even)."""
    a = np.asarray(a, dtype=np.float32)
    u = a.reshape(-1).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).reshape(a.shape)


def reduced_precision_port(precision: str, base=None):
    """The port `base` (default: tinymoe.golden.reference) fed float32 copies of every float input,
    rounded to bfloat16 first when precision == "bfloat16": what a correct float32 port, or a
    port storing its tensors in bfloat16, computes. Used to set and check the tolerances."""
    if base is None:
        from tinymoe.golden import reference as base

    def cast(v):
        if isinstance(v, dict):
            return {k: cast(x) for k, x in v.items()}
        if isinstance(v, np.ndarray) and np.issubdtype(v.dtype, np.floating):
            return round_bf16(v) if precision == "bfloat16" else v.astype(np.float32)
        return v

    def wrap(fn):
        return lambda *args: fn(*[cast(a) for a in args])
    names = [n for n in getattr(base, "__all__", dir(base)) if callable(getattr(base, n))]
    return types.SimpleNamespace(__name__=f"{base.__name__}[{precision}]",
                                 **{n: wrap(getattr(base, n)) for n in names})

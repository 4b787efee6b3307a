"""`python -m tinymoe.golden write DIR`: one safetensors file per case plus manifest.json.

DIR/<case>.safetensors holds, under these names (the "/" keeps dotted parameter names intact):

    arg/<name>               a tensor argument (inputs, parameters, upstream gradients)
    arg/<name>/<key>         one tensor of a "tensors" argument (e.g. arg/params/wkv_a)
    out/<name>, out/<name>/<key>   the expected outputs and gradients

and `__metadata__` {"format": "tinymoe-golden", "format_version": "1", "case": <name>}.
DIR/manifest.json lists, per case: the port function, the arguments in calling order (shape and
dtype of each tensor, the value of each attribute), the outputs, the tolerances for float32 and
bfloat16 ports (and a strict float64 one), what the case checks, the file's size and sha256.
Every file is written atomically, the manifest last, so a manifest never names a missing or
half-written file. Same arguments, same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, List, Optional

import numpy as np

import tinymoe
from tinymoe.golden import reference
from tinymoe.golden import safetensors_io as st
from tinymoe.golden.cases import (CASES, MODEL_MARGIN, ROUTER_MARGIN, TOLERANCES, case_seed,
                                  golden_config)

FORMAT = "tinymoe-golden"
FORMAT_VERSION = 1
PRECISIONS = ("float32", "bfloat16", "float64")
FLOAT64_TOL = (1e-9, 1e-10)         # strict: a float64 port, other summation orders only

TOLERANCE_RULE = ("an entry passes when |actual - expected| <= rtol * |expected| + atol * "
                  "max|expected| (max over the tensor); integer outputs must be equal. Measured: "
                  "tinymoe in float32 on float32-cast inputs uses <= 10% of the float32 tolerance "
                  "on every case (toy and bench); on bfloat16-rounded inputs it passes the "
                  "bfloat16 tolerance on every toy case and every bench case except model_loss, "
                  "where bfloat16 flips an expert choice (see routing_margin). float64 is a strict "
                  "check for float64 ports.")

CALLING_CONVENTION = ("port.<function>(*args) with args in the order listed: a tensor arrives as "
                      "a NumPy array, a 'tensors' argument as a dict in key order, an 'attr' as "
                      "its JSON value (cfg: a dict of ModelConfig fields); it returns a dict "
                      "{output name: array}, a 'tensors' output as a dict, or a tuple in output "
                      "order")


def tolerance(depth: str) -> dict:
    out = {p: {"rtol": t[depth][0], "atol": t[depth][1]} for p, t in TOLERANCES.items()}
    out["float64"] = {"rtol": FLOAT64_TOL[0], "atol": FLOAT64_TOL[1]}
    return out


def _dtype_name(a: np.ndarray) -> str:
    return str(a.dtype)


def _is_tensors(value) -> bool:
    """A "tensors" value: a non-empty dict of arrays (a dict of numbers, like cfg, is an attr)."""
    return isinstance(value, dict) and bool(value) and all(isinstance(v, np.ndarray)
                                                           for v in value.values())


def _spec(name: str, value) -> dict:
    if _is_tensors(value):
        return {"name": name, "kind": "tensors",
                "keys": [{"name": k, "shape": list(v.shape), "dtype": _dtype_name(v)}
                         for k, v in value.items()]}
    if isinstance(value, np.ndarray):
        return {"name": name, "kind": "tensor", "shape": list(value.shape),
                "dtype": _dtype_name(value)}
    return {"name": name, "kind": "attr", "value": value}


def _tensors(prefix: str, name: str, value) -> Dict[str, np.ndarray]:
    if _is_tensors(value):
        return {f"{prefix}/{name}/{k}": v for k, v in value.items()}
    return {f"{prefix}/{name}": value}


def _cast(value, dt):
    """Float outputs in the golden dtype; integer and bool outputs as int64 / bool."""
    if isinstance(value, dict):
        return {k: _cast(v, dt) for k, v in value.items()}
    a = np.asarray(value)
    if np.issubdtype(a.dtype, np.floating):
        return np.require(a, dtype=dt, requirements="C")
    if np.issubdtype(a.dtype, np.integer):
        return np.require(a, dtype=np.int64, requirements="C")
    return np.require(a, requirements="C")


def build_case(case, cfg, seed: int, dtype) -> tuple:
    """-> (args [(name, value)], outputs {name: value}, extra manifest fields)."""
    args, extra = case.build(cfg, case_seed(seed, case.name), dtype)
    outputs = getattr(reference, case.function)(*[v for _, v in args])
    return args, {k: _cast(v, dtype) for k, v in outputs.items()}, extra


def write_golden(folder: str, preset: str = "toy", dtype: str = "float64", seed: int = 0,
                 cases: Optional[List[str]] = None, log=None) -> dict:
    """Write every case (or the named ones) into `folder`; returns the manifest."""
    if dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype {dtype!r}: must be float32 or float64")
    dt = np.dtype(dtype)
    cfg = golden_config(preset)
    wanted = [c for c in CASES if cases is None or c.name in cases]
    os.makedirs(folder, exist_ok=True)
    entries = []
    for case in wanted:
        args, outputs, extra = build_case(case, cfg, seed, dt)
        tensors: Dict[str, np.ndarray] = {}
        for name, value in args:
            if not (isinstance(value, np.ndarray) or _is_tensors(value)):
                continue
            tensors.update(_tensors("arg", name, value))
        for name, value in outputs.items():
            tensors.update(_tensors("out", name, value))
        data = st.encode(tensors, {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                                   "case": case.name})
        fname = f"{case.name}.safetensors"
        st.write_atomic(os.path.join(folder, fname), data)
        entry = {"name": case.name, "function": case.function, "file": fname,
                 "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                 "checks": case.checks, "depth": case.depth,
                 "args": [_spec(n, v) for n, v in args],
                 "outputs": [dict(_spec(n, v),
                                  exact=bool(not isinstance(v, dict)
                                             and not np.issubdtype(v.dtype, np.floating)))
                             for n, v in outputs.items()],
                 "tolerance": tolerance(case.depth)}
        entry.update(extra)
        entries.append(entry)
        if log:
            log(f"  {case.name:16s} {len(data):>10,d} bytes")
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                "tinymoe_version": tinymoe.__version__, "preset": preset, "dtype": dtype,
                "seed": int(seed), "config": cfg.to_dict(), "tolerance_rule": TOLERANCE_RULE,
                "routing_margins": {"router_and_moe": ROUTER_MARGIN, "mtp_and_model": MODEL_MARGIN},
                "calling_convention": CALLING_CONVENTION,
                "cases": entries}
    text = json.dumps(manifest, indent=1, ensure_ascii=True) + "\n"
    st.write_atomic(os.path.join(folder, "manifest.json"), text.encode("utf-8"))
    return manifest

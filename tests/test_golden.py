"""The porting kit: golden files, the safetensors format, the conformance runner and broken ports."""
from __future__ import annotations

import json
import os
import types

import numpy as np
import pytest

from tinymoe.golden import reference
from tinymoe.golden import safetensors_io as st
from tinymoe.golden.__main__ import main
from tinymoe.golden.cases import CASE_NAMES
from tinymoe.golden.verify import GoldenError, reduced_precision_port, verify
from tinymoe.golden.write import write_golden

pytestmark = pytest.mark.golden


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("golden"))
    write_golden(folder, preset="toy", dtype="float64", seed=0)
    return folder


def _failing(rows):
    return {(r.case, r.tensor) for r in rows if not r.ok}


def _port(**replaced):
    """tinymoe.golden.reference with some functions replaced: a port under construction."""
    funcs = {n: getattr(reference, n) for n in reference.__all__}
    funcs.update(replaced)
    return types.SimpleNamespace(__name__="broken_port", **funcs)


# ------------------------------------------------------------------------------------------------
# writing
# ------------------------------------------------------------------------------------------------

def test_write_is_deterministic_and_the_manifest_lists_every_case(golden, tmp_path):
    write_golden(str(tmp_path), preset="toy", dtype="float64", seed=0)
    files = sorted(os.listdir(golden))
    assert files == sorted(os.listdir(tmp_path))
    for f in files:                                      # two runs, identical bytes
        with open(os.path.join(golden, f), "rb") as a, open(tmp_path / f, "rb") as b:
            assert a.read() == b.read(), f
    with open(os.path.join(golden, "manifest.json")) as f:
        manifest = json.load(f)
    names = [c["name"] for c in manifest["cases"]]
    assert names == CASE_NAMES
    assert files == sorted(["manifest.json"] + [c["file"] for c in manifest["cases"]])
    for c in manifest["cases"]:                          # every listed tensor is in its file, no more
        tensors, meta = st.load(os.path.join(golden, c["file"]))
        listed = set()
        for prefix, specs in (("arg", c["args"]), ("out", c["outputs"])):
            for s in specs:
                if s["kind"] == "tensors":
                    listed |= {f"{prefix}/{s['name']}/{k['name']}" for k in s["keys"]}
                elif s["kind"] == "tensor":
                    listed.add(f"{prefix}/{s['name']}")
        assert set(tensors) == listed, c["name"]
        assert meta == {"format": "tinymoe-golden", "format_version": "1", "case": c["name"]}
        assert {"float32", "bfloat16"} <= set(c["tolerance"])


def test_another_seed_changes_the_data(tmp_path):
    write_golden(str(tmp_path / "a"), cases=["linear"], seed=0)
    write_golden(str(tmp_path / "b"), cases=["linear"], seed=1)
    a, _ = st.load(str(tmp_path / "a" / "linear.safetensors"))
    b, _ = st.load(str(tmp_path / "b" / "linear.safetensors"))
    assert not np.array_equal(a["arg/x"], b["arg/x"])


# ------------------------------------------------------------------------------------------------
# the safetensors format
# ------------------------------------------------------------------------------------------------

def _mixed_tensors():
    rng = np.random.default_rng(3)
    t = {f"t{i}_{dt}": rng.integers(0, 100, size=(i % 3 + 1, 2)).astype(dt)
         for i, dt in enumerate(["f8", "f4", "f2", "i8", "i4", "i2", "i1", "u8", "u4", "u2", "u1",
                                 "?"])}
    t.update({"scalar": np.array(-2.5), "empty": np.zeros((0, 4), np.float32),
              "layers.0.attn.wq_a": rng.standard_normal((3, 5))})
    return t


def test_safetensors_writer_matches_the_library_byte_for_byte():
    sn = pytest.importorskip("safetensors.numpy")
    t = _mixed_tensors()
    # one metadata key: the library keeps metadata in a hash map whose order differs from process
    # to process, so only a single key gives it a fixed byte layout to compare against
    assert st.encode(t, {"format": "tinymoe-golden"}) == sn.save(t, metadata={"format": "tinymoe-golden"})
    meta = {"case": "x", "format": "tinymoe-golden"}       # several keys: same header, same data
    ours, lib = st.encode(t, meta), sn.save(t, metadata=meta)
    n = int.from_bytes(ours[:8], "little")
    assert len(ours) == len(lib) and ours[8 + n:] == lib[8 + n:]
    assert json.loads(ours[8:8 + n]) == json.loads(lib[8:8 + n])
    back = sn.load(ours)                                 # the library reads our bytes
    mine, mine_meta = st.decode(sn.save(t, metadata=meta))   # we read the library's bytes
    assert mine_meta == meta
    for k, v in t.items():
        for got in (back[k], mine[k]):
            assert got.dtype == v.dtype and got.shape == v.shape and got.tobytes() == v.tobytes()


def test_golden_files_load_with_the_library(golden):
    sn = pytest.importorskip("safetensors.numpy")
    path = os.path.join(golden, "mla.safetensors")
    lib, ours = sn.load_file(path), st.load(path)[0]
    assert set(lib) == set(ours)
    assert all(lib[k].tobytes() == ours[k].tobytes() for k in lib)


def _header(tensors_json: dict, body: bytes = b"") -> bytes:
    text = json.dumps(tensors_json).encode()
    return len(text).to_bytes(8, "little") + text + body


@pytest.mark.parametrize("data, rule", [
    (b"\x05\x00", "shorter than the 8-byte header length"),
    ((10 ** 6).to_bytes(8, "little") + b"{}", "header length 1000000 exceeds"),
    (_header([1, 2])[:8] + b"[1, 2]", "does not start with '{'"),
    (b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}", "not UTF-8 JSON"),
    (b"\x0b\x00\x00\x00\x00\x00\x00\x00" + b'{"a":1,"a":2}'[:11], "not UTF-8 JSON"),
    (_header({"x": {"dtype": "F64", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
     "hold 8 bytes, dtype F64 shape [2] needs 16"),
    (_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
     "start at 4, expected 0"),
    (_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
              "y": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(8)),
     "expected 4"),
    (_header({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(12)),
     "cover 4 bytes of a 12-byte buffer"),
    (_header({"x": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]}}, bytes(2)),
     "dtype 'BF16' is not one this reader supports"),
    (_header({"__metadata__": {"v": 1}}), "__metadata__ must map strings to strings"),
    (_header({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}),
     "must be a list of non-negative integers"),
], ids=["short", "header-too-long", "not-an-object", "bad-json", "truncated-json", "size",
        "hole", "overlap", "trailing-bytes", "bf16", "metadata", "negative-dim"])
def test_reader_refuses_malformed_files(tmp_path, data, rule):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError) as e:
        st.load(str(path))
    assert str(path) in str(e.value) and rule in str(e.value)


def test_reader_refuses_duplicate_names(tmp_path):
    text = (b'{"x":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            b'"x":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}')
    path = tmp_path / "dup.safetensors"
    path.write_bytes(len(text).to_bytes(8, "little") + text + b"\x01\x02")
    with pytest.raises(ValueError, match="duplicate key 'x'"):
        st.load(str(path))


# ------------------------------------------------------------------------------------------------
# verifying: tinymoe itself, and reduced-precision runs that justify the tolerances
# ------------------------------------------------------------------------------------------------

def test_tinymoe_passes_as_its_own_port(golden, capsys):
    rows = verify(golden, "tinymoe.golden.reference", precision="float64")
    assert rows and all(r.ok for r in rows)
    assert {r.case for r in rows} == set(CASE_NAMES)
    assert main(["verify", golden, "--impl", "tinymoe.golden.reference"]) == 0
    out = capsys.readouterr().out
    assert f"{len(rows)}/{len(rows)} tensors pass" in out and "FAIL" not in out


def test_float32_and_bfloat16_runs_fit_their_tolerances(golden, tol):
    # tinymoe on float32-cast inputs is a correct float32 port: it must use <= 1/5 of the
    # float32 tolerance everywhere; on bfloat16-rounded inputs it must pass the bfloat16 one
    rows32 = verify(golden, reduced_precision_port("float32"), precision="float32")
    assert all(r.ok for r in rows32)
    assert max(r.used for r in rows32) <= tol["golden_f32_share"]
    assert all(r.ok for r in verify(golden, reduced_precision_port("bfloat16"),
                                    precision="bfloat16"))
    # and the float32 run is NOT within the strict float64 tolerance (the check can fail)
    assert not all(r.ok for r in verify(golden, reduced_precision_port("float32"),
                                        cases=["mla"], precision="float64"))


# ------------------------------------------------------------------------------------------------
# deliberately broken ports: each failure names the case and the tensor
# ------------------------------------------------------------------------------------------------

def _transposed_linear(x, w, dy):
    # reads the [out, in] weight as if it were stored [in, out] (row-major reinterpretation)
    return reference.linear(x, np.ascontiguousarray(w.reshape(w.shape[1], w.shape[0]).T), dy)


def _half_split_rope(x, cos, sin, dy):
    def rot(a, s):
        h = a.shape[-1] // 2
        c, s_ = cos[None, :, None, :], s[None, :, None, :]
        a1, a2 = a[..., :h], a[..., h:]
        return np.concatenate([a1 * c - a2 * s_, a1 * s_ + a2 * c], axis=-1)
    return {"y": rot(x, sin), "dx": rot(dy, -sin)}


def _scale_before_normalise(x, gate_w, bias, dweights, cfg):
    # w = normalise(route_scale * s[idx]) = normalise(s[idx]): the scale cancels
    return reference.router(x, gate_w, bias, dweights, dict(cfg, route_scale=1.0))


def _no_mscale(fn):
    return lambda *a: fn(*a[:-1], dict(a[-1], mscale=0.0))    # m = 0.1 * 0 * ln(s) + 1 = 1


def _off_by_one_decode(x, params, kv, pe, cfg):
    # the port believes its cache holds one more token: the new one is rotated at S + 1
    pad = lambda a: np.concatenate([np.zeros_like(a[:, :1]), a], axis=1)   # noqa: E731
    out = reference.mla_decode(x, params, pad(kv), pad(pe), cfg)
    return dict(out, kv_after=out["kv_after"][:, 1:], pe_after=out["pe_after"][:, 1:])


def _bias_in_weights(x, gate_w, bias, dweights, cfg):
    out = reference.router(x, gate_w, bias, dweights, cfg)
    w = np.take_along_axis(out["scores"] + bias, out["indices"], axis=1)    # (s + b)[idx]
    if cfg["score_func"] == "sigmoid":
        w = w / w.sum(axis=1, keepdims=True)
    return dict(out, weights=w * cfg["route_scale"])


def _paper_order_mtp(tokens, h_prev, params, bias, dlogits, dh, cfg):
    # eh_proj applied to [hnorm(h) ; enorm(emb)] (the paper's notation) instead of embedding first
    D = h_prev.shape[-1]
    w = params["mtp.0.eh_proj"]
    swapped = dict(params, **{"mtp.0.eh_proj": np.concatenate([w[:, D:], w[:, :D]], axis=1)})
    return reference.mtp(tokens, h_prev, swapped, bias, dlogits, dh, cfg)


@pytest.mark.parametrize("replaced, cases, must_fail, must_pass", [
    ({"linear": _transposed_linear}, ["linear"], {("linear", "y"), ("linear", "dx")}, set()),
    ({"rope": _half_split_rope}, ["rope"], {("rope", "y"), ("rope", "dx")}, set()),
    ({"router": _scale_before_normalise}, ["router_sigmoid"],
     {("router_sigmoid", "weights"), ("router_sigmoid", "dx")},
     {("router_sigmoid", "indices"), ("router_sigmoid", "scores")}),
    ({"yarn_tables": _no_mscale(reference.yarn_tables), "mla": _no_mscale(reference.mla)},
     ["yarn_tables", "mla"],
     {("yarn_tables", "softmax_scale"), ("yarn_tables", "mscale"), ("mla", "y")},
     {("yarn_tables", "inv_freq"), ("yarn_tables", "cos")}),
    ({"mla_decode": _off_by_one_decode}, ["mla_decode"],
     {("mla_decode", "y"), ("mla_decode", "pe_after")}, {("mla_decode", "kv_after")}),
    ({"router": _bias_in_weights}, ["router_sigmoid", "router_softmax"],
     {("router_sigmoid", "weights")},
     {("router_sigmoid", "indices"), ("router_softmax", "weights")}),   # softmax case: bias 0
    ({"mtp": _paper_order_mtp}, ["mtp"], {("mtp", "logits"), ("mtp", "dh_prev")}, set()),
], ids=["transposed-weight", "half-split-rope", "scale-before-normalise", "missing-mscale",
        "decode-position-off-by-one", "bias-in-gate-weights", "mtp-paper-concat-order"])
def test_broken_ports_fail_where_they_are_broken(golden, replaced, cases, must_fail, must_pass):
    rows = verify(golden, _port(**replaced), cases=cases, precision="float32")
    failing = _failing(rows)
    assert must_fail <= failing
    assert not (must_pass & failing)
    for r in rows:
        if not r.ok:
            assert r.detail.startswith("first at [")  # index, expected and actual value


def test_cli_names_case_and_tensor_of_a_broken_port(golden, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "broken_port", _port(rope=_half_split_rope))
    assert main(["verify", golden, "--impl", "broken_port", "--cases", "rope,linear",
                 "--failures-only"]) == 1
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("rope") and " y " in ln)
    assert "FAIL" in line and "expected" in line and "actual" in line
    assert "failing cases: rope" in out and "linear" not in out.split("failing cases:")[1]


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(GoldenError, match="manifest.json: missing"):
        verify(str(tmp_path), "tinymoe.golden.reference")
    assert main(["verify", str(tmp_path), "--impl", "tinymoe.golden.reference"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "manifest.json" in err[0] and "Traceback" not in err[0]


def test_case_file_of_another_format_version_is_refused(tmp_path):
    folder = str(tmp_path)
    write_golden(folder, cases=["rmsnorm"])
    path = os.path.join(folder, "rmsnorm.safetensors")
    tensors, meta = st.load(path)
    st.save(path, tensors, dict(meta, format_version="0"))
    with pytest.raises(GoldenError, match=r"rmsnorm\.safetensors: case file of format "
                                          r"'tinymoe-golden' version '0', expected"):
        verify(folder, "tinymoe.golden.reference")
    st.save(path, tensors, dict(meta, format_version="1"))   # same bytes as written: passes again
    assert all(r.ok for r in verify(folder, "tinymoe.golden.reference"))
    with open(os.path.join(folder, "manifest.json")) as f:
        m = json.load(f)
    m["format_version"] = 99
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(GoldenError, match="format version 99, this tinymoe reads version 1"):
        verify(folder, "tinymoe.golden.reference")


def test_a_changed_case_file_is_caught_by_its_hash(tmp_path):
    folder = str(tmp_path)
    write_golden(folder, cases=["rmsnorm"])
    path = os.path.join(folder, "rmsnorm.safetensors")
    tensors, meta = st.load(path)
    tensors["out/y"] = tensors["out/y"] + 1.0
    st.save(path, tensors, meta)
    with pytest.raises(GoldenError, match="sha256 differs from manifest.json"):
        verify(folder, "tinymoe.golden.reference")


def test_port_missing_a_function_or_returning_the_wrong_shape_fails_its_rows(golden):
    funcs = {n: getattr(reference, n) for n in reference.__all__ if n != "rmsnorm"}
    rows = verify(golden, types.SimpleNamespace(__name__="partial", **funcs),
                  cases=["rmsnorm", "linear"])
    bad = [r for r in rows if not r.ok]
    assert [(r.case, r.detail) for r in bad] == [("rmsnorm", "port partial has no function "
                                                             "'rmsnorm'")]

    def short_rmsnorm(x, w, dy, eps):
        out = reference.rmsnorm(x, w, dy, eps)
        return dict(out, y=out["y"][:, :-1])
    rows = verify(golden, _port(rmsnorm=short_rmsnorm), cases=["rmsnorm"])
    assert [(r.tensor, r.detail) for r in rows if not r.ok] == [
        ("y", "shape [16, 31], expected [16, 32]")]

    def raising(x, w, dy, eps):
        raise RuntimeError("kernel not written yet")
    rows = verify(golden, _port(rmsnorm=raising), cases=["rmsnorm"])
    assert rows[0].detail.startswith("rmsnorm() raised RuntimeError: kernel not written yet "
                                     "(test_golden.py:")

    def missing_dw(x, w, dy, eps):
        return {k: v for k, v in reference.rmsnorm(x, w, dy, eps).items() if k != "dw"}
    rows = verify(golden, _port(rmsnorm=missing_dw), cases=["rmsnorm"])
    assert [(r.tensor, r.detail) for r in rows if not r.ok] == [("dw", "missing from the port's result")]


def test_unknown_case_or_module_is_a_clear_error(golden):
    with pytest.raises(GoldenError, match=r"--cases: \['nope'\] not in"):
        verify(golden, "tinymoe.golden.reference", cases=["nope"])
    with pytest.raises(GoldenError, match="--impl no_such_port_module: cannot import"):
        verify(golden, "no_such_port_module")
    assert main(["write", os.path.join(golden, "x"), "--cases", "nope"]) == 2

"""Checkpoint files: round trip, atomic writes, and clear errors for bad files."""
import os
import zipfile

import numpy as np
import pytest

from tinymoe.checkpoint import load_checkpoint, restore_model, restore_rng, save_checkpoint
from tinymoe.config import ModelConfig
from tinymoe.model import Model
from tinymoe.optim import AdamW

pytestmark = pytest.mark.checkpoint


@pytest.fixture
def trained(rng):
    cfg = ModelConfig.preset("toy", n_layers=2, n_mtp_modules=1)
    model = Model(cfg, seed=0)
    for k in model.buffers:
        model.buffers[k] = rng.standard_normal(model.buffers[k].shape).astype(np.float32)
    opt = AdamW(model.params, lr=1e-2)
    opt.step({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.params.items()})
    data_rng = np.random.default_rng(5)
    data_rng.integers(0, 10, size=7)          # advance it
    return model, opt, data_rng


def test_round_trip_of_everything(tmp_path, trained):
    model, opt, data_rng = trained
    path = save_checkpoint(str(tmp_path / "c.npz"), model, opt, step=17, rng=data_rng,
                           meta={"data": "languages"})
    ck = load_checkpoint(path)
    assert ck.config == model.config and ck.step == 17 and ck.meta == {"data": "languages"}
    m2 = restore_model(ck)
    for k in model.params:
        np.testing.assert_array_equal(m2.params[k], model.params[k])
        assert m2.params[k].dtype == model.params[k].dtype
    for k in model.buffers:
        np.testing.assert_array_equal(m2.buffers[k], model.buffers[k])
    state = opt.state_dict()
    for k, v in state.items():
        np.testing.assert_array_equal(ck.optimizer[k], v)
    r2 = restore_rng(ck)
    np.testing.assert_array_equal(r2.integers(0, 1 << 30, size=5), data_rng.integers(0, 1 << 30, size=5))


def test_interrupted_save_keeps_previous_file(tmp_path, trained, monkeypatch):
    model, opt, data_rng = trained
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, model, opt, step=1, rng=data_rng)
    before = open(path, "rb").read()

    def boom(*a, **k):
        raise KeyboardInterrupt("simulated crash in the middle of writing")

    monkeypatch.setattr(np, "savez", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, opt, step=2, rng=data_rng)
    assert open(path, "rb").read() == before
    assert load_checkpoint(path).step == 1
    assert os.listdir(tmp_path) == ["c.npz"]            # no temporary file left behind


def test_truncated_file_names_the_file(tmp_path, trained):
    model, opt, data_rng = trained
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, model, opt, step=1, rng=data_rng)
    data = open(path, "rb").read()
    bad = str(tmp_path / "truncated.npz")
    with open(bad, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.npz"):
        load_checkpoint(bad)
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_checkpoint(str(tmp_path / "nope.npz"))


def _rewrite(path, out, drop=None, replace=None):
    z = dict(np.load(path, allow_pickle=False))
    if drop:
        del z[drop]
    if replace:
        z.update(replace)
    np.savez(out, **z)


def test_missing_key_and_wrong_shape_name_the_key(tmp_path, trained):
    model, opt, data_rng = trained
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, model, opt, step=1, rng=data_rng)
    _rewrite(path, str(tmp_path / "m.npz"), drop="param/layers.1.attn.wkv_b")
    with pytest.raises(ValueError, match=r"m\.npz.*'param/layers\.1\.attn\.wkv_b'"):
        load_checkpoint(str(tmp_path / "m.npz"))
    _rewrite(path, str(tmp_path / "s.npz"), replace={"param/head": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"'param/head' has shape \[3, 3\]"):
        load_checkpoint(str(tmp_path / "s.npz"))
    _rewrite(path, str(tmp_path / "o.npz"), drop="opt/v/embed")
    with pytest.raises(ValueError, match="'opt/v/embed'"):
        load_checkpoint(str(tmp_path / "o.npz"))


def test_checkpoint_from_another_config(tmp_path, trained):
    model, opt, data_rng = trained
    path = str(tmp_path / "c.npz")
    save_checkpoint(path, model, opt, step=1, rng=data_rng)
    other = ModelConfig.preset("toy", n_layers=3)
    ck = load_checkpoint(path)
    with pytest.raises(ValueError, match="layers.2"):
        Model.from_params(other, ck.params, ck.buffers, source=path)
    # a config text that does not validate is reported with the key
    _rewrite(path, str(tmp_path / "bad.npz"),
             replace={"config": np.array(ModelConfig.preset("toy").to_json().replace(
                 '"n_heads": 4', '"n_heads": -1'))})
    with pytest.raises(ValueError, match="'config'.*n_heads"):
        load_checkpoint(str(tmp_path / "bad.npz"))


def test_files_are_read_without_pickle(tmp_path):
    obj = str(tmp_path / "evil.npz")
    np.savez(obj, format=np.array(["x", {"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        load_checkpoint(obj)
    assert zipfile.is_zipfile(obj)


# ---- a hostile or careless file: every entry is checked before use, naming file and key -------

def _saved(tmp_path, trained):
    model, opt, data_rng = trained
    return save_checkpoint(str(tmp_path / "c.npz"), model, opt, step=3, rng=data_rng,
                           meta={"data": "languages"})


@pytest.mark.parametrize("key,value,rule", [
    ("param/layers.1.ffn.experts.w2", "nan", "non-finite"),
    ("buffer/layers.1.ffn.gate.bias", "inf", "non-finite"),
    ("opt/m/embed", "nan", "non-finite"),
    ("opt/v/head", "neg", "negative"),
    ("opt/m/embed", "int8", "dtype int8"),
    ("opt/t", np.array(0, np.int64), "must be >= 1"),
    ("step", np.array(-2, np.int64), "must be >= 0"),
    ("step", np.array(2.5), "dtype float64, expected an integer"),
    ("meta", np.array("[1, 2]"), "must be a JSON object"),
    ("meta", np.array("{not json"), "not valid JSON"),
    ("rng", np.array('{"bit_generator": "SeedSequence", "state": {}}'), "names bit generator"),
    ("rng", np.array('{"bit_generator": "PCG64", "state": 3}'), "not a valid PCG64 state"),
    ("format", np.array(["x", "y"], dtype=object), "dtype object"),
    ("meta", np.array([{"a": 1}], dtype=object), "dtype object"),
    ("opt/extra", np.zeros(3, np.float32), "unexpected key 'opt/extra'"),
])
def test_bad_entries_are_refused_naming_file_and_key(tmp_path, trained, key, value, rule):
    path = _saved(tmp_path, trained)
    good = dict(np.load(path, allow_pickle=False))
    if isinstance(value, str):
        a = good[key].copy()
        if value == "int8":
            a = a.astype(np.int8)
        else:
            a.flat[0] = {"nan": np.nan, "inf": np.inf, "neg": -1.0}[value]
        value = a
    bad = str(tmp_path / "bad.npz")
    _rewrite(path, bad, replace={key: value})
    with pytest.raises(ValueError, match=rf"bad\.npz: key '{key}' .*{rule}"
                       if key != "opt/extra" else rf"bad\.npz: {rule}"):
        load_checkpoint(bad)


def _zip_member(path, name, header_shape, dtype, data: bytes, compress=zipfile.ZIP_STORED):
    """Write one .npy member with a hand-made header into a copy of a good checkpoint."""
    import io
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.dtype(dtype).str, "fortran_order": False,
                                               "shape": header_shape})
    with zipfile.ZipFile(path, "a", compression=compress) as zf:
        zf.writestr(name + ".npy", buf.getvalue() + data)


def test_huge_declared_members_are_refused_before_reading(tmp_path, trained, monkeypatch):
    path = _saved(tmp_path, trained)
    reads = []
    real = np.lib.format.read_array
    monkeypatch.setattr(np.lib.format, "read_array",
                        lambda f, **kw: reads.append(f.name) or real(f, **kw))
    for name, shape, data, compress in [
            ("head", (10 ** 12,), b"", zipfile.ZIP_STORED),               # a declared 4 TB member
            ("embed", (2048, 1024), bytes(8 << 20), zipfile.ZIP_DEFLATED),  # 8 MB of zeros, deflated
            ("norm", (32,), bytes(16), zipfile.ZIP_STORED)]:              # data shorter than its header
        bad = str(tmp_path / f"{name}.npz")
        _rewrite(path, bad, drop=f"param/{name}")
        _zip_member(bad, f"param/{name}", shape, np.float32, data, compress)
        rule = "declares .* bytes" if name == "norm" else "has shape"
        reads.clear()
        with pytest.raises(ValueError, match=rf"{name}\.npz: key 'param/{name}' {rule}"):
            load_checkpoint(bad)
        assert f"param/{name}.npy" not in reads        # refused from its header, nothing read


def test_nonfinite_params_are_refused_by_from_params():
    cfg = ModelConfig.preset("toy", n_layers=2)
    model = Model(cfg, seed=0)
    params = dict(model.params, **{"layers.0.attn.wo": np.full_like(model.params["layers.0.attn.wo"],
                                                                    np.nan)})
    with pytest.raises(ValueError, match=r"my\.npz: parameter 'layers\.0\.attn\.wo' has non-finite"):
        Model.from_params(cfg, params, model.buffers, source="my.npz")
    buffers = {k: np.full_like(v, np.inf) for k, v in model.buffers.items()}
    with pytest.raises(ValueError, match=r"buffer 'layers\.1\.ffn\.gate\.bias' has non-finite"):
        Model.from_params(cfg, model.params, buffers, source="my.npz")


def test_a_killed_save_leaves_no_temporary_and_files_follow_the_umask(tmp_path, trained):
    import subprocess
    model, opt, data_rng = trained
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = os.getppid()
    names = [f".tmp-{dead.pid}-abc.npz", ".tmp-k3j_x9qz.npz", f".tmp-{live}-def.npz"]
    for n in names:
        (tmp_path / n).write_bytes(b"half a checkpoint")
    old = os.umask(0o022)
    try:
        path = save_checkpoint(str(tmp_path / "c.npz"), model, opt, step=1, rng=data_rng)
    finally:
        os.umask(old)
    assert sorted(os.listdir(tmp_path)) == sorted(["c.npz", names[2]])   # a live writer's stays
    assert os.stat(path).st_mode & 0o777 == 0o644

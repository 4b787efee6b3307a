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

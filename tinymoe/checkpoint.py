"""Checkpoints: one `.npz` with everything needed to resume training bitwise.

Layout (all plain arrays, read with allow_pickle=False; nothing in the file is ever executed):

    format                 "tinymoe-checkpoint-v1"
    config                 the ModelConfig as JSON text
    param/<name>           every parameter
    buffer/<name>          router selection biases (state, no gradient)
    opt/m/<name>, opt/v/<name>, opt/t    AdamW moments and step count (if an optimizer is given)
    step                   training steps completed
    rng                    the data generator's bit_generator state as JSON text
    meta                   free-form JSON text (e.g. the training arguments)

Writes are atomic: the archive goes to a temporary file in the same folder, is flushed and
fsync'ed, then renamed over the target, so an interrupted save leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from tinymoe.config import ModelConfig

FORMAT = "tinymoe-checkpoint-v1"


@dataclass
class Checkpoint:
    config: ModelConfig
    params: Dict[str, np.ndarray]
    buffers: Dict[str, np.ndarray]
    optimizer: Optional[Dict[str, np.ndarray]]
    step: int
    rng_state: Optional[dict]
    meta: dict = field(default_factory=dict)


def save_checkpoint(path: str, model, optimizer=None, step: int = 0,
                    rng: Optional[np.random.Generator] = None, meta: Optional[dict] = None) -> str:
    """Write model (+ optimizer, step, generator state, meta) to `path` atomically; returns path."""
    arrays: Dict[str, np.ndarray] = {
        "format": np.array(FORMAT),
        "config": np.array(model.config.to_json()),
        "step": np.array(int(step), dtype=np.int64),
        "rng": np.array(json.dumps(rng.bit_generator.state) if rng is not None else ""),
        "meta": np.array(json.dumps(meta or {}, sort_keys=True)),
    }
    arrays.update({f"param/{k}": v for k, v in model.params.items()})
    arrays.update({f"buffer/{k}": v for k, v in model.buffers.items()})
    if optimizer is not None:
        arrays.update({f"opt/{k}": v for k, v in optimizer.state_dict().items()})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    try:  # make the rename itself durable
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return path


def _text(z, key: str, path: str) -> str:
    if key not in z.files:
        raise ValueError(f"checkpoint {path}: missing key {key!r}")
    a = z[key]
    if a.dtype.kind != "U" or a.ndim != 0:
        raise ValueError(f"checkpoint {path}: key {key!r} is not a text entry")
    return str(a)


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint (allow_pickle=False); errors name the file and the offending key."""
    from tinymoe.model import buffer_shapes, param_shapes
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    try:
        z = np.load(path, allow_pickle=False)
        files = set(z.files)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"checkpoint {path}: not a readable .npz archive "
                         f"(truncated or corrupt?): {e}") from None
    with z:
        fmt = _text(z, "format", path)
        if fmt != FORMAT:
            raise ValueError(f"checkpoint {path}: key 'format' is {fmt!r}, expected {FORMAT!r}")
        try:
            config = ModelConfig.from_json(_text(z, "config", path))
        except (ValueError, TypeError) as e:
            raise ValueError(f"checkpoint {path}: key 'config' is not a valid config: {e}") from None

        def read(key: str, shape=None) -> np.ndarray:
            if key not in files:
                raise ValueError(f"checkpoint {path}: missing key {key!r}")
            try:
                a = z[key]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
                raise ValueError(f"checkpoint {path}: key {key!r} cannot be read "
                                 f"(truncated or corrupt?): {e}") from None
            if shape is not None and tuple(a.shape) != tuple(shape):
                raise ValueError(f"checkpoint {path}: key {key!r} has shape {list(a.shape)}, "
                                 f"the config needs {list(shape)}")
            return a

        params = {k: read(f"param/{k}", s) for k, s in param_shapes(config).items()}
        buffers = {k: read(f"buffer/{k}", s) for k, s in buffer_shapes(config).items()}
        extra = sorted(f for f in files if f.startswith(("param/", "buffer/"))
                       and f.split("/", 1)[1] not in params and f.split("/", 1)[1] not in buffers)
        if extra:
            raise ValueError(f"checkpoint {path}: unexpected key {extra[0]!r} for its config")
        optimizer = None
        if any(f.startswith("opt/") for f in files):
            optimizer = {"t": read("opt/t")}
            for k, s in param_shapes(config).items():
                optimizer[f"m/{k}"] = read(f"opt/m/{k}", s)
                optimizer[f"v/{k}"] = read(f"opt/v/{k}", s)
        step = int(read("step"))
        rng_text = _text(z, "rng", path)
        meta = json.loads(_text(z, "meta", path))
    return Checkpoint(config, params, buffers, optimizer, step,
                      json.loads(rng_text) if rng_text else None, meta)


def restore_model(ckpt: Checkpoint, source: str = "checkpoint"):
    """A Model with the checkpoint's parameters and buffers."""
    from tinymoe.model import Model
    return Model.from_params(ckpt.config, ckpt.params, ckpt.buffers, source=source)


def restore_rng(ckpt: Checkpoint) -> np.random.Generator:
    """The data generator exactly as it was when the checkpoint was written."""
    if ckpt.rng_state is None:
        raise ValueError("checkpoint: has no generator state ('rng' is empty)")
    bg = getattr(np.random, ckpt.rng_state["bit_generator"])()
    bg.state = ckpt.rng_state
    return np.random.Generator(bg)

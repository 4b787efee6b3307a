"""Checkpoints: one `.npz` with everything needed to resume training bitwise.

Layout (all plain arrays, read with allow_pickle=False; nothing in the file is ever executed):

    format                 "tinymoe-checkpoint-v1"
    config                 the ModelConfig as JSON text
    param/<name>           every parameter
    buffer/<name>          router selection biases (state, no gradient)
    opt/m/<name>, opt/v/<name>, opt/t    AdamW moments and step count (if an optimizer is given)
    step                   training steps completed
    rng                    the data generator's bit_generator state as JSON text
    meta                   free-form JSON object (e.g. the training arguments)

Writes are atomic: the archive goes to a temporary file in the same folder (`.tmp-<pid>-*.npz`),
is flushed and fsync'ed, then renamed over the target, so an interrupted save leaves the previous
file intact. A temporary file left by a killed writer is removed by the next save into that
folder. The file gets the usual permissions (0666 minus the umask), like any file the user writes.

Reading trusts nothing in the file: every member's npy header (dtype, shape) and its declared
size are checked against the config before any data is read, so a corrupt or hostile file gives
a ValueError naming the file and the key, never a pickle, a huge allocation or a call of
something the file names. Values are checked too: every parameter, buffer and optimizer moment
must be finite, opt/v non-negative, opt/t >= 1 and step >= 0.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Dict, Optional

import numpy as np

from tinymoe.atomic import write_atomic
from tinymoe.config import ModelConfig

FORMAT = "tinymoe-checkpoint-v1"
TEXT_LIMIT = 1 << 20        # bytes: the most a text entry (config, meta, rng, format) may hold
BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")   # numpy's, by name


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
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_atomic(path, lambda f: np.savez(f, **arrays), suffix=".npz")


# ================================================================================================
# reading
# ================================================================================================

class _Reader:
    """The members of one .npz, each checked from its npy header before its data is read."""

    def __init__(self, path: str, zf: zipfile.ZipFile):
        self.path, self.zf = path, zf
        self.members: Dict[str, zipfile.ZipInfo] = {}
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                self.fail(info.filename, "is not an .npy member")
            self.members[info.filename[:-4]] = info

    def fail(self, key: str, rule: str):
        raise ValueError(f"checkpoint {self.path}: key {key!r} {rule}")

    def header(self, key: str):
        """(shape, dtype, declared data bytes) of a member, from its npy header alone."""
        if key not in self.members:
            raise ValueError(f"checkpoint {self.path}: missing key {key!r}")
        info = self.members[key]
        try:
            with self.zf.open(info) as f:
                version = np.lib.format.read_magic(f)
                if version not in ((1, 0), (2, 0)):
                    self.fail(key, f"has npy format version {version}, expected 1.0 or 2.0")
                read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                        else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read(f)
                offset = f.tell()
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            if str(e).startswith(f"checkpoint {self.path}"):
                raise
            self.fail(key, f"has an unreadable npy header (truncated or corrupt?): {e}")
        if dtype.hasobject:
            self.fail(key, "holds Python objects (dtype object); a checkpoint holds plain arrays")
        return tuple(shape), dtype, info.file_size - offset

    def check(self, key: str, kinds: str, shape=None, ndim=None):
        """Check a member's header: dtype kind in `kinds`, the given shape (or ndim), and that
        the member's declared size is what that shape needs (so reading it allocates no more)."""
        got, dtype, declared = self.header(key)
        if dtype.kind not in kinds:
            self.fail(key, f"has dtype {dtype}, expected " +
                      {"f": "float32 or float64", "iu": "an integer", "U": "text"}[kinds])
        if kinds == "f" and dtype not in (np.float32, np.float64):
            self.fail(key, f"has dtype {dtype}, expected float32 or float64")
        if shape is not None and got != tuple(shape):
            self.fail(key, f"has shape {list(got)}, the config needs {list(shape)}")
        if ndim is not None and len(got) != ndim:
            self.fail(key, f"has shape {list(got)}, expected a scalar")
        need = int(np.prod(got, dtype=np.float64)) * dtype.itemsize
        if declared != need:
            self.fail(key, f"declares {declared} data bytes but its header {list(got)} {dtype} "
                           f"needs {need} (truncated or corrupt?)")
        return dtype

    def read(self, key: str) -> np.ndarray:
        try:
            with self.zf.open(self.members[key]) as f:
                return np.lib.format.read_array(f, allow_pickle=False)
        except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
            self.fail(key, f"cannot be read (truncated or corrupt?): {e}")

    def text(self, key: str) -> str:
        dtype = self.check(key, "U", ndim=0)
        if dtype.itemsize > TEXT_LIMIT:
            self.fail(key, f"is a text of {dtype.itemsize} bytes, more than the {TEXT_LIMIT} "
                           f"a checkpoint's text entries may hold")
        return str(self.read(key))

    def json_object(self, key: str) -> dict:
        try:
            value = json.loads(self.text(key))
        except json.JSONDecodeError as e:
            self.fail(key, f"is not valid JSON: {e}")
        if not isinstance(value, dict):
            self.fail(key, f"must be a JSON object, got {type(value).__name__}")
        return value

    def integer(self, key: str, minimum: int) -> int:
        self.check(key, "iu", ndim=0)
        v = int(self.read(key))
        if v < minimum:
            self.fail(key, f"is {v}, must be >= {minimum}")
        return v

    def floats(self, key: str, shape, nonnegative: bool = False) -> np.ndarray:
        """A float array of the given shape whose values are all finite (and >= 0 if asked)."""
        a = self.read(key)
        if not np.all(np.isfinite(a)):
            self.fail(key, f"has {int(np.sum(~np.isfinite(a)))} non-finite values (NaN or inf)")
        if nonnegative and np.any(a < 0):
            self.fail(key, "has negative values (a second moment is a mean of squares, >= 0)")
        return a


def generator_from_state(state: dict, source: str) -> np.random.Generator:
    """A Generator with numpy's bit generator of that name in exactly that state (names checked)."""
    name = state.get("bit_generator") if isinstance(state, dict) else None
    if name not in BIT_GENERATORS:
        raise ValueError(f"{source}: key 'rng' names bit generator {name!r}, expected one of "
                         f"{list(BIT_GENERATORS)}")
    bg = getattr(np.random, name)()
    try:
        bg.state = state
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise ValueError(f"{source}: key 'rng' is not a valid {name} state: {e}") from None
    return np.random.Generator(bg)


def load_checkpoint(path: str) -> Checkpoint:
    """Read a checkpoint (allow_pickle=False); errors name the file and the offending key."""
    from tinymoe.model import buffer_shapes, param_shapes
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path}: is a folder, not a .npz file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise ValueError(f"checkpoint {path}: not a readable .npz archive "
                         f"(truncated or corrupt?): {e}") from None
    with zf:
        z = _Reader(path, zf)
        fmt = z.text("format")
        if fmt != FORMAT:
            raise ValueError(f"checkpoint {path}: key 'format' is {fmt!r}, expected {FORMAT!r}")
        try:
            config = ModelConfig.from_json(z.text("config"))
        except (ValueError, TypeError) as e:
            if str(e).startswith(f"checkpoint {path}"):
                raise
            raise ValueError(f"checkpoint {path}: key 'config' is not a valid config: {e}") from None
        shapes = {f"param/{k}": s for k, s in param_shapes(config).items()}
        shapes.update({f"buffer/{k}": s for k, s in buffer_shapes(config).items()})
        has_opt = any(k.startswith("opt/") for k in z.members)
        if has_opt:
            shapes.update({f"opt/{w}/{k}": s for w in ("m", "v") for k, s in param_shapes(config).items()})
        known = set(shapes) | {"format", "config", "step", "rng", "meta", "opt/t"}
        extra = sorted(set(z.members) - known)
        if extra:
            raise ValueError(f"checkpoint {path}: unexpected key {extra[0]!r} for its config")
        # 1. every header before any data
        dtypes = {key: z.check(key, "f", shape) for key, shape in shapes.items()}
        param_dtypes = {d for k, d in dtypes.items() if k.startswith("param/")}
        if len(param_dtypes) > 1:
            raise ValueError(f"checkpoint {path}: parameters mix dtypes {sorted(map(str, param_dtypes))}")
        # 2. small entries, then the arrays one at a time (each checked as soon as it is read)
        step = z.integer("step", 0)
        rng_text = z.text("rng")
        rng_state = None
        if rng_text:
            rng_state = z.json_object("rng")
            generator_from_state(rng_state, f"checkpoint {path}")
        meta = z.json_object("meta")
        arrays = {key: z.floats(key, s, nonnegative=key.startswith("opt/v/"))
                  for key, s in shapes.items()}
        params = {k[6:]: v for k, v in arrays.items() if k.startswith("param/")}
        buffers = {k[7:]: v for k, v in arrays.items() if k.startswith("buffer/")}
        optimizer = None
        if has_opt:
            optimizer = {k[4:]: v for k, v in arrays.items() if k.startswith("opt/")}
            optimizer["t"] = np.array(z.integer("opt/t", 1), dtype=np.int64)
    return Checkpoint(config, params, buffers, optimizer, step, rng_state, meta)


def restore_model(ckpt: Checkpoint, source: str = "checkpoint"):
    """A Model with the checkpoint's parameters and buffers."""
    from tinymoe.model import Model
    return Model.from_params(ckpt.config, ckpt.params, ckpt.buffers, source=source)


def restore_rng(ckpt: Checkpoint) -> np.random.Generator:
    """The data generator exactly as it was when the checkpoint was written."""
    if ckpt.rng_state is None:
        raise ValueError("checkpoint: has no generator state ('rng' is empty)")
    return generator_from_state(ckpt.rng_state, "checkpoint")

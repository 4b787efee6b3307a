"""safetensors files with plain NumPy and JSON: a deterministic writer and a strict reader.

The format (huggingface/safetensors README, safetensors/src/tensor.rs):

    [8 bytes]  N, little-endian u64: the length of the header
    [N bytes]  UTF-8 JSON object, right-padded with spaces (0x20):
               {"__metadata__": {str: str}, "<name>": {"dtype": "F64", "shape": [2, 3],
                "data_offsets": [begin, end]}, ...}
    [rest]     the byte buffer; tensor bytes are buffer[begin:end], C order, little-endian

The writer lays the file out as the Rust writer does (`safetensors.numpy.save` gives the same
bytes for the same metadata in sorted key order; tests/test_golden.py checks it): `__metadata__`
first with its keys sorted, tensors ordered by the Rust `Dtype` enum descending (so descending
alignment) then name, compact JSON, the header padded with spaces to a multiple of 8.
Same tensors and metadata give the same bytes. The reader checks every rule of the format
(offsets tile the buffer with no hole or overlap, sizes match shapes, no duplicate names,
metadata maps strings to strings) and names the file and the broken rule; nothing is unpickled
or executed. safetensors is not a dependency of tinymoe: this module needs only NumPy.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Tuple

import numpy as np

from tinymoe.atomic import write_atomic

MAX_HEADER = 100_000_000          # bytes; the Rust reader's limit

# safetensors dtype tag <-> little-endian NumPy dtype (BF16 and F8 are not NumPy types: refused),
# listed in the order of the Rust `Dtype` enum, which sets the writer's layout order
DTYPES = {"BOOL": "?", "U8": "u1", "I8": "i1", "I16": "<i2", "U16": "<u2", "F16": "<f2",
          "I32": "<i4", "U32": "<u4", "F32": "<f4", "F64": "<f8", "I64": "<i8", "U64": "<u8"}
_RANK = {tag: i for i, tag in enumerate(DTYPES)}
_TAGS = {np.dtype(v).newbyteorder("=") if np.dtype(v).byteorder != "|" else np.dtype(v): k
         for k, v in DTYPES.items()}


def _tag(name: str, a: np.ndarray) -> str:
    dt = a.dtype.newbyteorder("=") if a.dtype.byteorder not in ("|", "=") else a.dtype
    if dt not in _TAGS:
        raise TypeError(f"tensor {name!r}: dtype {a.dtype} has no safetensors tag this writer "
                        f"supports ({', '.join(DTYPES)})")
    return _TAGS[dt]


def encode(tensors: Dict[str, np.ndarray], metadata: Dict[str, str] | None = None) -> bytes:
    """{name: array}, {str: str} -> the bytes of one safetensors file (deterministic)."""
    metadata = dict(metadata or {})
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"metadata: {k!r} -> {v!r}: keys and values must be strings")
    arrays = {}
    for name, a in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor name {name!r}: must be a non-empty string other than "
                             f"'__metadata__'")
        a = np.asarray(a)
        tag = _tag(name, a)
        arrays[name] = (tag, np.require(a, dtype=np.dtype(DTYPES[tag]), requirements="C"))
    # layout: dtypes in descending enum order (so descending alignment), then name (Rust writer)
    names = sorted(arrays, key=lambda n: (-_RANK[arrays[n][0]], n))
    header: dict = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset, chunks = 0, []
    for name in names:
        tag, a = arrays[name]
        data = a.tobytes()
        header[name] = {"dtype": tag, "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)                       # pad to a multiple of 8 with spaces
    return len(text).to_bytes(8, "little") + text + b"".join(chunks)


def save(path: str, tensors: Dict[str, np.ndarray], metadata: Dict[str, str] | None = None) -> int:
    """Write one safetensors file atomically; returns its size in bytes."""
    data = encode(tensors, metadata)
    write_atomic(path, data)
    return len(data)


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def decode(data: bytes, src: str = "<bytes>") -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Bytes of a safetensors file -> ({name: array}, metadata); ValueError names src and the rule."""
    def bad(rule: str):
        return ValueError(f"{src}: not a valid safetensors file: {rule}")

    if len(data) < 8:
        raise bad(f"{len(data)} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(data[:8], "little")
    if n > MAX_HEADER or 8 + n > len(data):
        raise bad(f"header length {n} exceeds the file ({len(data)} bytes) or the 100 MB limit")
    raw = data[8:8 + n]
    if not raw.startswith(b"{"):
        raise bad("the header does not start with '{'")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise bad(f"the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise bad("__metadata__ must map strings to strings")
    buf = memoryview(data)[8 + n:]
    spans, out = [], {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise bad(f"tensor {name!r}: entry must have exactly dtype, shape, data_offsets")
        tag, shape, offs = info["dtype"], info["shape"], info["data_offsets"]
        if tag not in DTYPES:
            raise bad(f"tensor {name!r}: dtype {tag!r} is not one this reader supports "
                      f"({', '.join(DTYPES)}; store bfloat16/float8 as F32)")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                                  and d >= 0 for d in shape):
            raise bad(f"tensor {name!r}: shape {shape!r} must be a list of non-negative integers")
        if (not isinstance(offs, list) or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)):
            raise bad(f"tensor {name!r}: data_offsets {offs!r} must be two integers")
        dt = np.dtype(DTYPES[tag])
        size = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
        if offs[1] - offs[0] != size or offs[0] < 0:
            raise bad(f"tensor {name!r}: data_offsets {offs} hold {offs[1] - offs[0]} bytes, "
                      f"dtype {tag} shape {shape} needs {size}")
        spans.append((offs[0], offs[1], name))
        out[name] = (dt, shape, offs)
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise bad(f"tensor {name!r}: data_offsets start at {begin}, expected {pos} "
                      f"(offsets must tile the buffer with no hole or overlap)")
        pos = end
    if pos != len(buf):
        raise bad(f"the tensors cover {pos} bytes of a {len(buf)}-byte buffer")
    tensors = {}
    for name, (dt, shape, (begin, end)) in out.items():
        a = np.frombuffer(buf[begin:end], dtype=dt).reshape(shape)
        tensors[name] = a.astype(dt.newbyteorder("=") if dt.byteorder != "|" else dt)  # a copy
    return tensors, dict(metadata)


def load(path: str) -> Tuple[Dict[str, np.ndarray], Dict[str, str]]:
    """Read one safetensors file -> ({name: array (writable copy)}, metadata)."""
    with open(path, "rb") as f:
        data = f.read()
    return decode(data, src=os.fspath(path))

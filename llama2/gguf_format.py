"""Reading and writing GGUF files (llama.cpp's format): typed key/value metadata, then
tensors. Plain `struct` + numpy, so the `gguf` package is needed only by the tests."""

from __future__ import annotations

import math
import struct
from enum import IntEnum
from pathlib import Path

import numpy as np

from .io import atomic_file

MAGIC = b"GGUF"
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 8  # arrays of arrays: llama.cpp writes none deeper than 2
VERSION = 3
ALIGNMENT = 32


class T(IntEnum):
    """Metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_SCALAR = {
    T.UINT8: "<B",
    T.INT8: "<b",
    T.UINT16: "<H",
    T.INT16: "<h",
    T.UINT32: "<I",
    T.INT32: "<i",
    T.FLOAT32: "<f",
    T.BOOL: "<?",
    T.UINT64: "<Q",
    T.INT64: "<q",
    T.FLOAT64: "<d",
}


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q8_0 = 8


# bytes per block and elements per block
GGML_BLOCK = {GGMLType.F32: (4, 1), GGMLType.F16: (2, 1), GGMLType.Q8_0: (34, 32)}
Q8_0_BLOCK = np.dtype([("d", "<f2"), ("qs", "i1", (32,))])


class GGUFError(ValueError):
    pass


def read_gguf(path: str | Path) -> tuple[dict, dict]:
    """Return (metadata {key: value}, tensors {name: (shape, GGMLType, absolute offset)}).
    Shapes are in PyTorch order (GGUF stores them innermost first)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        data = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    except OSError as e:
        raise GGUFError(f"{path}: cannot read: {e.strerror}") from e
    buf = memoryview(data)
    pos = 0

    def take(fmt):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(buf):
            raise GGUFError(f"{path}: truncated GGUF file at byte {pos}")
        (value,) = struct.unpack_from(fmt, buf, pos)
        pos += size
        return value

    def string():
        nonlocal pos
        n = take("<Q")
        if pos + n > len(buf):
            raise GGUFError(f"{path}: truncated string at byte {pos}")
        s = bytes(buf[pos : pos + n]).decode("utf-8", errors="replace")
        pos += n
        return s

    def value(vtype, depth=0):
        nonlocal pos
        vtype = T(vtype)
        if vtype == T.STRING:
            return string()
        if vtype == T.ARRAY:
            if depth >= MAX_ARRAY_DEPTH:
                raise GGUFError(
                    f"{path}: arrays nested deeper than {MAX_ARRAY_DEPTH} at byte {pos}"
                )
            etype, n = T(take("<I")), take("<Q")
            if n > len(buf) - pos:  # every element takes at least a byte
                raise GGUFError(f"{path}: truncated array of {n} elements at byte {pos}")
            if etype == T.STRING:
                return [string() for _ in range(n)]
            if etype == T.ARRAY:
                return [value(T.ARRAY, depth + 1) for _ in range(n)]
            fmt = np.dtype(_SCALAR[etype])
            if pos + n * fmt.itemsize > len(buf):
                raise GGUFError(f"{path}: truncated array of {n} elements at byte {pos}")
            arr = np.frombuffer(buf, dtype=fmt, count=n, offset=pos)
            pos += arr.nbytes
            return arr.tolist()
        return take(_SCALAR[vtype])

    if len(buf) < 4 or bytes(buf[:4]) != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {bytes(buf[:4])!r})")
    pos = 4
    version = take("<I")
    if version not in (2, 3):
        raise GGUFError(f"{path}: GGUF version {version} is not supported")
    n_tensors, n_kv = take("<Q"), take("<Q")
    meta = {}
    try:
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            n_dims = take("<I")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"{path}: tensor {name} has {n_dims} dimensions (at most 4)")
            dims = [take("<Q") for _ in range(n_dims)]
            infos.append((name, tuple(reversed(dims)), GGMLType(take("<I")), take("<Q")))
    except GGUFError:
        raise
    except ValueError as e:  # unknown enum value
        raise GGUFError(f"{path}: unsupported GGUF content: {e}") from e
    align = meta.get("general.alignment", ALIGNMENT)
    if isinstance(align, bool) or not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise GGUFError(f"{path}: general.alignment must be a power of two, not {align!r}")
    start = pos + (-pos % align)
    tensors = {name: (shape, gtype, start + off) for name, shape, gtype, off in infos}
    for name, (shape, gtype, offset) in tensors.items():
        block_bytes, block_elems = GGML_BLOCK[gtype]
        n = math.prod(shape)  # Python integers: a product of huge dims does not wrap around
        if n % block_elems:
            raise GGUFError(
                f"{path}: tensor {name} of shape {shape} is not whole {gtype.name} blocks"
            )
        if offset + n // block_elems * block_bytes > len(buf):
            raise GGUFError(f"{path}: tensor {name} runs past the end of the file (truncated?)")
    return meta, tensors


def read_tensor(path: str | Path, shape: tuple, gtype: GGMLType, offset: int) -> np.ndarray:
    """One tensor: f32 and f16 as stored (memory-mapped copy-on-write), q8_0 dequantized to f32."""
    n = int(np.prod(shape))
    block_bytes, block_elems = GGML_BLOCK[gtype]
    raw = np.memmap(
        path, dtype=np.uint8, mode="c", offset=offset, shape=(n // block_elems * block_bytes,)
    )
    if gtype == GGMLType.F32:
        return raw.view(np.float32).reshape(shape)
    if gtype == GGMLType.F16:
        return raw.view(np.float16).reshape(shape)
    return dequantize_q8_0(raw.view(Q8_0_BLOCK)).reshape(shape)


def quantize_q8_0(x: np.ndarray) -> np.ndarray:
    """llama.cpp's q8_0: blocks of 32 values, one fp16 scale amax/127 and int8 quants."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    d = np.abs(blocks).max(axis=1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    v = blocks * inv[:, None]
    q = np.sign(v) * np.floor(np.abs(v) + 0.5)  # C roundf: halves away from zero
    out = np.empty(len(blocks), dtype=Q8_0_BLOCK)
    out["d"] = d.astype(np.float16)
    out["qs"] = q.astype(np.int8)
    return out


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return (blocks["d"].astype(np.float32)[:, None] * blocks["qs"].astype(np.float32)).reshape(-1)


def _pack_value(vtype: T, value) -> bytes:
    if vtype == T.STRING:
        raw = value.encode("utf-8")
        return struct.pack("<Q", len(raw)) + raw
    if vtype == T.ARRAY:
        etype, items = value
        head = struct.pack("<IQ", etype, len(items))
        if etype == T.STRING:
            return head + b"".join(_pack_value(T.STRING, s) for s in items)
        return head + np.asarray(items, dtype=np.dtype(_SCALAR[etype])).tobytes()
    return struct.pack(_SCALAR[vtype], value)


def write_gguf(path: str | Path, metadata: dict, tensors: list) -> None:
    """metadata: {key: (T, value)} with arrays as (T.ARRAY, (element T, list)).
    tensors: [(name, shape in PyTorch order, GGMLType, payload)], written in order; a payload is
    an ndarray or a function making one, called only when its turn comes (bounded memory).
    The file appears whole at `path` or not at all."""
    header = [MAGIC, struct.pack("<IQQ", VERSION, len(tensors), len(metadata))]
    for key, (vtype, value) in metadata.items():
        header += [_pack_value(T.STRING, key), struct.pack("<I", vtype), _pack_value(vtype, value)]
    offset = 0
    sizes = []
    for name, shape, gtype, _ in tensors:
        header += [_pack_value(T.STRING, name), struct.pack("<I", len(shape))]
        header += [struct.pack("<Q", d) for d in reversed(shape)]
        header.append(struct.pack("<IQ", gtype, offset))
        block_bytes, block_elems = GGML_BLOCK[gtype]
        sizes.append(int(np.prod(shape)) // block_elems * block_bytes)
        offset += sizes[-1] + (-sizes[-1] % ALIGNMENT)
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        head = b"".join(header)
        f.write(head + b"\0" * (-len(head) % ALIGNMENT))
        for (name, *_, payload), size in zip(tensors, sizes, strict=True):
            payload = np.ascontiguousarray(payload() if callable(payload) else payload)
            if payload.nbytes != size:
                raise ValueError(
                    f"GGUF tensor {name}: payload of {payload.nbytes} bytes, expected {size}"
                )
            f.write(payload.tobytes())
            f.write(b"\0" * (-size % ALIGNMENT))

"""Reading and writing the safetensors file format without the safetensors package.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(``{name: {dtype, shape, data_offsets}, "__metadata__": {...}}``) and the data.
rbe keeps the header verbatim so that decoding rebuilds the file byte for byte.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from rbeformat import InputError
from rbeformat.manifest import check_json_text, unique_keys
from rbeformat.spec import DTYPES

MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class StTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset within the data area
    end: int


@dataclass
class StFile:
    path: str
    header: bytes
    data_start: int
    tensors: list[StTensor]  # in data order
    metadata: dict[str, str]
    exact: bool  # the data area is exactly the tensors, back to back

    def reader(self):
        """A ``read_at(offset, size)`` over the data area (positional reads, no mmap)."""
        fd = os.open(self.path, os.O_RDONLY)

        def read_at(offset: int, size: int) -> bytes:
            data = os.pread(fd, size, self.data_start + offset)
            if len(data) != size:
                raise InputError(f"{self.path}: expected {size} bytes at {self.data_start + offset}, got {len(data)}")
            return data

        return read_at, lambda: os.close(fd)


def read_header(path: str) -> StFile:
    """Parses and validates a safetensors file's header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) != 8:
                raise InputError(f"{path}: too short for a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise InputError(f"{path}: header length {n} is invalid for a {size}-byte file")
            header = fh.read(n)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    check_json_text(header, f"{path}: header", error=InputError)
    hook = unique_keys(
        lambda key: InputError(
            f"{path}: header holds the key {key!r:.80} twice (JSON keys must be "
            "unique; readers disagree on which one counts)"
        )
    )
    try:
        obj = json.loads(header, object_pairs_hook=hook)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InputError(f"{path}: header is not valid JSON ({str(exc)[:100]})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: header is not a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{path}: __metadata__ must map strings to strings")
    data_len = size - 8 - n
    tensors = [_parse_entry(path, name, info, data_len) for name, info in obj.items()]
    tensors.sort(key=lambda t: (t.begin, t.end))
    pos, exact = 0, True
    for t in tensors:
        if t.begin < pos:
            raise InputError(f"{path}: tensor {t.name!r} overlaps the previous tensor's data")
        exact &= t.begin == pos
        pos = t.end
    exact &= pos == data_len
    return StFile(path, header, 8 + n, tensors, metadata, exact)


def _parse_entry(path: str, name: str, info, data_len: int) -> StTensor:
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise InputError(f"{where}: entry is not an object")
    dtype = info.get("dtype")
    if dtype not in DTYPES:
        raise InputError(f"{where}: dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    shape = info.get("shape")
    offsets = info.get("data_offsets")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise InputError(f"{where}: invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
        raise InputError(f"{where}: invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not 0 <= begin <= end <= data_len:
        raise InputError(f"{where}: data_offsets {offsets} lie outside the {data_len}-byte data area")
    if end - begin != math.prod(shape) * DTYPES[dtype].itemsize:
        raise InputError(
            f"{where}: data_offsets span {end - begin} bytes, shape {shape} needs "
            f"{math.prod(shape) * DTYPES[dtype].itemsize}"
        )
    return StTensor(name, dtype, tuple(shape), begin, end)


def build_header(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]) -> bytes:
    """A safetensors header for tensors laid out back to back in the given order."""
    obj: dict = {}
    if metadata:
        obj["__metadata__"] = metadata
    pos = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * DTYPES[dtype].itemsize
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + size]}
        pos += size
    text = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)  # the data area starts 8-byte aligned

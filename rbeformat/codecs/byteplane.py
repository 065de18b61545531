"""The ``byteplane`` codec: lossless compression of tensor elements.

The exponent of a trained weight takes few values while its low mantissa bits
are close to random, so bytes of different significance are compressed apart:

1. Each element is read as a little-endian word of ``itemsize`` bytes.  With
   ``"transform": "rotl1"`` (used for floating-point dtypes) the word is rotated
   left by one bit, which moves the sign to bit 0 and puts the whole exponent of
   fp32 and bf16 in the top byte.
2. The words are split into ``itemsize`` byte planes; plane k holds byte k of
   every word.
3. Each plane is stored with one of three methods, chosen per chunk:
   ``raw`` (as is), ``zstd`` (one zstd frame), or ``split``: the plane's bytes
   are grouped by the value of the same element's top-plane byte (a stable
   counting sort) and each group is stored as its own run, so each group gets
   an entropy coder fitted to it.  That conditions, for instance, the high
   mantissa byte on the exponent.

Chunks (``chunk_items`` elements) are independent, so they decode in parallel
and one tensor can be read without the rest.

>>> codec = Byteplane()
>>> data = np.arange(10, dtype=np.float32)
>>> parts, params = codec.encode_chunk(memoryview(data.tobytes()), DTYPES["F32"])
>>> out = bytearray(40)
>>> codec.decode_chunk(memoryview(b"".join(parts)), params, DTYPES["F32"], memoryview(out), "x")
>>> bytes(out) == data.tobytes()
True
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ..errors import FormatError
from ..spec import DTYPES, MAX_CHUNK_DECODED_BYTES, DType  # noqa: F401 (DTYPES used by the doctest)
from . import planes
from .base import Codec, require_int, require_keys
from .zstd import PLANES, pack, unpack

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
TRANSFORMS = ("none", "rotl1")
METHODS = ("raw", "zstd", "split")
# Planes whose order-0 entropy is above this many bits per byte are stored raw
# without trying zstd: the attempt costs time and cannot gain more than ~1%.
INCOMPRESSIBLE_BITS = 7.9
# Between the two, a plane (e.g. the high mantissa bits) is skewed only a little:
# a fast zstd level's Huffman stage catches that; above this, raw it is.
NEARLY_RANDOM_BITS = 7.995
FAST_LEVEL = 1
# Within a split plane, a group is compressed only if that makes it this much smaller.
MIN_RUN_SAVING = 0.97
# A split plane decodes several times slower than a zstd or raw one (a gather
# per byte), while on trained weights it typically saves under 1% of the plane.
# By default it must save at least this fraction of the whole chunk: bf16
# chunks (two planes) take it more often than fp32 chunks, whose other planes
# cost almost nothing to decode.  Set 0 to take every gain.
DEFAULT_SPLIT_GAIN = 0.002


def _entropy_bits(plane: np.ndarray) -> float:
    counts = planes.histogram(plane)
    p = counts[counts > 0] / plane.size
    return float(-(p * np.log2(p)).sum())


def _encode_split(plane: np.ndarray, context: np.ndarray, level: int) -> bytes:
    grouped = planes.group(plane, context)
    counts = planes.histogram(context)
    runs, start = [], 0
    for count in counts[counts > 0]:
        group = grouped[start : start + count]
        run = pack(group, level)
        # A run that saves little is stored raw: copying is far faster to decode.
        runs.append(run if len(run) < MIN_RUN_SAVING * count else group.tobytes())
        start += count
    table = struct.pack(f"<{len(runs)}I", *(len(r) for r in runs))
    return table + b"".join(runs)


def _decode_split(stored: memoryview, context: np.ndarray, where: str) -> np.ndarray:
    counts = planes.histogram(context)
    sizes = [int(c) for c in counts[counts > 0]]
    table_bytes = 4 * len(sizes)
    if len(stored) < table_bytes:
        raise FormatError(f"{where}: split plane of {len(stored)} bytes cannot hold its {len(sizes)}-entry table")
    lengths = struct.unpack(f"<{len(sizes)}I", stored[:table_bytes])
    if table_bytes + sum(lengths) != len(stored):
        raise FormatError(f"{where}: split runs total {table_bytes + sum(lengths)} bytes, plane holds {len(stored)}")
    runs, pos = [], table_bytes
    for i, (length, size) in enumerate(zip(lengths, sizes)):
        runs.append(unpack(stored[pos : pos + length], size, f"{where} run {i}"))
        pos += length
    return planes.ungroup(tuple(runs), context, counts)


class Byteplane(Codec):
    """Lossless, bit-exact for every dtype; see the module docstring."""

    name = "byteplane"
    lossless = True

    def __init__(self, transform: str = "rotl1", chunk_items: int | None = None, level: int = PLANES,
                 split_gain: float = DEFAULT_SPLIT_GAIN):
        if transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}")
        self.transform = transform
        self.items = chunk_items
        self.level = level
        self.split_gain = split_gain

    def for_dtype(self, dtype: DType) -> "Byteplane":
        """The codec bound to ``dtype``: rotation for floats, 4 MiB chunks unless set."""
        transform = "rotl1" if dtype.is_float else "none"
        items = self.items or max(1, DEFAULT_CHUNK_BYTES // dtype.itemsize)
        return Byteplane(transform, items, self.level, self.split_gain)

    def config(self) -> dict[str, Any]:
        return {"transform": self.transform, "chunk_items": self.items}

    def chunk_items(self, dtype: DType) -> int:
        return self.items or max(1, DEFAULT_CHUNK_BYTES // dtype.itemsize)

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> "Byteplane":
        require_keys(config, where, {"transform", "chunk_items"})
        if config["transform"] not in TRANSFORMS:
            raise FormatError(f"{where}.transform: expected one of {TRANSFORMS}, found {config['transform']!r:.40}")
        items = require_int(config["chunk_items"], f"{where}.chunk_items", 1, MAX_CHUNK_DECODED_BYTES)
        return cls(config["transform"], items)

    def encode_chunk(self, data: memoryview, dtype: DType) -> tuple[list[bytes], dict[str, Any]]:
        width = dtype.itemsize
        n = len(data) // width
        all_planes = planes.split(data, width, self.transform == "rotl1").reshape(width, n)
        top = all_planes[width - 1]
        parts, methods = [], []
        for k in range(width):
            min_saving = self.split_gain * len(data)
            method, stored = self._encode_plane(all_planes[k], top if k < width - 1 else None, min_saving)
            parts.append(stored)
            methods.append([method, len(stored)])
        return parts, {"planes": methods}

    def _encode_plane(self, plane: np.ndarray, context: np.ndarray | None, min_saving: float) -> tuple[str, bytes]:
        candidates = [("raw", plane.tobytes())]
        entropy = _entropy_bits(plane)
        if entropy < INCOMPRESSIBLE_BITS:
            candidates.append(("zstd", pack(plane, self.level)))
        elif entropy < NEARLY_RANDOM_BITS:
            # Only the entropy coder can gain here; zstd's fastest level has the same one.
            candidates.append(("zstd", pack(plane, FAST_LEVEL)))
        # On ties the earlier (simpler) method wins, which keeps output deterministic.
        best = min(candidates, key=lambda c: len(c[1]))
        if context is not None and len(plane) >= 4096:
            split = _encode_split(plane, context, self.level)
            if len(split) < len(best[1]) - min_saving:
                best = ("split", split)
        return best

    def decode_chunk(self, payload: memoryview, params: Any, dtype: DType, out: memoryview, where: str) -> None:
        width = dtype.itemsize
        n = len(out) // width
        require_keys(params, f"{where}.params", {"planes"})
        methods = params["planes"]
        if not isinstance(methods, list) or len(methods) != width:
            raise FormatError(f"{where}.params.planes: expected a list of {width} planes")
        for k, entry in enumerate(methods):
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in METHODS):
                raise FormatError(f"{where}.params.planes[{k}]: expected [method, length] with method in {METHODS}")
            require_int(entry[1], f"{where}.params.planes[{k}][1]", 0, len(payload))
        if sum(e[1] for e in methods) != len(payload):
            raise FormatError(f"{where}: planes total {sum(e[1] for e in methods)} bytes, section holds {len(payload)}")
        if methods[width - 1][0] == "split":
            raise FormatError(f"{where}: the top plane is the context and cannot itself be split")
        starts = np.cumsum([0] + [e[1] for e in methods])
        decoded: list = [None] * width
        for k in [width - 1] + list(range(width - 1)):  # the context plane first
            method, length = methods[k]
            stored = payload[starts[k] : starts[k] + length]
            plane_where = f"{where} plane {k}"
            if method == "split":
                decoded[k] = _decode_split(stored, np.frombuffer(decoded[width - 1], np.uint8), plane_where)
            elif method == "raw" and length != n:
                raise FormatError(f"{plane_where}: raw plane holds {length} bytes, expected {n}")
            else:
                decoded[k] = unpack(stored, n, plane_where)
        planes.join(tuple(decoded), width, self.transform == "rotl1", out)

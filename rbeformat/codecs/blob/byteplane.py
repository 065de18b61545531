"""The ``byteplane`` codec: lossless compression of tensor elements.

The exponent of a trained weight takes few values while its low mantissa bits
are close to random, so bytes of different significance are compressed apart:

1. Each element is read as a little-endian word of ``itemsize`` bytes and, for
   floating-point dtypes, rotated left by a few bits.  Rotating by one moves the
   sign to bit 0 and puts the whole exponent of fp32 and bf16 in the top byte
   (``"transform": "rotl1"``, the only rotation of format 1.0 and 1.1).  With
   ``"transform": "rotl"`` each chunk names its own rotation: by three, say, the
   top byte holds the six low exponent bits with the two top mantissa bits,
   whose distribution depends on the exponent, while the near-constant high
   exponent bits join the sign at the bottom of plane 0.
2. The words are split into ``itemsize`` byte planes; plane k holds byte k of
   every word.
3. Each plane is stored with one of four methods, chosen per chunk:
   ``raw`` (as is), ``zstd`` (one zstd frame), ``fields``: the high and the low
   bits of each byte packed apart, the low ones compressed (near-constant low
   bits then cost almost nothing, and the high ones decode without an entropy
   decoder), or ``split``: the plane's bytes are grouped by the value of the
   same element's top-plane byte (a stable counting sort) and each group is
   stored as its own run, so each group gets an entropy coder fitted to it.

Chunks (``chunk_items`` elements) are independent, so they decode in parallel
and one tensor can be read without the rest.

>>> codec = Byteplane().for_dtype(DTYPES["F32"])
>>> data = (np.arange(5000, dtype=np.float32) - 2500) / 4096
>>> parts, params = codec.encode_chunk(memoryview(data.tobytes()), DTYPES["F32"])
>>> sorted(params)
['planes', 'rotate']
>>> out = bytearray(data.nbytes)
>>> codec.decode_chunk(memoryview(b"".join(parts)), params, DTYPES["F32"], memoryview(out), "x")
>>> bytes(out) == data.tobytes()
True
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from ...errors import FormatError
from ...spec import DTYPES, MAX_CHUNK_DECODED_BYTES, DType  # noqa: F401 (DTYPES used by the doctest)
from ..core.base import Codec, require_int, require_keys
from ..util.bitpack import packed_size
from . import planes
from .zstd import PLANES, pack, unpack

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
TRANSFORMS = ("none", "rotl1", "rotl")
# The writer tries rotations 0..7 on a sample of each chunk, ranks them by the
# order-0 entropy of their planes, and compresses the best few for real: the
# estimate ignores zstd's per-block tables, so its first pick is not always best.
ROTATIONS_TRIED = 8
ROTATIONS_COMPRESSED = 2
SAMPLE_ITEMS = 65536
METHODS = ("raw", "zstd", "split", "fields")
# Planes whose order-0 entropy is above this many bits per byte are stored raw
# without trying zstd: the attempt costs time and cannot gain more than ~1%.
INCOMPRESSIBLE_BITS = 7.9
# Between the two, a plane (e.g. the high mantissa bits) is skewed only a little:
# a fast zstd level's Huffman stage catches that; above this, raw it is.
NEARLY_RANDOM_BITS = 7.995
FAST_LEVEL = 1
# Above this entropy a plane gains nothing from zstd's match search (its bytes
# are nearly independent), so the fast level's entropy stage does the work.
LZ_USELESS_BITS = 4.0
# A plane method that decodes more slowly (raw, then fields, then zstd) is
# taken only if it saves at least this fraction of the plane.
DECODE_SLACK = 0.002
# Low bits of a plane whose order-0 entropy is at most this are "nearly constant".
NEAR_CONSTANT_BITS = 0.1
FRAME_BYTES = 16  # a small lower bound on a zstd frame's header and Huffman table
# Within a split plane, a group is compressed only if that makes it this much smaller.
MIN_RUN_SAVING = 0.97
# A split plane decodes several times slower than a zstd or raw one (a gather
# per byte), while on trained weights it typically saves under 1% of the plane.
# By default it must save at least this fraction of the whole chunk: bf16
# chunks (two planes) take it more often than fp32 chunks, whose other planes
# cost almost nothing to decode.  Set 0 to take every gain.
DEFAULT_SPLIT_GAIN = 0.002


def _entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy, in bits per byte, of a plane with these byte counts."""
    p = counts[counts > 0] / max(int(counts.sum()), 1)
    return float(-(p * np.log2(p)).sum())


def rotation_candidates(data: memoryview, width: int) -> list[int]:
    """Rotations worth compressing, best first by the order-0 entropy of a sample's planes."""
    words = np.frombuffer(data, dtype=np.uint8).reshape(-1, width)
    step = max(1, len(words) // SAMPLE_ITEMS)
    sample = np.ascontiguousarray(words[::step]).reshape(-1)
    if sample.size == 0:
        return [1]
    costs = []
    for r in range(min(ROTATIONS_TRIED, 8 * width)):
        grid = planes.split(sample, width, r).reshape(width, -1)
        costs.append(sum(_entropy_bits(planes.histogram(plane)) for plane in grid))
    order = sorted(range(len(costs)), key=lambda r: (costs[r], r))  # ties: the smaller rotation
    return order[:ROTATIONS_COMPRESSED]


def _split_may_pay(plane: np.ndarray, context: np.ndarray, target: float) -> bool:
    """Whether a split plane could be shorter than ``target`` bytes.

    A run costs its table entry plus either its bytes (stored raw) or about
    its order-0 entropy and a frame with a Huffman table (FRAME_BYTES).  The
    estimate ignores zstd's matches, so on grid-like values it may skip a split
    that would have paid: a size choice only, never a correctness one.
    """
    joint = planes.joint_histogram(context, plane)
    counts = joint.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = joint / counts[:, None]
        bits = -np.where(joint > 0, joint * np.log2(np.where(joint > 0, p, 1)), 0).sum(axis=1)
    used = counts > 0
    runs = np.minimum(counts[used], bits[used] / 8 + FRAME_BYTES) + 4
    return float(runs.sum()) < target


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


def _constant_low_bits(counts: np.ndarray, n: int) -> int:
    """How many low bits of a plane are nearly constant (0 if none), for ``fields``.

    Packed, such bits compress to almost nothing; packed bits that vary
    would lose zstd its byte-aligned symbols, so only near-constant ones count.
    """
    best = 0
    for low in range(1, 8):
        folded = counts.reshape(-1, 1 << low).sum(axis=0)
        p = folded[folded > 0] / max(n, 1)
        if float(-(p * np.log2(p)).sum()) <= NEAR_CONSTANT_BITS:
            best = low
    return best


def encode_fields(plane: np.ndarray, low: int, level: int) -> bytes:
    high, low_values = planes.split_fields(plane, low)
    return bytes([low]) + high.tobytes() + pack(low_values, level)


def decode_fields(stored: memoryview, n: int, where: str) -> np.ndarray:
    if len(stored) < 1 or not 1 <= stored[0] <= 7:
        raise FormatError(f"{where}: a fields plane starts with its low bit count, 1 to 7")
    low = stored[0]
    end = 1 + packed_size(n, 8 - low)
    if len(stored) < end:
        raise FormatError(f"{where}: fields plane of {len(stored)} bytes cannot hold its {end - 1} bytes of high bits")
    low_values = unpack(stored[end:], packed_size(n, low), f"{where} low bits")
    return planes.join_fields(stored[1:end], low_values, low, n)


def _split_runs(stored: memoryview, sizes: list[int], where: str) -> tuple:
    """The decoded runs of a split plane whose context values occur ``sizes`` times."""
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
    return tuple(runs)


def balanced_chunk_items(itemsize: int, items: int | None) -> int:
    """Elements per chunk: at most 4 MiB, and all chunks of a tensor of ``items``
    elements (None: unknown) of nearly equal size, which balances threads."""
    largest = max(1, DEFAULT_CHUNK_BYTES // itemsize)
    if not items:
        return largest
    return -(-items // -(-items // largest))


class Byteplane(Codec):
    """Lossless, bit-exact for every dtype; see the module docstring."""

    name = "byteplane"
    lossless = True

    def __init__(
        self,
        transform: str | None = None,
        chunk_items: int | None = None,
        level: int = PLANES,
        split_gain: float = DEFAULT_SPLIT_GAIN,
    ):
        # transform None: chosen by for_dtype ("rotl" for floats, "none" otherwise).
        if transform is not None and transform not in TRANSFORMS:
            raise ValueError(f"transform must be one of {TRANSFORMS}")
        self.transform = transform
        self.items = chunk_items
        self.level = level
        self.split_gain = split_gain

    def for_dtype(self, dtype: DType, items: int | None = None) -> Byteplane:
        """The codec bound to ``dtype``: per-chunk rotation for floats.

        Unless set, chunks hold at most 4 MiB and a tensor of ``items``
        elements is cut into chunks of nearly equal size.
        """
        transform = self.transform or ("rotl" if dtype.is_float else "none")
        return Byteplane(
            transform, self.items or balanced_chunk_items(dtype.itemsize, items), self.level, self.split_gain
        )

    def config(self) -> dict[str, Any]:
        return {"transform": self.transform, "chunk_items": self.items}

    def chunk_items(self, dtype: DType) -> int:
        return self.items or max(1, DEFAULT_CHUNK_BYTES // dtype.itemsize)

    @classmethod
    def from_config(cls, config: dict[str, Any], where: str) -> Byteplane:
        require_keys(config, where, {"transform", "chunk_items"})
        if config["transform"] not in TRANSFORMS:
            raise FormatError(f"{where}.transform: expected one of {TRANSFORMS}, found {config['transform']!r:.40}")
        items = require_int(config["chunk_items"], f"{where}.chunk_items", 1, MAX_CHUNK_DECODED_BYTES)
        return cls(config["transform"], items)

    def encode_chunk(self, data: memoryview, dtype: DType) -> tuple[list[bytes], dict[str, Any]]:
        width = dtype.itemsize
        if self.transform != "rotl":
            parts, methods = self._encode_rotated(data, width, 1 if self.transform == "rotl1" else 0)
            return parts, {"planes": methods}
        best = None
        for r in rotation_candidates(data, width):
            parts, methods = self._encode_rotated(data, width, r)
            if best is None or sum(len(p) for p in parts) < sum(len(p) for p in best[1]):
                best = (r, parts, methods)
        r, parts, methods = best
        return parts, {"planes": methods, "rotate": r}

    def _encode_rotated(self, data: memoryview, width: int, rotate: int) -> tuple[list[bytes], list]:
        n = len(data) // width
        all_planes = planes.split(data, width, rotate).reshape(width, n)
        top = all_planes[width - 1]
        parts, methods = [], []
        for k in range(width):
            min_saving = self.split_gain * len(data)
            method, stored = self._encode_plane(all_planes[k], top if k < width - 1 else None, min_saving)
            parts.append(stored)
            methods.append([method, len(stored)])
        return parts, methods

    def _encode_plane(self, plane: np.ndarray, context: np.ndarray | None, min_saving: float) -> tuple[str, bytes]:
        candidates = [("raw", plane.tobytes())]
        counts = planes.histogram(plane)
        entropy = _entropy_bits(counts)
        if entropy < INCOMPRESSIBLE_BITS:
            frame = ("zstd", pack(plane, self.level if entropy < LZ_USELESS_BITS else FAST_LEVEL))
        elif entropy < NEARLY_RANDOM_BITS:
            # Only the entropy coder can gain here; zstd's fastest level has the same one.
            frame = ("zstd", pack(plane, FAST_LEVEL))
        else:
            frame = None
        low = _constant_low_bits(counts, len(plane))
        if low:
            # Near-constant low bits (the high exponent bits after a rotation)
            # cost almost nothing this way, and decode far faster than zstd.
            candidates.append(("fields", encode_fields(plane, low, self.level)))
        # Candidates are in order of decoding speed; a slower one must save
        # DECODE_SLACK of the plane to be taken.  Ties keep output deterministic.
        if frame is not None:
            candidates.append(frame)
        smallest = min(len(c[1]) for c in candidates)
        best = next(c for c in candidates if len(c[1]) <= smallest + DECODE_SLACK * len(plane))
        if context is not None and len(plane) >= 4096 and _split_may_pay(plane, context, len(best[1]) - min_saving):
            split = _encode_split(plane, context, self.level)
            if len(split) < len(best[1]) - min_saving:
                best = ("split", split)
        return best

    def decode_chunk(self, payload: memoryview, params: Any, dtype: DType, out: memoryview, where: str) -> None:
        width = dtype.itemsize
        n = len(out) // width
        rotate = self._rotation(params, width, where)
        methods = params["planes"]
        if not isinstance(methods, list) or len(methods) != width:
            raise FormatError(f"{where}.params.planes: expected a list of {width} planes")
        stored, pos = [], 0
        for k, entry in enumerate(methods):
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] in METHODS):
                raise FormatError(f"{where}.params.planes[{k}]: expected [method, length] with method in {METHODS}")
            length = require_int(entry[1], f"{where}.params.planes[{k}][1]", 0, len(payload))
            if entry[0] == "raw" and length != n:
                raise FormatError(f"{where} plane {k}: raw plane holds {length} bytes, expected {n}")
            stored.append(payload[pos : pos + length])
            pos += length
        if pos != len(payload):
            raise FormatError(f"{where}: planes total {pos} bytes, section holds {len(payload)}")
        if methods[width - 1][0] == "split":
            raise FormatError(f"{where}: the top plane is the context and cannot itself be split")
        decoded: list = [None] * width
        for k in range(width):
            method, plane_where = methods[k][0], f"{where} plane {k}"
            if method == "fields":
                decoded[k] = decode_fields(stored[k], n, plane_where)
            elif method != "split":
                decoded[k] = unpack(stored[k], n, plane_where)
        split = [k for k in range(width) if methods[k][0] == "split"]
        if split:  # all split planes share the context (the top plane): ungroup them in one pass
            context = np.frombuffer(decoded[width - 1], np.uint8)
            segments = planes.segment_histograms(context)
            counts = segments.sum(axis=0)
            sizes = [int(c) for c in counts[counts > 0]]
            runs = [_split_runs(stored[k], sizes, f"{where} plane {k}") for k in split]
            for k, plane in zip(split, planes.ungroup_planes(runs, context, segments)):
                decoded[k] = plane
        planes.join(tuple(decoded), width, rotate, out)

    def _rotation(self, params: Any, width: int, where: str) -> int:
        """The chunk's rotation: fixed by the transform, or named by the chunk for ``rotl``."""
        if self.transform != "rotl":
            require_keys(params, f"{where}.params", {"planes"})
            return 1 if self.transform == "rotl1" else 0
        require_keys(params, f"{where}.params", {"planes", "rotate"})
        return require_int(params["rotate"], f"{where}.params.rotate", 0, 8 * width - 1)
